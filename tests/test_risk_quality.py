"""Risk-model quality (perpfolio.risk_quality, backtest.risk_model): hand-worked statistics, scipy's
distributions, simulations of a correct model, the held-bar alignment and the asset end to end."""

import math
from datetime import date, timedelta

import dagster as dg
import duckdb
import numpy as np
import polars as pl
import pytest
from scipy import stats

from assets import schemas
from assets.checks import check_frame
from assets.evaluation import RISK_MODEL, RISK_MODEL_SUMMARY
from perpfolio import report, risk_quality
from perpfolio.errors import ConfigError, DataError
from perpfolio.risk_quality import (
    bias_statistic, christoffersen_test, forecast_quality, held_decision, kupiec_test, predicted_vol, qlike,
    rank_estimators, realized_returns, robust_bias_band, transition_counts,
)
from pipelines.definitions import build_definitions
from pipelines.run import materialize_range
from pipelines.resources import as_utc
from pipelines.settings import Settings

PPY = 8760.0


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20251215)


def correct_model(rng, *, windows: int, bars: int = 24, n: int = 3):
    """Decisions every ``bars`` bars, each with its own covariance (annualized) and weights, and
    returns drawn from exactly that covariance (per bar) over the bars the target is held."""
    decision_bars = np.arange(windows) * bars
    n_bars = decision_bars[-1] + bars + 2
    a = rng.normal(size=(windows, n, n)) * rng.uniform(0.2, 1.5, size=(windows, 1, 1))
    cov = a @ a.transpose(0, 2, 1) + 0.1 * np.eye(n)  # annualized, a different level in every window
    weights = rng.dirichlet(np.ones(n), size=windows)
    k = held_decision(decision_bars, n_bars=n_bars)
    chol = np.linalg.cholesky(cov / PPY)
    returns = np.einsum("tij,tj->ti", chol[np.maximum(k, 0)], rng.normal(size=(n_bars, n)))
    returns[k < 0] = np.nan  # never read: no decision is held there
    return returns, weights, cov, decision_bars


class TestHeldBars:
    def test_windows_by_hand(self):
        # decisions at bars 2, 5, 9, executed at 3, 6, 10: held 4..6, 7..10, 11..12
        expected = [-1, -1, -1, -1, 0, 0, 0, 1, 1, 1, 1, 2, 2]
        assert held_decision(np.array([2, 5, 9]), n_bars=13).tolist() == expected
        # without the execution lag the asof bar is still excluded (the estimate saw its return)
        assert held_decision(np.array([2, 5]), n_bars=8, lag_bars=0).tolist() == [-1, -1, -1, 0, 0, 0, 1, 1]

    def test_no_look_ahead_the_asof_and_execution_bars_are_not_in_their_own_window(self):
        """A decision's estimate saw its asof bar and it trades at the close of the next bar: neither
        is in its window; both are held by the previous target (the old positions earn them)."""
        decision_bars = np.array([3, 10, 17])
        returns = np.full((24, 2), 0.001)
        returns[:, 1] = -0.002
        returns[decision_bars, 0] = 5.0  # asof bars
        returns[decision_bars + 1, 0] = 7.0  # execution bars
        weights = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
        got = realized_returns(returns, weights, np.ones(3), decision_bars)
        windows = {k: got.bar[got.decision == k].tolist() for k in range(3)}
        assert windows == {0: [5, 6, 7, 8, 9, 10, 11], 1: [12, 13, 14, 15, 16, 17, 18], 2: [19, 20, 21, 22, 23]}
        for k, a in enumerate(decision_bars):
            assert a not in windows[k] and a + 1 not in windows[k]
        ret = dict(zip(got.bar.tolist(), got.ret.tolist()))
        assert (ret[10], ret[11]) == (5.0, 7.0)  # decision 1's asof and execution bars: decision 0 holds symbol 0
        assert (ret[17], ret[18]) == (-0.002, -0.002)  # decision 2's: decision 1 holds only symbol 1
        np.testing.assert_allclose([ret[t] for t in range(5, 10)], 0.001)
        np.testing.assert_allclose([ret[t] for t in range(19, 24)], 0.5 * 0.001 - 0.5 * 0.002)

    def test_decisions_must_increase(self):
        with pytest.raises(DataError, match="strictly increasing"):
            held_decision(np.array([4, 4, 9]), n_bars=12)
        with pytest.raises(ConfigError, match="lag_bars"):
            held_decision(np.array([4]), n_bars=12, lag_bars=-1)


