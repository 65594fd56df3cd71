"""The live path as it runs in operation, on the real broker and catalogs (SQLite and PostgreSQL):
several writers at once, killed, paused and restarted; a broker restarted under a table that remembers
offsets; the catalog and the broker taken away; a gap across midnight UTC."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

import dagster as dg
import pyarrow.compute as pc
import pytest
from confluent_kafka import Producer

from k2_assets.core import catalog as k2_catalog
from k2_assets.core.kafka import ensure_topics, producer_config, topic_incarnation
from k2_assets.core.offsets import recorded_offsets
from k2_assets.dev.broker import EmbeddedBroker
from k2_assets_tests.conftest import REPO, btc_trade_events, offsets_key
from k2_assets_tests.test_live_writer import SESSION_TIMEOUT_MS, trade_messages, wait_for, writer_for

BAD = [b"{bad one", b"[]", b"{bad two"]


def produce_spread(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]], start: int = 0) -> None:
    """Round-robin over the 3 partitions: every writer has work, and one symbol spans partitions, so
    writers also race on the same symbols (the content dedup across writers is exercised, not only the offsets)."""
    producer = Producer(producer_config(bootstrap))
    for i, (key, value) in enumerate(messages, start):
        producer.produce(topic, key=key, value=value, partition=i % 3)
        producer.poll(0)
    assert producer.flush(30) == 0


def with_bad(messages: list, every: int = 5000) -> list:
    out = list(messages)
    for n, bad in enumerate(BAD):
        out.insert(min(len(out), (n + 1) * every), (b"BTCUSDT", bad))
    return out


class Writers:
    """`k2 writer` processes on one topic and catalog, started, killed, paused and resumed by the test."""

    def __init__(self, bootstrap: str, topic: str, props: dict, home: Path):
        self.bootstrap, self.topic, self.home = bootstrap, topic, home
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("K2_")}
        self.env.update(
            K2_HOME=str(home),
            K2_CATALOG_URI=props["catalog_uri"],
            K2_WAREHOUSE=props["warehouse"],
            K2_KAFKA_SESSION_TIMEOUT_MS=str(SESSION_TIMEOUT_MS),
            PYTHONPATH=str(REPO),
        )
        self.processes: dict[int, subprocess.Popen] = {}
        self.started = 0

    def start(self, slot: int) -> subprocess.Popen:
        self.started += 1
        with open(self.home / f"writer-{slot}-{self.started}.log", "wb") as log:  # the writer keeps its own descriptor
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "k2_assets.cli",
                    "writer",
                    "--bootstrap",
                    self.bootstrap,
                    "--topic",
                    self.topic,
                    "--seconds",
                    "600",
                    "--max-batch-rows",
                    "700",
                ],
                env=self.env,
                stdout=log,
                stderr=log,
            )
        self.processes[slot] = process
        return process

    def log(self, tail: int | None = 3000) -> str:
        """The writers' logs, each cut to its last `tail` characters (None: whole)."""
        texts = (p.read_text(errors="replace") for p in sorted(self.home.glob("writer-*.log")))
        return "\n".join(text if tail is None else text[-tail:] for text in texts)

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def assert_exact(catalog, topic: str, bootstrap: str, trades: int, rejected: int, produced: int) -> None:
    """Every produced message once: a trade or a reject, none twice, none missing, offsets all recorded."""
    table = catalog.load_table("market.trades").scan().to_arrow()
    assert table.num_rows == trades
    assert pc.count_distinct(table.column("message_id")).as_py() == trades
    rejects = catalog.load_table("market.rejected").scan().to_arrow()
    assert rejects.num_rows == rejected
    positions = set(zip(table.column("kafka_partition").to_pylist(), table.column("kafka_offset").to_pylist()))
    positions |= set(zip(rejects.column("kafka_partition").to_pylist(), rejects.column("kafka_offset").to_pylist()))
    assert len(positions) == trades + rejected == produced
    recorded = recorded_offsets(catalog.load_table("market.trades"), offsets_key(bootstrap, topic))
    assert sum(recorded.values()) == produced
    gaps = catalog.load_table("market.sequence_gaps").scan().to_arrow()
    assert pc.sum(pc.is_null(gaps.column("closed_at"))).as_py() in (0, None)  # every transient hole closed


def rows_in(catalog) -> int:
    try:
        return catalog.load_table("market.trades").scan().to_arrow().num_rows
    except Exception:  # noqa: BLE001 - the catalog may be locked or down while the test looks
        return -1


@pytest.fixture
def operations(btcusdt_dir, broker, topic, any_catalog_props, k2_home):
    catalog = k2_catalog.open_catalog(any_catalog_props["catalog_uri"], any_catalog_props["warehouse"])
    for name in ("trades", "rejected", "sequence_gaps"):
        k2_catalog.ensure_table(catalog, name)
    writers = Writers(broker.bootstrap, topic, any_catalog_props, k2_home)
    yield catalog, writers, with_bad(trade_messages(btc_trade_events(btcusdt_dir)))
    writers.stop_all()


