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

from k2_assets.core.kafka_batch import Message, Messages


@dataclass
class Batch:
    """A consumed micro-batch: the trade topic's messages as columns, the dead letters as objects, and the
    assignment generation of each partition it holds (a batch read under an older one is dropped)."""

    messages: Messages
    generations: dict[tuple[str, int], int]

    @property
    def partitions(self) -> np.ndarray:
        return self.messages.partitions

    @property
    def offsets(self) -> np.ndarray:
        return self.messages.offsets

    @property
    def dead(self) -> list[Message]:
        return self.messages.others


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
                batch = Batch(messages, generations) if len(messages) else None
                _hand_over(out, batch, stop)
                if batch is None:
                    return
            _hand_over(out, None, stop)
        except BaseException as exc:  # noqa: BLE001 - raised again in drain's thread
            _hand_over(out, exc, stop)

    def _good(self, messages: Messages) -> Messages:
        """The messages; a Kafka error (not an end of partition) raises."""
        for error in messages.errors:
            if error.code() != KafkaError._PARTITION_EOF:
                raise RuntimeError(f"Kafka error while consuming {self.topic}: {error}")
        return messages

    def _collect(self, deadline: float, idle_seconds: float, stop: threading.Event) -> tuple[Messages, dict]:
        with self._lock:
            parts, self._pending = self._pending, []
            owned = dict(self._owned)
        count = sum(len(p) for p in parts)
        started = time.monotonic()
        idle_since = time.monotonic()
        while count < self.max_batch_rows and not stop.is_set() and not self._stop.is_set():
            now = time.monotonic()
            if now >= deadline or now - started >= self.max_batch_seconds or now - idle_since >= idle_seconds:
                break
            self._commit_group_offsets()
            polled = self._good(self.consumer.consume(min(50_000, self.max_batch_rows - count), timeout=0.1))
            with self._lock:
                if self._owned != owned:  # a rebalance ran inside consume(): what was read under the old owners goes
                    unchanged = {k for k, g in owned.items() if self._owned.get(k) == g}
                    parts = [p.of_partitions(self.topic, unchanged) for p in parts]
                    owned = dict(self._owned)
            if len(polled):
                parts.append(polled.of_partitions(self.topic, owned.keys()))
                idle_since = time.monotonic()
            count = sum(len(p) for p in parts)
        messages = Messages.concat(parts)
        return messages, owned


def _hand_over(out: queue.Queue, item, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return
        except queue.Full:
            pass
