"""Tests of perpfolio.optimize against independent computations.

References: hand-written cvxpy problems with ``quad_form`` solved by OSQP at eps 1e-10 (a second
solver and a second formulation; the package uses CLARABEL on a square-root factor), the
closed-form min-variance portfolio, and plain numpy constraint checks.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cvxpy as cp
import numpy as np
import polars as pl
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from perpfolio.errors import ConfigError, DataError
from perpfolio.optimize import (
    AsofInputs,
    PortfolioProblem,
    SolveData,
    load_strategies,
    optimize_walk_forward,
    parse_strategies,
    validate_for_universe,
)

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ROOT / "config" / "strategies.toml"
SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "DOGEUSDT"]
T0 = datetime(2025, 1, 1, 23, tzinfo=UTC)
BOUNDS = {"budget": 1.0, "min_weight": 0.0, "max_weight": 0.5}


def market(seed: int, n: int, *, mu_floor: float | None = None) -> dict[str, np.ndarray]:
    """Annualized moments of 300 fat-tailed hourly returns with a common factor (PSD inputs)."""
    rng = np.random.default_rng(seed)
    factor = rng.standard_t(4, size=(300, 1)) * 0.006
    r = factor * rng.uniform(0.6, 1.4, n) + rng.standard_t(4, size=(300, n)) * rng.uniform(0.003, 0.01, n)
    neg = np.minimum(r, 0.0)
    mu = rng.normal(0.1, 0.4, n)
    if mu_floor is not None:
        mu[:2] = np.maximum(mu[:2], mu_floor)
    vrp = rng.normal(0.0, 0.1, n)
    vrp[rng.random(n) < 0.3] = np.nan
    return {
        "mu": mu,
        "cov": np.cov(r.T) * 8760,
        "downside": (neg**2).mean(0) * 8760,
        "semicov": neg.T @ neg / 300 * 8760,
        "vrp": vrp,
    }


def inputs_at(k: int, m: dict, status: str = "ok") -> AsofInputs:
    return AsofInputs(asof=T0 + timedelta(days=k), status=status, **m)


def spec_of(objective: str, parameters: dict | None = None, **constraints) -> list:
    tables = [{"name": "min_variance", "objective": "min_variance", "constraints": BOUNDS}]
    if objective != "min_variance":
        tables.append({
            "name": objective, "objective": objective,
            "parameters": parameters or {}, "constraints": {**BOUNDS, **constraints},
        })
    return parse_strategies(tables)


def reference(objective: str, m: dict, *, w_base=None, lo=0.0, hi=0.5) -> float:
    """Objective value from a fresh quad_form problem solved by OSQP at eps 1e-10."""
    n = len(m["mu"])
    w = cp.Variable(n)
    cov, mu = cp.psd_wrap(m["cov"]), m["mu"]
    tilted = mu + np.where(np.isnan(m["vrp"]), 0.0, m["vrp"])
    cons = [cp.sum(w) == 1, w >= lo, w <= hi]
    if objective == "max_sharpe":  # homogenized by hand: y = k w
        k = cp.Variable(nonneg=True)
        cons = [cp.sum(w) == k, w >= lo * k, w <= hi * k, mu @ w == 1]
        cp.Problem(cp.Minimize(cp.quad_form(w, cov)), cons).solve(**OSQP_REF)
        x = w.value / k.value
        return float(mu @ x / np.sqrt(x @ m["cov"] @ x))
    risk = {
        "min_variance": cp.quad_form(w, cov),
        "target_return": cp.quad_form(w, cov),
        "downside": 0.5 * cp.quad_form(w, cov) + 0.5 * m["downside"] @ w,
        "semivariance": cp.quad_form(w, cp.psd_wrap(m["semicov"])),
        "vrp_tilt": 2.5 * cp.quad_form(w, cov) - tilted @ w,
        "hybrid": 2.5 * (0.5 * cp.quad_form(w, cov) + 0.5 * m["downside"] @ w) - tilted @ w,
    }[objective]
    if objective == "target_return":
        cons.append(mu @ w >= 0.2)
    if objective == "hybrid":
        cons.append(0.5 * cp.norm1(w - w_base) <= 0.2)
    problem = cp.Problem(cp.Minimize(risk), cons)
    problem.solve(**OSQP_REF)
    if problem.status == "optimal_inaccurate":  # OSQP stalls short of 1e-10 now and then (seeds 5660 and 999, n=5)
        problem.solve(**CLARABEL_REF)
    if problem.status != "optimal":
        raise RuntimeError(f"reference {objective}: {problem.status}")
    return float(problem.value)


OSQP_REF = {"solver": "OSQP", "eps_abs": 1e-10, "eps_rel": 1e-10, "polish": True, "max_iter": 500_000}
CLARABEL_REF = {"solver": "CLARABEL"}  # its default 1e-8 gaps: 1000x tighter than the comparisons' rel 1e-5


def weights_of(df: pl.DataFrame, strategy: str, k: int = 0) -> np.ndarray:
    rows = df.filter((pl.col("strategy") == strategy) & (pl.col("as_of") == T0 + timedelta(days=k)))
    return rows["weight"].to_numpy()


def status_of(df: pl.DataFrame, strategy: str, k: int = 0) -> str:
    rows = df.filter((pl.col("strategy") == strategy) & (pl.col("as_of") == T0 + timedelta(days=k)))
    return rows["status"].unique().item()


class TestLoadStrategies:
    def test_default_file_is_the_case_study(self):
        specs = load_strategies(STRATEGIES, n_assets=3)
        assert [s.name for s in specs] == [
            "min_variance", "target_return", "max_sharpe", "downside", "vrp_tilt", "vrp_tilt_proxy", "hybrid", "overlay"
        ]
        for s in specs:
            assert (s.constraints.budget, s.constraints.min_weight, s.constraints.max_weight) == (1.0, 0.0, 0.5)
        by = {s.name: s.parameters for s in specs}
        assert by["target_return"].target_return == 0.20
        assert by["downside"].alpha == 0.5
        assert (by["vrp_tilt"].beta, by["vrp_tilt"].risk_aversion) == (1.0, 5.0)
        assert (by["hybrid"].baseline, by["hybrid"].overlay_cap) == ("min_variance", 0.20)

    def test_infeasible_bounds_for_the_universe_name_the_strategy(self, tmp_path):
        path = tmp_path / "s.toml"
        path.write_text(
            '[[strategy]]\nname = "tight"\nobjective = "min_variance"\n'
            "[strategy.constraints]\nbudget = 1.0\nmin_weight = 0.0\nmax_weight = 0.2\n"
        )
        with pytest.raises(ConfigError, match=r"strategy 'tight'.*max_weight=0.2.*n_assets=3"):
            load_strategies(path, n_assets=3)
        validate_for_universe(load_strategies(path), 5)  # 5 x 0.2 = 1 is feasible

    @pytest.mark.parametrize(
        ("table", "match"),
        [
            ({"objective": "min_variance", "leverage": 2}, r"strategy 'x'.*unknown key.*leverage"),
            ({"objective": "max_return"}, r"strategy 'x'.*objective='max_return'"),
            ({"objective": "downside", "parameters": {"beta": 1}}, r"strategy 'x'.*unknown parameter.*beta"),
            ({"objective": "min_variance", "constraints": {"maxweight": 1}}, r"strategy 'x'.*maxweight"),
            ({"objective": "target_return"}, r"strategy 'x'.*needs parameters.target_return"),
            ({"objective": "min_variance", "constraints": {"min_weight": 0.6, "max_weight": 0.5}},
             r"strategy 'x'.*min_weight=0.6 > max_weight=0.5"),
            ({"objective": "min_variance", "constraints": {"max_leverage": 0.5}},
             r"strategy 'x'.*max_leverage=0.5 < \|budget\|=1.0"),
            ({"objective": "min_variance", "constraints": {"max_weight": -0.1, "min_weight": -1}},
             r"strategy 'x'.*budget=1.0.*never be satisfied"),
            ({"objective": "downside", "parameters": {"alpha": 1.5}}, r"strategy 'x'.*alpha=1.5"),
            ({"objective": "max_sharpe", "constraints": {"cost_bps": 5}}, r"strategy 'x'.*cost_bps"),
            ({"objective": "hybrid", "parameters": {"baseline": "nope"}}, r"strategy 'x'.*baseline='nope'"),
        ],
    )
    def test_bad_tables_raise_naming_strategy_and_key(self, table, match):
        with pytest.raises(ConfigError, match=match):
            parse_strategies([{"name": "x", **table}])


class TestConstraintsAlwaysHold:
    """Every returned weight vector satisfies its strategy's constraints (plain numpy checks)."""

    EXTRA = parse_strategies([
        {"name": "min_variance", "objective": "min_variance", "constraints": BOUNDS},
        {"name": "semi", "objective": "semivariance", "parameters": {"target_return": 0.1},
         "constraints": BOUNDS},
        {"name": "ls", "objective": "vrp_tilt", "constraints": {
            "budget": 1.0, "min_weight": -0.3, "max_weight": 0.6, "max_leverage": 1.6,
            "max_rebalance": 0.25, "cost_bps": 10.0}},
        {"name": "ls_sharpe", "objective": "max_sharpe", "solver": "OSQP", "constraints": {
            "budget": 1.0, "min_weight": -0.2, "max_weight": 0.6, "max_leverage": 1.5}},
        {"name": "tight_hybrid", "objective": "hybrid", "parameters": {"overlay_cap": 0.05, "beta": 20.0},
         "constraints": {**BOUNDS, "max_rebalance": 0.3}},
    ])

    @settings(max_examples=30, deadline=None)
    @given(
        seed=st.integers(0, 2**32 - 1),
        n=st.integers(3, 5),
        broken=st.sampled_from(["none", "nan_cov", "history"]),
    )
    def test_random_inputs(self, seed, n, broken):
        specs = load_strategies(STRATEGIES) + self.EXTRA[1:]
        steps = []
        for k in range(3):
            m = market(seed + k, n)
            status = "ok"
            if k == 1 and broken == "nan_cov":
                m["cov"][0, 1] = m["cov"][1, 0] = np.nan
            if k == 1 and broken == "history":
                m = {key: np.full_like(v, np.nan) for key, v in m.items()}
                status = "insufficient_history"
            steps.append((m, status))
        df = optimize_walk_forward(specs, SYMBOLS[:n], [inputs_at(k, m, s) for k, (m, s) in enumerate(steps)])
        assert df.height == 3 * len(specs) * n
        assert df["weight"].is_finite().all()
        prev = {}
        for k, (m, status) in enumerate(steps):
            base = weights_of(df, "min_variance", k)
            for s in specs:
                w, c = weights_of(df, s.name, k), s.constraints
                label = f"{s.name} at {k}: {status_of(df, s.name, k)}"
                assert abs(w.sum() - c.budget) <= 1e-6, label
                assert w.min() >= c.min_weight - 1e-6 and w.max() <= c.max_weight + 1e-6, label
                if c.max_leverage is not None:
                    assert np.abs(w).sum() <= c.max_leverage + 1e-6, label
                optimal = status_of(df, s.name, k) == "optimal"
                if optimal and c.max_rebalance is not None and s.name in prev:
                    assert np.abs(w - prev[s.name]).max() <= c.max_rebalance + 1e-6, label
                if optimal and s.parameters.target_return is not None:
                    assert m["mu"] @ w >= s.parameters.target_return - 1e-6, label
                if optimal and s.objective == "hybrid":
                    assert 0.5 * np.abs(w - base).sum() <= s.parameters.overlay_cap + 1e-6, label
                if status != "ok":
                    assert status_of(df, s.name, k).endswith(":insufficient_history"), label
                prev[s.name] = w


