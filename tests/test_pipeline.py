"""The whole asset chain, materialized into a temporary DuckDB warehouse on a short window."""

import shutil
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import polars as pl
import pytest

from assets import schemas
from assets.checks import check_frame
from assets.evaluation import EQUITY
from assets.portfolio import asof_inputs
from perpfolio.optimize import load_strategies
from pipelines.definitions import build_definitions
from pipelines.partitions import partition_keys_for
from pipelines.resources import RawMarket, as_utc
from pipelines.run import RunFailed, materialize_range
from pipelines.settings import Settings

TABLES = {
    "raw.candles": ["ts", "symbol"],
    "raw.funding": ["ts", "symbol"],
    "raw.implied_vol": ["ts", "underlying"],
    "features.net_returns": ["ts", "symbol"],
    "features.universe": ["as_of", "symbol"],
    "features.estimates": ["as_of", "estimator"],
    "signals.signals": ["as_of", "symbol"],
    "portfolio.weights": ["as_of", "strategy", "symbol"],
    "portfolio.frontier": ["as_of", "point", "symbol"],
    "backtest.equity": ["ts", "strategy"],
    "backtest.metrics": ["strategy"],
    "backtest.monthly": ["strategy", "month"],
    "backtest.comparison": ["strategy"],
    "risk.stress": ["as_of", "strategy", "scenario", "leverage", "margin_mode"],
    "risk.liquidation": ["as_of", "strategy", "leverage", "margin_mode", "symbol"],
    "raw.data_quality": ["symbol", "dataset", "issue", "from_ts"],
    "raw.reference_prices": ["ts", "symbol", "kind"],
    "risk.spot_hedge": ["as_of", "symbol", "hedge", "perp"],
}
MAY_BE_EMPTY = {"raw.data_quality"}  # no row = the raw data was read clean (the synthetic market has no gaps)
VOLATILE_COLUMNS = {"solve_ms"}  # wall-clock timings differ between two runs of the same data


def materialize(settings: Settings, market: RawMarket | None = None) -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        materialize_range(build_definitions(settings, market=market), settings.start, settings.end, instance)


def backtest_equity(settings: Settings) -> None:
    """Only backtest.equity of the evaluation job, over what the warehouse holds: the tests of a
    backtest setting read that table alone (the rest of the evaluation is tested elsewhere)."""
    with dg.DagsterInstance.ephemeral() as instance:
        job = build_definitions(settings).resolve_job_def("evaluation")
        assert job.execute_in_process(instance=instance, asset_selection=[EQUITY]).success


def walk_forward(settings: Settings, market: RawMarket | None = None) -> None:
    """Only the daily_walk_forward job over the whole window (no evaluation)."""
    job = build_definitions(settings, market=market).resolve_job_def("daily_walk_forward")
    first, last = partition_keys_for(job.partitions_def, settings.start, settings.end)
    tags = {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last}
    with dg.DagsterInstance.ephemeral() as instance:
        assert job.execute_in_process(instance=instance, tags=tags).success


def read_tables(warehouse: Path) -> dict[str, pl.DataFrame]:
    with duckdb.connect(str(warehouse), read_only=True) as con:
        present = {f"{s}.{t}" for s, t in con.sql("SELECT schema_name, table_name FROM duckdb_tables()").fetchall()}
        return {name: as_utc(con.sql(f"SELECT * FROM {name}").pl()) for name in TABLES if name in present}


def canonical(frame: pl.DataFrame) -> pl.DataFrame:
    frame = frame.drop([c for c in frame.columns if c in VOLATILE_COLUMNS])
    return frame.sort(frame.columns, nulls_last=True)


def market_for(settings: Settings) -> dict:
    return dict(source=settings.source, symbols=list(settings.symbols), origin=settings.origin.isoformat(), seed=settings.seed)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> tuple[Settings, dict[str, pl.DataFrame]]:
    tmp = tmp_path_factory.mktemp("pipeline")
    settings = Settings(
        start=datetime(2025, 1, 1).date(), end=datetime(2025, 1, 6).date(), window_bars=48,
        warehouse=tmp / "warehouse.duckdb", reports_dir=tmp / "reports", stress_leverages=(1.0, 5.0),
    )
    materialize(settings)
    return settings, read_tables(settings.warehouse)


