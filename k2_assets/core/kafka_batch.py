"""A Kafka consumer that hands over each poll as columns: one topic's values as one Arrow array, with numpy
partitions and offsets, and no Python object per message (kafka_batch.c). The live writer reads with it.

It drives librdkafka itself, the copy confluent-kafka's wheel ships, with the same configuration keys, and
speaks confluent-kafka's types where the writer meets them: TopicPartition in the rebalance callbacks and
KafkaException for errors. Messages of other subscribed topics (the dead letters) and errors come as objects.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import confluent_kafka
import numpy as np
import pyarrow as pa
from confluent_kafka import KafkaError, KafkaException, TopicPartition


def _load_librdkafka() -> None:
    """Make the wheel's librdkafka global, so _kafka_batch's undefined symbols bind to it."""
    here = os.path.dirname(confluent_kafka.__file__)
    found = sorted(glob.glob(here + ".libs/librdkafka*.so*") + glob.glob(os.path.join(here, ".libs", "librdkafka*.so*")))
    ctypes.CDLL(found[0] if found else "librdkafka.so.1", mode=ctypes.RTLD_GLOBAL)


_load_librdkafka()
from k2_assets.core._kafka_batch import ffi, lib  # noqa: E402 - after the library it binds to

log = logging.getLogger("k2.kafka")
CONSUMER = 1  # rd_kafka_type_t
ALL_BROKERS_DOWN = -187  # RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN
WARNING_LEVEL = 4  # syslog's LOG_WARNING, as librdkafka's log levels are
NO_CONSUMER_CLOSE = 0x8  # RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE
ASSIGN = -175  # RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS (the other rebalance event is a revocation)
Callback = Callable[["BatchConsumer", list[TopicPartition]], None]


@dataclass(frozen=True)
class Message:
    """A message of another subscribed topic, copied out of librdkafka."""

    topic: str
    partition: int
    offset: int
    value: bytes
    headers: dict[str, bytes]


@dataclass
class Messages:
    """One poll's (or several polls') messages: the consumer's main topic as columns, the rest as objects."""

    values: pa.BinaryArray  # each value followed by a newline, so the data buffer is the values' lines
    partitions: np.ndarray  # int32, one per value
    offsets: np.ndarray  # int64
    others: list[Message] = field(default_factory=list)
    errors: list[KafkaError] = field(default_factory=list)

    def __len__(self) -> int:
        """How many messages (not errors) it holds."""
        return len(self.partitions) + len(self.others)

    @classmethod
    def empty(cls) -> Messages:
        return cls(pa.array([], pa.binary()), np.empty(0, np.int32), np.empty(0, np.int64))

    @classmethod
    def of(cls, values: list[bytes], partitions, offsets) -> Messages:
        """From Python values (tests, repairs): the same columns a poll gives."""
        return cls(
            pa.array([v + b"\n" for v in values], pa.binary()),
            np.asarray(partitions, np.int32),
            np.asarray(offsets, np.int64),
        )

    @classmethod
    def concat(cls, parts: list[Messages]) -> Messages:
        parts = [p for p in parts if len(p) or p.errors]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return cls.empty()
        return cls(
            pa.concat_arrays([p.values for p in parts]),
            np.concatenate([p.partitions for p in parts]),
            np.concatenate([p.offsets for p in parts]),
            [m for p in parts for m in p.others],
            [e for p in parts for e in p.errors],
        )

    def only(self, keep: np.ndarray) -> Messages:
        """The main topic's messages where `keep` is true (the others and errors as they are)."""
        if keep.all():
            return self
        return Messages(self.values.filter(pa.array(keep)), self.partitions[keep], self.offsets[keep], self.others, self.errors)

    def of_partitions(self, topic: str, keys) -> Messages:
        """Only the messages of these (topic, partition) keys; errors are dropped."""
        mine = np.array(sorted(p for t, p in keys if t == topic), np.int32)
        kept = self.only(np.isin(self.partitions, mine))
        return Messages(kept.values, kept.partitions, kept.offsets, [m for m in self.others if (m.topic, m.partition) in keys])


def lines(values: pa.BinaryArray) -> pa.Buffer:
    """Values that each end in a newline (Messages.values, or a slice of them) as one buffer of lines, not copied."""
    starts = np.frombuffer(values.buffers()[1], np.int32)
    first, last = int(starts[values.offset]), int(starts[values.offset + len(values)])
    return values.buffers()[2][first:last] if last > first else pa.py_buffer(b"")


