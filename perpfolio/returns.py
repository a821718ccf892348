"""Per-bar net returns of perpetual futures: price return plus funding, hourly or coarser bars.

Conventions (DESIGN §4). A bar's ``ts`` is its OPEN time (UTC); its return runs from the previous
bar's close to this bar's close. ``price_return`` is always SIMPLE, ``close_t / close_prev - 1``.
A long's ``funding_return`` is minus the sum of the funding rates charged inside the bar (a rate
is a decimal per funding interval; intervals of 8h, 4h and 1h all work, because every event
carries the ``bar_ts`` of the hourly bar it falls in). ``net_return = price_return +
funding_return`` for ``kind="simple"``, ``log1p(price_return + funding_return)`` for ``kind="log"``.
A weight ``w`` on a simple net return is exact for shorts too (a short earns ``-net_return``).
Everything here is per bar; annualizing happens in ``perpfolio.estimators.annualize``.

Gap policy. Missing bars are never zero-filled: the next present bar's return spans the gap
(from the last available close) and is flagged ``filled=True``; the funding charged during the
gap is added to that spanning bar, so its net return is exactly what a position held through the
gap earned.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

import numpy as np
import polars as pl

from perpfolio.errors import ConfigError, DataError

TS_DTYPE = pl.Datetime("us", "UTC")
_OUT_SCHEMA = {
    "ts": TS_DTYPE,
    "symbol": pl.String,
    "price_return": pl.Float64,
    "funding_return": pl.Float64,
    "net_return": pl.Float64,
    "filled": pl.Boolean,
}


def periods_per_year(bar_hours: int) -> float:
    """Bars per year on a 24/7 market: ``8760 / bar_hours``.

    ``bar_hours`` must be a positive integer dividing 24 (1, 2, 3, 4, 6, 8, 12 or 24), so coarse
    bars align to 00:00 UTC. Raises ``ConfigError`` otherwise.
    """
    if isinstance(bar_hours, bool) or not isinstance(bar_hours, int) or bar_hours <= 0 or 24 % bar_hours:
        raise ConfigError(f"bar_hours must be a positive integer dividing 24, got {bar_hours!r}")
    return 8760.0 / bar_hours


def net_returns(
    candles: pl.DataFrame,
    funding: pl.DataFrame,
    *,
    bar_hours: int = 1,
    kind: Literal["simple", "log"] = "simple",
) -> pl.DataFrame:
    """Per-bar price, funding and net returns of a long position, one row per (symbol, bar).

    ``price_return = close_t / close_prev - 1`` (simple); ``funding_return = -sum(rate)`` over the
    funding events charged in ``(close_prev, close_t]``; ``net_return = price_return +
    funding_return`` (``kind="simple"``) or ``log1p(price_return + funding_return)`` (``"log"``).
    Per bar, not annualized.

    Inputs: hourly ``candles`` (ts, symbol, close; ts = open time, on the hour) and raw ``funding``
    events (bar_ts, symbol, rate; ``bar_ts`` = open time of the hourly bar holding the event).
    Unsorted input is fine. Naive timestamps are read as UTC.

    Bars: ``bar_hours`` 1 keeps the hourly bars; 4, 24 (any divisor of 24) builds coarse bars
    aligned to 00:00 UTC whose close is the last hourly close inside them. A coarse bar is emitted
    only when all its hourly bars exist; an incomplete one is dropped like a gap.

    Rows: the first bar of a symbol has no previous close and yields no row. ``filled`` is True
    when the previous close is more than one bar back: the return spans the gap and its funding
    includes the events charged during the gap. A bar without funding events has a genuine
    ``funding_return`` of 0.0. Events before a symbol's first return or after its last bar, or of
    symbols without candles, are ignored.

    Returns ts (Datetime us UTC), symbol, price_return, funding_return, net_return, filled,
    sorted by (symbol, ts). Raises ``DataError`` naming symbol, ts and field on a duplicate
    (symbol, ts), a null, non-finite or non-positive close, a null or non-finite rate, or a ts
    not on the hour.
    """
    periods_per_year(bar_hours)
    if kind not in ("simple", "log"):
        raise ConfigError(f"kind must be 'simple' or 'log', got {kind!r}")
    bar = timedelta(hours=bar_hours)
    bars = _coarse_bars(_clean_candles(candles), bar_hours)
    rows = (
        bars.with_columns(
            prev_close=pl.col("close").shift(1).over("symbol"),
            prev_ts=pl.col("ts").shift(1).over("symbol"),
        )
        .filter(pl.col("prev_close").is_not_null())
        .with_columns(
            price_return=pl.col("close") / pl.col("prev_close") - 1.0,
            filled=(pl.col("ts") - pl.col("prev_ts")) > bar,
        )
    )
    charged = _funding_per_bar(rows, _clean_funding(funding), bar_hours)
    out = rows.join(charged, on=["symbol", "ts"], how="left").with_columns(
        # no funding event in the bar: nothing was charged, a true zero (not a missing value)
        pl.col("funding_return").fill_null(0.0)
    )
    total = pl.col("price_return") + pl.col("funding_return")
    if kind == "log":
        _reject(out.filter(total <= -1.0), "net_returns", "price_return", "price + funding return <= -1, log undefined")
        total = total.log1p()
    return out.with_columns(net_return=total).select(list(_OUT_SCHEMA)).sort("symbol", "ts")


def returns_matrix(
    net_returns: pl.DataFrame, *, column: str = "net_return", bar_hours: int | None = None
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Pivot a long returns frame to a dense ``T x N`` matrix (units of ``column``, per bar).

    Returns ``(ts, symbols, R)``: ``ts`` the sorted unique bar open times (``datetime64[us]``, UTC),
    or with ``bar_hours`` EVERY bar from the first to the last (a complete grid: a bar no symbol
    has, e.g. an exchange-wide outage, is a row of NaN, so a window of W rows is W bars);
    ``symbols`` sorted, ``R[t, i]`` the value of ``column`` (float64) and NaN where symbol ``i``
    has no row at ``ts[t]`` (missing is never zero). Raises ``DataError`` on a duplicate
    (symbol, ts), a null / non-finite value, or (with ``bar_hours``) a ts off the bar grid.
    """
    for name in ("ts", "symbol", column):
        if name not in net_returns.columns:
            raise DataError(f"returns_matrix: column {name!r} missing; columns are {net_returns.columns}")
    frame = net_returns.select(_utc_us(net_returns, "ts"), "symbol", pl.col(column).cast(pl.Float64).alias("value"))
    _reject(frame.filter(pl.len().over("symbol", "ts") > 1), "returns_matrix", "ts", "duplicate (symbol, ts)")
    not_finite = ~pl.col("value").is_finite().fill_null(False)
    _reject(frame.filter(not_finite), "returns_matrix", "value", f"null or non-finite {column}")
    ts_all = frame["ts"].to_numpy()
    sym_all = frame["symbol"].to_numpy().astype(str)
    ts = np.unique(ts_all)
    if bar_hours is not None and ts.size:
        periods_per_year(bar_hours)  # validates bar_hours
        step = np.timedelta64(bar_hours, "h")
        grid = np.arange(ts[0], ts[-1] + step, step)
        off = ts[~np.isin(ts, grid)]
        if off.size:
            raise DataError(f"returns_matrix: ts {off[0]} is not on the {bar_hours}h grid that starts at {ts[0]}")
        ts = grid
    symbols = sorted(set(sym_all.tolist()))
    matrix = np.full((ts.size, len(symbols)), np.nan)
    rows, cols = np.searchsorted(ts, ts_all), np.searchsorted(np.array(symbols, dtype=str), sym_all)
    matrix[rows, cols] = frame["value"].to_numpy()
    return ts, symbols, matrix


