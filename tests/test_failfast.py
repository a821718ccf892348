"""Fail early, fail clear (issue 12): what a setting or project file can get wrong is rejected when
the code location loads, and a blocked schema check names its failing rows."""

import shutil
from datetime import UTC, date, datetime
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from assets import schemas
from assets.checks import check_frame
from perpfolio.errors import ConfigError
from pipelines.definitions import build_definitions
from pipelines.run import RunFailed, materialize_range
from pipelines.settings import PROJECT_ROOT, Settings

from tests.conftest import REAL_DATA

ARCHIVE = REAL_DATA / "binance"


def test_a_strategy_name_that_cannot_be_a_file_name_is_rejected_at_load(tmp_path: Path):
    text = (PROJECT_ROOT / "config" / "strategies.toml").read_text().replace('name = "downside"', 'name = "down/side"', 1)
    bad = tmp_path / "strategies.toml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=r"PERPFOLIO_STRATEGIES_FILE: strategy #\d+: name 'down/side' must be 1-64 letters"):
        Settings(strategies_file=bad)


@pytest.mark.skipif(not ARCHIVE.is_dir(), reason=f"the shared real archive is not at {ARCHIVE}")
def test_a_symbol_with_no_data_in_the_window_is_rejected_at_load(tmp_path: Path):
    root = tmp_path / "archive"
    for dataset in ("klines/BTCUSDT", "klines/ETHUSDT"):
        shutil.copytree(ARCHIVE / "futures/um/monthly" / dataset, root / "futures/um/monthly" / dataset)
    for path in (root / "futures/um/monthly/klines/ETHUSDT/1h").glob("*-2025-0[3-6].zip"):
        path.unlink()  # ETH has January and February only
    common = dict(source="archive", archive_dir=root, symbols=("BTCUSDT", "ETHUSDT"), end=date(2025, 6, 30))
    with pytest.raises(ConfigError, match=r"ETHUSDT have no klines files in .* for 2025-04-01\.\.2025-06-30"):
        Settings(start=date(2025, 4, 1), **common)
    Settings(start=date(2025, 2, 1), **common)  # some of the window is covered: a late delisting, not a typo
    with pytest.raises(ConfigError, match=r"no klines folder for symbol 'SOLUSDT'"):
        Settings(start=date(2025, 2, 1), **(common | {"symbols": ("BTCUSDT", "SOLUSDT")}))


def test_a_blocked_check_names_its_failing_rows():
    hours = [datetime(2025, 1, 1, h, tzinfo=UTC) for h in range(3)]
    frame = schemas.conform(pl.DataFrame({
        "ts": hours, "symbol": ["BTCUSDT", "ETHUSDT", "ETHUSDT"], "open": [1.0, 2.0, 3.0], "high": [1.0, 2.0, 3.0],
        "low": [1.0, 2.0, 3.0], "close": [1.0, -2.0, 3.0], "volume": [1.0, 1.0, 1.0], "source": ["test"] * 3,
    }), schemas.Candles)
    result = check_frame(frame, schemas.Candles, dg.AssetKey(["raw", "candles"]))
    assert not result.passed
    first = result.metadata["first_failures"].value
    assert first.startswith("ts=2025-01-01 01:00, symbol=ETHUSDT, check=greater_than(0), column=close, value=-2.0")
    assert "| 2025-01-01 01:00 | ETHUSDT | greater_than(0) | close | -2.0 |" in result.metadata["failures"].value


def test_a_window_too_short_to_trade_says_so(tmp_path: Path):
    """Regression: three days with a two-day window leave each book one bar after its first rebalance;
    the metrics step crashed with "need at least 2 bars" (and, with no book at all, a missing column)."""
    settings = Settings(start=date(2025, 3, 1), end=date(2025, 3, 3), window_bars=48, warehouse=tmp_path / "w.duckdb",
                        reports_dir=tmp_path / "reports")
    with dg.DagsterInstance.ephemeral() as instance, pytest.raises(RunFailed) as failed:
        materialize_range(build_definitions(settings), settings.start, settings.end, instance)
    assert "asset backtest/equity" in str(failed.value)
    assert "no book has a traded rebalance followed by another bar yet" in str(failed.value)
