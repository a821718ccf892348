"""Settings of a perpfolio deployment, read from environment variables in one place.

Every knob has a safe default that reproduces the article's case study on the built-in
synthetic market (BTC/ETH/SOL USDT perpetuals, hourly bars, 30-day window, daily rebalancing).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from perpfolio.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def normalize_symbol(raw: str) -> str:
    """'btc', 'BTCUSDT' and 'BTC/USDT:USDT' all mean the USDT-margined perpetual 'BTCUSDT'."""
    base = raw.strip().upper().split(":")[0].replace("/", "")
    if not base or not base.isalnum():
        raise ConfigError(f"PERPFOLIO_SYMBOLS: {raw!r} is not a symbol (expected e.g. BTC, BTCUSDT or BTC/USDT:USDT)")
    return base if base.endswith("USDT") else base + "USDT"


@dataclass(frozen=True)
class Settings:
    """One deployment's settings. Dates are UTC days; `end` is the last day materialized (inclusive),
    or None (PERPFOLIO_END=open) for a live deployment whose partitions run through the current day."""

    symbols: tuple[str, ...] = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
    start: date = date(2025, 1, 1)
    end: date | None = date(2025, 7, 29)
    seed: int = 1
    source: Literal["synthetic"] = "synthetic"
    warehouse: Path = PROJECT_ROOT / "warehouse" / "perpfolio.duckdb"
    reports_dir: Path = PROJECT_ROOT / "warehouse" / "reports"
    strategies_file: Path = PROJECT_ROOT / "config" / "strategies.toml"
    bar_hours: int = 1
    return_kind: Literal["simple", "log"] = "simple"
    window_bars: int = 720
    fee_bps: float = 5.0
    slippage_bps: float = 2.0
    stress_leverages: tuple[float, ...] = (1.0, 3.0, 5.0, 10.0)
    margin_buffer: float = 0.05

    def __post_init__(self) -> None:
        if self.end is not None and self.end < self.start:
            raise ConfigError(f"PERPFOLIO_END {self.end} is before PERPFOLIO_START {self.start}")
        if self.bar_hours not in (1, 4, 24):
            raise ConfigError(f"PERPFOLIO_BAR_HOURS must be 1, 4 or 24, got {self.bar_hours}")
        if self.return_kind not in ("simple", "log"):
            raise ConfigError(f"PERPFOLIO_RETURN_KIND must be 'simple' or 'log', got {self.return_kind!r}")
        if self.window_bars < 2:
            raise ConfigError(f"PERPFOLIO_WINDOW_BARS must be at least 2, got {self.window_bars}")
        if len(set(self.symbols)) != len(self.symbols) or not self.symbols:
            raise ConfigError(f"PERPFOLIO_SYMBOLS must list distinct symbols, got {self.symbols}")
        if self.source != "synthetic":
            raise ConfigError(f"PERPFOLIO_SOURCE {self.source!r} is not available; the built-in source is 'synthetic'")

    @property
    def origin(self) -> datetime:
        """First bar of the history (00:00 UTC of `start`)."""
        return datetime(self.start.year, self.start.month, self.start.day, tzinfo=timezone.utc)

    @property
    def lookback_days(self) -> int:
        """Whole days of history an estimation window needs before the day it is computed for."""
        return math.ceil(self.window_bars * self.bar_hours / 24)

    @property
    def partition_start(self) -> str:
        return self.start.isoformat()

    @property
    def partition_end_exclusive(self) -> str | None:
        return None if self.end is None else (self.end + timedelta(days=1)).isoformat()

    def last_day(self, today: date) -> date:
        """The last partition day: `end`, or today (in progress) for an open window."""
        return today if self.end is None else self.end

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read PERPFOLIO_* variables; unset variables keep their defaults."""
        env = os.environ if env is None else env
        parsers = {
            "symbols": lambda v: tuple(normalize_symbol(s) for s in v.split(",") if s.strip()),
            "start": date.fromisoformat,
            "end": lambda v: None if v.lower() == "open" else date.fromisoformat(v),
            "seed": int,
            "source": str,
            "warehouse": Path,
            "reports_dir": Path,
            "strategies_file": Path,
            "bar_hours": int,
            "return_kind": str,
            "window_bars": int,
            "fee_bps": float,
            "slippage_bps": float,
            "stress_leverages": lambda v: tuple(float(x) for x in v.split(",") if x.strip()),
            "margin_buffer": float,
        }
        values = {}
        for f in fields(cls):
            name = f"PERPFOLIO_{f.name.upper()}"
            if env.get(name, "").strip():
                try:
                    values[f.name] = parsers[f.name](env[name].strip())
                except ValueError as exc:
                    raise ConfigError(f"{name}={env[name]!r} cannot be read: {exc}") from exc
        return cls(**values)