def _utc_us(frame: pl.DataFrame, name: str) -> pl.Expr:
    """``name`` as Datetime(us, UTC); naive datetimes are taken to be UTC already."""
    dtype = frame.schema[name]
    if not isinstance(dtype, pl.Datetime):
        raise DataError(f"column {name!r} must be a Datetime, got {dtype}")
    col = pl.col(name)
    col = col.dt.replace_time_zone("UTC") if dtype.time_zone is None else col.dt.convert_time_zone("UTC")
    return col.dt.cast_time_unit("us")


def _reject(bad: pl.DataFrame, frame: str, field: str, problem: str) -> None:
    """Raise a ``DataError`` naming the first offending row when ``bad`` has any rows."""
    if bad.height:
        row = bad.row(0, named=True)
        when = " ".join(f"{k}={row[k]}" for k in ("ts", "bar_ts") if k in row)
        raise DataError(
            f"{frame}: {problem} at symbol={row['symbol']!r} {when} field={field} value={row.get(field)!r} "
            f"({bad.height} bad rows)"
        )


def _require(frame: pl.DataFrame, name: str, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{name}: columns {missing} missing; columns are {frame.columns}")


def _clean_candles(candles: pl.DataFrame) -> pl.DataFrame:
    """Validated hourly closes: symbol, ts (us UTC), close, sorted by (symbol, ts)."""
    _require(candles, "candles", ("ts", "symbol", "close"))
    frame = candles.select("symbol", _utc_us(candles, "ts"), pl.col("close").cast(pl.Float64))
    _reject(frame.filter(pl.col("symbol").is_null() | pl.col("ts").is_null()), "candles", "ts", "null key")
    _reject(frame.filter(pl.col("ts") != pl.col("ts").dt.truncate("1h")), "candles", "ts", "ts not on the hour")
    _reject(frame.filter(pl.len().over("symbol", "ts") > 1), "candles", "ts", "duplicate (symbol, ts)")
    good = (pl.col("close").is_finite() & (pl.col("close") > 0)).fill_null(False)
    _reject(frame.filter(~good), "candles", "close", "close must be finite and > 0")
    return frame.sort("symbol", "ts")


def _clean_funding(funding: pl.DataFrame) -> pl.DataFrame:
    """Validated funding events: symbol, bar_ts (us UTC), rate."""
    _require(funding, "funding", ("bar_ts", "symbol", "rate"))
    frame = funding.select("symbol", _utc_us(funding, "bar_ts"), pl.col("rate").cast(pl.Float64))
    _reject(frame.filter(pl.col("symbol").is_null() | pl.col("bar_ts").is_null()), "funding", "bar_ts", "null key")
    off_hour = pl.col("bar_ts") != pl.col("bar_ts").dt.truncate("1h")
    _reject(frame.filter(off_hour), "funding", "bar_ts", "bar_ts not on the hour")
    _reject(frame.filter(~pl.col("rate").is_finite().fill_null(False)), "funding", "rate", "null or non-finite rate")
    return frame


def _coarse_bars(hourly: pl.DataFrame, bar_hours: int) -> pl.DataFrame:
    """Complete ``bar_hours`` bars (open on the 00:00 UTC grid, close = last hourly close)."""
    if bar_hours == 1:
        return hourly
    return (
        hourly.group_by("symbol", pl.col("ts").dt.truncate(f"{bar_hours}h"))
        .agg(pl.col("close").sort_by("ts").last(), pl.len().alias("hours"))
        .filter(pl.col("hours") == bar_hours)
        .drop("hours")
        .sort("symbol", "ts")
    )


def _funding_per_bar(rows: pl.DataFrame, events: pl.DataFrame, bar_hours: int) -> pl.DataFrame:
    """``-sum(rate)`` per return row, each event assigned to the row whose span holds its bar.

    Row spans ``[prev_ts + bar, ts + bar)`` tile each symbol's history, so an event in coarse bar
    ``b`` belongs to the first row with ``ts >= b`` provided ``prev_ts < b``.
    """
    per_bar = (
        events.group_by("symbol", pl.col("bar_ts").dt.truncate(f"{bar_hours}h").alias("event_bar"))
        .agg(pl.col("rate").sum())
        .sort("symbol", "event_bar")
    )
    spans = rows.select("symbol", "ts", "prev_ts").sort("symbol", "ts")
    return (
        per_bar.join_asof(
            spans, left_on="event_bar", right_on="ts", by="symbol", strategy="forward", check_sortedness=False
        )
        .filter(pl.col("prev_ts") < pl.col("event_bar"))
        .group_by("symbol", "ts")
        .agg(funding_return=-pl.col("rate").sum())
    )
