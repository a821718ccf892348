"""Plausibility of the raw layer: bad prints in the candles and missing funding events.

Every source's candles and funding go through here in one place
(``pipelines.resources.RawMarket.fetch_with_quality``); each finding is a raw.data_quality row in
:data:`perpfolio.sources.archive.QUALITY_SCHEMA`.

**Bad prints** (issue ``outlier``, dataset ``candles``, ``from_ts = to_ts`` = the bar, ``value`` =
its close, ``detail`` = its neighbours, the scores and where the row came from). Per symbol, bars in
time order (a missing bar is skipped: the neighbours are the previous and next bars present). A bar
is an outlier when

1. **high/low rule**: its close or its open lies outside its own ``[low, high]``; or
2. **reversal rule**: it jumps away from its neighbours, stays there for k = 1 or 2 bars and
   comes back in one bar::

       r_t   = log(close_t / close_{t-1})                       log return of the bar
       m_t   = median(r_u),  u in [t - L, t - 1]                L = 168 previous returns, the bar excluded
       s_t   = max(1.4826 median(|r_u - m_t|), the same over the last 24 returns)
                                                                robust scale (MAD, per bar, log)
       z_t   = (r_t - m_t) / s_t                                robust z-score, unitless
       b_k   = -sign(r_t) r_{t+k}                               the one-bar move back at bar t + k
       d_k   = |log(close_{t+k-1} / close_t)|                   drift while the print lasts (0 for k = 1)
       score = max_k min(|z_t| / 10, b_k / (0.75 |r_t|), min(|r_t|, b_k) / log 1.2, 0.25 |r_t| / d_k)

   flagged when ``score >= 1``: for some k the jump is at least 10 robust sigmas of the symbol's own
   recent returns, the move back undoes at least 75 % of it, the jump and the move back are each at
   least log 1.2 (a 20 % move), and the price stays within 25 % of the jump of the printed level
   until it comes back. For the smallest such k, bars ``t .. t+k-1`` are flagged (both bars of a
   2-bar print). The scale needs at least 24 previous returns; before that (the first day of a
   symbol's history) only the high/low rule applies.

A z-score alone never flags: real crashes are real. Only closes enter the reversal rule, so a deep
intrabar wick (2025-10-10 21:00 UTC: lows 60 % below the open on several perps) is no bad print,
and neither is a close 27 % down that stays down (OP the same hour): its move back is small.

Calibration (``tests/test_quality.py``) on the shared real data (ten Binance USD-M perps, every
hour of 2025-01-01 .. 2025-06-30, the 2025-02-03 and 2025-04-07 sell-offs included): no bar is
flagged; the largest score is 0.38 (ZECUSDT 2025-04-07 05:00: -17.8 % at z -18.7, then +7.3 % two
bars later), against the threshold 1: a safety margin of 2.6x. The real data holds fully reverting
V-moves of 6-7 % (SOLUSDT 2025-01-18 15:00: +6.2 % then -5.8 %): their z-scores (3.6 to 5.9, the
last day's scale having risen with the market) and their size keep them below 1, each on its own.
On the synthetic market (BTC, ETH, SOL; seeds 1-40, two years each) the largest score is 0.68; its
wildest random symbols (annual vol up to 120 %, tripled in its turbulent episodes) reach 0.95
once in 280 symbol-years (a 21 % jump followed by the planted crash).

**Missing funding** (issue ``funding_gap``, dataset ``funding``, one row per symbol and UTC day of
the missing event times: ``from_ts`` / ``to_ts`` the first and last missing event, ``events_missing``
their count). Events sit on a schedule of 8, 4, 2 or 1 h (it changes over time). Observed events are
put on their hour (rounded, so the archive's clock jitter of a few ms does not matter). Binance settles
at multiples of the interval from 00:00 UTC, so between two consecutive events ``a < b`` the events
expected are the multiples of ``I`` hours (from 00:00 UTC) strictly between them, with ::

       I = max(interval_hours(a), spacing_interval(next(b) - b))

the longer of the interval that ended at ``a`` and the one that follows ``b`` (``spacing_interval``:
the largest of 1, 2, 4, 8 that divides a spacing in hours), so a schedule that changes (8 h -> 4 h ->
1 h and back) is never mistaken for missing events. After the last event the ``interval_hours`` of
that event goes on; before the first event the longer of its ``interval_hours`` and the spacing
after it applies; a symbol with no event at all is expected every 8 h. The rule errs towards
silence: the first event on a shorter schedule (the 1 h event right after the last 8 h one) can go
missing unreported, and a symbol without any event on a 4 h or 1 h schedule is counted at 8 h. An expected event at ``T``
counts as missing only while the symbol trades: it has the bar that ends at ``T`` and the bar that
starts there (so a delisted or not yet listed symbol, an outage already reported as a candle gap,
and the live edge where bar ``T`` has not closed expect nothing). An empty or missing funding file
is therefore a gap of every event it should have held.

**Margins.** A bar is judged by its neighbours and an event by the schedule around it, across
partition edges: :func:`detection_window` is what to read for a window (``L + 1`` bars before it in
whole days, one day after), and only the window's rows are reported. A bar with no later bar yet
(the live edge) is judged on what exists: only the high/low rule can flag it.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import numpy as np
import polars as pl
from numpy.lib.stride_tricks import sliding_window_view

from perpfolio.errors import DataError
from perpfolio.sources.archive import QUALITY_SCHEMA, quality_rows

LOOKBACK_BARS = 168  # L: previous returns in the robust scale
SHORT_LOOKBACK_BARS = 24  # the scale is at least that of the last day's returns (a volatility burst)
MIN_HISTORY = 24  # fewest previous returns the scale is computed from
Z_MIN = 10.0  # robust z-score of the jump
REVERT_MIN = 0.75  # share of the jump undone within MAX_REVERT_BARS
MOVE_MIN = math.log(1.2)  # log size of both the jump and the move back (a 20 % move)
MAX_REVERT_BARS = 2
MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution x this = its standard deviation
FUNDING_INTERVALS = (1, 2, 4, 8)  # hours; a symbol without events is expected on the longest
OUTLIER_POLICIES = ("error", "quarantine")
_HOUR_US = 3_600_000_000
_TS = pl.Datetime("us", "UTC")


def detection_window(start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """What to read to judge the bars and funding events of ``[start, end)``: from ``LOOKBACK_BARS
    + 1`` hourly bars before ``start`` (rounded up to whole days) to one day after ``end``."""
    days_before = math.ceil((LOOKBACK_BARS + 1) / 24)
    return start - timedelta(days=days_before), end + timedelta(days=1)


def spacing_interval(hours: int) -> int:
    """The funding interval a spacing of ``hours`` between two events shows: the largest of 1, 2, 4,
    8 that divides it (16 h, an 8 h schedule with a missed event, stays 8); 1 for a spacing below 1 h."""
    return max((i for i in FUNDING_INTERVALS if hours >= i and hours % i == 0), default=1)


# --- bad prints ---------------------------------------------------------------------------------


def outlier_scores(candles: pl.DataFrame) -> pl.DataFrame:
    """The reversal score of every bar (module docstring), for calibration and for :func:`find_outliers`.

    ``candles``: ts, symbol, open, high, low, close (any order). Returns one row per bar, sorted by
    (symbol, ts): ts, symbol, close, log_return (r_t), scale (s_t), z (z_t), revert_bars (the k
    judged: the smallest that flags, else the one with the higher score), reverted (b_k / |r_t|),
    score, outside_range (the high/low rule). A value that cannot be computed is null (no previous
    bar, fewer than ``MIN_HISTORY`` previous returns, no later bar).
    """
    frame = candles.sort("symbol", "ts")
    parts = [_symbol_scores(part) for part in frame.partition_by("symbol", maintain_order=True)]
    scores = pl.DataFrame({k: np.concatenate([p[k] for p in parts]) if parts else np.array([])
                           for k in ("log_return", "scale", "z", "revert_bars", "reverted", "score")})
    outside = (pl.col("close") > pl.col("high")) | (pl.col("close") < pl.col("low")) | (
        pl.col("open") > pl.col("high")) | (pl.col("open") < pl.col("low"))
    return pl.concat([frame.select("ts", "symbol", "close", outside.alias("outside_range")), scores], how="horizontal").select(
        "ts", "symbol", "close", *(pl.col(c).fill_nan(None) for c in ("log_return", "scale", "z")),
        pl.col("revert_bars").cast(pl.Int64), *(pl.col(c).fill_nan(None) for c in ("reverted", "score")), "outside_range",
    )


def _symbol_scores(part: pl.DataFrame) -> dict[str, np.ndarray]:
    log_close = np.log(part["close"].to_numpy())
    n = log_close.size
    r = np.full(n, np.nan)
    r[1:] = np.diff(log_close)
    median, scale = _rolling_robust(r, LOOKBACK_BARS)
    scale = np.fmax(scale, _rolling_robust(r, SHORT_LOOKBACK_BARS)[1])  # NaN (too little history) stays NaN
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (r - median) / scale
        jump = np.abs(r)
        by_k = []
        for k in range(1, MAX_REVERT_BARS + 1):
            back, drift = np.full(n, np.nan), np.full(n, np.nan)
            back[:n - k] = -np.sign(r[:n - k]) * r[k:]  # r[t + k] = log(close_{t+k} / close_{t+k-1})
            drift[:n - k] = np.abs(log_close[k - 1:n - 1] - log_close[:n - k])
            terms = (np.abs(z) / Z_MIN, back / (REVERT_MIN * jump), np.minimum(jump, back) / MOVE_MIN,
                     (1 - REVERT_MIN) * jump / drift)
            by_k.append((back / jump, np.minimum.reduce(terms)))
    fractions = np.stack([f for f, _ in by_k])
    scores = np.stack([sc for _, sc in by_k])
    flags = scores >= 1.0
    best = np.where(flags.any(axis=0), flags.argmax(axis=0), np.nanargmax(np.where(np.isnan(scores), -np.inf, scores), axis=0))
    pick = lambda a: a[best, np.arange(n)]  # noqa: E731
    return {"log_return": r, "scale": scale, "z": z, "revert_bars": best + 1.0, "reverted": pick(fractions),
            "score": np.fmax.reduce(scores, axis=0)}


def _rolling_robust(r: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Median and MAD_TO_SIGMA x MAD of the ``window`` values before each element of ``r`` (fewer
    at the start; NaN with fewer than ``MIN_HISTORY`` of them). ``r[0]`` is NaN, the rest finite."""
    n = r.size
    median, mad = np.full(n, np.nan), np.full(n, np.nan)
    full = np.arange(n) > window  # r[t - window .. t - 1] is all finite
    if full.any():
        w = sliding_window_view(r[1:n - 1], window)
        median[full] = np.median(w, axis=1)
        mad[full] = np.median(np.abs(w - median[full][:, None]), axis=1)
    for t in range(MIN_HISTORY + 1, min(n, window + 1)):
        w = r[1:t]
        median[t] = np.median(w)
        mad[t] = np.median(np.abs(w - median[t]))
    return median, MAD_TO_SIGMA * mad


