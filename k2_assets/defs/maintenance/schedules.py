from datetime import UTC

import dagster as dg

from k2_assets.defs.maintenance.jobs import table_maintenance_job


@dg.schedule(
    job=table_maintenance_job,
    cron_schedule="30 * * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
def table_maintenance_schedule(context: dg.ScheduleEvaluationContext):
    """Hourly at :30: compact the open and recent days, thin and expire snapshots, remove orphans (live commits every second)."""
    hour = context.scheduled_execution_time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M")
    return dg.RunRequest(run_key=f"table-maintenance-{hour}")