@pytest.mark.slow
class TestWholeChain:
    def test_every_table_exists_with_rows(self, pipeline):
        _, tables = pipeline
        assert set(tables) == set(TABLES)
        assert {name for name, frame in tables.items() if frame.is_empty()} <= MAY_BE_EMPTY

    def test_every_table_satisfies_its_schema(self, pipeline):
        _, tables = pipeline
        models = dict(zip(TABLES, [schemas.Candles, schemas.Funding, schemas.ImpliedVol, schemas.NetReturns, schemas.Universe,
                                   schemas.Estimates, schemas.Signals, schemas.Weights, schemas.Frontier, schemas.Equity,
                                   schemas.Metrics, schemas.Monthly, schemas.Comparison, schemas.Stress,
                                   schemas.Liquidation, schemas.DataQuality, schemas.ReferencePrices,
                                   schemas.SpotHedge]))
        for name, frame in tables.items():
            assert check_frame(schemas.conform(frame, models[name]), models[name], dg.AssetKey(name.split("."))).passed, name

    def test_no_duplicate_keys(self, pipeline):
        _, tables = pipeline
        for name, key in TABLES.items():
            frame = tables[name]
            assert frame.select(key).is_duplicated().sum() == 0, name

    def test_one_hourly_bar_per_symbol_and_day(self, pipeline):
        settings, tables = pipeline
        days = (settings.end - settings.start).days + 1
        counts = tables["raw.candles"].group_by("symbol").len()
        assert dict(counts.iter_rows()) == {s: 24 * days for s in settings.symbols}

    def test_weights_sum_to_one_and_respect_bounds(self, pipeline):
        _, tables = pipeline
        weights = tables["portfolio.weights"]
        sums = weights.group_by("as_of", "strategy").agg(pl.col("weight").sum(), pl.col("status").first())
        invested = sums.filter(~pl.col("status").str.starts_with("fallback:flat:"))
        assert invested.height and (invested["weight"] - 1.0).abs().max() <= 1e-6
        # the warm-up has no symbol in the universe yet: flat, and says why
        assert set(sums.filter(pl.col("status").str.starts_with("fallback:flat:"))["status"]) == {
            "fallback:flat:insufficient_history"}
        assert sums.filter(pl.col("status").str.starts_with("fallback:flat:"))["weight"].abs().max() == 0.0
        assert weights["weight"].min() >= -1e-6
        assert weights["weight"].max() <= 0.5 + 1e-6

    def test_warmup_is_a_recorded_fallback_and_later_asofs_are_solved(self, pipeline):
        _, tables = pipeline
        decisions = tables["portfolio.weights"].unique(["as_of", "strategy"]).sort("as_of")
        asofs = decisions["as_of"].unique().sort().to_list()
        assert len(asofs) == 6
        warmup = decisions.filter(pl.col("as_of") < asofs[2])
        assert warmup["status"].str.contains("insufficient_history").all()
        solved = decisions.filter(pl.col("as_of") >= asofs[2])
        assert (solved.filter(pl.col("strategy") == "min_variance")["status"] == "optimal").all()
        # a target return or a positive Sharpe can be out of reach on a two-day window: that is a recorded fallback
        reasons = set(solved.filter(pl.col("status") != "optimal")["status"])
        assert reasons <= {"fallback:min_variance:infeasible"}

    def test_metrics_for_every_configured_strategy(self, pipeline):
        settings, tables = pipeline
        names = {s.name for s in load_strategies(settings.strategies_file)}
        baselines = {f"baseline:{b}" for b in settings.baselines}  # beside the strategies, same schedule
        assert set(tables["backtest.metrics"]["strategy"]) == names | baselines
        assert set(tables["backtest.equity"]["strategy"]) == names | baselines

    def test_backtest_starts_after_warmup(self, pipeline):
        _, tables = pipeline
        first_trade_asof = datetime(2025, 1, 3, 23, tzinfo=timezone.utc)
        assert tables["backtest.equity"]["ts"].min() == first_trade_asof

    def test_report_written(self, pipeline):
        settings, _ = pipeline
        html = settings.reports_dir / "report.html"
        assert html.exists() and html.stat().st_size > 10_000


