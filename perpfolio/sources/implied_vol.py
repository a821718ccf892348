"""Implied-volatility index files -> the raw.implied_vol frame (ts, underlying, iv, source).

``iv`` is an ANNUALIZED DECIMAL (0.55 = 55 %). Two formats, told apart by their header:

1. Deribit DVOL daily candles (``source = "dvol"``)::

       timestamp,date,currency,open,high,low,close
       1616544000000,2021-03-24,BTC,84.8,95.94,80.52,95.04

   ``timestamp`` (epoch ms) is 00:00 UTC of ``date``: the row is the candle of that whole day, and
   its ``close`` (in PERCENT) is the index value at the END of the day — the data show it: each
   day's ``open`` equals the previous day's ``close`` to within 0.05 vol point on 96 % of the days
   (the rest are index resets). To avoid look-ahead the
   observation is stamped when it becomes known: ``ts = timestamp + 24 h`` (00:00 UTC of the next
   day), ``iv = close / 100``. The open/high/low are not used.

2. Generic CSV (``source = "csv"``)::

       ts,underlying,iv

   ``ts``: ISO-8601 datetime (UTC if no zone) or epoch ms/µs — stamped as given (the time the value
   was known); ``underlying``: e.g. BTC (a ``USDT`` suffix is removed); ``iv``: annualized, as a
   DECIMAL (0.55) or in PERCENT (55) — a whole file is read as percent when its median ``iv`` is
   above 3 (an annualized vol of 300 % is not a plausible index level), and the values divided by 100.

Invalid rows raise :class:`~perpfolio.errors.DataError` naming the file, line, underlying and
field: unparsable values, NaN/inf or ``iv <= 0``, a duplicate (ts, underlying).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import polars as pl

from perpfolio.errors import DataError

_TS = pl.Datetime("us", "UTC")
_DAY_US = 86_400_000_000
_US_MIN = 10**14  # epoch values at or above this are µs, from _MS_MIN up ms, below: not a timestamp
_MS_MIN = 10**11
_PERCENT_MEDIAN = 3.0
DVOL_COLUMNS = ("timestamp", "date", "currency", "open", "high", "low", "close")
CSV_COLUMNS = ("ts", "underlying", "iv")
SCHEMA = {"ts": _TS, "underlying": pl.String, "iv": pl.Float64, "source": pl.String}


def read_implied_vol(paths: Sequence[Path | str] | Path | str, start: datetime | None = None,
                     end: datetime | None = None) -> pl.DataFrame:
    """Read DVOL and/or generic CSVs (module docstring), keep ts in ``[start, end)``, sort by (underlying, ts).

    Two files giving the same (ts, underlying) raise DataError (which one is right is not knowable).
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    frames = [read_iv_file(Path(p)) for p in paths]
    out = pl.concat(frames) if frames else pl.DataFrame(schema=SCHEMA)
    dupes = out.filter(pl.struct("ts", "underlying").is_duplicated())
    if dupes.height:
        r = dupes.row(0, named=True)
        raise DataError(f"implied vol files {[str(p) for p in paths]}: underlying {r['underlying']} ts {r['ts']} "
                        "is given more than once")
    if start is not None:
        out = out.filter(pl.col("ts") >= start)
    if end is not None:
        out = out.filter(pl.col("ts") < end)
    return out.sort("underlying", "ts")


def read_iv_file(path: Path) -> pl.DataFrame:
    """One file, format chosen by its header (DVOL or ts,underlying,iv)."""
    try:
        raw = pl.read_csv(path, infer_schema=False)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DataError(f"{path}: unreadable CSV ({exc})") from exc
    columns = [c.strip().lower() for c in raw.columns]
    raw = raw.rename(dict(zip(raw.columns, columns))).with_row_index("line", offset=2)
    if set(DVOL_COLUMNS) <= set(columns):
        return _dvol(raw, path)
    if set(CSV_COLUMNS) <= set(columns):
        return _generic(raw, path)
    raise DataError(f"{path}: header {columns} is neither DVOL ({', '.join(DVOL_COLUMNS)}) nor {', '.join(CSV_COLUMNS)}")


