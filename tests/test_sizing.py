"""Position sizing in the walk-forward backtest: vol-target leverage and the drawdown cash buffer.

Library cases are checked against numbers worked by hand and against an independent bar-by-bar
loop; one pipeline run checks the settings, the lineage and the stored multipliers end to end.
"""

from dataclasses import replace
from datetime import datetime

import dagster as dg
import numpy as np
import polars as pl
import pytest

from perpfolio import estimators
from perpfolio.backtest import performance_metrics, rebalance_plan, simulate
from perpfolio.errors import ConfigError, DataError
from perpfolio.optimize.sizing import SizingRule, drawdown_cash_buffer, predicted_vol
from pipelines.definitions import build_definitions
from pipelines.settings import Settings
from tests.test_pipeline import materialize, read_tables


def hourly(n: int) -> np.ndarray:
    return np.datetime64("2025-01-01T00", "us") + np.arange(n) * np.timedelta64(1, "h")


def sized_loop(r, f, reb, w, cov, rule: SizingRule, *, fee_bps, slippage_bps, lag_bars, cash_rate=0.0, e0=1.0):
    """Reference: the sized accounting bar by bar in plain Python, with lambda and c written out.

    Returns per bar (equity, sizing_leverage, cash_fraction) and per execution the multiplier m.
    """
    n_bars, n_sym = r.shape
    execute = {b + lag_bars: j for j, b in enumerate(reb) if b + lag_bars < n_bars}
    x, equity, peak, path, rows, mults = [0.0] * n_sym, e0, e0, [], [], []
    lam, c = 1.0, 0.0
    for t in range(n_bars):
        pnl = sum(x[i] * (r[t, i] + f[t, i]) for i in range(n_sym))
        x = [x[i] * (1 + r[t, i]) for i in range(n_sym)]
        equity += cash_rate * equity + pnl
        if t in execute:
            j = execute[t]
            var = sum(w[j, a] * cov[j, a, b] * w[j, b] for a in range(n_sym) for b in range(n_sym))
            vol = var ** 0.5
            lam = 1.0 if rule.target_vol is None else min(rule.max_leverage, rule.target_vol / vol)
            d = reb[j] - (1 if lag_bars == 0 else 0)  # the drawdown known at the decision
            dd = 0.0 if d < 0 else path[d][0] / path[d][1] - 1.0
            excess = 0.0 if rule.target_vol is None else max(0.0, vol / rule.target_vol - 1.0)
            c = (min(rule.cash_buffer_max, rule.cash_buffer_base + rule.cash_buffer_per_drawdown * -dd
                     + rule.cash_buffer_per_excess_vol * excess) if rule.cash_buffer else 0.0)
            mults.append(lam * (1 - c))
            target = [lam * (1 - c) * w[j, i] * equity for i in range(n_sym)]
            traded = sum(abs(target[i] - x[i]) for i in range(n_sym))
            x, equity = target, equity - (fee_bps + slippage_bps) / 1e4 * traded
        peak = max(peak, equity)
        path.append((equity, peak))
        rows.append((equity, lam, c))
    return np.array(rows), np.array(mults)


