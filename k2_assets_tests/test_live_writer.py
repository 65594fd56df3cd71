"""Kafka -> Iceberg micro-batches on the real embedded broker and a real catalog: exactly once."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pyarrow.compute as pc
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from k2_assets.core import catalog as k2_catalog
from k2_assets.core import live_codec
from k2_assets.core.kafka import consumer_config, producer_config
from k2_assets.core.live_properties import MAX_TRACKER_STATE
from k2_assets.core.live_writer import LiveWriter
from k2_assets.core.offsets import latest_property, recorded_offsets, tracker_key
from k2_assets_tests.conftest import REPO, btc_trade_events, offsets_key

INGEST_US = 1_704_110_400_000_000
SESSION_TIMEOUT_MS = 1500  # a killed writer's partitions move on quickly (the embedded broker accepts it; Kafka wants 6000+)


def produce(bootstrap: str, topic: str, values: list[tuple[bytes, bytes]]) -> None:
    producer = Producer(producer_config(bootstrap))
    for key, value in values:
        producer.produce(topic, key=key, value=value)
        producer.poll(0)
    assert producer.flush(30) == 0


def trade_messages(events: list[dict]) -> list[tuple[bytes, bytes]]:
    return [(e["s"].encode(), live_codec.encode(live_codec.trade_from_event(e, INGEST_US))) for e in events]


def writer_for(catalog, broker, topic, **kwargs) -> LiveWriter:
    kwargs.setdefault("session_timeout_ms", SESSION_TIMEOUT_MS)
    return LiveWriter(
        k2_catalog.ensure_table(catalog, "trades"),
        k2_catalog.ensure_table(catalog, "rejected"),
        broker.bootstrap,
        topic=topic,
        **kwargs,
    )


def drain_all(writer: LiveWriter, rounds: int = 5):
    reports = []
    for _ in range(rounds):
        batch = writer.drain(10, idle_seconds=0.5)
        reports += batch
        if not batch:
            break
    return reports


def test_real_trades_once_with_duplicates_and_bad_messages(btcusdt_dir, broker, topic, catalog):
    events = btc_trade_events(btcusdt_dir)
    messages = trade_messages(events)
    messages += trade_messages(events[100:600])  # a replayed stretch: the same trades again
    bad = [
        (b"BTCUSDT", b"{not json"),
        (b"BTCUSDT", live_codec.encode({**live_codec.trade_from_event(events[0], INGEST_US), "price": "1.123456789"})),
        (b"BTCUSDT", b"[]"),
    ]
    messages[5000:5000] = bad
    produce(broker.bootstrap, topic, messages)

    writer = writer_for(catalog, broker, topic, max_batch_rows=4000)
    reports = drain_all(writer)
    writer.close()
    assert len(reports) > 1  # several micro-batches
    consumed = sum(r.consumed for r in reports)
    assert consumed == len(messages)
    assert consumed == sum(r.written + r.rejected + r.duplicates for r in reports)  # reconciles per batch too
    for r in reports:
        assert r.consumed == r.written + r.rejected + r.duplicates
    assert sum(r.sequence_events.get("duplicate", 0) for r in reports) == 500  # the tracker saw the replayed stretch
    table = catalog.load_table("market.trades").scan().to_arrow()
    assert table.num_rows == 16702
    assert sorted(table.column("source_sequence").to_pylist()) == list(range(3345206428, 3345223130))
    assert pc.count_distinct(table.column("message_id")).as_py() == 16702
    rejected = catalog.load_table("market.rejected").scan().to_arrow().to_pylist()
    assert sorted(r["raw"] for r in rejected) == sorted(v for _, v in bad)
    assert all(r["kafka_topic"] == topic and r["kafka_offset"] is not None and r["reason"] for r in rejected)
    # The offsets are in the table, in the same commits as the rows.
    table_offsets = recorded_offsets(catalog.load_table("market.trades"), offsets_key(broker, topic))
    assert sum(table_offsets.values()) == len(messages)
    # The consumer group's offsets follow them (for lag monitoring), committed before close() returned.
    group = Consumer(consumer_config(broker.bootstrap, writer.group_id))
    committed = group.committed([TopicPartition(topic, p) for p in table_offsets], timeout=10)
    group.close()
    assert {tp.partition: tp.offset for tp in committed} == table_offsets


def test_a_failed_commit_rereads_what_the_consuming_thread_read_ahead(btcusdt_dir, broker, topic, catalog):
    """The same writer goes on after a failed Iceberg commit: nothing the consuming thread had already
    read past the failed batch is skipped, and nothing is written twice."""
    events = btc_trade_events(btcusdt_dir)
    produce(broker.bootstrap, topic, trade_messages(events))
    writer = writer_for(catalog, broker, topic, max_batch_rows=3000)
    append, calls = writer.trades.append, []

    def append_failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a bug in the commit path")  # the second micro-batch's commit fails, not transiently
        return append(*args, **kwargs)

    writer.trades.append = append_failing_once
    with pytest.raises(RuntimeError, match="a bug in the commit path"):
        writer.drain(30)
    written_before = catalog.load_table("market.trades").scan().to_arrow().num_rows
    assert 0 < written_before < len(events)
    reports = drain_all(writer)
    writer.close()
    table = catalog.load_table("market.trades").scan().to_arrow()
    assert sum(r.written for r in reports) == len(events) - written_before
    assert sorted(table.column("source_sequence").to_pylist()) == [e["t"] for e in events]


def test_restart_resumes_from_the_table_not_from_kafka(btcusdt_dir, broker, topic, catalog):
    events = btc_trade_events(btcusdt_dir)[:3000]
    produce(broker.bootstrap, topic, trade_messages(events[:2000]))
    first = writer_for(catalog, broker, topic)
    drain_all(first)
    first.close()
    produce(broker.bootstrap, topic, trade_messages(events[2000:]))
    # A new writer with a new consumer group: Kafka knows nothing of it, the table does.
    second = writer_for(catalog, broker, topic, group_id="another-group")
    assert sum(second.position.values()) == 2000
    reports = drain_all(second)
    second.close()
    assert sum(r.consumed for r in reports) == 1000
    assert catalog.load_table("market.trades").scan().to_arrow().num_rows == 3000
    # The sequence tracker's state came back with the offsets: the next id is in order, not a first sighting.
    assert sum(r.sequence_events.get("in_order", 0) for r in reports) == 1000


def test_a_restart_after_a_gap_storm_resumes_from_the_marks_not_an_older_state(btcusdt_dir, broker, topic, catalog):
    """A tracker state too large to record whole (2,000 open gaps) still records each symbol's high-water mark, so a
    restarted writer does not fall back to an older commit's state, whose mark would open a false gap."""
    events = btc_trade_events(btcusdt_dir)[:6000]
    produce(broker.bootstrap, topic, trade_messages(events[:1000]))
    first = writer_for(catalog, broker, topic)
    drain_all(first)
    produce(broker.bootstrap, topic, trade_messages(events[1000:5000:2]))  # every other trade: a gap after each
    storm = drain_all(first)
    first.close()
    assert sum(r.sequence_events.get("gap", 0) for r in storm) == 1999
    assert len(first.tracker.dumps()) > MAX_TRACKER_STATE
    recorded = json.loads(latest_property(catalog.load_table("market.trades"), tracker_key("BINANCE")))
    assert recorded["streams"]["BTCUSDT"]["high"] == events[4998]["t"] and recorded["streams"]["BTCUSDT"]["gaps"] == []

    produce(broker.bootstrap, topic, trade_messages(events[4999:]))  # carries on from the last trade written
    second = writer_for(catalog, broker, topic, group_id="another-group")
    reports = drain_all(second)
    second.close()
    assert sum(r.sequence_events.get("in_order", 0) for r in reports) == 1001
    assert sum(r.sequence_events.get("gap", 0) for r in reports) == 0


