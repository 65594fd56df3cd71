from datetime import date

import dagster as dg
from prometheus_client import CollectorRegistry
from pyiceberg.expressions import And, NotNull

from k2_assets.core import binance_history as dumps
from k2_assets.core import repair
from k2_assets.core.binance_format import SPOT, UM, Market
from k2_assets.core.metrics import GapMetrics, RepairMetrics
from k2_assets.core.writer import partition_filter
from k2_assets.defs.binance.resources import BinanceHistoryResource, BinanceRestResource
from k2_assets.defs.loading import reconcile_gaps, summary, write_partition
from k2_assets.defs.partitions import binance_days
from k2_assets.defs.resources import IcebergResource
from k2_assets.defs.run_metrics import GAP_REPAIR, publish


def named(market: Market, name: str) -> str:
    """A definition's name for `market`: binance_trades (spot), binance_um_trades (USD-M futures)."""
    return f"binance_{name}" if market is SPOT else f"binance_{market.name}_{name}"


@dg.asset(partitions_def=binance_days, group_name="binance", kinds={"iceberg", "python"})
def binance_trades_history(
    context: dg.AssetExecutionContext, iceberg: IcebergResource, binance_history: BinanceHistoryResource
) -> dg.MaterializeResult:
    """Binance trades of one UTC day, from the public trade and aggTrade dumps into market.trades."""
    return load_history(context, iceberg, binance_history, SPOT)


@dg.asset(partitions_def=binance_days, group_name="binance", kinds={"iceberg", "python"})
def binance_um_trades_history(
    context: dg.AssetExecutionContext, iceberg: IcebergResource, binance_history: BinanceHistoryResource
) -> dg.MaterializeResult:
    """Binance USD-M futures trades of one UTC day, from the public futures/um dumps into market.trades."""
    return load_history(context, iceberg, binance_history, UM)


def load_history(
    context: dg.AssetExecutionContext, iceberg: IcebergResource, binance_history: BinanceHistoryResource, market: Market
) -> dg.MaterializeResult:
    """One market's dumps of the partition's day into its exchange's partition of market.trades."""
    day = date.fromisoformat(context.partition_key)
    batch, notes = dumps.load_day(binance_history.path(), day, source=context.asset_key.to_user_string(), market=market)
    for note in notes:
        context.log.warning(note)
    live = partition_filter(market.exchange, day)
    return write_partition(
        context,
        iceberg,
        batch,
        kind="trades",
        exchange=market.exchange,
        session_date=day,
        # History owns the day's file-sourced rows; rows that came live from Kafka stay, and a
        # history row already among them is not written a second time.
        where=partition_filter(market.exchange, day, batch_only=True),
        keep=And(live, NotNull("kafka_topic")),
        extra_metadata={"file_notes": dg.MetadataValue.json(notes)},
    )


def topic_spec(market: Market, stream: str) -> dg.AssetSpec:
    return dg.AssetSpec(
        key=["kafka", market.topic.replace(".", "_")],
        description=f"Kafka topic {market.topic}: v2 trades produced from {stream}.",
        group_name="binance",
        kinds={"kafka"},
    )


kafka_topic = topic_spec(SPOT, "Binance's WebSocket trade stream")
kafka_um_topic = topic_spec(UM, "Binance USD-M futures' WebSocket trade stream")


@dg.asset(deps=[kafka_topic], partitions_def=binance_days, group_name="binance", kinds={"iceberg", "kafka"})
def binance_trades(
    context: dg.AssetExecutionContext, iceberg: IcebergResource, binance_rest: BinanceRestResource
) -> dg.MaterializeResult:
    """Binance trades arriving live (WebSocket -> Kafka -> sensor micro-batches); a run repairs a day's gaps and checks it."""
    return repair_day(context, iceberg, binance_rest, SPOT)


@dg.asset(deps=[kafka_um_topic], partitions_def=binance_days, group_name="binance", kinds={"iceberg", "kafka"})
def binance_um_trades(
    context: dg.AssetExecutionContext, iceberg: IcebergResource, binance_rest: BinanceRestResource
) -> dg.MaterializeResult:
    """Binance USD-M futures trades arriving live (WebSocket -> Kafka -> sensor micro-batches); a run repairs a day's gaps."""
    return repair_day(context, iceberg, binance_rest, UM)


def repair_day(
    context: dg.AssetExecutionContext, iceberg: IcebergResource, binance_rest: BinanceRestResource, market: Market
) -> dg.MaterializeResult:
    """The partition's gaps of `market` brought up to date, then filled by trade id from its REST API."""
    day = date.fromisoformat(context.partition_key)
    trades, gaps = iceberg.table("trades"), iceberg.table("sequence_gaps")
    where = partition_filter(market.exchange, day)
    source = context.asset_key.to_user_string()
    registry = CollectorRegistry()
    gap_metrics, repair_metrics = GapMetrics(registry, exchanges=(market.exchange,)), RepairMetrics(registry)
    # What is missing now (late arrivals may have filled some gaps since the last look) ...
    before = trades.scan(row_filter=where).to_arrow()
    reconcile_gaps(iceberg, before, exchange=market.exchange, session_date=day, detected_by=source, gap_metrics=gap_metrics)
    # ... then ask the exchange for the rest, write it once, and close what it filled.
    report = repair.repair_partition(
        trades, gaps, binance_rest.url(market), day, market=market, api_key=binance_rest.api_key or None
    )
    stored = trades.scan(row_filter=where).to_arrow()
    reconcile_gaps(
        iceberg,
        stored,
        exchange=market.exchange,
        session_date=day,
        detected_by=source,
        filled_how="repair",
        answers=repair.explanations(report),
        gap_metrics=gap_metrics,
    )
    context.log.info(
        f"repair of {day}: {report.written} trades written, {len(report.unavailable)} ranges the exchange cannot fill"
    )
    repair_metrics.requested.inc(report.requested)
    repair_metrics.written.inc(report.written)
    repair_metrics.already_present.inc(report.already_present)
    repair_metrics.unavailable.inc(len(report.unavailable))
    publish(context, GAP_REPAIR, registry)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": stored.num_rows,
            "rows_written": report.written,  # as the sensor's micro-batches say it: they add up to the partition's rows
            "repair_requested_ids": report.requested,
            "repair_rows_already_present": report.already_present,
            "repair_unavailable": dg.MetadataValue.json(
                [{"symbol": s, "first": a, "last": b, "answer": answer} for (s, a, b), answer in report.unavailable.items()]
            ),
            "snapshot_id": str(report.snapshot_id),
            "table": "market.trades",
            **summary(stored),
        },
    )
