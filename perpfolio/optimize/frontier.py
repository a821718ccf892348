r"""The efficient frontier: a sweep of target returns on compiled, warm-started problems.

At one asof with annualized mean :math:`\mu` and covariance :math:`\Sigma` (N assets), under a
budget :math:`\sum_i w_i = b` and bounds :math:`\ell \le w_i \le u`, point :math:`k = 0..P-1` of
the frontier is

.. math:: w_k = \arg\min_w w^\top\Sigma w \quad\text{s.t.}\quad \mu^\top w \ge \mu_k,\;
          \sum_i w_i = b,\; \ell \le w_i \le u,
.. math:: \mu_k = \mu_{mv} + \tfrac{k}{P-1}\,(\mu_{max} - \mu_{mv}),

where :math:`\mu_{mv} = \mu^\top w_{mv}` is the return of the min-variance portfolio (point 0 IS
that portfolio) and :math:`\mu_{max} = \max_w \mu^\top w` over the same budget and bounds (the
greedy fill of :func:`max_return_portfolio`, exact for a box and a budget). At the last target
the feasible set is the set of max-return portfolios; when that LP optimum is unique (no tie in
:math:`\mu` between an asset that could gain weight and one that could lose it) the point is
that portfolio exactly, otherwise it is solved like the others. (A target whose feasible set is
a single point is ill-posed for a first-order solver: OSQP may stop at its iteration limit or
1e-5 away.) Every point lies on
the efficient branch, so its volatility :math:`\sqrt{w_k^\top\Sigma w_k}` is non-decreasing in
k and :math:`\mu^\top w_k = \mu_k`. Expected returns and volatilities are annualized decimals;
``sharpe`` is :math:`\mu^\top w_k / \sqrt{w_k^\top\Sigma w_k}` (risk-free rate 0).

Speed: :class:`EfficientFrontier` compiles two problems once (min-variance and target-return,
solver "OSQP" = the direct OSQP path of :mod:`perpfolio.optimize.direct`: one workspace, values
updated, warm-started from the previous point), so a sweep of P points is P small re-solves.
Every solution is verified against budget, bounds and target in original units, as in
:class:`perpfolio.optimize.problem.PortfolioProblem`.

A point that fails keeps its row with ``status`` "failed:<reason>" (reasons of
:class:`~perpfolio.optimize.problem.SolveResult`: "infeasible", "solver_error",
"verification_failed", "not_psd", "zero_risk", ...) and null weight, return and volatility;
when the min-variance point itself fails there is no target range, so every point of that asof
is "failed:min_variance:<reason>" with a null target. Weights are never NaN.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import polars as pl

from perpfolio.errors import DataError
from perpfolio.optimize.config import Constraints, Parameters, Solver, StrategySpec, validate_for_universe
from perpfolio.optimize.problem import PortfolioProblem
from perpfolio.optimize.terms import SolveData

FRONTIER_SCHEMA = {
    "as_of": pl.Datetime("us", "UTC"),
    "point": pl.Int64,
    "target_return": pl.Float64,
    "expected_return": pl.Float64,
    "volatility": pl.Float64,
    "sharpe": pl.Float64,
    "symbol": pl.String,
    "weight": pl.Float64,
    "budget": pl.Float64,
    "min_weight": pl.Float64,
    "max_weight": pl.Float64,
    "status": pl.String,
}
OPTIMAL = "optimal"


@dataclass(frozen=True)
class FrontierPoint:
    """One point: the target (annualized decimal; None when there was no target range), the
    weights (None unless ``status`` is "optimal") and the status."""

    target_return: float | None
    weights: np.ndarray | None
    status: str


def max_return_portfolio(mu: np.ndarray, *, budget: float, min_weight: float, max_weight: float) -> np.ndarray:
    r"""The portfolio of highest :math:`\mu^\top w` s.t. :math:`\sum_i w_i = b`, :math:`\ell \le w_i \le u`.

    Greedy fill, exact for this LP: every asset starts at :math:`\ell`, then the remaining budget
    :math:`b - N\ell` goes to the assets in descending :math:`\mu_i`, each up to :math:`u`.
    Needs :math:`N\ell \le b \le Nu` (see ``validate_for_universe``); ties in :math:`\mu` are
    filled in index order.
    """
    w = np.full(mu.shape[0], float(min_weight))
    room = budget - mu.shape[0] * min_weight
    for i in np.argsort(-mu, kind="stable"):
        step = min(max_weight - min_weight, room)
        w[i] += step
        room -= step
    return w


def unique_max_return(w: np.ndarray, mu: np.ndarray, *, min_weight: float, max_weight: float) -> bool:
    """True when ``w`` (a max-return portfolio) is the ONLY one: no asset that could gain weight
    (``w_i < max_weight``) has the same mean as an asset that could lose weight (``w_j > min_weight``)."""
    can_gain, can_lose = w < max_weight, w > min_weight
    return not any(mu[i] == mu[j] for i in np.flatnonzero(can_gain) for j in np.flatnonzero(can_lose) if i != j)


class EfficientFrontier:
    """The frontier of the module docstring for ``n_assets`` under budget and bounds, compiled once.

    Reuse one instance across asofs: each call only sets parameter values and re-solves,
    warm-started (solver "OSQP"); "CLARABEL" runs the same problems through cvxpy.
    """

    def __init__(self, n_assets: int, *, budget: float = 1.0, min_weight: float = 0.0, max_weight: float = 1.0,
                 solver: Solver = "OSQP") -> None:
        self.n_assets = n_assets
        self.constraints = Constraints(budget=budget, min_weight=min_weight, max_weight=max_weight)
        target = StrategySpec(name="frontier", objective="target_return", constraints=self.constraints,
                              parameters=Parameters(target_return=0.0), solver=solver)  # target set per point
        min_variance = dataclasses.replace(target, name="frontier/min_variance", objective="min_variance",
                                           parameters=Parameters())
        validate_for_universe([target], n_assets)
        self.target_problem = PortfolioProblem(target, n_assets)
        self.min_variance_problem = PortfolioProblem(min_variance, n_assets)

    def __repr__(self) -> str:
        c = self.constraints
        return (f"EfficientFrontier(n_assets={self.n_assets}, budget={c.budget}, min_weight={c.min_weight}, "
                f"max_weight={c.max_weight}, solver={self.target_problem.spec.solver!r})")

    def _data(self, mu: np.ndarray, cov: np.ndarray) -> SolveData:
        mu, cov = np.asarray(mu, dtype=float), np.asarray(cov, dtype=float)
        n = self.n_assets
        if mu.shape != (n,) or cov.shape != (n, n):
            raise DataError(f"efficient frontier: mu {mu.shape} and cov {cov.shape} must be ({n},) and ({n}, {n})")
        if not (np.isfinite(mu).all() and np.isfinite(cov).all()):
            raise DataError("efficient frontier: mu and cov must be finite (filter estimates whose status is not ok)")
        zeros = np.zeros(n)
        return SolveData(mu=mu, cov=cov, downside=zeros, semicov=cov, vrp=zeros)

    def solve_targets(self, mu: np.ndarray, cov: np.ndarray, targets: Sequence[float]) -> list[FrontierPoint]:
        """min wᵀΣw s.t. μᵀw >= target, budget and bounds, for each target in order (warm-started)."""
        data = self._data(mu, cov)
        points = []
        for target in targets:
            result = self.target_problem.solve(dataclasses.replace(data, target_return=float(target)))
            ok = result.status == OPTIMAL
            points.append(FrontierPoint(float(target), result.weights if ok else None,
                                        OPTIMAL if ok else f"failed:{result.status}"))
        return points

    def sweep(self, mu: np.ndarray, cov: np.ndarray, n_points: int) -> list[FrontierPoint]:
        """The ``n_points`` points of the module docstring: min variance, then evenly spaced targets
        up to the highest attainable return."""
        if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 2:
            raise DataError(f"efficient frontier: n_points={n_points!r} must be an int >= 2")
        data = self._data(mu, cov)
        first = self.min_variance_problem.solve(data)
        if first.status != OPTIMAL:
            return [FrontierPoint(None, None, f"failed:min_variance:{first.status}")] * n_points
        c = self.constraints
        top = max_return_portfolio(data.mu, budget=c.budget, min_weight=c.min_weight, max_weight=c.max_weight)
        low = float(data.mu @ first.weights)
        high = max(float(data.mu @ top), low)  # the min-variance return is attainable: never above the max
        targets = np.linspace(low, high, n_points)
        if high > low and unique_max_return(top, data.mu, min_weight=c.min_weight, max_weight=c.max_weight):
            last = [FrontierPoint(high, top, OPTIMAL)]  # the only portfolio that reaches the top target
            targets = targets[:-1]
        else:
            last = []
        return [FrontierPoint(low, first.weights, OPTIMAL), *self.solve_targets(data.mu, data.cov, targets[1:]), *last]


def frontier_walk(
    asofs: Sequence[datetime], mu: np.ndarray, cov: np.ndarray, symbols: Sequence[str], *, n_points: int,
    constraints: Constraints, solver: Solver = "OSQP",
) -> tuple[pl.DataFrame, list[float]]:
    """The frontier at every asof (long format, ``FRONTIER_SCHEMA``) and the wall time of each
    asof's sweep in milliseconds.

    ``mu`` (K x N) and ``cov`` (K x N x N) are annualized estimates at the K ``asofs`` (naive =
    UTC), finite; only ``budget``, ``min_weight`` and ``max_weight`` of ``constraints`` apply.
    One :class:`EfficientFrontier` serves every asof. Rows: asof x point x symbol, with the
    point's target, expected return, volatility, Sharpe (null unless optimal, Sharpe also null
    at zero volatility), weight (null unless optimal), the bounds and the status.
    """
    n = len(symbols)
    mu, cov = np.asarray(mu, dtype=float), np.asarray(cov, dtype=float)
    if mu.shape != (len(asofs), n) or cov.shape != (len(asofs), n, n):
        raise DataError(f"frontier_walk: mu {mu.shape} and cov {cov.shape} must be ({len(asofs)}, {n}) and "
                        f"({len(asofs)}, {n}, {n}) for {len(asofs)} asofs and symbols {list(symbols)}")
    frontier = EfficientFrontier(n, budget=constraints.budget, min_weight=constraints.min_weight,
                                 max_weight=constraints.max_weight, solver=solver)
    rows: dict[str, list] = {key: [] for key in FRONTIER_SCHEMA}
    timings = []
    for k, asof in enumerate(asofs):
        start = time.perf_counter()
        try:
            points = frontier.sweep(mu[k], cov[k], n_points)
        except DataError as exc:
            raise DataError(f"frontier_walk at asof {asof}: {exc}") from exc
        timings.append((time.perf_counter() - start) * 1e3)
        stamp = asof.replace(tzinfo=UTC) if asof.tzinfo is None else asof.astimezone(UTC)
        for p, point in enumerate(points):
            w = point.weights
            ret = vol = sharpe = None
            if w is not None:
                ret, vol = float(mu[k] @ w), float(np.sqrt(max(float(w @ cov[k] @ w), 0.0)))
                sharpe = ret / vol if vol > 0 else None
            rows["as_of"] += [stamp] * n
            rows["point"] += [p] * n
            rows["target_return"] += [point.target_return] * n
            rows["expected_return"] += [ret] * n
            rows["volatility"] += [vol] * n
            rows["sharpe"] += [sharpe] * n
            rows["symbol"] += list(symbols)
            rows["weight"] += [None] * n if w is None else w.tolist()
            rows["budget"] += [constraints.budget] * n
            rows["min_weight"] += [constraints.min_weight] * n
            rows["max_weight"] += [constraints.max_weight] * n
            rows["status"] += [point.status] * n
    return pl.DataFrame(rows, schema=FRONTIER_SCHEMA), timings
