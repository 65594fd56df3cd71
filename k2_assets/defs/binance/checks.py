"""Binance checks: the rule catalogue on each stored day, and the live asset's gap check, which every sensor tick
that writes asks for."""

import time
from datetime import date

import dagster as dg

from k2_assets.core import integrity, live_codec
from k2_assets.core.outage import StoreHealth
from k2_assets.defs.partitions import binance_days
from k2_assets.defs.resources import IcebergResource
from k2_assets.defs.rule_checks import OUTAGE_WAIT_SECONDS, rule_checks

BINANCE_TRADES = dg.AssetKey("binance_trades")

binance_trades_history_rules = rule_checks("binance_trades_history", "trades", live_codec.EXCHANGE, binance_days, files=True)
# The live asset's gap check is a definition of its own (below), so that the sensor can ask for it alone after every tick.
binance_trades_rules = rule_checks(
    "binance_trades", "trades", live_codec.EXCHANGE, binance_days, without=(integrity.NO_UNEXPLAINED_GAPS.name,)
)


@dg.asset_check(
    asset=BINANCE_TRADES,
    name=integrity.NO_UNEXPLAINED_GAPS.name,
    partitions_def=binance_days,
    blocking=False,
    description=integrity.NO_UNEXPLAINED_GAPS.description,
)
def binance_trades_no_unexplained_gaps(context: dg.AssetCheckExecutionContext, iceberg: IcebergResource) -> dg.AssetCheckResult:
    """The day's open gaps in market.sequence_gaps that nothing explains (the writer and repair keep them current)."""
    day = date.fromisoformat(context.partition_key)

    def read():
        gaps = iceberg.table("sequence_gaps")
        return gaps.scan(row_filter=integrity.gaps_of_day(live_codec.EXCHANGE, day)).to_arrow(), gaps.metadata.current_snapshot_id

    # A catalog outage delays the check instead of failing its run.
    rows, snapshot = StoreHealth(logger=context.log).call(
        read, "reading market.sequence_gaps", deadline=time.monotonic() + OUTAGE_WAIT_SECONDS
    )
    outcome = integrity.gap_outcome(rows)
    return dg.AssetCheckResult(
        passed=outcome.passed,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "failed_rows": outcome.failed,
            "gap_rows": rows.num_rows,
            "sample": dg.MetadataValue.json(outcome.sample),
            "snapshot_id": str(snapshot),
        },
    )


binance_gap_check_job = dg.define_asset_job(
    "binance_gap_check_job",
    selection=dg.AssetSelection.checks(binance_trades_no_unexplained_gaps),
    partitions_def=binance_days,
    description=(
        "Evaluates no_unexplained_gaps on one day of binance_trades (the live sensor asks for it after every tick that writes)."
    ),
)


binance_checks_job = dg.define_asset_job(
    "binance_checks_job",
    selection=dg.AssetSelection.checks(*binance_trades_history_rules, *binance_trades_rules, binance_trades_no_unexplained_gaps),
    partitions_def=binance_days,
    description="Runs Binance rule checks alone on a stored day: pick checks by op selection and the day by the "
    "dagster/partition tag in the launchpad.",
)
