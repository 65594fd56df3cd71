"""Prometheus metrics. Label sets are bounded: symbols (configured), Kafka partitions, sequence event
kinds, exchanges, gap outcomes, bar intervals, tables; never an id, an offset or a gap size.

Long-running processes (the producer, the writer, the code server's sensor) serve /metrics (serve()).
Short Dagster runs (loads, rollups, gap repair) fill a registry of their own and push it to a
Prometheus Pushgateway when they succeed (push(), on when K2_PUSHGATEWAY_URL is set)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, pushadd_to_gateway, start_http_server
from prometheus_client.metrics import MetricWrapperBase

from k2_assets.core.sequence import ACCEPTED, EVENT_NAMES, LATE_ARRIVAL, REPAIR

PUSHGATEWAY_ENV = "K2_PUSHGATEWAY_URL"
GAP_OUTCOMES = (LATE_ARRIVAL, REPAIR, ACCEPTED)  # market.sequence_gaps.closed_how; anything else counts as "other"
log = logging.getLogger("k2.metrics")


PRODUCE_STAGES = {"queue": "int_latency", "in_flight": "outbuf_latency", "round_trip": "rtt"}  # stage -> librdkafka window
PRODUCE_PERCENTILES = ("p50", "p99")  # librdkafka's names; not `quantile`, which Prometheus keeps for summaries


class ProducerMetrics:
    """The Binance producer: what came off the socket and what reached Kafka."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.received = Counter("k2_feed_frames_received", "WebSocket frames received from the exchange", registry=r)
        self.produced = Counter("k2_feed_trades_produced", "Trades produced to Kafka", ["symbol"], registry=r)
        # From librdkafka's statistics (a window of a few seconds), since a delivery report per message
        # would cost more than the message: stage = queue (in the client), in_flight (sent, unanswered),
        # round_trip (the broker's answer time); the larger of the brokers'.
        self.produce_latency = Gauge(
            "k2_feed_produce_latency_seconds",
            "Produce latency by stage, from librdkafka's statistics",
            ["stage", "percentile"],
            registry=r,
        )
        self.dead_letters = Counter("k2_feed_dead_letters", "Frames sent to the dead-letter topic", registry=r)
        self.produce_errors = Counter("k2_feed_produce_errors", "Kafka deliveries that failed", registry=r)
        self.reconnects = Counter("k2_feed_reconnects", "WebSocket reconnects", registry=r)
        self.last_trade_time = Gauge(
            "k2_feed_last_trade_timestamp_seconds", "Exchange time of the last trade seen", ["symbol"], registry=r
        )
        self.last_trade_id = Gauge("k2_feed_last_trade_id", "Last trade id seen (the value, not a label)", ["symbol"], registry=r)

    def record_statistics(self, stats: dict) -> None:
        """Set the produce latency gauges from one librdkafka statistics document; a stage with no
        samples in the window keeps its last value."""
        for stage, window in PRODUCE_STAGES.items():
            measured = [b[window] for b in stats.get("brokers", {}).values() if b.get(window, {}).get("cnt")]
            if measured:
                for key in PRODUCE_PERCENTILES:
                    self.produce_latency.labels(stage, key).set(max(m[key] for m in measured) / 1e6)


