"""portfolio.frontier and perpfolio.optimize.frontier against independent computations.

References: a fresh cvxpy ``quad_form`` problem per point solved by CLARABEL at 1e-12 (the
frontier itself runs the project's direct OSQP path on a compiled, warm-started problem), the
max-return LP solved by scipy's HiGHS, and numpy checks of budget, bounds and monotonicity.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import cvxpy as cp
import dagster as dg
import duckdb
import numpy as np
import polars as pl
import pytest
from scipy.optimize import linprog

from assets import schemas
from assets.checks import check_frame
from assets.frontier import FRONTIER, frontier_strategy
from perpfolio.errors import ConfigError, DataError
from perpfolio.optimize import Constraints, EfficientFrontier, FrontierPoint, frontier_walk, max_return_portfolio, parse_strategies
from perpfolio.optimize.frontier import unique_max_return
from pipelines.definitions import build_definitions
from pipelines.partitions import partition_keys_for
from pipelines.settings import Settings
from tests.test_pipeline import read_tables

REF = {"solver": "CLARABEL", "tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12, "max_iter": 500}
T0 = datetime(2025, 1, 3, 23, tzinfo=UTC)


def market(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Annualized (mu, cov): distinct means, a positive definite covariance with a common factor."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(2 * n, n))
    cov = 0.3 * a.T @ a / (2 * n) + np.diag(rng.uniform(0.05, 0.4, n)) + 0.1
    return rng.normal(0.2, 0.5, n), cov


def reference_point(mu, cov, *, target: float | None, lo: float, hi: float) -> np.ndarray:
    """min w'Σw s.t. budget 1, lo <= w <= hi (and mu'w >= target), fresh quad_form, CLARABEL."""
    w = cp.Variable(len(mu))
    cons = [cp.sum(w) == 1, w >= lo, w <= hi] + ([] if target is None else [mu @ w >= target])
    problem = cp.Problem(cp.Minimize(cp.quad_form(w, cp.psd_wrap(cov))), cons)
    problem.solve(**REF)
    assert problem.status == cp.OPTIMAL
    return w.value


def reference_max_return(mu, *, lo: float, hi: float) -> np.ndarray:
    result = linprog(-mu, A_eq=np.ones((1, len(mu))), b_eq=[1.0], bounds=[(lo, hi)] * len(mu), method="highs")
    assert result.status == 0
    return result.x


CASES = [(3, 0.0, 0.5), (8, 0.0, 0.3), (6, -0.2, 0.6)]  # (N, min_weight, max_weight): long-only and with shorts


class TestSweep:
    @pytest.mark.parametrize("n, lo, hi", CASES)
    def test_every_point_equals_an_independent_clarabel_solve(self, n, lo, hi):
        mu, cov = market(n, n)
        points = EfficientFrontier(n, min_weight=lo, max_weight=hi).sweep(mu, cov, 9)
        assert [p.status for p in points] == ["optimal"] * 9
        for k, p in enumerate(points):
            ref = reference_point(mu, cov, target=None if k == 0 else p.target_return, lo=lo, hi=hi)
            assert p.weights @ cov @ p.weights == pytest.approx(ref @ cov @ ref, rel=1e-7, abs=1e-12), k
            np.testing.assert_allclose(p.weights, ref, atol=1e-6, err_msg=f"point {k}")  # Σ is PD: unique optimum

    @pytest.mark.parametrize("n, lo, hi", CASES)
    def test_endpoints_are_the_min_variance_and_max_return_portfolios(self, n, lo, hi):
        mu, cov = market(10 + n, n)
        points = EfficientFrontier(n, min_weight=lo, max_weight=hi).sweep(mu, cov, 5)
        np.testing.assert_allclose(points[0].weights, reference_point(mu, cov, target=None, lo=lo, hi=hi), atol=1e-6)
        top = reference_max_return(mu, lo=lo, hi=hi)
        np.testing.assert_allclose(points[-1].weights, top, atol=1e-9)
        np.testing.assert_allclose(max_return_portfolio(mu, budget=1.0, min_weight=lo, max_weight=hi), top, atol=1e-12)
        assert points[0].target_return == pytest.approx(mu @ points[0].weights, abs=1e-12)
        assert points[-1].target_return == pytest.approx(mu @ top, abs=1e-12)

    @pytest.mark.parametrize("n, lo, hi", CASES)
    def test_constraints_hold_targets_bind_and_the_branch_is_efficient(self, n, lo, hi):
        mu, cov = market(20 + n, n)
        points = EfficientFrontier(n, min_weight=lo, max_weight=hi).sweep(mu, cov, 20)
        w = np.array([p.weights for p in points])
        targets = np.array([p.target_return for p in points])
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-9)
        assert w.min() >= lo - 1e-9 and w.max() <= hi + 1e-9
        np.testing.assert_allclose(w @ mu, targets, atol=1e-7)  # the target binds on the efficient branch
        np.testing.assert_allclose(np.diff(targets), np.diff(targets)[0], rtol=1e-9)  # evenly spaced
        vols = np.sqrt(np.einsum("pi,ij,pj->p", w, cov, w))
        assert np.all(np.diff(w @ mu) > 0) and np.all(np.diff(vols) >= -1e-9)

    def test_one_instance_reused_across_asofs_equals_fresh_ones(self):
        """Warm starts carry the previous asof's solution; the optimum must not depend on it."""
        reused = EfficientFrontier(5, max_weight=0.5)
        for seed in range(4):
            mu, cov = market(100 + seed, 5)
            again = [p.weights for p in reused.sweep(mu, cov, 10)]
            fresh = [p.weights for p in EfficientFrontier(5, max_weight=0.5).sweep(mu, cov, 10)]
            np.testing.assert_allclose(again, fresh, atol=1e-7)

    def test_clarabel_option_gives_the_same_frontier(self):
        mu, cov = market(7, 4)
        osqp = EfficientFrontier(4, max_weight=0.5).sweep(mu, cov, 6)
        clarabel = EfficientFrontier(4, max_weight=0.5, solver="CLARABEL").sweep(mu, cov, 6)
        np.testing.assert_allclose([p.weights for p in osqp], [p.weights for p in clarabel], atol=1e-6)


