"""Resources: the warehouse IO manager and the market-data source.

`WarehouseIOManager` keeps every asset as a DuckDB table (schema = the asset key's prefix, table =
its last part), written with Dagster's public `ConfigurableIOManager` API. A partition (or range)
write deletes the rows of its time window and inserts the new ones in ONE transaction, by column
name: a crash between the two cannot lose the stored partition (the stock DuckDB-polars IO
manager deletes and inserts in autocommit mode, by column position). An empty frame still creates
the table, so downstream reads never hit a missing table. An asset whose definition metadata has
`VIEWS` ({view name: SELECT}) gets those views (re)created in the same transaction.
"""

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

import dagster as dg
import duckdb
import polars as pl

from perpfolio.errors import ConfigError
from perpfolio.quality import OUTLIER_POLICIES, detection_window, drop_outliers, find_funding_gaps, find_outliers
from perpfolio.warehouse import connect_waiting
from perpfolio.sources.archive import ORIGIN_SCHEMA, ArchiveData, empty_data, gap_report, read_archive
from perpfolio.sources.exchange import DvolClient, client_for, read_exchange, read_leverage_tiers
from perpfolio.sources.exchange_cache import ExchangeCache
from perpfolio.sources.implied_vol import read_implied_vol
from perpfolio.sources.synthetic import generate_market
from perpfolio.tiers import SymbolTiers, TierTable, load_snapshot, load_tier_file, resolve_tiers

VIEWS = "perpfolio/views"  # definition metadata: {"schema.view": "SELECT ..."} created with the table