class TestLibrary:
    def test_predicted_vol_against_numpy(self, rng):
        w = rng.normal(size=(4, 3))
        a = rng.normal(size=(4, 3, 3))
        cov = a @ a.transpose(0, 2, 1)
        cov[2, 0, 0] = np.nan  # unknown -> NaN, the other rows unaffected
        got = predicted_vol(w, cov)
        for k in (0, 1, 3):
            assert got[k] == pytest.approx(np.sqrt(w[k] @ cov[k] @ w[k]), rel=1e-12)
        assert np.isnan(got[2])

    def test_rule_leverage_by_hand(self):
        rule = SizingRule(target_vol=0.2, max_leverage=2.0)
        w = np.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.0, 0.0]])
        cov = np.array([np.diag([0.04, 0.16]),  # book vol sqrt(0.05) = 0.2236: lambda = 0.2 / 0.2236
                        np.diag([1e-4, 1e-4]),  # book vol 0.00707: 28x wanted, capped at 2
                        np.full((2, 2), np.nan),  # no prediction: unlevered
                        np.diag([0.04, 0.16])])  # flat book, zero risk: the cap
        lam, vol = rule.leverage(w, cov)
        np.testing.assert_allclose(lam, [0.2 / np.sqrt(0.05), 2.0, 1.0, 2.0], rtol=1e-14)
        assert vol[0] == pytest.approx(np.sqrt(0.05)) and np.isnan(vol[2])
        assert SizingRule(target_vol=0.2, max_leverage=0.5).leverage(w[2:3], cov[2:3])[0][0] == 0.5  # min(1, L_max)
        np.testing.assert_array_equal(SizingRule(cash_buffer=True).leverage(w, None)[0], 1.0)  # off: 1, no covariance

    def test_cash_fraction_by_hand(self):
        rule = SizingRule(target_vol=0.2, cash_buffer=True, cash_buffer_base=0.05, cash_buffer_per_drawdown=2.0,
                          cash_buffer_per_excess_vol=0.5, cash_buffer_max=0.6)
        assert rule.cash_fraction(-0.1, 0.3) == pytest.approx(0.05 + 2 * 0.1 + 0.5 * 0.5)
        assert rule.cash_fraction(-0.1, np.nan) == pytest.approx(0.25)  # unknown vol: no excess term
        assert rule.cash_fraction(-0.5, 0.1) == 0.6  # capped
        assert SizingRule(target_vol=0.2).cash_fraction(-0.5, 0.9) == 0.0  # buffer off
        drawdown_only = SizingRule(cash_buffer=True, cash_buffer_base=0.1)  # no target: no excess-vol term
        assert drawdown_only.cash_fraction(-0.2, 5.0) == pytest.approx(0.3)
        with pytest.raises(ConfigError, match="set target_vol or per_excess_vol=0"):
            drawdown_cash_buffer(-0.2, 0.3, target_vol=None, per_excess_vol=0.5)

    @pytest.mark.parametrize("kwargs, match", [
        (dict(target_vol=0.0), "target_vol must be"),
        (dict(target_vol=0.2, max_leverage=-1.0), "max_leverage must be"),
        (dict(cash_buffer=True, cash_buffer_max=1.0), "max_cash"),
        (dict(cash_buffer=True, cash_buffer_per_drawdown=-1.0), "per_drawdown"),
    ])
    def test_rule_rejects_bad_parameters(self, kwargs, match):
        with pytest.raises(ConfigError, match=match):
            SizingRule(**kwargs)