class BatchConsumer:
    """A consumer-group member over librdkafka; `consume` returns Messages for `topic`, the main topic."""

    def __init__(self, config: dict, topic: str):
        self.topic = topic
        self._topic = topic.encode()
        self._handle = ffi.new_handle(self)
        self._callbacks: dict[str, Callback] = {}
        self._failure: BaseException | None = None
        self._assigned_in_callback = False
        self._size = 0
        self._buffers = None
        conf = lib.rd_kafka_conf_new()
        error = ffi.new("char[]", 512)
        for key, value in config.items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            if lib.rd_kafka_conf_set(conf, key.encode(), text.encode(), error, 512) != 0:
                lib.rd_kafka_conf_destroy(conf)
                raise KafkaException(KafkaError(KafkaError._INVALID_ARG, _text(error)))
        lib.rd_kafka_conf_set_opaque(conf, self._handle)
        lib.rd_kafka_conf_set_rebalance_cb(conf, lib.k2_rebalance)
        lib.rd_kafka_conf_set_error_cb(conf, lib.k2_error)
        # Log lines too go to the log, and from the consuming thread's poll (log.queue), not from librdkafka's
        # own threads: else they are printed to stderr, one per reconnect attempt.
        lib.rd_kafka_conf_set(conf, b"log.queue", b"true", error, 512)
        lib.rd_kafka_conf_set_log_cb(conf, lib.k2_log)
        self._rk = lib.rd_kafka_new(CONSUMER, conf, error, 512)  # owns conf from here on, failing or not
        if self._rk == ffi.NULL:
            raise KafkaException(KafkaError(KafkaError._INVALID_ARG, _text(error)))
        lib.rd_kafka_poll_set_consumer(self._rk)
        lib.rd_kafka_set_log_queue(self._rk, ffi.NULL)  # the main queue, which now feeds the consumer's
        self._queue = lib.rd_kafka_queue_get_consumer(self._rk)

    def subscribe(
        self,
        topics: list[str],
        on_assign: Callback | None = None,
        on_revoke: Callback | None = None,
        on_lost: Callback | None = None,
    ) -> None:
        """Join the group for `topics`; without on_lost, a lost assignment goes to on_revoke."""
        self._callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost or on_revoke}
        names = lib.rd_kafka_topic_partition_list_new(len(topics))
        try:
            for name in topics:
                lib.rd_kafka_topic_partition_list_add(names, name.encode(), -1)
            _check(lib.rd_kafka_subscribe(self._live(), names))
        finally:
            lib.rd_kafka_topic_partition_list_destroy(names)

    def consume(self, num_messages: int, timeout: float) -> Messages:
        """Up to num_messages messages, waiting up to `timeout` seconds for the first (the GIL is released)."""
        messages, kinds = self._arrays(num_messages)
        size = ffi.new("int64_t *")
        self._live()
        n = lib.k2_consume(self._queue, int(timeout * 1000), messages, num_messages, self._topic, kinds, size)
        failure, self._failure = self._failure, None
        if n < 0:
            raise KafkaException(KafkaError(KafkaError._FAIL, "consuming from the queue failed"))
        data = np.empty(size[0], np.uint8)
        starts = np.empty(n + 1, np.int32)
        partitions, offsets = np.empty(n, np.int32), np.empty(n, np.int64)
        taken = lib.k2_take(
            messages, n, kinds, ffi.from_buffer(data), ffi.from_buffer("int32_t[]", starts),
            ffi.from_buffer("int32_t[]", partitions), ffi.from_buffer("int64_t[]", offsets),
        )  # fmt: skip
        others, errors = self._rest(messages, n) if taken < n else ([], [])
        if failure is not None:  # a rebalance callback raised: as confluent-kafka does, out of consume
            raise failure
        values = pa.Array.from_buffers(pa.binary(), taken, [None, pa.py_buffer(starts[: taken + 1]), pa.py_buffer(data)])
        return Messages(values, partitions[:taken], offsets[:taken], others, errors)

    def _arrays(self, size: int):
        if size > self._size:
            self._buffers = ffi.new("rd_kafka_message_t *[]", size), ffi.new("uint8_t[]", size)
            self._size = size
        return self._buffers

    def _rest(self, messages, n: int) -> tuple[list[Message], list[KafkaError]]:
        """The messages k2_take left (other topics' and errors) as objects, freed."""
        others, errors = [], []
        for i in range(n):
            m = messages[i]
            if m == ffi.NULL:
                continue
            body = bytes(ffi.buffer(m.payload, m.len)) if m.payload != ffi.NULL else b""
            if m.err:
                errors.append(KafkaError(m.err, body.decode("utf-8", "replace") or _text(lib.rd_kafka_err2str(m.err))))
            else:
                topic = _text(lib.rd_kafka_topic_name(m.rkt))
                others.append(Message(topic, m.partition, m.offset, body, _headers(m)))
            lib.rd_kafka_message_destroy(m)
        return others, errors

    def assign(self, tps: list[TopicPartition]) -> None:
        """Read these partitions from their offsets, outside any group's assignment."""
        _check(lib.rd_kafka_assign(self._live(), _partition_list(tps)))

    def incremental_assign(self, tps: list[TopicPartition]) -> None:
        self._assigned_in_callback = True
        _raise_error(lib.rd_kafka_incremental_assign(self._live(), _partition_list(tps)))

    def incremental_unassign(self, tps: list[TopicPartition]) -> None:
        self._assigned_in_callback = True
        _raise_error(lib.rd_kafka_incremental_unassign(self._live(), _partition_list(tps)))

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> None:
        _check(lib.rd_kafka_commit(self._live(), _partition_list(offsets), 1 if asynchronous else 0))

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool = True) -> tuple[int, int]:
        """The locally cached low and high watermarks (-1 where none is known yet)."""
        low, high = ffi.new("int64_t *"), ffi.new("int64_t *")
        _check(lib.rd_kafka_get_watermark_offsets(self._live(), tp.topic.encode(), tp.partition, low, high))
        return low[0], high[0]

    def close(self) -> None:
        """Leave the group (revocations are served on the way out) and free the handle."""
        if self._rk == ffi.NULL:
            return
        lib.rd_kafka_queue_destroy(self._queue)
        try:
            _check(lib.rd_kafka_consumer_close(self._rk))
        finally:
            lib.rd_kafka_destroy(self._rk)
            self._rk = ffi.NULL
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def _live(self):
        if self._rk == ffi.NULL:
            raise RuntimeError("the consumer is closed")
        return self._rk

    def __del__(self) -> None:
        """A consumer dropped unclosed: freed without leaving the group (no callback runs at collection time);
        its partitions move on after the session timeout."""
        if getattr(self, "_rk", ffi.NULL) != ffi.NULL:
            lib.rd_kafka_queue_destroy(self._queue)
            lib.rd_kafka_destroy_flags(self._rk, NO_CONSUMER_CLOSE)
            self._rk = ffi.NULL

    def _rebalance(self, err: int, partitions) -> None:
        tps = [
            TopicPartition(_text(e.topic), e.partition, e.offset) for e in (partitions.elems[i] for i in range(partitions.cnt))
        ]
        if err == ASSIGN:
            kind = "assign"
        else:
            kind = "lost" if lib.rd_kafka_assignment_lost(self._rk) else "revoke"
        self._assigned_in_callback = False
        try:
            callback = self._callbacks.get(kind)
            if callback is not None:
                callback(self, tps)
        except BaseException as exc:  # noqa: BLE001 - raised again from consume(), as confluent-kafka does
            self._failure = exc
        if not self._assigned_in_callback:  # what librdkafka needs either way (confluent-kafka does it too)
            try:
                (self.incremental_assign if err == ASSIGN else self.incremental_unassign)(tps)
            except KafkaException as exc:
                self._failure = self._failure or exc


