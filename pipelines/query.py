"""`make sql Q="..."`: one read-only SQL query on the configured warehouse (PERPFOLIO_WAREHOUSE), printed.

The install has DuckDB's Python package, not its command-line shell; this is the shell's
one-query use, e.g. ``make sql Q="SHOW ALL TABLES"`` or ``make sql Q="SELECT * FROM backtest.comparison"``.
It waits while a run holds the file's write lock.
"""

import sys

import duckdb
import polars as pl

from perpfolio.warehouse import connect_waiting
from pipelines.settings import Settings


def main(argv: list[str] | None = None) -> None:
    query = " ".join(sys.argv[1:] if argv is None else argv).strip()
    if not query:
        sys.exit('usage: make sql Q="SELECT * FROM backtest.comparison"   (Q="SHOW ALL TABLES" lists the tables)')
    warehouse = Settings.from_env().warehouse
    if not warehouse.exists():
        sys.exit(f"no warehouse at {warehouse}: `make run` creates it")
    with connect_waiting(str(warehouse), read_only=True) as con, \
            pl.Config(tbl_rows=50, tbl_cols=-1, tbl_width_chars=250, tbl_hide_column_data_types=True,
                      tbl_hide_dataframe_shape=True):
        try:
            print(con.sql(query).pl())
        except duckdb.Error as exc:
            sys.exit(f"query failed on {warehouse}: {exc}")


if __name__ == "__main__":
    main()