class TestPredictedVolAndUniverse:
    def test_by_hand_only_the_members_block_is_read(self):
        nan = np.nan
        cov = np.array([[[0.04, 0.01, nan], [0.01, 0.09, nan], [nan, nan, nan]]])  # SOL outside the universe
        sigma = predicted_vol(np.array([[0.5, 0.5, 0.0]]), cov, periods_per_year=PPY)
        # 0.25 * 0.04 + 2 * 0.25 * 0.01 + 0.25 * 0.09 = 0.0375 a year
        assert sigma[0] == pytest.approx(math.sqrt(0.0375 / 8760), rel=1e-12)

    def test_unknown_held_entry_is_nan_and_a_flat_book_is_zero(self):
        cov = np.array([[[0.04, np.nan], [np.nan, 0.09]], [[0.04, 0.0], [0.0, 0.09]]])
        sigma = predicted_vol(np.array([[0.5, 0.5], [0.0, 0.0]]), cov, periods_per_year=PPY)
        assert np.isnan(sigma[0]) and sigma[1] == 0.0

    def test_negative_variance_is_a_data_error(self):
        with pytest.raises(DataError, match="not PSD"):
            predicted_vol(np.array([[1.0, 1.0]]), np.array([[[0.01, -0.02], [-0.02, 0.01]]]), periods_per_year=PPY)

    def test_missing_returns_skip_a_bar_only_when_the_symbol_is_held(self):
        decision_bars = np.array([0, 4])
        returns = np.full((9, 2), 0.01)
        returns[3, 0] = np.nan  # held by decision 0 (weight on symbol 0): bar 3 skipped
        returns[6, 0] = np.nan  # decision 1 holds only symbol 1: bar 6 scored
        weights = np.array([[1.0, 0.0], [0.0, 1.0]])
        got = realized_returns(returns, weights, np.array([0.1, 0.1]), decision_bars)
        assert got.bar.tolist() == [2, 4, 5, 6, 7, 8]

    def test_windows_without_a_forecast_or_position_are_skipped_and_counted(self):
        decision_bars = np.array([0, 5, 10, 15])
        returns = np.tile([[0.01, -0.01], [-0.02, 0.02]], (11, 1))[:22]
        weights = np.array([[0.5, 0.5], [0.0, 0.0], [0.3, 0.7], [1.0, 0.0]])
        cov = np.tile(np.array([[0.5, 0.1], [0.1, 0.4]]), (4, 1, 1))
        cov[2] = np.nan  # no estimate at decision 2
        row = forecast_quality(returns, weights, cov, decision_bars, periods_per_year=PPY)
        assert (row["windows"], row["skipped_windows"]) == (2, 2)
        assert row["n_bars"] == 5 + 5  # decision 0: bars 2..6, decision 3: bars 17..21


