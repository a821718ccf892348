r"""Compiled strategy problems: built ONCE per (strategy, n_assets), re-solved per asof.

Objectives (all inputs annualized; :math:`F^\top F = \Sigma`, rf = 0):

- ``min_variance``:  :math:`\min_w w^\top\Sigma w`
- ``target_return``: :math:`\min_w w^\top\Sigma w` s.t. :math:`\mu^\top w \ge \mu_p`
- ``max_sharpe``:    :math:`\min_{y,\kappa} y^\top\Sigma y` s.t. :math:`\hat\mu^\top y = 1`,
  constraints homogenized in :math:`\kappa \ge 0`; :math:`w = y/\kappa` maximizes
  :math:`\mu^\top w / \sqrt{w^\top\Sigma w}`
- ``downside``:      :math:`\min_w \alpha\, w^\top\Sigma w + (1-\alpha) \sum_i w_i D_i`
- ``semivariance``:  :math:`\min_w w^\top\Sigma^- w` (s.t. :math:`\mu^\top w \ge \mu_p` if a target is set)
- ``vrp_tilt``:      :math:`\max_w \tilde\mu^\top w - \tfrac{\gamma}{2} w^\top\Sigma w`,
  :math:`\tilde\mu = \mu + \beta\,\mathrm{VRP} - \beta_f\,8760\,\hat f` (funding tilt, optional)
- ``hybrid``:        :math:`\max_w \tilde\mu^\top w - \tfrac{\gamma}{2}\big(\alpha\, w^\top\Sigma w +
  (1-\alpha)\sum_i w_i D_i\big)` s.t. :math:`\tfrac12\|w - w^{base}\|_1 \le c`

plus the constraint terms of the strategy (budget, bounds, optional gross leverage and max
rebalance) and the optional objective terms (trading cost, L2, robust mean, and for vrp_tilt and
hybrid the VRP penalty :math:`\eta \sum_i \max(0, -\mathrm{VRP}_i)|w_i|`). The reported
``objective`` is the minimized value in annualized units (a negative utility for vrp_tilt/hybrid),
except ``max_sharpe`` which reports the annualized Sharpe ratio (rf = 0) it maximizes.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import cvxpy as cp
import numpy as np

from perpfolio.errors import DataError, SolverError
from perpfolio.optimize.config import StrategySpec
from perpfolio.optimize.direct import DirectQP
from perpfolio.optimize.terms import (
    Bounds,
    Budget,
    CVaRLimit,
    ExpectedReturn,
    GrossLeverage,
    L2Regularization,
    LinearDownside,
    MarginBuffer,
    MaxRebalance,
    OverlayCap,
    QuadraticRisk,
    RobustMean,
    SharpeNormalization,
    SolveData,
    StressLoss,
    TargetReturn,
    TransactionCost,
    VrpPenalty,
    NotPSDError,
    constraint_violations,
    psd_factor,
)

TOLERANCE = 1e-6  # max constraint violation accepted by verification (original units)
SOLVER_OPTIONS: dict[str, dict] = {
    "CLARABEL": {},
    "OSQP": {"warm_start": True, "eps_abs": 1e-9, "eps_rel": 1e-9, "polish": True, "max_iter": 100_000},
}
# OSQP through cvxpy (a strategy with |w|, CVaR or overlay terms) may stop at its iteration limit or
# inaccurate: ADMM converges slowly on those LP-like rows. Such a solve, or one that fails or does not
# verify, is re-solved by CLARABEL (interior point) on the same compiled problem.
RETRY_SOLVER = "CLARABEL"
_DATA_FAILURES = ("missing_input", "not_psd")  # no solver can do better on these inputs
_FAILED_STATUS = {
    cp.INFEASIBLE: "infeasible",
    cp.INFEASIBLE_INACCURATE: "infeasible",
    cp.UNBOUNDED: "unbounded",
    cp.UNBOUNDED_INACCURATE: "unbounded",
}


@dataclass(frozen=True)
class SolveResult:
    """Outcome of one solve: ``status`` is "optimal" or the failure reason
    ("nonfinite_input", "missing_input", "not_psd", "zero_risk", "infeasible", "unbounded", "solver_error",
    "nonfinite_solution", "verification_failed"); ``weights`` is None unless optimal.
    ``solver`` gets the suffix ":optimal_inaccurate" when such a solution passed verification, and
    is "CLARABEL:after_OSQP_<why>" when CLARABEL re-solved a failed or inaccurate OSQP solve."""

    weights: np.ndarray | None
    status: str
    solver: str


def base_constraints(spec: StrategySpec) -> list:
    """Budget, bounds and the optional leverage and max-rebalance terms of a strategy."""
    c = spec.constraints
    terms: list = [Budget(c.budget), Bounds(c.min_weight, c.max_weight)]
    if c.max_leverage is not None:
        terms.append(GrossLeverage(c.max_leverage))
    if c.max_rebalance is not None:
        relaxed = max(abs(c.min_weight), abs(c.max_weight))
        terms.append(MaxRebalance(c.max_rebalance, relaxed=relaxed))
    if c.margin_leverage is not None:
        terms.append(MarginBuffer(c.margin_leverage, c.margin_buffer))
    if c.max_stress_loss is not None:
        terms.append(StressLoss(c.max_stress_loss, c.stress_shock))
    if c.cvar_limit is not None:
        terms.append(CVaRLimit(c.cvar_alpha, c.cvar_limit, c.cvar_scenarios, stress_half_life=c.cvar_stress_half_life))
    return terms


def build_terms(spec: StrategySpec) -> tuple[list, list]:
    """(objective terms, constraint terms) of a strategy."""
    p, obj = spec.parameters, spec.objective
    constraints = base_constraints(spec)
    if obj in ("min_variance", "target_return", "max_sharpe"):
        objective: list = [QuadraticRisk(1.0)]
    elif obj == "downside":
        objective = [QuadraticRisk(p.alpha), LinearDownside(1.0 - p.alpha)]
    elif obj == "semivariance":
        objective = [QuadraticRisk(1.0, matrix="semicov")]
    elif obj == "vrp_tilt":
        objective = [QuadraticRisk(p.risk_aversion / 2), ExpectedReturn(beta=p.beta, funding_beta=p.funding_beta)]
    else:  # hybrid
        gamma = p.risk_aversion
        objective = [
            QuadraticRisk(gamma * p.alpha / 2),
            LinearDownside(gamma * (1.0 - p.alpha) / 2),
            ExpectedReturn(beta=p.beta, funding_beta=p.funding_beta),
        ]
        constraints.append(OverlayCap(p.overlay_cap))
    if p.target_return is not None:
        constraints.append(TargetReturn(p.target_return))
    if spec.constraints.cost_bps > 0:
        objective.append(TransactionCost(spec.constraints.cost_bps))
    if spec.constraints.l2_gamma > 0:
        objective.append(L2Regularization(spec.constraints.l2_gamma))
    if p.robust_kappa:
        objective.append(RobustMean(p.robust_kappa))
    if p.vrp_penalty:
        objective.append(VrpPenalty(p.vrp_penalty))
    return objective, constraints


def min_variance_fallback(spec: StrategySpec) -> StrategySpec:
    """The classical min-variance strategy under the same budget/bounds/leverage/rebalance."""
    return StrategySpec(
        name=f"{spec.name}/min_variance",
        objective="min_variance",
        constraints=dataclasses.replace(spec.constraints, cost_bps=0.0),
        solver="CLARABEL",
    )


class PortfolioProblem:
    """One strategy compiled for ``n_assets`` over ``cp.Parameter`` s (DPP); ``solve`` only sets
    parameter values, so cvxpy reuses its canonicalization on every re-solve."""

    def __init__(self, spec: StrategySpec, n_assets: int) -> None:
        self.spec = spec
        self.n_assets = n_assets
        self.objective_terms, self.constraints = build_terms(spec)
        w = cp.Variable(n_assets, name="w")
        sharpe = spec.objective == "max_sharpe"
        kappa = cp.Variable(nonneg=True, name="kappa") if sharpe else 1.0
        self.normalization = [SharpeNormalization()] if sharpe else []
        expr, cons = 0, []
        for term in self.objective_terms:
            e, c = term.compile(w, kappa)
            expr, cons = expr + e, cons + c
        for term in self.constraints + self.normalization:
            cons += term.compile(w, kappa)
        self.w, self.kappa = w, kappa
        self.problem = cp.Problem(cp.Minimize(expr), cons)
        if not self.problem.is_dpp():
            raise SolverError(f"strategy {spec.name!r}: compiled problem is not DPP; terms {self.terms}")
        self.risk_matrix = "semicov" if spec.objective == "semivariance" else "cov"
        # every moment any term reads, constraints included (a stress limit reads cov's betas)
        self.needs = tuple(sorted({key for term in self.terms for key in term.reads}))
        # solver "OSQP" on a plain QP skips cvxpy per solve; everything else goes through cvxpy
        direct = spec.solver == "OSQP" and not sharpe and DirectQP.supports(self.objective_terms, self.constraints)
        self.direct = DirectQP(self.objective_terms, self.constraints, n_assets) if direct else None

    @property
    def terms(self) -> list:
        return self.objective_terms + self.constraints + self.normalization

    def __repr__(self) -> str:
        return f"PortfolioProblem({self.spec.name!r}, n_assets={self.n_assets}, terms={self.terms})"

    def inputs_finite(self, data: SolveData) -> bool:
        """True when every input a term reads (``needs``) is finite (VRP may be NaN, never inf)."""
        finite = all(np.isfinite(getattr(data, k)).all() for k in self.needs)
        if self.spec.objective in ("vrp_tilt", "hybrid"):
            finite = finite and not np.isinf(data.vrp).any()
            finite = finite and (data.funding_1h is None or not np.isinf(data.funding_1h).any())
        return finite

    def solve(self, data: SolveData) -> SolveResult:
        """Set the parameters from ``data`` (rescaled), solve, and verify in original units."""
        self._check_shapes(data)
        solver = self.spec.solver
        if not self.inputs_finite(data):
            return SolveResult(None, "nonfinite_input", solver)
        risk = getattr(data, self.risk_matrix)
        trace = float(np.trace(risk))
        if not trace > 0:
            return SolveResult(None, "zero_risk", solver)
        if self.normalization and not np.any(
            data.mu > 0 if self.spec.constraints.min_weight >= 0 else data.mu != 0
        ):
            return SolveResult(None, "infeasible", solver)  # no allowed portfolio has mu'w > 0
        scale = self.n_assets / trace
        if self.direct is not None:
            try:
                psd_factor(risk, name=self.risk_matrix)
            except NotPSDError:
                return SolveResult(None, "not_psd", solver)
            try:
                w, status = self.direct.solve(data, scale)
            except DataError:
                return SolveResult(None, "missing_input", solver)  # e.g. a funding tilt without a forecast
        else:
            w, status = self._solve_cvxpy(data, scale, solver)
        failure = self._failure(w, status, data)
        if solver == "OSQP" and status not in _DATA_FAILURES and (failure or status != cp.OPTIMAL):
            # OSQP (direct or through cvxpy) at its iteration limit, inaccurate or failing: CLARABEL re-solves
            w, status = self._solve_cvxpy(data, scale, RETRY_SOLVER)
            solver = f"{RETRY_SOLVER}:after_OSQP_{failure or status}"
        failure = self._failure(w, status, data)
        if failure:
            return SolveResult(None, failure, solver)
        label = solver if status == cp.OPTIMAL else f"{solver}:{status}"
        return SolveResult(np.asarray(w, dtype=float), "optimal", label)

    def _failure(self, w: np.ndarray | None, status: str, data: SolveData) -> str | None:
        """Why the solve's weights cannot be stored (the failed status, "nonfinite_solution" or
        "verification_failed": a constraint violated by more than TOLERANCE), or None."""
        if w is None:
            return status
        if not np.isfinite(w).all():
            return "nonfinite_solution"
        if max(self.constraint_violations(w, data).values(), default=0.0) > TOLERANCE:
            return "verification_failed"
        return None

    def _solve_cvxpy(self, data: SolveData, scale: float, solver: str) -> tuple[np.ndarray | None, str]:
        """Set the parameters (scaled) and solve the compiled cvxpy problem with ``solver``:
        (weights, status)."""
        try:
            for term in self.terms:
                term.update(data, scale)
        except NotPSDError:
            return None, "not_psd"
        except DataError:
            return None, "missing_input"  # a term's data (scenarios, window length) is absent or not finite
        try:
            with warnings.catch_warnings():  # cvxpy itself reads the sparse factor's .value
                warnings.filterwarnings("ignore", "Reading from a sparse CVXPY", RuntimeWarning)
                self.problem.solve(solver=solver, **SOLVER_OPTIONS[solver])
        except cp.error.SolverError:
            return None, "solver_error"
        status = self.problem.status
        if status in _FAILED_STATUS:
            return None, _FAILED_STATUS[status]
        if status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or self.w.value is None:
            return None, "solver_error"
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.w.value / (self.kappa.value if self.normalization else 1.0), status

    def constraint_violations(self, w: np.ndarray, data: SolveData) -> dict[str, float]:
        """Violation of every constraint of the strategy at ``w`` in original units."""
        return constraint_violations(w, self.constraints, data)

    def objective_value(self, w: np.ndarray, data: SolveData) -> float | None:
        """The strategy's objective at ``w`` in annualized units (Sharpe ratio for max_sharpe);
        None when the inputs it needs are not finite or missing (a robust mean without
        ``window_years``)."""
        if not self.inputs_finite(data):
            return None
        if self.normalization:
            var = float(w @ data.cov @ w)
            return float(w @ data.mu) / np.sqrt(var) if var > 0 else None
        try:
            return float(sum(term.value(w, data) for term in self.objective_terms))
        except DataError:  # a term's input is absent: the fallback weights are stored without a value
            return None

    def _check_shapes(self, data: SolveData) -> None:
        n = self.n_assets
        for key in ("mu", "downside", "vrp", "cov", "semicov", "w_prev", "w_base", "funding_1h"):
            value = getattr(data, key)
            shape = (n, n) if key in ("cov", "semicov") else (n,)
            if value is not None and np.shape(value) != shape:
                raise DataError(
                    f"strategy {self.spec.name!r}: {key} has shape {np.shape(value)}, expected {shape}"
                )
