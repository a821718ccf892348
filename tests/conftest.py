"""Shared fixtures: a short, fast deployment in a temporary warehouse."""

from datetime import date
from pathlib import Path

import numpy as np
import pytest

from pipelines.settings import Settings

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20251125)


@pytest.fixture
def short_settings(tmp_path: Path) -> Settings:
    """Six days, a two-day estimation window: the first two asofs are warm-up, the rest trade."""
    return Settings(
        start=date(2025, 1, 1), end=date(2025, 1, 6), window_bars=48,
        warehouse=tmp_path / "warehouse.duckdb", reports_dir=tmp_path / "reports",
        stress_leverages=(1.0, 5.0),
    )
