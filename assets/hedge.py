"""risk.spot_hedge: minimum-variance hedge of the spot book (PERPFOLIO_SPOT_NOTIONAL) with perps at each daily asof."""

import dagster as dg
import polars as pl

from assets import schemas
from assets.checks import markdown_table, table_asset, validated
from assets.features import NET_RETURNS
from assets.raw import CANDLES, REFERENCE_PRICES
from perpfolio import hedge
from pipelines.partitions import lookback, partition_window, rebalance_asofs, run_policy
from pipelines.settings import Settings

SPOT_HEDGE = dg.AssetKey(["risk", "spot_hedge"])
_SHOWN = ["symbol", "hedge", "perp", "hedge_ratio", "hedge_notional", "effectiveness", "effectiveness_oos", "basis_mean", "status"]


def build(settings: Settings, partitions: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    symbols = list(settings.symbols)
    book = settings.spot_book
    # the window, the day before (the out-of-sample fit) and one hour more (the first spot return's previous close)
    days = settings.lookback_days + 2

    @table_asset(
        SPOT_HEDGE, schemas.SpotHedge, partitions=partitions, partition_expr="as_of", backfill_policy=run_policy(settings),
        ins={"net_returns": dg.AssetIn(NET_RETURNS, partition_mapping=lookback(days, settings)),
             "reference_prices": dg.AssetIn(REFERENCE_PRICES, partition_mapping=lookback(days, settings)),
             "candles": dg.AssetIn(CANDLES, partition_mapping=lookback(days, settings))},
        group_name="risk", kinds={"duckdb", "numpy"},
        description=f"Minimum-variance hedge of the spot book {book} (USDT) with perps over the last "
        f"{settings.window_bars} bars at each daily asof: spot = index-price simple returns, perps = net returns with "
        "funding; h* = Cov/Var with the own perp (single) and Sigma_FF^-1 Sigma_FS with every perp (cross); "
        "in-sample and next-day out-of-sample hedge effectiveness; perp-over-index basis.",
    )
    def spot_hedge(context: dg.AssetExecutionContext, net_returns: pl.DataFrame, reference_prices: pl.DataFrame,
                   candles: pl.DataFrame):
        asofs = rebalance_asofs(partition_window(context, settings), settings.bar_hours, net_returns["ts"].max())
        if not asofs:
            yield from validated(schemas.empty(schemas.SpotHedge), schemas.SpotHedge, SPOT_HEDGE, metadata={"asofs": 0})
            return
        frame = hedge.spot_hedge_frame(net_returns, reference_prices, candles, symbols, asofs, book,
                                       window=settings.window_bars, bar_hours=settings.bar_hours)
        indexed = set(reference_prices.filter(pl.col("kind") == "index")["symbol"])
        statuses = frame.unique(["as_of", "symbol", "hedge"]).group_by("status").len().sort("status")
        latest = frame.filter(pl.col("as_of") == frame["as_of"].max()).select(_SHOWN)
        meta = {
            "asofs": len(asofs),
            "spot_book_usdt": ", ".join(f"{s}={v:g}" for s, v in book.items()),
            "symbols_without_index": ", ".join(s for s in symbols if s not in indexed) or "none",
            **{f"status_{s}": n for s, n in statuses.iter_rows()},
            "latest": dg.MetadataValue.md(markdown_table(latest)),
        }
        yield from validated(frame, schemas.SpotHedge, SPOT_HEDGE, metadata=meta)

    return [spot_hedge]
