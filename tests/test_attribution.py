"""Risk contributions, return attribution and break-even cost (perpfolio.attribution, assets/attribution.py),
each checked against an independent computation: numpy by hand, finite differences, closed forms."""

from datetime import date, datetime, timezone
from functools import partial

import dagster as dg
import duckdb
import numpy as np
import polars as pl
import pytest

from assets import schemas
from assets.checks import check_frame
from assets.evaluation import ATTRIBUTION, BREAK_EVEN, CONTRIBUTIONS, EQUITY, METRICS
from perpfolio import report
from perpfolio.attribution import (
    CASH, break_even_cost, contributions_frame, euler_contributions, return_at_cost, return_attribution, split_cost,
)
from perpfolio.backtest import performance_metrics, simulate
from perpfolio.errors import DataError
from pipelines.definitions import build_definitions
from pipelines.run import materialize_range
from pipelines.resources import as_utc
from pipelines.settings import Settings


def hourly(n: int) -> np.ndarray:
    return np.datetime64("2025-01-01T00", "us") + np.arange(n) * np.timedelta64(1, "h")


def random_covariances(rng, k: int, n: int) -> np.ndarray:
    a = rng.normal(0, 0.3, (k, n, n + 2))
    return a @ a.transpose(0, 2, 1)  # K x N x N, positive definite


class TestEulerContributions:
    def test_contributions_sum_to_the_book_variance(self, rng):
        cov = random_covariances(rng, 6, 4)
        w = rng.normal(0, 0.6, (6, 4))  # long-short
        risk = euler_contributions(weights=w, cov=cov)
        by_hand = np.array([wk @ s @ wk for wk, s in zip(w, cov)])
        np.testing.assert_allclose(risk.variance, by_hand, rtol=1e-13)
        np.testing.assert_allclose(risk.contribution.sum(axis=1), by_hand, rtol=1e-13)

    def test_marginal_vol_is_the_derivative_of_book_vol(self, rng):
        cov = random_covariances(rng, 1, 5)[0]
        w = rng.normal(0, 0.5, 5)
        risk = euler_contributions(weights=w[None], cov=cov[None])
        vol = lambda v: np.sqrt(v @ cov @ v)  # noqa: E731
        h = 1e-6
        numeric = np.array([(vol(w + h * e) - vol(w - h * e)) / (2 * h) for e in np.eye(5)])
        np.testing.assert_allclose(risk.marginal[0], numeric, rtol=1e-7)
        # Euler / homogeneity: sigma(lambda w) = lambda sigma(w), so sum_i w_i dsigma/dw_i = sigma
        assert (w * numeric).sum() == pytest.approx(vol(w), rel=1e-8)
        assert vol(3.0 * w) == pytest.approx(3.0 * vol(w), rel=1e-13)

    def test_flat_book_has_no_share_and_no_marginal(self, rng):
        cov = random_covariances(rng, 2, 3)
        w = np.array([[0.0, 0.0, 0.0], [0.2, 0.5, 0.3]])
        members = np.array([[True, True, False], [True, True, True]])
        asofs = [np.datetime64("2025-01-02T23", "us").astype(object), np.datetime64("2025-01-03T23", "us").astype(object)]
        frame = contributions_frame(asofs=asofs, symbols=["A", "B", "C"], weights=w, cov=cov, members=members,
                                    book="b", estimator="sample")
        flat = frame.filter(pl.col("as_of") == frame["as_of"].min())
        assert flat["symbol"].to_list() == ["A", "B"]  # C is neither a member nor held
        assert flat["share"].null_count() == 2 and flat["marginal_vol"].null_count() == 2
        assert flat["book_vol"].to_list() == [0.0, 0.0]
        held = frame.filter(pl.col("as_of") == frame["as_of"].max())
        assert held["share"].sum() == pytest.approx(1.0, abs=1e-14)
        assert held["book_vol"][0] == pytest.approx(np.sqrt(w[1] @ cov[1] @ w[1]), rel=1e-14)
        assert check_frame(schemas.conform(frame, schemas.RiskContributions), schemas.RiskContributions,
                           CONTRIBUTIONS).passed

    def test_non_finite_covariance_is_refused(self, rng):
        cov = random_covariances(rng, 1, 2)
        cov[0, 0, 1] = np.nan
        with pytest.raises(DataError, match="finite"):
            euler_contributions(weights=np.ones((1, 2)), cov=cov)


