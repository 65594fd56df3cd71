"""The live path's sensor: drains Kafka into market.trades and reports each micro-batch."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import And, EqualTo, IsNull

from k2_assets.core import live_codec
from k2_assets.core.live_report import BatchReport
from k2_assets.core.live_writer import LiveWriter
from k2_assets.core.metrics import WriterMetrics, serve
from k2_assets.core.outage import TRANSIENT, StoreHealth, StoreUnavailable
from k2_assets.defs.binance.checks import BINANCE_TRADES, binance_gap_check_job
from k2_assets.defs.binance.resources import KafkaResource
from k2_assets.defs.partitions import binance_days
from k2_assets.defs.resources import IcebergResource

REPAIR_WAIT_SECONDS = 20.0  # a catalog outage skips the repair sensor's tick after this, well inside the sensor timeout

_writers: dict[tuple, LiveWriter] = {}
_served: list = []
_metrics = WriterMetrics()
_lock = threading.Lock()


def _writer(iceberg: IcebergResource, kafka: KafkaResource) -> LiveWriter:
    """One writer per code-server process, kept across ticks (its consumer and dedup index stay warm)."""
    key = (iceberg.catalog_uri, iceberg.warehouse, kafka.bootstrap, kafka.topic)
    with _lock:
        if key not in _writers:
            _writers[key] = LiveWriter(
                iceberg.table("trades"),
                iceberg.table("rejected"),
                kafka.bootstrap,
                topic=kafka.topic,
                metrics=_metrics,
                gaps=iceberg.table("sequence_gaps"),
                session_timeout_ms=kafka.session_timeout_ms,
                give_up_after=kafka.drain_seconds,
            )
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
        dg.AssetMaterialization(
            asset_key=BINANCE_TRADES, partition=day, metadata={"rows_written": rows, "dagster/row_count": rows, **common}
        )
        for day, rows in sorted(report.partitions.items())
    ]


def gap_check_requests(reports: list[BatchReport]) -> list[dg.RunRequest]:
    """One run of the gap check per day the tick wrote to (its run key: the tick's last snapshot of that day)."""
    last: dict[str, int] = {}
    for report in reports:
        for day in report.partitions:
            last[day] = report.snapshot_id
    # The partition goes in as the run's tag: Dagster 1.13 resolves a RunRequest's partition_key through the
    # job's assets, and a check-only job has none, while the tag gives the check its partition all the same.
    return [
        dg.RunRequest(job_name=binance_gap_check_job.name, run_key=f"gaps-{day}-{snapshot}", tags={"dagster/partition": day})
        for day, snapshot in sorted(last.items())
    ]


def read_cursor(cursor: str | None) -> dict:
    """The sensor's cursor: the writer's resume offsets (for reading only) and an error not yet reported."""
    state = json.loads(cursor) if cursor else {}
    return state if "offsets" in state else {"offsets": state}


@dg.sensor(
    name="binance_trades_sensor",
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    jobs=[binance_gap_check_job],
    description=(
        "Drains market.crypto.trades.binance into market.trades in micro-batches, exactly once, and checks the day's gaps."
    ),
)
def binance_trades_sensor(context: dg.SensorEvaluationContext, iceberg: IcebergResource, kafka: KafkaResource):
    state = read_cursor(context.cursor)
    reports: list[BatchReport] = []
    error = None
    try:
        writer = _writer(iceberg, kafka)
        writer.drain(kafka.drain_seconds, give_up_after=kafka.drain_seconds, on_batch=reports.append)
        writer.reconcile_gaps(detected_by="binance_trades_sensor")
        state["offsets"] = {str(p): o for p, o in sorted(writer.position.items())}
    except Exception as exc:
        # What was committed before the error is reported below; the next tick rebuilds the writer from
        # the table's offsets, and its first materialization carries this error.
        reset_writers()
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        outage = isinstance(exc, (StoreUnavailable, *TRANSIENT))  # TRANSIENT: met outside a retried step (opening the tables)
        what = "a store outage" if outage else f"an error ({type(exc).__name__})"
        error = f"tick ended by {what} after {len(reports)} micro-batches: {first_line}"
        if outage:
            context.log.warning(error)
        else:
            context.log.exception(error)
    events = [event for report in reports for event in materializations(report)]
    if events and state.get("pending_error"):
        events[0] = events[0].with_metadata({**events[0].metadata, "previous_tick_error": state.pop("pending_error")})
    if error:
        state["pending_error"] = error
    written = sum(r.written for r in reports)
    context.log.info(f"{len(reports)} micro-batches, {written} trades written, {sum(r.rejected for r in reports)} rejected")
    cursor = json.dumps(state, sort_keys=True)
    if not reports:
        reason = error or f"no new messages on {kafka.topic}; resume offsets {json.dumps(state['offsets'])}"
        return dg.SensorResult(skip_reason=reason, cursor=cursor)
    return dg.SensorResult(asset_events=events, run_requests=gap_check_requests(reports), cursor=cursor)


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
    def open_gaps():
        return (
            iceberg.table("sequence_gaps")
            .scan(row_filter=And(EqualTo("exchange", live_codec.EXCHANGE), IsNull("closed_at")))
            .to_arrow()
        )

    try:
        gaps = StoreHealth(logger=context.log).call(
            open_gaps, "reading market.sequence_gaps", deadline=time.monotonic() + REPAIR_WAIT_SECONDS
        )
    except StoreUnavailable as exc:
        return dg.SkipReason(str(exc))  # the next tick looks again
    gaps = gaps.filter(pc.is_null(gaps.column("explained_by")))
    if gaps.num_rows == 0:
        return dg.SkipReason("no open, unexplained Binance gaps")
    requests = []
    for day in sorted(set(gaps.column("session_date").to_pylist())):
        ranges = gaps.filter(pc.equal(gaps.column("session_date"), pa.scalar(day, pa.date32())))
        key = hashlib.sha1(
            json.dumps(sorted(zip(*(ranges.column(c).to_pylist() for c in ("symbol", "first_missing", "last_missing"))))).encode()
        ).hexdigest()[:12]
        # The same open ranges are repaired once; new ranges on the day make a new run.
        requests.append(dg.RunRequest(run_key=f"repair-{day}-{key}", partition_key=day.isoformat()))
    return requests