class TestSecondSolver:
    """Objective values match a fresh quad_form problem solved by OSQP (relative 1e-5)."""

    problems: dict = {}

    def solve(self, objective: str, m: dict, parameters=None, w_base=None) -> float:
        spec = spec_of(objective, parameters)[-1]
        key = (objective, len(m["mu"]))
        if key not in self.problems:
            self.problems[key] = PortfolioProblem(spec, len(m["mu"]))
        problem = self.problems[key]
        data = SolveData(**m, w_base=w_base)
        result = problem.solve(data)
        assert result.status == "optimal"
        assert max(problem.constraint_violations(result.weights, data).values()) <= 1e-6
        return problem.objective_value(result.weights, data), result.weights

    @settings(max_examples=20, deadline=None)
    @given(seed=st.integers(0, 2**32 - 1), n=st.integers(3, 5))
    @example(seed=5660, n=5)  # the OSQP reference ended optimal_inaccurate on the hybrid: CLARABEL decides
    @example(seed=999, n=5)
    def test_objectives_match(self, seed, n):
        m = market(seed, n, mu_floor=0.3)  # two assets >= 30%: target 20% and Sharpe > 0 feasible
        params = {"target_return": {"target_return": 0.2}}
        objectives = ("min_variance", "target_return", "max_sharpe", "downside", "semivariance", "vrp_tilt")
        for objective in objectives:
            ours, _ = self.solve(objective, m, params.get(objective))
            assert ours == pytest.approx(reference(objective, m), rel=1e-5, abs=1e-9), objective
        _, w_base = self.solve("min_variance", m)
        ours, _ = self.solve("hybrid", m, w_base=w_base)
        assert ours == pytest.approx(reference("hybrid", m, w_base=w_base), rel=1e-5, abs=1e-9)

    def test_min_variance_closed_form_without_binding_bounds(self):
        m = market(3, 5)
        spec = spec_of("min_variance")[0]
        loose = dataclasses.replace(spec.constraints, min_weight=-5.0, max_weight=5.0)
        spec = dataclasses.replace(spec, constraints=loose)
        w = PortfolioProblem(spec, 5).solve(SolveData(**m)).weights
        x = np.linalg.solve(m["cov"], np.ones(5))
        np.testing.assert_allclose(w, x / x.sum(), atol=1e-7)

    def test_osqp_option_matches_clarabel(self):
        m = market(11, 5, mu_floor=0.3)
        specs = parse_strategies([
            {"name": "a", "objective": "vrp_tilt", "constraints": BOUNDS},
            {"name": "b", "objective": "vrp_tilt", "constraints": BOUNDS, "solver": "OSQP"},
        ])
        df = optimize_walk_forward(specs, SYMBOLS, [inputs_at(0, m)])
        assert df.filter(pl.col("strategy") == "b")["solver"].unique().item() == "OSQP"
        np.testing.assert_allclose(weights_of(df, "b"), weights_of(df, "a"), atol=1e-6)