def _dvol(raw: pl.DataFrame, path: Path) -> pl.DataFrame:
    frame = raw.with_columns(
        t=pl.col("timestamp").cast(pl.Int64, strict=False), iv=pl.col("close").cast(pl.Float64, strict=False) / 100.0,
        underlying=pl.col("currency").str.strip_chars().str.to_uppercase(),
    )
    _fail(frame, pl.col("t").is_null(), path, "timestamp", "not an epoch-ms integer")
    _fail(frame, pl.col("t") % (_DAY_US // 1000) != 0, path, "timestamp", "not 00:00 UTC")
    _check_iv(frame, path, "close")
    return frame.select(
        ((pl.col("t") * 1000 + _DAY_US).cast(_TS)).alias("ts"), "underlying", "iv", pl.lit("dvol").alias("source")
    ).pipe(_unique, path)


def _generic(raw: pl.DataFrame, path: Path) -> pl.DataFrame:
    epoch = pl.col("ts").cast(pl.Int64, strict=False)
    # ISO 8601 per row: "T" or space, optional fraction, "Z" / "+hh:mm" / no zone (= UTC), or a date alone
    text = pl.col("ts").str.strip_chars().str.replace("T", " ").str.replace(r"Z$", "+00:00")
    zoned = [text.str.to_datetime(f, time_unit="us", strict=False).dt.convert_time_zone("UTC")
             for f in ("%Y-%m-%d %H:%M:%S%.f%:z", "%Y-%m-%d %H:%M%:z")]
    naive = [text.str.to_datetime(f, time_unit="us", strict=False).dt.replace_time_zone("UTC")
             for f in ("%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d %H:%M")]
    day = text.str.to_date("%Y-%m-%d", strict=False).cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    parsed = pl.coalesce(pl.when(epoch >= _US_MIN).then(epoch).when(epoch >= _MS_MIN).then(epoch * 1000).cast(_TS), *zoned, *naive, day)
    frame = raw.with_columns(iv_raw=pl.col("iv")).with_columns(
        t=parsed, iv=pl.col("iv").cast(pl.Float64, strict=False),
        underlying=pl.col("underlying").str.strip_chars().str.to_uppercase().str.strip_suffix("USDT"),
    )
    _fail(frame, pl.col("t").is_null(), path, "ts", "not an ISO datetime or epoch ms/µs")
    _fail(frame, pl.col("underlying").is_null() | (pl.col("underlying") == ""), path, "underlying", "empty")
    _check_iv(frame, path, "iv")
    percent = frame.height > 0 and float(frame["iv"].median()) > _PERCENT_MEDIAN
    return frame.select(
        pl.col("t").alias("ts"), "underlying", pl.col("iv") / (100.0 if percent else 1.0), pl.lit("csv").alias("source")
    ).pipe(_unique, path)


def _check_iv(frame: pl.DataFrame, path: Path, field: str) -> None:
    _fail(frame, pl.col("iv").is_null() | ~pl.col("iv").is_finite(), path, field, "not a finite number")
    _fail(frame, pl.col("iv") <= 0, path, field, "must be > 0")


def _unique(frame: pl.DataFrame, path: Path) -> pl.DataFrame:
    dupes = frame.filter(pl.struct("ts", "underlying").is_duplicated())
    if dupes.height:
        r = dupes.row(0, named=True)
        raise DataError(f"{path}: underlying {r['underlying']} ts {r['ts']} appears more than once")
    return frame


def _fail(frame: pl.DataFrame, condition: pl.Expr, path: Path, field: str, what: str) -> None:
    bad = frame.filter(condition)
    if bad.height:
        r = bad.row(0, named=True)
        under = r.get("underlying") or r.get("currency")
        raise DataError(f"{path}: line {r['line']}: underlying {under}: field {field} {what}: {r.get(field + '_raw', r.get(field))!r}")
