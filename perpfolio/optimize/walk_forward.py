"""Walk-forward optimization with a recorded fallback chain (the efficient frontier: ``frontier.py``).

Per asof and strategy the decision is the first of:

1. the strategy itself (only when the estimate status is "ok"),
2. classical min-variance under the strategy's constraints on ``fallback_cov`` (e.g. Ledoit-Wolf)
   when given, else on the strategy's covariance (only when the estimate status is "ok"); a
   strategy with ``fallback_in_turbulence = true`` goes here directly in a turbulent regime
   (reason "turbulent_regime"), the article's market-stress fallback,
3. the previous weights of the strategy, if they satisfy budget, bounds and leverage,
4. equal weights ``budget / n`` clipped to the bounds, if they satisfy budget, bounds and leverage
   (always true for strategies that passed :func:`validate_for_universe`).

Every asof is solved on its point-in-time universe (``AsofInputs.members``): the problem has one
variable per member, the other symbols hold weight 0. When the members are too few for the
budget under the bounds (``n min_weight <= budget <= n max_weight`` fails), the strategy holds
``clip(budget / n, min_weight, max_weight)`` in each member and the rest in cash
(``fallback:equal_capped:universe_too_small``; ``fallback:flat:<why>`` with no member, e.g.
``fallback:flat:insufficient_history`` during the warm-up):
the bounds hold and the row says why the budget does not. The previous weights are a fallback
only when they hold nothing outside the universe.

``status`` is "optimal" or ``"fallback:<which>:<reason>"`` where ``which`` is
min_variance | previous | equal | equal_capped | flat and ``reason`` is why the strategy was not used: the
estimate status ("insufficient_history", "missing_data", "degenerate"), the universe
("universe_too_small", "empty_universe") or the solve failure ("nonfinite_input",
"missing_input", "not_psd", "zero_risk", "infeasible", "unbounded", "solver_error",
"nonfinite_solution", "verification_failed"). Weights are never NaN.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import polars as pl

from perpfolio.errors import ConfigError, DataError, SolverError
from perpfolio.optimize.config import StrategySpec, validate_for_universe
from perpfolio.optimize.problem import TOLERANCE, PortfolioProblem, base_constraints, min_variance_fallback
from perpfolio.optimize.terms import SolveData

WEIGHTS_SCHEMA = {
    "as_of": pl.Datetime("us", "UTC"),
    "strategy": pl.String,
    "symbol": pl.String,
    "weight": pl.Float64,
    "budget": pl.Float64,
    "status": pl.String,
    "solver": pl.String,
    "objective": pl.Float64,
    "solve_ms": pl.Float64,
}


@dataclass(frozen=True)
class EstimateSet:
    """Annualized moments of one named estimator at one asof, with its status."""

    mu: np.ndarray
    cov: np.ndarray
    downside: np.ndarray
    semicov: np.ndarray
    status: str


@dataclass(frozen=True)
class AsofInputs:
    """Annualized estimates at one asof (N symbols, in the order of ``symbols``).

    ``mu``, ``downside`` (N); ``cov``, ``semicov`` (N x N); ``vrp`` (N, annualized variance,
    NaN = unknown, no tilt); ``status`` is the estimate status ("ok" or why the arrays are NaN).
    ``scenarios`` (T x N per-bar net returns of the window) feed a CVaR limit and
    ``window_years`` a robust mean; both may be None when no strategy uses them. ``regime``
    ("calm"/"turbulent") drives ``fallback_in_turbulence``; ``fallback_cov`` (a shrunk covariance,
    e.g. Ledoit-Wolf) is what the min-variance fallback solves on; ``tradable`` (N bools) is the
    liquid universe of :func:`perpfolio.optimize.universe.liquid_universe`; ``funding_1h`` (N) the
    forecast funding rate per hour of the signals (+ = longs pay, NaN = unknown) for a funding
    tilt (None when no strategy uses it). The moment fields are
    the "sample" estimator; ``alternatives`` holds the other named estimators a strategy may pick.
    ``members`` (N bools, None = all) is the point-in-time universe: the strategies are solved on
    those symbols only, so the arrays may be NaN elsewhere (``scenarios`` rows must be complete
    for the members). ``vrp_with_proxy`` (N) is the VRP a strategy with ``vrp_source =
    "with_proxy"`` reads instead of ``vrp`` (None: no proxied series, the same as ``vrp``). A naive
    ``asof`` is taken as UTC.
    """

    asof: datetime
    mu: np.ndarray
    cov: np.ndarray
    downside: np.ndarray
    semicov: np.ndarray
    vrp: np.ndarray
    status: str
    scenarios: np.ndarray | None = None
    window_years: float | None = None
    regime: str | None = None
    fallback_cov: np.ndarray | None = None
    tradable: np.ndarray | None = None
    alternatives: dict[str, EstimateSet] | None = None
    funding_1h: np.ndarray | None = None
    members: np.ndarray | None = None
    vrp_with_proxy: np.ndarray | None = None


@dataclass(frozen=True)
class Decision:
    """Weights held by one strategy at one asof and how they were obtained."""

    weights: np.ndarray
    status: str
    solver: str
    objective: float | None
    solve_ms: float


class ProblemCache:
    """Compiled problems keyed by (strategy name, number of assets), built on first use and reused
    afterwards (a universe of a new size compiles its problems once)."""

    def __init__(self) -> None:
        self.problems: dict[tuple[str, int], PortfolioProblem] = {}

    def get(self, spec: StrategySpec, n_assets: int) -> PortfolioProblem:
        key = (spec.name, n_assets)
        if key not in self.problems:
            self.problems[key] = PortfolioProblem(spec, n_assets)
        return self.problems[key]


def decide(
    spec: StrategySpec, data: SolveData, *, estimate_status: str, cache: ProblemCache,
    regime: str | None = None, fallback_cov: np.ndarray | None = None, hold_previous: bool = True,
) -> Decision:
    """Run the fallback chain of the module docstring for one strategy at one asof, on the
    ``len(data.mu)`` assets of ``data``.

    ``regime`` "turbulent" sends a strategy with ``fallback_in_turbulence`` straight to the
    min-variance step; ``fallback_cov`` (e.g. Ledoit-Wolf) is the covariance of that step when it is
    finite, else the strategy's own covariance is used. ``hold_previous`` False skips the
    previous-weights step (they held a symbol that has left the universe).
    """
    start = time.perf_counter()
    n_assets = len(data.mu)
    primary = cache.get(spec, n_assets)

    def done(w: np.ndarray, status: str, solver: str) -> Decision:
        ms = (time.perf_counter() - start) * 1e3
        return Decision(np.array(w, dtype=float), status, solver, primary.objective_value(w, data), ms)

    reason = estimate_status
    c = spec.constraints
    if data.tradable is not None and not (
        int(np.sum(data.tradable)) * c.min_weight <= c.budget <= int(np.sum(data.tradable)) * c.max_weight
    ):  # too few liquid assets to place the budget within the bounds: the filter is lifted, and said so
        data = dataclasses.replace(data, tradable=None)
        reason = estimate_status if estimate_status != "ok" else "too_few_liquid"
    if reason == "ok":
        if spec.fallback_in_turbulence and regime == "turbulent":
            reason = "turbulent_regime"
        else:
            result = primary.solve(data)
            if result.status == "optimal":
                return done(result.weights, "optimal", result.solver)
            reason = result.status
    if estimate_status == "ok":
        cov = fallback_cov if fallback_cov is not None and np.isfinite(fallback_cov).all() else data.cov
        if np.isfinite(cov).all():
            result = cache.get(min_variance_fallback(spec), n_assets).solve(dataclasses.replace(data, cov=cov))
            if result.status == "optimal":
                return done(result.weights, f"fallback:min_variance:{reason}", result.solver)
    # the fallbacks must meet the data-independent constraints (budget, bounds, leverage, margin)
    basic = [t for t in base_constraints(spec) if not getattr(t, "depends_on_data", False)]
    if hold_previous and data.w_prev is not None and max(t.violation(data.w_prev, data) for t in basic) <= TOLERANCE:
        return done(data.w_prev, f"fallback:previous:{reason}", "none")
    tradable = np.ones(n_assets, dtype=bool) if data.tradable is None else np.asarray(data.tradable, dtype=bool)
    equal = np.where(tradable, c.budget / max(int(tradable.sum()), 1), 0.0)
    if max(t.violation(equal, data) for t in basic) <= TOLERANCE:
        return done(equal, f"fallback:equal:{reason}", "none")
    raise SolverError(
        f"strategy {spec.name!r}: {reason} and no fallback satisfies {basic}; "
        f"run validate_for_universe(specs, {n_assets}) first"
    )


def optimize_walk_forward(
    specs: list[StrategySpec],
    symbols: list[str],
    inputs: Sequence[AsofInputs],
    *,
    previous: dict[str, np.ndarray] | None = None,
) -> pl.DataFrame:
    """Weights of every strategy at every asof (long format, schema ``WEIGHTS_SCHEMA``).

    ``inputs`` must be in strictly ascending asof order. Each strategy's weights at one asof are
    its previous weights at the next (seeded from ``previous[name]`` when given). Hybrids are
    solved after their baseline at the same asof. Each problem is compiled once per call.
    Columns: asof (UTC), strategy, symbol, weight, status, solver ("none" for held/equal
    weights), objective (see ``perpfolio.optimize.problem``; null when not computable),
    solve_ms (wall time of the whole fallback chain).
    """
    n = len(symbols)
    validate_for_universe(specs, n)
    names = {s.name: s.objective for s in specs}
    for s in specs:
        if s.objective == "hybrid" and names.get(s.parameters.baseline, "hybrid") == "hybrid":
            raise ConfigError(
                f"strategy {s.name!r}: baseline={s.parameters.baseline!r} is not a non-hybrid "
                f"strategy of this run ({sorted(names)})"
            )
    cache = ProblemCache()
    prev: dict[str, np.ndarray] = {}
    for name, w in (previous or {}).items():
        w = np.asarray(w, dtype=float)
        if w.shape != (n,) or not np.isfinite(w).all():
            raise DataError(f"previous[{name!r}]: need {n} finite weights, got {w!r}")
        prev[name] = w
    order = sorted(specs, key=lambda s: s.objective == "hybrid")
    rows: dict[str, list] = {key: [] for key in WEIGHTS_SCHEMA}
    last: datetime | None = None
    for item in inputs:
        asof = _check_inputs(item, n, last)
        last = asof
        members = np.ones(n, dtype=bool) if item.members is None else np.asarray(item.members, dtype=bool)
        cols = np.flatnonzero(members)
        decided: dict[str, Decision] = {}  # weights of the members only
        for spec in order:
            w_prev = prev.get(spec.name)
            small = _too_few_members(spec, cols.size, estimate_for(spec, item).status)
            if small is not None:
                decided[spec.name] = small
            else:
                base = decided[spec.parameters.baseline].weights if spec.objective == "hybrid" else None
                data = _member_data(spec, item, cols, w_prev, base)
                decided[spec.name] = decide(
                    spec, data, estimate_status=estimate_for(spec, item).status, cache=cache, regime=item.regime,
                    fallback_cov=_square(item.fallback_cov, cols),
                    hold_previous=w_prev is not None and not np.any(w_prev[~members]),
                )
            full = np.zeros(n)
            full[cols] = decided[spec.name].weights
            prev[spec.name] = full
        for spec in specs:
            d = decided[spec.name]
            rows["as_of"] += [asof] * n
            rows["strategy"] += [spec.name] * n
            rows["symbol"] += list(symbols)
            rows["weight"] += prev[spec.name].tolist()
            rows["budget"] += [spec.constraints.budget] * n
            rows["status"] += [d.status] * n
            rows["solver"] += [d.solver] * n
            rows["objective"] += [d.objective] * n
            rows["solve_ms"] += [d.solve_ms] * n
    return pl.DataFrame(rows, schema=WEIGHTS_SCHEMA)


def _too_few_members(spec: StrategySpec, n_members: int, estimate_status: str) -> Decision | None:
    """The decision when the universe is too small for the strategy's budget under its bounds
    (module docstring), else None. An empty universe says why when the estimate does (e.g. the
    warm-up: ``fallback:flat:insufficient_history``)."""
    c = spec.constraints
    if n_members and n_members * c.min_weight <= c.budget <= n_members * c.max_weight:
        return None
    if not n_members:
        reason = "empty_universe" if estimate_status == "ok" else estimate_status
        return Decision(np.zeros(0), f"fallback:flat:{reason}", "none", None, 0.0)
    each = float(np.clip(c.budget / n_members, c.min_weight, c.max_weight))
    return Decision(np.full(n_members, each), "fallback:equal_capped:universe_too_small", "none", None, 0.0)


def _square(matrix: np.ndarray | None, cols: np.ndarray) -> np.ndarray | None:
    return None if matrix is None else np.asarray(matrix)[np.ix_(cols, cols)]


def _member_data(spec: StrategySpec, item: AsofInputs, cols: np.ndarray, w_prev: np.ndarray | None,
                 w_base: np.ndarray | None) -> SolveData:
    """The strategy's SolveData restricted to the members ``cols`` (``w_base`` already is)."""
    est = estimate_for(spec, item)
    vector = lambda a: None if a is None else np.asarray(a)[cols]  # noqa: E731
    vrp = item.vrp_with_proxy if spec.vrp_source == "with_proxy" and item.vrp_with_proxy is not None else item.vrp
    return SolveData(
        mu=est.mu[cols], cov=_square(est.cov, cols), downside=est.downside[cols], semicov=_square(est.semicov, cols),
        vrp=vector(vrp), w_prev=vector(w_prev), w_base=w_base,
        scenarios=None if item.scenarios is None else np.asarray(item.scenarios)[:, cols],
        window_years=item.window_years, tradable=vector(item.tradable), funding_1h=vector(item.funding_1h),
    )