def test_writers_at_once_killed_and_paused_write_each_trade_once(operations, broker, topic):
    """Three writers on one topic; each SIGKILLed and restarted at random points; one paused with
    SIGSTOP until the others have taken its partitions and moved on, then resumed as a zombie."""
    catalog, writers, messages = operations
    rng = random.Random(7)
    chunks = [messages[i : i + 1200] for i in range(0, len(messages), 1200)]
    for slot in range(3):
        writers.start(slot)
    produced, kills = 0, 0
    paused = None
    for round_, chunk in enumerate(chunks):
        produce_spread(broker.bootstrap, topic, chunk, produced)
        produced += len(chunk)
        time.sleep(rng.uniform(0.3, 1.5))
        if round_ == 4:  # the zombie: paused mid-stream, resumed only after the group has moved on without it
            paused = writers.processes[rng.randrange(3)]
            paused.send_signal(signal.SIGSTOP)
        elif round_ == 8 and paused is not None:
            paused.send_signal(signal.SIGCONT)
        else:
            slot = rng.randrange(3)
            if writers.processes[slot] is not paused:
                writers.processes[slot].send_signal(signal.SIGKILL)
                writers.processes[slot].wait()
                writers.start(slot)
                kills += 1
    wait_for(lambda: rows_in(catalog) == 16702, timeout=120)
    time.sleep(3)  # anything a zombie still had in hand would land now
    assert all(p.poll() is None for p in writers.processes.values()), writers.log()
    writers.stop_all()
    assert kills >= 8
    assert_exact(catalog, topic, broker.bootstrap, trades=16702, rejected=len(BAD), produced=produced)


def hold_catalog_down(props: dict, seconds: float, postgres=None) -> threading.Thread:
    """The catalog unavailable for `seconds`: SQLite locked exclusively; PostgreSQL stopped."""

    def hold() -> None:
        if props["catalog_uri"].startswith("sqlite"):
            db = sqlite3.connect(props["catalog_uri"].removeprefix("sqlite:///"), isolation_level=None, timeout=30)
            db.execute("BEGIN EXCLUSIVE")
            time.sleep(seconds)
            db.execute("ROLLBACK")
            db.close()
        else:
            postgres.stop()
            time.sleep(seconds)
            postgres.start()

    thread = threading.Thread(target=hold)
    thread.start()
    return thread