class TestHandWorked:
    """2 assets, 6 bars, lag 1, fee 10 + slippage 5 bps, target vol 20%, cap 2, cash buffer
    c = min(0.5, 0.05 + |DD| + 0.5 (vol/0.2 - 1)+). Rebalances at asofs 0 and 3 (trades at bars 1, 4)."""

    r = np.array([[0.0, 0.0], [0.01, 0.02], [-0.05, -0.03], [-0.02, 0.01], [0.01, 0.01], [0.0, 0.02]])
    f = np.zeros((6, 2))
    w = np.array([[0.5, 0.5], [0.5, 0.5]])
    cov = np.array([np.diag([0.04, 0.16]), np.diag([1e-4, 1e-4])])
    rule = SizingRule(target_vol=0.2, max_leverage=2.0, cash_buffer=True, cash_buffer_base=0.05,
                      cash_buffer_per_drawdown=1.0, cash_buffer_per_excess_vol=0.5, cash_buffer_max=0.5)

    def run(self, **kw):
        return simulate(hourly(6), self.r, self.f, np.array([0, 3]), self.w, fee_bps=10, slippage_bps=5, lag_bars=1,
                        sizing=self.rule, predicted_cov=self.cov, **kw)

    def test_bar_by_bar(self):
        out = self.run()
        cost = 0.0015
        # execution 0 (bar 1): vol sqrt(0.05); lambda = 0.2/sqrt(0.05) = 0.894; no drawdown yet at bar 0;
        # excess = sqrt(0.05)/0.2 - 1 = 0.118 -> c = 0.05 + 0.5 * 0.118
        vol0 = np.sqrt(0.05)
        lam0, c0 = 0.2 / vol0, 0.05 + 0.5 * (vol0 / 0.2 - 1)
        m0 = lam0 * (1 - c0)
        e1 = 1.0 - cost * m0  # traded m0 from flat at E_pre = 1
        x = 0.5 * m0 * np.array([1.0, 1.0])
        e2 = e1 + x @ self.r[2]
        x = x * (1 + self.r[2])
        e3 = e2 + x @ self.r[3]
        x = x * (1 + self.r[3])
        # execution 1 (bar 4): drawdown at the asof bar 3 against the peak 1 (initial); vol 0.00707 -> capped at 2
        lam1, c1 = 2.0, 0.05 + (1.0 - e3)
        e4_pre = e3 + x @ self.r[4]
        drifted = x * (1 + self.r[4])
        target = lam1 * (1 - c1) * self.w[1] * e4_pre
        e4 = e4_pre - cost * np.abs(target - drifted).sum()
        e5 = e4 + target @ self.r[5]
        np.testing.assert_allclose(out["equity"].to_numpy(), [1.0, e1, e2, e3, e4, e5], rtol=0, atol=1e-15)
        np.testing.assert_allclose(out["sizing_leverage"].to_numpy(), [1, lam0, lam0, lam0, lam1, lam1], atol=1e-15)
        np.testing.assert_allclose(out["cash_fraction"].to_numpy(), [0, c0, c0, c0, c1, c1], atol=1e-15)
        assert (lam0, c0) == pytest.approx((0.894427191, 0.109016994), abs=1e-9)
        assert c1 - 0.05 == pytest.approx(0.0368, abs=1e-4)  # the buffer grew by the 3.7% drawdown
        assert out["gross_leverage"][4] == pytest.approx(np.abs(target).sum() / e4, rel=1e-14)

    def test_matches_reference_loop_and_reconciles_with_costs_and_cash_rate(self, rng):
        n, k = 24 * 12, 4
        r = rng.normal(0, 0.01, (n, k))
        f = rng.normal(0, 5e-5, (n, k))
        reb = np.arange(23, n, 24)
        w = rng.dirichlet(np.ones(k), len(reb)) * rng.choice([-1.0, 1.0], (len(reb), k)) * 1.5
        a = rng.normal(0, 0.3, (len(reb), k, k))
        cov = a @ a.transpose(0, 2, 1) / k
        rule = replace(self.rule, target_vol=0.3, max_leverage=2.5, cash_buffer_per_drawdown=3.0, cash_buffer_max=0.8)
        kw = dict(fee_bps=5, slippage_bps=2, lag_bars=1)
        out = simulate(hourly(n), r, f, reb, w, sizing=rule, predicted_cov=cov, cash_rate_per_bar=1e-5, **kw)
        ref, mults = sized_loop(r, f, reb, w, cov, rule, cash_rate=1e-5, **kw)
        got = out.select("equity", "sizing_leverage", "cash_fraction").to_numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-13)
        total = (1.0 + out["price_pnl"].sum() + out["funding_pnl"].sum() + out["interest"].sum()
                 - out["fees"].sum() - out["slippage"].sum())
        assert abs(out["equity"][-1] - total) < 1e-9
        # the sizing moved, and the drawdown term was exercised
        assert len(np.unique(out["cash_fraction"])) > 5 and mults.min() < mults.max() and out["drawdown"].min() < -0.02

    def test_leverage_cap_holds_in_the_output(self, rng):
        n, k = 24 * 6, 3
        r = rng.normal(0, 0.01, (n, k))
        reb = np.arange(23, n, 24)
        w = rng.dirichlet(np.ones(k), len(reb))
        cov = np.tile(np.eye(k) * 1e-4, (len(reb), 1, 1))  # tiny predicted risk: the cap binds
        out = simulate(hourly(n), r, np.zeros_like(r), reb, w, sizing=SizingRule(target_vol=0.5, max_leverage=2.0),
                       predicted_cov=cov, fee_bps=5, slippage_bps=2)
        assert out["sizing_leverage"].max() == 2.0
        executed = reb + 1 < n  # the last asof's trade would fall past the end
        book = out[(reb[executed] + 1).tolist()]
        e_pre = book["equity"] + book["fees"] + book["slippage"]
        # the notional right after each trade is lambda sum|w| of the pre-trade equity, lambda <= cap
        np.testing.assert_allclose(book["gross_leverage"] * book["equity"], 2.0 * np.abs(w[executed]).sum(axis=1) * e_pre,
                                   rtol=1e-12)
        m = performance_metrics(out, periods_per_year=8760)
        assert 1.0 < m["avg_sizing_leverage"] <= 2.0 and m["avg_cash_fraction"] == 0.0

    def test_stops_still_close_sized_positions(self):
        r = self.r.copy()
        r[2, 0] = -0.3  # asset 0 falls 30% in bar 2: the 20% stop closes it there
        out = simulate(hourly(6), r, self.f, np.array([0, 3]), self.w, fee_bps=10, slippage_bps=5, lag_bars=1,
                       sizing=self.rule, predicted_cov=self.cov, stop_loss=0.2)
        assert out["stops"].to_list() == [0, 0, 1, 0, 0, 0]
        m0 = out["sizing_leverage"][1] * (1 - out["cash_fraction"][1])
        closed = 0.5 * m0 * 0.7  # the sized, drifted notional sold at the stop
        assert out["fees"][2] == pytest.approx(0.001 * closed, rel=1e-12)
        total = 1.0 + out["price_pnl"].sum() + out["funding_pnl"].sum() - out["fees"].sum() - out["slippage"].sum()
        assert abs(out["equity"][-1] - total) < 1e-12


