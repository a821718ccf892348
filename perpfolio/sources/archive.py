"""Binance USD-M public data archive reader: hourly klines, funding events and the mark and index
price klines (reference prices) from files on disk.

Layout under a root directory (the layout of data.binance.vision)::

    futures/um/monthly/klines/<SYMBOL>/1h/<SYMBOL>-1h-<YYYY-MM>.zip|.csv
    futures/um/daily/klines/<SYMBOL>/1h/<SYMBOL>-1h-<YYYY-MM-DD>.zip|.csv
    futures/um/monthly/fundingRate/<SYMBOL>/<SYMBOL>-fundingRate-<YYYY-MM>.zip|.csv
    futures/um/{monthly,daily}/markPriceKlines/<SYMBOL>/1h/<SYMBOL>-1h-<period>.zip|.csv
    futures/um/{monthly,daily}/indexPriceKlines/<SYMBOL>/1h/<SYMBOL>-1h-<period>.zip|.csv

Mark and index klines are optional: a symbol without their folders simply has no reference rows
(the index price is the exchange's spot composite, the mark price the price margin and PnL are
marked at; see ``REFERENCE_SCHEMA``).

File formats (columns by POSITION; a header row is optional — older files have none, it is
recognised by a first field that is not a number):

- klines: ``open_time, open, high, low, close, volume, close_time, ...`` (12 columns in the
  archive; only the first six are read). ``open_time`` is the bar's open time.
- markPriceKlines, indexPriceKlines: the same 12-column layout; only the first five are read (their
  volume fields carry nothing).
- fundingRate: ``calc_time, funding_interval_hours, last_funding_rate``; the rate is a decimal per
  funding interval, positive = longs pay shorts.

Timestamps are epoch MILLISECONDS or MICROSECONDS (Binance switched some archives to µs in 2025),
told apart per value by magnitude: ``v >= 1e14`` is µs (1e14 ms would be the year 5138, 1e14 µs is
1973), ``1e11 <= v < 1e14`` is ms; anything smaller is a malformed timestamp.

Which files are read, for a window ``[start, end)``:

- only files whose period (a calendar month or a UTC day) overlaps the window — candles
  ``[start, end)``, funding ``[start, end + 1h)`` because an event at ``end`` settles in the last bar;
- a period present as both ``.zip`` and extracted ``.csv`` is read once, from the ``.zip`` (the
  file the archive's ``.CHECKSUM`` describes);
- a DAILY file is skipped when the MONTHLY file of its month exists (monthly is preferred), so the
  same hours are never read twice; any key that still repeats (e.g. overlapping files of a
  hand-made archive, or a duplicated line) is dropped keeping the FIRST occurrence in reading order
  (monthly files, then daily, each by period, then line order) and counted.

``<file>.CHECKSUM`` next to a file (``"<sha256 hex>  <file name>"``) is verified when present; a
mismatch raises. Every invalid value raises :class:`~perpfolio.errors.DataError` naming the file,
line, symbol and field: unparsable or missing fields, a wrong number of columns, NaN/inf, prices
``<= 0``, ``volume < 0`` (klines), a candle not on the hour, a funding interval ``<= 0``, and for mark
and index klines ``high < max(open, close)`` or ``low > min(open, close)``; a corrupt zip names the
file. A trade candle whose open or close lies outside its own [low, high] is NOT an error here: it
is a bad print that :mod:`perpfolio.quality` flags (with the file and line kept in
:attr:`ArchiveData.candle_origin`). An empty file (no byte, only a header, or an empty CSV inside a
zip) reads as no rows: a missing month of candles is reported as gaps, of funding as funding gaps.

Data-quality policy (nothing is invented): duplicates are dropped and counted, out-of-order rows
are sorted and counted, missing hours are REPORTED (never filled) — see :func:`find_gaps` — and
every issue is a row of :attr:`ArchiveData.quality`, split at UTC midnight so that a row describes
one day (daily partitions store their own rows). Gaps are reported for candles only; mark and index
rows get the duplicate and out-of-order rows (dataset ``mark`` / ``index``).

Funding ``bar_ts`` (the bar whose interval ``(bar_ts, bar_ts + 1h]`` holds the event) is
``ceil_to_hour(ts) - 1h``: an event exactly on the hour settles in the bar that ENDS then, and an
event at 08:00:00.005 (the archive's clock jitter) in the bar 08:00-09:00.
"""

