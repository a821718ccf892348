"""The point-in-time universe end to end on the synthetic market with PERPFOLIO_SYNTHETIC_EVENTS=on,
so the listing, outage and bad-print rules run offline (without the shared real data): SOLUSDT is
listed on 2025-01-21, ETHUSDT misses 2025-02-15 13:00-17:00, SOLUSDT prints a 10x close on
2025-03-02 14:00 (perpfolio.sources.synthetic, "Data events")."""

from datetime import UTC, date, datetime

import dagster as dg
import duckdb
import polars as pl
import pytest

from assets import raw
from pipelines.definitions import build_definitions
from pipelines.partitions import time_partitions
from pipelines.resources import as_utc
from pipelines.run import materialize_range
from pipelines.settings import Settings


def at(day: str, hour: int = 23) -> datetime:
    return datetime.fromisoformat(day).replace(hour=hour, tzinfo=UTC)


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict[str, pl.DataFrame]:
    tmp = tmp_path_factory.mktemp("events")
    settings = Settings(start=date(2025, 1, 1), end=date(2025, 3, 4), window_bars=48, synthetic_events=True,
                        outliers="quarantine", warehouse=tmp / "w.duckdb", reports_dir=tmp / "reports",
                        stress_leverages=(1.0, 5.0))
    with dg.DagsterInstance.ephemeral() as instance:
        materialize_range(build_definitions(settings), settings.start, settings.end, instance)
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        names = [f"{s}.{t}" for s, t in con.sql("SELECT schema_name, table_name FROM duckdb_tables()").fetchall()]
        return {name: as_utc(con.sql(f"SELECT * FROM {name}").pl()) for name in names}


def reason(tables, symbol: str, day: str) -> str:
    universe = tables["features.universe"]
    return universe.filter((pl.col("symbol") == symbol) & (pl.col("as_of") == at(day)))["reason"].item()


@pytest.mark.slow
class TestSyntheticUniverse:
    def test_a_late_listing_enters_when_its_window_is_covered(self, tables):
        assert reason(tables, "SOLUSDT", "2025-01-15") == "not_listed"
        assert reason(tables, "SOLUSDT", "2025-01-21") == "insufficient_history"
        assert reason(tables, "SOLUSDT", "2025-01-23") == "in"
        sol = tables["portfolio.weights"].filter((pl.col("symbol") == "SOLUSDT") & (pl.col("as_of") < at("2025-01-23")))
        assert (sol["weight"] == 0).all()

    def test_an_outage_takes_the_symbol_out_and_it_re_enters(self, tables):
        # 5 missing bars and the spanning return: 6 of the 48-bar window, more than the 2 allowed
        assert reason(tables, "ETHUSDT", "2025-02-15") == "too_many_missing"
        assert reason(tables, "ETHUSDT", "2025-02-17") == "in"
        gap = tables["raw.data_quality"].filter((pl.col("symbol") == "ETHUSDT") & (pl.col("issue") == "gap"))
        assert gap.select("from_ts", "bars_missing").rows() == [(at("2025-02-15", 13), 5)]
        # the others are not frozen by ETH's hole: solved, and a one-symbol universe is never needed
        day = tables["portfolio.weights"].filter(pl.col("as_of") == at("2025-02-15"))
        assert set(day.filter(pl.col("strategy") == "min_variance")["status"]) == {"optimal"}
        assert day.filter(pl.col("symbol") == "ETHUSDT")["weight"].abs().max() == 0.0

    def test_the_bad_print_is_quarantined(self, tables):
        outliers = tables["raw.data_quality"].filter(pl.col("issue") == "outlier")
        assert outliers.select("symbol", "from_ts").rows() == [("SOLUSDT", at("2025-03-02", 14))]
        assert outliers["detail"].item().endswith("from synthetic")
        assert tables["features.net_returns"]["net_return"].abs().max() < 0.5  # no +900 % / -90 % bar downstream

    def test_the_evaluation_runs_through(self, tables):
        assert tables["backtest.comparison"].height > 0
        assert tables["backtest.equity"]["equity"].is_finite().all()


def test_by_default_the_bad_print_stops_the_raw_step_and_is_stored(tmp_path):
    settings = Settings(start=date(2025, 1, 1), end=date(2025, 3, 4), synthetic_events=True, partitions="daily",
                        warehouse=tmp_path / "w.duckdb", reports_dir=tmp_path / "reports")
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(raw.build(settings, time_partitions(settings)), partition_key="2025-03-02", instance=instance,
                                resources=build_definitions(settings).resources, raise_on_error=False)
    assert not result.success
    (failure,) = [e.event_specific_data.error for e in result.all_events if e.is_step_failure]
    assert "SOLUSDT ts 2025-03-02 14:00 UTC close" in str(failure.to_string())
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        stored = con.sql("SELECT symbol, issue FROM raw.data_quality WHERE issue = 'outlier'").fetchall()
        tables = {t for (t,) in con.sql("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert stored == [("SOLUSDT", "outlier")] and "candles" not in tables  # nothing else of the day was stored
