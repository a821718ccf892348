"""raw.candles, raw.funding, raw.implied_vol: market data for each UTC day, as the source gives it."""

import dagster as dg
import polars as pl

from assets import schemas
from assets.checks import schema_check, validated
from pipelines.partitions import SINGLE_RUN, WAREHOUSE_POOL
from pipelines.resources import RawMarket

CANDLES = dg.AssetKey(["raw", "candles"])
FUNDING = dg.AssetKey(["raw", "funding"])
IMPLIED_VOL = dg.AssetKey(["raw", "implied_vol"])

_TABLES = {
    "candles": (CANDLES, schemas.Candles, "ts", "Hourly OHLCV bars per symbol; ts is the bar open time (UTC)."),
    "funding": (FUNDING, schemas.Funding, "bar_ts", "Funding events per symbol (rate per interval; + = longs pay), partitioned by the bar they settle in."),
    "implied_vol": (IMPLIED_VOL, schemas.ImpliedVol, "ts", "Implied-volatility index per underlying, annualized decimal."),
}


def time_range(frame: pl.DataFrame, column: str = "ts") -> str:
    if frame.is_empty():
        return "empty"
    return f"{frame[column].min()} .. {frame[column].max()}"


def build(partitions: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    @dg.multi_asset(
        outs={
            name: dg.AssetOut(key=key, description=doc, is_required=False, metadata={"partition_expr": expr}, kinds={"duckdb", "polars"})
            for name, (key, _, expr, doc) in _TABLES.items()
        },
        check_specs=[schema_check(key, model) for key, model, _, _ in _TABLES.values()],
        partitions_def=partitions,
        backfill_policy=SINGLE_RUN,
        pool=WAREHOUSE_POOL,
        group_name="raw",
    )
    def raw_market(context: dg.AssetExecutionContext, market: RawMarket):
        window = context.partition_time_window
        frames = dict(zip(_TABLES, market.fetch(window.start, window.end)))
        for name, (key, model, expr, _) in _TABLES.items():
            frame = frames[name]
            meta = {"time_range": time_range(frame, expr), "source": market.source}
            if "symbol" in frame.columns:
                meta["symbols"] = ", ".join(sorted(frame["symbol"].unique()))
            yield from validated(frame, model, key, output_name=name, metadata=meta)

    return [raw_market]