@pytest.mark.slow
class TestIdempotence:
    def test_rematerializing_replaces_partitions(self, pipeline, tmp_path):
        settings, tables = pipeline
        first = {n: canonical(f) for n, f in tables.items()}
        again = replace(settings, warehouse=tmp_path / "again.duckdb", reports_dir=tmp_path / "reports")
        shutil.copy(settings.warehouse, again.warehouse)  # the stored tables, then everything materialized over them
        materialize(again)
        second = {n: canonical(f) for n, f in read_tables(again.warehouse).items()}
        assert first.keys() == second.keys() == TABLES.keys()
        for name in TABLES:
            assert first[name].height == second[name].height, name
            assert first[name].equals(second[name]), name


class _CorruptCandles(RawMarket):
    """The synthetic market with one bad candle row: the raw schema check must stop everything downstream."""

    corruption: str  # "nan_close" | "duplicate_bar"

    def fetch(self, start, end):
        data = super().fetch(start, end)
        candles = data.candles
        if self.corruption == "nan_close":
            candles = candles.with_row_index().with_columns(
                close=pl.when(pl.col("index") == 5).then(float("nan")).otherwise(pl.col("close"))
            ).drop("index")
        else:
            candles = pl.concat([candles, candles.slice(5, 1)])
        return replace(data, candles=candles)


class _ShiftedFuture(RawMarket):
    """The synthetic market with every price after `cutoff` scaled and funding flipped."""

    cutoff: str

    def fetch(self, start, end):
        data = super().fetch(start, end)
        candles, funding, iv, reference = data.candles, data.funding, data.implied_vol, data.reference_prices
        cut = datetime.fromisoformat(self.cutoff)
        later = pl.col("ts") >= cut
        candles = candles.with_columns(
            [pl.when(later).then(pl.col(c) * 1.3).otherwise(pl.col(c)) for c in ("open", "high", "low", "close")]
        )
        funding = funding.with_columns(rate=pl.when(pl.col("bar_ts") >= cut).then(-pl.col("rate")).otherwise(pl.col("rate")))
        iv = iv.with_columns(iv=pl.when(later).then(pl.col("iv") * 2).otherwise(pl.col("iv")))
        reference = reference.with_columns(
            [pl.when(later).then(pl.col(c) * 1.3).otherwise(pl.col(c)) for c in ("open", "high", "low", "close")]
        )
        return replace(data, candles=candles, funding=funding, implied_vol=iv, reference_prices=reference)


