"""The writer's batch consumer (kafka_batch.py over librdkafka) on the real embedded broker: it reads what
confluent-kafka's Consumer reads, as columns, and keeps a consumer group's rebalances."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pyarrow as pa
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st

from k2_assets.core import live_codec, live_decode
from k2_assets.core.kafka import consumer_config, ensure_topics, producer_config
from k2_assets.core.kafka_batch import BatchConsumer, Messages, lines


def produce(bootstrap: str, messages: list[tuple[str, int, bytes | None, list | None]]) -> None:
    producer = Producer(producer_config(bootstrap))
    for topic, partition, value, headers in messages:
        producer.produce(topic, value=value, partition=partition, headers=headers)
    assert producer.flush(30) == 0


def read_all(consumer: BatchConsumer, n: int, seconds: float = 30.0) -> Messages:
    parts, deadline = [], time.monotonic() + seconds
    while sum(len(p) for p in parts) < n:
        assert time.monotonic() < deadline, f"read {sum(len(p) for p in parts)} of {n} messages"
        polled = consumer.consume(1000, timeout=0.1)
        assert all(e.code() == KafkaError._PARTITION_EOF for e in polled.errors), polled.errors
        parts.append(polled)
    return Messages.concat(parts)


def confluent_read(bootstrap: str, topic: str, n: int) -> list[tuple[int, int, bytes]]:
    consumer = Consumer(consumer_config(bootstrap, f"plain-{uuid.uuid4().hex[:6]}"))
    consumer.assign([TopicPartition(topic, p, 0) for p in range(3)])
    found, deadline = [], time.monotonic() + 30
    while len(found) < n and time.monotonic() < deadline:
        found += [(m.partition(), m.offset(), m.value() or b"") for m in consumer.consume(1000, 0.1) if m.error() is None]
    consumer.close()
    return found


def group_consumer(broker, group: str, topics: list[str], events: list | None = None, **callbacks) -> BatchConsumer:
    consumer = BatchConsumer(consumer_config(broker.bootstrap, group, 1500), topics[0])

    def note(kind):
        def callback(c, tps):
            if events is not None:
                events.append((kind, sorted((tp.topic, tp.partition) for tp in tps)))

        return callback

    consumer.subscribe(
        topics,
        on_assign=callbacks.get("on_assign", note("assign")),
        on_revoke=note("revoke"),
        on_lost=note("lost"),
    )
    return consumer


def test_reads_what_confluent_kafka_reads_as_columns_and_other_topics_as_messages(broker, topic):
    dead_topic = topic + ".dlq"
    ensure_topics(broker.bootstrap, {dead_topic: 1})
    values = [f'{{"n":{i},"text":"{"x" * (i % 50)}"}}'.encode() for i in range(3000)]
    values[7], values[8] = b"", None  # an empty value and a tombstone both read as b""
    produce(broker.bootstrap, [(topic, i % 3, v, None) for i, v in enumerate(values)])
    produce(broker.bootstrap, [(dead_topic, 0, b"\x00\xffbad frame", [("k2-reason", b"malformed"), ("x", None)])])

    consumer = group_consumer(broker, f"g-{uuid.uuid4().hex[:6]}", [topic, dead_topic])
    read = read_all(consumer, 3001)
    consumer.close()

    expected = sorted(confluent_read(broker.bootstrap, topic, 3000))
    got = sorted(zip(read.partitions.tolist(), read.offsets.tolist(), (v[:-1] for v in read.values.to_pylist())))
    assert got == expected and len(expected) == 3000
    assert read.partitions.dtype == np.int32 and read.offsets.dtype == np.int64
    assert lines(read.values).to_pybytes() == b"".join(read.values.to_pylist())  # each value ends in its newline
    (dead,) = read.others
    assert (dead.topic, dead.partition, dead.offset, dead.value) == (dead_topic, 0, 0, b"\x00\xffbad frame")
    assert dead.headers == {"k2-reason": b"malformed", "x": b""}


def test_a_group_splits_the_partitions_and_hands_them_back_on_close(broker, topic):
    group = f"g-{uuid.uuid4().hex[:6]}"
    first_events, second_events = [], []
    first = group_consumer(broker, group, [topic], first_events)
    deadline = time.monotonic() + 30
    while not first_events:
        assert time.monotonic() < deadline
        first.consume(100, 0.1)
    assert first_events == [("assign", [(topic, 0), (topic, 1), (topic, 2)])]

    second = group_consumer(broker, group, [topic], second_events)
    deadline = time.monotonic() + 60
    while not second_events or ("revoke" not in [k for k, _ in first_events]):
        assert time.monotonic() < deadline, (first_events, second_events)
        first.consume(100, 0.05)
        second.consume(100, 0.05)
    moved = next(tps for kind, tps in first_events if kind == "revoke")
    assert second_events[0] == ("assign", moved) and 0 < len(moved) < 3  # cooperative: only the moved ones

    produce(broker.bootstrap, [(topic, p, f"v{p}".encode(), None) for p in range(3)])
    got = {}
    deadline = time.monotonic() + 30
    while len(got) < 3:
        assert time.monotonic() < deadline, got
        for name, c in (("first", first), ("second", second)):
            polled = c.consume(100, 0.05)
            got.update({int(p): name for p in polled.partitions})
    assert {p for p, name in got.items() if name == "second"} == {p for _, p in moved}

    second.close()  # leaving revokes its partitions on the way out
    assert second_events[-1] == ("revoke", moved)
    deadline = time.monotonic() + 60
    while first_events[-1] != ("assign", moved):
        assert time.monotonic() < deadline, first_events
        first.consume(100, 0.1)
    first.close()


def test_an_assignment_at_given_offsets_reads_from_them(broker, topic):
    produce(broker.bootstrap, [(topic, p, f"{p}-{i}".encode(), None) for p in range(3) for i in range(10)])

    def assign_at_seven(consumer, tps):
        for tp in tps:
            tp.offset = 7
        consumer.incremental_assign(tps)

    consumer = group_consumer(broker, f"g-{uuid.uuid4().hex[:6]}", [topic], on_assign=assign_at_seven)
    read = read_all(consumer, 9)
    time.sleep(0.3)
    read = Messages.concat([read, consumer.consume(1000, 0.2)])
    consumer.close()
    assert sorted(v[:-1] for v in read.values.to_pylist()) == sorted(f"{p}-{i}".encode() for p in range(3) for i in (7, 8, 9))


def test_a_failing_rebalance_callback_raises_from_consume(broker, topic):
    def fail(consumer, tps):
        raise RuntimeError("the table cannot be read")

    consumer = group_consumer(broker, f"g-{uuid.uuid4().hex[:6]}", [topic], on_assign=fail)
    deadline = time.monotonic() + 30
    with pytest.raises(RuntimeError, match="the table cannot be read"):
        while time.monotonic() < deadline:
            consumer.consume(100, 0.1)
    consumer.close()


def test_an_unknown_setting_is_a_one_line_kafka_error():
    with pytest.raises(KafkaException, match="No such configuration property"):
        BatchConsumer({"bootstrap.servers": "127.0.0.1:1", "no.such.setting": 1}, "t")


def test_client_errors_and_log_lines_go_to_the_log_not_stderr(caplog, capfd):
    from k2_assets.dev.broker import free_port

    # nothing listens there; a producer-only setting makes librdkafka warn about the configuration
    config = consumer_config(f"127.0.0.1:{free_port()}", "nobody") | {"linger.ms": 5}
    consumer = BatchConsumer(config, "t")
    consumer.subscribe(["t"])
    messages = lambda: [r.getMessage() for r in caplog.records]  # noqa: E731
    with caplog.at_level("DEBUG", logger="k2.kafka"):
        deadline = time.monotonic() + 10
        while not all(any(text in m for m in messages()) for text in ("brokers are down", "Kafka client FAIL")):
            assert time.monotonic() < deadline, messages()
            consumer.consume(10, 0.1)
    consumer.close()
    assert all(r.name == "k2.kafka" for r in caplog.records)
    assert any(r.levelname == "WARNING" and "brokers are down" in r.getMessage() for r in caplog.records)
    # a failed connection is reported once, as the error above; its log lines are details
    assert all(r.levelname == "DEBUG" for r in caplog.records if "Kafka client FAIL" in r.getMessage())
    assert any(r.levelname == "WARNING" and "CONFWARN" in r.getMessage() for r in caplog.records), messages()
    assert "%" not in capfd.readouterr().err  # librdkafka's own printer writes "%<level>|<time>|<facility>|..."


def test_group_offsets_commit_and_watermarks(broker, topic):
    produce(broker.bootstrap, [(topic, 0, b"{}", None) for _ in range(5)])
    group = f"g-{uuid.uuid4().hex[:6]}"
    consumer = group_consumer(broker, group, [topic])
    read_all(consumer, 5)
    consumer.commit([TopicPartition(topic, 0, 5)], asynchronous=False)
    assert consumer.get_watermark_offsets(TopicPartition(topic, 0))[1] >= 5
    consumer.close()
    with pytest.raises(RuntimeError, match="the consumer is closed"):
        consumer.consume(10, 0.1)
    plain = Consumer(consumer_config(broker.bootstrap, group))
    assert plain.committed([TopicPartition(topic, 0)], timeout=10)[0].offset == 5
    plain.close()


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.binary(max_size=40), max_size=40),
    cut=st.tuples(st.integers(0, 40), st.integers(0, 40)),
    keep=st.lists(st.booleans(), min_size=40, max_size=40),
)
def test_columns_slices_and_filters_keep_every_value_whole(values, cut, keep):
    messages = Messages.of(values, [i % 3 for i in range(len(values))], range(len(values)))
    assert lines(messages.values).to_pybytes() == b"".join(v + b"\n" for v in values)
    start, stop = sorted(min(c, len(values)) for c in cut)
    assert lines(messages.values.slice(start, stop - start)).to_pybytes() == b"".join(v + b"\n" for v in values[start:stop])
    mask = np.array(keep[: len(values)], bool)
    kept = Messages.concat([messages.only(mask), Messages.of([b"tail"], [1], [99])])
    assert [v[:-1] for v in kept.values.to_pylist()] == [v for v, k in zip(values, mask) if k] + [b"tail"]
    assert kept.offsets.tolist() == [i for i, k in enumerate(mask) if k] + [99]
    mine = messages.of_partitions("t", {("t", 1)})
    assert mine.partitions.tolist() == [1] * len(range(1, len(values), 3))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=60), st.sampled_from([b"{}", b"[]", b"\n", b"{\n}", b" "])), max_size=30))
def test_every_value_is_decoded_or_rejected_with_its_bytes(noise):
    good = live_codec.encode(
        live_codec.trade_from_event(
            {"e": "trade", "E": 1, "s": "BTCUSDT", "t": 1, "p": "1.0", "q": "1.0", "T": 1_704_110_400_000, "m": True, "M": True},
            1_704_110_400_000_000,
        )
    )
    values = [good, *noise, good]
    rows, rejected = live_decode.decode_batch(Messages.of(values, [0] * len(values), range(len(values))), "t", source="test")
    assert rows.num_rows + rejected.num_rows == len(values)
    by_offset = dict(zip(rejected.column("kafka_offset").to_pylist(), rejected.column("raw").to_pylist()))
    assert all(by_offset[o] == values[o] for o in by_offset)
    assert set(rows.column("kafka_offset").to_pylist()).isdisjoint(by_offset) and {0, len(values) - 1} <= set(
        rows.column("kafka_offset").to_pylist()
    )
    assert rejected.column("reason").null_count == 0 and pa.types.is_binary(rejected.schema.field("raw").type)
