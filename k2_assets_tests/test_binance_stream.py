"""The producer as a user runs it (`k2 stream binance`) and its resilience, against the local feed and real broker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import structlog
from confluent_kafka import Consumer, TopicPartition

from k2_assets.core import logs
from k2_assets.core.binance_stream import BinanceProducer
from k2_assets.core.kafka import consumer_config, ensure_topics
from k2_assets.dev.feed_server import random_walk, replay_file, run_in_thread
from k2_assets_tests.test_live_end_to_end import BTC_FILE, ProducerThread, wait_until


def count_messages(bootstrap: str, topic: str, partitions: int, expect: int, timeout: float = 60) -> list:
    """The topic's messages, read until `expect` of them arrived or `timeout`."""
    consumer = Consumer(consumer_config(bootstrap, "count"))
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    messages, deadline = [], time.monotonic() + timeout
    while len(messages) < expect and time.monotonic() < deadline:
        messages += [m for m in consumer.consume(10_000, timeout=0.5) if m.error() is None]
    consumer.close()
    return messages


@pytest.fixture
def logged(monkeypatch) -> list[dict]:
    """The producer's log events, as `k2 stream binance` hands them to its JSON renderer."""
    monkeypatch.setattr(logs, "_configured", True)  # structlog's own loggers, as in the command, which capture_logs sees
    with structlog.testing.capture_logs() as events:
        yield events


def test_k2_stream_binance_produces_everything_and_flushes_on_sigterm(btcusdt_dir, broker, topic, tmp_path):
    with run_in_thread(replay_file(btcusdt_dir / BTC_FILE)) as server:
        log = tmp_path / "producer.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("K2_")}
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "k2_assets.cli",
                    "stream",
                    "binance",
                    "--symbols",
                    "BTCUSDT",
                    "--url",
                    server.ws_url,
                    "--bootstrap",
                    broker.bootstrap,
                    "--topic",
                    topic,
                ],
                stdout=out,
                stderr=out,
                env=env,
            )
            try:
                wait_until(lambda: server.stats["events"] == 16702, 60, "the feed to send every trade")
                time.sleep(0.5)
                process.send_signal(signal.SIGTERM)
                assert process.wait(timeout=30) == 0
            finally:
                if process.poll() is None:
                    process.kill()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert lines[0]["event"] == "connected" and "btcusdt@trade" in lines[0]["url"]
    stopped = lines[-1]
    assert stopped["event"] == "stopped" and stopped["produced"] == 16702 and stopped["unflushed"] == 0
    assert stopped["last_trade_id"] == {"BTCUSDT": 3345223129}
    messages = count_messages(broker.bootstrap, topic, 3, 16703, timeout=10)  # one more than sent: none may follow
    assert len(messages) == 16702
    assert {m.key() for m in messages} == {b"BTCUSDT"} and len({m.partition() for m in messages}) == 1
    first = json.loads(min(messages, key=lambda m: m.offset()).value())
    assert first["message_id"] == "BINANCE:BTCUSDT:3345206428" and first["price"] == "42690.21000000"
    assert first["side"] == "BUY" and first["exchange_timestamp"] == 1704110400000000
    assert dict(messages[0].headers())["k2-schema"] == b"k2.market.v2.Trade"


def test_reconnects_back_off_and_log_the_last_trade_ids(btcusdt_dir, broker, topic, logged):
    ensure_topics(broker.bootstrap, {topic + ".dlq": 1})
    with run_in_thread(
        replay_file(btcusdt_dir / BTC_FILE), drop_every=4000, skip_ids={3345206500, 3345206501, 3345210000}
    ) as server:
        producer = BinanceProducer(
            ["BTCUSDT"],
            broker.bootstrap,
            base_url=server.ws_url,
            topic=topic,
            dead_letter_topic=topic + ".dlq",
            backoff_initial=0.05,
            backoff_max=0.5,
        )
        with ProducerThread(producer):
            wait_until(lambda: producer.stats.last_trade_id.get("BTCUSDT") == 3345223129, 60, "the last trade")
    reconnects = [e for e in logged if e["event"] == "reconnect"]
    assert len(reconnects) == server.stats["drops"] >= 4
    # Each reconnect names the last trade id seen before the outage; with the shared cursor the stream resumes right after it.
    ids = [r["last_trade_id"]["BTCUSDT"] for r in reconnects]
    assert ids == sorted(ids) and all(3345206428 <= i <= 3345223129 for i in ids)
    assert all(0 <= r["delay_seconds"] <= 0.5 for r in reconnects)
    # Skipped ids are seen as gaps by the producer too.
    assert producer.stats.gaps == [
        {"symbol": "BTCUSDT", "first_missing": 3345206500, "last_missing": 3345206501},
        {"symbol": "BTCUSDT", "first_missing": 3345210000, "last_missing": 3345210000},
    ]


def test_stop_during_the_handshake_ends_the_producer_at_once(broker, topic, logged):
    """stop() while the exchange has accepted the connection and not yet answered the handshake (a reconnect in
    progress at Ctrl-C): the producer ends at once, not after the 10 s handshake timeout, and flushes as ever."""
    ensure_topics(broker.bootstrap, {topic + ".dlq": 1})
    accepted = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as silent:
        held = []

        def accept() -> None:
            held.append(silent.accept()[0])
            accepted.set()

        threading.Thread(target=accept, daemon=True).start()
        producer = BinanceProducer(
            ["BTCUSDT"],
            broker.bootstrap,
            base_url=f"ws://127.0.0.1:{silent.getsockname()[1]}",
            topic=topic,
            dead_letter_topic=topic + ".dlq",
        )
        with ProducerThread(producer):
            assert accepted.wait(10), "the producer never connected"
            time.sleep(0.3)  # its handshake request sent, the answer awaited
            stopping = time.monotonic()
        stopped_in = time.monotonic() - stopping
        for conn in held:
            conn.close()
    assert stopped_in < 3, f"stopped {stopped_in:.1f} s after stop()"
    assert [e["event"] for e in logged] == ["stopped"] and logged[-1]["unflushed"] == 0


def test_connection_is_renewed_before_the_exchange_cuts_it_and_pings_are_answered(broker, topic, logged):
    ensure_topics(broker.bootstrap, {topic + ".dlq": 1})
    with run_in_thread(random_walk(["BTCUSDT"], seed=1), rate=200, ping_interval=0.2, ping_timeout=0.5) as server:
        producer = BinanceProducer(
            ["BTCUSDT"],
            broker.bootstrap,
            base_url=server.ws_url,
            topic=topic,
            dead_letter_topic=topic + ".dlq",
            backoff_initial=0.01,
            backoff_max=0.05,
            max_connection_seconds=1.0,
        )
        with ProducerThread(producer):
            time.sleep(3.5)
    renewals = [e for e in logged if e["event"] == "reconnect" and e["reason"] == "renewed before the 24-hour limit"]
    assert len(renewals) >= 2
    # The server pinged every 0.2 s and closes a connection whose pong is 0.5 s late: no reconnect had another cause.
    assert all(e["reason"] == "renewed before the 24-hour limit" for e in logged if e["event"] == "reconnect")
    assert producer.stats.produced > 400 and producer.stats.dead_lettered == 0