class TestDirectOSQP:
    """solver = "OSQP" on a plain QP skips cvxpy: same objectives as the independent reference."""

    QP = ("min_variance", "target_return", "downside", "semivariance", "vrp_tilt")

    def spec(self, objective: str, parameters=None):
        return dataclasses.replace(spec_of(objective, parameters)[-1], solver="OSQP")

    def test_only_plain_qps_take_the_direct_path(self):
        for objective in self.QP:
            params = {"target_return": 0.2} if objective == "target_return" else None
            assert PortfolioProblem(self.spec(objective, params), 4).direct is not None, objective
        assert PortfolioProblem(self.spec("max_sharpe"), 4).direct is None
        leveraged = dataclasses.replace(self.spec("min_variance"), constraints=dataclasses.replace(
            self.spec("min_variance").constraints, max_leverage=1.5, min_weight=-0.5))
        assert PortfolioProblem(leveraged, 4).direct is None  # |w| needs auxiliary variables: cvxpy

    @settings(max_examples=15, deadline=None)
    @given(seed=st.integers(0, 2**32 - 1), n=st.integers(3, 6))
    def test_objectives_match_the_reference_over_reused_problems(self, seed, n):
        m = market(seed, n, mu_floor=0.3)
        for objective in self.QP:
            params = {"target_return": 0.2} if objective == "target_return" else None
            key = (objective, n)
            problem = TestDirectOSQP.cache.setdefault(key, PortfolioProblem(self.spec(objective, params), n))
            data = SolveData(**m)
            result = problem.solve(data)  # warm-started from the previous example's solution
            assert result.status == "optimal" and result.solver == "OSQP", objective
            assert max(problem.constraint_violations(result.weights, data).values()) <= 1e-6
            ours = problem.objective_value(result.weights, data)
            assert ours == pytest.approx(reference(objective, m), rel=1e-5, abs=1e-9), objective

    cache: dict = {}

    def test_unreachable_target_is_infeasible_and_bad_matrix_is_not_psd(self):
        m = market(2, 4)
        problem = PortfolioProblem(self.spec("target_return", {"target_return": 50.0}), 4)
        assert problem.solve(SolveData(**m)).status == "infeasible"
        cov = m["cov"].copy()
        cov[3, 3] = -cov[3, 3]  # a negative variance: trace still positive, matrix indefinite
        indefinite = {**m, "cov": cov}
        assert PortfolioProblem(self.spec("min_variance"), 4).solve(SolveData(**indefinite)).status == "not_psd"

    def test_without_a_successful_polish_it_resolves_tight(self, monkeypatch):
        """Polish off (status_polish != 1): the 1e-6 stop alone would be loose; the re-solve at
        1e-9 must still meet the reference objective to 1e-7."""
        from perpfolio.optimize import direct

        monkeypatch.setitem(direct.OSQP_SETTINGS, "polish", False)
        m = market(12, 6)
        problem = PortfolioProblem(self.spec("min_variance"), 6)
        result = problem.solve(SolveData(**m))
        assert result.status == "optimal"
        assert problem.objective_value(result.weights, SolveData(**m)) == pytest.approx(
            reference("min_variance", m), rel=1e-7)

    def test_hourly_scale_inputs_give_the_annualized_weights(self):
        m = market(8, 5)
        hourly = {k: v / 8760 for k, v in m.items()}
        w_ann = PortfolioProblem(self.spec("min_variance"), 5).solve(SolveData(**m)).weights
        w_hour = PortfolioProblem(self.spec("min_variance"), 5).solve(SolveData(**hourly)).weights
        np.testing.assert_allclose(w_hour, w_ann, atol=1e-8)


