"""The whole pipeline on the built-in synthetic market at growing sizes: wall time of each job, peak
memory, warehouse size and where the time goes.

    .venv/bin/python benchmarks/bench_pipeline.py                          # the default ladder
    .venv/bin/python benchmarks/bench_pipeline.py --sizes 3x60,10x60,30x60,3x365
    .venv/bin/python benchmarks/bench_pipeline.py --sizes 3x210 --partitions daily,weekly,monthly
    .venv/bin/python benchmarks/bench_pipeline.py --sizes 3x210 --executors in_process,multiprocess

A size ``NxD`` is N symbols (BTC, ETH, SOL, then made-up S003USDT... with the synthetic market's
own prices and the conservative default tiers) over D days from 2025-01-01, with every other
setting at its default (30-day window, the default strategies, 4 stress leverages, weekly
partitions and the in-process executor unless --partitions / --executors name the ones to
compare), except bad prints, which are quarantined: the synthetic market's fat-tailed shocks give
the odd one-bar reverting jump that the detector rightly flags (S055USDT on 2025-07-11 at 100 x
365), and a desk running hundreds of perps quarantines rather than stops. The settings reach the child process as PERPFOLIO_* variables, as a deployment's would
(the multiprocess executor's step processes rebuild the job from them). Each size runs in its own
process with a fresh warehouse and an on-disk DAGSTER_HOME holding the project's dagster.yaml,
exactly as `make run` does: what it pays for is what a user pays for (Python start-up and imports,
the walk-forward run over the range, the evaluation run, Dagster's event log). Peak RSS is the
largest of that process and its step processes (ru_maxrss). The slowest steps come from the run's
own STEP_START / STEP_SUCCESS events.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SIZES = "3x60,10x60,30x60,3x210,10x210,3x365,10x365"
FIRST = ("BTCUSDT", "ETHUSDT", "SOLUSDT")


def symbols(n: int) -> tuple[str, ...]:
    return FIRST[:n] + tuple(f"S{i:03d}USDT" for i in range(len(FIRST), n))


def one() -> dict:
    """Materialize one size in this process (DAGSTER_HOME set by the caller); its figures as a dict."""
    began = time.perf_counter()
    import dagster as dg

    from pipelines.definitions import build_definitions
    from pipelines.run import materialize_range
    from pipelines.settings import Settings

    imported = time.perf_counter() - began
    settings = Settings.from_env()
    with dg.DagsterInstance.get() as instance:
        timings = materialize_range(build_definitions(settings), settings.start, settings.end, instance,
                                    executor=settings.executor)
        steps: dict[str, float] = {}
        for run in instance.get_runs():
            started = {}
            for entry in instance.all_logs(run.run_id):
                event = entry.dagster_event
                if event is None:
                    continue
                if event.event_type_value == "STEP_START":
                    started[event.step_key] = entry.timestamp
                elif event.event_type_value == "STEP_SUCCESS":
                    steps[event.step_key] = entry.timestamp - started[event.step_key]
    return {
        "symbols": len(settings.symbols), "days": (settings.end - settings.start).days + 1,
        "partitions": settings.partitions, "executor": settings.executor, "import_s": imported, **{f"{k}_s": v for k, v in timings.items()},
        "total_s": time.perf_counter() - began, "peak_rss_gb": max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024**2,
        "warehouse_mb": settings.warehouse.stat().st_size / 1024**2,
        "dagster_home_mb": sum(p.stat().st_size for p in Path(os.environ["DAGSTER_HOME"]).rglob("*") if p.is_file()) / 1024**2,
        "steps": dict(sorted(steps.items(), key=lambda kv: -kv[1])),
    }


def run_size(n: int, days: int, grain: str, executor: str) -> dict:
    """One size in a child process with its own temporary warehouse and DAGSTER_HOME."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    try:
        home = tmp / "home"
        home.mkdir()
        shutil.copy(ROOT / ".dagster_home" / "dagster.yaml", home / "dagster.yaml")
        start = date(2025, 1, 1)
        env = {**os.environ, "DAGSTER_HOME": str(home), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "PERPFOLIO_SYMBOLS": ",".join(symbols(n)), "PERPFOLIO_START": start.isoformat(),
               "PERPFOLIO_END": (start + timedelta(days=days - 1)).isoformat(), "PERPFOLIO_PARTITIONS": grain,
               "PERPFOLIO_EXECUTOR": executor, "PERPFOLIO_WAREHOUSE": str(tmp / "warehouse.duckdb"),
               "PERPFOLIO_REPORTS_DIR": str(tmp / "reports"), "PERPFOLIO_OUTLIERS": os.environ.get("PERPFOLIO_OUTLIERS", "quarantine")}
        out = subprocess.run([sys.executable, __file__, "--one"], cwd=ROOT, env=env, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{n}x{days} ({grain}, {executor}) failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated NxD: N symbols x D days")
    ap.add_argument("--partitions", default="weekly", help="comma-separated partition grains: daily, weekly, monthly")
    ap.add_argument("--executors", default="in_process", help="comma-separated executors: in_process, multiprocess")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process of one size
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one()))
        return
    print("| symbols x days | partitions | executor | walk-forward (s) | evaluation (s) | whole process (s) | peak RSS (GB) | warehouse (MB) "
          "| event log (MB) | slowest steps (s) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for size in args.sizes.split(","):
        n, days = map(int, size.split("x"))
        for grain in args.partitions.split(","):
            for executor in args.executors.split(","):
                r = run_size(n, days, grain, executor)
                slowest = ", ".join(f"{k} {v:.1f}" for k, v in list(r["steps"].items())[:4])
                print(f"| {n} x {days} | {grain} | {executor} | {r['daily_walk_forward_s']:.1f} | {r['evaluation_s']:.1f} | {r['total_s']:.1f} | "
                      f"{r['peak_rss_gb']:.2f} | {r['warehouse_mb']:.0f} | {r['dagster_home_mb']:.0f} | {slowest} |", flush=True)


if __name__ == "__main__":
    main()