class TestGuards:
    @pytest.mark.parametrize("corruption", ["nan_close", "duplicate_bar"])
    def test_bad_candle_fails_the_check_and_blocks_downstream(self, short_settings, corruption):
        with pytest.raises(RunFailed, match="daily_walk_forward"):
            materialize(short_settings, _CorruptCandles(**market_for(short_settings), corruption=corruption))
        tables = read_tables(short_settings.warehouse) if short_settings.warehouse.exists() else {}
        assert "raw.candles" not in tables  # the failing frame was not stored
        assert "features.net_returns" not in tables and "portfolio.weights" not in tables

    def test_duplicate_bar_fails_the_candles_check(self):
        ts = datetime(2025, 1, 1, tzinfo=timezone.utc)
        row = {"ts": ts, "symbol": "BTCUSDT", "open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0, "volume": 1.0, "source": "t"}
        frame = schemas.conform(pl.DataFrame([row, row]), schemas.Candles)
        result = check_frame(frame, schemas.Candles, dg.AssetKey(["raw", "candles"]))
        assert not result.passed and "duplicate" in result.metadata["failures"].value

    def test_weights_not_summing_to_their_budget_fail_the_check(self):
        asof = datetime(2025, 1, 5, 23, tzinfo=timezone.utc)

        def weights(w, budget):
            return schemas.conform(pl.DataFrame({
                "as_of": [asof] * 2, "strategy": ["s"] * 2, "symbol": ["BTCUSDT", "ETHUSDT"], "weight": w,
                "budget": [budget] * 2, "status": ["optimal"] * 2, "solver": ["CLARABEL"] * 2, "objective": [0.1] * 2,
                "solve_ms": [1.0] * 2, "universe": ["in"] * 2,
            }), schemas.Weights)

        key = dg.AssetKey(["portfolio", "weights"])
        result = check_frame(weights([0.5, 0.49], 1.0), schemas.Weights, key)
        assert not result.passed and "sum to its budget" in result.metadata["failures"].value
        assert check_frame(weights([0.5, -0.5], 0.0), schemas.Weights, key).passed  # market neutral
        assert not check_frame(weights([0.5, 0.5], 0.0), schemas.Weights, key).passed

    @pytest.mark.slow
    def test_weights_do_not_see_the_future(self, pipeline, tmp_path):
        """Perturb every price, funding rate and iv from 2025-01-05 00:00 on: weights up to asof 01-04 23:00 are unchanged."""
        cutoff = datetime(2025, 1, 5, tzinfo=timezone.utc)
        settings, tables = pipeline
        base = tables["portfolio.weights"]
        shifted_settings = replace(settings, warehouse=tmp_path / "shifted.duckdb")
        walk_forward(shifted_settings, _ShiftedFuture(**market_for(settings), cutoff=cutoff.isoformat()))
        shifted = read_tables(shifted_settings.warehouse)["portfolio.weights"]
        before = pl.col("as_of") < cutoff
        assert canonical(base.filter(before)).equals(canonical(shifted.filter(before)))
        after = canonical(base.filter(~before)).join(canonical(shifted.filter(~before)), on=["as_of", "strategy", "symbol"])
        assert (after["weight"] - after["weight_right"]).abs().max() > 1e-6  # the perturbation does reach later asofs


def test_definitions_load_with_the_designed_lineage():
    defs = build_definitions(Settings())
    graph = defs.resolve_asset_graph()
    deps = {key.to_user_string(): {p.to_user_string() for p in graph.get(key).parent_keys}
            for key in graph.get_all_asset_keys()}
    assert deps == {
        "raw/candles": set(), "raw/funding": set(), "raw/implied_vol": set(), "raw/data_quality": set(),
        "raw/reference_prices": set(),
        "risk/spot_hedge": {"features/net_returns", "raw/reference_prices", "raw/candles"},
        "features/net_returns": {"raw/candles", "raw/funding"},
        "features/universe": {"features/net_returns"},
        "features/estimates": {"features/net_returns", "features/universe"},
        "signals/signals": {"features/net_returns", "raw/implied_vol"},
        "portfolio/weights": {"features/estimates", "signals/signals", "portfolio/weights", "features/net_returns", "raw/candles",
                              "features/universe"},  # previous day's weights seed the walk-forward
        "portfolio/frontier": {"features/estimates", "portfolio/weights"},
        "backtest/equity": {"features/net_returns", "portfolio/weights", "signals/signals"},
        "backtest/metrics": {"backtest/equity", "portfolio/weights"},
        "backtest/monthly": {"backtest/equity"},
        "backtest/risk_model": {"features/net_returns", "portfolio/weights", "features/estimates"},
        "backtest/risk_model_summary": {"backtest/risk_model"},
        "backtest/significance": {"backtest/equity"},
        "backtest/by_regime": {"backtest/equity", "signals/signals"},
        "backtest/comparison": {"backtest/metrics", "risk/stress"},
        "risk/stress": {"features/net_returns", "portfolio/weights"},
        "risk/liquidation": {"portfolio/weights"},
        "risk/stress_vs_realized": {"raw/candles", "features/net_returns", "portfolio/weights", "risk/stress"},
        "risk/stress_confusion": {"risk/stress_vs_realized"},
        "risk/contributions": {"portfolio/weights", "features/estimates"},
        "backtest/attribution": {"features/net_returns", "portfolio/weights", "signals/signals"},
        "backtest/break_even": {"features/net_returns", "portfolio/weights", "signals/signals"},
        "report": {"backtest/metrics", "backtest/comparison", "backtest/equity", "portfolio/weights", "signals/signals",
                   "risk/stress", "risk/liquidation", "features/estimates", "portfolio/frontier", "backtest/significance",
                   "backtest/risk_model", "backtest/risk_model_summary", "risk/stress_vs_realized",
                   "risk/stress_confusion", "backtest/attribution", "risk/contributions", "backtest/break_even",
                   "backtest/by_regime"},
    }
    checks = {(c.asset_key.to_user_string(), c.name) for c in graph.asset_check_keys}
    assert checks == {(k, "schema") for k in deps if k != "report"} | {("raw/candles", "fresh")}  # + non-blocking freshness (issue 8)


class TestLiveWindow:
    """PERPFOLIO_END=open: partitions run through today; the hourly data schedule refreshes today."""

    def test_open_end_reads_from_env(self):
        assert Settings.from_env({"PERPFOLIO_END": "open"}).end is None
        assert Settings.from_env({"PERPFOLIO_END": "2025-02-01"}).end == datetime(2025, 2, 1).date()

    def test_hourly_schedule_requests_today_only_for_an_open_window(self):
        now = datetime(2025, 3, 10, 14, 5, tzinfo=timezone.utc)
        for settings, expected in ((Settings(), dg.SkipReason), (Settings(end=None), dg.RunRequest)):
            defs = build_definitions(settings)
            schedule = defs.resolve_schedule_def("hourly_market_data_schedule")
            with dg.build_schedule_context(scheduled_execution_time=now, repository_def=defs.get_repository_def()) as context:
                result = schedule.evaluate_tick(context)
            requests = result.run_requests or []
            if expected is dg.RunRequest:
                assert [r.partition_key for r in requests] == ["2025-03-10"]
            else:
                assert requests == [] and "PERPFOLIO_END=open" in result.skip_message

    def test_source_returns_no_bar_that_has_not_closed(self, short_settings):
        now = datetime.now(timezone.utc)
        market = RawMarket(**{**market_for(short_settings), "origin": (now - timedelta(days=2)).replace(
            minute=0, second=0, microsecond=0).isoformat()})
        data = market.fetch(now - timedelta(days=1), now + timedelta(days=1))
        for frame in (data.candles, data.reference_prices):
            assert frame["ts"].max() < now - timedelta(hours=1) + timedelta(seconds=1)
        assert data.funding["bar_ts"].max() < now

    @pytest.mark.slow
    def test_a_day_in_progress_has_bars_but_no_rebalance_yet(self, tmp_path):
        today = datetime.now(timezone.utc).date()
        settings = Settings(start=today - timedelta(days=2), end=None, window_bars=24,
                            warehouse=tmp_path / "live.duckdb", reports_dir=tmp_path / "reports")
        defs = build_definitions(settings)
        job = defs.resolve_job_def("daily_walk_forward")
        midnight = datetime(today.year, today.month, today.day, tzinfo=timezone.utc)
        closed_hours = lambda: int((datetime.now(timezone.utc) - midnight) / timedelta(hours=1))  # noqa: E731
        before = closed_hours()
        first, last = partition_keys_for(job.partitions_def, today - timedelta(days=1), today)
        tags = {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last}
        with dg.DagsterInstance.ephemeral() as instance:
            assert job.execute_in_process(instance=instance, tags=tags).success
        tables = read_tables(settings.warehouse)
        candles_today = tables["raw.candles"].filter(pl.col("ts") >= midnight)
        assert candles_today.height // len(settings.symbols) in {before, closed_hours()}  # an hour may close mid-run
        assert tables["portfolio.weights"]["as_of"].max() == midnight - timedelta(hours=1)


@pytest.mark.slow
class TestOptimizerInputsFromTheWarehouse:
    """The weights asset feeds the optional terms from the stored stages: window scenarios (CVaR),
    window length (robust mean), the regime signal and the liquid universe (top K by quote volume)."""

    STRATEGIES = """
[[strategy]]
name = "min_variance"
objective = "min_variance"
[strategy.constraints]
budget = 1.0
max_weight = 1.0
cvar_limit = 0.5
cvar_scenarios = 48

[[strategy]]
name = "shrunk"
objective = "min_variance"
estimator = "ledoit_wolf"
[strategy.constraints]
budget = 1.0
max_weight = 1.0

[[strategy]]
name = "half"
objective = "min_variance"
estimator = "ledoit_wolf"
[strategy.constraints]
budget = 0.5
max_weight = 1.0

[[strategy]]
name = "carry"
objective = "vrp_tilt"
[strategy.parameters]
funding_beta = 1.0
vrp_penalty = 1.0
[strategy.constraints]
budget = 1.0
max_weight = 1.0

[[strategy]]
name = "robust"
objective = "vrp_tilt"
fallback_in_turbulence = true
[strategy.parameters]
robust_kappa = 1.0
[strategy.constraints]
budget = 1.0
max_weight = 1.0
"""

    def test_terms_receive_their_data_and_the_universe_is_filtered(self, short_settings, tmp_path):
        path = tmp_path / "strategies.toml"
        path.write_text(self.STRATEGIES)
        settings = replace(short_settings, strategies_file=path, top_k=2)
        materialize(settings)
        tables = read_tables(settings.warehouse)
        weights = tables["portfolio.weights"]
        solved = weights.filter(pl.col("status") == "optimal")
        assert set(solved["strategy"]) == {"min_variance", "shrunk", "half", "carry", "robust"}  # every term found its data
        # the funding tilt reads signals.signals' forecast of each asof, in the configured symbol order
        inputs = asof_inputs(tables["features.estimates"], tables["signals.signals"], tables["features.net_returns"],
                             tables["raw.candles"], tables["features.universe"], list(settings.symbols), settings)
        last = inputs[-1]
        forecast = tables["signals.signals"].filter(pl.col("as_of") == last.asof)
        expected = [forecast.filter(pl.col("symbol") == s)["funding_forecast_1h"].item() for s in settings.symbols]
        np.testing.assert_array_equal(last.funding_1h, np.array(expected, dtype=float))
        assert np.isfinite(last.funding_1h).all()
        # half invested: min variance is homogeneous in the budget, so "half" holds half of "shrunk"
        halves = solved.filter(pl.col("strategy").is_in(["shrunk", "half"])).pivot(
            on="strategy", index=["as_of", "symbol"], values="weight").drop_nulls()
        assert halves.height > 0
        np.testing.assert_allclose(halves["half"], 0.5 * halves["shrunk"], atol=1e-6)
        half = weights.filter((pl.col("strategy") == "half") & ~pl.col("status").str.starts_with("fallback:flat:"))
        assert (half.group_by("as_of").agg(pl.col("weight").sum())["weight"] - 0.5).abs().max() <= 1e-6
        assert "baseline:equal_weight" in set(tables["backtest.metrics"]["strategy"]) and "half" in set(
            tables["backtest.metrics"]["strategy"])
        pair = solved.filter(pl.col("strategy").is_in(["min_variance", "shrunk"])).pivot(
            on="strategy", index=["as_of", "symbol"], values="weight").drop_nulls()
        assert (pair["min_variance"] - pair["shrunk"]).abs().max() > 1e-4  # Ledoit-Wolf is not the sample covariance
        volume = tables["raw.candles"].group_by("symbol").agg((pl.col("close") * pl.col("volume")).mean().alias("v"))
        least_liquid = volume.sort("v")["symbol"][0]
        assert solved.filter(pl.col("symbol") == least_liquid)["weight"].abs().max() <= 1e-8
        assert solved.filter(pl.col("symbol") != least_liquid)["weight"].abs().max() > 0.01


@pytest.mark.slow
def test_adaptive_rebalancing_trades_less_in_turbulence(tmp_path):
    """Over the planted turbulent episode (day 70 on) the adaptive book skips decisions the daily one trades."""
    base = Settings(start=datetime(2025, 1, 1).date(), end=datetime(2025, 3, 31).date(), window_bars=168,
                    warehouse=tmp_path / "daily.duckdb", reports_dir=tmp_path / "r1", stress_leverages=(1.0,),
                    baselines=("equal_weight",))
    adaptive = replace(base, warehouse=tmp_path / "adaptive.duckdb", reports_dir=tmp_path / "r2", rebalance="adaptive")
    walk_forward(base)
    shutil.copy(base.warehouse, adaptive.warehouse)  # same walk-forward: only the backtest reads the frequency
    for settings in (base, adaptive):
        backtest_equity(settings)
    trades = {}
    for settings in (base, adaptive):
        tables = read_tables(settings.warehouse)
        assert "turbulent" in set(tables["signals.signals"]["regime"])  # the episode is detected
        book = tables["backtest.equity"].filter(pl.col("strategy") == "baseline:equal_weight")
        trades[settings.rebalance] = int((book["turnover"] > 0).sum())
    assert trades["adaptive"] < trades["daily"]


@pytest.mark.slow
def test_volatility_scaled_slippage_costs_more_around_the_turbulent_episode(tmp_path):
    """Same data and weights; with PERPFOLIO_SLIPPAGE_VOL_SCALED the slippage follows each symbol's
    predicted / realized vol (close to 1 in this calm week), so it differs from the flat bps while
    the fees stay the same."""
    base = Settings(start=datetime(2025, 1, 1).date(), end=datetime(2025, 1, 8).date(), window_bars=48,
                    warehouse=tmp_path / "flat.duckdb", reports_dir=tmp_path / "r1", stress_leverages=(1.0,),
                    baselines=("equal_weight",))
    scaled = replace(base, warehouse=tmp_path / "scaled.duckdb", reports_dir=tmp_path / "r2", slippage_vol_scaled=True)
    walk_forward(base)
    shutil.copy(base.warehouse, scaled.warehouse)  # same walk-forward: only the backtest reads the slippage setting
    for settings in (base, scaled):
        backtest_equity(settings)
    books = {}
    for settings in (base, scaled):
        equity = read_tables(settings.warehouse)["backtest.equity"]
        books[settings.slippage_vol_scaled] = equity.filter(pl.col("strategy") == "baseline:equal_weight")
    flat, vol = books[False], books[True]
    assert flat["fees"].to_list() == pytest.approx(vol["fees"].to_list(), rel=1e-3)  # same trades, up to equity
    assert abs(vol["slippage"].sum() / flat["slippage"].sum() - 1.0) > 1e-5  # the multipliers reached the trades
    assert (flat["interest"] == 0).all() and (vol["interest"] == 0).all()  # no cash rate by default
    assert Settings.from_env({"PERPFOLIO_SLIPPAGE_VOL_SCALED": "true"}).slippage_vol_scaled is True


def test_volatility_scale_by_hand():
    from assets.evaluation import volatility_scale

    t0, t1 = datetime(2025, 1, 2, 23, tzinfo=timezone.utc), datetime(2025, 1, 3, 23, tzinfo=timezone.utc)
    signals = pl.DataFrame({
        "as_of": [t0, t0, t1, t1], "symbol": ["BTCUSDT", "ETHUSDT", "BTCUSDT", "ETHUSDT"],
        "predicted_vol_ewma": [0.6, 0.1, None, 3.0], "realized_var": [0.09, 0.25, 0.04, 0.04],
    })
    got = volatility_scale(signals, [t0, t1], ["BTCUSDT", "ETHUSDT", "SOLUSDT"])
    # 0.6/0.3 = 2; 0.1/0.5 = 0.2 -> clipped 0.25; unknown -> 1; 3.0/0.2 = 15 -> clipped 4; no SOL rows -> 1
    np.testing.assert_allclose(got, [[2.0, 0.25, 1.0], [1.0, 4.0, 1.0]])


def evaluate_a_copy(pipeline, tmp_path: Path, **changes) -> Settings:
    """The module pipeline's warehouse copied, then only backtest.equity re-run with ``changes``
    (settings that only the backtest reads); returns the settings of the copy."""
    settings = replace(pipeline[0], warehouse=tmp_path / "copy.duckdb", reports_dir=tmp_path / "reports", **changes)
    shutil.copy(pipeline[0].warehouse, settings.warehouse)
    backtest_equity(settings)
    return settings


@pytest.mark.slow
def test_cash_rate_is_earned_by_the_equity(pipeline, tmp_path):
    """PERPFOLIO_CASH_RATE=0.05: every bar earns 5%/8760 on the equity before it."""
    settings = evaluate_a_copy(pipeline, tmp_path, cash_rate=0.05)
    book = read_tables(settings.warehouse)["backtest.equity"].filter(pl.col("strategy") == "min_variance").sort("ts")
    before = np.concatenate([[1.0], book["equity"].to_numpy()[:-1]])
    np.testing.assert_allclose(book["interest"].to_numpy(), 0.05 / 8760 * before, rtol=1e-12)
    assert Settings.from_env({"PERPFOLIO_CASH_RATE": "0.05"}).cash_rate == 0.05