def find_outliers(candles: pl.DataFrame, *, candle_origin: pl.DataFrame) -> pl.DataFrame:
    """Quality rows (issue "outlier") of the bad prints in ``candles`` (module docstring).

    ``candle_origin``: ts, symbol, origin (``ORIGIN_SCHEMA``: the file and line, or the endpoint, of
    each candle); a candle without a row there is named by its ``source``. ``value`` is the flagged
    close; ``detail`` gives the previous and next closes, the score terms and the origin.
    """
    if candles.is_empty():
        return pl.DataFrame(schema=QUALITY_SCHEMA)
    scored = outlier_scores(candles).join(
        candles.select("ts", "symbol", "open", "high", "low", "source"), on=["ts", "symbol"], how="left",
        maintain_order="left",
    ).join(candle_origin.select("ts", "symbol", "origin"), on=["ts", "symbol"], how="left", maintain_order="left").with_columns(
        origin=pl.coalesce("origin", "source"))
    rows = []
    for part in scored.partition_by("symbol", maintain_order=True):
        hits = part.with_row_index("t").filter(pl.col("outside_range") | (pl.col("score") >= 1.0))
        if hits.is_empty():
            continue
        bars = part.to_dicts()
        details: dict[int, list[str]] = {}
        for t in hits["t"].to_list():
            bar = bars[t]
            for field in ("close", "open"):
                if not bar["low"] <= bar[field] <= bar["high"]:
                    details.setdefault(t, []).append(f"{field} {bar[field]!r} outside [low {bar['low']!r}, high {bar['high']!r}]")
            if bar["score"] is not None and bar["score"] >= 1.0:
                k = bar["revert_bars"]
                for j in range(k):
                    details.setdefault(t + j, []).append(_reversal_text(bars, t, k, j))
        for t, reasons in sorted(details.items()):
            bar = bars[t]
            rows.append({"symbol": bar["symbol"], "from_ts": bar["ts"], "value": bar["close"],
                         "detail": "; ".join(reasons) + f"; {_neighbours(bars, t)}; from {bar['origin']}"})
    if not rows:
        return pl.DataFrame(schema=QUALITY_SCHEMA)
    found = pl.DataFrame(rows, schema={"symbol": pl.String, "from_ts": _TS, "value": pl.Float64, "detail": pl.String})
    return quality_rows(found.with_columns(dataset=pl.lit("candles"), issue=pl.lit("outlier"), to_ts=pl.col("from_ts")))


