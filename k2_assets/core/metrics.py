"""Prometheus metrics of the live path. Label sets are bounded: symbols (configured), Kafka partitions,
sequence event kinds; never an id, an offset or a gap size."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from k2_assets.core.sequence import EVENT_NAMES


class ProducerMetrics:
    """The Binance producer: what came off the socket and what reached Kafka."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.received = Counter("k2_feed_frames_received", "WebSocket frames received from the exchange", registry=r)
        self.produced = Counter("k2_feed_trades_produced", "Trades produced to Kafka", ["symbol"], registry=r)
        self.dead_letters = Counter("k2_feed_dead_letters", "Frames sent to the dead-letter topic", registry=r)
        self.produce_errors = Counter("k2_feed_produce_errors", "Kafka deliveries that failed", registry=r)
        self.reconnects = Counter("k2_feed_reconnects", "WebSocket reconnects", registry=r)
        self.last_trade_time = Gauge("k2_feed_last_trade_timestamp_seconds", "Exchange time of the last trade seen", ["symbol"], registry=r)
        self.last_trade_id = Gauge("k2_feed_last_trade_id", "Last trade id seen (the value, not a label)", ["symbol"], registry=r)


class WriterMetrics:
    """The Kafka -> Iceberg writer: records, batches, commits, lag and freshness."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.consumed = Counter("k2_writer_records_consumed", "Kafka records consumed", registry=r)
        self.written = Counter("k2_writer_records_written", "Trades written to market.trades", registry=r)
        self.rejected = Counter("k2_writer_records_rejected", "Records written to market.rejected", registry=r)
        self.duplicates = Counter("k2_writer_duplicates_skipped", "Trades already in the table, not written again", registry=r)
        self.sequence_events = Counter("k2_sequence_events", "Sequence tracker events", ["event"], registry=r)
        self.batch_seconds = Histogram("k2_writer_batch_seconds", "Decode-to-commit time of a micro-batch", registry=r,
                                       buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.commit_seconds = Histogram("k2_writer_iceberg_commit_seconds", "Iceberg commit latency", registry=r,
                                        buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5))
        self.commit_failures = Counter("k2_writer_iceberg_commit_failures", "Iceberg commits that raised", registry=r)
        self.lag = Gauge("k2_writer_consumer_lag_records", "Records behind the end of the partition (from the table's offsets)",
                         ["partition"], registry=r)
        self.freshness = Gauge("k2_writer_freshness_seconds", "Exchange event time to commit, p95 of the last batch", registry=r)
        self.last_commit_time = Gauge("k2_writer_last_commit_timestamp_seconds", "When the last batch was committed", registry=r)
        for name in EVENT_NAMES:
            self.sequence_events.labels(name)


def serve(registry: CollectorRegistry, port: int, host: str | None = None):
    """Serve /metrics on 127.0.0.1 (K2_METRICS_HOST widens it, e.g. inside a container); returns the server."""
    server, _thread = start_http_server(port, addr=host or os.environ.get("K2_METRICS_HOST", "127.0.0.1"), registry=registry)
    return server
