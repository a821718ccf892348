"""`make run` / `make backfill`: materialize a range of days, then the evaluation, and print the verdict.

A range covers the partitions (days, weeks or months: PERPFOLIO_PARTITIONS) holding its first and
last day, cut to PERPFOLIO_START..END.

    python -m pipelines.run                       # the whole configured window (PERPFOLIO_START..END)
    python -m pipelines.run --start 2025-03-01 --end 2025-03-31
    python -m pipelines.run --start 2024-01-01 --end 2024-06-30 --walk-forward-only   # history in pieces,
                                                  # then one run without the flag evaluates everything

The walk-forward assets run over the range in runs of at most PERPFOLIO_MAX_DAYS_PER_RUN days of
whole partitions (their backfill policy, as a backfill from the UI splits it), one after the
other; then the evaluation job rebuilds backtest, metrics, stress and report. Runs are recorded
in DAGSTER_HOME, so `make ui` shows them.
"""

import argparse
import ctypes
import gc
import os
import socket
import sys
import time
from datetime import date, datetime, timezone

import dagster as dg
import polars as pl

from pipelines.definitions import build_definitions
from pipelines.partitions import partition_keys_for
from perpfolio.warehouse import connect_waiting
from pipelines.settings import Settings

COMPARISON = """
SELECT c.rank, c.strategy, round(m.sharpe, 2) AS sharpe, round(m.ann_return, 4) AS ann_return,
       round(m.max_drawdown, 4) AS max_drawdown, round(m.max_loss, 4) AS max_loss_hour,
       round(m.turnover, 1) AS turnover, round(m.funding_pnl, 4) AS funding_pnl, m.fallbacks,
       round(c.worst_equity_after, 3) AS worst_stress_equity, c.max_safe_leverage, c.account_usdt
FROM backtest.comparison c JOIN backtest.metrics m USING (strategy) ORDER BY c.rank
"""


PID_TAG, HOST_TAG = "perpfolio/pid", "perpfolio/host"


class RunFailed(RuntimeError):
    """A materialization run did not succeed."""


def failure_report(job: dg.JobDefinition, result, partitions: str) -> str:
    """Why a run failed, one line per failed step: its assets, the partitions and the reason.

    Failed (blocking) asset checks are listed with their failure count, so a bad frame is named
    by asset and check, not only by step.
    """
    lines = [f"run {result.run_id} of job {job.name} over partitions {partitions} failed:"]
    # a step is named after its node: an asset's or a multi-asset's op
    assets_of_step = {a.node_def.name: ", ".join(sorted(k.to_user_string() for k in a.keys))
                      for a in job.asset_layer.asset_graph.assets_defs if a.keys and a.is_executable}
    checks = [e.event_specific_data for e in result.all_events
              if e.event_type_value == "ASSET_CHECK_EVALUATION" and not e.event_specific_data.passed]
    for check in checks:
        count, first = check.metadata.get("failure_count"), check.metadata.get("first_failures")
        lines.append(f"  - check {check.asset_key.to_user_string()}:{check.check_name} failed"
                     + (f" ({count.value} failing rows)" if count is not None else "") + f", partitions {partitions}"
                     + (f"; first: {first.value}" if first is not None else ""))
    for event in (e for e in result.all_events if e.is_step_failure):
        assets = assets_of_step.get(event.step_key, event.step_key)
        error = event.event_specific_data.error
        while error is not None and error.cause is not None and "DagsterExecutionStepExecutionError" in error.cls_name:
            error = error.cause  # the user's exception, not Dagster's wrapper
        reason = " ".join(error.message.split())[:400] if error is not None and error.message.strip() else "unknown"
        if error is not None and error.cls_name and error.cls_name not in reason.split(":")[0]:
            reason = f"{error.cls_name}: {reason}"
        lines.append(f"  - asset {assets} (step {event.step_key}), partitions {partitions}: {reason}")
    lines.append("see the run's log in the UI (make ui) for the full trace")
    return "\n".join(lines)


def walk_forward_job() -> dg.JobDefinition:
    return build_definitions(Settings.from_env()).resolve_job_def("daily_walk_forward")


def evaluation_job() -> dg.JobDefinition:
    return build_definitions(Settings.from_env()).resolve_job_def("evaluation")


RECONSTRUCT = {"daily_walk_forward": walk_forward_job, "evaluation": evaluation_job}


def run_ranges(job: dg.JobDefinition, start: date, end: date) -> list[tuple[str, str]]:
    """(first, last) partition keys of each run that materializes the partitions holding `start`..`end`:
    consecutive pieces of at most the smallest `max_partitions_per_run` of the job's assets' backfill
    policies (pipelines.partitions.run_policy), in order."""
    first, last = partition_keys_for(job.partitions_def, start, end)
    keys = job.partitions_def.get_partition_keys_in_range(dg.PartitionKeyRange(first, last))
    limits = [a.backfill_policy.max_partitions_per_run for a in job.asset_layer.asset_graph.assets_defs
              if a.backfill_policy is not None and a.backfill_policy.max_partitions_per_run is not None]
    size = min(limits, default=len(keys))
    return [(keys[i], keys[min(i + size, len(keys)) - 1]) for i in range(0, len(keys), size)]


