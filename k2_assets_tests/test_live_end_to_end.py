"""Binance wire format -> producer -> Kafka -> writer -> Iceberg, with the real components end to end."""

from __future__ import annotations

import asyncio
import threading
import time

import pyarrow.compute as pc
from confluent_kafka import Consumer, TopicPartition

from k2_assets.core import catalog as k2_catalog
from k2_assets.core.binance_stream import BinanceProducer
from k2_assets.core.kafka import consumer_config, ensure_topics
from k2_assets.core.live_writer import LiveWriter
from k2_assets.dev.feed_server import replay_file, run_in_thread

BTC_FILE = "BTCUSDT-trades-2024-01-01_1200-1230.derived.csv"


class ProducerThread:
    """The production producer, running its asyncio loop in a background thread."""

    def __init__(self, producer: BinanceProducer):
        self.producer = producer
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.loop.run_until_complete(self.producer.run())

    def __enter__(self) -> BinanceProducer:
        self.thread.start()
        return self.producer

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.producer.stop)
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the producer did not stop"


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def run_pipeline(btcusdt_dir, broker, topic, catalog, **faults):
    ensure_topics(broker.bootstrap, {topic + ".dlq": 1})
    with run_in_thread(replay_file(btcusdt_dir / BTC_FILE), ping_interval=5, **faults) as server:
        producer = BinanceProducer(
            ["BTCUSDT"],
            broker.bootstrap,
            base_url=server.ws_url,
            topic=topic,
            dead_letter_topic=topic + ".dlq",
            backoff_initial=0.05,
            backoff_max=0.2,
        )
        with ProducerThread(producer):
            wait_until(lambda: producer.stats.last_trade_id.get("BTCUSDT") == 3345223129, 120, "the last trade")
            wait_until(lambda: producer.stats.received == server.stats["frames"], 10, "every frame sent to arrive")
        stats = dict(server.stats)
    writer = LiveWriter(
        k2_catalog.ensure_table(catalog, "trades"),
        k2_catalog.ensure_table(catalog, "rejected"),
        broker.bootstrap,
        topic=topic,
        dead_letter_topic=topic + ".dlq",
    )
    reports = []
    for _ in range(10):
        batch = writer.drain(10)
        reports += batch
        if not batch:
            break
    writer.close()
    return stats, producer.stats, reports


def test_real_trades_replayed_through_the_wire_arrive_exactly_once(btcusdt_dir, broker, topic, catalog):
    stats, produced, reports = run_pipeline(btcusdt_dir, broker, topic, catalog)
    assert stats["events"] == 16702 and produced.produced == 16702 and produced.dead_lettered == 0
    table = catalog.load_table("market.trades").scan().to_arrow()
    assert table.num_rows == 16702
    assert sorted(table.column("source_sequence").to_pylist()) == list(range(3345206428, 3345223130))
    assert pc.count_distinct(table.column("message_id")).as_py() == 16702
    assert set(table.column("kafka_topic").to_pylist()) == {topic}
    assert sum(r.consumed for r in reports) == 16702


def test_injected_faults_end_in_trades_or_rejected_with_a_reason(btcusdt_dir, broker, topic, catalog):
    stats, produced, reports = run_pipeline(
        btcusdt_dir,
        broker,
        topic,
        catalog,
        drop_every=3000,
        malformed_ratio=0.002,
        duplicate_ratio=0.003,
        out_of_order_ratio=0.003,
        seed=3,
    )
    assert stats["drops"] >= 4 and stats["malformed"] > 0 and stats["duplicates"] > 0
    assert produced.reconnects >= stats["drops"]
    # Every frame the producer received is a trade in Kafka or a dead letter.
    assert produced.received == stats["frames"] == produced.produced + produced.dead_lettered
    assert produced.dead_lettered == stats["malformed"]

    table = catalog.load_table("market.trades").scan().to_arrow()
    rejected = catalog.load_table("market.rejected").scan().to_arrow().to_pylist()
    assert stats["frames"] == stats["events"] + stats["duplicates"] + stats["malformed"]
    assert table.num_rows == stats["events"] == pc.count_distinct(table.column("message_id")).as_py()
    assert len(rejected) == stats["malformed"]
    assert all(r["reason"].startswith("malformed JSON") and r["kafka_topic"] == topic + ".dlq" and r["raw"] for r in rejected)
    # The malformed frames replaced real trades: exactly those ids are missing (a gap to repair, not a loss to hide).
    missing = set(range(3345206428, 3345223130)) - set(table.column("source_sequence").to_pylist())
    assert len(missing) == stats["malformed"]
    assert sum(r.duplicates for r in reports) == stats["duplicates"]
    # The dead-letter topic holds the same frames, byte for byte.
    consumer = Consumer(consumer_config(broker.bootstrap, "check-dlq"))
    consumer.assign([TopicPartition(topic + ".dlq", 0, 0)])
    dead = []
    while len(dead) < stats["malformed"]:
        batch = consumer.consume(1000, timeout=5)
        assert batch, "dead letters missing"
        dead += [m.value() for m in batch if m.error() is None]
    consumer.close()
    assert sorted(dead) == sorted(r["raw"] for r in rejected)