@pytest.mark.parametrize("point", ["after_rejects_commit", "after_trades_commit"])
def test_crash_between_commit_and_acknowledgement(btcusdt_dir, broker, topic, catalog, k2_home, point):
    """The writer dies right after an Iceberg commit, before acknowledging anything: no duplicates, no loss."""
    events = btc_trade_events(btcusdt_dir)[:5000]
    messages = trade_messages(events)
    messages[10:10] = [(b"BTCUSDT", b"{bad")]
    produce(broker.bootstrap, topic, messages)
    result = run_writer(broker, topic, k2_home, seconds=20, crash_point=point)
    assert result.returncode == -signal.SIGKILL
    run_writer(broker, topic, k2_home, seconds=15)
    assert_exactly(catalog, broker, topic, 5000, rejected=1, consumed=len(messages))


def test_sigkill_at_random_points_loses_and_duplicates_nothing(btcusdt_dir, broker, topic, catalog, k2_home):
    """20+ writer processes killed with SIGKILL at random moments while trades keep arriving."""
    events = btc_trade_events(btcusdt_dir)
    messages = trade_messages(events)
    bad_at = {1234, 8000, 15000}
    for i in sorted(bad_at, reverse=True):
        messages.insert(i, (b"BTCUSDT", b"{bad " + str(i).encode()))
    rng = random.Random(42)
    chunks = [messages[i : i + 800] for i in range(0, len(messages), 800)]
    env = writer_env(broker, topic, k2_home)
    kills, killed_after_a_commit = 0, 0
    for i, chunk in enumerate(chunks):
        produce(broker.bootstrap, topic, chunk)
        out = k2_home / f"writer-{i}.log"
        with open(out, "wb") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "k2_assets.cli",
                    "writer",
                    "--bootstrap",
                    broker.bootstrap,
                    "--topic",
                    topic,
                    "--seconds",
                    "30",
                    "--max-batch-rows",
                    "300",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.DEVNULL,
            )
            wait_for(lambda out=out: b'"ready"' in out.read_bytes(), timeout=30)
            if i % 2:  # every other writer dies only once it has committed a batch: mid-stream, not at start-up
                wait_for(lambda out=out: out.read_bytes().count(b"\n") >= 2, timeout=30)
            time.sleep(rng.uniform(0.0, 0.5))  # somewhere among reading, writing and committing batches
            process.send_signal(signal.SIGKILL)
            process.wait()
        kills += 1
        killed_after_a_commit += out.read_bytes().count(b"\n") >= 2
    assert kills >= 20
    assert killed_after_a_commit >= len(chunks) // 2
    run_writer(broker, topic, k2_home, seconds=20)
    assert_exactly(catalog, broker, topic, 16702, rejected=len(bad_at), consumed=len(messages))


def wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def writer_env(broker, topic, k2_home) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("K2_")}
    env.update(K2_HOME=str(k2_home), PYTHONPATH=str(REPO), K2_KAFKA_SESSION_TIMEOUT_MS=str(SESSION_TIMEOUT_MS))
    return env


def run_writer(broker, topic, k2_home, seconds: float, crash_point: str | None = None) -> subprocess.CompletedProcess:
    env = writer_env(broker, topic, k2_home)
    command = ["-m", "k2_assets.cli", "writer"]
    if crash_point:
        env["K2_WRITER_CRASH_POINT"] = crash_point
        command = ["-m", "k2_assets.dev.crashing_writer"]
    return subprocess.run(
        [
            sys.executable,
            *command,
            "--bootstrap",
            broker.bootstrap,
            "--topic",
            topic,
            "--seconds",
            str(seconds),
            "--max-batch-rows",
            "1000",
        ],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )


def assert_exactly(catalog, broker, topic, trades: int, rejected: int, consumed: int) -> None:
    table = catalog.load_table("market.trades").scan().to_arrow()
    assert table.num_rows == trades
    assert pc.count_distinct(table.column("message_id")).as_py() == trades
    seq = sorted(table.column("source_sequence").to_pylist())
    assert seq == list(range(seq[0], seq[0] + trades))
    rejects = catalog.load_table("market.rejected").scan().to_arrow()
    assert rejects.num_rows == rejected
    assert len(set(rejects.column("kafka_offset").to_pylist())) == rejected
    assert sum(recorded_offsets(catalog.load_table("market.trades"), offsets_key(broker, topic)).values()) == consumed
    offsets = sorted(table.column("kafka_offset").to_pylist() + rejects.column("kafka_offset").to_pylist())
    assert len(offsets) == consumed and json.dumps(offsets) == json.dumps(sorted(set(offsets)))


def test_a_writer_fenced_after_another_wrote_rejects_goes_on_writing_rejects(btcusdt_dir, broker, topic, catalog):
    """The CI failure of 2026-12-03: writer A's handle on market.rejected stayed at its own last commit while
    writer B committed rejects after it. Every reject commit of A's after a rewind was fenced against that stale
    snapshot, for good. A rewind re-reads both tables the writer fences on."""
    messages = trade_messages(btc_trade_events(btcusdt_dir)[:3000])
    produce(broker.bootstrap, topic, [*messages[:1000], (b"BTCUSDT", b"{bad A")])
    a = writer_for(catalog, broker, topic, group_id="writer-a")
    drain_all(a)
    b = writer_for(catalog, broker, topic, group_id="writer-b")  # a group of its own: it owns every partition too
    produce(broker.bootstrap, topic, [*messages[1000:2000], (b"BTCUSDT", b"{bad B")])
    drain_all(b)
    b.close()

    a._rewind()  # what a fenced batch does: back to the table's offsets and reject marks
    produce(broker.bootstrap, topic, [*messages[2000:], (b"BTCUSDT", b"{bad C")])
    reports = drain_all(a)
    a.close()
    assert sum(r.written for r in reports) == 1000 and sum(r.rejected for r in reports) == 1
    assert_exactly(catalog, broker, topic, trades=3000, rejected=3, consumed=3003)
