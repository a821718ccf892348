"""Jobs and schedules. Both schedules ship STOPPED: turn them on in the UI (Automation tab)."""

import dagster as dg

from assets.evaluation import EQUITY, METRICS, REPORT, STRESS

EVALUATION = dg.AssetSelection.assets(EQUITY, METRICS, STRESS, REPORT)


def build(partitions: dg.PartitionsDefinition) -> tuple[list, list[dg.ScheduleDefinition]]:
    market_job = dg.define_asset_job(
        "daily_walk_forward", selection=dg.AssetSelection.all() - EVALUATION, partitions_def=partitions,
        description="Raw data -> net returns -> estimates -> signals -> weights for one UTC day (or a range).",
    )
    evaluation_job = dg.define_asset_job(
        "evaluation", selection=EVALUATION, description="Backtest, metrics, stress tests and report over all stored history.",
    )
    schedules = [
        dg.build_schedule_from_partitioned_job(market_job, hour_of_day=0, minute_of_hour=15,
                                               default_status=dg.DefaultScheduleStatus.STOPPED),
        dg.ScheduleDefinition(job=evaluation_job, cron_schedule="45 0 * * *", execution_timezone="UTC",
                              default_status=dg.DefaultScheduleStatus.STOPPED),
    ]
    return [market_job, evaluation_job], schedules