class TestFailures:
    def test_a_target_above_the_highest_return_is_reported_infeasible(self):
        mu, cov = market(3, 3)
        frontier = EfficientFrontier(3, max_weight=0.5)
        top = float(mu @ max_return_portfolio(mu, budget=1.0, min_weight=0.0, max_weight=0.5))
        feasible, beyond = frontier.solve_targets(mu, cov, [top - 0.05, top + 0.05])
        assert feasible.status == "optimal" and feasible.weights is not None
        assert beyond == FrontierPoint(top + 0.05, None, "failed:infeasible")

    def test_a_covariance_that_is_not_psd_fails_the_whole_asof_with_null_targets(self):
        mu, cov = market(4, 3)
        bad = cov.copy()
        bad[0, 0] = -1.0
        points = EfficientFrontier(3, max_weight=0.5).sweep(mu, bad, 4)
        assert points == [FrontierPoint(None, None, "failed:min_variance:not_psd")] * 4

    def test_failed_points_keep_their_rows_with_nulls_and_pass_the_schema(self, monkeypatch):
        """A target that fails mid-sweep: its rows say why, weight/return/volatility are null (never
        NaN), the other points and asofs are unaffected, and the table passes its check."""
        original = EfficientFrontier.solve_targets

        def third_fails(self, mu, cov, targets):
            points = original(self, mu, cov, targets)
            points[1] = FrontierPoint(points[1].target_return, None, "failed:solver_error")  # frontier point 2
            return points

        monkeypatch.setattr(EfficientFrontier, "solve_targets", third_fails)
        (mu0, cov0), (mu1, _) = market(5, 3), market(6, 3)
        not_psd = cov0.copy()
        not_psd[1, 1] = -0.5
        asofs = [T0, T0 + timedelta(days=1)]
        frame, timings = frontier_walk(asofs, np.array([mu0, mu1]), np.array([cov0, not_psd]), ["A", "B", "C"],
                                       n_points=5, constraints=Constraints(max_weight=0.5))
        assert len(timings) == 2 and frame.height == 2 * 5 * 3
        first = frame.filter(pl.col("as_of") == asofs[0])
        failed = first.filter(pl.col("point") == 2)
        assert set(failed["status"]) == {"failed:solver_error"}
        assert failed["weight"].is_null().all() and failed["volatility"].is_null().all()
        assert failed["target_return"].is_not_null().all()
        assert set(first.filter(pl.col("point") != 2)["status"]) == {"optimal"}
        second = frame.filter(pl.col("as_of") == asofs[1])
        assert set(second["status"]) == {"failed:min_variance:not_psd"} and second["target_return"].is_null().all()
        assert not frame["weight"].is_nan().any()
        assert check_frame(schemas.conform(frame, schemas.Frontier), schemas.Frontier, FRONTIER).passed

    def test_bad_inputs_are_named(self):
        mu, cov = market(1, 3)
        frontier = EfficientFrontier(3, max_weight=0.5)
        with pytest.raises(DataError, match="n_points=1"):
            frontier.sweep(mu, cov, 1)
        with pytest.raises(DataError, match="finite"):
            frontier.sweep(np.array([0.1, np.nan, 0.2]), cov, 5)
        with pytest.raises(DataError, match=r"mu \(1, 2\) and cov \(1, 3, 3\) must be \(1, 3\)"):
            frontier_walk([T0], mu[None, :2], cov[None], ["A", "B", "C"], n_points=3, constraints=Constraints())
        with pytest.raises(DataError, match=r"at asof 2025-01-03 23:00:00\+00:00: efficient frontier: mu and cov must be finite"):
            frontier_walk([T0], np.full((1, 3), np.inf), cov[None], ["A", "B", "C"], n_points=3, constraints=Constraints())
        with pytest.raises(ConfigError, match="can never be satisfied"):
            EfficientFrontier(3, max_weight=0.3)