class TestPerSymbolSplit:
    def test_one_trade_by_hand(self):
        """Two symbols, a decision at bar 0 executed at the close of bar 1 (from flat, equity 1):
        long 0.6 of A, short 0.4 of B, fee 10 bps + slippage 5 bps; then one bar of returns."""
        r = np.array([[0.01, 0.02], [-0.01, 0.03], [0.05, 0.10]])
        f = np.array([[0.0, 0.0], [0.0, 0.0], [-0.001, 0.002]])
        path, per = simulate(hourly(3), r, f, np.array([0]), np.array([[0.6, -0.4]]), fee_bps=10, slippage_bps=5,
                             lag_bars=1, symbols=["A", "B"], by_symbol=True)
        rows = {row["symbol"]: row for row in per.iter_rows(named=True)}
        assert rows["A"]["price_pnl"] == pytest.approx(0.6 * 0.05, abs=1e-16)
        assert rows["B"]["price_pnl"] == pytest.approx(-0.4 * 0.10, abs=1e-16)
        assert rows["A"]["funding_pnl"] == pytest.approx(0.6 * -0.001, abs=1e-16)
        assert rows["B"]["funding_pnl"] == pytest.approx(-0.4 * 0.002, abs=1e-16)
        assert rows["A"]["fees"] == pytest.approx(0.6 * 10e-4, abs=1e-16)
        assert rows["B"]["fees"] == pytest.approx(0.4 * 10e-4, abs=1e-16)
        assert rows["A"]["slippage"] == pytest.approx(0.6 * 5e-4, abs=1e-16)
        assert rows["B"]["slippage"] == pytest.approx(0.4 * 5e-4, abs=1e-16)
        table = return_attribution(path, per)
        assert table["symbol"].to_list() == ["A", "B", CASH]
        expected = 0.6 * 0.05 - 0.4 * 0.10 - 0.6 * 0.001 - 0.4 * 0.002 - (0.6 + 0.4) * 15e-4
        assert table["ret_total"].sum() == pytest.approx(expected, abs=1e-15)
        assert path["equity"][-1] - 1.0 == pytest.approx(expected, abs=1e-15)

    def test_stop_and_delisting_closes_are_charged_to_their_symbol(self):
        """One execution at bar 1 (equal weights 0.5, fee 10 + slippage 5 bps). A falls 3% twice: its
        cumulative -5.91% hits the 5% stop at bar 3, closing 0.5 x 0.97^2. B's last bar is bar 4 (two
        bars before the end, delisted_after=2): closed at 0.5 x 1.02 x 1.01 x 1.03."""
        nan = np.nan
        r = np.array([[0.0, 0.0], [0.0, 0.0], [-0.03, 0.02], [-0.03, 0.01], [0.02, 0.03], [0.01, nan], [0.01, nan]])
        f = np.array([[0.0, 0.0], [0.0, 0.0], [-0.001, 0.0005], [0.0, 0.0], [0.0, 0.0], [0.0, nan], [0.0, nan]])
        path, per = simulate(hourly(7), r, f, np.array([0]), np.array([[0.5, 0.5]]), fee_bps=10, slippage_bps=5,
                             lag_bars=1, symbols=["A", "B"], stop_loss=0.05, delisted_after=2, by_symbol=True)
        assert path["stops"].sum() == 1 and path["delisting_closes"].sum() == 1
        a, b = per.row(0, named=True), per.row(1, named=True)
        a_closed, b_closed = 0.5 * 0.97 * 0.97, 0.5 * 1.02 * 1.01 * 1.03
        assert a["price_pnl"] == pytest.approx(0.5 * -0.03 + 0.5 * 0.97 * -0.03, abs=1e-15)
        assert b["price_pnl"] == pytest.approx(0.5 * 0.02 + 0.5 * 1.02 * 0.01 + 0.5 * 1.02 * 1.01 * 0.03, abs=1e-15)
        assert a["funding_pnl"] == pytest.approx(0.5 * -0.001, abs=1e-16)
        assert b["funding_pnl"] == pytest.approx(0.5 * 0.0005, abs=1e-16)
        assert a["fees"] == pytest.approx((0.5 + a_closed) * 10e-4, abs=1e-16)
        assert b["fees"] == pytest.approx((0.5 + b_closed) * 10e-4, abs=1e-16)
        assert a["slippage"] == pytest.approx((0.5 + a_closed) * 5e-4, abs=1e-16)
        assert b["slippage"] == pytest.approx((0.5 + b_closed) * 5e-4, abs=1e-16)

    def test_default_call_returns_the_same_frame(self, rng):
        r, f = rng.normal(0, 0.01, (96, 3)), rng.normal(0, 1e-4, (96, 3))
        w = rng.dirichlet(np.ones(3), 4)
        plain = simulate(hourly(96), r, f, np.arange(0, 96, 24), w)
        split, _ = simulate(hourly(96), r, f, np.arange(0, 96, 24), w, by_symbol=True)
        assert plain.equals(split)