class TestBiasStatistic:
    def test_small_case_by_hand(self):
        b, low, high = bias_statistic(np.array([1.0, -1.0, 2.0, 0.0]))
        # mean 0.5; squared deviations 0.25 + 2.25 + 2.25 + 0.25 = 5; ddof 1: 5 / 3
        assert b == pytest.approx(math.sqrt(5 / 3), rel=1e-12)
        half = stats.norm.ppf(0.975) * math.sqrt(1 / 8)
        assert (low, high) == pytest.approx((1 - half, 1 + half), rel=1e-12)
        assert all(math.isnan(v) for v in bias_statistic(np.array([0.3])))

    def test_a_correct_model_is_inside_the_band_95_percent_of_the_time(self, rng):
        reps, t = 2000, 1000
        z = rng.normal(size=(reps, t))
        inside = np.mean([low <= b <= high for b, low, high in map(bias_statistic, z)])
        assert abs(inside - 0.95) < 4 * math.sqrt(0.95 * 0.05 / reps)  # about 0.02
        # a forecast 10 % too low (b ~ 1.11, sd ~ 0.025) is caught nearly always at T = 1000 (band +- 0.044)
        caught = np.mean([not low <= b <= high for b, low, high in map(bias_statistic, z / 0.9)])
        assert caught > 0.98

    def test_robust_band_by_hand(self):
        z = np.array([1.0, -1.0, 2.0, 0.0])
        # deviations from 0.5: 0.5, -1.5, 1.5, -0.5; m2 = 5 / 4, m4 = (0.0625 + 5.0625 * 2 + 0.0625) / 4 = 2.5625
        kappa = 2.5625 / (5 / 4) ** 2
        half = stats.norm.ppf(0.975) * math.sqrt((kappa - 1) / 16)
        assert robust_bias_band(z) == pytest.approx((1 - half, 1 + half, kappa), rel=1e-12)
        assert kappa == pytest.approx(stats.kurtosis(z, fisher=False, bias=True), rel=1e-12)

    def test_fat_tails_break_the_normal_band_but_not_the_robust_one(self, rng):
        """Correct forecasts of jumpy returns (a normal mixture, 10 % of bars at 2.5 x the vol, unit
        variance, kurtosis about 6.2): the normal band rejects about a quarter of them."""
        reps, t = 2000, 3000
        scale = np.where(rng.random((reps, t)) < 0.1, 2.5, 1.0) / math.sqrt(0.9 + 0.1 * 2.5**2)
        z = rng.normal(size=(reps, t)) * scale
        normal, robust = [], []
        for row in z:
            b, low, high = bias_statistic(row)
            robust_low, robust_high, _ = robust_bias_band(row)
            normal.append(low <= b <= high)
            robust.append(robust_low <= b <= robust_high)
        assert np.mean(normal) < 0.85
        assert abs(np.mean(robust) - 0.95) < 4 * math.sqrt(0.95 * 0.05 / reps)  # about 0.02

    def test_correct_model_end_to_end_through_the_covariances(self, rng):
        """The whole path (annualized covariance, weights, held bars) on returns drawn from the
        forecast itself: b near 1, inside the band, VaR exceedances as expected."""
        returns, weights, cov, decision_bars = correct_model(rng, windows=400)
        row = forecast_quality(returns, weights, cov, decision_bars, periods_per_year=PPY)
        assert row["n_bars"] == 400 * 24
        assert row["bias_in_band"] is True and abs(row["bias"] - 1) < 0.02
        for tag, p in (("var95", 0.05), ("var99", 0.01)):
            n = row["n_bars"]
            assert abs(row[f"{tag}_exceedances"] - p * n) < 4 * math.sqrt(n * p * (1 - p))
        assert row["qlike"] < 0.1  # only the noise of a 24-bar variance proxy (about 1/24)
        # the same returns judged by a forecast of half the variance: under-predicted by sqrt(2)
        low = forecast_quality(returns, weights, cov / 2, decision_bars, periods_per_year=PPY)
        assert low["bias"] == pytest.approx(math.sqrt(2) * row["bias"], rel=1e-9)
        assert low["bias_in_band"] is False and low["qlike"] > row["qlike"]
        assert low["var99_kupiec_p"] < 1e-6

    def test_qlike_by_hand(self):
        realized = risk_quality.Realized(bar=np.arange(4), decision=np.array([0, 0, 1, 1]),
                                         ret=np.array([0.02, -0.04, 0.01, 0.01]), sigma=np.array([0.02, 0.02, 0.02, 0.02]))
        # window 0: v = (0.0004 + 0.0016) / 2 = 0.001 -> ratio 2.5; window 1: v = 0.0001 -> ratio 0.25
        expected = ((2.5 - math.log(2.5) - 1) + (0.25 - math.log(0.25) - 1)) / 2
        assert qlike(realized) == pytest.approx(expected, rel=1e-12)


