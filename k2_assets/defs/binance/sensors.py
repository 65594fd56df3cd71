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
from k2_assets.core.live_drain import BackgroundDrain
from k2_assets.core.live_report import BatchReport
from k2_assets.core.live_writer import LiveWriter
from k2_assets.core.metrics import WriterMetrics, serve
from k2_assets.core.outage import StoreHealth, StoreUnavailable
from k2_assets.defs.binance.assets import named
from k2_assets.defs.binance.checks import binance_gap_check_job, binance_um_gap_check_job
from k2_assets.defs.binance.resources import KafkaResource
from k2_assets.defs.partitions import binance_days
from k2_assets.defs.resources import IcebergResource

# A writer no tick harvested for this long (and 3 cycles) stops: the sensor was stopped, or its code server replaced.
LEASE_SECONDS = 60.0
REPAIR_WAIT_SECONDS = 20.0  # a catalog outage skips the repair sensor's tick after this, well inside the sensor timeout

_drains: dict[tuple, BackgroundDrain] = {}
_served: list = []
_metrics = WriterMetrics()
_lock = threading.Lock()


def _key(iceberg: IcebergResource, kafka: KafkaResource, market: Market) -> tuple:
    return (iceberg.catalog_uri, iceberg.warehouse, kafka.bootstrap, market.name, kafka.topic_of(market))


def _drain(iceberg: IcebergResource, kafka: KafkaResource, market: Market, name: str) -> BackgroundDrain:
    """One draining writer per market and code-server process, kept across ticks (its consumer and dedup index stay warm)."""
    topic, key = kafka.topic_of(market), _key(iceberg, kafka, market)

    def open_writer() -> LiveWriter:
        return LiveWriter(
            iceberg.table("trades"),
            iceberg.table("rejected"),
            kafka.bootstrap,
            market=market,
            topic=topic,
            metrics=_metrics,
            gaps=iceberg.table("sequence_gaps"),
            session_timeout_ms=kafka.session_timeout_ms,
            max_batch_seconds=kafka.batch_ms / 1000,
            give_up_after=kafka.drain_seconds,
        )

    with _lock:
        if key not in _drains:
            _drains[key] = BackgroundDrain(
                open_writer,
                cycle_seconds=kafka.drain_seconds,
                lease_seconds=max(LEASE_SECONDS, 3 * kafka.drain_seconds),
                detected_by=name,
            )
            port = int(os.environ.get("K2_WRITER_METRICS_PORT", "0"))
            if port and not _served:  # one /metrics per code-server process; counters outlive writer resets
                _served.append(serve(_metrics.registry, port))
        return _drains[key]


def _topic_absent(iceberg: IcebergResource, kafka: KafkaResource, market: Market) -> bool:
    """The broker answers and holds no such topic yet (a broker that does not answer is the writer's to report)."""
    with _lock:
        if _key(iceberg, kafka, market) in _drains:
            return False
    try:
        return kafka.topic_of(market) not in AdminClient({"bootstrap.servers": kafka.bootstrap}).list_topics(timeout=5).topics
    except KafkaException:
        return False


def reset_writers(market: Market | None = None) -> None:
    """Stop and forget the draining writers, of one market or all (the next tick starts one from the table's offsets)."""
    with _lock:
        doomed = [_drains.pop(k) for k in [k for k in _drains if market is None or k[3] == market.name]]
    for drain in doomed:
        drain.stop()


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


def gap_check_requests(reconciled: dict[str, int], job) -> list[dg.RunRequest]:
    """One run of the gap check per day whose gaps the writer reconciled (its run key: that day's last snapshot)."""
    # The partition goes in as the run's tag: Dagster 1.13 resolves a RunRequest's partition_key through the
    # job's assets, and a check-only job has none, while the tag gives the check its partition all the same.
    return [
        dg.RunRequest(job_name=job.name, run_key=f"gaps-{day}-{snapshot}", tags={"dagster/partition": day})
        for day, snapshot in sorted(reconciled.items())
    ]


def read_cursor(cursor: str | None) -> dict:
    """The sensor's cursor: the writer's resume offsets (for reading only) and an error not yet reported."""
    state = json.loads(cursor) if cursor else {}
    return state if "offsets" in state else {"offsets": state}


def trades_sensor(market: Market, gap_check_job) -> dg.SensorDefinition:
    """The sensor that keeps `market`'s writer draining into market.trades and reports its live asset's partitions."""
    name, asset = named(market, "trades_sensor"), dg.AssetKey(named(market, "trades"))

    @dg.sensor(
        name=name,
        minimum_interval_seconds=5,
        default_status=dg.DefaultSensorStatus.RUNNING,
        jobs=[gap_check_job],
        description=f"Keeps a writer draining {market.topic} into market.trades, exactly once, and reports its micro-batches.",
    )
    def _sensor(context: dg.SensorEvaluationContext, iceberg: IcebergResource, kafka: KafkaResource):
        if _topic_absent(iceberg, kafka, market):
            # No producer of this market has run yet: nothing to drain, and no writer to build on every tick.
            reason = f"no topic {kafka.topic_of(market)} yet: `k2 stream binance --market {market.name}` creates it"
            return dg.SensorResult(skip_reason=reason, cursor=context.cursor)
        state = read_cursor(context.cursor)
        done = _drain(iceberg, kafka, market, name).harvest()
        reports = done.reports
        if done.error:
            # What was committed before the error is reported below; this harvest started the writer again from the
            # table's offsets, and the next materialization carries the error.
            context.log.warning(done.error)
        if done.position:
            state["offsets"] = {str(p): o for p, o in sorted(done.position.items())}
        events = [event for report in reports for event in materializations(report, asset)]
        if events and state.get("pending_error"):
            events[0] = events[0].with_metadata({**events[0].metadata, "previous_tick_error": state.pop("pending_error")})
        if done.error:
            state["pending_error"] = done.error
        written = sum(r.written for r in reports)
        context.log.info(f"{len(reports)} micro-batches, {written} trades written, {sum(r.rejected for r in reports)} rejected")
        cursor = json.dumps(state, sort_keys=True)
        requests = gap_check_requests(done.reconciled, gap_check_job)
        if not events and not requests:
            if done.error:
                reason = done.error
            elif done.started:
                reason = f"started a writer draining {kafka.topic_of(market)}; its micro-batches show from the next tick"
            else:
                reason = f"no new messages on {kafka.topic_of(market)}; resume offsets {json.dumps(state['offsets'])}"
            return dg.SensorResult(skip_reason=reason, cursor=cursor)
        return dg.SensorResult(asset_events=events, run_requests=requests, cursor=cursor)

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
