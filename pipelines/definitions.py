"""The Dagster code location: assembles assets, checks, resources, jobs and schedules.

Nothing is computed at import; `defs` is built when Dagster loads the location, from the
PERPFOLIO_* environment (see pipelines/settings.py and docs/configuration.md).
"""

import dagster as dg

from assets import (ablations, attribution, evaluation, features, frontier, hedge, portfolio, raw, risk_quality,
                    signals, significance, stress_check)
from perpfolio.errors import ConfigError
from pipelines import freshness, schedules
from pipelines.partitions import time_partitions
from pipelines.resources import RawMarket, WarehouseIOManager
from pipelines.settings import Settings


def executor_for(name: str) -> dg.ExecutorDefinition:
    """The Dagster executor PERPFOLIO_EXECUTOR names. celery and k8s come from the integrations of
    the same Dagster release (`pip install -e ".[scale]"`); their broker / cluster settings are run
    config or instance config of the deployment, not code."""
    if name == "in_process":
        return dg.in_process_executor
    if name == "multiprocess":
        return dg.multiprocess_executor
    try:
        if name == "celery":
            from dagster_celery import celery_executor

            return celery_executor
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    except ImportError as exc:
        raise ConfigError(f"PERPFOLIO_EXECUTOR={name} needs its Dagster integration: pip install -e \".[scale]\"") from exc


def build_definitions(settings: Settings, *, market: RawMarket | None = None) -> dg.Definitions:
    """Everything of one deployment; `market` replaces the source built from settings (tests)."""
    partitions = time_partitions(settings)
    jobs, schedule_defs = schedules.build(partitions)
    # every asset says what its numbers were computed on (a synthetic market says so in the UI)
    label = lambda spec: spec.merge_attributes(metadata={"market_data": settings.market_label})  # noqa: E731
    return dg.Definitions(
        assets=dg.map_asset_specs(label, [
            *raw.build(settings, partitions),
            *features.build(settings, partitions),
            *signals.build(settings, partitions),
            *portfolio.build(settings, partitions),
            *frontier.build(settings, partitions),
            *hedge.build(settings, partitions),
            *evaluation.build(settings),
            *attribution.build(settings),
            *stress_check.build(settings),
            *ablations.build(settings),
            *risk_quality.build(settings),
            *significance.build(settings),
        ]),
        asset_checks=freshness.build(settings, partitions),
        jobs=jobs,
        schedules=schedule_defs,
        resources={
            "io_manager": WarehouseIOManager(database=str(settings.warehouse)),
            "market": market or RawMarket(
                source=settings.source, symbols=list(settings.symbols), origin=settings.origin.isoformat(), seed=settings.seed,
                synthetic_events=settings.synthetic_events, outliers=settings.outliers,
                archive_dir=str(settings.archive_dir or ""), iv_csv=[str(p) for p in settings.iv_csv],
                exchange=settings.exchange, exchange_url=settings.exchange_url or "",
                exchange_cache=str(settings.exchange_cache), exchange_refresh=settings.exchange_refresh,
                exchange_rate_limit=settings.exchange_rate_limit, exchange_timeout_s=settings.exchange_timeout_s,
                exchange_retries=settings.exchange_retries, tiers_file=str(settings.tiers_file or ""),
            ),
        },
        executor=executor_for(settings.executor),
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(Settings.from_env())