class TestCoverageTests:
    def test_kupiec_against_the_binomial_likelihood_and_scipy(self):
        x, n, p = 8, 250, 0.01
        # LR_uc = 2 [log L(x / n) - log L(p)], the binomial coefficient cancels
        lr = 2 * (stats.binom.logpmf(x, n, x / n) - stats.binom.logpmf(x, n, p))
        got_lr, got_p = kupiec_test(x, n, p=p)
        assert got_lr == pytest.approx(lr, rel=1e-10)
        assert got_p == pytest.approx(stats.chi2.sf(lr, 1), rel=1e-10)
        assert got_p < 0.05  # 8 breaches of a 99 % VaR in 250 days (2.5 expected) reject
        lr0 = -2 * 250 * math.log(0.99)  # no exceedance at all: only the restricted term
        assert kupiec_test(0, 250, p=0.01) == pytest.approx((lr0, stats.chi2.sf(lr0, 1)), rel=1e-10)
        assert kupiec_test(0, 0, p=0.01) == (pytest.approx(math.nan, nan_ok=True),) * 2

    def test_christoffersen_with_hand_counted_transitions(self):
        hits = np.array([0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 1, 0], dtype=bool)
        # pairs: 00 01 11 10 00 00 01 10 00 01 10 -> n00 = 4, n01 = 3, n10 = 3, n11 = 1
        assert transition_counts(hits) == (4, 3, 3, 1)
        pi01, pi11, pi = 3 / 7, 1 / 4, 4 / 11
        restricted = 7 * math.log(1 - pi) + 4 * math.log(pi)
        free = 4 * math.log(1 - pi01) + 3 * math.log(pi01) + 3 * math.log(1 - pi11) + 1 * math.log(pi11)
        lr = -2 * restricted + 2 * free
        got_lr, got_p = christoffersen_test(hits)
        assert got_lr == pytest.approx(lr, rel=1e-12)
        assert got_p == pytest.approx(stats.chi2.sf(lr, 1), rel=1e-12)

    def test_transitions_only_between_adjacent_bars(self):
        hits = np.array([1, 1, 0, 1, 1], dtype=bool)
        assert transition_counts(hits) == (0, 1, 1, 2)
        # bars 0, 1, 5, 6, 9: only (0, 1): 1 -> 1 and (5, 6): 0 -> 1 are adjacent
        assert transition_counts(hits, np.array([0, 1, 5, 6, 9])) == (0, 1, 0, 1)

    def test_clustered_exceedances_fail_independence_and_conditional_coverage(self):
        hits = np.zeros(1000, dtype=bool)
        hits[[100, 101, 102, 103, 104, 500, 501, 502, 503, 504]] = True  # 1 % overall, in two bursts
        realized = risk_quality.Realized(bar=np.arange(1000), decision=np.zeros(1000, dtype=int),
                                         ret=np.where(hits, -3.0, 0.1), sigma=np.ones(1000))
        got = risk_quality.var_coverage(realized, confidence=0.99)
        assert got["var99_exceedances"] == 10 and got["var99_expected"] == pytest.approx(10.0)
        assert got["var99_kupiec_p"] == pytest.approx(1.0)  # the count is exactly right...
        assert got["var99_independence_p"] < 1e-6  # ...but they cluster
        lr_ind = christoffersen_test(hits)[0]
        assert got["var99_cc_p"] == pytest.approx(stats.chi2.sf(kupiec_test(10, 1000, p=0.01)[0] + lr_ind, 2), rel=1e-10)

    def test_chi2_tails_match_scipy(self):
        for x in (0.0, 0.5, 3.841458820694124, 12.0):
            assert risk_quality.chi2_sf(x, dof=1) == pytest.approx(stats.chi2.sf(x, 1), rel=1e-12)
            assert risk_quality.chi2_sf(x, dof=2) == pytest.approx(stats.chi2.sf(x, 2), rel=1e-12)

    def test_size_of_the_tests_under_a_correct_model(self, rng):
        """Over many correct models (4,800 bars each, about the default run) the VaR tests reject at
        about their 5 % size (300 runs: standard error 0.013), never much more. The 99 % independence
        test is conservative (0-3 %): about 0.5 1 -> 1 transitions are expected, too few for its chi2
        approximation; likewise, with 1,000 bars the 95 % one is oversized (6-11 %)."""
        rejections = []
        for _ in range(300):
            returns, weights, cov, decision_bars = correct_model(rng, windows=200, n=2)
            row = forecast_quality(returns, weights, cov, decision_bars, periods_per_year=PPY)
            rejections.append([row[f"{tag}_{test}_p"] < 0.05 for tag in ("var95", "var99")
                               for test in ("kupiec", "independence", "cc")])
        rates = np.mean(rejections, axis=0)
        assert (rates < 0.095).all(), rates
        assert (np.delete(rates, 4) > 0.015).all(), rates  # all but the 99 % independence test