class TestMaxReturn:
    def test_greedy_equals_the_lp_with_shorts_and_partial_fills(self, rng):
        for _ in range(20):
            n = int(rng.integers(2, 9))
            lo = float(rng.uniform(-0.3, 0.0))
            hi = float(rng.uniform(max(1.0 / n, lo) + 0.01, 1.0))
            mu = rng.normal(size=n)
            got = max_return_portfolio(mu, budget=1.0, min_weight=lo, max_weight=hi)
            assert mu @ got == pytest.approx(mu @ reference_max_return(mu, lo=lo, hi=hi), abs=1e-9)
            assert got.sum() == pytest.approx(1.0) and got.min() >= lo - 1e-12 and got.max() <= hi + 1e-12

    def test_uniqueness_by_hand(self):
        w = np.array([0.5, 0.5, 0.0])  # budget 1, bounds [0, 0.5]
        assert unique_max_return(w, np.array([0.3, 0.2, 0.1]), min_weight=0.0, max_weight=0.5)
        # asset 1 (could lose) ties asset 2 (could gain): moving weight between them keeps the return
        assert not unique_max_return(w, np.array([0.3, 0.2, 0.2]), min_weight=0.0, max_weight=0.5)
        # a tie between two full assets changes nothing: neither can gain
        assert unique_max_return(w, np.array([0.3, 0.3, 0.1]), min_weight=0.0, max_weight=0.5)

    def test_tied_means_still_reach_the_top_with_the_least_variance(self):
        """With a tie the max-return portfolios form a segment; the last point is solved on it and
        is the one of least variance (equal to an independent solve at that target)."""
        _, cov = market(9, 3)
        mu = np.array([0.4, 0.1, 0.1])
        points = EfficientFrontier(3, max_weight=0.5).sweep(mu, cov, 4)
        assert points[-1].status == "optimal"
        ref = reference_point(mu, cov, target=points[-1].target_return, lo=0.0, hi=0.5)
        np.testing.assert_allclose(points[-1].weights, ref, atol=1e-5)


class TestSchema:
    def valid(self) -> pl.DataFrame:
        mu, cov = market(2, 3)
        frame, _ = frontier_walk([T0], mu[None], cov[None], ["A", "B", "C"], n_points=4,
                                 constraints=Constraints(max_weight=0.5))
        return schemas.conform(frame, schemas.Frontier)

    def failures(self, frame: pl.DataFrame) -> str:
        result = check_frame(frame, schemas.Frontier, FRONTIER)
        assert not result.passed
        return result.metadata["failures"].value

    def test_valid_frame_passes(self):
        assert check_frame(self.valid(), schemas.Frontier, FRONTIER).passed

    def test_weights_not_summing_to_one(self):
        frame = self.valid().with_columns(weight=pl.when(pl.col("symbol") == "A").then(pl.col("weight") + 1e-4)
                                          .otherwise(pl.col("weight")))
        assert "sum to its budget" in self.failures(frame)

    def test_a_budget_other_than_one_is_checked_against_its_own_budget(self):
        mu, cov = market(2, 3)
        frame, _ = frontier_walk([T0], mu[None], cov[None], ["A", "B", "C"], n_points=4,
                                 constraints=Constraints(budget=0.5, max_weight=0.5))
        frame = schemas.conform(frame, schemas.Frontier)
        optimal = frame.filter(pl.col("status") == "optimal")
        assert optimal.height > 0
        np.testing.assert_allclose(optimal.group_by("point").agg(pl.col("weight").sum())["weight"], 0.5, atol=1e-6)
        assert check_frame(frame, schemas.Frontier, FRONTIER).passed
        assert "sum to its budget" in self.failures(frame.with_columns(budget=pl.lit(1.0)))

    def test_bound_violated(self):
        frame = self.valid().with_columns(max_weight=pl.lit(0.2))
        assert "outside [min_weight, max_weight]" in self.failures(frame)

    def test_volatility_falling_as_return_rises(self):
        frame = self.valid()
        reversed_vol = frame.with_columns(volatility=pl.col("volatility").max() + 0.1 - pl.col("point") * 0.01)
        assert "efficient branch" in self.failures(reversed_vol)

    def test_weight_with_a_failed_status_or_nan(self):
        frame = self.valid()
        failed = frame.with_columns(status=pl.when(pl.col("point") == 1).then(pl.lit("failed:x")).otherwise("status"))
        assert "present exactly when status is optimal" in self.failures(failed)
        with_nan = frame.with_columns(weight=pl.when(pl.col("point") == 1).then(float("nan")).otherwise("weight"))
        self.failures(with_nan)