class TestRiskTerms:
    """L2 regularization, margin buffer and stress-loss bound: held in the output and equal to an
    independent cvxpy formulation, on the cvxpy (CLARABEL) and the direct (OSQP) path."""

    def spec(self, solver: str, **constraints):
        tables = [{"name": "s", "objective": "min_variance", "solver": solver,
                   "constraints": {**BOUNDS, **constraints}}]
        return parse_strategies(tables)[0]

    def reference(self, m: dict, *, lo=0.0, hi=0.5, extra=lambda w: [], gamma=0.0) -> np.ndarray:
        w = cp.Variable(len(m["mu"]))
        objective = cp.quad_form(w, cp.psd_wrap(m["cov"])) + gamma * cp.sum_squares(w)
        cp.Problem(cp.Minimize(objective), [cp.sum(w) == 1, w >= lo, w <= hi, *extra(w)]).solve(**OSQP_REF)
        return w.value

    @pytest.mark.parametrize("solver", ["CLARABEL", "OSQP"])
    def test_l2_penalty_matches_reference_and_spreads_weights(self, solver):
        m = market(4, 5)
        plain = PortfolioProblem(self.spec(solver), 5).solve(SolveData(**m)).weights
        ridge = PortfolioProblem(self.spec(solver, l2_gamma=5.0), 5).solve(SolveData(**m)).weights
        np.testing.assert_allclose(ridge, self.reference(m, gamma=5.0), atol=1e-6)
        assert np.abs(ridge - 0.2).max() < np.abs(plain - 0.2).max()  # closer to equal weights

    def test_margin_buffer_binds_and_matches_reference(self):
        m = market(6, 5)
        spec = self.spec("CLARABEL", min_weight=-1.0, max_weight=1.0, margin_leverage=2.0, margin_buffer=0.49)
        problem = PortfolioProblem(spec, 5)
        assert problem.direct is None  # |w| needs cvxpy
        w = problem.solve(SolveData(**m)).weights
        assert np.abs(w).sum() / 2.0 <= 0.51 + 1e-6
        free = PortfolioProblem(self.spec("CLARABEL", min_weight=-1.0, max_weight=1.0), 5).solve(SolveData(**m)).weights
        assert np.abs(free).sum() > 1.02 + 1e-3  # without the buffer the book would be more leveraged
        ref = self.reference(m, lo=-1.0, hi=1.0, extra=lambda x: [cp.norm1(x) / 2.0 <= 0.51])
        np.testing.assert_allclose(w, ref, atol=1e-5)

    @pytest.mark.parametrize("solver", ["CLARABEL", "OSQP"])
    def test_stress_loss_bound_holds_and_matches_reference(self, solver):
        m = market(9, 4)
        beta = m["cov"][:, 0] / m["cov"][0, 0]
        problem = PortfolioProblem(self.spec(solver, max_stress_loss=0.105, stress_shock=-0.10), 4)
        assert (problem.direct is not None) == (solver == "OSQP")
        result = problem.solve(SolveData(**m))
        assert result.status == "optimal"
        assert 0.10 * beta @ result.weights <= 0.105 + 1e-6
        ref = self.reference(m, extra=lambda x: [0.10 * beta @ x <= 0.105])
        np.testing.assert_allclose(result.weights, ref, atol=1e-5)

    @pytest.mark.parametrize(("constraints", "message"), [
        ({"max_stress_loss": 0.05}, "max_stress_loss=0.05 < |stress_shock| \\* budget"),
        ({"margin_leverage": 1.0, "margin_buffer": 0.5}, "needs \\|budget\\|/margin_leverage"),
        ({"margin_buffer": 0.2}, "margin_buffer needs constraints.margin_leverage"),
        ({"l2_gamma": -1.0}, "l2_gamma=-1.0 must be >= 0"),
    ])
    def test_never_feasible_settings_are_rejected_at_load(self, constraints, message):
        with pytest.raises(ConfigError, match=f"strategy 's': .*{message}"):
            self.spec("CLARABEL", **constraints)


