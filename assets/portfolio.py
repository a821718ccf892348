"""portfolio.weights: the optimized target weights of every configured strategy at each rebalance."""

from datetime import datetime

import dagster as dg
import numpy as np
import polars as pl

from assets import schemas
from assets.checks import table_asset, validated
from assets.features import ESTIMATES, NET_RETURNS, UNIVERSE, aligned_returns, one_bar_returns, window_ends
from assets.raw import CANDLES
from assets.signals import SIGNALS, regime_at
from perpfolio import estimators, returns, universe as universe_lib
from perpfolio.optimize import AsofInputs, EstimateSet, load_strategies, optimize_walk_forward, validate_for_universe
from perpfolio.optimize.universe import liquid_universe, trailing_quote_volume
from pipelines.partitions import lookback, partition_window, run_policy
from pipelines.settings import Settings

WEIGHTS = dg.AssetKey(["portfolio", "weights"])
PREVIOUS_PARTITION = dg.TimeWindowPartitionMapping(start_offset=-1, end_offset=-1, allow_nonexistent_upstream_partitions=True)


def previous_weights(stored: pl.DataFrame, before: datetime, symbols: list[str]) -> dict[str, np.ndarray]:
    """Each strategy's stored weights at the latest asof strictly before `before`, in `symbols` order.

    This is where the walk-forward of a partition (or range) starts: the same whether the days
    before were written by this run's predecessor or by one earlier daily run. Strategies whose
    stored row set does not cover exactly `symbols` are left out (they start without previous weights).
    """
    if stored.is_empty() or "as_of" not in stored.columns:
        return {}
    earlier = stored.filter(pl.col("as_of") < before)
    if earlier.is_empty():
        return {}
    last = earlier.filter(pl.col("as_of") == earlier["as_of"].max())
    out = {}
    for (name,), rows in last.group_by("strategy"):
        by_symbol = dict(zip(rows["symbol"].to_list(), rows["weight"].to_list()))
        if sorted(by_symbol) == sorted(symbols):
            out[name] = np.array([by_symbol[s] for s in symbols], dtype=float)
    return out


def stored_moments(estimates: pl.DataFrame, estimator: str, symbols: list[str]) -> tuple[np.ndarray, estimators.Moments]:
    """(asofs, Moments) of one estimator of features.estimates in the configured symbol order; NaN
    for a symbol outside an asof's universe."""
    asofs, _, moments = estimators.moments_from_rows(estimates, estimator=estimator, symbols=symbols)
    return asofs, moments


def _signal_matrix(signals: pl.DataFrame, stamps: pl.DataFrame, symbols: list[str], column: str) -> np.ndarray:
    """asofs x symbols of one signals column; NaN where the signal is null or absent."""
    per_asof = stamps.join(signals.pivot(on="symbol", index="as_of", values=column), on="as_of", how="left")
    wide = per_asof.select(pl.col(s) if s in per_asof.columns else pl.lit(None, pl.Float64).alias(s) for s in symbols)
    return wide.cast(pl.Float64).to_numpy()


