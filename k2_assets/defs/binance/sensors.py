"""The live path's sensor: drains Kafka into market.trades and reports each micro-batch."""

from __future__ import annotations

import json
import threading

import dagster as dg

from k2_assets.core.live_writer import BatchReport, LiveWriter
from k2_assets.defs.binance.resources import KafkaResource
from k2_assets.defs.resources import IcebergResource

BINANCE_TRADES = dg.AssetKey("binance_trades")
TICK_SECONDS = 20.0  # well inside Dagster's 60 s sensor timeout; ticks follow each other ~5 s apart

_writers: dict[tuple, LiveWriter] = {}
_lock = threading.Lock()


def _writer(iceberg: IcebergResource, kafka: KafkaResource) -> LiveWriter:
    """One writer per code-server process, kept across ticks (its consumer and dedup index stay warm)."""
    key = (iceberg.catalog_uri, iceberg.warehouse, kafka.bootstrap, kafka.topic)
    with _lock:
        if key not in _writers:
            _writers[key] = LiveWriter(iceberg.table("trades"), iceberg.table("rejected"), kafka.bootstrap, topic=kafka.topic)
        return _writers[key]


def reset_writers() -> None:
    """Forget cached writers (after a failure, so the next tick resumes from the table's offsets)."""
    with _lock:
        for writer in _writers.values():
            writer.close()
        _writers.clear()


def materializations(report: BatchReport) -> list[dg.AssetMaterialization]:
    """One materialization per trade_date partition that the micro-batch wrote to."""
    ranges = {str(p): {"first": first, "last": last} for p, (first, last) in sorted(report.offset_ranges.items())}
    common = {
        "rows_consumed": report.consumed,
        "rows_rejected": report.rejected,
        "rows_duplicate_skipped": report.duplicates,
        "offset_ranges": dg.MetadataValue.json(ranges),
        "snapshot_id": str(report.snapshot_id),
        "latency_p50_seconds": report.latency_seconds.get("p50", 0.0),
        "latency_p95_seconds": report.latency_seconds.get("p95", 0.0),
        "dead_lettered": report.dead_lettered,
        "table": "market.trades",
    }
    return [
        dg.AssetMaterialization(asset_key=BINANCE_TRADES, partition=day, metadata={"rows_written": rows, "dagster/row_count": rows, **common})
        for day, rows in sorted(report.partitions.items())
    ]


@dg.sensor(
    name="binance_trades_sensor",
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Drains market.crypto.trades.binance into market.trades in micro-batches, exactly once.",
)
def binance_trades_sensor(context: dg.SensorEvaluationContext, iceberg: IcebergResource, kafka: KafkaResource):
    try:
        writer = _writer(iceberg, kafka)
        reports = writer.drain(TICK_SECONDS)
    except Exception:
        reset_writers()
        raise
    events = [event for report in reports for event in materializations(report)]
    written = sum(r.written for r in reports)
    context.log.info(f"{len(reports)} micro-batches, {written} trades written, {sum(r.rejected for r in reports)} rejected")
    cursor = json.dumps({str(p): o for p, o in sorted(writer.position.items())})
    if not reports:
        return dg.SkipReason(f"no new messages on {kafka.topic}; resume offsets {cursor}")
    return dg.SensorResult(asset_events=events, cursor=cursor)

