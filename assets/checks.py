"""The blocking schema check every stage runs on its own output before anything is stored.

An asset yields through `validated`: a frame that fails its pandera model is NOT written (the
stored partition stays as it was), the check fails with the offending rows attached, and the
downstream assets of the run do not execute.
"""

from collections.abc import Iterator, Mapping
from typing import Any

import dagster as dg
import numpy as np
import pandera.errors
import pandera.polars as pa
import polars as pl

from assets.schemas import conform
from pipelines.partitions import WAREHOUSE_POOL

SCHEMA_CHECK = "schema"


def schema_check(key: dg.AssetKey, model: type[pa.DataFrameModel]) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(SCHEMA_CHECK, asset=key, blocking=True, description=f"rows satisfy {model.__name__}: {model.__doc__}")


def table_metadata(key: dg.AssetKey, model: type[pa.DataFrameModel]) -> dict[str, Any]:
    """Dagster's standard definition metadata of a warehouse table, from its pandera model: the
    DuckDB table (``schema.table``, the asset key) and every column with its type, description and
    nullability, so the UI's column view shows what each column means."""
    columns = [
        dg.TableColumn(name, type=str(column.dtype), description=column.description,
                       constraints=dg.TableColumnConstraints(nullable=bool(column.nullable), unique=bool(column.unique)))
        for name, column in model.to_schema().columns.items()
    ]
    return {"dagster/table_name": ".".join(key.path), "dagster/column_schema": dg.TableSchema(columns=columns)}


def table_asset(
    key: dg.AssetKey, model: type[pa.DataFrameModel], *, partitions: dg.PartitionsDefinition | None = None,
    partition_expr: str | None = None, backfill_policy: dg.BackfillPolicy | None = None, **asset_kwargs: Any,
):
    """`@dg.asset` for a warehouse table: writer pool, blocking schema check, output only when valid,
    the table's name and column schema as standard metadata (:func:`table_metadata`).

    A partitioned table also gets its `partition_expr` (the column a partition's rows are found by)
    and its `backfill_policy` (pipelines.partitions.run_policy: how many partitions one run covers).
    """
    if partitions is not None and (partition_expr is None or backfill_policy is None):
        raise ValueError(f"table_asset {key.to_user_string()}: a partitioned table needs partition_expr and backfill_policy")
    partitioned = {} if partitions is None else {
        "partitions_def": partitions, "backfill_policy": backfill_policy, "metadata": {"partition_expr": partition_expr},
    }
    metadata = {**table_metadata(key, model), **partitioned.pop("metadata", {}), **asset_kwargs.pop("metadata", {})}
    return dg.asset(
        key=key, pool=WAREHOUSE_POOL, output_required=False, check_specs=[schema_check(key, model)],
        metadata=metadata, **partitioned, **asset_kwargs,
    )


ROW_KEYS = ("as_of", "ts", "bar_ts", "from_ts", "strategy", "estimator", "symbol", "underlying", "scenario", "kind")
FIRST_FAILURES = 3  # failing rows named in the one-line summary (make run, the run's failure report)


def check_frame(frame: pl.DataFrame, model: type[pa.DataFrameModel], key: dg.AssetKey) -> dg.AssetCheckResult:
    """Validate `frame` against `model`; a failure lists up to 20 failing rows as markdown (the
    check, the column and value, and the row's key: symbol, ts, ...) and names the first few in
    the `first_failures` text."""
    try:
        model.validate(frame, lazy=True)
    except pandera.errors.SchemaErrors as exc:
        rows = failing_rows(frame, exc.failure_cases)
        first = "; ".join(", ".join(f"{k}={v}" for k, v in row.items() if v is not None)
                          for row in rows.head(FIRST_FAILURES).iter_rows(named=True))
        return dg.AssetCheckResult(
            asset_key=key,
            check_name=SCHEMA_CHECK,
            passed=False,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={"failure_count": exc.failure_cases.height, "first_failures": first,
                      "failures": dg.MetadataValue.md(markdown_table(rows.head(20)))},
        )
    return dg.AssetCheckResult(asset_key=key, check_name=SCHEMA_CHECK, passed=True, metadata={"rows": frame.height})


def failing_rows(frame: pl.DataFrame, cases: pl.DataFrame) -> pl.DataFrame:
    """One line per pandera failure case: check, column, value, and the key columns of the failing
    row (looked up by the case's row index; null when the failure is not about one row)."""
    keys = [c for c in ROW_KEYS if c in frame.columns]
    readable = [pl.col(c).dt.to_string("%Y-%m-%d %H:%M") if isinstance(frame.schema[c], pl.Datetime)
                else pl.col(c).cast(pl.String) for c in keys]
    indexed = frame.select(keys).with_row_index("index").with_columns(readable)
    lines = cases.select(
        "check", pl.when(pl.col("schema_context") == "Column").then(pl.col("column")).alias("column"),
        pl.when(pl.col("schema_context") == "Column").then(pl.col("failure_case")).alias("value"),
        pl.col("index").cast(pl.UInt32),
    )
    return lines.join(indexed, on="index", how="left").sort("index", nulls_last=True).select(*keys, "check", "column", "value")


TIME_COLUMNS = ("as_of", "ts", "month")  # the column a table's time_range metadata spans, first found


def time_range(frame: pl.DataFrame, column: str = "ts") -> str:
    """``first .. last`` of ``column`` (UTC), or "empty"."""
    if frame.is_empty():
        return "empty"
    return f"{frame[column].min()} .. {frame[column].max()}"


def readable_metadata(frame: pl.DataFrame, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """An output's metadata as the UI shows it: plain floats rounded to 6 significant digits, and a
    ``time_range`` over the table's time column (`TIME_COLUMNS`) unless the asset gave its own."""
    out = {k: float(f"{v:.6g}") if isinstance(v, (float, np.floating)) else v for k, v in metadata.items()}
    column = next((c for c in TIME_COLUMNS if c in frame.columns), None)
    if column is not None and "time_range" not in out:
        out["time_range"] = time_range(frame, column)
    return out


def validated(
    frame: pl.DataFrame, model: type[pa.DataFrameModel], key: dg.AssetKey, *, output_name: str = "result",
    metadata: Mapping[str, Any] | None = None,
) -> Iterator[dg.Output | dg.AssetCheckResult]:
    """Conform `frame` to the table, check it, and emit the output (with `readable_metadata`) only
    when the check passes."""
    frame = conform(frame, model)
    result = check_frame(frame, model, key)
    if result.passed:
        yield dg.Output(frame, output_name=output_name, metadata={
            "dagster/row_count": dg.MetadataValue.int(frame.height), **readable_metadata(frame, metadata or {})})
    yield result


def markdown_table(frame: pl.DataFrame) -> str:
    """A frame as a markdown table (floats to 4 significant digits, nulls as '–'), for asset metadata
    and generated pages."""
    fmt = lambda v: "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    header = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * frame.width + "\n"
    return header + "".join("| " + " | ".join(fmt(v) for v in row) + " |\n" for row in frame.iter_rows())
