"""Strategies as data: the ``[[strategy]]`` tables of ``config/strategies.toml``.

A strategy is one objective, its parameters and a set of constraints::

    [[strategy]]
    name = "downside"                 # unique; the ``strategy`` column of portfolio.weights
    objective = "downside"            # one of OBJECTIVES
    solver = "CLARABEL"               # optional: "CLARABEL" (default) | "OSQP" (warm-started; quadratic programs, so no robust_kappa)
    fallback_in_turbulence = false    # optional: in a turbulent regime use min-variance instead
    estimator = "sample"              # optional: mean/covariance estimator by name (features.estimates)
    [strategy.parameters]
    alpha = 0.5
    [strategy.constraints]
    budget = 1.0                      # sum_i w_i = budget (fractions of equity)
    min_weight = 0.0                  # 0 = long-only; negative allows shorts
    max_weight = 0.5
    # max_leverage = 1.5              # sum_i |w_i| <= L (optional)
    # max_rebalance = 0.1             # |w_i - w_prev_i| <= delta per rebalance (optional)
    # cost_bps = 5.0                  # objective penalty sum_i c |w_i - w_prev_i|, c = cost_bps / 1e4
    # l2_gamma = 0.1                  # objective penalty l2_gamma * ||w||^2
    # margin_leverage = 5.0           # with margin_buffer: sum_i |w_i| / margin_leverage <= 1 - margin_buffer
    # margin_buffer = 0.2
    # max_stress_loss = 0.08          # loss of an instant stress_shock (reference by beta, and all assets) <= 8%
    # stress_shock = -0.10
    # cvar_limit = 0.02               # CVaR at cvar_alpha of the per-bar loss over the last cvar_scenarios bars <= 2%
    # cvar_alpha = 0.95
    # cvar_scenarios = 720
    # cvar_stress_half_life = 48      # stressed scenarios: each bar rescaled up to today's EWMA vol (half-life, bars)

All return-like parameters (``target_return``) are ANNUALIZED decimals (0.20 = 20% a year), like
the annualized moments the optimizer receives. Unknown keys, unknown objectives, wrong types and
constraint sets that can never be satisfied raise :class:`perpfolio.errors.ConfigError` naming
the strategy, the key and the value. Feasibility that depends on the number of assets is checked
by :func:`validate_for_universe`; feasibility that depends on the data (a target return above
every asset's mean) is handled at solve time by the fallback chain.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal, get_args

from perpfolio.errors import ConfigError
from perpfolio.estimators import ESTIMATORS

Objective = Literal[
    "min_variance", "target_return", "max_sharpe", "downside", "semivariance", "vrp_tilt", "hybrid"
]
Solver = Literal["CLARABEL", "OSQP"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
SOLVERS: tuple[str, ...] = get_args(Solver)

_REQUIRED = object()
# Parameters each objective accepts, with their defaults (_REQUIRED = no default).
OBJECTIVE_PARAMETERS: dict[str, dict[str, object]] = {
    "min_variance": {},
    "target_return": {"target_return": _REQUIRED},
    "max_sharpe": {},
    "downside": {"alpha": 0.5},
    "semivariance": {"target_return": None},
    "vrp_tilt": {"beta": 1.0, "risk_aversion": 5.0, "robust_kappa": 0.0, "vrp_penalty": 0.0, "funding_beta": 0.0},
    "hybrid": {
        "baseline": "min_variance",
        "overlay_cap": 0.20,
        "alpha": 0.5,
        "beta": 1.0,
        "risk_aversion": 5.0,
        "robust_kappa": 0.0,
        "vrp_penalty": 0.0,
        "funding_beta": 0.0,
    },
}


@dataclass(frozen=True)
class Parameters:
    """Objective parameters; a field is None when the objective does not use it.

    - ``target_return``: annualized decimal, ``w'mu >= target_return``.
    - ``alpha`` in [0, 1]: weight of the variance in ``alpha w'Sigma w + (1 - alpha) sum_i w_i D_i``.
    - ``beta``: VRP tilt, ``mu_i = mu_i^hist + beta * VRP_i`` (VRP in annualized variance units).
    - ``risk_aversion`` > 0: gamma of the utility ``mu'w - gamma/2 * risk(w)``.
    - ``baseline``: name of the (non-hybrid) strategy whose weights anchor a hybrid.
    - ``overlay_cap`` >= 0: ``1/2 ||w - w_base||_1 <= overlay_cap``.
    - ``robust_kappa`` >= 0: use the worst case of mu within kappa standard errors (0 = off).
    - ``vrp_penalty`` >= 0: eta of the charge ``eta * sum_i max(0, -VRP_i) |w_i|`` (0 = off).
    - ``funding_beta``: funding tilt, ``mu_i -= funding_beta * 8760 * f_i`` with f_i the forecast
      funding rate per hour (+ = longs pay); 0 = off.
    """

    target_return: float | None = None
    alpha: float | None = None
    beta: float | None = None
    risk_aversion: float | None = None
    baseline: str | None = None
    overlay_cap: float | None = None
    robust_kappa: float | None = None
    vrp_penalty: float | None = None
    funding_beta: float | None = None


@dataclass(frozen=True)
class Constraints:
    """Constraint and cost settings shared by every objective (weights are fractions of equity)."""

    budget: float = 1.0
    min_weight: float = 0.0
    max_weight: float = 1.0
    max_leverage: float | None = None
    max_rebalance: float | None = None
    cost_bps: float = 0.0
    l2_gamma: float = 0.0
    margin_leverage: float | None = None
    margin_buffer: float = 0.0
    max_stress_loss: float | None = None
    stress_shock: float = -0.10
    cvar_limit: float | None = None
    cvar_alpha: float = 0.95
    cvar_scenarios: int = 720
    cvar_stress_half_life: float | None = None


VrpSource = Literal["signal", "with_proxy"]


@dataclass(frozen=True)
class StrategySpec:
    """One strategy: an objective, its parameters, its constraints and the solver to use."""

    name: str
    objective: Objective
    parameters: Parameters = field(default_factory=Parameters)
    constraints: Constraints = field(default_factory=Constraints)
    solver: Solver = "CLARABEL"
    fallback_in_turbulence: bool = False
    estimator: str = "sample"
    vrp_source: VrpSource = "signal"


def load_strategies(path: str | Path, *, n_assets: int | None = None) -> list[StrategySpec]:
    """Read and validate the ``[[strategy]]`` tables of a TOML file.

    With ``n_assets`` the universe-dependent checks of :func:`validate_for_universe` run too.
    Raises ConfigError naming the strategy and key for anything invalid or never feasible.
    """
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    unknown = set(doc) - {"strategy"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; expected [[strategy]]")
    tables = doc.get("strategy", [])
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{path}: no [[strategy]] tables")
    specs = parse_strategies(tables)
    if n_assets is not None:
        validate_for_universe(specs, n_assets)
    return specs


def parse_strategies(tables: list[dict]) -> list[StrategySpec]:
    """Validate already-parsed strategy tables (the TOML structure as dicts); see load_strategies."""
    specs = [_parse_one(i, table) for i, table in enumerate(tables)]
    names = [s.name for s in specs]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"strategy {name!r}: name is defined {names.count(name)} times")
    by_name = {s.name: s for s in specs}
    for s in specs:
        if s.objective == "hybrid":
            base = by_name.get(s.parameters.baseline)
            if base is None or base.objective == "hybrid":
                raise ConfigError(
                    f"strategy {s.name!r}: parameters.baseline={s.parameters.baseline!r} must name "
                    f"a non-hybrid strategy of the same file (have {names})"
                )
    return specs


def validate_for_universe(specs: list[StrategySpec], n_assets: int) -> None:
    """Reject strategies whose budget and bounds cannot hold for ``n_assets`` assets.

    Feasible iff :math:`n \\cdot \\text{min\\_weight} \\le \\text{budget} \\le n \\cdot
    \\text{max\\_weight}`; then equal weights ``budget / n`` satisfy budget, bounds and (since
    ``max_leverage >= |budget|`` is checked at load) leverage, so the last fallback always exists.
    """
    if isinstance(n_assets, bool) or not isinstance(n_assets, int) or n_assets < 1:
        raise ConfigError(f"n_assets must be a positive int, got {n_assets!r}")
    for s in specs:
        c = s.constraints
        if not n_assets * c.min_weight <= c.budget <= n_assets * c.max_weight:
            raise ConfigError(
                f"strategy {s.name!r}: constraints budget={c.budget}, min_weight={c.min_weight}, "
                f"max_weight={c.max_weight} can never be satisfied with n_assets={n_assets} "
                f"(need n_assets*min_weight <= budget <= n_assets*max_weight)"
            )


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _number(name: str, key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"strategy {name!r}: {key}={value!r} must be a finite number")
    return float(value)


def _parse_one(index: int, table: dict) -> StrategySpec:
    name = table.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"strategy #{index}: name {name!r} must be 1-64 letters, digits, '_', '-' or '.', starting "
                          "with a letter or digit (it names files of the report and columns of the warehouse)")
    unknown = set(table) - {"name", "objective", "parameters", "constraints", "solver", "fallback_in_turbulence", "estimator",
                            "vrp_source"}
    if unknown:
        raise ConfigError(f"strategy {name!r}: unknown key(s) {sorted(unknown)}")
    objective = table.get("objective")
    if objective not in OBJECTIVES:
        raise ConfigError(f"strategy {name!r}: objective={objective!r} is not one of {OBJECTIVES}")
    solver = table.get("solver", "CLARABEL")
    if solver not in SOLVERS:
        raise ConfigError(f"strategy {name!r}: solver={solver!r} is not one of {SOLVERS}")
    turbulence = table.get("fallback_in_turbulence", False)
    if not isinstance(turbulence, bool):
        raise ConfigError(f"strategy {name!r}: fallback_in_turbulence={turbulence!r} must be true or false")
    estimator = table.get("estimator", "sample")
    base = estimator.removesuffix("_reset") if isinstance(estimator, str) else None
    if base not in ESTIMATORS:
        raise ConfigError(
            f"strategy {name!r}: estimator={estimator!r} is not one of {sorted(ESTIMATORS)} "
            "(optionally with the suffix _reset for the regime-reset window)"
        )
    vrp_source = table.get("vrp_source", "signal")
    if vrp_source not in get_args(VrpSource):
        raise ConfigError(f"strategy {name!r}: vrp_source={vrp_source!r} is not one of {get_args(VrpSource)} (signal: "
                          "signals.signals.vrp, the symbol's own implied vol; with_proxy: vrp_with_proxy, the BTC-scaled "
                          "proxy where a symbol has no index of its own)")
    spec = StrategySpec(
        name=name,
        fallback_in_turbulence=turbulence,
        estimator=estimator,
        vrp_source=vrp_source,
        objective=objective,
        parameters=_parse_parameters(name, objective, table.get("parameters", {})),
        constraints=_parse_constraints(name, table.get("constraints", {})),
        solver=solver,
    )
    _check_feasible(spec)
    return spec


def _parse_parameters(name: str, objective: str, raw: object) -> Parameters:
    if not isinstance(raw, dict):
        raise ConfigError(f"strategy {name!r}: 'parameters' must be a table, got {raw!r}")
    allowed = OBJECTIVE_PARAMETERS[objective]
    unknown = set(raw) - set(allowed)
    if unknown:
        raise ConfigError(
            f"strategy {name!r}: unknown parameter(s) {sorted(unknown)} for objective "
            f"{objective!r} (allowed: {sorted(allowed)})"
        )
    values: dict[str, object] = {}
    for key, default in allowed.items():
        value = raw.get(key, default)
        if value is _REQUIRED:
            raise ConfigError(f"strategy {name!r}: objective {objective!r} needs parameters.{key}")
        if key == "baseline":
            if not isinstance(value, str):
                raise ConfigError(f"strategy {name!r}: parameters.baseline={value!r} must be a string")
        elif value is not None:
            value = _number(name, f"parameters.{key}", value)
        values[key] = value
    p = Parameters(**values)
    if p.alpha is not None and not 0.0 <= p.alpha <= 1.0:
        raise ConfigError(f"strategy {name!r}: parameters.alpha={p.alpha} must be in [0, 1]")
    if p.risk_aversion is not None and p.risk_aversion <= 0:
        raise ConfigError(f"strategy {name!r}: parameters.risk_aversion={p.risk_aversion} must be > 0")
    if p.robust_kappa is not None and p.robust_kappa < 0:
        raise ConfigError(f"strategy {name!r}: parameters.robust_kappa={p.robust_kappa} must be >= 0")
    if p.vrp_penalty is not None and p.vrp_penalty < 0:
        raise ConfigError(f"strategy {name!r}: parameters.vrp_penalty={p.vrp_penalty} must be >= 0")
    if p.overlay_cap is not None and p.overlay_cap < 0:
        raise ConfigError(f"strategy {name!r}: parameters.overlay_cap={p.overlay_cap} must be >= 0")
    return p


def _parse_constraints(name: str, raw: object) -> Constraints:
    if not isinstance(raw, dict):
        raise ConfigError(f"strategy {name!r}: 'constraints' must be a table, got {raw!r}")
    allowed = {f.name for f in fields(Constraints)}
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(
            f"strategy {name!r}: unknown constraint(s) {sorted(unknown)} (allowed: {sorted(allowed)})"
        )
    c = Constraints(**{k: _number(name, f"constraints.{k}", v) for k, v in raw.items()})
    if c.cvar_scenarios != int(c.cvar_scenarios) or c.cvar_scenarios < 2:
        raise ConfigError(f"strategy {name!r}: constraints.cvar_scenarios={c.cvar_scenarios} must be a whole number >= 2")
    c = replace(c, cvar_scenarios=int(c.cvar_scenarios))
    if not 0.5 <= c.cvar_alpha < 1.0:
        raise ConfigError(f"strategy {name!r}: constraints.cvar_alpha={c.cvar_alpha} must be in [0.5, 1)")
    if c.cvar_stress_half_life is not None and not c.cvar_stress_half_life > 0:
        raise ConfigError(f"strategy {name!r}: constraints.cvar_stress_half_life={c.cvar_stress_half_life} "
                          f"must be > 0 bars")
    if c.cvar_limit is not None and c.cvar_limit <= 0:
        raise ConfigError(f"strategy {name!r}: constraints.cvar_limit={c.cvar_limit} must be > 0")
    for key in ("max_leverage", "max_rebalance"):
        value = getattr(c, key)
        if value is not None and value <= 0:
            raise ConfigError(f"strategy {name!r}: constraints.{key}={value} must be > 0")
    for key in ("cost_bps", "l2_gamma"):
        if getattr(c, key) < 0:
            raise ConfigError(f"strategy {name!r}: constraints.{key}={getattr(c, key)} must be >= 0")
    for key in ("margin_leverage", "max_stress_loss"):
        value = getattr(c, key)
        if value is not None and value <= 0:
            raise ConfigError(f"strategy {name!r}: constraints.{key}={value} must be > 0")
    if not 0.0 <= c.margin_buffer < 1.0:
        raise ConfigError(f"strategy {name!r}: constraints.margin_buffer={c.margin_buffer} must be in [0, 1)")
    if c.margin_buffer > 0 and c.margin_leverage is None:
        raise ConfigError(f"strategy {name!r}: constraints.margin_buffer needs constraints.margin_leverage")
    if c.stress_shock >= 0:
        raise ConfigError(f"strategy {name!r}: constraints.stress_shock={c.stress_shock} must be a loss (< 0)")
    return c


def _check_feasible(s: StrategySpec) -> None:
    """Checks that need no universe size: bounds order, budget sign, leverage, objective limits."""
    c = s.constraints
    never = f"strategy {s.name!r}: constraints"
    if c.min_weight > c.max_weight:
        raise ConfigError(
            f"{never} min_weight={c.min_weight} > max_weight={c.max_weight} can never be satisfied"
        )
    # some n with n*min_weight <= budget <= n*max_weight exists iff the budget's sign is reachable
    if (c.budget > 0 >= c.max_weight) or (c.budget < 0 <= c.min_weight) or (
        c.budget == 0 and not c.min_weight <= 0 <= c.max_weight
    ):
        raise ConfigError(
            f"{never} budget={c.budget} with min_weight={c.min_weight}, max_weight={c.max_weight} "
            f"can never be satisfied for any number of assets"
        )
    # sum|w| >= |sum w| = |budget| for every w
    if c.max_leverage is not None and c.max_leverage < abs(c.budget):
        raise ConfigError(
            f"{never} max_leverage={c.max_leverage} < |budget|={abs(c.budget)} can never be satisfied"
        )
    # sum|w| >= |budget|, so the initial margin is at least |budget| / margin_leverage
    if c.margin_leverage is not None and abs(c.budget) / c.margin_leverage > 1.0 - c.margin_buffer:
        raise ConfigError(
            f"{never} margin_leverage={c.margin_leverage}, margin_buffer={c.margin_buffer} with "
            f"budget={c.budget} can never be satisfied (needs |budget|/margin_leverage <= 1 - margin_buffer)"
        )
    # in the all-assets scenario every book loses |stress_shock| * budget, whatever its weights
    if c.max_stress_loss is not None and c.budget > 0 and c.max_stress_loss < -c.stress_shock * c.budget:
        raise ConfigError(
            f"{never} max_stress_loss={c.max_stress_loss} < |stress_shock| * budget = "
            f"{-c.stress_shock * c.budget:g} can never be satisfied (every asset moving by stress_shock)"
        )
    if s.objective == "max_sharpe":
        if c.budget <= 0:
            raise ConfigError(
                f"strategy {s.name!r}: objective 'max_sharpe' needs constraints.budget > 0, "
                f"got {c.budget} (the Sharpe ratio of a zero-budget book has no scale)"
            )
        if c.cost_bps != 0:
            raise ConfigError(
                f"strategy {s.name!r}: constraints.cost_bps={c.cost_bps} is not supported with "
                f"objective 'max_sharpe' (the cost is not scale-invariant); use 0"
            )
    if s.solver == "OSQP" and s.parameters.robust_kappa:
        raise ConfigError(
            f"strategy {s.name!r}: parameters.robust_kappa={s.parameters.robust_kappa} adds the cone term "
            f"kappa * ||G w||_2, which solver 'OSQP' (quadratic programs only) cannot solve; "
            f"use solver = \"CLARABEL\" or robust_kappa = 0"
        )
