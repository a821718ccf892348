"""Resources: the warehouse IO manager and the market-data source.

The stock DuckDB-polars IO manager deletes a partition and inserts its replacement in
autocommit mode, so a crash between the two loses the stored partition, and it inserts by
column position. `WarehouseIOManager` runs delete + insert in ONE transaction and inserts by
column name; an empty frame still creates the table so downstream reads never hit a missing
table. An asset whose definition metadata has `VIEWS` ({view name: SELECT}) gets those views
(re)created in the same transaction, so a view never names a table that is not there.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone

import dagster as dg
import polars as pl
from dagster._core.storage.db_io_manager import DbIOManager, DbTypeHandler, TableSlice
from dagster_duckdb.io_manager import DuckDbClient
from dagster_duckdb_polars import DuckDBPolarsIOManager, DuckDBPolarsTypeHandler

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


class _TransactionalClient(DuckDbClient):
    """DuckDB client whose connection scope is one transaction: all of a write, or none of it.

    The stock client closes its connection only on success, so a failed write left the file open
    (and locked against other processes) until garbage collection; this one always closes it.
    """

    @staticmethod
    @contextmanager
    def connect(context, table_slice: TableSlice) -> Iterator:
        config = {"custom_user_agent": "dagster", **context.resource_config["connection_config"]}
        database = context.resource_config["database"]
        if not database.startswith("md:") and database != ":memory:":  # a local file: its folder may not exist yet
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        conn = connect_waiting(database, config)
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
    def delete_table_slice(context, table_slice: TableSlice, connection) -> None:
        """Nothing here: the handler deletes the slice itself, after adding any new column, because
        DuckDB cannot commit an ALTER TABLE that follows a DELETE of the same table in one transaction."""


class _PolarsByNameHandler(DuckDBPolarsTypeHandler):
    def handle_output(self, context: dg.OutputContext, table_slice: TableSlice, obj: pl.DataFrame, connection):
        """Replace the slice with ``obj``, inserted by column name. A column the stored table lacks (a
        warehouse written by an older version) is added first, null for the rows already stored; a
        stored column the frame lacks is null in the new rows."""
        table = f"{table_slice.schema}.{table_slice.table}"
        connection.register("perpfolio_frame", obj.to_arrow())
        connection.execute(f"CREATE TABLE IF NOT EXISTS {table} AS SELECT * FROM perpfolio_frame LIMIT 0")
        stored = {name for (name,) in connection.execute(
            "SELECT column_name FROM duckdb_columns() WHERE schema_name = ? AND table_name = ?",
            [table_slice.schema, table_slice.table]).fetchall()}
        for name, dtype, *_ in connection.execute("DESCRIBE SELECT * FROM perpfolio_frame").fetchall():
            if name not in stored:
                quoted = '"' + name.replace('"', '""') + '"'
                connection.execute(f"ALTER TABLE {table} ADD COLUMN {quoted} {dtype}")
        DuckDbClient.delete_table_slice(context, table_slice, connection)
        connection.execute(f"INSERT INTO {table} BY NAME SELECT * FROM perpfolio_frame")
        connection.unregister("perpfolio_frame")
        for view, select in (context.definition_metadata or {}).get(VIEWS, {}).items():
            connection.execute(f"CREATE OR REPLACE VIEW {view} AS {select}")
        return {"row_count": obj.height}

    def load_input(self, context: dg.InputContext, table_slice: TableSlice, connection) -> pl.DataFrame:
        # an input declared with metadata allow_missing_table (a self-dependency on the previous
        # partition) reads as an empty frame before the table's first write, instead of failing
        if (context.definition_metadata or {}).get("allow_missing_table") and not connection.execute(
            "SELECT 1 FROM duckdb_tables() WHERE schema_name = ? AND table_name = ?", [table_slice.schema, table_slice.table]
        ).fetchall():
            return pl.DataFrame()
        return as_utc(super().load_input(context, table_slice, connection))


def as_utc(frame: pl.DataFrame) -> pl.DataFrame:
    """Zoned timestamps read from DuckDB carry its session zone ('Etc/UTC'); the data contract says 'UTC'."""
    zoned = [name for name, dtype in frame.schema.items() if isinstance(dtype, pl.Datetime) and dtype.time_zone]
    return frame.with_columns(pl.col(zoned).dt.convert_time_zone("UTC"))


class WarehouseIOManager(DuckDBPolarsIOManager):
    """Polars frames in DuckDB tables (schema = asset key prefix); partition writes are atomic."""

    @staticmethod
    def type_handlers() -> Sequence[DbTypeHandler]:
        return [_PolarsByNameHandler()]

    def create_io_manager(self, context) -> DbIOManager:
        return DbIOManager(
            db_client=_TransactionalClient(),
            database=self.database,
            schema=self.schema_,
            type_handlers=self.type_handlers(),
            default_load_type=pl.DataFrame,
            io_manager_name="WarehouseIOManager",
        )


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
