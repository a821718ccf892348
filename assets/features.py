"""features.net_returns and features.estimates: funding-netted returns and rolling moments."""

import dagster as dg
import numpy as np
import polars as pl

from assets import schemas
from assets.checks import table_asset, validated
from assets.raw import CANDLES, FUNDING, time_range
from perpfolio import estimators, returns
from pipelines.partitions import lookback, rebalance_asofs
from pipelines.settings import Settings

NET_RETURNS = dg.AssetKey(["features", "net_returns"])
ESTIMATES = dg.AssetKey(["features", "estimates"])


def aligned_returns(frame: pl.DataFrame, symbols: list[str], column: str = "net_return") -> tuple[np.ndarray, np.ndarray]:
    """(ts, T x N matrix) with columns in the configured symbol order; NaN where a symbol has no bar."""
    ts, found, matrix = returns.returns_matrix(frame, column=column)
    out = np.full((len(ts), len(symbols)), np.nan)
    for j, symbol in enumerate(symbols):
        if symbol in found:
            out[:, j] = matrix[:, found.index(symbol)]
    return ts, out


def window_ends(ts: np.ndarray, asofs: list) -> np.ndarray:
    """Index of the last bar at or before each asof (-1 when there is none): nothing later is seen."""
    stamps = np.array([np.datetime64(a.replace(tzinfo=None), "us") for a in asofs])
    return np.searchsorted(ts, stamps, side="right") - 1


def build(settings: Settings, partitions: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    symbols = list(settings.symbols)
    ppy = returns.periods_per_year(settings.bar_hours)

    @table_asset(
        NET_RETURNS, schemas.NetReturns, partitions=partitions, partition_expr="ts",
        ins={"candles": dg.AssetIn(CANDLES, partition_mapping=lookback(1)), "funding": dg.AssetIn(FUNDING)},
        group_name="features", kinds={"duckdb", "polars"},
        description="Per-bar return of a long position: simple price return plus funding return "
        "(minus the rates settled in the bar); net_return is simple or log per PERPFOLIO_RETURN_KIND.",
    )
    def net_returns(context: dg.AssetExecutionContext, candles: pl.DataFrame, funding: pl.DataFrame):
        window = context.partition_time_window
        frame = returns.net_returns(candles, funding, bar_hours=settings.bar_hours, kind=settings.return_kind)
        frame = frame.filter(pl.col("ts").is_between(window.start, window.end, closed="left"))
        meta = {"time_range": time_range(frame), "bars_spanning_gaps": int(frame["filled"].sum()), "return_kind": settings.return_kind}
        yield from validated(frame, schemas.NetReturns, NET_RETURNS, metadata=meta)

    @table_asset(
        ESTIMATES, schemas.Estimates, partitions=partitions, partition_expr="as_of",
        ins={"net_returns": dg.AssetIn(NET_RETURNS, partition_mapping=lookback(settings.lookback_days))},
        group_name="features", kinds={"duckdb", "numpy"},
        description=f"Rolling sample mean, covariance (ddof=1), downside D_i and semicovariance over the last "
        f"{settings.window_bars} bars at each daily asof, annualized x{ppy:g}. Long format.",
    )
    def estimates(context: dg.AssetExecutionContext, net_returns: pl.DataFrame):
        asofs = rebalance_asofs(context.partition_time_window, settings.bar_hours, net_returns["ts"].max())
        if not asofs:
            yield from validated(schemas.empty(schemas.Estimates), schemas.Estimates, ESTIMATES, metadata={"asofs": 0})
            return
        ts, matrix = aligned_returns(net_returns, symbols)
        moments = estimators.rolling_moments(matrix, window_ends(ts, asofs), window=settings.window_bars)
        frame = estimators.moments_to_long(
            asofs, symbols, estimators.annualize(moments, ppy), estimator="sample", window_bars=settings.window_bars
        )
        statuses = dict(zip(*np.unique(moments.status, return_counts=True)))
        meta = {"asofs": len(asofs), "window_bars": settings.window_bars, **{f"status_{k}": int(v) for k, v in statuses.items()}}
        yield from validated(frame, schemas.Estimates, ESTIMATES, metadata=meta)

    return [net_returns, estimates]
