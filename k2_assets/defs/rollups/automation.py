import dagster as dg

# Like eager(), but for any partition (a backfill of 2014 cascades too, not only the latest day) and
# without waiting for every dependency: the three trade sources are alternatives, not all required.
AUTOMATION = (
    dg.AutomationCondition.any_deps_updated().since_last_handled()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
).with_label("trades changed")

rollups_automation = dg.AutomationConditionSensorDefinition(
    "rollups_automation",
    # The bars, their checks, and the exchange's own bars they are proven against.
    target=dg.AssetSelection.groups("rollups") | dg.AssetSelection.assets("binance_klines"),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Bars and the exchange's own bars again when their trades partition changes (backfills, live micro-batches).",
)
