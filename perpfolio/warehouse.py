"""Opening DuckDB files that another process may hold: the warehouse and the exchange download cache."""

import time

import duckdb

LOCK_WAIT_SECONDS = 600.0  # how long a writer waits for another process's DuckDB file lock


def connect_waiting(database: str, config: dict | None = None, *, read_only: bool = False,
                    wait_s: float = LOCK_WAIT_SECONDS) -> duckdb.DuckDBPyConnection:
    """`duckdb.connect`, waiting (capped exponential backoff, 0.05 s to 1 s) while another process
    holds the file lock, for up to `wait_s` seconds; any other error is raised at once.

    The warehouse pool (dagster.yaml) already runs one writer step at a time across runs of one
    DAGSTER_HOME; this covers what the pool does not see: readers and writers outside Dagster
    (the `duckdb` CLI, `make run`'s summary) or runs of another DAGSTER_HOME.
    """
    deadline, delay = time.monotonic() + wait_s, 0.05
    while True:
        try:
            return duckdb.connect(database, read_only=read_only, config=config or {})
        except duckdb.IOException as exc:
            if "could not set lock" not in str(exc).lower() or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(1.0, delay * 2)