class TestRanking:
    def test_rank_by_mean_qlike_with_counts(self):
        table = pl.DataFrame({
            "estimator": ["a", "a", "b", "b", "c"], "strategy": ["x", "y", "x", "y", "x"],
            "bias": [1.2, 0.9, 1.0, None, 1.05], "bias_in_band": [False, True, True, None, True],
            "bias_in_robust_band": [True, True, True, None, True],
            "qlike": [0.5, 0.3, 0.2, None, 0.2],
            "var95_cc_p": [0.01, 0.2, 0.5, None, 0.04], "var99_cc_p": [0.3, 0.3, 0.01, None, 0.5],
        })
        out = rank_estimators(table)
        # b and c tie on QLIKE 0.2; b's |1.0 - 1| = 0 beats c's 0.05; a: (0.5 + 0.3) / 2 = 0.4
        assert out["estimator"].to_list() == ["b", "c", "a"] and out["rank"].to_list() == [1, 2, 3]
        a = out.row(2, named=True)
        assert a["books"] == 2 and a["mean_qlike"] == pytest.approx(0.4)
        assert a["mean_abs_bias_error"] == pytest.approx((0.2 + 0.1) / 2) and a["mean_bias"] == pytest.approx(1.05)
        assert (a["books_in_band"], a["books_in_robust_band"], a["books_var95_pass"], a["books_var99_pass"]) == (1, 2, 1, 2)
        b = out.row(0, named=True)
        assert (b["books"], b["books_var95_pass"], b["books_var99_pass"]) == (1, 1, 0)  # its null row is not a book