class TestNoLookAhead:
    @pytest.mark.parametrize("lag", [0, 1, 2])
    def test_later_bars_and_covariances_do_not_change_a_decision(self, rng, lag):
        n, k = 24 * 8, 3
        r = rng.normal(0, 0.012, (n, k))
        reb = np.arange(23, n, 24)
        w = rng.dirichlet(np.ones(k), len(reb))
        cov = np.tile(np.diag([0.3, 0.5, 0.8]) ** 2, (len(reb), 1, 1))
        rule = SizingRule(target_vol=0.4, cash_buffer=True, cash_buffer_per_drawdown=4.0, cash_buffer_max=0.9)
        run = lambda r_, cov_: simulate(hourly(n), r_, np.zeros_like(r_), reb, w, sizing=rule, predicted_cov=cov_,
                                        lag_bars=lag)
        base = run(r, cov)
        j = 4
        decided = reb[j] - (1 if lag == 0 else 0)  # the last bar the decision may see
        r2, cov2 = r.copy(), cov.copy()
        r2[decided + 1:] = rng.normal(0, 0.05, r2[decided + 1:].shape)
        cov2[j + 1:] *= 9.0
        moved = run(r2, cov2)
        bars = reb[: j + 1] + lag
        for col in ("sizing_leverage", "cash_fraction"):
            assert base[col].to_numpy()[bars].tolist() == moved[col].to_numpy()[bars].tolist()
            assert base[col].to_numpy()[bars[-1] + 1 + 24:].tolist() != moved[col].to_numpy()[bars[-1] + 1 + 24:].tolist()
        # and the drawdown it used is the output's drawdown at that bar
        c = base["cash_fraction"][int(bars[-1])]
        dd = base["drawdown"][int(decided)] if decided >= 0 else 0.0
        vol = np.sqrt(w[j] @ cov[j] @ w[j])
        assert c == pytest.approx(min(0.9, 4.0 * -dd + 0.5 * max(0.0, vol / 0.4 - 1)), abs=1e-12)