def test_writers_ride_out_a_catalog_outage_and_a_frozen_broker(btcusdt_dir, any_catalog_props, k2_home, request):
    """30 s without the catalog, then 30 s of a frozen broker, while two writers drain: both live on, the table exact."""
    catalog = k2_catalog.open_catalog(any_catalog_props["catalog_uri"], any_catalog_props["warehouse"])
    postgres = request.getfixturevalue("postgres") if any_catalog_props["catalog_uri"].startswith("postgres") else None
    messages = with_bad(trade_messages(btc_trade_events(btcusdt_dir)))
    thirds = [
        messages[: len(messages) // 3],
        messages[len(messages) // 3 : 2 * len(messages) // 3],
        messages[2 * len(messages) // 3 :],
    ]
    with EmbeddedBroker() as broker:  # its own broker: this test freezes it
        topic = "t.outages"
        ensure_topics(broker.bootstrap, {topic: 3})
        for name in ("trades", "rejected", "sequence_gaps"):
            k2_catalog.ensure_table(catalog, name)
        writers = Writers(broker.bootstrap, topic, any_catalog_props, k2_home)
        try:
            writers.start(0)
            writers.start(1)
            produce_spread(broker.bootstrap, topic, thirds[0])
            wait_for(lambda: rows_in(catalog) >= len(thirds[0]) - 3, timeout=60)

            outage = hold_catalog_down(any_catalog_props, 30, postgres)
            time.sleep(1)
            produce_spread(broker.bootstrap, topic, thirds[1], len(thirds[0]))
            outage.join()
            wait_for(lambda: rows_in(catalog) >= len(thirds[0]) + len(thirds[1]) - 3, timeout=90)

            produce_spread(broker.bootstrap, topic, thirds[2], len(thirds[0]) + len(thirds[1]))
            broker.process.send_signal(signal.SIGSTOP)
            time.sleep(30)
            broker.process.send_signal(signal.SIGCONT)
            wait_for(lambda: rows_in(catalog) == 16702, timeout=120)
            time.sleep(2)
            assert all(p.poll() is None for p in writers.processes.values()), writers.log()
            log = writers.log(tail=None)
            assert "store state degraded" in log and "store state healthy" in log  # the outage was met, and ridden out
        finally:
            writers.stop_all()
        assert_exact(catalog, topic, broker.bootstrap, trades=16702, rejected=len(BAD), produced=len(messages))


def test_a_restarted_broker_on_the_same_home_loses_nothing(btcusdt_dir, catalog, k2_home):
    """`make demo` today and again tomorrow: the in-memory broker starts the topic at offset 0 again, under
    a table that records yesterday's offsets. The writer knows it is another incarnation and reads it all."""
    events = btc_trade_events(btcusdt_dir)
    first, second = events[:9000], events[9000:]
    topic = "market.crypto.trades.binance"
    with EmbeddedBroker() as broker:
        ensure_topics(broker.bootstrap, {topic: 3})
        before = topic_incarnation(broker.bootstrap, topic)
        produce_spread(broker.bootstrap, topic, trade_messages(first))
        writer = writer_for(catalog, broker, topic)
        while writer.drain(10):
            pass
        writer.close()
        port = broker.port
    with EmbeddedBroker(port=port) as broker:  # the same address, an empty topic
        ensure_topics(broker.bootstrap, {topic: 3})
        assert topic_incarnation(broker.bootstrap, topic) != before
        produce_spread(broker.bootstrap, topic, trade_messages(second))
        writer = writer_for(catalog, broker, topic)
        assert writer.position == {0: 0, 1: 0, 2: 0}  # not yesterday's offsets
        assert writer.metrics.incarnation_switches._value.get() == 1
        while writer.drain(10):
            pass
        writer.close()
    table = catalog.load_table("market.trades").scan().to_arrow()
    assert table.num_rows == len(events) == pc.count_distinct(table.column("message_id")).as_py()


def test_the_epoch_fallback_also_tells_incarnations_apart(broker):
    """Brokers without topic ids: the cluster id plus an epoch K2 writes, new for a re-created topic."""
    from confluent_kafka.admin import AdminClient

    topic = "t.epochs"
    ensure_topics(broker.bootstrap, {topic: 1})
    first = topic_incarnation(broker.bootstrap, topic, use_topic_id=False)
    assert first == topic_incarnation(broker.bootstrap, topic, use_topic_id=False)  # stable while the topic lives
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.delete_topics([topic])[topic].result(15)
    time.sleep(0.5)
    ensure_topics(broker.bootstrap, {topic: 1})
    assert topic_incarnation(broker.bootstrap, topic, use_topic_id=False) != first


def test_a_gap_across_midnight_is_recorded_once_then_repaired(btcusdt_dir, broker, topic, catalog, catalog_props, tmp_path):
    """Trade ids skipped on both sides of 00:00 UTC: one gap, on the day after, closed by repair."""
    from k2_assets.defs.binance.assets import binance_trades
    from k2_assets.defs.binance.resources import BinanceRestResource
    from k2_assets.dev.feed_server import replay_file, run_in_thread
    from k2_assets_tests.conftest import make_resources

    shift_ms = (11 * 60 + 45) * 60_000  # 12:15 -> 00:00 of the next day
    events = [{**e, "E": e["E"] + shift_ms, "T": e["T"] + shift_ms} for e in btc_trade_events(btcusdt_dir)]
    midnight = next(i for i, e in enumerate(events) if e["T"] >= 1704153600000)
    removed = {e["t"] for e in events[midnight - 20 : midnight + 30]}
    exchange_file = tmp_path / "exchange" / "BTCUSDT-trades-2024-01-02.csv"
    exchange_file.parent.mkdir()
    exchange_file.write_text(
        "id,price,qty,quote_qty,time,is_buyer_maker\n"
        + "".join(f"{e['t']},{e['p']},{e['q']},0,{e['T']},{e['m']}\n" for e in events)
    )

    produce_spread(broker.bootstrap, topic, trade_messages([e for e in events if e["t"] not in removed]))
    writer = writer_for(catalog, broker, topic, gaps=k2_catalog.ensure_table(catalog, "sequence_gaps"), max_batch_rows=3000)
    while writer.drain(10):
        writer.reconcile_gaps()
    writer.reconcile_gaps()
    gaps = catalog.load_table("market.sequence_gaps").scan().to_arrow().to_pylist()
    assert [(g["session_date"], g["first_missing"], g["last_missing"], g["closed_at"]) for g in gaps] == [
        (date(2024, 1, 2), min(removed), max(removed), None)
    ]
    writer.close()

    with run_in_thread(replay_file(exchange_file)) as exchange:
        resources = {**make_resources(catalog_props), "binance_rest": BinanceRestResource(base_url=exchange.http_url)}
        result = dg.materialize([binance_trades], partition_key="2024-01-02", resources=resources)
    assert result.success
    (event,) = result.asset_materializations_for_node("binance_trades")
    assert event.metadata["rows_written"].value == len(removed)
    gaps = catalog.load_table("market.sequence_gaps").scan().to_arrow().to_pylist()
    assert [(g["first_missing"], g["last_missing"], g["closed_how"]) for g in gaps] == [(min(removed), max(removed), "repair")]
    table = catalog.load_table("market.trades").scan().to_arrow()
    assert sorted(table.column("source_sequence").to_pylist()) == [e["t"] for e in events]
    days = pc.value_counts(table.column("trade_date")).to_pylist()
    assert {d["values"]: d["counts"] for d in days} == {date(2024, 1, 1): midnight, date(2024, 1, 2): len(events) - midnight}