class WriterMetrics:
    """The Kafka -> Iceberg writer: records, batches, commits, lag and freshness.

    Every family is labelled by exchange, so the writers of two markets in one process (spot and futures in one code
    server) are told apart; a writer records through `for_exchange`, which fixes that label."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.consumed = Counter("k2_writer_records_consumed", "Kafka records consumed", ["exchange"], registry=r)
        self.written = Counter("k2_writer_records_written", "Trades written to market.trades", ["exchange"], registry=r)
        self.rejected = Counter("k2_writer_records_rejected", "Records written to market.rejected", ["exchange"], registry=r)
        self.duplicates = Counter(
            "k2_writer_duplicates_skipped", "Trades already in the table, not written again", ["exchange"], registry=r
        )
        self.sequence_events = Counter("k2_sequence_events", "Sequence tracker events", ["exchange", "event"], registry=r)
        self.batch_seconds = Histogram(
            "k2_writer_batch_seconds",
            "Decode-to-commit time of a micro-batch",
            ["exchange"],
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
        )
        self.commit_seconds = Histogram(
            "k2_writer_iceberg_commit_seconds",
            "Iceberg commit latency",
            ["exchange"],
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
        )
        self.commit_failures = Counter(
            "k2_writer_iceberg_commit_failures", "Iceberg commits that raised", ["exchange"], registry=r
        )
        self.lag = Gauge(
            "k2_writer_consumer_lag_records",
            "Records behind the end of the partition (from the table's offsets)",
            ["exchange", "partition"],
            registry=r,
        )
        self.freshness = Gauge(
            "k2_writer_freshness_seconds", "Exchange event time to commit, p95 of the last batch", ["exchange"], registry=r
        )
        self.last_commit_time = Gauge(
            "k2_writer_last_commit_timestamp_seconds", "When the last batch was committed", ["exchange"], registry=r
        )
        self.store_state = Gauge(
            "k2_writer_store_state",
            "1 for the writer's catalog/object-store state: healthy, degraded (retrying), stalled (retrying for over a minute)",
            ["exchange", "state"],
            registry=r,
        )
        self.fenced = Counter(
            "k2_writer_batches_fenced",
            "Batches discarded because another writer committed their offsets first",
            ["exchange"],
            registry=r,
        )
        self.partitions_owned = Gauge(
            "k2_writer_partitions_owned", "Kafka partitions this writer owns in its consumer group", ["exchange"], registry=r
        )
        self.incarnation_switches = Counter(
            "k2_writer_topic_incarnation_switches",
            "Starts on a topic incarnation the table had no offsets for (a re-created topic, a restarted in-memory broker)",
            ["exchange"],
            registry=r,
        )
        self.offsets_beyond_end = Counter(
            "k2_writer_offsets_beyond_end",
            "Recorded offsets a partition no longer reaches (the writer refuses the partition)",
            ["exchange"],
            registry=r,
        )
        self.offsets_skipped_by_broker = Counter(
            "k2_writer_offsets_skipped_by_broker",
            "Offsets the broker no longer held when the writer reached them (retention)",
            ["exchange"],
            registry=r,
        )
        self.gaps = GapMetrics(r)  # the sensor reconciles market.sequence_gaps after each tick

    def for_exchange(self, exchange: str) -> ExchangeWriterMetrics:
        return ExchangeWriterMetrics(self, exchange)


class ExchangeWriterMetrics:
    """WriterMetrics with the exchange label fixed: the same attributes, each taking only its other labels."""

    def __init__(self, metrics: WriterMetrics, exchange: str):
        self.registry, self.gaps = metrics.registry, metrics.gaps
        for name, family in vars(metrics).items():
            if isinstance(family, MetricWrapperBase):
                setattr(self, name, _OneExchange(family, exchange))
                if family._labelnames == ("exchange",):  # shown at 0 from the start: alerts read a missing series as nothing
                    family.labels(exchange)
        for name in EVENT_NAMES:
            self.sequence_events.labels(name)


class _OneExchange:
    """A metric family with its exchange label fixed: `labels(...)` takes the others; inc, set, observe, time apply
    to the child with no other labels."""

    def __init__(self, family: MetricWrapperBase, exchange: str):
        self._family, self._exchange = family, exchange

    def labels(self, *values: str):
        return self._family.labels(self._exchange, *values)

    def __getattr__(self, name: str):
        return getattr(self._family.labels(self._exchange), name)


class GapMetrics:
    """Gaps opened and closed in market.sequence_gaps, per exchange; closed ones by how (closed_how)."""

    def __init__(self, registry: CollectorRegistry | None = None, exchanges: tuple[str, ...] | None = None):
        from k2_assets.core.checks import EXCHANGES  # here, not at the top: the producer needs none of pandas

        exchanges = tuple(EXCHANGES) if exchanges is None else exchanges
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.opened = Counter(
            "k2_sequence_gaps_opened",
            "Gap rows opened in market.sequence_gaps (ranges of missing sequence numbers)",
            ["exchange"],
            registry=r,
        )
        self.closed = Counter(
            "k2_sequence_gaps_closed",
            "Gap rows closed in market.sequence_gaps, by how they closed",
            ["exchange", "outcome"],
            registry=r,
        )
        self.missing = Counter(
            "k2_sequence_gap_ids_opened",
            "Sequence numbers missing in the gaps opened (the size is the value)",
            ["exchange"],
            registry=r,
        )
        for exchange in exchanges:
            self.opened.labels(exchange)
            self.missing.labels(exchange)
            for outcome in GAP_OUTCOMES:
                self.closed.labels(exchange, outcome)

    def record(self, exchange: str, opened: int, missing: int, closed: Mapping[str, int]) -> None:
        self.opened.labels(exchange).inc(opened)
        self.missing.labels(exchange).inc(missing)
        for how, count in closed.items():
            self.closed.labels(exchange, how if how in GAP_OUTCOMES else "other").inc(count)


class RollupMetrics:
    """The OHLCV rollup assets: bars written and time taken, per interval."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.bars_written = Counter("k2_rollup_bars_written", "Bars written to market.ohlcv_<interval>", ["interval"], registry=r)
        self.filled_bars = Counter(
            "k2_rollup_filled_bars_written",
            "Of those, bars of minutes without trades (filled at the previous close)",
            ["interval"],
            registry=r,
        )
        self.seconds = Histogram(
            "k2_rollup_seconds",
            "Time to compute, write and check one partition of bars",
            ["interval"],
            registry=r,
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
        )

    def record(self, interval: str, bars: int, filled: int, seconds: float) -> None:
        self.bars_written.labels(interval).inc(bars)
        self.filled_bars.labels(interval).inc(filled)
        self.seconds.labels(interval).observe(seconds)


