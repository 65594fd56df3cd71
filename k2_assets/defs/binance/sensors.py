"""The live path's sensors, one set per Binance market: drain its Kafka topic into market.trades and report each
micro-batch; launch repair runs for its open gaps."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from pyiceberg.expressions import And, EqualTo, IsNull

from k2_assets.core.binance_format import SPOT, UM, Market
from k2_assets.core.live_report import BatchReport
from k2_assets.core.live_writer import LiveWriter
from k2_assets.core.metrics import WriterMetrics, serve
from k2_assets.core.outage import TRANSIENT, StoreHealth, StoreUnavailable
from k2_assets.defs.binance.assets import named
from k2_assets.defs.binance.checks import binance_gap_check_job, binance_um_gap_check_job
from k2_assets.defs.binance.resources import KafkaResource
from k2_assets.defs.partitions import binance_days
from k2_assets.defs.resources import IcebergResource

REPAIR_WAIT_SECONDS = 20.0  # a catalog outage skips the repair sensor's tick after this, well inside the sensor timeout

_writers: dict[tuple, LiveWriter] = {}
_served: list = []
_metrics = WriterMetrics()
_lock = threading.Lock()


def _key(iceberg: IcebergResource, kafka: KafkaResource, market: Market) -> tuple:
    return (iceberg.catalog_uri, iceberg.warehouse, kafka.bootstrap, market.name, kafka.topic_of(market))


def _writer(iceberg: IcebergResource, kafka: KafkaResource, market: Market) -> LiveWriter:
    """One writer per market and code-server process, kept across ticks (its consumer and dedup index stay warm)."""
    topic, key = kafka.topic_of(market), _key(iceberg, kafka, market)
    with _lock:
        if key not in _writers:
            _writers[key] = LiveWriter(
                iceberg.table("trades"),
                iceberg.table("rejected"),
                kafka.bootstrap,
                market=market,
                topic=topic,
                metrics=_metrics,
                gaps=iceberg.table("sequence_gaps"),
                session_timeout_ms=kafka.session_timeout_ms,
                give_up_after=kafka.drain_seconds,
            )
            port = int(os.environ.get("K2_WRITER_METRICS_PORT", "0"))
            if port and not _served:  # one /metrics per code-server process; counters outlive writer resets
                _served.append(serve(_metrics.registry, port))
        return _writers[key]


def _topic_absent(iceberg: IcebergResource, kafka: KafkaResource, market: Market) -> bool:
    """The broker answers and holds no such topic yet (a broker that does not answer is the writer's to report)."""
    with _lock:
        if _key(iceberg, kafka, market) in _writers:
            return False
    try:
        return kafka.topic_of(market) not in AdminClient({"bootstrap.servers": kafka.bootstrap}).list_topics(timeout=5).topics
    except KafkaException:
        return False


def reset_writers(market: Market | None = None) -> None:
    """Forget cached writers, of one market or all (after a failure, so the next tick resumes from the table's offsets)."""
    with _lock:
        for key in [k for k in _writers if market is None or k[3] == market.name]:
            _writers.pop(key).close()


def materializations(report: BatchReport, asset: dg.AssetKey) -> list[dg.AssetMaterialization]:
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
            asset_key=asset, partition=day, metadata={"rows_written": rows, "dagster/row_count": rows, **common}
        )
        for day, rows in sorted(report.partitions.items())
    ]


def gap_check_requests(reports: list[BatchReport], job) -> list[dg.RunRequest]:
    """One run of the gap check per day the tick wrote to (its run key: the tick's last snapshot of that day)."""
    last: dict[str, int] = {}
    for report in reports:
        for day in report.partitions:
            last[day] = report.snapshot_id
    # The partition goes in as the run's tag: Dagster 1.13 resolves a RunRequest's partition_key through the
    # job's assets, and a check-only job has none, while the tag gives the check its partition all the same.
    return [
        dg.RunRequest(job_name=job.name, run_key=f"gaps-{day}-{snapshot}", tags={"dagster/partition": day})
        for day, snapshot in sorted(last.items())
    ]


def read_cursor(cursor: str | None) -> dict:
    """The sensor's cursor: the writer's resume offsets (for reading only) and an error not yet reported."""
    state = json.loads(cursor) if cursor else {}
    return state if "offsets" in state else {"offsets": state}


