"""Which Kafka partitions a LiveWriter owns in its consumer group, and where each resumes: at the offsets the tables record.

Ownership is only the fast path (the fence in live_writer.py is what keeps writers exactly once): every assignment starts
a new generation, and what was read under an older one is dropped. The group's own offsets are for lag monitoring only.
"""

from __future__ import annotations

import json
import logging
import time

from confluent_kafka import KafkaException, TopicPartition

from k2_assets.core import offsets
from k2_assets.core.kafka import holds_offset
from k2_assets.core.kafka_batch import BatchConsumer
from k2_assets.core.offsets import OFFSETS_KEY

log = logging.getLogger("k2.writer")


class OffsetBeyondEnd(RuntimeError):
    """The table records an offset its partition no longer reaches: the topic was truncated."""


class Ownership:
    """LiveWriter's consumer-group side, mixed into it: joining, assignments, revocations and rewinds."""

    def _start_from_table(self) -> None:
        def read():
            self.trades.refresh()
            self.rejected.refresh()
            state = offsets.latest_property(self.trades, self.tracker_key)
            return state, offsets.keys_for_topic(self.trades, OFFSETS_KEY, self.topic)

        state, keys = self.health.call(read, "reading market.trades", deadline=self._give_up_at, stop=self._stop)
        if state:
            self.tracker.restore(json.loads(state))
        self.seen.in_step.append(self.trades.metadata.current_snapshot_id)
        others = keys - {self.offsets_key}
        if others and self.offsets_key not in keys:
            self.metrics.incarnation_switches.inc()
            log.warning(
                "topic %s is a new incarnation (%s); market.trades holds offsets of %s only: reading the new one "
                "from its beginning",
                self.topic,
                self.incarnation,
                ", ".join(sorted(k.rsplit("@", 1)[1] for k in others)),
            )

    def _positions(self, tps: list[TopicPartition]) -> dict[tuple[str, int], int]:
        """Where each partition resumes: the offsets the tables record, checked against the partition's end."""

        def read():
            trades = self.trades.catalog.load_table(self.trades.name())  # own objects: the writing thread uses the others
            rejected = self.rejected.catalog.load_table(self.rejected.name())
            return (
                offsets.recorded_offsets(trades, self.offsets_key),
                offsets.recorded_offsets(rejected, self.rejects_key),
                offsets.recorded_offsets(rejected, self.dead_key),
            )

        trade_offsets, marks, dead = self.health.call(
            read, "reading the recorded offsets", deadline=self._give_up_at, stop=self._stop
        )
        self.rejects_written.update({p: o for p, o in marks.items()})
        found = {}
        for tp in tps:
            recorded = (trade_offsets if tp.topic == self.topic else dead).get(tp.partition, 0)
            if recorded and not holds_offset(self.bootstrap, tp.topic, tp.partition, recorded - 1):
                self.metrics.offsets_beyond_end.inc()
                raise OffsetBeyondEnd(
                    f"partition {tp.partition} of {tp.topic} ({self.incarnation}) ends before offset {recorded}, which the "
                    "table records: the topic was truncated under the same id; nothing is read from it until an operator "
                    "decides (docs/live-path.md, 'Offsets beyond the end')"
                )
            found[(tp.topic, tp.partition)] = recorded
        return found

    def _take(self, tps: list[TopicPartition]) -> None:
        """Own these partitions from the table's offsets (a new generation: older reads of them are dropped)."""
        found = self._positions(tps)
        with self._lock:
            self._generation += 1
            for tp in tps:
                key = (tp.topic, tp.partition)
                tp.offset = found[key]
                self._owned[key] = self._generation
                if tp.topic == self.topic:
                    self.position[tp.partition] = self.committed[tp.partition] = found[key]
                else:
                    self.dead_letter_position[tp.partition] = found[key]
            kept = self._owned.keys() - found.keys()
            self._pending = [m.of_partitions(self.topic, kept) for m in self._pending]

    def _on_assign(self, consumer: BatchConsumer, tps: list[TopicPartition]) -> None:
        try:
            if tps:
                self._take(tps)
                consumer.incremental_assign(tps)
                self.metrics.partitions_owned.set(sum(1 for t, _ in self._owned if t == self.topic))
                log.info("assigned %s", _names(tps))
        finally:
            self._joined.set()

    def _on_revoke(self, consumer: BatchConsumer, tps: list[TopicPartition]) -> None:
        """A partition that moves to another writer is not committed by this one from here on."""
        with self._lock:
            for tp in tps:
                self._owned.pop((tp.topic, tp.partition), None)
                if tp.topic == self.topic:
                    self.position.pop(tp.partition, None)
                    self.committed.pop(tp.partition, None)
                else:
                    self.dead_letter_position.pop(tp.partition, None)
            self._pending = [m.of_partitions(self.topic, self._owned.keys()) for m in self._pending]
        try:
            consumer.incremental_unassign(tps)
        except KafkaException:
            pass  # partitions lost with the session are unassigned already
        self.metrics.partitions_owned.set(sum(1 for t, _ in self._owned if t == self.topic))
        log.info("revoked %s", _names(tps))

    def join(self, timeout: float) -> None:
        """Wait for the group's first assignment (messages that arrive meanwhile are kept for the first batch)."""
        deadline = time.monotonic() + timeout
        while not self._joined.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no partition assignment from consumer group {self.group_id} on {self.bootstrap} within {timeout:.0f} s"
                )
            got = self._good(self.consumer.consume(min(1000, self.max_batch_rows), timeout=0.1))  # may run _on_assign
            with self._lock:
                self._pending.append(got.of_partitions(self.topic, self._owned.keys()))

    def _rewind(self) -> None:
        """After a discarded or failed batch: every owned partition back to the table's offsets."""
        with self._lock:
            tps = [TopicPartition(t, p) for t, p in self._owned]
            self._pending = []

        def refresh() -> None:  # both tables the writer fences on: a stale handle is fenced on every commit, for good
            self.trades.refresh()
            self.rejected.refresh()

        self.health.call(refresh, "reading market.trades and market.rejected", deadline=self._give_up_at, stop=self._stop)
        self.seen.clear()
        self.seen.in_step.append(self.trades.metadata.current_snapshot_id)
        if tps:
            self._take(tps)
            self.consumer.incremental_unassign(tps)
            self.consumer.incremental_assign(tps)

    def _commit_group_offsets(self, wait: bool = False) -> None:
        """Commit the consumer group's offsets to the table's (lag monitoring only) and update the lag
        gauges. Called from the thread that consumes: the table's offsets are the truth, so a failed
        commit here loses nothing."""
        offsets_, self._group_commit = self._group_commit, None
        if not offsets_:
            return
        try:
            self.consumer.commit(offsets=[TopicPartition(self.topic, p, o) for p, o in offsets_.items()], asynchronous=not wait)
        except KafkaException as exc:
            log.warning("consumer-group offsets not committed (lag monitoring only): %s", exc)
        for p, position in offsets_.items():
            _, high = self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), cached=True)
            if high >= 0:
                self.metrics.lag.labels(str(p)).set(max(0, high - position))


def _names(tps: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in tps)
