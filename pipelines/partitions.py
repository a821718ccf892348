"""Time partitions (daily, weekly or monthly UTC windows) and the mappings that give a stage its lookback.

The grain (PERPFOLIO_PARTITIONS) sets how much history one partition holds. Dagster records two
events per asset and partition (planned, then materialized), about 10-20 ms each in its SQLite
storage, so two years of daily partitions cost minutes of bookkeeping while weekly partitions cost
seconds (BENCHMARKS.md). Whatever the grain, rebalancing stays daily: a partition computes every
daily asof in its window, and the daily schedule refreshes the partition that holds the day just
closed.
"""

from datetime import date, datetime, time, timedelta, timezone
import math

import dagster as dg

from pipelines.settings import Settings

WAREHOUSE_POOL = "duckdb_warehouse"  # one writer at a time: instance config sets every pool's limit to 1
SHORTEST_DAYS = {"daily": 1, "weekly": 7, "monthly": 28}  # the fewest days a partition of each grain holds


PAIR_DAYS_PER_RUN = 1_000_000  # auto: symbols^2 x days of one run (100 perps: 100 days; BENCHMARKS.md)


def max_days_per_run(settings: Settings) -> int:
    """PERPFOLIO_MAX_DAYS_PER_RUN, or with auto ``PAIR_DAYS_PER_RUN // symbols^2``. The estimates of a
    run's days are computed and stored in one step, one covariance and one semicovariance of every
    symbol pair per asof and estimator, so a run's memory grows with symbols^2 x days: auto keeps a
    run of any universe near the same size, and a universe of up to 57 perps gets 300+ days per run."""
    return settings.max_days_per_run or max(1, PAIR_DAYS_PER_RUN // len(settings.symbols) ** 2)


def partitions_per_run(settings: Settings) -> int:
    """Partitions one run materializes at most: the whole partitions that `max_days_per_run` holds (at
    least one). A longer backfill runs in pieces of this size, one after the other (the weights of a
    piece start from the previous piece's stored ones)."""
    return max(1, max_days_per_run(settings) // SHORTEST_DAYS[settings.partitions])


def run_policy(settings: Settings) -> dg.BackfillPolicy:
    """The backfill policy of every partitioned asset: runs of at most `partitions_per_run` partitions,
    so a range within that is one run."""
    return dg.BackfillPolicy.multi_run(max_partitions_per_run=partitions_per_run(settings))


def grid_start(day: date, grain: str) -> date:
    """The partition boundary at or before `day`: the day, its week's Monday, or its month's 1st."""
    if grain == "weekly":
        return day - timedelta(days=day.weekday())
    if grain == "monthly":
        return day.replace(day=1)
    return day


def grid_end_after(day: date, grain: str) -> date:
    """The first partition boundary strictly after `day` (exclusive end of the partition holding it)."""
    if grain == "weekly":
        return grid_start(day, grain) + timedelta(days=7)
    if grain == "monthly":
        return (day.replace(day=28) + timedelta(days=4)).replace(day=1)
    return day + timedelta(days=1)


def time_partitions(settings: Settings) -> dg.TimeWindowPartitionsDefinition:
    """Calendar partitions (UTC) covering PERPFOLIO_START..PERPFOLIO_END: days, weeks from Monday, or
    months from the 1st; a key is the first day of its window (YYYY-MM-DD).

    The first and last partitions may reach beyond the configured days; the assets only ever see the
    part inside them (`partition_window`). With PERPFOLIO_END=open the last partition is the one in
    progress, filled as its hours close.
    """
    grain = settings.partitions
    first = grid_start(settings.start, grain).isoformat()
    end = None if settings.end is None else grid_end_after(settings.end, grain).isoformat()
    kwargs = dict(start_date=first, end_date=end, timezone="UTC", end_offset=1 if settings.end is None else 0)
    if grain == "weekly":
        return dg.WeeklyPartitionsDefinition(day_offset=1, **kwargs)  # Dagster counts weekdays from Sunday = 0
    if grain == "monthly":
        return dg.MonthlyPartitionsDefinition(day_offset=1, **kwargs)
    return dg.DailyPartitionsDefinition(**kwargs)


def partition_window(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext, settings: Settings) -> dg.TimeWindow:
    """The time window of the partition (or range) `context` runs for, cut to the configured days
    [start 00:00, end + 1 day): what every partitioned asset computes over."""
    window = context.partition_time_window
    first = datetime.combine(settings.start, time(), tzinfo=timezone.utc)
    start = max(window.start, first)
    end = window.end
    if settings.end is not None:
        end = min(end, datetime.combine(settings.end + timedelta(days=1), time(), tzinfo=timezone.utc))
    return dg.TimeWindow(start, max(start, end))


def lookback(days: int, settings: Settings) -> dg.TimeWindowPartitionMapping:
    """The partition itself plus enough partitions before it to hold `days` whole days (missing
    partitions before the first are allowed)."""
    before = math.ceil(days / SHORTEST_DAYS[settings.partitions])
    return dg.TimeWindowPartitionMapping(start_offset=-before, allow_nonexistent_upstream_partitions=True)


def rebalance_asofs(window: dg.TimeWindow, bar_hours: int, latest_bar: datetime | None) -> list[datetime]:
    """Daily rebalancing: each day's asof is the open time of its last bar (D 23:00 for hourly bars).

    Only asofs whose bar exists (at or before `latest_bar`) are returned: a day still in progress
    has no rebalance yet.
    """
    days = int((window.end - window.start) / timedelta(days=1))
    last_bar = timedelta(hours=24 - bar_hours)
    asofs = [window.start + timedelta(days=d) + last_bar for d in range(days)]
    return [a for a in asofs if latest_bar is not None and a <= latest_bar]


def partition_keys_for(partitions: dg.TimeWindowPartitionsDefinition, start: date, end: date) -> tuple[str, str]:
    """The keys of the partitions holding the days `start` and `end` (a range run's first and last key)."""
    at = lambda day: datetime.combine(day, time(), tzinfo=timezone.utc).timestamp()  # noqa: E731
    return partitions.get_partition_key_for_timestamp(at(start)), partitions.get_partition_key_for_timestamp(at(end))
