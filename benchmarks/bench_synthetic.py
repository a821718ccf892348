"""Time `generate_market` for 3, 20 and 100 symbols over two years of hourly bars (best of 3).

Run: .venv/bin/python benchmarks/bench_synthetic.py
Prints a markdown table. Target from the product issue: 100 symbols x 2 years < 5 s (aim < 2 s).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

from perpfolio.sources.synthetic import generate_market

START = datetime(2024, 1, 1, tzinfo=timezone.utc)
END = datetime(2026, 1, 1, tzinfo=timezone.utc)
MAJORS = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
REPEATS = 3


def universe(n: int) -> list[str]:
    return (MAJORS + [f"SYN{i:03d}USDT" for i in range(n)])[:n]


def best_time(symbols: list[str]) -> tuple[float, int, int]:
    best, market = float("inf"), None
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        market = generate_market(symbols, START, END)
        best = min(best, time.perf_counter() - t0)
    return best, market.candles.height, market.funding.height


def main() -> None:
    generate_market(MAJORS, START, START.replace(month=2))  # warm-up (imports, caches)
    print(f"generate_market, {START:%Y-%m-%d}..{END:%Y-%m-%d} hourly, best of {REPEATS}\n")
    print("| symbols | seconds | candle rows | funding rows | candle rows/s |")
    print("|--------:|--------:|------------:|-------------:|--------------:|")
    for n in (3, 20, 100):
        seconds, candles, funding = best_time(universe(n))
        print(f"| {n} | {seconds:.3f} | {candles:,} | {funding:,} | {candles / seconds:,.0f} |")


if __name__ == "__main__":
    main()
