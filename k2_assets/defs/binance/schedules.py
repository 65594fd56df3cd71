from datetime import UTC, timedelta

import dagster as dg

from k2_assets.defs.partitions import binance_days

binance_history_job = dg.define_asset_job(
    "binance_history_job",
    selection=dg.AssetSelection.assets("binance_trades_history", "binance_um_trades_history"),
    partitions_def=binance_days,
    description="Load one UTC day of Binance trade dumps, spot and USD-M futures.",
)


@dg.schedule(job=binance_history_job, cron_schedule="0 3 * * *", execution_timezone="UTC")
def binance_history_schedule(context: dg.ScheduleEvaluationContext):
    """Load yesterday's dumps at 03:00 UTC, once Binance has published them."""
    day = (context.scheduled_execution_time.astimezone(UTC) - timedelta(days=1)).date().isoformat()
    return dg.RunRequest(run_key=f"binance-history-{day}", partition_key=day)
