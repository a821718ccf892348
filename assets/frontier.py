"""portfolio.frontier: the efficient frontier at every rebalance asof, with its plot.

The frontier is solved under the budget and weight bounds of the strategies file's min-variance
strategy (the first strategy whose objective is ``min_variance``; the first strategy when there is
none) on the estimates that strategy reads (its ``estimator`` in features.estimates). Asofs whose
estimate status is not "ok" (warm-up, missing data) have no frontier and no rows.
"""

from datetime import datetime

import dagster as dg
import numpy as np
import polars as pl

from assets import schemas
from assets.checks import table_asset, validated
from assets.features import ESTIMATES
from assets.portfolio import WEIGHTS, _ordered
from perpfolio import estimators, report
from perpfolio.optimize import StrategySpec, frontier_walk, load_strategies, validate_for_universe
from pipelines.settings import Settings

FRONTIER = dg.AssetKey(["portfolio", "frontier"])


def frontier_strategy(specs: list[StrategySpec]) -> StrategySpec:
    """The strategy whose budget, bounds and estimator define the frontier: the first with objective
    ``min_variance``, else the first of the file."""
    return next((s for s in specs if s.objective == "min_variance"), specs[0])


def frontier_moments(estimates: pl.DataFrame, symbols: list[str], estimator: str) -> tuple[list[datetime], np.ndarray, np.ndarray, np.ndarray]:
    """(asofs as UTC datetimes, K x N annualized means, K x N x N annualized covariances, K statuses)
    of ``estimator`` in features.estimates, in the configured symbol order."""
    asofs, found, moments = estimators.moments_from_long(estimates, estimator=estimator)
    if sorted(found) != sorted(symbols):
        raise ValueError(f"features.estimates ({estimator}) holds symbols {found}, expected the configured {symbols}")
    mean, cov = _ordered(moments, found, symbols)[:2]
    stamps = pl.Series(asofs).dt.replace_time_zone("UTC").to_list()
    return stamps, mean, cov, moments.status


def frontier_figure(frontier: pl.DataFrame, estimates: pl.DataFrame, weights: pl.DataFrame, symbols: list[str],
                    estimator: str) -> bytes | None:
    """PNG of the frontier at the latest asof of ``frontier`` with at least two optimal points, every
    strategy's weights of that asof (from ``weights``) and every single asset placed on it with the
    same estimates; None when no asof has two optimal points."""
    solved = frontier.filter(pl.col("status") == "optimal")
    counts = solved.group_by("as_of").agg(pl.col("point").n_unique()).filter(pl.col("point") >= 2)
    if counts.is_empty():
        return None
    as_of = counts["as_of"].max()
    curve = solved.filter(pl.col("as_of") == as_of).unique("point").sort("point")
    _, mu, cov, _ = frontier_moments(estimates.filter(pl.col("as_of") == as_of), symbols, estimator)
    mu, cov = mu[0], cov[0]
    books = {}
    for (strategy,), part in weights.filter(pl.col("as_of") == as_of).group_by("strategy"):
        held = dict(part.select("symbol", "weight").iter_rows())
        w = np.array([held.get(s, 0.0) for s in symbols])
        books[strategy] = (float(np.sqrt(w @ cov @ w)), float(mu @ w))
    assets = {s: (float(np.sqrt(cov[i, i])), float(mu[i])) for i, s in enumerate(symbols)}
    return report.plot_frontier(curve["volatility"].to_numpy(), curve["expected_return"].to_numpy(), books,
                                assets=assets, as_of=f"{as_of:%Y-%m-%d %H:%M} UTC", estimator=estimator)


def build(settings: Settings, partitions: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    symbols = list(settings.symbols)
    points = settings.frontier_points

    @table_asset(
        FRONTIER, schemas.Frontier, partitions=partitions, partition_expr="as_of",
        ins={"estimates": dg.AssetIn(ESTIMATES), "weights": dg.AssetIn(WEIGHTS)},
        group_name="portfolio", kinds={"duckdb", "osqp", "matplotlib"},
        description=f"Efficient frontier per rebalance: {points} points from the min-variance portfolio to the highest "
        f"attainable expected return, min w'Sigma w s.t. mu'w >= target, budget and the weight bounds of the "
        f"min-variance strategy of {settings.strategies_file.name}; plot of the latest asof with every strategy's book.",
    )
    def frontier(estimates: pl.DataFrame, weights: pl.DataFrame):
        spec = frontier_strategy(load_strategies(settings.strategies_file))
        validate_for_universe([spec], len(symbols))
        c = spec.constraints
        meta = {"strategy": spec.name, "estimator": spec.estimator, "points": points, "budget": c.budget,
                "min_weight": c.min_weight, "max_weight": c.max_weight}
        if estimates.is_empty():
            yield from validated(schemas.empty(schemas.Frontier), schemas.Frontier, FRONTIER, metadata={**meta, "asofs": 0})
            return
        asofs, mu, cov, status = frontier_moments(estimates, symbols, spec.estimator)
        ok = np.flatnonzero(status == "ok")
        frame, timings = frontier_walk([asofs[k] for k in ok], mu[ok], cov[ok], symbols, n_points=points, constraints=c)
        per_point = frame.unique(["as_of", "point"])
        meta |= {
            "asofs": len(ok),
            **{f"asofs_skipped_{s}": int(n) for s, n in zip(*np.unique(status[status != "ok"], return_counts=True))},
            "points_failed": int((per_point["status"] != "optimal").sum()),
            "sweep_ms_mean": float(np.mean(timings)) if timings else 0.0,
            "sweep_ms_max": float(np.max(timings)) if timings else 0.0,
        }
        figure = frontier_figure(frame, estimates, weights, symbols, spec.estimator)
        if figure is not None:
            meta["plot"] = dg.MetadataValue.md(report.markdown_image(figure, "efficient_frontier"))
        yield from validated(frame, schemas.Frontier, FRONTIER, metadata=meta)

    return [frontier]