class TestDefaultsUnchanged:
    def test_a_rule_with_multiplier_one_reproduces_the_unsized_path(self, rng):
        n, k = 24 * 5, 3
        r = rng.normal(0, 0.01, (n, k))
        f = rng.normal(0, 5e-5, (n, k))
        reb = np.arange(23, n, 24)
        w = rng.dirichlet(np.ones(k), len(reb))
        cov = np.tile(np.eye(k) * 1e-3, (len(reb), 1, 1))
        kw = dict(fee_bps=5, slippage_bps=2, stop_loss=0.02, cash_rate_per_bar=1e-6)
        plain = simulate(hourly(n), r, f, reb, w, **kw)
        assert plain["sizing_leverage"].to_list() == [1.0] * n and plain["cash_fraction"].to_list() == [0.0] * n
        for rule, c in ((SizingRule(), None), (SizingRule(target_vol=10.0, max_leverage=1.0), cov)):  # lambda = min(1, big)
            sized = simulate(hourly(n), r, f, reb, w, sizing=rule, predicted_cov=c, **kw)
            assert sized.equals(plain)

    def test_inputs_are_validated(self):
        r, w = np.zeros((4, 2)), np.full((1, 2), 0.5)
        with pytest.raises(DataError, match="no sizing rule"):
            simulate(hourly(4), r, r, np.array([0]), w, predicted_cov=np.zeros((1, 2, 2)))
        with pytest.raises(DataError, match=r"1 x 2 x 2"):
            simulate(hourly(4), r, r, np.array([0]), w, sizing=SizingRule(target_vol=0.2), predicted_cov=np.zeros((2, 2)))
        with pytest.raises(DataError, match="predicted covariance per rebalance"):
            simulate(hourly(4), r, r, np.array([0]), w, sizing=SizingRule(target_vol=0.2))
        cov = np.zeros((2, 2, 2))
        cov[1, 0, 1] = np.inf
        with pytest.raises(DataError, match=r"rebalance 1 \(asof bar 2\) is infinite"):
            simulate(hourly(4), r, r, np.array([0, 2]), np.full((2, 2), 0.5), sizing=SizingRule(target_vol=0.2),
                     predicted_cov=cov)

    def test_unknown_prediction_runs_unlevered(self):
        r, w = np.full((4, 2), 0.01), np.full((2, 2), 0.5)
        cov = np.stack([np.eye(2) * 1e-4, np.full((2, 2), np.nan)])  # asof 0: capped at 3; asof 2: unknown
        out = simulate(hourly(4), r, r * 0, np.array([0, 2]), w, sizing=SizingRule(target_vol=0.2), predicted_cov=cov)
        assert out["sizing_leverage"].to_list() == [1.0, 3.0, 3.0, 1.0]


@pytest.mark.parametrize("frequency", ["daily", "weekly", "hourly", "adaptive"])
def test_rebalance_plan_picks_the_covariance_of_each_traded_decision(frequency):
    """The equity asset runs the same plan over the K x N x N covariances as over the weights."""
    bars = np.arange(5, 200, 24)
    w = np.arange(len(bars) * 2, dtype=float).reshape(-1, 2)
    cov = w[:, :, None] * np.ones((1, 1, 2))  # row k holds w[k] in each column
    plan = dict(n_bars=200, frequency=frequency, turbulent=np.arange(len(bars)) % 3 == 1)
    reb_w, picked_w = rebalance_plan(bars, w, **plan)
    reb_c, picked_c = rebalance_plan(bars, cov, **plan)
    np.testing.assert_array_equal(reb_w, reb_c)
    np.testing.assert_array_equal(picked_c[:, :, 0], picked_w)


class TestSettings:
    def test_defaults_are_off(self):
        assert Settings().sizing_rule() is None

    def test_from_env(self):
        s = Settings.from_env({"PERPFOLIO_TARGET_VOL": "0.25", "PERPFOLIO_MAX_LEVERAGE": "2", "PERPFOLIO_CASH_BUFFER": "on",
                               "PERPFOLIO_CASH_BUFFER_BASE": "0.1", "PERPFOLIO_CASH_BUFFER_MAX": "0.4",
                               "PERPFOLIO_SIZING_ESTIMATOR": "sample"})
        assert s.sizing_rule() == SizingRule(target_vol=0.25, max_leverage=2.0, cash_buffer=True, cash_buffer_base=0.1,
                                             cash_buffer_max=0.4)
        assert s.sizing_estimator == "sample"
        assert Settings.from_env({"PERPFOLIO_TARGET_VOL": "off"}).sizing_rule() is None

    @pytest.mark.parametrize("env, match", [
        ({"PERPFOLIO_TARGET_VOL": "-0.1"}, "PERPFOLIO_TARGET_VOL must be"),
        ({"PERPFOLIO_MAX_LEVERAGE": "0"}, "PERPFOLIO_MAX_LEVERAGE must be"),
        ({"PERPFOLIO_CASH_BUFFER_MAX": "1"}, "PERPFOLIO_CASH_BUFFER_MAX"),
        ({"PERPFOLIO_CASH_BUFFER_BASE": "0.6"}, "PERPFOLIO_CASH_BUFFER_BASE"),
        ({"PERPFOLIO_CASH_BUFFER_PER_DRAWDOWN": "-1"}, "PERPFOLIO_CASH_BUFFER_PER_DRAWDOWN"),
        ({"PERPFOLIO_SIZING_ESTIMATOR": "garch"}, "PERPFOLIO_SIZING_ESTIMATOR"),
        ({"PERPFOLIO_CASH_BUFFER": "maybe"}, "PERPFOLIO_CASH_BUFFER="),
    ])
    def test_bad_values_name_the_setting(self, env, match):
        with pytest.raises(ConfigError, match=match):
            Settings.from_env(env)