class WarehouseIOManager(dg.ConfigurableIOManager):
    """Polars frames in DuckDB tables; partition writes are atomic, inserts go by column name.

    ``database``: a DuckDB file (its folder is created on the first write) or ``md:<name>``.
    Partitioned assets name the column their partitions are found by in the definition metadata
    ``partition_expr``; an input may list the ``columns`` it reads (input metadata), and an input
    with ``allow_missing_table`` reads an empty frame before the table's first write.
    """

    database: str
    connection_config: dict[str, Any] = {}

    @contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection whose scope is one transaction: all of a write, or none of it; always closed
        (a failed write must not keep the file locked against other processes)."""
        if not self.database.startswith("md:") and self.database != ":memory:":
            Path(self.database).parent.mkdir(parents=True, exist_ok=True)
        conn = connect_waiting(self.database, {"custom_user_agent": "dagster", **self.connection_config})
        try:
            conn.execute("BEGIN TRANSACTION")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    @staticmethod
    def _table(key: dg.AssetKey) -> tuple[str, str]:
        return (key.path[-2] if len(key.path) > 1 else "public"), key.path[-1]

    @staticmethod
    def _window(context: dg.InputContext | dg.OutputContext, metadata: dict) -> tuple[str, list]:
        """(SQL condition, parameters) selecting the rows of the context's partitions: its time
        window on the column `partition_expr`; everything for an unpartitioned asset."""
        if not context.has_asset_partitions:
            return "TRUE", []
        expr = metadata.get("partition_expr")
        if expr is None:
            raise ConfigError(f"asset {context.asset_key.to_user_string()} is partitioned but has no "
                              "'partition_expr' metadata naming the column its partitions are found by")
        if not context.asset_partition_keys:  # a mapping to partitions that do not exist (before the first)
            return "FALSE", []
        window = context.asset_partitions_time_window
        return f'"{expr}" >= ? AND "{expr}" < ?', [window.start, window.end]

    def handle_output(self, context: dg.OutputContext, obj: pl.DataFrame) -> None:
        """Replace the output's partitions (or the whole table) with ``obj``, inserted by column name. A
        column the stored table lacks (a warehouse written by an older version) is added first, null
        for the rows already stored; a stored column the frame lacks is null in the new rows."""
        metadata = context.definition_metadata or {}
        schema, name = self._table(context.asset_key)
        table = f"{schema}.{name}"
        where, params = self._window(context, metadata)
        with self._transaction() as conn:
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            conn.register("perpfolio_frame", obj.to_arrow())
            conn.execute(f"CREATE TABLE IF NOT EXISTS {table} AS SELECT * FROM perpfolio_frame LIMIT 0")
            stored = {c for (c,) in conn.execute(
                "SELECT column_name FROM duckdb_columns() WHERE schema_name = ? AND table_name = ?", [schema, name]).fetchall()}
            for column, dtype, *_ in conn.execute("DESCRIBE SELECT * FROM perpfolio_frame").fetchall():
                if column not in stored:
                    quoted = '"' + column.replace('"', '""') + '"'
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {quoted} {dtype}")
            # the DELETE after any ALTER: DuckDB cannot commit an ALTER TABLE that follows a DELETE
            # of the same table in one transaction
            conn.execute(f"DELETE FROM {table} WHERE {where}", params)
            conn.execute(f"INSERT INTO {table} BY NAME SELECT * FROM perpfolio_frame")
            conn.unregister("perpfolio_frame")
            for view, select in metadata.get(VIEWS, {}).items():
                conn.execute(f"CREATE OR REPLACE VIEW {view} AS {select}")
        context.add_output_metadata({"dagster/row_count": obj.height})

    def load_input(self, context: dg.InputContext) -> pl.DataFrame:
        """The rows of the input's partitions (all of them for an unpartitioned consumer), only the
        ``columns`` the input lists when it does, with timestamps in UTC."""
        metadata = context.definition_metadata or {}
        schema, name = self._table(context.asset_key)
        where, params = self._window(context, context.upstream_output.definition_metadata or {})
        columns = ", ".join(f'"{c}"' for c in metadata["columns"]) if metadata.get("columns") else "*"
        with self._transaction() as conn:
            exists = conn.execute("SELECT 1 FROM duckdb_tables() WHERE schema_name = ? AND table_name = ?",
                                  [schema, name]).fetchall()
            if not exists and metadata.get("allow_missing_table"):
                return pl.DataFrame()
            return as_utc(conn.execute(f"SELECT {columns} FROM {schema}.{name} WHERE {where}", params).pl())


def as_utc(frame: pl.DataFrame) -> pl.DataFrame:
    """Zoned timestamps read from DuckDB carry its session zone ('Etc/UTC'); the data contract says 'UTC'."""
    zoned = [name for name, dtype in frame.schema.items() if isinstance(dtype, pl.Datetime) and dtype.time_zone]
    return frame.with_columns(pl.col(zoned).dt.convert_time_zone("UTC"))


@dataclass(frozen=True)
class RawData:
    """The raw layer of one window as a source gives it: one frame per raw table (assets/raw.py),
    in the schemas of perpfolio.sources.archive (CANDLES_, FUNDING_, REFERENCE_, QUALITY_SCHEMA) and
    perpfolio.sources.implied_vol. ``reference_prices`` is empty for symbols whose source has no
    mark or index prices; ``data_quality`` empty means the window was read clean. ``candle_origin``
    (ORIGIN_SCHEMA, not a table) says where each candle was read, for the data-quality messages; a
    candle without a row there is named by its ``source``."""

    candles: pl.DataFrame
    funding: pl.DataFrame
    implied_vol: pl.DataFrame
    reference_prices: pl.DataFrame
    data_quality: pl.DataFrame
    candle_origin: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=ORIGIN_SCHEMA))

    @classmethod
    def of(cls, data: ArchiveData, implied_vol: pl.DataFrame) -> "RawData":
        """A source's ArchiveData (the container every reader returns) and its implied vol."""
        return cls(data.candles, data.funding, implied_vol, data.reference_prices, data.quality, data.candle_origin)

    @classmethod
    def empty(cls) -> "RawData":
        return cls.of(empty_data(), read_implied_vol([]))

    def __repr__(self) -> str:
        counts = ", ".join(f"{name}={getattr(self, name).height} rows" for name in self.__dataclass_fields__)
        return f"RawData({counts})"