class TestTailAndRobustTerms:
    """CVaR limit against the empirical CVaR and an independent Rockafellar-Uryasev problem;
    robust mean against its closed-form worst case."""

    def scenarios(self, seed: int, n: int, t: int = 200) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return rng.standard_t(3, size=(t, 1)) * 0.01 * rng.uniform(0.5, 1.5, n) + rng.normal(0, 0.004, (t, n))

    def test_empirical_cvar_by_hand(self):
        from perpfolio.optimize.terms import empirical_cvar

        losses = np.arange(1.0, 21.0)  # 20 samples; worst 10% = {20, 19}
        assert empirical_cvar(losses, 0.90) == pytest.approx(19.5)
        # worst 15% = 3 samples: {20, 19, 18}
        assert empirical_cvar(losses, 0.85) == pytest.approx(19.0)
        # worst 12.5% = 2.5 samples: 20 + 19 + half of 18, over 2.5
        assert empirical_cvar(losses, 0.875) == pytest.approx((20 + 19 + 9) / 2.5)

    def test_cvar_limit_holds_and_matches_an_independent_problem(self):
        m, r = market(14, 4), self.scenarios(1, 4)
        spec = parse_strategies([{"name": "s", "objective": "min_variance", "constraints": {
            **BOUNDS, "cvar_limit": 0.027, "cvar_alpha": 0.95, "cvar_scenarios": 300}}])[0]
        problem = PortfolioProblem(spec, 4)
        result = problem.solve(SolveData(**m, scenarios=r))  # 200 rows < 300: padded with zero probability
        from perpfolio.optimize.terms import empirical_cvar

        assert result.status == "optimal"
        assert empirical_cvar(-(r @ result.weights), 0.95) <= 0.027 + 1e-6
        w, t, u = cp.Variable(4), cp.Variable(), cp.Variable(200, nonneg=True)
        cp.Problem(cp.Minimize(cp.quad_form(w, cp.psd_wrap(m["cov"]))), [
            cp.sum(w) == 1, w >= 0, w <= 0.5, u >= -(r @ w) - t, t + cp.sum(u) / (200 * 0.05) <= 0.027,
        ]).solve(**OSQP_REF)
        np.testing.assert_allclose(result.weights, w.value, atol=1e-5)
        unconstrained = PortfolioProblem(spec_of("min_variance")[0], 4).solve(SolveData(**m)).weights
        assert empirical_cvar(-(r @ unconstrained), 0.95) > 0.027  # the limit binds

    def test_stressed_scenarios_by_hand(self):
        from perpfolio.optimize.terms import stressed_scenarios

        rng = np.random.default_rng(5)
        r = rng.normal(0, 0.01, (60, 2))
        r[-10:, 0] *= 4  # asset 0 ends in a volatile spell; asset 1 stays calm
        h = 12.0
        lam = 0.5 ** (1 / h)
        expected = r.copy()
        for i in range(2):
            v = [sum(x * x for x in r[:, i]) / len(r)]  # v[s]: the forecast before bar s; v[-1]: after the last
            for x in r[:, i]:
                v.append(lam * v[-1] + (1 - lam) * x * x)
            for s in range(len(r)):
                expected[s, i] = r[s, i] * max(1.0, (v[-1] / v[s]) ** 0.5)
        got = stressed_scenarios(r, h)
        np.testing.assert_allclose(got, expected, rtol=1e-12)
        assert np.abs(got[:40, 0]).mean() > 1.5 * np.abs(r[:40, 0]).mean()  # calm bars replayed at today's vol
        np.testing.assert_array_equal(stressed_scenarios(np.zeros((5, 2)), h), np.zeros((5, 2)))
        # a crash after a calm spell is scaled by the calm volatility before it, not by its own:
        # 1% vol, a -10% bar, today's vol 2% -> the crash replays at about -20%
        calm = np.full((400, 1), 0.01) * np.where(np.arange(400) % 2, 1.0, -1.0)[:, None]
        spell = np.vstack([calm, [[-0.10]], np.full((60, 1), 0.02) * np.where(np.arange(60) % 2, 1.0, -1.0)[:, None]])
        crash = stressed_scenarios(spell, 48.0)[400, 0]
        assert -0.24 < crash < -0.17

    def test_stressed_cvar_limit_holds_on_the_stressed_scenarios(self):
        from perpfolio.optimize.terms import empirical_cvar, stressed_scenarios

        m, r = market(17, 4), self.scenarios(2, 4)
        r[-20:, :2] *= 3  # the two first assets turned volatile at the end of the window
        limits = {**BOUNDS, "cvar_limit": 0.05, "cvar_alpha": 0.95, "cvar_scenarios": 200}
        plain = parse_strategies([{"name": "p", "objective": "min_variance", "constraints": limits}])[0]
        stressed = parse_strategies([{"name": "s", "objective": "min_variance",
                                      "constraints": {**limits, "cvar_stress_half_life": 24}}])[0]
        data = SolveData(**m, scenarios=r)
        w_plain, w_stress = (PortfolioProblem(s, 4).solve(data).weights for s in (plain, stressed))
        shocked = stressed_scenarios(r, 24)
        assert empirical_cvar(-(shocked @ w_stress), 0.95) <= 0.05 + 1e-6
        assert empirical_cvar(-(shocked @ w_plain), 0.95) > 0.05  # the historical limit alone misses the spell
        x, t, u = cp.Variable(4), cp.Variable(), cp.Variable(200, nonneg=True)
        cp.Problem(cp.Minimize(cp.quad_form(x, cp.psd_wrap(m["cov"]))), [
            cp.sum(x) == 1, x >= 0, x <= 0.5, u >= -(shocked @ x) - t, t + cp.sum(u) / (200 * 0.05) <= 0.05,
        ]).solve(**OSQP_REF)
        np.testing.assert_allclose(w_stress, x.value, atol=1e-5)
        with pytest.raises(ConfigError, match="cvar_stress_half_life=0.0 must be > 0"):
            parse_strategies([{"name": "s", "objective": "min_variance", "constraints": {"cvar_stress_half_life": 0.0}}])

    def test_missing_scenarios_take_the_fallback_with_a_clear_reason(self):
        m = market(15, 5)
        specs = parse_strategies([{"name": "s", "objective": "min_variance",
                                   "constraints": {**BOUNDS, "cvar_limit": 0.02}}])
        df = optimize_walk_forward(specs, SYMBOLS, [inputs_at(0, m)])
        assert status_of(df, "s") == "fallback:equal:missing_input"

    def test_robust_mean_is_the_worst_case_over_the_ellipsoid(self):
        m = {**market(16, 4, mu_floor=0.3), "vrp": np.zeros(4)}
        params = {"beta": 0.0, "risk_aversion": 5.0, "robust_kappa": 2.0}
        spec = spec_of("vrp_tilt", params)[-1]
        problem = PortfolioProblem(spec, 4)
        data = SolveData(**m, window_years=720 / 8760)
        w = problem.solve(data).weights
        sigma_mu = m["cov"] / (720 / 8760)
        x = cp.Variable(4)
        worst = m["mu"] @ x - 2.0 * cp.norm2(psd_factor_ref(sigma_mu) @ x)
        ref = cp.Problem(cp.Maximize(worst - 2.5 * cp.quad_form(x, cp.psd_wrap(m["cov"]))),
                         [cp.sum(x) == 1, x >= 0, x <= 0.5])
        ref.solve(solver="CLARABEL")
        assert -problem.objective_value(w, data) == pytest.approx(ref.value, rel=1e-6)
        naive = PortfolioProblem(spec_of("vrp_tilt", {**params, "robust_kappa": 0.0})[-1], 4).solve(data).weights
        assert w @ m["cov"] @ w < naive @ m["cov"] @ naive  # mean uncertainty pushes toward lower risk


class TestVrpPenaltyAndFundingTilt:
    """The penalty form of the VRP signal and the funding-forecast tilt of vrp_tilt / hybrid."""

    LONG_SHORT = {"budget": 1.0, "min_weight": -0.5, "max_weight": 0.8}

    def test_vrp_penalty_matches_an_independent_problem(self):
        m = {**market(31, 4), "vrp": np.array([-0.3, 0.1, -0.05, np.nan])}
        params = {"beta": 0.0, "risk_aversion": 5.0, "vrp_penalty": 2.0}
        spec = parse_strategies([{"name": "p", "objective": "vrp_tilt", "parameters": params,
                                  "constraints": self.LONG_SHORT}])[0]
        problem = PortfolioProblem(spec, 4)
        data = SolveData(**m)
        result = problem.solve(data)
        assert result.status == "optimal"
        charge = np.array([0.3, 0.0, 0.05, 0.0])  # max(0, -VRP); unknown VRP: no charge
        x = cp.Variable(4)
        ref = cp.Problem(cp.Maximize(m["mu"] @ x - 2.5 * cp.quad_form(x, cp.psd_wrap(m["cov"]))
                                     - 2.0 * charge @ cp.abs(x)),
                         [cp.sum(x) == 1, x >= -0.5, x <= 0.8])
        ref.solve(solver="CLARABEL")
        assert -problem.objective_value(result.weights, data) == pytest.approx(ref.value, rel=1e-6)
        np.testing.assert_allclose(result.weights, x.value, atol=1e-5)
        plain = parse_strategies([{"name": "q", "objective": "vrp_tilt", "parameters": {**params, "vrp_penalty": 0.0},
                                   "constraints": self.LONG_SHORT}])[0]
        unpenalized = PortfolioProblem(plain, 4).solve(data).weights
        assert abs(result.weights[0]) < abs(unpenalized[0]) - 0.01  # the worst VRP is held less

    def test_funding_tilt_is_the_mean_shifted_by_the_annual_carry(self):
        m = market(32, 4, mu_floor=0.2)
        funding = np.array([3e-5, -2e-5, np.nan, 1e-5])  # per hour, + = longs pay
        tilted = parse_strategies([{"name": "t", "objective": "vrp_tilt", "solver": "OSQP",
                                    "parameters": {"beta": 0.5, "funding_beta": 1.5}, "constraints": BOUNDS}])[0]
        plain = parse_strategies([{"name": "t", "objective": "vrp_tilt", "solver": "OSQP",
                                   "parameters": {"beta": 0.5}, "constraints": BOUNDS}])[0]
        shifted = {**m, "mu": m["mu"] - 1.5 * 8760 * np.array([3e-5, -2e-5, 0.0, 1e-5])}
        got = PortfolioProblem(tilted, 4).solve(SolveData(**m, funding_1h=funding))
        want = PortfolioProblem(plain, 4).solve(SolveData(**shifted))
        assert got.status == want.status == "optimal"
        np.testing.assert_allclose(got.weights, want.weights, atol=1e-7)
        with pytest.raises(ConfigError, match="vrp_penalty=-1.0 must be >= 0"):
            parse_strategies([{"name": "t", "objective": "vrp_tilt", "parameters": {"vrp_penalty": -1.0}}])

    def test_funding_tilt_without_a_forecast_falls_back(self):
        m = market(33, 5)
        specs = spec_of("vrp_tilt", {"funding_beta": 1.0})
        df = optimize_walk_forward(specs, SYMBOLS, [inputs_at(0, m)])  # no funding_1h
        assert status_of(df, "vrp_tilt") == "fallback:min_variance:missing_input"
        inf = optimize_walk_forward(specs, SYMBOLS, [inputs_at(0, {**m, "funding_1h": np.array([np.inf, 0, 0, 0, 0])})])
        assert status_of(inf, "vrp_tilt") == "fallback:min_variance:nonfinite_input"


