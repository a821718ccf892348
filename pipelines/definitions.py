"""The Dagster code location: assembles assets, checks, resources, jobs and schedules.

Nothing is computed at import; `defs` is built when Dagster loads the location, from the
PERPFOLIO_* environment (see pipelines/settings.py and the README).
"""

import dagster as dg

from assets import evaluation, features, portfolio, raw, signals
from pipelines import freshness, schedules
from pipelines.partitions import daily_partitions
from pipelines.resources import RawMarket, WarehouseIOManager
from pipelines.settings import Settings


# PERPFOLIO_EXECUTOR picks one; a k8s or celery deployment sets dagster_k8s.k8s_job_executor /
# dagster_celery.celery_executor here (or in its own definitions) - not installed in this project.
EXECUTORS = {"in_process": dg.in_process_executor, "multiprocess": dg.multiprocess_executor}


def build_definitions(settings: Settings, *, market: RawMarket | None = None) -> dg.Definitions:
    """Everything of one deployment; `market` replaces the source built from settings (tests)."""
    partitions = daily_partitions(settings)
    jobs, schedule_defs = schedules.build(partitions)
    return dg.Definitions(
        assets=[
            *raw.build(partitions),
            *features.build(settings, partitions),
            *signals.build(settings, partitions),
            *portfolio.build(settings, partitions),
            *evaluation.build(settings),
        ],
        asset_checks=freshness.build(partitions, list(settings.symbols), settings.max_staleness_hours),
        jobs=jobs,
        schedules=schedule_defs,
        resources={
            "io_manager": WarehouseIOManager(database=str(settings.warehouse)),
            "market": market or RawMarket(
                source=settings.source, symbols=list(settings.symbols), origin=settings.origin.isoformat(), seed=settings.seed,
                archive_dir=str(settings.archive_dir or ""), iv_csv=[str(p) for p in settings.iv_csv],
            ),
        },
        executor=EXECUTORS[settings.executor],
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(Settings.from_env())