@pytest.fixture(scope="module")
def sized_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sized")
    settings = Settings(start=datetime(2025, 1, 1).date(), end=datetime(2025, 1, 6).date(), window_bars=48,
                        warehouse=tmp / "warehouse.duckdb", reports_dir=tmp / "reports", stress_leverages=(1.0,),
                        baselines=("equal_weight",), target_vol=0.5, max_leverage=1.5, cash_buffer=True,
                        cash_buffer_base=0.05, cash_buffer_per_drawdown=2.0, cash_buffer_per_excess_vol=0.5,
                        cash_buffer_max=0.6)
    materialize(settings)
    return settings, read_tables(settings.warehouse)


class TestPipeline:
    def test_equity_reads_the_estimates_only_when_sizing_needs_them(self):
        def equity_deps(settings):
            graph = build_definitions(settings).resolve_asset_graph()
            return {k.to_user_string() for k in graph.get(dg.AssetKey(["backtest", "equity"])).parent_keys}

        assert "features/estimates" not in equity_deps(Settings())
        assert "features/estimates" not in equity_deps(Settings(cash_buffer=True, cash_buffer_per_excess_vol=0.0))
        assert "features/estimates" in equity_deps(Settings(target_vol=0.3))

    def test_stored_multipliers_follow_the_estimates_and_the_drawdown(self, sized_run):
        settings, tables = sized_run
        equity, weights = tables["backtest.equity"], tables["portfolio.weights"]
        assert equity["sizing_leverage"].max() <= 1.5 and equity["sizing_leverage"].min() > 0
        assert equity["cash_fraction"].max() <= 0.6
        book = equity.filter(pl.col("strategy") == "min_variance").sort("ts")
        asof = book["ts"][0]  # the path starts at the first traded asof and trades at the next bar
        w = weights.filter((pl.col("strategy") == "min_variance") & (pl.col("as_of") == asof)).sort("symbol")
        stamps, found, moments = estimators.moments_from_rows(tables["features.estimates"], estimator="ewma")
        k = int(np.searchsorted(stamps, estimators.to_datetime64([asof])[0]))
        assert found == w["symbol"].to_list()
        vol = np.sqrt(w["weight"].to_numpy() @ moments.cov[k] @ w["weight"].to_numpy())
        assert book["sizing_leverage"][1] == pytest.approx(min(1.5, 0.5 / vol), rel=1e-12)
        assert book["cash_fraction"][1] == pytest.approx(min(0.6, 0.05 + 0.5 * max(0.0, vol / 0.5 - 1)), rel=1e-12)
        total = (1.0 + book["price_pnl"].sum() + book["funding_pnl"].sum() + book["interest"].sum()
                 - book["fees"].sum() - book["slippage"].sum())
        assert abs(book["equity"][-1] - total) < 1e-9

    def test_metrics_report_the_average_sizing(self, sized_run):
        _, tables = sized_run
        metrics, equity = tables["backtest.metrics"], tables["backtest.equity"]
        means = equity.group_by("strategy").agg(pl.col("sizing_leverage").mean(), pl.col("cash_fraction").mean())
        joined = metrics.join(means, on="strategy")
        np.testing.assert_allclose(joined["avg_sizing_leverage"], joined["sizing_leverage"], rtol=1e-12)
        np.testing.assert_allclose(joined["avg_cash_fraction"], joined["cash_fraction"], rtol=1e-12)
        assert (joined["avg_sizing_leverage"] != 1.0).all() and (joined["avg_cash_fraction"] > 0).all()