def test_plot_is_a_png():
    table = pl.DataFrame({"estimator": ["a", "b"], "strategy": ["x", "x"], "bias": [1.1, 0.95], "bias_lower": [0.97, 0.97],
                          "bias_upper": [1.03, 1.03], "bias_lower_robust": [0.9, 0.92], "bias_upper_robust": [1.1, 1.08],
                          "var95_cc_p": [0.2, 0.01], "var99_cc_p": [0.3, None]})
    assert report.plot_risk_model_bias(table, order=["b", "a"]).startswith(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(DataError, match="no row has a bias"):
        report.plot_risk_model_bias(table.with_columns(bias=pl.lit(None, pl.Float64)))


def loop_bias(tables: dict[str, pl.DataFrame], estimator: str, book: str) -> tuple[int, float, int]:
    """(bars, bias, 95 % VaR exceedances) from the stored rows, one asof and one bar at a time; a
    baseline's weights written out from the universe column (equal weight, or all in BTC)."""
    traded = tables["portfolio.weights"].filter(~pl.col("status").str.contains("insufficient_history"))
    asofs = sorted(traded["as_of"].unique())
    returns = tables["features.net_returns"]
    cov = tables["features.estimates_long"].filter((pl.col("estimator") == estimator) & (pl.col("quantity") == "cov"))
    z = []
    for k, asof in enumerate(asofs):
        rows = traded.filter(pl.col("as_of") == asof)
        members = set(rows.filter(pl.col("universe") == "in")["symbol"])
        if book == "baseline:equal_weight":
            w = {s: 1 / len(members) for s in members}
        elif book == "baseline:btc_only":
            w = {"BTCUSDT": 1.0} if "BTCUSDT" in members else {}
        else:
            w = dict(rows.filter(pl.col("strategy") == book).select("symbol", "weight").iter_rows())
        held = [s for s, v in w.items() if v != 0]
        if not held:
            continue
        at = cov.filter(pl.col("as_of") == asof)
        cell = {(i, j): v for i, j, v in at.select("symbol", "symbol_j", "value").iter_rows()}
        sigma = math.sqrt(sum(w[i] * w[j] * cell[i, j] for i in held for j in held) / 8760)
        first = asof + timedelta(hours=2)
        last = asofs[k + 1] + timedelta(hours=1) if k + 1 < len(asofs) else returns["ts"].max()
        window = returns.filter(pl.col("ts").is_between(first, last) & pl.col("symbol").is_in(held))
        for _, bar in window.group_by("ts"):
            if bar.height == len(held) and not bar["filled"].any():
                z.append(sum(w[s] * r for s, r in bar.select("symbol", "net_return").iter_rows()) / sigma)
    z = np.array(z)
    return len(z), float(np.std(z, ddof=1)), int((z < stats.norm.ppf(0.05)).sum())


@pytest.mark.slow
def test_asset_end_to_end_agrees_with_a_plain_loop_over_the_stored_tables(tmp_path):
    settings = Settings(start=date(2025, 1, 1), end=date(2025, 1, 6), window_bars=48, warehouse=tmp_path / "w.duckdb",
                        reports_dir=tmp_path / "reports", stress_leverages=(1.0,), baselines=("equal_weight", "btc_only"))
    defs = build_definitions(settings)
    with dg.DagsterInstance.ephemeral() as instance:
        materialize_range(defs, settings.start, settings.end, instance, evaluate=False)
        result = dg.materialize(list(defs.assets), selection=[RISK_MODEL, RISK_MODEL_SUMMARY], resources=defs.resources,
                                instance=instance)
        assert result.success
    names = ("features.net_returns", "features.estimates", "features.estimates_long", "portfolio.weights", "backtest.risk_model",
             "backtest.risk_model_summary")
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        tables = {name: as_utc(con.sql(f"SELECT * FROM {name}").pl()) for name in names}
    table, summary = tables["backtest.risk_model"], tables["backtest.risk_model_summary"]
    estimators = set(tables["features.estimates"]["estimator"])
    books = set(tables["portfolio.weights"]["strategy"]) | {"baseline:equal_weight", "baseline:btc_only"}
    assert table.height == len(estimators) * len(books) and set(table["strategy"]) == books
    assert check_frame(table, schemas.RiskModel, RISK_MODEL).passed
    assert check_frame(summary, schemas.RiskModelSummary, RISK_MODEL_SUMMARY).passed
    assert set(summary["estimator"]) == estimators and sorted(summary["rank"]) == list(range(1, len(estimators) + 1))
    for estimator, book in (("ewma", "min_variance"), ("sample", "baseline:equal_weight"), ("factor", "baseline:btc_only")):
        row = table.filter((pl.col("estimator") == estimator) & (pl.col("strategy") == book)).row(0, named=True)
        n, bias, exceedances = loop_bias(tables, estimator, book)
        assert (row["n_bars"], row["var95_exceedances"]) == (n, exceedances)
        assert row["bias"] == pytest.approx(bias, rel=1e-9)
        assert row["skipped_windows"] == 1  # the latest decision has no held bar yet