from __future__ import annotations

import hashlib
import math
import re
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import polars as pl

from perpfolio.errors import ConfigError, DataError
from perpfolio.sources.window import check_window, day_start

SOURCE = "archive"
_TS = pl.Datetime("us", "UTC")
_HOUR_US = 3_600_000_000
_US_MIN = 10**14  # epoch values at or above this are microseconds
_MS_MIN = 10**11  # ... between this and _US_MIN milliseconds; below: malformed
_PRICE_COLS = ("open_time", "open", "high", "low", "close")
_KLINE_COLS = (*_PRICE_COLS, "volume")
_FUNDING_COLS = ("calc_time", "funding_interval_hours", "last_funding_rate")

CANDLES_SCHEMA = {
    "ts": _TS, "symbol": pl.String, "open": pl.Float64, "high": pl.Float64, "low": pl.Float64,
    "close": pl.Float64, "volume": pl.Float64, "source": pl.String,
}
FUNDING_SCHEMA = {
    "ts": _TS, "bar_ts": _TS, "symbol": pl.String, "rate": pl.Float64, "interval_hours": pl.Int64, "source": pl.String,
}
REFERENCE_SCHEMA = {
    "ts": _TS, "symbol": pl.String, "kind": pl.String, "open": pl.Float64, "high": pl.Float64, "low": pl.Float64,
    "close": pl.Float64, "source": pl.String,
}
"""raw.reference_prices: one hourly bar per (ts, symbol, kind); kind "mark" (the exchange's mark price)
or "index" (its spot composite); prices > 0 with high >= max(open, close) and low <= min(open, close)."""
REFERENCE_DATASETS = {"mark": "markPriceKlines", "index": "indexPriceKlines"}  # kind -> archive folder
_KLINE_LAYOUT = ("klines", *REFERENCE_DATASETS.values())  # datasets in the 1h kline layout
QUALITY_SCHEMA = {
    "symbol": pl.String, "dataset": pl.String, "issue": pl.String, "from_ts": _TS, "to_ts": _TS,
    "bars_missing": pl.Int64, "duplicates_dropped": pl.Int64, "out_of_order": pl.Int64, "events_missing": pl.Int64,
    "value": pl.Float64, "detail": pl.String,
}
ORIGIN_SCHEMA = {"ts": _TS, "symbol": pl.String, "origin": pl.String}
"""Where each candle came from, for data-quality messages: ``"<file>: line <n>"`` (archive), ``"<exchange>
<endpoint>"`` (exchange); a source without rows here is named by the candle's ``source``."""


@dataclass(frozen=True)
class ArchiveFile:
    """One archive file: its symbol, dataset (klines | fundingRate | markPriceKlines | indexPriceKlines),
    granularity and period [start, end)."""

    path: Path
    symbol: str
    dataset: str
    granularity: str  # "monthly" | "daily"
    start: datetime
    end: datetime


@dataclass(frozen=True)
class ArchiveData:
    """What :func:`read_archive` returns.

    ``candles``: ts, symbol, open, high, low, close, volume, source — bars with ts in [start, end),
    sorted by (symbol, ts), unique per key. ``funding``: ts, bar_ts, symbol, rate (decimal per
    interval), interval_hours, source — events with bar_ts in [start, end). ``quality``: one row per
    issue and UTC day: symbol, dataset (candles | funding | mark | index), issue (gap | duplicates |
    out_of_order), from_ts, to_ts (first and last affected hour, inclusive), bars_missing,
    duplicates_dropped, out_of_order (the count that applies to the issue, 0 in the others),
    events_missing (0), value and detail (null) — the columns :mod:`perpfolio.quality` fills for
    its outlier and funding_gap rows. ``files``: the files read. ``reference_prices``:
    ``REFERENCE_SCHEMA`` bars with ts in [start, end), sorted by (symbol, kind, ts), unique per (ts,
    symbol, kind); a symbol or kind the source does not provide has no rows (not an error).
    ``candle_origin``: ``ORIGIN_SCHEMA``, one row per candle that says where it was read.
    """

    candles: pl.DataFrame
    funding: pl.DataFrame
    quality: pl.DataFrame
    files: tuple[Path, ...]
    reference_prices: pl.DataFrame
    candle_origin: pl.DataFrame

    @property
    def gaps(self) -> pl.DataFrame:
        """Missing hours: symbol, from_ts, to_ts (first and last missing bar open), bars_missing."""
        return self.quality.filter(pl.col("issue") == "gap").select("symbol", "from_ts", "to_ts", "bars_missing")

    def __repr__(self) -> str:
        return (f"ArchiveData(candles={self.candles.height} rows, funding={self.funding.height} rows, "
                f"reference_prices={self.reference_prices.height} rows, quality={self.quality.height} issues, "
                f"files={len(self.files)})")


