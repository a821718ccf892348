"""raw.candles, raw.funding, raw.implied_vol: market data for each UTC day, as the source gives it;
raw.data_quality: the gaps, duplicates and out-of-order rows found while reading it."""

import dagster as dg
import polars as pl

from assets import schemas
from assets.checks import schema_check, validated
from pipelines.partitions import SINGLE_RUN, WAREHOUSE_POOL
from pipelines.resources import RawMarket

CANDLES = dg.AssetKey(["raw", "candles"])
FUNDING = dg.AssetKey(["raw", "funding"])
IMPLIED_VOL = dg.AssetKey(["raw", "implied_vol"])
DATA_QUALITY = dg.AssetKey(["raw", "data_quality"])

_TABLES = {
    "candles": (CANDLES, schemas.Candles, "ts", "Hourly OHLCV bars per symbol; ts is the bar open time (UTC)."),
    "funding": (FUNDING, schemas.Funding, "bar_ts", "Funding events per symbol (rate per interval; + = longs pay), partitioned by the bar they settle in."),
    "implied_vol": (IMPLIED_VOL, schemas.ImpliedVol, "ts", "Implied-volatility index per underlying, annualized decimal."),
    "data_quality": (DATA_QUALITY, schemas.DataQuality, "from_ts", "Data-quality issues of the raw layer per symbol and "
                     "UTC day: missing hours (reported, never filled), duplicates dropped, rows out of order. Empty = clean."),
}


def time_range(frame: pl.DataFrame, column: str = "ts") -> str:
    if frame.is_empty():
        return "empty"
    return f"{frame[column].min()} .. {frame[column].max()}"


def quality_metadata(quality: pl.DataFrame, table: str) -> dict:
    """Counts of the data-quality rows that concern `table` (gap runs, bars missing, duplicates, out of order)."""
    dataset = {"candles": "candles", "funding": "funding"}.get(table)
    if dataset is None:
        return {"issues": quality.height} if table == "data_quality" else {}
    rows = quality.filter(pl.col("dataset") == dataset)
    meta = {"duplicates_fixed": int(rows["duplicates_dropped"].sum()), "out_of_order_fixed": int(rows["out_of_order"].sum())}
    if dataset == "candles":
        meta |= {"gap_count": rows.filter(pl.col("issue") == "gap").height, "bars_missing": int(rows["bars_missing"].sum())}
    return meta


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
        frames = dict(zip(_TABLES, market.fetch_with_quality(window.start, window.end)))
        quality = frames["data_quality"]
        for name, (key, model, expr, _) in _TABLES.items():
            frame = frames[name]
            meta = {"time_range": time_range(frame, expr), "source": market.source}
            if "symbol" in frame.columns:
                meta["symbols"] = ", ".join(sorted(frame["symbol"].unique()))
            meta |= quality_metadata(quality, name)
            yield from validated(frame, model, key, output_name=name, metadata=meta)

    return [raw_market]