def _reversal_text(bars: list[dict], t: int, k: int, j: int) -> str:
    bar = bars[t]
    which = f"bar {j + 1} of a {k}-bar print that starts at {bar['ts']:%Y-%m-%d %H:%M}" if k > 1 else "1-bar print"
    return (f"reverting jump ({which}): log return {bar['log_return']:+.4f} = robust z {bar['z']:+.1f} "
            f"(robust scale {bar['scale']:.4f} per bar), {bar['reverted']:.0%} of it back in bar {k} after it, "
            f"score {bar['score']:.2f} >= 1")


def _neighbours(bars: list[dict], t: int) -> str:
    prev = f"{bars[t - 1]['close']!r} at {bars[t - 1]['ts']:%Y-%m-%d %H:%M}" if t > 0 else "none"
    nxt = f"{bars[t + 1]['close']!r} at {bars[t + 1]['ts']:%Y-%m-%d %H:%M}" if t + 1 < len(bars) else "none yet"
    return f"previous close {prev}, next close {nxt}"


def drop_outliers(candles: pl.DataFrame, quality: pl.DataFrame) -> pl.DataFrame:
    """``candles`` without the bars that ``quality`` flags as outliers (quarantine)."""
    flagged = quality.filter(pl.col("issue") == "outlier").select("symbol", pl.col("from_ts").alias("ts"))
    return candles.join(flagged, on=["symbol", "ts"], how="anti", maintain_order="left")


