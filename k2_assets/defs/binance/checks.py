"""The live asset's gap check, on its own: every sensor tick that writes asks for a run of it."""

import time
import warnings
from datetime import date

import dagster as dg
from pyiceberg.expressions import And, EqualTo

from k2_assets.core import integrity, live_codec
from k2_assets.core.outage import StoreHealth
from k2_assets.defs.partitions import binance_days
from k2_assets.defs.resources import IcebergResource

BINANCE_TRADES = dg.AssetKey("binance_trades")
OUTAGE_WAIT_SECONDS = 120.0


# A partitioned asset check is a preview feature of Dagster 1.13; it is what records one evaluation per day,
# so the warning it raises on every import says nothing new.
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=dg.PreviewWarning)


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
        where = And(EqualTo("exchange", live_codec.EXCHANGE), EqualTo("session_date", day.isoformat()))
        return gaps.scan(row_filter=where).to_arrow(), gaps.metadata.current_snapshot_id

    # A catalog outage delays the check instead of failing its run.
    rows, snapshot = StoreHealth(logger=context.log).call(read, "reading market.sequence_gaps", deadline=time.monotonic() + OUTAGE_WAIT_SECONDS)
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
    description="Evaluates no_unexplained_gaps on one day of binance_trades (the live sensor asks for it after every tick that writes).",
)
