"""Partition grains: calendar windows cut to the configured days, lookbacks in whole partitions,
range keys, and the schedules that refresh the partition holding the hour or day just closed."""

from datetime import date, datetime, timedelta, timezone

import dagster as dg
import pytest

from perpfolio.errors import ConfigError
from pipelines.definitions import build_definitions
from pipelines.partitions import (
    grid_end_after, grid_start, lookback, partition_keys_for, partition_window, partitions_per_run, time_partitions,
)
from pipelines.run import run_ranges
from pipelines.settings import Settings

UTC = timezone.utc


def midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


@pytest.mark.parametrize("grain", ["daily", "weekly", "monthly"])
@pytest.mark.parametrize("start, end", [(date(2025, 1, 1), date(2025, 7, 29)), (date(2024, 2, 29), date(2024, 3, 3)),
                                        (date(2025, 12, 31), date(2026, 1, 1)), (date(2025, 3, 3), date(2025, 3, 9))])
def test_partitions_tile_the_configured_days_exactly_once(grain, start, end):
    """Every configured day lies in exactly one partition's cut window; no cut window holds a day
    outside start..end; windows are contiguous and begin on a day, a Monday or a 1st."""
    settings = Settings(start=start, end=end, partitions=grain)
    partitions = time_partitions(settings)
    covered = []
    for key in partitions.get_partition_keys():
        window = partitions.time_window_for_partition_key(key)
        assert window.start == midnight(date.fromisoformat(key))
        assert {"daily": True, "weekly": window.start.weekday() == 0, "monthly": window.start.day == 1}[grain]
        cut = partition_window(_Context(window), settings)
        day = cut.start
        while day < cut.end:
            covered.append(day.date())
            day += timedelta(days=1)
    expected = [start + timedelta(days=i) for i in range((end - start).days + 1)]
    assert covered == expected


class _Context:
    def __init__(self, window: dg.TimeWindow):
        self.partition_time_window = window


def test_grid_boundaries_by_hand():
    wednesday = date(2025, 1, 1)
    assert (grid_start(wednesday, "weekly"), grid_end_after(wednesday, "weekly")) == (date(2024, 12, 30), date(2025, 1, 6))
    sunday = date(2025, 1, 5)
    assert grid_end_after(sunday, "weekly") == date(2025, 1, 6)
    assert (grid_start(date(2024, 2, 29), "monthly"), grid_end_after(date(2024, 2, 29), "monthly")) == (date(2024, 2, 1), date(2024, 3, 1))
    assert grid_end_after(date(2025, 12, 31), "monthly") == date(2026, 1, 1)
    assert (grid_start(wednesday, "daily"), grid_end_after(wednesday, "daily")) == (wednesday, date(2025, 1, 2))


@pytest.mark.parametrize("grain, days, before", [("daily", 30, 30), ("weekly", 30, 5), ("weekly", 28, 4), ("weekly", 1, 1),
                                                 ("monthly", 30, 2), ("monthly", 28, 1)])
def test_a_lookback_spans_at_least_its_days(grain, days, before):
    """ceil(days / shortest partition): 30 days need 5 weeks back (a window may start on its Sunday)
    and 2 months back (February has 28 days)."""
    mapping = lookback(days, Settings(partitions=grain))
    assert (mapping.start_offset, mapping.end_offset) == (-before, 0)


def test_range_keys_are_the_partitions_holding_its_first_and_last_day():
    weekly = time_partitions(Settings())
    assert partition_keys_for(weekly, date(2025, 1, 1), date(2025, 7, 29)) == ("2024-12-30", "2025-07-28")
    monthly = time_partitions(Settings(partitions="monthly"))
    assert partition_keys_for(monthly, date(2025, 2, 3), date(2025, 3, 1)) == ("2025-02-01", "2025-03-01")
    assert len(weekly.get_partition_keys()) == 31 and len(monthly.get_partition_keys()) == 7  # 210 days


def test_the_grain_reads_from_env_and_an_unknown_one_is_refused():
    assert Settings.from_env({"PERPFOLIO_PARTITIONS": "Monthly"}).partitions == "monthly"
    with pytest.raises(ConfigError, match="PERPFOLIO_PARTITIONS must be daily, weekly or monthly, got 'hourly'"):
        Settings.from_env({"PERPFOLIO_PARTITIONS": "hourly"})