def psd_factor_ref(matrix: np.ndarray) -> np.ndarray:
    return np.linalg.cholesky(matrix).T


class TestRegimeAndShrunkFallback:
    def specs(self, turbulence: bool):
        return parse_strategies([{"name": "t", "objective": "target_return", "fallback_in_turbulence": turbulence,
                                  "parameters": {"target_return": 0.2}, "constraints": BOUNDS}])

    def test_turbulent_regime_reverts_to_min_variance_only_when_configured(self):
        m = market(21, 5, mu_floor=0.3)
        turbulent = dataclasses.replace(inputs_at(0, m), regime="turbulent")
        calm = dataclasses.replace(inputs_at(1, m), regime="calm")
        df = optimize_walk_forward(self.specs(True), SYMBOLS, [turbulent, calm])
        assert status_of(df, "t", 0) == "fallback:min_variance:turbulent_regime"
        assert status_of(df, "t", 1) == "optimal"
        x = cp.Variable(5)
        cp.Problem(cp.Minimize(cp.quad_form(x, cp.psd_wrap(m["cov"]))), [cp.sum(x) == 1, x >= 0, x <= 0.5]).solve(**OSQP_REF)
        np.testing.assert_allclose(weights_of(df, "t", 0), x.value, atol=1e-5)
        plain = optimize_walk_forward(self.specs(False), SYMBOLS, [turbulent])
        assert status_of(plain, "t", 0) == "optimal"

    def test_min_variance_fallback_solves_on_the_shrunk_covariance(self):
        m = market(22, 5)  # no asset reaches 50%/yr: the target is infeasible
        shrunk = 0.5 * m["cov"] + 0.5 * np.diag(np.diag(m["cov"]))
        item = dataclasses.replace(inputs_at(0, m), fallback_cov=shrunk)
        specs = parse_strategies([{"name": "t", "objective": "target_return",
                                   "parameters": {"target_return": 5.0}, "constraints": BOUNDS}])
        df = optimize_walk_forward(specs, SYMBOLS, [item])
        assert status_of(df, "t") == "fallback:min_variance:infeasible"
        x = cp.Variable(5)
        cp.Problem(cp.Minimize(cp.quad_form(x, cp.psd_wrap(shrunk))), [cp.sum(x) == 1, x >= 0, x <= 0.5]).solve(**OSQP_REF)
        np.testing.assert_allclose(weights_of(df, "t"), x.value, atol=1e-5)

    def test_fallback_flag_must_be_boolean(self):
        with pytest.raises(ConfigError, match="fallback_in_turbulence='yes' must be true or false"):
            parse_strategies([{"name": "t", "objective": "min_variance", "fallback_in_turbulence": "yes"}])


class TestLiquidUniverse:
    def test_trailing_volume_and_mask_by_hand(self):
        from perpfolio.optimize.universe import liquid_universe, trailing_quote_volume

        v = np.array([[1.0, 10.0, 5.0], [3.0, np.nan, 5.0], [5.0, 30.0, 5.0], [7.0, 40.0, 5.0]])
        got = trailing_quote_volume(v, np.array([1, 3]), window=2)
        np.testing.assert_allclose(got, [[2.0, 10.0, 5.0], [6.0, 35.0, 5.0]])
        mask = liquid_universe(got, min_quote_volume=4.0, top_k=2)
        np.testing.assert_array_equal(mask, [[False, True, True], [True, True, False]])
        ties = liquid_universe(np.array([[5.0, 5.0, 5.0]]), top_k=2)  # ties: column order decides
        np.testing.assert_array_equal(ties, [[True, True, False]])

    @pytest.mark.parametrize("solver", ["CLARABEL", "OSQP"])
    def test_untradable_assets_are_held_at_zero_and_the_rest_is_optimal(self, solver):
        m = market(31, 5)
        tradable = np.array([True, False, True, True, False])
        spec = dataclasses.replace(spec_of("min_variance")[0], solver=solver)
        result = PortfolioProblem(spec, 5).solve(SolveData(**m, tradable=tradable))
        assert result.status == "optimal"
        np.testing.assert_allclose(result.weights[~tradable], 0.0, atol=1e-8)
        sub = m["cov"][np.ix_(tradable, tradable)]
        x = cp.Variable(3)
        cp.Problem(cp.Minimize(cp.quad_form(x, cp.psd_wrap(sub))), [cp.sum(x) == 1, x >= 0, x <= 0.5]).solve(**OSQP_REF)
        np.testing.assert_allclose(result.weights[tradable], x.value, atol=1e-5)

    def test_too_few_liquid_assets_lift_the_filter_and_say_so(self):
        m = market(32, 5)
        item = dataclasses.replace(inputs_at(0, m), tradable=np.array([True, False, False, False, False]))
        df = optimize_walk_forward(spec_of("min_variance"), SYMBOLS, [item])  # one asset cannot hold 100% at max 50%
        assert status_of(df, "min_variance") == "fallback:min_variance:too_few_liquid"
        assert weights_of(df, "min_variance").sum() == pytest.approx(1.0, abs=1e-6)


