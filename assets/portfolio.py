"""portfolio.weights: the optimized target weights of every configured strategy at each rebalance."""

from datetime import datetime

import dagster as dg
import numpy as np
import polars as pl

from assets import schemas
from assets.checks import table_asset, validated
from assets.features import ESTIMATES, NET_RETURNS, aligned_returns, window_ends
from assets.raw import CANDLES
from assets.signals import SIGNALS, regime_at
from perpfolio import estimators, returns
from perpfolio.optimize import AsofInputs, EstimateSet, load_strategies, optimize_walk_forward, validate_for_universe
from perpfolio.optimize.universe import liquid_universe, trailing_quote_volume
from pipelines.partitions import lookback
from pipelines.settings import Settings

WEIGHTS = dg.AssetKey(["portfolio", "weights"])
PREVIOUS_DAY = dg.TimeWindowPartitionMapping(start_offset=-1, end_offset=-1, allow_nonexistent_upstream_partitions=True)


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


def _ordered(moments: estimators.Moments, found: list[str], symbols: list[str]) -> tuple[np.ndarray, ...]:
    order = [found.index(s) for s in symbols]
    return (moments.mean[:, order], moments.cov[:, order][:, :, order], moments.downside[:, order],
            moments.semicov[:, order][:, :, order])


def _signal_matrix(signals: pl.DataFrame, stamps: pl.DataFrame, symbols: list[str], column: str) -> np.ndarray:
    """asofs x symbols of one signals column; NaN where the signal is null or absent."""
    per_asof = stamps.join(signals.pivot(on="symbol", index="as_of", values=column), on="as_of", how="left")
    wide = per_asof.select(pl.col(s) if s in per_asof.columns else pl.lit(None, pl.Float64).alias(s) for s in symbols)
    return wide.cast(pl.Float64).to_numpy()


def asof_inputs(
    estimates: pl.DataFrame, signals: pl.DataFrame, net_returns: pl.DataFrame, candles: pl.DataFrame,
    symbols: list[str], settings: Settings,
) -> list[AsofInputs]:
    """One optimizer input per asof: annualized sample moments, VRP, the funding forecast, the estimate status, and what
    the optional terms need: every other named estimator (a strategy's `estimator`), the
    Ledoit-Wolf covariance for the min-variance fallback, the regime,
    the window's return scenarios (CVaR), the window length in years (robust mean) and the
    liquid universe (trailing quote volume over the window)."""
    asofs, found, moments = estimators.moments_from_long(estimates, estimator="sample")
    if sorted(found) != sorted(symbols):
        raise ValueError(f"features.estimates holds symbols {found}, expected the configured {symbols}")
    mean, cov, downside, semicov = _ordered(moments, found, symbols)
    alternatives = {}  # every other stored estimator, for strategies that name one
    for name in sorted(set(estimates["estimator"]) - {"sample"}):
        _, alt_found, alt = estimators.moments_from_long(estimates, estimator=name)
        alternatives[name] = (*_ordered(alt, alt_found, symbols), alt.status)
    shrunk = alternatives["ledoit_wolf"][1] if "ledoit_wolf" in alternatives else None
    stamps = pl.DataFrame({"as_of": pl.Series(asofs).dt.replace_time_zone("UTC")})
    vrp = _signal_matrix(signals, stamps, symbols, "vrp")  # NaN (no usable implied vol): a zero tilt downstream
    funding = _signal_matrix(signals, stamps, symbols, "funding_forecast_1h")
    regimes = regime_at(signals, stamps["as_of"].to_list())
    ts, matrix = aligned_returns(net_returns, symbols)
    ends = window_ends(ts, stamps["as_of"].to_list())
    window = settings.window_bars
    tradable = None
    if settings.min_quote_volume is not None or settings.top_k is not None:
        quote = candles.with_columns(quote_volume=pl.col("close") * pl.col("volume"))
        q_ts, q_matrix = aligned_returns(quote, symbols, "quote_volume")
        volume = trailing_quote_volume(q_matrix, window_ends(q_ts, stamps["as_of"].to_list()), window=window)
        tradable = liquid_universe(volume, min_quote_volume=settings.min_quote_volume, top_k=settings.top_k)
    return [
        AsofInputs(
            asof=asof, mu=mean[k], cov=cov[k], downside=downside[k], semicov=semicov[k], vrp=vrp[k],
            funding_1h=funding[k], status=str(moments.status[k]), regime=regimes[k],
            fallback_cov=None if shrunk is None else shrunk[k],
            scenarios=matrix[max(0, ends[k] - window + 1): ends[k] + 1] if ends[k] >= 0 else None,
            window_years=window / returns.periods_per_year(settings.bar_hours),
            tradable=None if tradable is None else tradable[k],
            alternatives={name: EstimateSet(m[0][k], m[1][k], m[2][k], m[3][k], str(m[4][k]))
                          for name, m in alternatives.items()},
        )
        for k, asof in enumerate(stamps["as_of"].to_list())
    ]


def build(settings: Settings, partitions: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    symbols = list(settings.symbols)

    @table_asset(
        WEIGHTS, schemas.Weights, partitions=partitions, partition_expr="as_of",
        ins={"estimates": dg.AssetIn(ESTIMATES), "signals": dg.AssetIn(SIGNALS),
             "net_returns": dg.AssetIn(NET_RETURNS, partition_mapping=lookback(settings.lookback_days)),
             "candles": dg.AssetIn(CANDLES, partition_mapping=lookback(settings.lookback_days)),
             # the day before's stored weights seed the walk-forward (self-dependency): a range run and
             # a sequence of daily runs then start every day from the same previous weights
             "stored": dg.AssetIn(WEIGHTS, partition_mapping=PREVIOUS_DAY, metadata={"allow_missing_table": True})},
        group_name="portfolio", kinds={"duckdb", "cvxpy"},
        description=f"Target weights per rebalance for every strategy in {settings.strategies_file.name}; "
        "status says optimal or which fallback produced them and why.",
    )
    def weights(context: dg.AssetExecutionContext, estimates: pl.DataFrame, signals: pl.DataFrame,
                net_returns: pl.DataFrame, candles: pl.DataFrame, stored: pl.DataFrame):
        specs = load_strategies(settings.strategies_file)
        validate_for_universe(specs, len(symbols))
        if estimates.is_empty():
            yield from validated(schemas.empty(schemas.Weights), schemas.Weights, WEIGHTS, metadata={"decisions": 0})
            return
        previous = previous_weights(stored, context.partition_time_window.start, symbols)
        inputs = asof_inputs(estimates, signals, net_returns, candles, symbols, settings)
        frame = optimize_walk_forward(specs, symbols, inputs, previous=previous)
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
