import dagster as dg

rollups_automation = dg.AutomationConditionSensorDefinition(
    "rollups_automation",
    target=dg.AssetSelection.groups("rollups"),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Re-materializes bars when their trades partition changes (backfills and live micro-batches).",
)
