"""portfolio.frontier: the efficient frontier at every rebalance asof, with its plot.

The frontier is solved under the budget and weight bounds of the strategies file's min-variance
strategy (the first strategy whose objective is ``min_variance``; the first strategy when there is
none) on the estimates that strategy reads (its ``estimator`` in features.estimates), over each
asof's point-in-time universe (the symbols with estimates). Asofs whose estimate status is not
"ok" (warm-up, missing data) or whose universe is too small for the budget under the bounds have
no frontier and no rows.
"""

from datetime import datetime

import dagster as dg
import numpy as np
import polars as pl

from assets import schemas
from assets.checks import table_asset, validated
from assets.features import estimates_in
from assets.portfolio import WEIGHTS, stored_moments
from perpfolio import report
from perpfolio.optimize import FRONTIER_SCHEMA, Constraints, StrategySpec, frontier_walk, load_strategies, validate_for_universe
from pipelines.partitions import run_policy
from pipelines.settings import Settings

FRONTIER = dg.AssetKey(["portfolio", "frontier"])


def frontier_strategy(specs: list[StrategySpec]) -> StrategySpec:
    """The strategy whose budget, bounds and estimator define the frontier: the first with objective
    ``min_variance``, else the first of the file."""
    return next((s for s in specs if s.objective == "min_variance"), specs[0])


def frontier_moments(estimates: pl.DataFrame, symbols: list[str], estimator: str) -> tuple[list[datetime], np.ndarray, np.ndarray, np.ndarray]:
    """(asofs as UTC datetimes, K x N annualized means, K x N x N annualized covariances, K statuses)
    of ``estimator`` in features.estimates, in the configured symbol order; NaN for a symbol
    outside an asof's universe."""
    asofs, moments = stored_moments(estimates, estimator, symbols)
    stamps = pl.Series(asofs).dt.replace_time_zone("UTC").to_list()
    return stamps, moments.mean, moments.cov, moments.status


def frontier_by_universe(asofs: list[datetime], mu: np.ndarray, cov: np.ndarray, symbols: list[str], *,
                         n_points: int, constraints: Constraints) -> tuple[pl.DataFrame, list[float], int]:
    """The frontier of every asof on its own universe (the symbols with a finite mean), solved in
    groups of asofs with the same members; (frames, sweep timings, asofs skipped because the
    members are too few for the budget under the bounds)."""
    members = np.isfinite(mu)
    groups: dict[bytes, list[int]] = {}
    for k in range(len(asofs)):
        groups.setdefault(members[k].tobytes(), []).append(k)
    frames, timings, skipped = [], [], 0
    for todo in groups.values():
        cols = np.flatnonzero(members[todo[0]])
        c = constraints
        if not cols.size or not cols.size * c.min_weight <= c.budget <= cols.size * c.max_weight:
            skipped += len(todo)
            continue
        frame, times = frontier_walk([asofs[k] for k in todo], mu[np.ix_(todo, cols)], cov[np.ix_(todo, cols, cols)],
                                     [symbols[i] for i in cols], n_points=n_points, constraints=c)
        frames.append(frame)
        timings += times
    frame = pl.concat(frames).sort("as_of", "point") if frames else pl.DataFrame(schema=FRONTIER_SCHEMA)
    return frame, timings, skipped


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
    cols = np.flatnonzero(np.isfinite(mu[0]))  # the asof's universe
    mu, cov, names = mu[0][cols], cov[0][np.ix_(cols, cols)], [symbols[i] for i in cols]
    books = {}
    for (strategy,), part in weights.filter(pl.col("as_of") == as_of).group_by("strategy"):
        held = dict(part.select("symbol", "weight").iter_rows())
        w = np.array([held.get(s, 0.0) for s in names])
        books[strategy] = (float(np.sqrt(w @ cov @ w)), float(mu @ w))
    assets = {s: (float(np.sqrt(cov[i, i])), float(mu[i])) for i, s in enumerate(names)}
    return report.plot_frontier(curve["volatility"].to_numpy(), curve["expected_return"].to_numpy(), books,
                                assets=assets, as_of=f"{as_of:%Y-%m-%d %H:%M} UTC", estimator=estimator)


def build(settings: Settings, partitions: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    symbols = list(settings.symbols)
    points = settings.frontier_points

    @table_asset(
        FRONTIER, schemas.Frontier, partitions=partitions, partition_expr="as_of", backfill_policy=run_policy(settings),
        ins={"estimates": estimates_in("mean", "cov"), "weights": dg.AssetIn(WEIGHTS)},
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
        frame, timings, too_small = frontier_by_universe([asofs[k] for k in ok], mu[ok], cov[ok], symbols, n_points=points,
                                                         constraints=c)
        per_point = frame.unique(["as_of", "point"])
        meta |= {
            "asofs": len(ok) - too_small,
            "asofs_skipped_universe_too_small": too_small,
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