def read_archive(
    root: Path | str, symbols: Sequence[str], start: datetime, end: datetime, *, verify_checksums: bool = True
) -> ArchiveData:
    """Candles, funding, mark/index prices and data-quality rows of ``symbols`` for bars in
    ``[start, end)`` (module docstring).

    ``start``/``end``: tz-aware UTC datetimes on the hour. A symbol with no klines folder at all
    raises DataError (a misspelt symbol or root); a window the files do not cover is reported as gaps.
    A symbol without mark or index files has no reference rows of that kind.
    """
    root = Path(root)
    check_window(start, end)
    if isinstance(symbols, str) or not symbols:
        raise ConfigError(f"symbols must be a non-empty sequence of exchange ids, got {symbols!r}")
    candles, funding, reference, quality, files, origin = [], [], [], [], [], []
    for symbol in symbols:
        c_files = archive_files(root, symbol, "klines", start, end)
        f_files = archive_files(root, symbol, "fundingRate", start, end + timedelta(hours=1))
        files += [f.path for f in c_files + f_files]
        c, c_quality = _combine(_read_bars(c_files, symbol, verify_checksums, _KLINE_COLS), symbol, "candles", start, end)
        fu, f_quality = _combine(_read_funding(f_files, symbol, verify_checksums), symbol, "funding", start, end,
                                 window_col="bar_ts")
        paths = {i: str(f.path) for i, f in enumerate(c_files)}
        origin.append(c.select("ts", "symbol", pl.format(
            "{}: line {}", pl.col("file").replace_strict(paths, return_dtype=pl.String), "line").alias("origin")))
        candles.append(c.select(list(CANDLES_SCHEMA)))
        funding.append(fu.select(list(FUNDING_SCHEMA)))
        quality += [c_quality, f_quality, find_gaps(c, symbol, start, end)]
        for kind, dataset in REFERENCE_DATASETS.items():
            r_files = archive_files(root, symbol, dataset, start, end)
            files += [f.path for f in r_files]
            bars = _read_bars(r_files, symbol, verify_checksums, _PRICE_COLS).with_columns(kind=pl.lit(kind))
            _fail_any(bars, _OHLC_CHECKS, [f.path for f in r_files], symbol)
            r, r_quality = _combine(bars, symbol, kind, start, end)
            reference.append(r.select(list(REFERENCE_SCHEMA)))
            quality.append(r_quality)
    quality_frame = pl.concat(quality).sort("symbol", "dataset", "from_ts", "issue")
    return ArchiveData(candles=pl.concat(candles), funding=pl.concat(funding), quality=quality_frame,
                       files=tuple(files), reference_prices=pl.concat(reference).sort("symbol", "kind", "ts"),
                       candle_origin=pl.concat(origin))


