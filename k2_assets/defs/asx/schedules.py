from zoneinfo import ZoneInfo

import dagster as dg

from k2_assets.defs.partitions import asx_sessions

asx_history_job = dg.define_asset_job(
    "asx_history_job",
    selection=dg.AssetSelection.assets("asx_trades", "asx_quotes"),
    partitions_def=asx_sessions,
    description="Load one ASX session's trades and quotes from the vendor files.",
)


@dg.schedule(job=asx_history_job, cron_schedule="30 19 * * 1-5", execution_timezone="Australia/Sydney")
def asx_daily_schedule(context: dg.ScheduleEvaluationContext):
    """Load each new session once the vendor's end-of-day files are in (19:30 Sydney, weekdays)."""
    session = context.scheduled_execution_time.astimezone(ZoneInfo("Australia/Sydney")).date().isoformat()
    return dg.RunRequest(run_key=f"asx-{session}", partition_key=session)