class TestAttributionIdentities:
    """Long-short weights, a stop-loss, a delisting, an outage, scaled slippage and a cash rate: the
    attribution adds up to simulate's totals and to performance_metrics' attribution."""

    @pytest.fixture
    def run(self, rng):
        n, k = 24 * 12, 4
        r = rng.normal(0, 0.015, (n, k))
        f = rng.normal(0, 1e-4, (n, k))
        r[150:, 2] = f[150:, 2] = np.nan  # delisted after bar 149
        r[140:150, 2] = 0.0005  # calm before it, so the stop does not close it first
        r[60:64, 1] = f[60:64, 1] = np.nan  # a four-bar outage
        reb = np.arange(23, n, 24)
        w = rng.dirichlet(np.ones(k), len(reb)) * rng.choice([-1.0, 1.0], (len(reb), k)) * 1.5
        w[:, 2] = np.abs(w[:, 2]) + 0.1  # held through its delisting
        scale = rng.uniform(0.5, 2.0, w.shape)
        return simulate(hourly(n), r, f, reb, w, fee_bps=4, slippage_bps=3, symbols=list("ABCD"), stop_loss=0.02,
                        slippage_scale=scale, cash_rate_per_bar=0.05 / 8760, by_symbol=True)

    def test_per_symbol_columns_sum_to_the_path(self, run):
        path, per = run
        assert path["stops"].sum() > 0 and path["delisting_closes"].sum() > 0
        for column in ("price_pnl", "funding_pnl", "fees", "slippage"):
            assert per[column].sum() == pytest.approx(path[column].sum(), rel=1e-12, abs=1e-15), column

    def test_table_matches_performance_metrics(self, run):
        path, per = run
        table = return_attribution(path, per)
        metrics = performance_metrics(path, periods_per_year=8760)
        for column in ("ret_price", "ret_funding", "ret_costs", "ret_interest"):
            assert table[column].sum() == pytest.approx(metrics[column], rel=1e-12), column
        assert table["ret_total"].sum() == pytest.approx(metrics["total_return"], rel=1e-12)
        assert metrics["ret_interest"] > 0 and table.filter(pl.col("symbol") == CASH)["ret_price"][0] == 0.0
        frame = table.with_columns(strategy=pl.lit("x"))
        assert check_frame(schemas.conform(frame, schemas.Attribution), schemas.Attribution, ATTRIBUTION).passed


