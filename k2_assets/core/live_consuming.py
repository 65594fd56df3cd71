"""LiveWriter's consuming thread: it reads the next micro-batch from Kafka while the writer's thread commits the current one.

Arrow's decoding and Parquet writing release the GIL, so the two overlap on two cores.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
from confluent_kafka import KafkaError


@dataclass
class Batch:
    """A consumed micro-batch: the trade topic's messages as columns, the dead letters as messages, and
    the assignment generation of each partition it holds (a batch read under an older one is dropped)."""

    values: list[bytes]
    partitions: np.ndarray  # int64, one per value
    offsets: np.ndarray
    dead: list
    generations: dict[tuple[str, int], int]

    @classmethod
    def of(cls, messages: list, dead_letter_topic: str, generations: dict[tuple[str, int], int]) -> Batch:
        # One pass, each accessor called once per message: at 100k messages a second this loop is the consuming
        # thread's time, and the thread shares the GIL with the decoding.
        values, partitions, offsets, dead = [], [], [], []
        value, partition, offset = values.append, partitions.append, offsets.append
        for m in messages:
            if m.topic() == dead_letter_topic:
                dead.append(m)
                continue
            value(m.value() or b"")
            partition(m.partition())
            offset(m.offset())
        return cls(values, np.array(partitions, np.int64), np.array(offsets, np.int64), dead, generations)

    def only(self, keep: np.ndarray) -> Batch:
        return Batch(
            [v for v, k in zip(self.values, keep.tolist()) if k],
            self.partitions[keep],
            self.offsets[keep],
            self.dead,
            self.generations,
        )


class Consuming:
    """LiveWriter's reading side, mixed into it: the consuming thread and the batches it hands over."""

    def _drain_until(self, deadline: float, idle_seconds: float, reports: list, on_batch) -> None:
        batches: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()
        consuming = threading.Thread(
            target=self._prefetch, args=(deadline, idle_seconds, batches, stop), name="k2-writer-consume", daemon=True
        )
        consuming.start()
        try:
            while True:
                batch = batches.get()
                if isinstance(batch, BaseException):
                    raise batch
                if batch is None:
                    return
                report = self._write(batch)
                if report is not None:
                    reports.append(report)
                    if on_batch is not None:
                        on_batch(report)
        finally:
            stop.set()
            consuming.join()

    def _prefetch(self, deadline: float, idle_seconds: float, out: queue.Queue, stop: threading.Event) -> None:
        """The consuming thread: micro-batches into `out`, then None once the topic is idle or time is up."""
        try:
            while not stop.is_set() and not self._stop.is_set():
                messages, generations = self._collect(deadline, idle_seconds, stop)
                batch = Batch.of(messages, self.dead_letter_topic, generations) if messages else None
                _hand_over(out, batch, stop)
                if batch is None:
                    return
            _hand_over(out, None, stop)
        except BaseException as exc:  # noqa: BLE001 - raised again in drain's thread
            _hand_over(out, exc, stop)

    def _good(self, messages: list) -> list:
        good = []
        for m in messages:
            error = m.error()
            if error is None:
                good.append(m)
            elif error.code() != KafkaError._PARTITION_EOF:
                raise RuntimeError(f"Kafka error while consuming {self.topic}: {error}")
        return good

    def _keep_owned(self, messages: list, owned: dict, into: list) -> int:
        """Append to `into` the messages of owned partitions, in one pass; how many messages (not events) were read.
        A Kafka error (not an end of partition) raises."""
        keep, events = into.append, 0
        for m in messages:
            if m.error() is not None:
                self._good([m])
                events += 1
            elif (m.topic(), m.partition()) in owned:
                keep(m)
        return len(messages) - events

    def _collect(self, deadline: float, idle_seconds: float, stop: threading.Event) -> tuple[list, dict]:
        with self._lock:
            batch, self._pending = self._pending, []
            owned = dict(self._owned)
        started = time.monotonic()
        idle_since = time.monotonic()
        while len(batch) < self.max_batch_rows and not stop.is_set() and not self._stop.is_set():
            now = time.monotonic()
            if now >= deadline or now - started >= self.max_batch_seconds or now - idle_since >= idle_seconds:
                break
            self._commit_group_offsets()
            messages = self.consumer.consume(min(50_000, self.max_batch_rows - len(batch)), timeout=0.1)
            with self._lock:
                if self._owned != owned:  # a rebalance ran inside consume(): what was read under the old owners goes
                    changed = {k for k in owned.keys() | self._owned.keys() if owned.get(k) != self._owned.get(k)}
                    batch = [m for m in batch if (m.topic(), m.partition()) not in changed]
                    owned = dict(self._owned)
            if self._keep_owned(messages, owned, batch):
                idle_since = time.monotonic()
        return batch, owned


def _hand_over(out: queue.Queue, item, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return
        except queue.Full:
            pass