def archive_files(root: Path | str, symbol: str, dataset: str, start: datetime, end: datetime) -> list[ArchiveFile]:
    """Files of ``symbol``/``dataset`` whose period overlaps ``[start, end)``, in reading order.

    Monthly before daily, each by period; a ``.zip`` shadows the ``.csv`` of the same period and a
    monthly file shadows the daily files of its month. Only a missing klines folder is an error:
    funding, mark and index folders may be absent (no files).
    """
    root = Path(root)
    if dataset not in (*_KLINE_LAYOUT, "fundingRate"):
        raise ConfigError(f"dataset must be one of {[*_KLINE_LAYOUT, 'fundingRate']}, got {dataset!r}")
    kline_layout = dataset in _KLINE_LAYOUT
    sub = ("1h",) if kline_layout else ()
    stem = f"{symbol}-1h-" if kline_layout else f"{symbol}-fundingRate-"
    monthly_dir = root.joinpath("futures", "um", "monthly", dataset, symbol, *sub)
    daily_dir = root.joinpath("futures", "um", "daily", dataset, symbol, *sub)
    if dataset == "klines" and not monthly_dir.is_dir() and not daily_dir.is_dir():
        known = sorted({p.name for g in ("monthly", "daily") for p in root.joinpath("futures", "um", g, "klines").glob("*")})
        raise DataError(
            f"archive {root}: no klines folder for symbol {symbol!r} (looked for {monthly_dir} and {daily_dir}); "
            f"symbols present: {known or 'none'}"
        )
    pattern = re.compile(re.escape(stem) + r"(\d{4})-(\d{2})(?:-(\d{2}))?\.(zip|csv)$")
    found: dict[tuple[str, date], ArchiveFile] = {}
    for granularity, folder in (("monthly", monthly_dir), ("daily", daily_dir)):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            m = pattern.match(path.name)
            if m is None or (m.group(3) is None) != (granularity == "monthly"):
                continue
            y, mo, d, ext = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
            try:
                first = date(y, mo, int(d) if d else 1)
            except ValueError as exc:
                raise DataError(f"{path}: file name has an invalid date ({exc})") from exc
            if d:
                last = first + timedelta(days=1)
            else:
                last = date(y + mo // 12, mo % 12 + 1, 1)
            key = (granularity, first)
            if key in found and ext == "csv":
                continue  # the zip of this period is read
            found[key] = ArchiveFile(path, symbol, dataset, granularity, day_start(first), day_start(last))
    months = {f.start for (g, _), f in found.items() if g == "monthly"}
    chosen = [
        f for (g, _), f in sorted(found.items(), key=lambda kv: (kv[0][0] != "monthly", kv[0][1]))
        if f.start < end and f.end > start
        and not (g == "daily" and day_start(f.start.date().replace(day=1)) in months)
    ]
    return chosen


def find_gaps(candles: pl.DataFrame, symbol: str, start: datetime, end: datetime) -> pl.DataFrame:
    """Missing hourly bars of ``symbol`` in ``[start, end)``, one row per run of missing hours and UTC day.

    A bar is missing when no row has its open time; ``bars_missing = (to_ts - from_ts) / 1h + 1``.
    Returns the quality schema (issue "gap", dataset "candles").
    """
    have = candles.filter(pl.col("symbol") == symbol).select(pl.col("ts").dt.epoch("us"))["ts"]
    grid = pl.DataFrame({"ts": pl.datetime_range(start, end, "1h", closed="left", time_unit="us", time_zone="UTC",
                                                 eager=True)})
    missing = grid.filter(~pl.col("ts").dt.epoch("us").is_in(have.implode()))
    if missing.is_empty():
        return pl.DataFrame(schema=QUALITY_SCHEMA)
    runs = missing.with_columns(
        run=((pl.col("ts").diff() != pl.duration(hours=1)).fill_null(True)
             | (pl.col("ts").dt.date() != pl.col("ts").dt.date().shift())).cum_sum()
    ).group_by("run").agg(from_ts=pl.col("ts").min(), to_ts=pl.col("ts").max(), bars_missing=pl.len().cast(pl.Int64))
    return quality_rows(runs.select(
        pl.lit(symbol).alias("symbol"), pl.lit("candles").alias("dataset"), pl.lit("gap").alias("issue"),
        "from_ts", "to_ts", "bars_missing",
    )).sort("from_ts")


def gap_report(candles: pl.DataFrame, symbols: Sequence[str], start: datetime, end: datetime) -> pl.DataFrame:
    """:func:`find_gaps` of every symbol (for any source's candles), in the quality schema."""
    frames = [find_gaps(candles, s, start, end) for s in symbols]
    return pl.concat(frames).sort("symbol", "from_ts") if frames else pl.DataFrame(schema=QUALITY_SCHEMA)


def quality_rows(rows: pl.DataFrame) -> pl.DataFrame:
    """``rows`` completed to ``QUALITY_SCHEMA``, in its column order: an absent count column is 0,
    an absent ``value`` or ``detail`` null (symbol, dataset, issue, from_ts and to_ts are required)."""
    counts = ("bars_missing", "duplicates_dropped", "out_of_order", "events_missing")
    return rows.with_columns(
        *(pl.lit(0, pl.Int64).alias(c) for c in counts if c not in rows.columns),
        *(pl.lit(None, QUALITY_SCHEMA[c]).alias(c) for c in ("value", "detail") if c not in rows.columns),
    ).select(list(QUALITY_SCHEMA)).cast(QUALITY_SCHEMA)


def empty_data() -> ArchiveData:
    """No rows, the right schemas (a window that lies entirely in the future)."""
    return ArchiveData(candles=pl.DataFrame(schema=CANDLES_SCHEMA), funding=pl.DataFrame(schema=FUNDING_SCHEMA),
                       quality=pl.DataFrame(schema=QUALITY_SCHEMA), files=(),
                       reference_prices=pl.DataFrame(schema=REFERENCE_SCHEMA),
                       candle_origin=pl.DataFrame(schema=ORIGIN_SCHEMA))


# --- reading one file -------------------------------------------------------------------------


def read_csv_fields(path: Path, names: Sequence[str], *, verify_checksum: bool = True) -> pl.DataFrame:
    """The first ``len(names)`` columns of an archive CSV (zip or plain) as strings named ``names``, plus ``line``.

    ``line`` is the 1-based line number in the CSV (a header row counts). Blank lines are skipped;
    a line with fewer fields or a ragged line raises DataError naming the file and line.
    """
    frame = _raw_fields(path, names, verify_checksum, 0)
    return _drop_blank_and_check_short(frame, names, [path]).drop("file")


def _raw_fields(path: Path, names: Sequence[str], verify_checksum: bool, file_index: int) -> pl.DataFrame:
    """``names`` (strings, null where a line is short or blank), ``line`` and ``file`` = ``file_index``; one collect."""
    if verify_checksum:
        verify_file_checksum(path)
    data = _csv_bytes(path)
    first, *rest = data.lstrip(b"\xef\xbb\xbf").split(b"\n", 1)
    header = 0 if first.strip()[:1].isdigit() else 1
    schema = {**dict.fromkeys(names, pl.String), "line": pl.Int64, "file": pl.Int32}
    body = (rest[0] if rest else b"") if header else data
    if not body.strip():
        return pl.DataFrame(schema=schema)  # no byte, or only a header: no rows
    try:
        frame = pl.read_csv(data, has_header=False, infer_schema=False, skip_rows=header)
    except pl.exceptions.PolarsError as exc:
        _raise_ragged(path, data, exc)
    if frame.width < len(names):
        raise DataError(f"{path}: line {1 + header}: expected at least {len(names)} fields, found {frame.width}")
    return frame.lazy().with_row_index("line", offset=1 + header).select(
        *(pl.col(v).alias(n) for v, n in zip(frame.columns, names)), pl.col("line").cast(pl.Int64),
        pl.lit(file_index, pl.Int32).alias("file"),
    ).collect()


def _drop_blank_and_check_short(frame: pl.DataFrame, names: Sequence[str], paths: Sequence[Path]) -> pl.DataFrame:
    """Drop blank lines (every field null); DataError naming file and line for a line with a missing field."""
    frame = frame.filter(~pl.all_horizontal(pl.col(names).is_null()))
    short = frame.filter(pl.any_horizontal(pl.col(names).is_null()))
    if short.height:
        row = short.row(0, named=True)
        field = next(i for i, n in enumerate(names) if row[n] is None)
        raise DataError(f"{_where(paths, row)}: field {field + 1} is missing (expected {len(names)} fields)")
    return frame


def verify_file_checksum(path: Path) -> None:
    """Compare sha256(path) with ``<path>.CHECKSUM`` ("<hex>  <file name>") when that file exists."""
    checksum = path.with_name(path.name + ".CHECKSUM")
    if not checksum.exists():
        return
    parts = checksum.read_text().split()
    if not parts or not re.fullmatch(r"[0-9a-fA-F]{64}", parts[0]):
        raise DataError(f"{checksum}: not a sha256 checksum line ('<64 hex>  <file name>'), got {checksum.read_text()[:80]!r}")
    if len(parts) > 1 and Path(parts[1].lstrip("*")).name != path.name:
        raise DataError(f"{checksum}: names file {parts[1]!r}, expected {path.name!r}")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != parts[0].lower():
        raise DataError(f"{path}: sha256 {actual} does not match {checksum.name} ({parts[0].lower()}); the file is damaged")


def _csv_bytes(path: Path) -> bytes:
    if path.suffix != ".zip":
        return path.read_bytes()
    try:
        with zipfile.ZipFile(path) as archive:
            members = [n for n in archive.namelist() if n.lower().endswith(".csv")]
            if not members:
                raise DataError(f"{path}: zip holds no .csv member (members: {archive.namelist()})")
            name = next((n for n in members if Path(n).stem == path.stem), members[0])
            return archive.read(name)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise DataError(f"{path}: corrupt zip archive ({exc})") from exc


def _raise_ragged(path: Path, data: bytes, exc: Exception) -> None:
    """Find the line that breaks the column count (polars does not say) and raise DataError for it."""
    lines = data.decode("utf-8", errors="replace").splitlines()
    widths = [(i + 1, line.count(",") + 1) for i, line in enumerate(lines) if line.strip()]
    if widths:
        body = widths[1:] if not lines[0].lstrip("\ufeff")[:1].isdigit() else widths
        expected = body[0][1] if body else widths[0][1]
        for line_no, width in body:
            if width != expected:
                raise DataError(f"{path}: line {line_no}: {width} fields, expected {expected} like the first data line") from exc
    raise DataError(f"{path}: unreadable CSV ({exc})") from exc


def _load(files: Sequence[ArchiveFile], names: Sequence[str], verify: bool) -> tuple[pl.DataFrame, list[Path]]:
    """String columns of all ``files`` in reading order, with ``line`` and ``file`` (index into the path list).

    Files are validated together (one pass per symbol and dataset, not per file: the per-file fixed
    cost of many small frames dominated reading a daily layout).
    """
    paths = [f.path for f in files]
    frames = [_raw_fields(f.path, names, verify, i) for i, f in enumerate(files)]
    schema = {**dict.fromkeys(names, pl.String), "line": pl.Int64, "file": pl.Int32}
    frame = pl.concat(frames) if frames else pl.DataFrame(schema=schema)
    return _drop_blank_and_check_short(frame, names, paths), paths


def _where(paths: Sequence[Path], row: dict) -> str:
    return f"{paths[row['file']]}: line {row['line']}"


def _epoch_us(frame: pl.DataFrame, col: str, paths: Sequence[Path], symbol: str) -> pl.Expr:
    """Parse an epoch column (ms or µs by magnitude) to Datetime(us, UTC); DataError on bad values."""
    raw = pl.col(col).cast(pl.Int64, strict=False)
    bad = frame.filter(raw.is_null() | (raw < _MS_MIN))
    if bad.height:
        row = bad.row(0, named=True)
        raise DataError(f"{_where(paths, row)}: symbol {symbol}: field {col} is not an epoch ms/µs timestamp: {row[col]!r}")
    return pl.when(raw >= _US_MIN).then(raw).otherwise(raw * 1000).cast(_TS)


def _floats(frame: pl.DataFrame, cols: Sequence[str], paths: Sequence[Path], symbol: str) -> pl.DataFrame:
    """Cast string columns to Float64; DataError naming file, line and field for unparsable or non-finite values."""
    out = frame.with_columns(pl.col(c).cast(pl.Float64, strict=False).alias(f"{c}__f") for c in cols)
    bad = out.filter(pl.any_horizontal(~pl.col(f"{c}__f").is_finite().fill_null(False) for c in cols))
    if bad.height:
        row = bad.row(0, named=True)
        c = next(c for c in cols if row[f"{c}__f"] is None or not math.isfinite(row[f"{c}__f"]))
        raise DataError(f"{_where(paths, row)}: symbol {symbol}: field {c} is not a finite number: {row[c]!r}")
    return out.drop(cols).rename({f"{c}__f": c for c in cols})


def _fail_where(frame: pl.DataFrame, condition: pl.Expr, paths: Sequence[Path], symbol: str, what: str,
                cols: Sequence[str]) -> None:
    bad = frame.filter(condition)
    if bad.height:
        row = bad.row(0, named=True)
        values = ", ".join(f"{c}={row[c]!r}" for c in cols)
        raise DataError(f"{_where(paths, row)}: symbol {symbol}: ts {row['ts']}: {what} ({values})")


_OHLC_CHECKS = [
    (pl.col("high") < pl.max_horizontal("open", "close"), "field high is below max(open, close)", ["open", "high", "close"]),
    (pl.col("low") > pl.min_horizontal("open", "close"), "field low is above min(open, close)", ["open", "low", "close"]),
]  # errors for mark and index klines; in trade candles the bad-print rule of perpfolio.quality


def _read_bars(files: Sequence[ArchiveFile], symbol: str, verify: bool, names: Sequence[str]) -> pl.DataFrame:
    """Bars of files in the kline layout: ``names`` is ``_KLINE_COLS`` (candles) or ``_PRICE_COLS``
    (mark and index klines, whose volume fields are not read). Returns ts, symbol, the float fields,
    source, line, file; DataError naming file, line, symbol and field for any invalid value (the
    open/close-within-[low, high] rule is the caller's: ``_OHLC_CHECKS``)."""
    frame, paths = _load(files, names, verify)
    floats = tuple(names[1:])
    ts = _epoch_us(frame, "open_time", paths, symbol)
    frame = _floats(frame, floats, paths, symbol).with_columns(ts=ts)
    checks = [
        (pl.col("ts").dt.epoch("us") % _HOUR_US != 0, "open_time is not on the hour", ["open_time"]),
        *((pl.col(p) <= 0, f"field {p} must be > 0", [p]) for p in ("open", "high", "low", "close")),
        *([(pl.col("volume") < 0, "field volume must be >= 0", ["volume"])] if "volume" in floats else []),
    ]
    _fail_any(frame, checks, paths, symbol)
    return frame.select(
        "ts", pl.lit(symbol).alias("symbol"), *floats, pl.lit(SOURCE).alias("source"), "line", "file"
    )


def _read_funding(files: Sequence[ArchiveFile], symbol: str, verify: bool) -> pl.DataFrame:
    frame, paths = _load(files, _FUNDING_COLS, verify)
    ts = _epoch_us(frame, "calc_time", paths, symbol)
    frame = _floats(frame, ("funding_interval_hours", "last_funding_rate"), paths, symbol).with_columns(ts=ts)
    interval = pl.col("funding_interval_hours")
    _fail_any(frame, [((interval <= 0) | (interval != interval.round()),
                       "field funding_interval_hours must be a positive whole number of hours", ["funding_interval_hours"])],
              paths, symbol)
    epoch = pl.col("ts").dt.epoch("us")
    ceil_hour = (epoch + (_HOUR_US - 1)) // _HOUR_US * _HOUR_US
    return frame.select(
        "ts", (ceil_hour - _HOUR_US).cast(_TS).alias("bar_ts"), pl.lit(symbol).alias("symbol"),
        pl.col("last_funding_rate").alias("rate"), interval.cast(pl.Int64).alias("interval_hours"),
        pl.lit(SOURCE).alias("source"), "line", "file",
    )


def _fail_any(frame: pl.DataFrame, checks: list, paths: Sequence[Path], symbol: str) -> None:
    """One pass over the frame for all checks; on a failure, raise for the first failing check."""
    flags = frame.select(pl.any_horizontal(cond for cond, _, _ in checks).any()).item() if frame.height else False
    if flags:
        for cond, what, cols in checks:
            _fail_where(frame, cond, paths, symbol, what, cols)


# --- combining files --------------------------------------------------------------------------


def _combine(
    frame: pl.DataFrame, symbol: str, dataset: str, start: datetime, end: datetime, *, window_col: str = "ts",
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Window-filter, count out-of-order rows (within a file), drop duplicate ts (keep first), sort.
    The rows keep every column of ``frame`` (``line`` and ``file`` included)."""
    tagged = frame.filter(pl.col(window_col).is_between(start, end, closed="left")).with_row_index("order")
    late = tagged.filter((pl.col("ts") < pl.col("ts").shift().over("file")).fill_null(False))
    dupes = tagged.filter(pl.col("ts").is_duplicated() & ~pl.col("ts").is_first_distinct())
    clean = tagged.unique("ts", keep="first", maintain_order=True).sort("ts").drop("order")
    quality = pl.concat([_per_day(late, symbol, dataset, "out_of_order"), _per_day(dupes, symbol, dataset, "duplicates")])
    return clean, quality


def _per_day(rows: pl.DataFrame, symbol: str, dataset: str, issue: str) -> pl.DataFrame:
    if rows.is_empty():
        return pl.DataFrame(schema=QUALITY_SCHEMA)
    counted = rows.group_by(pl.col("ts").dt.date().alias("day")).agg(
        from_ts=pl.col("ts").min(), to_ts=pl.col("ts").max(), n=pl.len().cast(pl.Int64)
    )
    return quality_rows(counted.select(
        pl.lit(symbol).alias("symbol"), pl.lit(dataset).alias("dataset"), pl.lit(issue).alias("issue"),
        "from_ts", "to_ts",
        pl.when(pl.lit(issue == "duplicates")).then("n").otherwise(0).alias("duplicates_dropped"),
        pl.when(pl.lit(issue == "out_of_order")).then("n").otherwise(0).alias("out_of_order"),
    ))
