"""Jobs and schedules. Every schedule ships STOPPED: turn them on in the UI (Automation tab)."""

import dagster as dg

from assets.evaluation import EVALUATION_KEYS
from assets.features import NET_RETURNS
from assets.raw import CANDLES, DATA_QUALITY, FUNDING, IMPLIED_VOL, REFERENCE_PRICES

EVALUATION = dg.AssetSelection.assets(*EVALUATION_KEYS)  # backtest.*, risk.*, report
MARKET_DATA = dg.AssetSelection.assets(CANDLES, FUNDING, IMPLIED_VOL, REFERENCE_PRICES, DATA_QUALITY, NET_RETURNS)


def build(partitions: dg.PartitionsDefinition) -> tuple[list, list[dg.ScheduleDefinition]]:
    market_job = dg.define_asset_job(
        "daily_walk_forward", selection=dg.AssetSelection.all() - EVALUATION, partitions_def=partitions,
        description="Raw data -> net returns -> estimates -> signals -> weights for one UTC day (or a range).",
    )
    evaluation_job = dg.define_asset_job(
        "evaluation", selection=EVALUATION, description="Backtest, metrics, stress tests and report over all stored history.",
    )
    data_job = dg.define_asset_job(
        "hourly_market_data", selection=MARKET_DATA, partitions_def=partitions,
        description="Raw data and net returns of the current UTC day, refreshed as its hours close.",
    )

    @dg.schedule(job=data_job, cron_schedule="5 * * * *", execution_timezone="UTC",
                 default_status=dg.DefaultScheduleStatus.STOPPED)
    def hourly_market_data_schedule(context: dg.ScheduleEvaluationContext):
        """Every hour, re-materialize today's partition (needs PERPFOLIO_END=open)."""
        key = context.scheduled_execution_time.strftime("%Y-%m-%d")
        if key not in partitions.get_partition_keys(current_time=context.scheduled_execution_time):
            return dg.SkipReason(f"no partition for {key}: the window ends before today (set PERPFOLIO_END=open)")
        return dg.RunRequest(run_key=context.scheduled_execution_time.isoformat(), partition_key=key)

    schedules = [
        hourly_market_data_schedule,
        dg.build_schedule_from_partitioned_job(market_job, hour_of_day=0, minute_of_hour=15,
                                               default_status=dg.DefaultScheduleStatus.STOPPED),
        dg.ScheduleDefinition(job=evaluation_job, cron_schedule="45 0 * * *", execution_timezone="UTC",
                              default_status=dg.DefaultScheduleStatus.STOPPED),
    ]
    return [data_job, market_job, evaluation_job], schedules