class TestSizing:
    def test_vol_target_leverage_by_hand(self):
        from perpfolio.optimize.sizing import vol_target_leverage

        cov = np.array([[0.04, 0.0], [0.0, 0.16]])  # 20% and 40% vol, uncorrelated
        w = np.array([0.5, 0.5])  # book vol = sqrt(0.25*0.04 + 0.25*0.16) = sqrt(0.05)
        assert vol_target_leverage(w, cov, target_vol=0.10, max_leverage=3.0) == pytest.approx(0.10 / np.sqrt(0.05))
        assert vol_target_leverage(w, cov, target_vol=1.0, max_leverage=3.0) == 3.0  # capped
        assert vol_target_leverage(w, np.zeros((2, 2)), target_vol=0.1, max_leverage=2.0) == 2.0
        with pytest.raises(DataError, match="not finite"):
            vol_target_leverage(w, np.full((2, 2), np.nan), target_vol=0.1, max_leverage=2.0)

    def test_drawdown_cash_buffer_by_hand(self):
        from perpfolio.optimize.sizing import drawdown_cash_buffer

        assert drawdown_cash_buffer(0.0, 0.2, target_vol=0.2, base=0.05) == pytest.approx(0.05)
        # 10% drawdown and predicted vol 50% above target: 0.05 + 1.0*0.10 + 0.5*0.5
        assert drawdown_cash_buffer(-0.10, 0.3, target_vol=0.2, base=0.05) == pytest.approx(0.40)
        assert drawdown_cash_buffer(-0.60, 0.3, target_vol=0.2) == 0.5  # capped at max_cash
        with pytest.raises(ConfigError, match="max_cash"):
            drawdown_cash_buffer(0.0, 0.2, target_vol=0.2, base=0.6)


class TestEstimatorByName:
    def specs(self, estimator: str):
        return parse_strategies([{"name": "s", "objective": "min_variance", "estimator": estimator, "constraints": BOUNDS}])

    def test_a_strategy_solves_on_the_estimator_it_names(self):
        from perpfolio.optimize import EstimateSet

        m = market(41, 5)
        shrunk = 0.3 * m["cov"] + 0.7 * np.diag(np.diag(m["cov"]))
        item = dataclasses.replace(inputs_at(0, m), alternatives={
            "ledoit_wolf": EstimateSet(m["mu"], shrunk, m["downside"], m["semicov"], "ok")})
        df = optimize_walk_forward(self.specs("ledoit_wolf") , SYMBOLS, [item])
        x = cp.Variable(5)
        cp.Problem(cp.Minimize(cp.quad_form(x, cp.psd_wrap(shrunk))), [cp.sum(x) == 1, x >= 0, x <= 0.5]).solve(**OSQP_REF)
        np.testing.assert_allclose(weights_of(df, "s"), x.value, atol=1e-5)
        with pytest.raises(DataError, match="estimator 'oas' has no estimates .* available: \\['sample', 'ledoit_wolf'\\]"):
            optimize_walk_forward(self.specs("oas"), SYMBOLS, [item])

    def test_unknown_estimator_is_rejected_at_load(self):
        with pytest.raises(ConfigError, match="estimator='garch' is not one of"):
            self.specs("garch")
        assert self.specs("ledoit_wolf_reset")[0].estimator == "ledoit_wolf_reset"


class TestCompiledOnce:
    def test_every_problem_is_dpp(self):
        for s in load_strategies(STRATEGIES) + TestConstraintsAlwaysHold.EXTRA:
            assert PortfolioProblem(s, 4).problem.is_dpp(), s.name

    def test_resolving_does_not_rebuild(self, monkeypatch):
        """Count cp.Problem constructions: as many as strategies, whatever the number of asofs."""
        built = []

        class CountingProblem(cp.Problem):
            def __init__(self, *args, **kw):
                built.append(1)
                super().__init__(*args, **kw)

        monkeypatch.setattr(cp, "Problem", CountingProblem)
        specs = load_strategies(STRATEGIES)
        counts = []
        for n_asofs in (2, 8):
            built.clear()
            steps = [inputs_at(k, market(k, 4, mu_floor=0.4)) for k in range(n_asofs)]
            df = optimize_walk_forward(specs, SYMBOLS[:4], steps)
            assert (df["status"] == "optimal").all()
            counts.append(len(built))
        assert counts == [len(specs), len(specs)]

    def test_resolve_reuses_cvxpy_canonicalization(self):
        problem = PortfolioProblem(spec_of("downside")[-1], 4)
        problem.solve(SolveData(**market(1, 4)))
        cached = problem.problem._cache.param_prog
        problem.solve(SolveData(**market(2, 4)))
        assert problem.problem._cache.param_prog is cached


class TestRescaling:
    """Hourly-scale inputs (annualized / 8760, covariances ~1e-5) give the annualized weights."""

    @pytest.mark.parametrize(
        "objective", ["min_variance", "max_sharpe", "downside", "semivariance", "vrp_tilt", "hybrid"]
    )
    def test_hourly_equals_annualized(self, objective):
        m = market(21, 5, mu_floor=0.3)
        hourly = {k: v / 8760 for k, v in m.items()}
        assert np.diag(hourly["cov"]).max() < 1e-3
        specs = spec_of(objective)
        annual_df = optimize_walk_forward(specs, SYMBOLS, [inputs_at(0, m)])
        hourly_df = optimize_walk_forward(specs, SYMBOLS, [inputs_at(0, hourly)])
        assert status_of(hourly_df, objective) == "optimal"
        np.testing.assert_allclose(
            weights_of(hourly_df, objective), weights_of(annual_df, objective), atol=1e-6
        )

    def test_solver_sees_identical_numbers(self):
        """The rescaling makes the parameter values independent of the input scale."""
        m = market(22, 5)
        problem = PortfolioProblem(spec_of("vrp_tilt")[-1], 5)
        seen = []
        for data in (m, {k: v / 8760 for k, v in m.items()}):
            problem.solve(SolveData(**data))
            seen.append([
                p.value_sparse.toarray() if p.sparse_idx is not None else np.array(p.value)
                for p in problem.problem.parameters()
            ])
        for a, b in zip(*seen):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


