"""Shared fixtures: a short, fast deployment in a temporary warehouse."""

from collections import Counter
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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with the most slow (end-to-end) tests first, each file's tests in their own order:
    `make test` hands whole files to its two workers in this order, so the long files start early
    and the short ones fill in around them instead of one long file running alone at the end."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])  # stable: the order within a file is kept
