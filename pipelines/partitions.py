"""Daily UTC partitions and the partition mappings that give a stage its lookback."""

from datetime import datetime, timedelta

import dagster as dg

from pipelines.settings import Settings

SINGLE_RUN = dg.BackfillPolicy.single_run()
WAREHOUSE_POOL = "duckdb_warehouse"  # one writer at a time: instance config sets every pool's limit to 1


def daily_partitions(settings: Settings) -> dg.DailyPartitionsDefinition:
    """One partition per UTC day from PERPFOLIO_START to PERPFOLIO_END inclusive.

    With PERPFOLIO_END=open the last partition is the current UTC day, filled as its hours close.
    """
    return dg.DailyPartitionsDefinition(
        start_date=settings.partition_start, end_date=settings.partition_end_exclusive, timezone="UTC",
        end_offset=1 if settings.end is None else 0,
    )


def lookback(days: int) -> dg.TimeWindowPartitionMapping:
    """The partition itself plus `days` days before it (missing days before the start are allowed)."""
    return dg.TimeWindowPartitionMapping(start_offset=-days, allow_nonexistent_upstream_partitions=True)


def rebalance_asofs(window: dg.TimeWindow, bar_hours: int, latest_bar: datetime | None) -> list[datetime]:
    """Daily rebalancing: each day's asof is the open time of its last bar (D 23:00 for hourly bars).

    Only asofs whose bar exists (at or before `latest_bar`) are returned: a day still in progress
    has no rebalance yet.
    """
    days = int((window.end - window.start) / timedelta(days=1))
    last_bar = timedelta(hours=24 - bar_hours)
    asofs = [window.start + timedelta(days=d) + last_bar for d in range(days)]
    return [a for a in asofs if latest_bar is not None and a <= latest_bar]