def estimate_for(spec: StrategySpec, item: AsofInputs) -> EstimateSet:
    """The moments of the estimator the strategy names ("sample" = the AsofInputs fields)."""
    if spec.estimator == "sample":
        return EstimateSet(item.mu, item.cov, item.downside, item.semicov, item.status)
    if not item.alternatives or spec.estimator not in item.alternatives:
        have = ["sample", *sorted(item.alternatives or {})]
        raise DataError(f"strategy {spec.name!r}: estimator {spec.estimator!r} has no estimates at "
                        f"{item.asof}; available: {have}")
    return item.alternatives[spec.estimator]


def _check_inputs(item: AsofInputs, n: int, last: datetime | None) -> datetime:
    if not isinstance(item.asof, datetime):
        raise DataError(f"asof: expected a datetime, got {item.asof!r}")
    asof = item.asof.replace(tzinfo=UTC) if item.asof.tzinfo is None else item.asof.astimezone(UTC)
    where = f"asof {asof.isoformat()}"
    if last is not None and asof <= last:
        raise DataError(f"{where}: inputs must be in strictly ascending asof order (after {last.isoformat()})")
    for key in ("mu", "downside", "vrp", "cov", "semicov"):
        shape = (n, n) if key in ("cov", "semicov") else (n,)
        if np.shape(getattr(item, key)) != shape:
            raise DataError(f"{where}: {key} has shape {np.shape(getattr(item, key))}, expected {shape}")
    if item.members is not None and (np.shape(item.members) != (n,) or np.asarray(item.members).dtype != bool):
        raise DataError(f"{where}: members must be {n} booleans, got {item.members!r}")
    if item.funding_1h is not None and np.shape(item.funding_1h) != (n,):
        raise DataError(f"{where}: funding_1h has shape {np.shape(item.funding_1h)}, expected {(n,)}")
    if not isinstance(item.status, str):
        raise DataError(f"{where}: status must be a string, got {item.status!r}")
    return asof