def materialize_range(
    defs: dg.Definitions, start: date, end: date, instance: dg.DagsterInstance, *, executor: str = "in_process",
    evaluate: bool = True,
) -> dict[str, float]:
    """The walk-forward job over [start, end] in the runs of `run_ranges`, then (``evaluate``) one run of
    the evaluation job; returns the wall time in seconds by job name (all of its runs).

    Each run is tagged with this process's host and pid, so a later invocation can tell a run
    that was killed (SIGKILL, power loss) from one still going: see `recover_interrupted_runs`.
    """
    pieces = run_ranges(defs.resolve_job_def("daily_walk_forward"), start, end)
    owner = {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}
    # Dagster's console logger would print each failed step's whole trace (70+ lines) before the
    # summary below; the run's event log keeps it for the UI, and the summary names each failure
    quiet = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    timings: dict[str, float] = {}

    def label(i: int, first: str, last: str) -> str:
        if len(pieces) > 1:
            return f"{first}..{last} (run {i + 1} of {len(pieces)} over the partitions holding {start}..{end})"
        return f"{first}..{last}" + ("" if (first, last) == (start.isoformat(), end.isoformat())
                                     else f" (the partitions holding {start}..{end})")

    runs = [
        ("daily_walk_forward", {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last},
         label(i, first, last))
        for i, (first, last) in enumerate(pieces)
    ] + ([("evaluation", {}, "(unpartitioned)")] if evaluate else [])
    for job_name, run_tags, partitions in runs:
        began = time.perf_counter()
        job = defs.resolve_job_def(job_name)
        if executor == "in_process":
            result = job.execute_in_process(run_config=quiet, instance=instance, tags={**run_tags, **owner}, raise_on_error=False)
        else:  # steps in child processes: the job is rebuilt there from the environment (PERPFOLIO_*)
            with dg.execute_job(dg.reconstructable(RECONSTRUCT[job_name]), instance, run_config=quiet,
                                tags={**run_tags, **owner}, raise_on_error=False) as result:
                pass
        if not result.success:
            raise RunFailed(failure_report(job, result, partitions))
        timings[job_name] = timings.get(job_name, 0.0) + time.perf_counter() - began
        covered = f"partitions {partitions}" if run_tags else "all stored history"
        print(f"{job_name}: {covered} done in {time.perf_counter() - began:.1f} s (run {result.run_id})")
        del result
        release_memory()
    return timings


def release_memory() -> None:
    """Give a finished run's memory back before the next run starts: collect the reference cycles that
    still hold its frames, then (glibc) return the freed heap to the system. Without it a process of
    several runs kept about 0.5 GB more per run at 100 perps (BENCHMARKS.md)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def recover_interrupted_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark runs of this host whose process is gone as failed and free their concurrency slots.

    A run killed mid-way (SIGKILL) stays STARTED in DAGSTER_HOME and keeps its slot of the
    warehouse pool, so every later writer would wait for it forever. Its partial writes need no
    repair: each partition write is one DuckDB transaction, and the killed one was rolled back.
    Returns the ids of the recovered runs.
    """
    recovered = []
    unfinished = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.NOT_STARTED]
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=unfinished)):
        pid, host = run.tags.get(PID_TAG), run.tags.get(HOST_TAG)
        if pid is None or host != socket.gethostname() or _alive(int(pid)):
            continue
        instance.report_run_failed(run, message=f"process {pid} on {host} ended without finishing the run (killed?)")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        recovered.append(run.run_id)
    return recovered


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> None:
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", type=date.fromisoformat, default=settings.start)
    last_day = settings.last_day(datetime.now(timezone.utc).date())
    parser.add_argument("--end", type=date.fromisoformat, default=last_day)
    parser.add_argument("--walk-forward-only", action="store_true",
                        help="materialize the range without the evaluation (backtest, stress, report), e.g. to "
                             "backfill history in several ranges and evaluate once at the end")
    args = parser.parse_args(argv)
    if not settings.start <= args.start <= args.end <= last_day:
        sys.exit(f"range {args.start}..{args.end} must lie inside PERPFOLIO_START..END = {settings.start}..{last_day}")
    with dg.DagsterInstance.get() as instance:
        for run_id in recover_interrupted_runs(instance):
            print(f"recovered run {run_id}: its process is gone; marked failed and its warehouse slot freed")
        try:
            if settings.executor in ("celery", "k8s"):
                sys.exit(f"PERPFOLIO_EXECUTOR={settings.executor} runs steps on workers behind a broker or a cluster: "
                         "launch the jobs through the Dagster daemon of that deployment (UI, schedules, "
                         "`dagster job launch`); make run / make backfill execute in_process or multiprocess")
            materialize_range(build_definitions(settings), args.start, args.end, instance, executor=settings.executor,
                              evaluate=not args.walk_forward_only)
        except RunFailed as exc:
            sys.exit(str(exc))
    if args.walk_forward_only:
        print(f"walk-forward stored for {args.start}..{args.end}; the evaluation tables and the report still describe "
              "the previous evaluation (run without --walk-forward-only, or the evaluation job, to rebuild them)")
        return
    with connect_waiting(str(settings.warehouse), {}, read_only=True) as con:  # another run may be writing
        print(f"\nStrategy comparison on the {settings.market_label} (walk-forward, after fees, slippage and funding):")
        with pl.Config(tbl_cols=-1, tbl_rows=-1, tbl_width_chars=250, tbl_hide_dataframe_shape=True,
                       tbl_hide_column_data_types=True):
            print(con.sql(COMPARISON).pl())
    print(f"warehouse: {settings.warehouse}   (every stage is a table: make sql Q=\"SHOW ALL TABLES\")")
    print(f"report:    {settings.reports_dir / 'report.html'}")


if __name__ == "__main__":
    main()
