"""Portfolio optimization: strategies as data, composable terms, compiled problems, fallbacks.

- :mod:`~perpfolio.optimize.config`: ``[[strategy]]`` tables -> frozen :class:`StrategySpec`.
- :mod:`~perpfolio.optimize.terms`: objective and constraint terms (compile once, update per solve).
- :mod:`~perpfolio.optimize.problem`: one DPP problem per (strategy, n_assets), verified solves.
- :mod:`~perpfolio.optimize.walk_forward`: the walk-forward loop with its fallback chain.
- :mod:`~perpfolio.optimize.frontier`: the efficient frontier as a warm-started sweep of targets.

All inputs are ANNUALIZED (``perpfolio.estimators.annualize``); the problems rescale them again
internally so that the solver sees unit-order numbers whatever the input scale.
"""

from perpfolio.optimize.config import (
    OBJECTIVES,
    Constraints,
    Parameters,
    StrategySpec,
    load_strategies,
    parse_strategies,
    validate_for_universe,
)
from perpfolio.optimize.frontier import FRONTIER_SCHEMA, EfficientFrontier, FrontierPoint, frontier_walk, max_return_portfolio
from perpfolio.optimize.problem import PortfolioProblem, SolveResult, build_terms
from perpfolio.optimize.terms import SolveData, constraint_violations, psd_factor
from perpfolio.optimize.walk_forward import (
    WEIGHTS_SCHEMA,
    AsofInputs,
    Decision,
    EstimateSet,
    ProblemCache,
    decide,
    optimize_walk_forward,
)

__all__ = [
    "FRONTIER_SCHEMA",
    "OBJECTIVES",
    "WEIGHTS_SCHEMA",
    "AsofInputs",
    "Constraints",
    "Decision",
    "EfficientFrontier",
    "EstimateSet",
    "FrontierPoint",
    "Parameters",
    "PortfolioProblem",
    "ProblemCache",
    "SolveData",
    "SolveResult",
    "StrategySpec",
    "build_terms",
    "constraint_violations",
    "decide",
    "frontier_walk",
    "load_strategies",
    "max_return_portfolio",
    "optimize_walk_forward",
    "parse_strategies",
    "psd_factor",
    "validate_for_universe",
]