class TestBreakEven:
    def test_split_keeps_the_configured_ratio_and_is_exact_at_the_configured_cost(self):
        assert split_cost(7.0, fee_bps=5.0, slippage_bps=2.0) == (5.0, 2.0)
        assert split_cost(14.0, fee_bps=5.0, slippage_bps=2.0) == (10.0, 4.0)
        assert split_cost(3.0, fee_bps=0.0, slippage_bps=0.0) == (3.0, 0.0)

    @pytest.fixture
    def two_books(self, rng):
        """Two books that trade once, from flat at equity 1: their total return is linear in the cost c
        (a fraction per side), R = R_gross - c * G with G = sum |w| the notional traded."""
        n = 48
        r = np.column_stack([0.001 + rng.normal(0, 0.004, n), -0.0002 + rng.normal(0, 0.004, n)])
        f = rng.normal(0, 5e-5, (n, 2))
        w_busy, w_calm = np.array([1.0, -0.5]), np.array([0.5, 0.5])

        def gross(w):  # by hand: the positions after the trade at bar 1 drift with the price from bar 2 on
            drift = np.vstack([np.ones(2), np.cumprod(1 + r[2:-1], axis=0)])
            return float(w @ (drift * (r[2:] + f[2:])).sum(axis=0))

        def book(w):  # fee : slippage = 3 : 2 of the cost per side
            return return_at_cost(partial(simulate, hourly(n), r, f, np.array([0]), w[None]), fee_bps=3.0, slippage_bps=2.0)

        return (w_busy, gross(w_busy), book(w_busy)), (w_calm, gross(w_calm), book(w_calm))

    def test_break_even_is_the_gross_gap_over_the_turnover_gap(self, two_books):
        (w_a, gross_a, book_a), (w_b, gross_b, book_b) = two_books
        assert book_a(0.0) == pytest.approx(gross_a, abs=1e-14)
        expected = 1e4 * (gross_a - gross_b) / (np.abs(w_a).sum() - np.abs(w_b).sum())
        assert 0 < expected < 1000
        found = break_even_cost(book=book_a, reference=book_b)
        assert found.status == "beats_below" and found.cost_bps == pytest.approx(expected, abs=1e-5)
        assert found.gap_at_zero == pytest.approx(gross_a - gross_b, abs=1e-14)
        # the calm book trails below that cost and leads above it
        flipped = break_even_cost(book=book_b, reference=book_a)
        assert flipped.status == "beats_above" and flipped.cost_bps == pytest.approx(expected, abs=1e-5)

    def test_since_measures_the_return_from_that_bar_on(self):
        ts = [datetime(2025, 1, 1, h, tzinfo=timezone.utc) for h in range(4)]
        equity = [1.01, 1.03, 0.99, 1.05]
        path = pl.DataFrame({"ts": ts, "equity": equity, "pnl": np.diff([1.0] + equity)})
        run = lambda fee_bps, slippage_bps: path  # noqa: E731 - a book whose path does not depend on costs
        whole = return_at_cost(run, fee_bps=5.0, slippage_bps=2.0)(7.0)
        later = return_at_cost(run, fee_bps=5.0, slippage_bps=2.0, since=ts[2])(7.0)
        assert whole == pytest.approx(0.05, rel=1e-12)
        assert later == pytest.approx(1.05 / 1.03 - 1.0, rel=1e-12)  # the base is the equity before the first bar kept

    def test_no_crossing_gives_no_cost_and_says_why(self):
        behind = break_even_cost(book=lambda c: 0.01 - 1e-5 * c, reference=lambda c: 0.02 - 1e-5 * c)
        ahead = break_even_cost(book=lambda c: 0.03 - 1e-5 * c, reference=lambda c: 0.02 - 1e-5 * c)
        level = break_even_cost(book=lambda c: 0.02, reference=lambda c: 0.02)
        assert (behind.cost_bps, behind.status) == (None, "never_beats")
        assert (ahead.cost_bps, ahead.status) == (None, "beats_throughout")
        assert (level.cost_bps, level.status) == (None, "never_beats")  # level is not ahead
        capped = break_even_cost(book=lambda c: 0.05 - 1e-4 * c, reference=lambda c: 0.0, max_cost_bps=100.0)
        assert (capped.cost_bps, capped.status) == (None, "beats_throughout")  # the root, 500 bps, lies beyond

    def test_the_lowest_crossing_is_reported(self):
        found = break_even_cost(book=lambda c: (c - 3.0) * (c - 30.0) / 1e3, reference=lambda c: 0.0)
        assert found.status == "beats_below" and found.cost_bps == pytest.approx(3.0, abs=1e-6)


class TestPlots:
    def test_both_plots_render(self, rng):
        attribution = pl.DataFrame({"strategy": ["a", "a", "b"], "symbol": ["X", CASH, "X"],
                                    "ret_price": [0.1, 0.0, -0.05], "ret_funding": [-0.01, 0.0, 0.02],
                                    "ret_costs": [-0.003, 0.0, -0.001], "ret_interest": [0.0, 0.004, 0.0]})
        cov = random_covariances(rng, 1, 2)
        asofs = [np.datetime64("2025-01-03T23", "us").astype(object)]
        contributions = pl.concat([contributions_frame(asofs=asofs, symbols=["X", "Y"], weights=w, cov=cov,
                                                       members=np.ones((1, 2), bool), book=name, estimator="sample")
                                   for name, w in (("a", np.array([[0.5, 0.5]])), ("b", np.array([[1.2, -0.4]])))])
        for png in (report.plot_return_attribution(attribution), report.plot_risk_contributions(contributions)):
            assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_the_simulations_read_the_estimates_only_when_the_sizing_needs_them():
    def deps(settings, key):
        return {k.to_user_string() for k in build_definitions(settings).resolve_asset_graph().get(key).parent_keys}

    for key in (ATTRIBUTION, BREAK_EVEN):
        assert "features/estimates" not in deps(Settings(), key)
        assert "features/estimates" in deps(Settings(target_vol=0.3), key)  # as backtest.equity: the same simulation
    assert "features/estimates" in deps(Settings(), CONTRIBUTIONS)


