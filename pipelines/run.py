"""`make run` / `make backfill`: materialize a range of days, then the evaluation, and print the verdict.

    python -m pipelines.run                       # the whole configured window (PERPFOLIO_START..END)
    python -m pipelines.run --start 2025-03-01 --end 2025-03-31

The walk-forward assets run as ONE run over the whole range (single-run backfill policy), then
the evaluation job rebuilds backtest, metrics, stress and report. Runs are recorded in
DAGSTER_HOME, so `make ui` shows them.
"""

import argparse
import sys
import time
import warnings
from datetime import date, datetime, timezone

import dagster as dg
import duckdb

from pipelines.definitions import build_definitions
from pipelines.settings import Settings

COMPARISON = """
SELECT strategy, round(sharpe, 2) AS sharpe, round(ann_return, 4) AS ann_return,
       round(max_drawdown, 4) AS max_drawdown, round(max_loss, 4) AS max_loss,
       round(turnover, 2) AS turnover, round(funding_pnl, 5) AS funding_pnl, fallbacks
FROM backtest.metrics ORDER BY sharpe DESC
"""


class RunFailed(RuntimeError):
    """A materialization run did not succeed."""


def materialize_range(defs: dg.Definitions, start: date, end: date, instance: dg.DagsterInstance) -> None:
    """One run of the walk-forward job over [start, end], then one run of the evaluation job."""
    tags = {"dagster/asset_partition_range_start": start.isoformat(), "dagster/asset_partition_range_end": end.isoformat()}
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    for job_name, run_tags in (("daily_walk_forward", tags), ("evaluation", {})):
        began = time.perf_counter()
        result = defs.resolve_job_def(job_name).execute_in_process(
            run_config=quiet, instance=instance, tags=run_tags, raise_on_error=False
        )
        if not result.success:
            failed = [e.step_key for e in result.all_events if e.is_step_failure]
            raise RunFailed(f"run {result.run_id} of job {job_name} failed at steps {failed}; see its log in the UI (make ui)")
        print(f"{job_name}: {start}..{end} done in {time.perf_counter() - began:.1f} s (run {result.run_id})")


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", category=dg.BetaWarning)  # Dagster marks backfill policies and mappings beta
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", type=date.fromisoformat, default=settings.start)
    last_day = settings.last_day(datetime.now(timezone.utc).date())
    parser.add_argument("--end", type=date.fromisoformat, default=last_day)
    args = parser.parse_args(argv)
    if not settings.start <= args.start <= args.end <= last_day:
        sys.exit(f"range {args.start}..{args.end} must lie inside PERPFOLIO_START..END = {settings.start}..{last_day}")
    settings.warehouse.parent.mkdir(parents=True, exist_ok=True)
    with dg.DagsterInstance.get() as instance:
        try:
            materialize_range(build_definitions(settings), args.start, args.end, instance)
        except RunFailed as exc:
            sys.exit(str(exc))
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        print("\nStrategy comparison (walk-forward, after fees, slippage and funding):")
        print(con.sql(COMPARISON))
    print(f"warehouse: {settings.warehouse}   (duckdb {settings.warehouse} ; every stage is a table)")
    print(f"report:    {settings.reports_dir / 'report.html'}")


if __name__ == "__main__":
    main()