def asof_inputs(
    estimates: pl.DataFrame, signals: pl.DataFrame, net_returns: pl.DataFrame, candles: pl.DataFrame,
    universe: pl.DataFrame, symbols: list[str], settings: Settings,
) -> list[AsofInputs]:
    """One optimizer input per asof: annualized sample moments, VRP, the funding forecast, the estimate status, the
    point-in-time universe (features.universe), and what the optional terms need: every other
    named estimator (a strategy's `estimator`), the Ledoit-Wolf covariance for the min-variance
    fallback, the regime, the window's complete one-bar returns of the members (CVaR scenarios),
    the window length in years (robust mean) and the liquid universe (trailing quote volume over
    the window)."""
    asofs, moments = stored_moments(estimates, "sample", symbols)
    alternatives = {name: stored_moments(estimates, name, symbols)[1]  # every other stored estimator
                    for name in sorted(set(estimates["estimator"]) - {"sample"})}
    shrunk = alternatives["ledoit_wolf"].cov if "ledoit_wolf" in alternatives else None
    stamps = pl.DataFrame({"as_of": pl.Series(asofs).dt.replace_time_zone("UTC")})
    vrp = _signal_matrix(signals, stamps, symbols, "vrp")  # NaN (no usable implied vol): a zero tilt downstream
    vrp_with_proxy = _signal_matrix(signals, stamps, symbols, "vrp_with_proxy")
    funding = _signal_matrix(signals, stamps, symbols, "funding_forecast_1h")
    regimes = regime_at(signals, stamps["as_of"].to_list())
    members = universe_lib.members_at(universe, asofs, symbols)
    ts, matrix, _ = one_bar_returns(net_returns, symbols, bar_hours=settings.bar_hours)
    ends = window_ends(ts, stamps["as_of"].to_list())
    window = settings.window_bars
    tradable = None
    if settings.min_quote_volume is not None or settings.top_k is not None:
        quote = candles.with_columns(quote_volume=pl.col("close") * pl.col("volume"))
        q_ts, q_matrix = aligned_returns(quote, symbols, "quote_volume", bar_hours=1)
        hours = window * settings.bar_hours  # candles are hourly
        volume = trailing_quote_volume(q_matrix, window_ends(q_ts, stamps["as_of"].to_list()), window=hours)
        tradable = liquid_universe(volume, min_quote_volume=settings.min_quote_volume, top_k=settings.top_k)

    def scenarios(k: int) -> np.ndarray | None:
        if ends[k] < 0:
            return None
        return matrix[universe_lib.complete_rows(np.isfinite(matrix), members[k], ends[k] - window + 1, ends[k])]

    return [
        AsofInputs(
            asof=asof, mu=moments.mean[k], cov=moments.cov[k], downside=moments.downside[k], semicov=moments.semicov[k],
            vrp=vrp[k], vrp_with_proxy=vrp_with_proxy[k], funding_1h=funding[k], status=str(moments.status[k]),
            regime=regimes[k],
            fallback_cov=None if shrunk is None else shrunk[k], scenarios=scenarios(k),
            window_years=window / returns.periods_per_year(settings.bar_hours),
            tradable=None if tradable is None else tradable[k], members=members[k],
            alternatives={name: EstimateSet(m.mean[k], m.cov[k], m.downside[k], m.semicov[k], str(m.status[k]))
                          for name, m in alternatives.items()},
        )
        for k, asof in enumerate(stamps["as_of"].to_list())
    ]


def build(settings: Settings, partitions: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    symbols = list(settings.symbols)

    @table_asset(
        WEIGHTS, schemas.Weights, partitions=partitions, partition_expr="as_of", backfill_policy=run_policy(settings),
        ins={"estimates": dg.AssetIn(ESTIMATES), "signals": dg.AssetIn(SIGNALS), "universe": dg.AssetIn(UNIVERSE),
             "net_returns": dg.AssetIn(NET_RETURNS, partition_mapping=lookback(settings.lookback_days, settings)),
             "candles": dg.AssetIn(CANDLES, partition_mapping=lookback(settings.lookback_days, settings)),
             # the previous partition's stored weights seed the walk-forward (self-dependency): a range run
             # and a sequence of single-partition runs then start from the same previous weights
             "stored": dg.AssetIn(WEIGHTS, partition_mapping=PREVIOUS_PARTITION, metadata={"allow_missing_table": True})},
        group_name="portfolio", kinds={"duckdb", "cvxpy"},
        description=f"Target weights per rebalance for every strategy in {settings.strategies_file.name}, solved on "
        "the point-in-time universe (features.universe; the other symbols hold 0 and the universe column says why); "
        "status says optimal or which fallback produced them and why.",
    )
    def weights(context: dg.AssetExecutionContext, estimates: pl.DataFrame, signals: pl.DataFrame, universe: pl.DataFrame,
                net_returns: pl.DataFrame, candles: pl.DataFrame, stored: pl.DataFrame):
        specs = load_strategies(settings.strategies_file)
        validate_for_universe(specs, len(symbols))
        if estimates.is_empty():
            yield from validated(schemas.empty(schemas.Weights), schemas.Weights, WEIGHTS, metadata={"decisions": 0})
            return
        previous = previous_weights(stored, partition_window(context, settings).start, symbols)
        inputs = asof_inputs(estimates, signals, net_returns, candles, universe, symbols, settings)
        frame = optimize_walk_forward(specs, symbols, inputs, previous=previous).join(
            universe.select("as_of", "symbol", pl.col("reason").alias("universe")), on=["as_of", "symbol"], how="left")
        per_decision = frame.unique(["as_of", "strategy"])
        statuses = per_decision.group_by("status").len().sort("status")
        meta = {
            "strategies": ", ".join(s.name for s in specs),
            "decisions": per_decision.height,
            "seeded_from_previous_day": ", ".join(sorted(previous)) or "none",
            "solve_ms_mean": float(per_decision["solve_ms"].mean() or 0.0),
            "solve_ms_max": float(per_decision["solve_ms"].max() or 0.0),
            **{f"status_{s}": n for s, n in statuses.iter_rows()},
        }
        yield from validated(frame, schemas.Weights, WEIGHTS, metadata=meta)

    return [weights]
