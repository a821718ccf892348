"""The exchange source's download cache: rows exactly as the exchange sent them, per UTC day, in a
DuckDB file, so that a closed day is downloaded once and a killed download resumes.

Two tables:

- ``rows(exchange, dataset, symbol, day, seq, ts, v1..v5)``: one row per row received; ``dataset``
  is a kline kind (trade, mark, index), ``funding`` or ``dvol``; ``ts`` epoch ms; ``v1..v5`` the
  row's values (klines: open, high, low, close, volume; funding: rate); ``seq`` the position in the
  response, so that duplicates resolve the same way on every read (first sent wins).
- ``complete(exchange, dataset, symbol, day)``: the days whose every row is in ``rows``.

A store (one series' newly downloaded days) is ONE transaction (rows and complete days together), replacing whatever
those days held, so a crash leaves each day either complete or absent, never half-written.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from pathlib import Path

import polars as pl

from perpfolio.warehouse import connect_waiting

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rows (exchange VARCHAR, dataset VARCHAR, symbol VARCHAR, day DATE, seq INTEGER,
                                 ts BIGINT, v1 DOUBLE, v2 DOUBLE, v3 DOUBLE, v4 DOUBLE, v5 DOUBLE);
CREATE TABLE IF NOT EXISTS complete (exchange VARCHAR, dataset VARCHAR, symbol VARCHAR, day DATE,
                                     PRIMARY KEY (exchange, dataset, symbol, day));
"""


_ROW_SCHEMA = {"exchange": pl.String, "dataset": pl.String, "symbol": pl.String, "day": pl.Date, "seq": pl.Int32,
               "ts": pl.Int64, "v1": pl.Float64, "v2": pl.Float64, "v3": pl.Float64, "v4": pl.Float64, "v5": pl.Float64}


class ExchangeCache:
    """The cache file at ``path`` (created with its folder on first use), open for one read of the
    source: ``with ExchangeCache(path) as cache: ...`` (one connection, the file locked meanwhile)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._con = None

    def __enter__(self) -> ExchangeCache:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._con = connect_waiting(str(self.path))
        self._con.execute(_SCHEMA)
        return self

    def __exit__(self, *exc) -> None:
        self._con.close()
        self._con = None

    @property
    def con(self):
        if self._con is None:
            raise RuntimeError(f"ExchangeCache({self.path}) is used outside its `with` block")
        return self._con

    def complete_days(self, exchange: str, dataset: str, symbol: str, days: Sequence[date]) -> set[date]:
        """Which of ``days`` are complete in the cache."""
        if not days:
            return set()
        found = self.con.execute(
            "SELECT day FROM complete WHERE exchange = ? AND dataset = ? AND symbol = ? AND day BETWEEN ? AND ?",
            [exchange, dataset, symbol, min(days), max(days)],
        ).fetchall()
        return {d for (d,) in found} & set(days)

    def store(self, exchange: str, dataset: str, symbol: str, days: Sequence[date], rows: Sequence[tuple]) -> None:
        """Replace ``days`` of one series by ``rows`` (tuples ``(ts_ms, v1, ...)`` in response order)
        and mark them complete, atomically. Rows must fall on those days."""
        wanted = sorted(set(days))
        width = max((len(r) for r in rows), default=1)
        values = pl.DataFrame([tuple(r) + (None,) * (width - len(r)) for r in rows],
                              schema={"ts": pl.Int64, **{f"v{i}": pl.Float64 for i in range(1, width)}}, orient="row")
        frame = values.with_columns(
            exchange=pl.lit(exchange), dataset=pl.lit(dataset), symbol=pl.lit(symbol),
            day=(pl.col("ts") * 1000).cast(pl.Datetime("us", "UTC")).dt.date(), seq=pl.int_range(pl.len(), dtype=pl.Int32),
            **{f"v{i}": pl.lit(None, pl.Float64) for i in range(width, 6)},
        ).select(list(_ROW_SCHEMA))
        stray = frame.filter(~pl.col("day").is_in(wanted))
        if stray.height:
            raise ValueError(f"cache.store: row at {stray['ts'][0]} ms is on {stray['day'][0]}, not one of the days stored")
        con, key = self.con, [exchange, dataset, symbol, wanted]
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute("DELETE FROM rows WHERE exchange = ? AND dataset = ? AND symbol = ? AND list_contains(?, day)", key)
            con.execute("DELETE FROM complete WHERE exchange = ? AND dataset = ? AND symbol = ? AND list_contains(?, day)", key)
            con.register("cache_rows", frame.to_arrow())
            con.execute("INSERT INTO rows SELECT * FROM cache_rows")
            con.unregister("cache_rows")
            con.execute("INSERT INTO complete SELECT ?, ?, ?, UNNEST(?::DATE[])", key)
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    def rows(self, exchange: str, dataset: str, symbol: str, days: Sequence[date]) -> list[tuple]:
        """The stored rows of ``days``, by day and response order: ``(ts_ms, v1, ...)`` with as many
        values as ``dataset`` has (funding 1, others 5)."""
        width = 1 if dataset == "funding" else 5
        columns = ", ".join(f"v{i}" for i in range(1, width + 1))
        return self.con.execute(
            f"SELECT ts, {columns} FROM rows WHERE exchange = ? AND dataset = ? AND symbol = ? "
            "AND list_contains(?, day) ORDER BY day, seq",
            [exchange, dataset, symbol, list(days)],
        ).fetchall()