class BackupMetrics:
    """The catalog backup: when the last good one was taken, and its size (pushed under job k2_backup)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.last_success = Gauge(
            "k2_catalog_backup_last_success_timestamp_seconds", "When the last good catalog backup finished", registry=r
        )
        self.bytes = Gauge("k2_catalog_backup_bytes", "Size of the last good catalog backup", registry=r)
        self.tables = Gauge(
            "k2_catalog_backup_tables", "Tables whose metadata location the last good backup recorded", registry=r
        )

    def record(self, manifest: dict) -> None:
        """A good backup (its k2-backup.json manifest), finished now."""
        self.last_success.set(time.time())
        self.bytes.set(manifest["bytes"])
        self.tables.set(len(manifest["tables"]))


class LoadMetrics:
    """The batch loads (ASX sessions, Binance history days): rows read, written and rejected, time taken."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.read = Counter("k2_load_rows_read", "Rows read from the source files", ["table"], registry=r)
        self.written = Counter("k2_load_rows_written", "Rows written (not already present)", ["table"], registry=r)
        self.rejected = Counter("k2_load_rows_rejected", "Rows written to market.rejected", ["table"], registry=r)
        self.seconds = Histogram(
            "k2_load_seconds",
            "Time to write and check one partition",
            ["table"],
            registry=r,
            buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
        )


class RepairMetrics:
    """Binance gap repair from the exchange's REST API."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requested = Counter("k2_repair_ids_requested", "Trade ids asked of the exchange", registry=r)
        self.written = Counter("k2_repair_trades_written", "Trades fetched from the exchange and written", registry=r)
        self.already_present = Counter("k2_repair_trades_already_present", "Fetched trades the table already held", registry=r)
        self.unavailable = Counter(
            "k2_repair_ranges_unavailable", "Gap ranges the exchange could not (entirely) fill", registry=r
        )


class MaintenanceMetrics:
    """Table maintenance: partitions compacted, snapshots expired, orphan files removed, per table."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.compacted = Counter(
            "k2_maintenance_partitions_compacted", "Partitions rewritten into fewer files", ["table"], registry=r
        )
        self.files_removed = Counter(
            "k2_maintenance_data_files_replaced", "Data files replaced by compaction (before minus after)", ["table"], registry=r
        )
        self.expired = Counter("k2_maintenance_snapshots_expired", "Snapshots expired", ["table"], registry=r)
        self.orphans = Counter("k2_maintenance_orphan_files_removed", "Unreferenced files deleted", ["table"], registry=r)
        self.seconds = Histogram(
            "k2_maintenance_seconds",
            "Time one maintenance op took",
            ["op"],
            registry=r,
            buckets=(1, 5, 10, 30, 60, 300, 600, 1800, 3600),
        )


def maintenance_failures(failed: int) -> CollectorRegistry:
    """What the last run of one maintenance op over one table could not do. Pushed in a group of its own per
    op and table ({op, table}), so a run over other tables leaves it as it was."""
    registry = CollectorRegistry()
    Gauge(
        "k2_maintenance_failures",
        "What the last run of this op over this table could not do: partitions not compacted, or 1 for a table the op "
        "could not maintain (0 after a clean run)",
        registry=registry,
    ).set(failed)
    return registry


def push(
    registry: CollectorRegistry,
    job: str,
    grouping_key: Mapping[str, str],
    *,
    url: str | None = None,
    timeout: float = 5.0,
    logger=None,
) -> bool:
    """Push a short run's metrics to the Pushgateway at K2_PUSHGATEWAY_URL (no-op when unset).

    pushadd: the metrics of this registry replace those of the same name in the group (job plus
    grouping_key, bounded labels such as the asset name), so the gateway holds the last run's values.
    A gateway that is down or refuses costs a warning, never the run. Returns whether it was pushed."""
    url = os.environ.get(PUSHGATEWAY_ENV, "") if url is None else url
    if not url:
        return False
    try:
        pushadd_to_gateway(url, job=job, registry=registry, grouping_key=dict(grouping_key), timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - metrics must never fail the run
        (logger or log).warning(f"metrics of {job} {dict(grouping_key)} not pushed to {url}: {exc}")
        return False
    return True


def serve(registry: CollectorRegistry, port: int, host: str | None = None):
    """Serve /metrics on 127.0.0.1 (K2_METRICS_HOST widens it, e.g. inside a container); returns the server."""
    server, _thread = start_http_server(port, addr=host or os.environ.get("K2_METRICS_HOST", "127.0.0.1"), registry=registry)
    return server
