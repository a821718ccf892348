"""Partition grains: calendar windows cut to the configured days, lookbacks in whole partitions,
range keys, and the schedules that refresh the partition holding the hour or day just closed."""

from datetime import date, datetime, timedelta, timezone

import dagster as dg
import pytest

from perpfolio.errors import ConfigError
from pipelines.definitions import build_definitions
from pipelines.partitions import grid_end_after, grid_start, lookback, partition_keys_for, partition_window, time_partitions
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
