"""The point-in-time universe: which symbols have the data an estimate needs at each asof.

Listings, delistings and outages are normal on a real exchange, not errors. At an asof whose
last bar is row ``e`` of a complete bar grid (one row per bar, NaN where a symbol has none), with
the estimation window ``[e - window + 1, e]``, a symbol is IN the universe when all of these hold;
otherwise it is out and ``reason`` says why (the first rule it breaks, in this order):

1. ``not_listed``: it has no bar at or before the asof;
2. ``no_price_at_asof``: it has no bar at the asof itself (an outage in progress, or delisted);
   a position cannot be traded on the next bar at a price known now;
3. ``insufficient_history``: its first bar (listing, or the start of the loaded history) is
   after the window's first bar: the window is not covered yet;
4. ``too_many_missing``: more than ``max_missing`` bars of the window lack a one-bar return (a
   missing bar, or the return that spans a gap, which is a multi-bar return);
5. ``constant_price``: its one-bar returns in the window are all equal (a stale feed);
6. ``joint_missing``: the members' missing bars together leave fewer than ``window -
   max_missing`` complete bars; the member with the most missing bars is dropped until enough
   complete bars remain.

``in`` marks a member. A symbol that comes back after an outage or a relisting re-enters as soon
as its window satisfies the rules again (at most ``max_missing`` missing bars, a price at the
asof). The estimate of an asof uses the window's COMPLETE bars of its members (every member has
a one-bar return there): ``window - max_missing`` of them at least.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from perpfolio.errors import ConfigError, DataError
from perpfolio.estimators import to_datetime64

IN = "in"
REASONS = (IN, "not_listed", "no_price_at_asof", "insufficient_history", "too_many_missing", "constant_price",
           "joint_missing")
_REASON_DTYPE = "<U20"


@dataclass(frozen=True, repr=False)
class Universe:
    """Membership of N symbols at K asofs.

    member        K x N bool   in the universe
    reason        K x N str    ``in`` or why not (module docstring)
    bars_missing  K x N int    window bars without a one-bar return (``window`` when the window
                               is not covered)
    """

    member: np.ndarray
    reason: np.ndarray
    bars_missing: np.ndarray

    def __repr__(self) -> str:
        k, n = self.member.shape
        return f"Universe(asofs={k}, symbols={n}, members per asof {self.member.sum(axis=1).min(initial=0)}.." \
               f"{self.member.sum(axis=1).max(initial=0)})"


def point_in_time_universe(
    returns: np.ndarray, present: np.ndarray, ends: np.ndarray, *, window: int, max_missing: int
) -> Universe:
    """The universe at each asof (module docstring).

    ``returns``: T x N one-bar returns on a complete bar grid, NaN where a symbol has no one-bar
    return (no bar, or a gap-spanning return); ``present``: T x N, True where the symbol has a bar
    (a price) at that row, gap-spanning or not; ``ends``: K asof rows (-1: no bar at or before the
    asof); ``window``: bars per estimation window; ``max_missing``: bars of it that may lack a
    one-bar return (0 <= max_missing < window - 1).
    """
    r = np.asarray(returns, dtype=float)
    present = np.asarray(present, dtype=bool)
    ends = np.asarray(ends, dtype=np.int64)
    if r.ndim != 2 or present.shape != r.shape:
        raise DataError(f"point_in_time_universe: returns {r.shape} and present {present.shape} must be the same T x N")
    if ends.ndim != 1 or (ends.size and (ends.min() < -1 or ends.max() >= r.shape[0])):
        raise DataError(f"point_in_time_universe: ends must be rows in [-1, {r.shape[0]})")
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 2:
        raise ConfigError(f"window must be an integer >= 2, got {window!r}")
    if isinstance(max_missing, bool) or not isinstance(max_missing, (int, np.integer)) or not 0 <= max_missing < window - 1:
        raise ConfigError(f"max_missing must be an integer in [0, window - 1) = [0, {window - 1}), got {max_missing!r}")
    t, n = r.shape
    valid = np.isfinite(r)
    if (valid & ~present).any():
        row, col = np.argwhere(valid & ~present)[0]
        raise DataError(f"point_in_time_universe: a return at row {row}, column {col} where the symbol has no bar")
    k = ends.size
    safe = np.maximum(ends, 0)
    starts = ends - window + 1
    first_bar = np.where(present.any(axis=0), present.argmax(axis=0), t)
    valid_count = np.vstack([np.zeros((1, n), np.int64), np.cumsum(valid, axis=0)])
    in_window = valid_count[safe + 1] - valid_count[np.clip(starts, 0, t)]
    missing = np.where((starts >= 0)[:, None], window - in_window, window)
    # a symbol is constant in the window when no one-bar return differs from the one before it
    changes = _value_changes(r, valid)
    first_valid = _next_valid_row(valid)
    lo = first_valid[np.clip(starts, 0, t)]  # first valid row at or after the window start (t: none)
    moved = changes[safe] - np.take_along_axis(changes, np.minimum(lo, t - 1), axis=0)
    reason = np.full((k, n), IN, dtype=_REASON_DTYPE)
    rules = (  # applied last-to-first, so the first rule a symbol breaks is the one recorded
        ("constant_price", (moved == 0)),
        ("too_many_missing", missing > max_missing),
        ("insufficient_history", (starts[:, None] < first_bar[None, :]) | (starts < 0)[:, None]),
        ("no_price_at_asof", ~present[safe] | (ends < 0)[:, None]),
        ("not_listed", (first_bar[None, :] > safe[:, None]) | (ends < 0)[:, None]),
    )
    for name, broken in rules:
        reason[broken] = name
    member = reason == IN
    for j in np.flatnonzero(member.any(axis=1)):
        _drop_joint_missing(valid, member[j], reason[j], missing[j], starts[j], ends[j], window - max_missing)
    return Universe(member=reason == IN, reason=reason, bars_missing=missing.astype(np.int64))


def complete_rows(valid: np.ndarray, members: np.ndarray, start: int, end: int) -> np.ndarray:
    """Rows in ``[start, end]`` where every member (N bools) has a one-bar return (``valid``, T x N)."""
    rows = np.arange(max(start, 0), end + 1)
    return rows[valid[rows][:, members].all(axis=1)]


def _drop_joint_missing(valid, member, reason, missing, start, end, min_rows) -> None:
    """Drop members (most missing bars first) until their complete rows number ``min_rows``; in place."""
    while member.any() and complete_rows(valid, member, start, end).size < min_rows:
        worst = np.flatnonzero(member)[np.argmax(missing[member])]
        member[worst] = False
        reason[worst] = "joint_missing"


def _value_changes(r: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """T x N cumulative count of valid values that differ from the previous valid value of the column."""
    t = r.shape[0]
    last = np.where(valid, np.arange(t)[:, None], -1)
    np.maximum.accumulate(last, axis=0, out=last)
    prev = np.vstack([np.full((1, r.shape[1]), -1), last[:-1]])  # last valid row strictly before t
    prev_value = np.where(prev >= 0, np.take_along_axis(r, np.maximum(prev, 0), axis=0), np.nan)
    differs = valid & (prev >= 0) & (r != prev_value)
    return np.cumsum(differs, axis=0)


def _next_valid_row(valid: np.ndarray) -> np.ndarray:
    """(T + 1) x N: the first valid row at or after each row (T where none; row T is a sentinel)."""
    t = valid.shape[0]
    rows = np.where(valid, np.arange(t)[:, None], t)
    out = np.vstack([np.minimum.accumulate(rows[::-1], axis=0)[::-1], np.full((1, valid.shape[1]), t)])
    return out


UNIVERSE_SCHEMA = {
    "as_of": pl.Datetime("us", "UTC"), "symbol": pl.String, "in_universe": pl.Boolean, "reason": pl.String,
    "bars_missing": pl.Int64, "window_bars": pl.Int64,
}


def universe_frame(asofs, symbols: list[str], universe: Universe, *, window: int) -> pl.DataFrame:
    """``features.universe`` rows (``UNIVERSE_SCHEMA``): one per asof and symbol, in symbol order."""
    k, n = universe.member.shape
    stamps = to_datetime64(asofs)
    if stamps.shape != (k,) or len(symbols) != n:
        raise DataError(f"universe_frame: {stamps.size} asofs / {len(symbols)} symbols for a universe of shape {(k, n)}")
    return pl.DataFrame({
        "as_of": pl.Series(np.repeat(stamps, n)).dt.replace_time_zone("UTC"),
        "symbol": pl.Series(np.tile(np.array(symbols, dtype=object), k).tolist(), dtype=pl.String),
        "in_universe": universe.member.ravel(),
        "reason": universe.reason.ravel().tolist(),
        "bars_missing": universe.bars_missing.ravel(),
        "window_bars": np.full(k * n, window, dtype=np.int64),
    }, schema=UNIVERSE_SCHEMA)


def members_at(frame: pl.DataFrame, asofs, symbols: list[str]) -> np.ndarray:
    """K x N membership read back from ``features.universe`` rows, in the order of ``asofs`` and
    ``symbols``; a DataError names the first asof and symbol that has no row."""
    stamps = pl.Series("as_of", to_datetime64(asofs)).dt.replace_time_zone("UTC")
    grid = pl.DataFrame({"as_of": stamps}).join(pl.DataFrame({"symbol": symbols}), how="cross")
    rows = grid.join(frame.select(pl.col("as_of").dt.convert_time_zone("UTC").dt.cast_time_unit("us"), "symbol",
                                  "in_universe"), on=["as_of", "symbol"], how="left")
    lacking = rows.filter(pl.col("in_universe").is_null())
    if lacking.height:
        r = lacking.row(0, named=True)
        raise DataError(f"features.universe has no row for symbol {r['symbol']} at asof {r['as_of']} "
                        f"({lacking.height} rows missing); materialize features/universe for that day")
    return rows["in_universe"].to_numpy().reshape(len(stamps), len(symbols))
