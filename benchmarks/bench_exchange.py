"""Ingest 20 symbols x one year of hourly candles (trade, mark, index) and funding from the replay
server, through the exchange source as the raw asset runs it (ccxt client, pagination, validation,
download cache), for each exchange's format and page sizes.

The server runs in its own process (python -m tools.replay) so the figures are the client's.
Each exchange is read three ways: cold with ccxt's rate limiter OFF (what the client itself costs),
warm (every day already in the cache: no request at all), and - for Binance only, on 2 symbols,
scaled - with the rate limiter ON (what a real download is bound by: the exchange's weight budget).

Run: .venv/bin/python benchmarks/bench_exchange.py
Prints markdown tables: rows/s and requests per exchange, where the time goes (HTTP + ccxt, parsing
and validation, cache writes, cache reads and cleaning) and the peak resident memory of the client.
"""

from __future__ import annotations

import cProfile
import pstats
import resource
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from perpfolio.sources.exchange import client_for, read_exchange
from perpfolio.sources.exchange_cache import ExchangeCache

START = datetime(2025, 1, 1, tzinfo=timezone.utc)
END = datetime(2026, 1, 1, tzinfo=timezone.utc)
SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT"] + [f"SYN{i:03d}USDT" for i in range(17)]
NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)


def start_server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "tools.replay", "--port", str(port), "--symbols",
                             ",".join(SYMBOLS), "--start", "2024-12-31", "--end", "2026-01-02"], stdout=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("replay server did not start")


def stage_times(profile: cProfile.Profile) -> dict[str, float]:
    """Cumulative seconds in the client's stages (top-level calls of each kind)."""
    stats = pstats.Stats(profile)
    wanted = {"call": "HTTP + ccxt (ExchangeClient.call)", "_validate": "validation of each piece",
              "store": "cache writes", "rows": "cache reads", "_klines_frame": "cleaning (klines)",
              "_funding_frame": "cleaning (funding)"}
    out = {label: 0.0 for label in wanted.values()}
    for (file, _, name), (_, _, _, cum, _) in stats.stats.items():
        if name in wanted and ("exchange" in file):
            out[wanted[name]] += cum
    return out


def main() -> None:
    port = 18765
    server = start_server(port)
    url = f"http://127.0.0.1:{port}"
    rows_of = lambda r: sum(f.height for f in (r.data.candles, r.data.funding, r.data.reference_prices))  # noqa: E731
    print("| exchange | rows | requests | cold s (limiter off) | rows/s | warm s (cache) | rows/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    stages = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for exchange in ("binance", "bybit", "okx"):
                with ExchangeCache(Path(tmp) / f"{exchange}.duckdb") as cache:
                    client = client_for(exchange, base_url=url, rate_limit=False)
                    profile = cProfile.Profile()
                    t0 = time.perf_counter()
                    profile.enable()
                    cold = read_exchange(client, SYMBOLS, START, END, cache=cache, now=NOW)
                    profile.disable()
                    t_cold = time.perf_counter() - t0
                    stages[exchange] = stage_times(profile)
                    t0 = time.perf_counter()
                    warm = read_exchange(client_for(exchange, base_url=url, rate_limit=False), SYMBOLS, START, END,
                                         cache=cache, now=NOW)
                    t_warm = time.perf_counter() - t0
                    assert warm.requests == 1 and warm.data.candles.equals(cold.data.candles)  # the instrument list only
                n = rows_of(cold)
                print(f"| {exchange} | {n:,} | {cold.requests:,} | {t_cold:.1f} | {n / t_cold:,.0f} | {t_warm:.2f} | "
                      f"{n / t_warm:,.0f} |")
            limited = client_for("binance", base_url=url, rate_limit=True)
            t0 = time.perf_counter()
            part = read_exchange(limited, SYMBOLS[:2], START, END, now=NOW)
            t_lim = time.perf_counter() - t0
            print(f"\nBinance with ccxt's rate limiter ON, 2 symbols: {part.requests} requests in {t_lim:.1f} s "
                  f"({t_lim / part.requests * 1000:.0f} ms per request); 20 symbols scale to "
                  f"~{t_lim * 10:.0f} s.")
    finally:
        server.kill()
    print("\n| stage (cold read, s) | " + " | ".join(stages) + " |")
    print("|---|" + "---:|" * len(stages))
    for label in next(iter(stages.values())):
        print(f"| {label} | " + " | ".join(f"{stages[e][label]:.1f}" for e in stages) + " |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nPeak resident memory of the client process: {peak:.0f} MB")


if __name__ == "__main__":
    main()