@pytest.mark.parametrize(("grain", "days", "n", "per_run"), [
    ("weekly", 92, 3, 13), ("daily", 92, 3, 92), ("monthly", 92, 3, 3), ("weekly", 6, 3, 1), ("monthly", 1, 3, 1),
    ("weekly", None, 3, 15873), ("weekly", None, 100, 14), ("daily", None, 100, 100), ("monthly", None, 500, 1),
])
def test_a_run_holds_the_whole_partitions_that_fit_its_days(grain, days, n, per_run):
    """auto (None): 10^6 // n^2 days, 100 for 100 perps, 4 for 500 (still one whole partition)."""
    symbols = ("BTCUSDT", "ETHUSDT", "SOLUSDT") + tuple(f"S{i:03d}USDT" for i in range(3, n))
    settings = Settings(symbols=symbols, partitions=grain, max_days_per_run=days)
    assert partitions_per_run(settings) == per_run
    defs = build_definitions(settings)
    partitioned = [a for a in defs.resolve_asset_graph().assets_defs if a.partitions_def is not None and a.keys]
    assert len(partitioned) >= 7 and {a.backfill_policy.max_partitions_per_run for a in partitioned} == {per_run}


def test_a_range_is_split_into_consecutive_runs_in_order():
    job = build_definitions(Settings(max_days_per_run=92)).resolve_job_def("daily_walk_forward")
    assert run_ranges(build_definitions(Settings()).resolve_job_def("daily_walk_forward"), date(2025, 1, 1),
                      date(2025, 7, 29)) == [("2024-12-30", "2025-07-28")]  # auto, 3 perps: one run
    pieces = run_ranges(job, date(2025, 1, 1), date(2025, 7, 29))  # 30 weeks from Monday 2024-12-30
    assert pieces == [("2024-12-30", "2025-03-24"), ("2025-03-31", "2025-06-23"), ("2025-06-30", "2025-07-28")]
    assert run_ranges(job, date(2025, 3, 5), date(2025, 3, 5)) == [("2025-03-03", "2025-03-03")]


@pytest.mark.parametrize("bad", ["0", "-7", "two"])
def test_max_days_per_run_is_a_positive_whole_number(bad):
    with pytest.raises(ConfigError, match="PERPFOLIO_MAX_DAYS_PER_RUN"):
        Settings.from_env({"PERPFOLIO_MAX_DAYS_PER_RUN": bad})


def tick(settings: Settings, schedule_name: str, at: datetime):
    defs = build_definitions(settings)
    schedule = defs.resolve_schedule_def(schedule_name)
    with dg.build_schedule_context(scheduled_execution_time=at, repository_def=defs.get_repository_def()) as context:
        return schedule.evaluate_tick(context)


@pytest.mark.parametrize("grain, key", [("daily", "2025-03-09"), ("weekly", "2025-03-03"), ("monthly", "2025-03-01")])
def test_the_daily_schedule_refreshes_the_partition_of_the_day_just_closed(grain, key):
    """At 00:15 on Monday 2025-03-10 the day that closed is Sunday 03-09: its partition is requested
    in a live deployment; a fixed window that ended before is skipped, never re-run."""
    at = datetime(2025, 3, 10, 0, 15, tzinfo=UTC)
    live = tick(Settings(start=date(2025, 1, 1), end=None, partitions=grain), "daily_walk_forward_schedule", at)
    assert [r.partition_key for r in live.run_requests] == [key]
    closed = tick(Settings(start=date(2025, 1, 1), end=date(2025, 2, 28), partitions=grain), "daily_walk_forward_schedule", at)
    assert closed.run_requests == [] and "window ends before it" in closed.skip_message


def test_the_hourly_schedule_refreshes_the_partition_in_progress():
    at = datetime(2025, 3, 10, 0, 5, tzinfo=UTC)  # the hour that closed is Sunday 23:00: last week's partition
    result = tick(Settings(start=date(2025, 1, 1), end=None), "hourly_market_data_schedule", at)
    assert [r.partition_key for r in result.run_requests] == ["2025-03-03"]
    result = tick(Settings(start=date(2025, 1, 1), end=None), "hourly_market_data_schedule", at + timedelta(hours=1))
    assert [r.partition_key for r in result.run_requests] == ["2025-03-10"]