def trades_sensor(market: Market, gap_check_job) -> dg.SensorDefinition:
    """The sensor that drains `market`'s topic into market.trades and reports its live asset's partitions."""
    name, asset = named(market, "trades_sensor"), dg.AssetKey(named(market, "trades"))

    @dg.sensor(
        name=name,
        minimum_interval_seconds=5,
        default_status=dg.DefaultSensorStatus.RUNNING,
        jobs=[gap_check_job],
        description=f"Drains {market.topic} into market.trades in micro-batches, exactly once, and checks the day's gaps.",
    )
    def _sensor(context: dg.SensorEvaluationContext, iceberg: IcebergResource, kafka: KafkaResource):
        if _topic_absent(iceberg, kafka, market):
            # No producer of this market has run yet: nothing to drain, and no writer to build on every tick.
            reason = f"no topic {kafka.topic_of(market)} yet: `k2 stream binance --market {market.name}` creates it"
            return dg.SensorResult(skip_reason=reason, cursor=context.cursor)
        state = read_cursor(context.cursor)
        reports: list[BatchReport] = []
        error = None
        try:
            writer = _writer(iceberg, kafka, market)
            writer.drain(kafka.drain_seconds, give_up_after=kafka.drain_seconds, on_batch=reports.append)
            writer.reconcile_gaps(detected_by=name)
            state["offsets"] = {str(p): o for p, o in sorted(writer.position.items())}
        except Exception as exc:
            # What was committed before the error is reported below; the next tick rebuilds the writer from
            # the table's offsets, and its first materialization carries this error.
            reset_writers(market)
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            outage = isinstance(exc, (StoreUnavailable, *TRANSIENT))  # TRANSIENT: met outside a retried step (opening the tables)
            what = "a store outage" if outage else f"an error ({type(exc).__name__})"
            error = f"tick ended by {what} after {len(reports)} micro-batches: {first_line}"
            if outage:
                context.log.warning(error)
            else:
                context.log.exception(error)
        events = [event for report in reports for event in materializations(report, asset)]
        if events and state.get("pending_error"):
            events[0] = events[0].with_metadata({**events[0].metadata, "previous_tick_error": state.pop("pending_error")})
        if error:
            state["pending_error"] = error
        written = sum(r.written for r in reports)
        context.log.info(f"{len(reports)} micro-batches, {written} trades written, {sum(r.rejected for r in reports)} rejected")
        cursor = json.dumps(state, sort_keys=True)
        if not reports:
            reason = error or f"no new messages on {kafka.topic_of(market)}; resume offsets {json.dumps(state['offsets'])}"
            return dg.SensorResult(skip_reason=reason, cursor=cursor)
        return dg.SensorResult(asset_events=events, run_requests=gap_check_requests(reports, gap_check_job), cursor=cursor)

    return _sensor


def repair_job(market: Market):
    return dg.define_asset_job(
        named(market, "trades_repair_job"),
        selection=dg.AssetSelection.assets(named(market, "trades")),
        partitions_def=binance_days,
        description=f"Repair a day's {market.exchange} trade-id gaps from the exchange's REST API, then check the day.",
    )


def gap_repair_sensor(market: Market, job) -> dg.SensorDefinition:
    """The sensor that launches `job` for every day with open, unexplained gaps of `market`."""

    @dg.sensor(
        name=named(market, "gap_repair_sensor"),
        job=job,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Launches a repair run for every day with open, unexplained {market.exchange} gaps.",
    )
    def _sensor(context: dg.SensorEvaluationContext, iceberg: IcebergResource):
        def open_gaps():
            return (
                iceberg.table("sequence_gaps")
                .scan(row_filter=And(EqualTo("exchange", market.exchange), IsNull("closed_at")))
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
            return dg.SkipReason(f"no open, unexplained {market.exchange} gaps")
        requests = []
        for day in sorted(set(gaps.column("session_date").to_pylist())):
            ranges = gaps.filter(pc.equal(gaps.column("session_date"), pa.scalar(day, pa.date32())))
            key = hashlib.sha1(
                json.dumps(
                    sorted(zip(*(ranges.column(c).to_pylist() for c in ("symbol", "first_missing", "last_missing"))))
                ).encode()
            ).hexdigest()[:12]
            # The same open ranges are repaired once; new ranges on the day make a new run.
            requests.append(dg.RunRequest(run_key=f"repair-{day}-{key}", partition_key=day.isoformat()))
        return requests

    return _sensor


binance_trades_sensor = trades_sensor(SPOT, binance_gap_check_job)
binance_um_trades_sensor = trades_sensor(UM, binance_um_gap_check_job)
binance_trades_repair_job = repair_job(SPOT)
binance_um_trades_repair_job = repair_job(UM)
binance_gap_repair_sensor = gap_repair_sensor(SPOT, binance_trades_repair_job)
binance_um_gap_repair_sensor = gap_repair_sensor(UM, binance_um_trades_repair_job)