# sources whose reader reports its own gaps, duplicates and disorder; the others get gap_report
_REPORTS_OWN_QUALITY = frozenset({"archive", "exchange"})


class RawMarket(dg.ConfigurableResource):
    """Where the raw layer comes from (PERPFOLIO_SOURCE): candles, funding, implied vol, mark and
    index prices, and the data-quality rows.

    `fetch(start, end)` returns a `RawData` of bars with ts in [start, end), funding events whose
    bar_ts is in [start, end) and implied-vol observations with ts in [start, end), for `symbols`.
    Nothing after the last closed hour is returned, so a day in progress holds only the bars that
    exist. `fetch_with_quality` adds the data-quality rows (gaps, duplicates dropped, rows out of
    order) for sources that do not report their own, and for every source the bad prints and the
    missing funding events of perpfolio.quality; `outliers` (PERPFOLIO_OUTLIERS) says what happens to
    a bad print: "error" (the raw asset stores raw.data_quality and fails) or "quarantine" (the bar is
    removed from candles and the run goes on).

    source "synthetic": the built-in market (`origin`, `seed`), index and mark prices included; with
    `synthetic_events` symbols are listed late and delisted and the data has outages, bad prints and
    missing funding days (perpfolio.sources.synthetic, "Data events").
    source "archive": Binance archive files under `archive_dir` (perpfolio.sources.archive; mark
    and index klines where the archive has them) and implied vol from the `iv_csv` files
    (perpfolio.sources.implied_vol); an underlying without a file gets the labelled proxy downstream.
    source "exchange": `exchange`'s public REST API through ccxt (perpfolio.sources.exchange; trade,
    mark and index candles and funding), at `exchange_url` when set, with closed days kept in the
    download cache `exchange_cache` (re-downloaded only with `exchange_refresh`), and Deribit DVOL
    for BTC and ETH (or the `iv_csv` files when given).
    A new source is one more branch of `fetch` returning `RawData.of(<its ArchiveData>, <implied vol>)`.

    `leverage_tiers(symbols)` gives each symbol's maintenance-margin brackets and where they came
    from (perpfolio.tiers.resolve_tiers): the `tiers_file`, then for source "exchange" the
    exchange's live tiers where it serves them without a key (Bybit, OKX), then the packaged
    Binance snapshot, then the conservative default.
    """

    source: str = "synthetic"
    symbols: list[str]
    origin: str  # ISO datetime of the first bar of the synthetic history (its seed anchor)
    seed: int = 7
    synthetic_events: bool = False  # source "synthetic": listings, delistings, outages, bad prints, missing funding
    archive_dir: str = ""  # source "archive": root of the futures/um/... layout
    iv_csv: list[str] = []  # source "archive": DVOL or ts,underlying,iv CSV files; source "exchange": instead of DVOL
    exchange: str = "binance"  # source "exchange": binance | bybit | okx
    exchange_url: str = ""  # source "exchange": API base URL instead of the exchange's own ("" = the exchange's)
    exchange_cache: str = ""  # source "exchange": download cache file ("" = no cache)
    exchange_refresh: bool = False
    exchange_rate_limit: bool = True
    exchange_timeout_s: float = 10.0
    exchange_retries: int = 5
    tiers_file: str = ""  # leverage tiers file, project or ccxt format ("" = none)
    outliers: str = "error"  # bad prints: "error" (stop the run) | "quarantine" (drop the bar, record it, go on)

    def fetch(self, start: datetime, end: datetime) -> RawData:
        end = _closed(end)
        if self.source == "synthetic":
            return self._synthetic(start, end)
        if self.source == "archive":
            if end <= start:
                return RawData.empty()
            return RawData.of(read_archive(self.archive_dir, self.symbols, start, end),
                              read_implied_vol(self.iv_csv, start, end))
        if self.source == "exchange":
            return RawData.empty() if end <= start else self._exchange(start, end)
        raise ConfigError(f"RawMarket: unknown source {self.source!r}; choose synthetic, archive or exchange")

    def fetch_with_quality(self, start: datetime, end: datetime) -> RawData:
        """`fetch` with `data_quality` of [start, end) (perpfolio.sources.archive.QUALITY_SCHEMA): the
        source's gaps, duplicates and rows out of order, the bad prints (issue "outlier") and the
        missing funding events (issue "funding_gap"). Those two are judged with the neighbours of the
        window: `fetch` of the margins of perpfolio.quality.detection_window before and after it,
        whose rows are used for judging only. With `outliers` = "quarantine" the flagged bars are
        removed from `candles` (their rows stay in `data_quality`); with "error" they stay."""
        if self.outliers not in OUTLIER_POLICIES:
            raise ConfigError(f"PERPFOLIO_OUTLIERS must be one of {', '.join(OUTLIER_POLICIES)}, got {self.outliers!r}")
        data = self.fetch(start, end)
        wide_start, wide_end = detection_window(start, end)
        parts = (self.fetch(wide_start, start), data, self.fetch(end, wide_end))
        candles = pl.concat([p.candles for p in parts])
        end = _closed(end)
        if self.source in _REPORTS_OWN_QUALITY:
            quality = data.data_quality
        else:
            quality = gap_report(data.candles, self.symbols, start, end) if end > start else empty_data().quality
        found = pl.concat([
            find_outliers(candles, candle_origin=pl.concat([p.candle_origin for p in parts])).filter(
                pl.col("from_ts").is_between(start, end, closed="left")),
            find_funding_gaps(pl.concat([p.funding for p in parts]), candles, start=start, end=end),
        ])
        kept = drop_outliers(data.candles, found) if self.outliers == "quarantine" else data.candles
        return replace(data, candles=kept, data_quality=pl.concat([quality, found]).sort("symbol", "dataset", "from_ts", "issue"))

    def leverage_tiers(self, symbols: list[str]) -> dict[str, SymbolTiers]:
        """{symbol: (brackets, source)} by the precedence of the class docstring."""
        def live(missing: list[str]) -> TierTable | None:
            return read_leverage_tiers(client_for(self.exchange, **self._client_options()), missing)

        user = load_tier_file(self.tiers_file) if self.tiers_file else None
        return resolve_tiers(symbols, snapshot=load_snapshot(), user=user, live=live if self.source == "exchange" else None)

    def _client_options(self) -> dict:
        return {"base_url": self.exchange_url or None, "timeout_s": self.exchange_timeout_s,
                "max_retries": self.exchange_retries, "rate_limit": self.exchange_rate_limit}

    def _exchange(self, start: datetime, end: datetime) -> RawData:
        options = self._client_options()
        client = client_for(self.exchange, **options)
        dvol = None if self.iv_csv else DvolClient(**options)
        with ExchangeCache(self.exchange_cache) if self.exchange_cache else nullcontext() as cache:
            read = read_exchange(client, self.symbols, start, end, cache=cache, refresh=self.exchange_refresh, dvol=dvol)
        return RawData.of(read.data, read_implied_vol(self.iv_csv, start, end) if self.iv_csv else read.implied_vol)

    def _synthetic(self, start: datetime, end: datetime) -> RawData:
        origin = datetime.fromisoformat(self.origin)
        market = generate_market(self.symbols, origin, max(end, origin + timedelta(hours=1)), seed=self.seed,
                                 data_events=self.synthetic_events)
        in_window = lambda col: pl.col(col).is_between(start, end, closed="left")  # noqa: E731
        return RawData(
            candles=market.candles.filter(in_window("ts")),
            funding=market.funding.filter(in_window("bar_ts")),
            implied_vol=market.implied_vol.filter(in_window("ts")),
            reference_prices=market.reference_prices.filter(in_window("ts")),
            data_quality=empty_data().quality,
        )


def _closed(end: datetime) -> datetime:
    """Bars opened before the current hour have closed; nothing later exists yet."""
    return min(end, datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0))