class TestSettingsAndStrategy:
    def test_points_setting(self):
        assert Settings().frontier_points == 20
        assert Settings.from_env({"PERPFOLIO_FRONTIER_POINTS": "7"}).frontier_points == 7
        with pytest.raises(ConfigError, match="PERPFOLIO_FRONTIER_POINTS must be an integer >= 2"):
            Settings(frontier_points=1)
        with pytest.raises(ConfigError, match="PERPFOLIO_FRONTIER_POINTS"):
            Settings.from_env({"PERPFOLIO_FRONTIER_POINTS": "many"})

    def test_bounds_come_from_the_first_min_variance_strategy(self):
        bounds = {"budget": 1.0, "max_weight": 0.6}
        specs = parse_strategies([
            {"name": "tilt", "objective": "vrp_tilt", "constraints": bounds},
            {"name": "mv", "objective": "min_variance", "constraints": {**bounds, "max_weight": 0.4}},
        ])
        assert frontier_strategy(specs).name == "mv"
        assert frontier_strategy(specs[:1]).name == "tilt"  # none: the first strategy


@pytest.mark.slow
def test_asset_materializes_plots_and_feeds_the_report(short_settings):
    """Short window (6 days, 2 of warm-up): the frontier covers every solved asof, its point 0 is the
    min_variance strategy's book, its plot is in the metadata, and the report draws the STORED table
    (emptied, the report has no frontier figure)."""
    settings = replace(short_settings, frontier_points=6)
    defs = build_definitions(settings)
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    first, last = partition_keys_for(defs.resolve_job_def("daily_walk_forward").partitions_def, settings.start, settings.end)
    tags = {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last}

    def report_figures(instance) -> set[str]:
        result = defs.resolve_job_def("evaluation").execute_in_process(instance=instance, run_config=quiet)
        return set(result.asset_materializations_for_node("report")[0].metadata)

    with dg.DagsterInstance.ephemeral() as instance:
        walk = defs.resolve_job_def("daily_walk_forward").execute_in_process(instance=instance, tags=tags, run_config=quiet)
        meta = walk.asset_materializations_for_node("portfolio__frontier")[0].metadata
        assert meta["plot"].value.startswith("![efficient_frontier](data:image/png;base64,")
        assert (meta["asofs"].value, meta["points_failed"].value, meta["strategy"].value) == (4, 0, "min_variance")
        assert meta["asofs_skipped_insufficient_history"].value == 2
        tables = read_tables(settings.warehouse)
        assert "efficient_frontier" in report_figures(instance)
        with duckdb.connect(str(settings.warehouse)) as con:
            con.execute("DELETE FROM portfolio.frontier")
        assert "efficient_frontier" not in report_figures(instance)
    frontier, weights = tables["portfolio.frontier"], tables["portfolio.weights"]
    assert frontier.height == 4 * 6 * 3 and set(frontier["status"]) == {"optimal"}
    assert check_frame(schemas.conform(frontier, schemas.Frontier), schemas.Frontier, FRONTIER).passed
    book = weights.filter((pl.col("strategy") == "min_variance") & (pl.col("status") == "optimal"))
    start = frontier.filter(pl.col("point") == 0).join(book, on=["as_of", "symbol"])
    assert start.height == 4 * 3
    np.testing.assert_allclose(start["weight"].to_numpy(), start["weight_right"].to_numpy(), atol=1e-6)
