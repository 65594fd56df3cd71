"""Each interval's bars, as stored, against the bars recomputed straight from the raw trades they were built from."""

from datetime import date

import dagster as dg
from dagster_duckdb import DuckDBResource
from pyiceberg.expressions import EqualTo

from k2_assets.defs.partitions import trade_days
from k2_assets.defs.resources import IcebergResource
from k2_assets.defs.rollups.assets import matches_raw
from k2_assets.defs.rule_checks import latest_materialization

INTERVALS = ("1m", "5m", "1h", "1d")


def _matches_raw_check(interval: str) -> dg.AssetChecksDefinition:
    asset = dg.AssetKey(f"ohlcv_{interval}")

    @dg.asset_check(
        asset=asset,
        name="matches_raw_trades",
        partitions_def=trade_days,
        blocking=True,
        description="every traded bar equals the bar recomputed from the raw trades",
    )
    def _check(context: dg.AssetCheckExecutionContext, iceberg: IcebergResource, duckdb: DuckDBResource) -> dg.AssetCheckResult:
        where = EqualTo("trade_date", date.fromisoformat(context.partition_key).isoformat())
        done = latest_materialization(context.instance, asset, context.partition_key)
        bars = iceberg.table(f"ohlcv_{interval}").scan(row_filter=where, snapshot_id=done.snapshot_id).to_arrow()
        # The trades snapshot the bars were computed from, as their rows record it.
        sources = set(bars.column("source_snapshot_id").to_pylist())
        if not sources:
            return dg.AssetCheckResult(passed=True, metadata={"bars_compared": 0, "snapshot_id": str(done.snapshot_id)})
        trades = iceberg.table("trades").scan(row_filter=where, snapshot_id=max(sources) or None).to_arrow()
        with duckdb.get_connection() as con:
            passed, metadata = matches_raw(trades, bars, interval, con)
        return dg.AssetCheckResult(
            passed=passed, metadata={**metadata, "snapshot_id": str(done.snapshot_id), "trades_snapshot_id": str(max(sources))}
        )

    return _check


ohlcv_1m_matches_raw_trades, ohlcv_5m_matches_raw_trades, ohlcv_1h_matches_raw_trades, ohlcv_1d_matches_raw_trades = (
    _matches_raw_check(interval) for interval in INTERVALS
)
