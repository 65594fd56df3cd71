"""OHLCV rollups (1m, 5m, 1h, 1d) of market.trades, with time travel and declarative automation."""

import dagster as dg

from k2_assets.defs.rollups.assets import ohlcv_1d, ohlcv_1h, ohlcv_1m, ohlcv_5m

assets = [ohlcv_1m, ohlcv_5m, ohlcv_1h, ohlcv_1d]
sensors = [
    dg.AutomationConditionSensorDefinition(
        "rollups_automation",
        target=dg.AssetSelection.groups("rollups"),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
        description="Re-materializes bars when their trades partition changes (backfills and live micro-batches).",
    )
]
