"""Ingest a Binance-layout archive of 20 symbols x one year of hourly candles and funding.

The files are generated from the synthetic market and written in the archive layout into a
temporary folder first (12-column kline CSVs with header, funding CSVs, each zipped with a
``.CHECKSUM``), once with MONTHLY kline files (12 per symbol) and once with DAILY kline files
(365 per symbol; funding is monthly in both). Then ``read_archive`` reads the whole year.

Run: .venv/bin/python benchmarks/bench_archive.py
Prints markdown tables: rows/s per layout (best of 3), where the time goes (the stages timed
separately on the monthly layout) and the peak resident memory of a process that only reads.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tempfile
import time
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl

from perpfolio.sources import archive
from perpfolio.sources.archive import archive_files, read_archive
from perpfolio.sources.synthetic import generate_market

START = datetime(2025, 1, 1, tzinfo=timezone.utc)
END = datetime(2026, 1, 1, tzinfo=timezone.utc)
SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT"] + [f"SYN{i:03d}USDT" for i in range(17)]
REPEATS = 3


def _zip_with_checksum(path: Path, frame: pl.DataFrame) -> None:
    buffer = io.BytesIO()
    frame.write_csv(buffer)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(path.with_suffix(".csv").name, buffer.getvalue())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_name(path.name + ".CHECKSUM").write_text(f"{digest}  {path.name}\n")


def write_archive(root: Path, *, daily: bool) -> int:
    """Write the synthetic year in the archive layout; returns the number of data files."""
    market = generate_market(SYMBOLS, START, END, seed=1)
    ms = lambda c: pl.col(c).dt.epoch("ms")  # noqa: E731
    klines = market.candles.select(
        "symbol", ms("ts").alias("open_time"), "open", "high", "low", "close", "volume",
        (ms("ts") + 3_599_999).alias("close_time"), *(pl.lit(0).alias(c) for c in
        ("quote_volume", "count", "taker_buy_volume", "taker_buy_quote_volume", "ignore")),
        period=pl.col("ts").dt.strftime("%Y-%m-%d" if daily else "%Y-%m"),
    )
    funding = market.funding.select(
        "symbol", ms("ts").alias("calc_time"), pl.col("interval_hours").alias("funding_interval_hours"),
        pl.col("rate").alias("last_funding_rate"), period=pl.col("ts").dt.strftime("%Y-%m"),
    )
    n = 0
    for (symbol, period), part in klines.partition_by(["symbol", "period"], as_dict=True).items():
        folder = root / "futures/um" / ("daily" if daily else "monthly") / "klines" / symbol / "1h"
        folder.mkdir(parents=True, exist_ok=True)
        _zip_with_checksum(folder / f"{symbol}-1h-{period}.zip", part.drop("symbol", "period"))
        n += 1
    for (symbol, period), part in funding.partition_by(["symbol", "period"], as_dict=True).items():
        folder = root / "futures/um/monthly/fundingRate" / symbol
        folder.mkdir(parents=True, exist_ok=True)
        _zip_with_checksum(folder / f"{symbol}-fundingRate-{period}.zip", part.drop("symbol", "period"))
        n += 1
    return n


def best(fn) -> tuple[float, object]:
    times, out = [], None
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def stages(root: Path) -> list[tuple[str, float]]:
    """The reader's stages timed one by one over every file of the year (monthly layout)."""
    files = [f for s in SYMBOLS for ds in ("klines", "fundingRate")
             for f in archive_files(root, s, ds, START, END + timedelta(hours=1))]
    out = []
    t, _ = best(lambda: [archive_files(root, s, ds, START, END) for s in SYMBOLS for ds in ("klines", "fundingRate")])
    out.append(("list and select files", t))
    t, _ = best(lambda: [archive.verify_file_checksum(f.path) for f in files])
    out.append(("sha256 checksums", t))
    t, blobs = best(lambda: [archive._csv_bytes(f.path) for f in files])
    out.append(("unzip", t))
    t, _ = best(lambda: [pl.read_csv(b, has_header=False, infer_schema=False, skip_rows=1) for b in blobs])
    out.append(("CSV parse (polars, strings)", t))
    per_symbol = [([f for f in files if f.symbol == s and f.dataset == ds], s, ds) for s in SYMBOLS
                  for ds in ("klines", "fundingRate")]
    t, _ = best(lambda: [archive._read_bars(fs, s, False, archive._KLINE_COLS) if ds == "klines"
                         else archive._read_funding(fs, s, False) for fs, s, ds in per_symbol])
    out.append(("unzip + CSV parse + validate + convert (no checksums)", t))
    return out


def peak_rss_mb(root: Path) -> tuple[float, float]:
    """Peak RSS (VmHWM; ru_maxrss would inherit the parent's peak) of a child that reads the year, and of one that only imports (MB)."""
    code = ("import sys; from datetime import datetime, timezone; "
            "from perpfolio.sources.archive import read_archive; "
            f"syms = {SYMBOLS!r}; "
            "s, e = datetime(2025,1,1,tzinfo=timezone.utc), datetime(2026,1,1,tzinfo=timezone.utc); "
            "d = read_archive(sys.argv[1], syms, s, e) if sys.argv[2] == '1' else None; "
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))")
    rss = [int(subprocess.run([sys.executable, "-c", code, str(root), flag], capture_output=True, text=True,
                              check=True).stdout) / 1024 for flag in ("1", "0")]
    return rss[0], rss[1]


def main() -> None:
    print(f"read_archive: {len(SYMBOLS)} symbols, {START:%Y-%m-%d}..{END:%Y-%m-%d} hourly, best of {REPEATS}\n")
    print("| layout | files | seconds | candle rows | funding rows | rows/s (candles + funding) | checksums off: seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for daily in (False, True):
            root = Path(tmp) / ("daily" if daily else "monthly")
            n_files = write_archive(root, daily=daily)
            seconds, data = best(lambda: read_archive(root, SYMBOLS, START, END))
            nocheck, _ = best(lambda: read_archive(root, SYMBOLS, START, END, verify_checksums=False))
            rows = data.candles.height + data.funding.height
            if not data.quality.is_empty():
                raise SystemExit(f"unexpected data-quality rows: {data.quality}")
            print(f"| {'daily klines' if daily else 'monthly'} | {n_files:,} | {seconds:.3f} | {data.candles.height:,} | "
                  f"{data.funding.height:,} | {rows / seconds:,.0f} | {nocheck:.3f} |")
        monthly = Path(tmp) / "monthly"
        total, _ = best(lambda: read_archive(monthly, SYMBOLS, START, END))
        print("\nWhere the time goes (monthly layout, each stage alone over all files, best of 3):\n")
        print("| stage | seconds | share of the full read |")
        print("|---|---:|---:|")
        for name, t in stages(monthly):
            print(f"| {name} | {t:.3f} | {t / total:.0%} |")
        print(f"| full read_archive (adds window filter, dedupe, sort, gap search) | {total:.3f} | 100% |")
        with_data, baseline = peak_rss_mb(monthly)
        print(f"\nPeak RSS of a process reading the monthly year: {with_data:.0f} MB "
              f"(imports alone: {baseline:.0f} MB; the read adds {with_data - baseline:.0f} MB).")


if __name__ == "__main__":
    main()
