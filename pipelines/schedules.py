"""Jobs and schedules. Every schedule ships STOPPED: turn them on in the UI (Automation tab)."""

from datetime import datetime, timedelta

import dagster as dg

from assets.evaluation import EVALUATION_KEYS
from assets.features import NET_RETURNS
from assets.raw import CANDLES, DATA_QUALITY, FUNDING, IMPLIED_VOL, REFERENCE_PRICES

EVALUATION = dg.AssetSelection.assets(*EVALUATION_KEYS)  # backtest.*, risk.*, report
MARKET_DATA = dg.AssetSelection.assets(CANDLES, FUNDING, IMPLIED_VOL, REFERENCE_PRICES, DATA_QUALITY, NET_RETURNS)


def build(partitions: dg.TimeWindowPartitionsDefinition) -> tuple[list, list[dg.ScheduleDefinition]]:
    market_job = dg.define_asset_job(
        "daily_walk_forward", selection=dg.AssetSelection.all() - EVALUATION, partitions_def=partitions,
        description="Raw data -> net returns -> estimates -> signals -> weights for one partition (or a range).",
    )
    evaluation_job = dg.define_asset_job(
        "evaluation", selection=EVALUATION, description="Backtest, metrics, stress tests and report over all stored history.",
    )
    data_job = dg.define_asset_job(
        "hourly_market_data", selection=MARKET_DATA, partitions_def=partitions,
        description="Raw data and net returns of the partition in progress, refreshed as its hours close.",
    )

    def request_for(context: dg.ScheduleEvaluationContext, at: datetime, what: str) -> dg.RunRequest | dg.SkipReason:
        """A run of the partition holding the time `at`, or why there is none (the window is closed)."""
        key = partitions.get_partition_key_for_timestamp(at.timestamp())
        if key not in partitions.get_partition_keys(current_time=context.scheduled_execution_time):
            return dg.SkipReason(f"no partition holds {what} ({at:%Y-%m-%d %H:%M} UTC): the configured window ends "
                                 "before it (set PERPFOLIO_END=open for a live deployment)")
        return dg.RunRequest(run_key=context.scheduled_execution_time.isoformat(), partition_key=key)

    @dg.schedule(job=data_job, cron_schedule="5 * * * *", execution_timezone="UTC",
                 default_status=dg.DefaultScheduleStatus.STOPPED)
    def hourly_market_data_schedule(context: dg.ScheduleEvaluationContext):
        """Every hour, re-materialize the partition holding the hour that just closed (needs PERPFOLIO_END=open)."""
        return request_for(context, context.scheduled_execution_time - timedelta(hours=1), "the hour just closed")

    @dg.schedule(job=market_job, cron_schedule="15 0 * * *", execution_timezone="UTC",
                 default_status=dg.DefaultScheduleStatus.STOPPED)
    def daily_walk_forward_schedule(context: dg.ScheduleEvaluationContext):
        """Every day at 00:15 UTC, re-materialize the partition holding the day that just closed, so its
        rebalance (the day's last bar) is computed; never a partition of a closed window."""
        return request_for(context, context.scheduled_execution_time - timedelta(days=1), "the day just closed")

    schedules = [
        hourly_market_data_schedule,
        daily_walk_forward_schedule,
        dg.ScheduleDefinition(job=evaluation_job, cron_schedule="45 0 * * *", execution_timezone="UTC",
                              default_status=dg.DefaultScheduleStatus.STOPPED),
    ]
    return [data_job, market_job, evaluation_job], schedules
