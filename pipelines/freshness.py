"""Freshness of the raw data: a non-blocking check that the latest candle of every symbol is recent.

For the partition (or range) being materialized, the reference time is the end of its window, or
the current hour for a window still in progress (PERPFOLIO_END=open). The last bar that should
exist opens one hour before the reference; a symbol is stale when its latest stored bar in the
window is more than `max_lag_hours` older than that (or it has no bar at all). Stale data warns
(severity WARN) and names the symbols and their lag; it does not stop the run, because a late
exchange file is a reason to look, not a reason to stop computing the days that are complete.
"""

from datetime import datetime, timedelta, timezone

import dagster as dg
import polars as pl

from assets.raw import CANDLES
from pipelines.partitions import partition_window
from pipelines.settings import Settings

BAR = timedelta(hours=1)  # raw candles are hourly whatever PERPFOLIO_BAR_HOURS resamples them to


def staleness_hours(candles: pl.DataFrame, symbols: list[str], start: datetime, end: datetime,
                    now: datetime) -> dict[str, float | None]:
    """Hours by which each symbol's latest bar in [start, end) trails the last bar that should exist.

    The last expected bar opens at ``min(end, now floored to the hour) - 1h``. None means no bar is
    expected yet (the window has not had a closed hour); ``inf`` means the symbol has no bar at all.
    """
    reference = min(end, now.replace(minute=0, second=0, microsecond=0))
    expected = reference - BAR
    if expected < start:
        return {s: None for s in symbols}
    latest = dict(
        candles.filter(pl.col("ts").is_between(start, end, closed="left")).group_by("symbol").agg(pl.col("ts").max()).iter_rows()
    ) if not candles.is_empty() else {}
    return {s: (max(0.0, (expected - latest[s]) / BAR) if s in latest else float("inf")) for s in symbols}


def build(settings: Settings, partitions: dg.PartitionsDefinition) -> list[dg.AssetChecksDefinition]:
    symbols, max_lag_hours = list(settings.symbols), settings.max_staleness_hours

    @dg.asset_check(
        asset=CANDLES, name="fresh", blocking=False, partitions_def=partitions,
        description=f"every symbol's latest bar is at most {max_lag_hours:g} h older than the last closed hour "
        "of the window (non-blocking: warns)",
    )
    def candles_fresh(context: dg.AssetCheckExecutionContext, candles: pl.DataFrame) -> dg.AssetCheckResult:
        window = partition_window(context, settings)
        lag = staleness_hours(candles, symbols, window.start, window.end, datetime.now(timezone.utc))
        stale = {s: h for s, h in lag.items() if h is not None and h > max_lag_hours}
        return dg.AssetCheckResult(
            passed=not stale, severity=dg.AssetCheckSeverity.WARN,
            description=("stale: " + ", ".join(f"{s} {h:g} h behind" for s, h in sorted(stale.items()))) if stale else None,
            metadata={"window": f"{window.start} .. {window.end}", "max_lag_hours": max_lag_hours,
                      **{f"lag_{s}": "no bar expected yet" if h is None else "no bars" if h == float("inf") else f"{h:g} h"
                         for s, h in lag.items()}},
        )

    return [candles_fresh]
