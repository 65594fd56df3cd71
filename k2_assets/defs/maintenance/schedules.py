from datetime import UTC

import dagster as dg

from k2_assets.defs.maintenance.jobs import table_maintenance_job


@dg.schedule(
    job=table_maintenance_job,
    cron_schedule="30 4 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
def table_maintenance_schedule(context: dg.ScheduleEvaluationContext):
    """Daily at 04:30 UTC, after the Binance history load: compact closed days, expire past 7 days, remove orphans."""
    day = context.scheduled_execution_time.astimezone(UTC).date().isoformat()
    return dg.RunRequest(run_key=f"table-maintenance-{day}")