def outlier_error(quality: pl.DataFrame, *, shown: int = 5) -> DataError | None:
    """The DataError that stops a run on bad prints (PERPFOLIO_OUTLIERS=error), or None without any.
    It names the symbol, ts, value, file and line (or endpoint) of the first ``shown`` outlier rows."""
    rows = quality.filter(pl.col("issue") == "outlier").sort("from_ts", "symbol")
    if rows.is_empty():
        return None
    listed = "\n".join(f"  {r['symbol']} ts {r['from_ts']:%Y-%m-%d %H:%M} UTC close {r['value']!r}: {r['detail']}"
                       for r in rows.head(shown).iter_rows(named=True))
    more = f"\n  ... and {rows.height - shown} more" if rows.height > shown else ""
    return DataError(
        f"raw.candles: {rows.height} bad print(s) (perpfolio.quality):\n{listed}{more}\n"
        "They are stored in raw.data_quality (issue = 'outlier'); nothing else of this window was stored. Fix the "
        "source, or set PERPFOLIO_OUTLIERS=quarantine to drop the flagged bars from raw.candles (the next bar's "
        "return then spans them) and go on."
    )


# --- missing funding ----------------------------------------------------------------------------


def find_funding_gaps(funding: pl.DataFrame, candles: pl.DataFrame, *, start: datetime, end: datetime) -> pl.DataFrame:
    """Quality rows (issue "funding_gap") of the funding events expected at times in ``[start, end)``
    that are absent while the symbol trades (module docstring).

    ``funding``: ts, symbol, interval_hours; ``candles``: ts, symbol — both over a margin around the
    window (:func:`detection_window`), so the schedule before the first event of the window is known.
    """
    lo, hi = int(start.timestamp()) // 3600, int(end.timestamp()) // 3600
    hours = candles.select("symbol", (pl.col("ts").dt.epoch("us") // _HOUR_US).alias("h"))
    slots = funding.select("symbol", ((pl.col("ts").dt.epoch("us") + _HOUR_US // 2) // _HOUR_US).alias("h"),
                           "interval_hours").unique(["symbol", "h"], keep="first").sort("symbol", "h")
    by_symbol = {s: (part["h"].to_numpy(), part["interval_hours"].to_numpy()) for (s,), part in slots.group_by("symbol")}
    rows = []
    for (symbol,), part in hours.group_by("symbol"):
        trading = np.unique(part["h"].to_numpy())
        events, declared = by_symbol.get(symbol, (np.array([], dtype=np.int64), np.array([], dtype=np.int64)))
        for t, interval, after, before in _expected_missing(events, declared, int(trading[0]), int(trading[-1])):
            if lo <= t < hi and np.isin([t - 1, t], trading).all():
                rows.append((symbol, t, interval, after, before))
    if not rows:
        return pl.DataFrame(schema=QUALITY_SCHEMA)
    to_ts = lambda c: (pl.col(c) * _HOUR_US).cast(_TS)  # noqa: E731
    missing = pl.DataFrame(rows, schema=["symbol", "h", "interval", "after", "before"], orient="row").with_columns(
        ts=to_ts("h"), after_ts=to_ts("after"), before_ts=to_ts("before"))
    per_day = missing.sort("symbol", "ts").group_by("symbol", pl.col("ts").dt.date().alias("day"), maintain_order=True).agg(
        from_ts=pl.col("ts").min(), to_ts=pl.col("ts").max(), events_missing=pl.len().cast(pl.Int64),
        interval=pl.col("interval").first(), after=pl.col("after_ts").first(), before=pl.col("before_ts").first(),
    )
    return quality_rows(per_day.select(
        "symbol", pl.lit("funding").alias("dataset"), pl.lit("funding_gap").alias("issue"), "from_ts", "to_ts",
        "events_missing",
        pl.format("expected every {} h; last event before: {}, next event read: {}", "interval",
                  pl.col("after").dt.strftime("%Y-%m-%d %H:%M").fill_null("none"),
                  pl.col("before").dt.strftime("%Y-%m-%d %H:%M").fill_null("none")).alias("detail"),
    )).sort("symbol", "from_ts")


def _expected_missing(events: np.ndarray, declared: np.ndarray, first: int, last: int):
    """(hour, interval, event before or None, event after or None) of every expected event hour in
    ``[first, last]`` (epoch hours) that ``events`` (sorted unique epoch hours, with their
    ``interval_hours``) lacks. Expected hours are multiples of the interval (from 00:00 UTC)."""
    def grid(lo: int, hi: int, interval: int) -> range:  # multiples of interval in (lo, hi)
        return range((lo // interval + 1) * interval, hi, interval)

    if events.size == 0:
        longest = FUNDING_INTERVALS[-1]
        yield from ((t, longest, None, None) for t in grid(first - 1, last + 1, longest))
        return
    n = events.size
    following = [spacing_interval(int(events[i + 1] - events[i])) if i + 1 < n else int(declared[i]) for i in range(n)]
    head = max(int(declared[0]), following[0])
    yield from ((t, head, None, int(events[0])) for t in grid(first - 1, int(events[0]), head))
    for i in range(n - 1):
        a, b = int(events[i]), int(events[i + 1])
        interval = max(int(declared[i]), following[i + 1])
        yield from ((t, interval, a, b) for t in grid(a, b, interval))
    tail = int(declared[-1])
    yield from ((t, tail, int(events[-1]), None) for t in grid(int(events[-1]), last + 1, tail))
