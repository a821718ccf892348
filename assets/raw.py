"""raw.candles, raw.funding, raw.implied_vol, raw.reference_prices: market data for each UTC day, as
the source gives it; raw.data_quality: the gaps, duplicates and out-of-order rows found while reading it,
the bad prints and the missing funding events (perpfolio.quality).

raw.data_quality is stored first: with PERPFOLIO_OUTLIERS=error a window with a bad print stores its
data_quality rows and then fails with a DataError naming each bad print (nothing else of the window
is stored, earlier days stay as they were); with quarantine the flagged bars are left out of
raw.candles and the run goes on."""

import dagster as dg
import polars as pl

from assets import schemas
from assets.checks import schema_check, table_metadata, time_range, validated
from perpfolio.quality import outlier_error
from pipelines.partitions import WAREHOUSE_POOL, partition_window, run_policy
from pipelines.resources import RawMarket
from pipelines.settings import Settings

CANDLES = dg.AssetKey(["raw", "candles"])
FUNDING = dg.AssetKey(["raw", "funding"])
IMPLIED_VOL = dg.AssetKey(["raw", "implied_vol"])
DATA_QUALITY = dg.AssetKey(["raw", "data_quality"])
REFERENCE_PRICES = dg.AssetKey(["raw", "reference_prices"])

_TABLES = {  # data_quality first: it is stored before a bad print stops the run
    "data_quality": (DATA_QUALITY, schemas.DataQuality, "from_ts", "Data-quality issues of the raw layer per symbol and "
                     "UTC day: missing hours (reported, never filled), duplicates dropped, rows out of order, bad prints "
                     "(outlier) and missing funding events (funding_gap). Empty = clean."),
    "candles": (CANDLES, schemas.Candles, "ts", "Hourly OHLCV bars per symbol; ts is the bar open time (UTC)."),
    "funding": (FUNDING, schemas.Funding, "bar_ts", "Funding events per symbol (rate per interval; + = longs pay), partitioned by the bar they settle in."),
    "implied_vol": (IMPLIED_VOL, schemas.ImpliedVol, "ts", "Implied-volatility index per underlying, annualized decimal."),
    "reference_prices": (REFERENCE_PRICES, schemas.ReferencePrices, "ts", "Hourly mark and index (spot composite) "
                         "price bars per symbol; empty for symbols whose source has none (see metadata missing_reference)."),
}


def quality_metadata(quality: pl.DataFrame, table: str) -> dict:
    """Counts of the data-quality rows that concern `table` (gap runs, bars missing, duplicates, out of
    order, bad prints, funding gaps and the events they miss)."""
    outliers = quality.filter(pl.col("issue") == "outlier").height
    funding_gaps = quality.filter(pl.col("issue") == "funding_gap")
    gap_meta = {"funding_gaps": funding_gaps.height, "funding_events_missing": int(funding_gaps["events_missing"].sum())}
    datasets = {"candles": ["candles"], "funding": ["funding"], "reference_prices": ["mark", "index"]}.get(table)
    if datasets is None:
        return {"issues": quality.height, "outliers": outliers, **gap_meta} if table == "data_quality" else {}
    rows = quality.filter(pl.col("dataset").is_in(datasets))
    meta = {"duplicates_fixed": int(rows["duplicates_dropped"].sum()), "out_of_order_fixed": int(rows["out_of_order"].sum())}
    if table == "candles":
        meta |= {"gap_count": rows.filter(pl.col("issue") == "gap").height, "bars_missing": int(rows["bars_missing"].sum()),
                 "outliers": outliers}
    if table == "funding":
        meta |= gap_meta
    return meta


def missing_reference(reference: pl.DataFrame, symbols: list[str]) -> str:
    """'SYMBOL:kind' for every configured symbol and kind (mark, index) without a row, or 'none'.

    A source without mark or index prices is not an error; the hedge overlay records such symbols
    as missing_data."""
    have = set(reference.select("symbol", "kind").unique().iter_rows())
    missing = [f"{s}:{k}" for s in symbols for k in ("mark", "index") if (s, k) not in have]
    return ", ".join(missing) or "none"


def build(settings: Settings, partitions: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    @dg.multi_asset(
        outs={
            name: dg.AssetOut(key=key, description=doc, is_required=False, kinds={"duckdb", "polars"},
                              metadata={**table_metadata(key, model), "partition_expr": expr})
            for name, (key, model, expr, doc) in _TABLES.items()
        },
        check_specs=[schema_check(key, model) for key, model, _, _ in _TABLES.values()],
        partitions_def=partitions,
        backfill_policy=run_policy(settings),
        pool=WAREHOUSE_POOL,
        group_name="raw",
    )
    def raw_market(context: dg.AssetExecutionContext, market: RawMarket):
        window = partition_window(context, settings)
        data = market.fetch_with_quality(window.start, window.end)
        bad_prints = outlier_error(data.data_quality) if market.outliers == "error" else None
        for name, (key, model, expr, _) in _TABLES.items():
            frame = getattr(data, name)
            meta = {"time_range": time_range(frame, expr), "source": market.source}
            if "symbol" in frame.columns:
                meta["symbols"] = ", ".join(sorted(frame["symbol"].unique()))
            if name == "reference_prices":
                meta["missing_reference"] = missing_reference(frame, market.symbols)
            meta |= quality_metadata(data.data_quality, name)
            yield from validated(frame, model, key, output_name=name, metadata=meta)
            if bad_prints is not None:  # raw.data_quality (the first table) is stored; nothing else is
                raise bad_prints

    return [raw_market]
