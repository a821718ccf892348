"""The spot-versus-perp hedge overlay: minimum-variance ratios against OLS (numpy, scikit-learn), textbook
cases, the rolling table's statuses and out-of-sample effectiveness, its inputs, and the risk.spot_hedge asset."""

from dataclasses import replace
from datetime import date, datetime, timedelta, timezone

import dagster as dg
import duckdb
import numpy as np
import polars as pl
import pytest
from sklearn.linear_model import LinearRegression

from perpfolio import hedge, returns
from perpfolio.errors import ConfigError, DataError
from perpfolio.sources.synthetic import generate_market

UTC = timezone.utc
ASOF = datetime(2025, 3, 1, 23, tzinfo=UTC)
SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]


def correlated(rng: np.random.Generator, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Three perps with a common factor and a spot loading on them plus noise (per-bar returns)."""
    factor = rng.standard_normal(t)
    perps = 0.01 * (0.8 * factor[:, None] + 0.6 * rng.standard_normal((t, 3)))
    spot = perps @ np.array([0.7, 0.2, -0.1]) + 0.002 * rng.standard_normal(t) + 1e-4
    return spot, perps


class TestFitHedge:
    def test_cross_hedge_is_the_ols_slope_numpy_lstsq(self, rng):
        spot, perps = correlated(rng, 500)
        fit = hedge.fit_hedge(spot, perps, symbol="X", asof=ASOF, perp_names=SYMBOLS)
        design = np.column_stack([np.ones(spot.size), perps])
        coef, ssr, _, _ = np.linalg.lstsq(design, spot, rcond=None)
        np.testing.assert_allclose(fit.ratios, coef[1:], rtol=1e-10)
        r2 = 1.0 - ssr[0] / np.sum((spot - spot.mean()) ** 2)
        assert fit.effectiveness == pytest.approx(r2, rel=1e-10)
        assert fit.n_obs == 500 and fit.spot_var == pytest.approx(np.var(spot, ddof=1), rel=1e-12)

    def test_cross_hedge_matches_sklearn_linear_regression(self, rng):
        spot, perps = correlated(rng, 300)
        model = LinearRegression().fit(perps, spot)
        fit = hedge.fit_hedge(spot, perps, symbol="X", asof=ASOF, perp_names=SYMBOLS)
        np.testing.assert_allclose(fit.ratios, model.coef_, rtol=1e-9)
        assert fit.effectiveness == pytest.approx(model.score(perps, spot), rel=1e-9)

    def test_single_perp_ratio_is_cov_over_var(self, rng):
        spot, perps = correlated(rng, 400)
        fit = hedge.fit_hedge(spot, perps[:, 0], symbol="X", asof=ASOF, perp_names=["BTCUSDT"])
        cov = np.cov(spot, perps[:, 0])  # by hand: Cov(s, f) / Var(f); effectiveness = rho^2
        assert fit.ratios.tolist() == pytest.approx([cov[0, 1] / cov[1, 1]], rel=1e-12)
        assert fit.effectiveness == pytest.approx(cov[0, 1] ** 2 / (cov[0, 0] * cov[1, 1]), rel=1e-10)

    def test_spot_equal_to_the_perp_is_hedged_one_for_one_completely(self, rng):
        perp = 0.01 * rng.standard_normal(200)
        fit = hedge.fit_hedge(perp.copy(), perp, symbol="X", asof=ASOF, perp_names=["X"])
        assert fit.ratios[0] == pytest.approx(1.0, abs=1e-12)
        assert fit.effectiveness == pytest.approx(1.0, abs=1e-12) and fit.hedged_var == pytest.approx(0.0, abs=1e-18)
        scaled = hedge.fit_hedge(2.0 * perp + 0.003, perp, symbol="X", asof=ASOF, perp_names=["X"])
        assert scaled.ratios[0] == pytest.approx(2.0, abs=1e-12) and scaled.effectiveness == pytest.approx(1.0, abs=1e-12)

    def test_independent_spot_gets_no_hedge(self, rng):
        t = 20_000
        fit = hedge.fit_hedge(rng.standard_normal(t), rng.standard_normal(t), symbol="X", asof=ASOF, perp_names=["X"])
        assert abs(fit.ratios[0]) < 4.0 / np.sqrt(t)  # standard error 1/sqrt(T)
        assert 0.0 <= fit.effectiveness < 1e-3

    @pytest.mark.parametrize(("case", "match"), [
        ("nan", r"hedge of BTCUSDT at asof 2025-03-01 23:00:00\+00:00: missing or non-finite return at bar 3"),
        ("inf", "missing or non-finite return at bar 3"),
        ("short", r"3 bars are too few for 3 perp\(s\); need at least 5"),
        ("constant_perp", r"perp return of \['ETHUSDT'\] is constant"),
        ("collinear", "are collinear"),
        ("constant_spot", "the spot return is constant"),
        ("shape", "over the same bars"),
    ])
    def test_bad_input_names_symbol_and_asof(self, rng, case, match):
        spot, perps = correlated(rng, 50)
        if case == "nan":
            spot[3] = np.nan
        elif case == "inf":
            perps[3, 1] = np.inf
        elif case == "short":
            spot, perps = spot[:3], perps[:3]
        elif case == "constant_perp":
            perps[:, 1] = 0.001
        elif case == "collinear":
            perps[:, 2] = 2.0 * perps[:, 0] - perps[:, 1]
        elif case == "constant_spot":
            spot[:] = 0.0
        else:
            perps = perps[:-1]
        with pytest.raises(DataError, match=match) as error:
            hedge.fit_hedge(spot, perps, symbol="BTCUSDT", asof=ASOF, perp_names=SYMBOLS)
        assert "BTCUSDT" in str(error.value) and "2025-03-01" in str(error.value)


class TestEffectiveness:
    def test_by_hand_and_negative_when_the_hedge_adds_risk(self, rng):
        spot, perps = correlated(rng, 100)
        ratios = np.array([0.5, 0.1, 0.0])
        hedged = spot - perps @ ratios
        expected = 1.0 - np.var(hedged, ddof=1) / np.var(spot, ddof=1)
        assert hedge.hedge_effectiveness(spot, perps, ratios, symbol="X", asof=ASOF) == pytest.approx(expected, rel=1e-12)
        assert hedge.hedge_effectiveness(spot, perps, -3 * ratios, symbol="X", asof=ASOF) < 0  # doubles the exposure

    def test_errors(self, rng):
        spot, perps = correlated(rng, 10)
        with pytest.raises(DataError, match="at least 2 bars"):
            hedge.hedge_effectiveness(spot[:1], perps[:1], np.zeros(3), symbol="X", asof=ASOF)
        with pytest.raises(DataError, match="must be 3 finite numbers"):
            hedge.hedge_effectiveness(spot, perps, np.array([1.0, np.nan, 0.0]), symbol="X", asof=ASOF)


def table(spot, perps, ends, *, notional=None, window=48, period=24):
    asofs = [ASOF + timedelta(days=k) for k in range(len(ends))]
    return hedge.hedge_table(spot, perps, np.asarray(ends), asofs, SYMBOLS, notional or dict.fromkeys(SYMBOLS, 1.0),
                             window=window, period=period, periods_per_year=8760.0)


class TestHedgeTable:
    @pytest.fixture
    def data(self, rng):
        t = 24 * 6
        factor = rng.standard_normal(t)
        perps = 0.01 * (0.8 * factor[:, None] + 0.6 * rng.standard_normal((t, 3)))
        spot = perps + 0.001 * rng.standard_normal((t, 3))
        return spot, perps

    def test_rows_equal_fits_on_their_windows(self, data):
        spot, perps = data
        ends = [23, 47, 71, 95, 119, 143]
        frame = table(spot, perps, ends, notional={"BTCUSDT": 2.0, "SOLUSDT": -5.0})
        assert frame.height == 6 * (2 * (1 + 3) + 3)  # 2 positions x (single + cross) + book x cross
        warmup = frame.filter(pl.col("as_of") == ASOF)  # window 48 > the 24 bars before
        assert set(warmup["status"]) == {"insufficient_history"} and warmup["hedge_ratio"].null_count() == warmup.height
        row = frame.filter((pl.col("as_of") == ASOF + timedelta(days=3)) & (pl.col("symbol") == "SOLUSDT"))
        single = hedge.fit_hedge(spot[48:96, 2], perps[48:96, 2], symbol="S", asof=ASOF, perp_names=["SOLUSDT"])
        cross = hedge.fit_hedge(spot[48:96, 2], perps[48:96], symbol="S", asof=ASOF, perp_names=SYMBOLS)
        assert row.filter(pl.col("hedge") == "single")["hedge_ratio"].to_list() == pytest.approx(single.ratios.tolist(), rel=1e-12)
        cross_rows = row.filter(pl.col("hedge") == "cross").sort("perp")
        assert cross_rows["perp"].to_list() == SYMBOLS
        assert cross_rows["hedge_ratio"].to_list() == pytest.approx(cross.ratios.tolist(), rel=1e-12)
        assert cross_rows["hedge_notional"].to_list() == pytest.approx((5.0 * cross.ratios).tolist(), rel=1e-12)  # short spot: long perps
        assert cross_rows["effectiveness"].unique().to_list() == pytest.approx([cross.effectiveness], rel=1e-12)
        assert cross_rows["spot_vol"][0] == pytest.approx(np.sqrt(cross.spot_var * 8760), rel=1e-12)
        assert set(cross_rows["n_obs"]) == {48} and set(cross_rows["spot_notional"]) == {-5.0}

    def test_out_of_sample_uses_the_previous_days_hedge_on_this_days_bars(self, data):
        spot, perps = data
        frame = table(spot, perps, [47, 71, 95])
        day_before = hedge.fit_hedge(spot[24:72, 0], perps[24:72], symbol="B", asof=ASOF, perp_names=SYMBOLS)
        expected = hedge.hedge_effectiveness(spot[72:96, 0], perps[72:96], day_before.ratios, symbol="B", asof=ASOF)
        row = frame.filter((pl.col("as_of") == ASOF + timedelta(days=2)) & (pl.col("symbol") == "BTCUSDT")
                           & (pl.col("hedge") == "cross"))
        assert row["effectiveness_oos"].unique().to_list() == pytest.approx([expected], rel=1e-12)
        first = frame.filter(pl.col("as_of") == ASOF)  # its previous day had no full window
        assert first["status"].unique().to_list() == ["ok"] and first["effectiveness_oos"].null_count() == first.height
        assert table(spot, perps, [95], period=1)["effectiveness_oos"].null_count() == 15  # one bar: no variance

    def test_book_hedge_is_the_sum_of_the_positions_hedges(self, data):
        """OLS is linear in the dependent variable: the book's perp notionals are the positions' cross-hedge notionals summed."""
        spot, perps = data
        notional = {"BTCUSDT": 3.0, "ETHUSDT": -1.0, "SOLUSDT": 0.5}
        frame = table(spot, perps, [143], notional=notional).filter(pl.col("hedge") == "cross")
        summed = frame.filter(pl.col("symbol") != "book").group_by("perp").agg(pl.col("hedge_notional").sum()).sort("perp")
        book = frame.filter(pl.col("symbol") == "book").sort("perp")
        np.testing.assert_allclose(book["hedge_notional"].to_numpy(), summed["hedge_notional"].to_numpy(), rtol=1e-10)
        assert set(book["spot_notional"]) == {4.5}  # gross

    def test_missing_and_degenerate_windows_get_their_status(self, data):
        spot, perps = data
        spot, perps = spot.copy(), perps.copy()
        spot[100, 1] = np.nan  # ETH's index missing for one bar
        perps[:, 2] = np.where(np.arange(perps.shape[0]) >= 72, 0.0, perps[:, 2])  # SOL perp flat from bar 72
        frame = table(spot, perps, [71, 119]).unique(["as_of", "symbol", "hedge"])
        status = {(r["as_of"].day - ASOF.day, r["symbol"], r["hedge"]): r["status"] for r in frame.iter_rows(named=True)}
        assert status[(0, "ETHUSDT", "single")] == "ok" and status[(1, "ETHUSDT", "single")] == "missing_data"
        assert status[(1, "book", "cross")] == "missing_data"  # a position's missing bar is the book's
        assert status[(1, "SOLUSDT", "single")] == "degenerate" and status[(1, "BTCUSDT", "cross")] == "degenerate"
        assert status[(1, "BTCUSDT", "single")] == "ok"
        n_obs = frame.filter((pl.col("as_of") == ASOF + timedelta(days=1)) & (pl.col("symbol") == "ETHUSDT"))["n_obs"]
        assert set(n_obs) == {47}

    def test_no_look_ahead(self, data):
        spot, perps = data
        base = table(spot, perps, [95])
        later_spot, later_perps = spot.copy(), perps.copy()
        later_spot[96:] *= 5
        later_perps[96:] = -later_perps[96:]
        assert table(later_spot, later_perps, [95]).equals(base)

    @pytest.mark.parametrize(("kwargs", "match"), [
        ({"window": 4}, "hedge window must be an integer >= number of perps"),
        ({"period": 0}, "hedge period must be a positive integer"),
        ({"notional": {"XRPUSDT": 1.0}}, r"unknown \['XRPUSDT'\]"),
        ({"notional": {"BTCUSDT": 0.0}}, "finite and non-zero"),
    ])
    def test_bad_configuration(self, data, kwargs, match):
        with pytest.raises(ConfigError, match=match):
            table(*data, [95], **kwargs)


class TestInputs:
    @pytest.fixture(scope="class")
    def market(self):
        start = datetime(2025, 1, 1, tzinfo=UTC)
        return generate_market(SYMBOLS, start, start + timedelta(days=5), seed=4)

    def test_spot_returns_are_index_simple_returns(self, market):
        spot = hedge.spot_returns(market.reference_prices, bar_hours=1).filter(pl.col("symbol") == "ETHUSDT")
        close = market.reference_prices.filter((pl.col("symbol") == "ETHUSDT") & (pl.col("kind") == "index"))["close"].to_numpy()
        np.testing.assert_allclose(spot["spot_return"].to_numpy(), close[1:] / close[:-1] - 1.0, rtol=1e-12)
        four = hedge.spot_returns(market.reference_prices, bar_hours=4).filter(pl.col("symbol") == "ETHUSDT")
        np.testing.assert_allclose(four["spot_return"].to_numpy(), close[7::4] / close[3:-4:4] - 1.0, rtol=1e-12)

    def test_perp_side_includes_funding_and_grids_are_aligned(self, market):
        net = returns.net_returns(market.candles, market.funding, kind="log")  # the perp side is simple whatever the kind
        ts, spot, perps = hedge.return_matrices(net.filter(pl.col("ts") > net["ts"].min()),
                                                hedge.spot_returns(market.reference_prices, bar_hours=1), SYMBOLS)
        first = net.filter(pl.col("ts") == net["ts"].min())
        assert np.isnan(perps[0]).all() and np.isfinite(spot[0]).all()  # the first spot bar has no perp row
        btc = net.filter(pl.col("symbol") == "BTCUSDT").sort("ts")
        np.testing.assert_allclose(perps[1:, 0], (btc["price_return"] + btc["funding_return"]).to_numpy()[1:], rtol=1e-12)
        assert first.height == 3 and ts.size == spot.shape[0] == perps.shape[0] == 24 * 5 - 1

    def test_basis_stats_by_hand(self, market):
        asof = datetime(2025, 1, 4, 23, tzinfo=UTC)
        stats = hedge.basis_stats(market.candles, market.reference_prices, [asof], window_hours=48, bar_hours=1)
        btc = market.candles.filter(pl.col("symbol") == "BTCUSDT").sort("ts")
        index = market.reference_prices.filter((pl.col("symbol") == "BTCUSDT") & (pl.col("kind") == "index")).sort("ts")
        basis = (btc["close"] / index["close"] - 1.0).to_numpy()
        end = int((asof - datetime(2025, 1, 1, tzinfo=UTC)) / timedelta(hours=1))
        window = basis[end - 47: end + 1]
        row = stats.filter(pl.col("symbol") == "BTCUSDT").row(0, named=True)
        assert row["basis_mean"] == pytest.approx(window.mean(), rel=1e-10)
        assert row["basis_std"] == pytest.approx(window.std(ddof=1), rel=1e-10)
        assert row["basis_last"] == basis[end]
        short = hedge.basis_stats(market.candles, market.reference_prices, [datetime(2025, 1, 1, 23, tzinfo=UTC)],
                                  window_hours=48, bar_hours=1)
        assert short["basis_mean"].null_count() == 3  # only 24 hours exist: no partial statistics
        four = hedge.basis_stats(market.candles, market.reference_prices, [datetime(2025, 1, 4, 20, tzinfo=UTC)],
                                 window_hours=48, bar_hours=4)  # a 4 h bar's last hour is 23:00
        assert four.filter(pl.col("symbol") == "BTCUSDT")["basis_last"].item() == basis[end]


# ------------------------------------------------------------------------------------ the asset

@pytest.mark.slow
def test_spot_hedge_materializes_over_a_short_window(tmp_path):
    """raw -> net returns -> risk.spot_hedge for six days on the synthetic market, then a source without index prices."""
    from assets import features, hedge as hedge_assets, raw
    from assets.hedge import SPOT_HEDGE
    from pipelines.partitions import partition_keys_for, time_partitions
    from pipelines.resources import RawMarket, WarehouseIOManager, as_utc
    from pipelines.settings import Settings

    class NoReference(RawMarket):
        def fetch(self, start, end):
            data = super().fetch(start, end)
            return replace(data, reference_prices=data.reference_prices.clear())

    def run(settings: Settings, market: RawMarket) -> tuple[pl.DataFrame, dict]:
        partitions = time_partitions(settings)
        job = dg.define_asset_job("hedge", selection=dg.AssetSelection.assets(SPOT_HEDGE).upstream().required_multi_asset_neighbors(),
                                   partitions_def=partitions)
        defs = dg.Definitions(
            assets=[*raw.build(settings, partitions), *features.build(settings, partitions), *hedge_assets.build(settings, partitions)],
            jobs=[job], resources={"io_manager": WarehouseIOManager(database=str(settings.warehouse)), "market": market},
        )
        first, last = partition_keys_for(partitions, settings.start, settings.end)
        tags = {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last}
        with dg.DagsterInstance.ephemeral() as instance:
            result = defs.resolve_job_def("hedge").execute_in_process(instance=instance, tags=tags)
            assert result.success
            meta = next(m.metadata for m in result.asset_materializations_for_node("risk__spot_hedge"))
        with duckdb.connect(str(settings.warehouse), read_only=True) as con:
            return as_utc(con.sql("SELECT * FROM risk.spot_hedge").pl()), meta

    settings = Settings(start=date(2025, 1, 1), end=date(2025, 1, 6), window_bars=48, warehouse=tmp_path / "w.duckdb",
                        spot_notional=(("BTCUSDT", 50_000.0), ("ETHUSDT", -20_000.0)))
    market = dict(symbols=list(settings.symbols), origin=settings.origin.isoformat(), seed=settings.seed)
    frame, meta = run(settings, RawMarket(**market))
    assert frame.height == 6 * (2 * 4 + 3) and frame["as_of"].n_unique() == 6
    per_day = frame.unique(["as_of", "symbol", "hedge"]).group_by("as_of").agg(pl.col("status").unique()).sort("as_of")
    assert [sorted(s) for s in per_day["status"]] == [["insufficient_history"]] * 2 + [["ok"]] * 4
    single = frame.filter((pl.col("status") == "ok") & (pl.col("hedge") == "single"))
    assert single["hedge_ratio"].is_between(0.98, 1.02).all() and (single["effectiveness"] > 0.99).all()
    btc = single.filter(pl.col("symbol") == "BTCUSDT")
    np.testing.assert_allclose(btc["hedge_notional"].to_numpy(), -50_000.0 * btc["hedge_ratio"].to_numpy(), rtol=1e-12)
    assert single["basis_mean"].null_count() == 0 and frame.filter(pl.col("symbol") == "book")["basis_mean"].null_count() == 18
    assert meta["status_ok"].value == 4 * 5 and meta["symbols_without_index"].value == "none"
    assert "| BTCUSDT | single | BTCUSDT |" in meta["latest"].value

    bare = replace(settings, warehouse=tmp_path / "bare.duckdb")
    frame, meta = run(bare, NoReference(**market))
    assert set(frame["status"]) == {"insufficient_history", "missing_data"} and frame["hedge_ratio"].null_count() == frame.height
    assert meta["symbols_without_index"].value == "BTCUSDT, ETHUSDT, SOLUSDT"