class TestFallbackChain:
    SPECS = load_strategies(STRATEGIES)

    def run(self, steps, previous=None) -> pl.DataFrame:
        return optimize_walk_forward(
            self.SPECS, SYMBOLS[:3], [inputs_at(k, m, s) for k, (m, s) in enumerate(steps)], previous=previous
        )

    def test_nan_covariance_without_previous_gives_equal_weights(self):
        m = market(1, 3)
        m["cov"][0, 0] = np.nan
        df = self.run([(m, "ok")])
        for s in self.SPECS:
            assert status_of(df, s.name) == "fallback:equal:nonfinite_input"
            np.testing.assert_allclose(weights_of(df, s.name), np.full(3, 1 / 3))
        assert df["objective"].null_count() == df.height

    def test_covariance_that_is_not_psd_is_not_solved(self):
        m = market(1, 3)
        m["cov"] = np.array([[1.0, 0.9, 0.0], [0.9, 1.0, 0.9], [0.0, 0.9, 1.0]])  # eigenvalue < 0
        assert np.linalg.eigvalsh(m["cov"])[0] < 0
        df = self.run([(m, "ok")], previous={"downside": np.array([0.4, 0.3, 0.3])})
        assert status_of(df, "downside") == "fallback:previous:not_psd"
        assert status_of(df, "min_variance") == "fallback:equal:not_psd"

    def test_singular_covariance_is_solved(self):
        """Perfectly correlated assets (rank-1 Σ): the eigen/QR factor needs no jitter."""
        vols = np.array([0.5, 0.6, 0.8])
        m = market(1, 3)
        m["cov"] = np.outer(vols, vols)
        df = self.run([(m, "ok")])
        w = weights_of(df, "min_variance")
        assert status_of(df, "min_variance") == "optimal"
        # min (w'vols)^2 with 0 <= w <= 0.5: the two least volatile assets at 50% each
        np.testing.assert_allclose(w, [0.5, 0.5, 0.0], atol=1e-6)

    def test_insufficient_history_reuses_previous_weights(self):
        nan = {k: np.full_like(v, np.nan) for k, v in market(1, 3).items()}
        prev = np.array([0.5, 0.3, 0.2])
        df = self.run([(nan, "insufficient_history")], previous={"max_sharpe": prev})
        assert status_of(df, "max_sharpe") == "fallback:previous:insufficient_history"
        np.testing.assert_array_equal(weights_of(df, "max_sharpe"), prev)
        assert status_of(df, "downside") == "fallback:equal:insufficient_history"

    def test_previous_weights_carry_across_asofs(self):
        m = market(2, 3, mu_floor=0.4)
        nan = {k: np.full_like(v, np.nan) for k, v in m.items()}
        df = self.run([(m, "ok"), (nan, "missing_data")])
        for s in self.SPECS:
            assert status_of(df, s.name, 0) == "optimal"
            assert status_of(df, s.name, 1) == "fallback:previous:missing_data"
            np.testing.assert_array_equal(weights_of(df, s.name, 1), weights_of(df, s.name, 0))

    def test_previous_weights_outside_bounds_are_not_reused(self):
        nan = {k: np.full_like(v, np.nan) for k, v in market(1, 3).items()}
        df = self.run([(nan, "missing_data")], previous={"min_variance": np.array([0.7, 0.2, 0.1])})
        assert status_of(df, "min_variance") == "fallback:equal:missing_data"

    def test_unreachable_target_falls_back_to_min_variance(self):
        m = market(4, 3)
        m["mu"] = np.array([0.05, -0.1, 0.15])  # 20% a year is out of reach
        df = self.run([(m, "ok")])
        assert status_of(df, "target_return") == "fallback:min_variance:infeasible"
        w = weights_of(df, "target_return")
        assert w @ m["cov"] @ w == pytest.approx(reference("min_variance", m), rel=1e-5)
        np.testing.assert_allclose(w, weights_of(df, "min_variance"), atol=1e-6)

    def test_no_positive_mean_makes_max_sharpe_fall_back(self):
        m = market(4, 3)
        m["mu"] = np.array([-0.05, -0.1, -0.2])
        df = self.run([(m, "ok")])
        assert status_of(df, "max_sharpe") == "fallback:min_variance:infeasible"
        assert status_of(df, "vrp_tilt") == "optimal"

    def test_nan_vrp_is_no_tilt(self):
        m = market(6, 3)
        m["vrp"] = np.full(3, np.nan)
        tilted = parse_strategies([{"name": "t", "objective": "vrp_tilt", "constraints": BOUNDS}])
        df = optimize_walk_forward(tilted, SYMBOLS[:3], [inputs_at(0, m)])
        assert status_of(df, "t") == "optimal"
        assert df["objective"][0] == pytest.approx(reference("vrp_tilt", m), rel=1e-5)


class TestHybrid:
    def test_overlay_cap_binds_and_holds(self):
        m = market(8, 4)
        m["vrp"] = np.array([0.4, -0.4, 0.0, np.nan])  # a strong tilt pulls away from the baseline
        specs = load_strategies(STRATEGIES)
        df = optimize_walk_forward(specs, SYMBOLS[:4], [inputs_at(0, m)])
        w, base = weights_of(df, "hybrid"), weights_of(df, "min_variance")
        assert 0.5 * np.abs(w - base).sum() == pytest.approx(0.20, abs=1e-6)
        # the unconstrained overlay moves further than the cap allows
        vrp = weights_of(df, "vrp_tilt")
        assert 0.5 * np.abs(vrp - base).sum() > 0.2


class TestInputErrors:
    def test_asofs_must_ascend(self):
        m = market(1, 3)
        with pytest.raises(DataError, match="strictly ascending"):
            optimize_walk_forward(spec_of("min_variance"), SYMBOLS[:3], [inputs_at(1, m), inputs_at(0, m)])

    def test_shape_mismatch_names_the_field(self):
        m = market(1, 3)
        m["cov"] = m["cov"][:2, :2]
        with pytest.raises(DataError, match=r"cov has shape \(2, 2\), expected \(3, 3\)"):
            optimize_walk_forward(spec_of("min_variance"), SYMBOLS[:3], [inputs_at(0, m)])

    def test_hybrid_needs_its_baseline_in_the_run(self):
        hybrid = [s for s in load_strategies(STRATEGIES) if s.name == "hybrid"]
        with pytest.raises(ConfigError, match=r"strategy 'hybrid': baseline='min_variance'"):
            optimize_walk_forward(hybrid, SYMBOLS[:3], [inputs_at(0, market(1, 3))])

    def test_previous_must_be_finite(self):
        with pytest.raises(DataError, match=r"previous\['min_variance'\]"):
            optimize_walk_forward(
                spec_of("min_variance"), SYMBOLS[:3], [], previous={"min_variance": [np.nan, 0.5, 0.5]}
            )
