"""The time window every market source reads: UTC, whole hours, ``start < end``."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

from perpfolio.errors import ConfigError


def check_window(start: datetime, end: datetime) -> None:
    """Raise ConfigError unless ``start`` and ``end`` are tz-aware UTC datetimes on the hour with
    ``start < end`` (the half-open window [start, end) of hourly bars)."""
    for name, value in (("start", start), ("end", end)):
        if not isinstance(value, datetime):
            raise ConfigError(f"{name} must be a datetime, got {value!r}")
        if value.tzinfo is None or value.utcoffset() != timedelta(0):
            raise ConfigError(f"{name} must be a tz-aware UTC datetime, got {value.isoformat()}")
        if (value.minute, value.second, value.microsecond) != (0, 0, 0):
            raise ConfigError(f"{name} must be aligned to the hour, got {value.isoformat()}")
    if end <= start:
        raise ConfigError(f"end must be after start, got start={start.isoformat()} end={end.isoformat()}")


def day_start(d: date) -> datetime:
    """Midnight UTC of the calendar day ``d``."""
    return datetime(d.year, d.month, d.day, tzinfo=timezone.utc)