@pytest.mark.slow
def test_assets_end_to_end(tmp_path):
    """Walk forward five synthetic days (one-day window, stop-loss and a cash rate on), then materialize
    backtest.equity / metrics and the three assets: each table passes its schema, the attribution adds up
    to backtest.metrics, the contributions equal w_i (Σw)_i recomputed from features.estimates."""
    settings = Settings(start=date(2025, 1, 1), end=date(2025, 1, 5), window_bars=24, warehouse=tmp_path / "w.duckdb",
                        reports_dir=tmp_path / "reports", stress_leverages=(1.0,), stop_loss=0.02, cash_rate=0.05)
    defs = build_definitions(settings)
    with dg.DagsterInstance.ephemeral() as instance:
        materialize_range(defs, settings.start, settings.end, instance, evaluate=False)
        job = defs.resolve_implicit_global_asset_job_def()
        assert job.execute_in_process(instance=instance, asset_selection=[EQUITY, METRICS, CONTRIBUTIONS, ATTRIBUTION,
                                                                          BREAK_EVEN]).success
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        read = lambda name: as_utc(con.sql(f"SELECT * FROM {name}").pl())  # noqa: E731
        metrics, attribution, even = read("backtest.metrics"), read("backtest.attribution"), read("backtest.break_even")
        contributions, weights, estimates = read("risk.contributions"), read("portfolio.weights"), read("features.estimates_long")
    for frame, model, key in ((attribution, schemas.Attribution, ATTRIBUTION), (even, schemas.BreakEven, BREAK_EVEN),
                              (contributions, schemas.RiskContributions, CONTRIBUTIONS)):
        assert frame.height and check_frame(schemas.conform(frame, model), model, key).passed

    sums = attribution.group_by("strategy").agg(pl.col("ret_price", "ret_funding", "ret_costs", "ret_interest",
                                                       "ret_total").sum())
    joined = sums.join(metrics, on="strategy", suffix="_m")
    assert joined.height == metrics.height
    for column in ("ret_price", "ret_funding", "ret_costs", "ret_interest"):
        np.testing.assert_allclose(joined[column], joined[f"{column}_m"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(joined["ret_total"], joined["total_return"], rtol=1e-12, atol=1e-15)
    on_metrics = even.join(metrics, on="strategy", suffix="_m")
    np.testing.assert_allclose(on_metrics["total_return"], on_metrics["total_return_m"], rtol=1e-12)
    assert even.filter(pl.col("strategy") == "baseline:equal_weight")["status"].to_list() == ["reference"]

    # one book, its latest asof, by hand from the covariance as the long view shows it
    book = contributions.filter(pl.col("strategy") == "min_variance")
    latest = book.filter(pl.col("as_of") == book["as_of"].max()).sort("symbol")
    symbols = latest["symbol"].to_list()
    cov_rows = estimates.filter((pl.col("estimator") == latest["estimator"][0]) & (pl.col("quantity") == "cov")
                                & (pl.col("as_of") == latest["as_of"][0]))
    cov = (cov_rows.pivot(on="symbol_j", index="symbol", values="value").sort("symbol").select(symbols).to_numpy())
    w = (weights.filter((pl.col("strategy") == "min_variance") & (pl.col("as_of") == latest["as_of"][0]))
         .sort("symbol").filter(pl.col("symbol").is_in(symbols))["weight"].to_numpy())
    np.testing.assert_allclose(latest["variance_contribution"], w * (cov @ w), rtol=1e-12, atol=1e-16)
    assert latest["book_vol"][0] == pytest.approx(np.sqrt(w @ cov @ w), rel=1e-12)
    shares = contributions.group_by("strategy", "as_of").agg(pl.col("share").sum())
    np.testing.assert_allclose(shares["share"], 1.0, atol=1e-12)
