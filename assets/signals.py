"""signals.signals: realized and implied variance and the variance risk premium per asof and symbol."""

import dagster as dg
import polars as pl

from assets import schemas
from assets.checks import table_asset, validated
from assets.features import NET_RETURNS, aligned_returns, window_ends
from assets.raw import IMPLIED_VOL
from perpfolio import returns, signals as signal_lib
from pipelines.partitions import lookback, rebalance_asofs
from pipelines.settings import Settings

SIGNALS = dg.AssetKey(["signals", "signals"])
IV_LOOKBACK_DAYS = 2


def build(settings: Settings, partitions: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    symbols = list(settings.symbols)

    @table_asset(
        SIGNALS, schemas.Signals, partitions=partitions, partition_expr="as_of",
        ins={
            "net_returns": dg.AssetIn(NET_RETURNS, partition_mapping=lookback(settings.lookback_days)),
            "implied_vol": dg.AssetIn(IMPLIED_VOL, partition_mapping=lookback(IV_LOOKBACK_DAYS)),
        },
        group_name="signals", kinds={"duckdb", "numpy"},
        description="VRP = implied variance - realized variance (annualized). Implied variance is iv^2 of the "
        "underlying's index, or for symbols without one a proxy scaled from BTC's by relative realized variance.",
    )
    def signals(context: dg.AssetExecutionContext, net_returns: pl.DataFrame, implied_vol: pl.DataFrame):
        asofs = rebalance_asofs(context.partition_time_window, settings.bar_hours, net_returns["ts"].max())
        if not asofs:
            yield from validated(schemas.empty(schemas.Signals), schemas.Signals, SIGNALS, metadata={"asofs": 0})
            return
        ts, matrix = aligned_returns(net_returns, symbols)
        realized = signal_lib.realized_variance(
            matrix, window_ends(ts, asofs), window=settings.window_bars,
            periods_per_year=returns.periods_per_year(settings.bar_hours),
        )
        frame = signal_lib.vrp_signals(asofs, symbols, realized, implied_vol)
        sources = frame.group_by("iv_source").len().sort("iv_source")
        meta = {"asofs": len(asofs), **{f"iv_source_{s}": n for s, n in sources.iter_rows()}}
        yield from validated(frame, schemas.Signals, SIGNALS, metadata=meta)

    return [signals]