@ffi.def_extern()
def k2_error(rk, err, reason, opaque) -> None:
    """librdkafka's client-wide errors (it retries them itself): to the log, not its own stderr printer, which
    would print one line per reconnect attempt. Every broker down is worth a warning; the rest are details."""
    log.log(logging.WARNING if err == ALL_BROKERS_DOWN else logging.DEBUG, "Kafka client: %s", _text(reason))


@ffi.def_extern()
def k2_log(rk, level, facility, line) -> None:
    """librdkafka's log lines (syslog levels): warnings and worse as warnings, except broker connection failures
    (facility FAIL), which error_cb reports already; the rest as details."""
    facility = _text(facility)
    warn = level <= WARNING_LEVEL and facility != "FAIL"
    log.log(logging.WARNING if warn else logging.DEBUG, "Kafka client %s: %s", facility, _text(line))


@ffi.def_extern()
def k2_rebalance(rk, err, partitions, opaque) -> None:
    ffi.from_handle(opaque)._rebalance(err, partitions)


def _partition_list(tps: list[TopicPartition]):
    found = lib.rd_kafka_topic_partition_list_new(max(1, len(tps)))
    for tp in tps:
        lib.rd_kafka_topic_partition_list_add(found, tp.topic.encode(), tp.partition).offset = tp.offset
    return ffi.gc(found, lib.rd_kafka_topic_partition_list_destroy)


def _headers(m) -> dict[str, bytes]:
    headers = ffi.new("rd_kafka_headers_t **")
    if lib.rd_kafka_message_headers(m, headers):
        return {}
    found, i = {}, 0
    name, value, size = ffi.new("char **"), ffi.new("void **"), ffi.new("size_t *")
    while lib.rd_kafka_header_get_all(headers[0], i, name, value, size) == 0:
        found[_text(name[0])] = bytes(ffi.buffer(value[0], size[0])) if value[0] != ffi.NULL else b""
        i += 1
    return found


def _text(chars) -> str:
    return ffi.string(chars).decode("utf-8", "replace")


def _check(err: int) -> None:
    if err:
        raise KafkaException(KafkaError(err, _text(lib.rd_kafka_err2str(err))))


def _raise_error(error) -> None:
    if error == ffi.NULL:
        return
    code, text = lib.rd_kafka_error_code(error), _text(lib.rd_kafka_error_string(error))
    lib.rd_kafka_error_destroy(error)
    raise KafkaException(KafkaError(code, text))
