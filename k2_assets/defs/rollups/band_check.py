"""1m bars whose open, high or low lie beyond the session's continuous market by more than a band (core.price_band)."""

from datetime import date

import dagster as dg
from dagster_duckdb import DuckDBResource

from k2_assets.core import price_band, snapshots
from k2_assets.core.text import markdown_table
from k2_assets.defs.partitions import trade_days
from k2_assets.defs.resources import IcebergResource
from k2_assets.defs.rule_checks import latest_materialization

SHOWN = 50


@dg.asset_check(
    asset="ohlcv_1m",
    name="within_session_band",
    partitions_def=trade_days,
    description=f"no bar's open, high or low lies more than {price_band.BAND:.0%} beyond the session's continuous-trading range",
)
def within_session_band(
    context: dg.AssetCheckExecutionContext, iceberg: IcebergResource, duckdb: DuckDBResource
) -> dg.AssetCheckResult:
    done = latest_materialization(context.instance, dg.AssetKey("ohlcv_1m"), context.partition_key)
    columns = ("exchange", "symbol", "price", "price_forming", "trade_class")
    bars, trades = snapshots.bars_and_their_trades(
        iceberg.table("ohlcv_1m"), iceberg.table("trades"), date.fromisoformat(context.partition_key), done.snapshot_id, columns
    )
    if trades is None:
        return dg.AssetCheckResult(passed=True, metadata={"bars_checked": 0, "snapshot_id": str(done.snapshot_id)})
    with duckdb.get_connection() as con:
        flagged = price_band.outside(bars, trades, con=con)
    rows = [
        (f["exchange"], f["symbol"], f"{f['bar_start']:%H:%M}", f["field"], f["price"], f"{f['range_low']}–{f['range_high']}")
        for f in flagged.slice(0, SHOWN).to_pylist()
    ]
    return dg.AssetCheckResult(
        passed=flagged.num_rows == 0,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "bars_checked": bars.num_rows,
            "prices_outside": flagged.num_rows,
            "band": f"{price_band.BAND:.0%}",
            "outside": dg.MetadataValue.md(
                markdown_table(("exchange", "symbol", "minute (UTC)", "field", "price", "session range"), rows)
            ),
            "snapshot_id": str(done.snapshot_id),
        },
    )
