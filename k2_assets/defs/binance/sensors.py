"""The live path's sensor: drains Kafka into market.trades and reports each micro-batch."""

from __future__ import annotations

import hashlib
import os
import json
import threading
from datetime import date

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import And, EqualTo, IsNull

from k2_assets.core import integrity, live_codec
from k2_assets.core.live_writer import BatchReport, LiveWriter
from k2_assets.core.metrics import WriterMetrics, serve
from k2_assets.core.outage import StoreUnavailable
from k2_assets.defs.binance.resources import KafkaResource
from k2_assets.defs.partitions import binance_days
from k2_assets.defs.resources import IcebergResource

BINANCE_TRADES = dg.AssetKey("binance_trades")

TICK_SECONDS = 20.0  # well inside Dagster's 60 s sensor timeout; ticks follow each other ~5 s apart

_writers: dict[tuple, LiveWriter] = {}
_served: list = []
_metrics = WriterMetrics()
_lock = threading.Lock()


def _writer(iceberg: IcebergResource, kafka: KafkaResource) -> LiveWriter:
    """One writer per code-server process, kept across ticks (its consumer and dedup index stay warm)."""
    key = (iceberg.catalog_uri, iceberg.warehouse, kafka.bootstrap, kafka.topic)
    with _lock:
        if key not in _writers:
            _writers[key] = LiveWriter(iceberg.table("trades"), iceberg.table("rejected"), kafka.bootstrap, topic=kafka.topic,
                                       metrics=_metrics, gaps=iceberg.table("sequence_gaps"),
                                       session_timeout_ms=kafka.session_timeout_ms, give_up_after=TICK_SECONDS)
            port = int(os.environ.get("K2_WRITER_METRICS_PORT", "0"))
            if port and not _served:  # one /metrics per code-server process; counters outlive writer resets
                _served.append(serve(_metrics.registry, port))
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
        "sequence_events": dg.MetadataValue.json(report.sequence_events),
        "table": "market.trades",
    }
    return [
        dg.AssetMaterialization(asset_key=BINANCE_TRADES, partition=day, metadata={"rows_written": rows, "dagster/row_count": rows, **common})
        for day, rows in sorted(report.partitions.items())
    ]


def _gap_check(day: date, rows) -> dg.AssetCheckEvaluation:
    """The day's no_unexplained_gaps result, from the gap rows the writer core reconciled."""
    outcome = integrity.gap_outcome(rows)
    return dg.AssetCheckEvaluation(
        asset_key=BINANCE_TRADES,
        check_name=integrity.NO_UNEXPLAINED_GAPS.name,
        passed=outcome.passed,
        severity=dg.AssetCheckSeverity.WARN,
        partition=day.isoformat(),
        metadata={"failed_rows": outcome.failed, "sample": dg.MetadataValue.json(outcome.sample)},
    )


@dg.sensor(
    name="binance_trades_sensor",
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Drains market.crypto.trades.binance into market.trades in micro-batches, exactly once.",
)
def binance_trades_sensor(context: dg.SensorEvaluationContext, iceberg: IcebergResource, kafka: KafkaResource):
    reports: list[BatchReport] = []
    gaps: dict = {}
    try:
        writer = _writer(iceberg, kafka)
        writer.drain(TICK_SECONDS, give_up_after=TICK_SECONDS, on_batch=reports.append)
        gaps = writer.reconcile_gaps(detected_by="binance_trades_sensor")
    except StoreUnavailable as exc:
        # An outage ends the tick cleanly: what was committed before it is reported, and the next tick
        # rebuilds the writer from the table's offsets.
        reset_writers()
        context.log.warning(f"tick ended by a store outage after {len(reports)} micro-batches: {exc}")
        if not reports:
            return dg.SkipReason(f"catalog or object store unavailable: {exc}")
        return dg.SensorResult(asset_events=[event for report in reports for event in materializations(report)])
    except Exception:
        reset_writers()
        raise
    events: list = [event for report in reports for event in materializations(report)]
    for day, rows in sorted(gaps.items()):
        events.append(_gap_check(day, rows))
    written = sum(r.written for r in reports)
    context.log.info(f"{len(reports)} micro-batches, {written} trades written, {sum(r.rejected for r in reports)} rejected")
    cursor = json.dumps({str(p): o for p, o in sorted(writer.position.items())})
    if not reports:
        return dg.SkipReason(f"no new messages on {kafka.topic}; resume offsets {cursor}")
    return dg.SensorResult(asset_events=events, cursor=cursor)



binance_trades_repair_job = dg.define_asset_job(
    "binance_trades_repair_job",
    selection=dg.AssetSelection.assets(BINANCE_TRADES),
    partitions_def=binance_days,
    description="Repair a day's Binance trade-id gaps from the exchange's REST API, then check the day.",
)


@dg.sensor(
    name="binance_gap_repair_sensor",
    job=binance_trades_repair_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches a repair run for every day with open, unexplained Binance gaps.",
)
def binance_gap_repair_sensor(context: dg.SensorEvaluationContext, iceberg: IcebergResource):
    gaps = iceberg.table("sequence_gaps").scan(
        row_filter=And(EqualTo("exchange", live_codec.EXCHANGE), IsNull("closed_at"))
    ).to_arrow()
    gaps = gaps.filter(pc.is_null(gaps.column("explained_by")))
    if gaps.num_rows == 0:
        return dg.SkipReason("no open, unexplained Binance gaps")
    requests = []
    for day in sorted(set(gaps.column("session_date").to_pylist())):
        ranges = gaps.filter(pc.equal(gaps.column("session_date"), pa.scalar(day, pa.date32())))
        key = hashlib.sha1(json.dumps(sorted(zip(*(ranges.column(c).to_pylist() for c in ("symbol", "first_missing", "last_missing"))))).encode()).hexdigest()[:12]
        # The same open ranges are repaired once; new ranges on the day make a new run.
        requests.append(dg.RunRequest(run_key=f"repair-{day}-{key}", partition_key=day.isoformat()))
    return requests
