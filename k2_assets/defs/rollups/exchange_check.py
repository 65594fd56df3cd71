"""K2's 1m bars against the exchange's own, on every minute the exchange published (core.reconcile)."""

from datetime import date

import dagster as dg
import pyarrow as pa
from dagster_duckdb import DuckDBResource

from k2_assets.core import reconcile
from k2_assets.core.text import markdown_table
from k2_assets.defs.binance.klines import EXCHANGES
from k2_assets.defs.partitions import trade_days
from k2_assets.defs.resources import IcebergResource
from k2_assets.defs.rollups.automation import AUTOMATION
from k2_assets.defs.rule_checks import latest_materialization

SHOWN = 50  # minutes listed in the UI; the check's result counts them all


@dg.asset_check(
    asset="ohlcv_1m",
    name="matches_exchange_bars",
    partitions_def=trade_days,
    additional_deps=["binance_klines"],
    # again whenever K2's bars or the exchange's change, whichever lands last (an ASX day has no exchange bars)
    automation_condition=AUTOMATION,
    description="every complete minute the exchange published equals K2's bar: OHLC, volume, count, quote and taker-buy volume",
)
def matches_exchange_bars(
    context: dg.AssetCheckExecutionContext, iceberg: IcebergResource, duckdb: DuckDBResource
) -> dg.AssetCheckResult:
    done = latest_materialization(context.instance, dg.AssetKey("ohlcv_1m"), context.partition_key)
    with duckdb.get_connection() as con:
        result = reconcile.reconcile_day(
            iceberg.table("ohlcv_1m"),
            iceberg.table("exchange_bars"),
            iceberg.table("trades"),
            date.fromisoformat(context.partition_key),
            bars_snapshot_id=done.snapshot_id,
            con=con,
        )
    return outcome(result, snapshot_id=done.snapshot_id)


def outcome(result: reconcile.Reconciliation, snapshot_id: int | None) -> dg.AssetCheckResult:
    """The check's verdict and what it shows: counts, per symbol, every minute not matching (the first SHOWN)."""
    totals = {c: sum(result.summary.column(c).to_pylist()) for c in result.summary.column_names[2:]}
    unreconciled = [f"{e} {s}" for e, s in result.unreconciled if e in EXCHANGES]
    minutes = result.minutes
    wrong = minutes.filter(pa.compute.is_in(minutes.column("outcome"), pa.array(["mismatch", "missing_data"])))
    left_out = minutes.filter(pa.compute.equal(minutes.column("outcome"), "left_out"))
    metadata = {
        "bars_compared": totals.get("compared", 0),
        "minutes_matching": totals.get("matching", 0),
        "minutes_mismatched": totals.get("mismatched", 0),
        "minutes_missing_data": totals.get("missing_data", 0),
        "minutes_left_out": totals.get("left_out", 0),
        "per_symbol": dg.MetadataValue.md(
            markdown_table(
                result.summary.column_names, zip(*(result.summary.column(c).to_pylist() for c in result.summary.column_names))
            )
        ),
        "mismatches": dg.MetadataValue.md(_minutes_table(wrong)),
        "left_out": dg.MetadataValue.md(_left_out_table(left_out)),
        "symbols_without_exchange_bars": dg.MetadataValue.json(unreconciled),
        "snapshot_id": str(snapshot_id),
    }
    if wrong.num_rows:
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.ERROR, metadata=metadata)
    if unreconciled:  # nothing to prove these bars against: load binance_klines for the day
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN, metadata=metadata)
    return dg.AssetCheckResult(passed=True, metadata=metadata)


def _minutes_table(minutes: pa.Table) -> str:
    rows = []
    for m in minutes.slice(0, SHOWN).to_pylist():
        fields = m["fields"] or ["trade_count"]
        both = "; ".join(f"{f}: K2 {m['k2_values'][f]} / exchange {m['exchange_values'][f]}" for f in fields)
        rows.append((m["exchange"], m["symbol"], f"{m['bar_start']:%H:%M}", m["outcome"], m["reason"], both))
    more = [("", "", "", "", f"... and {minutes.num_rows - SHOWN} more", "")] if minutes.num_rows > SHOWN else []
    return markdown_table(("exchange", "symbol", "minute (UTC)", "outcome", "why", "values"), rows + more)


def _left_out_table(minutes: pa.Table) -> str:
    """Left-out minutes grouped by reason: how many, and the first and last of them."""
    if not minutes.num_rows:
        return markdown_table(("exchange", "symbol", "why", "minutes", "from", "to"), [])
    groups = minutes.group_by(["exchange", "symbol", "reason"]).aggregate(
        [("bar_start", "count"), ("bar_start", "min"), ("bar_start", "max")]
    )
    return markdown_table(
        ("exchange", "symbol", "why", "minutes", "from", "to"),
        (
            (
                g["exchange"],
                g["symbol"],
                g["reason"],
                g["bar_start_count"],
                f"{g['bar_start_min']:%H:%M}",
                f"{g['bar_start_max']:%H:%M}",
            )
            for g in groups.sort_by(
                [("exchange", "ascending"), ("symbol", "ascending"), ("bar_start_min", "ascending")]
            ).to_pylist()
        ),
    )
