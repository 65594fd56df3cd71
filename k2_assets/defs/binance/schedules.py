import dagster as dg

from k2_assets.defs.partitions import binance_days

binance_history_job = dg.define_asset_job(
    "binance_history_job",
    selection=dg.AssetSelection.assets("binance_trades_history"),
    partitions_def=binance_days,
    description="Load one UTC day of Binance trade dumps.",
)

# Binance publishes a day's dumps early the next day (UTC).
binance_history_schedule = dg.build_schedule_from_partitioned_job(binance_history_job, hour_of_day=3)
