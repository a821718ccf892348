"""The Dagster code location: assembles assets, checks, resources, jobs and schedules.

Nothing is computed at import; `defs` is built when Dagster loads the location, from the
PERPFOLIO_* environment (see pipelines/settings.py and the README).
"""

import dagster as dg

from assets import evaluation, features, portfolio, raw, signals
from pipelines import schedules
from pipelines.partitions import daily_partitions
from pipelines.resources import RawMarket, WarehouseIOManager
from pipelines.settings import Settings


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
        jobs=jobs,
        schedules=schedule_defs,
        resources={
            "io_manager": WarehouseIOManager(database=str(settings.warehouse)),
            "market": market or RawMarket(
                source=settings.source, symbols=list(settings.symbols), origin=settings.origin.isoformat(), seed=settings.seed
            ),
        },
        executor=dg.in_process_executor,
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(Settings.from_env())
