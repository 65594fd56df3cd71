"""Kafka -> Iceberg micro-batches, exactly once, with any number of writers at once.

Exactly once rests on Iceberg, not on Kafka transactions (which the embedded broker does not
isolate). Every commit to `market.trades` records, in its snapshot summary, the next Kafka offset to
read for each partition it covers, under a key naming the topic's incarnation (`offsets.py`). A
writer resumes each partition it is assigned from the offset the table records.

Writers share the topic through a Kafka consumer group (cooperative-sticky): each partition has one
owner at a time, and a writer that loses a partition stops committing it at once. Ownership is only
the fast path; correctness comes from the fence: every commit is conditional on the table's offsets
for the batch's partitions still being where the batch started, checked against the very snapshot
the catalog applies the commit on. A writer whose fence fails (a zombie resumed after SIGSTOP, a
member that missed a rebalance) discards its batch, reloads its position from the table and goes on.

Rejected messages go to `market.rejected` before the trades, in a conditional commit of their own
that records how far rejects were written; a replay skips rejects below that mark. Trades are also
deduplicated by content: the writer never inserts a (symbol, trade id) the partition already holds
(`live_dedup.py`). Catalog and object-store outages are ridden out with retries (`outage.py`).
Consumer-group offsets are committed last, for lag monitoring only.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from pyiceberg.exceptions import CommitFailedException, ValidationException
from pyiceberg.table import Table

from k2_assets.core import integrity, live_codec, offsets, schemas, writer
from k2_assets.core.kafka import DEFAULT_SESSION_TIMEOUT_MS, consumer_config, ensure_topics, holds_offset, topic_incarnation
from k2_assets.core.live_dedup import KEYS_KEY, SeenIndex, groups, keys_property
from k2_assets.core.metrics import WriterMetrics, serve
from k2_assets.core.offsets import BATCH_KEY, OFFSETS_KEY, REJECTED_KEY, TRACKER_KEY, Fenced, FencedTable, OffsetIndex
from k2_assets.core.outage import StoreHealth
from k2_assets.core.sequence import SequenceTracker
from k2_assets.core.text import one_line

log = logging.getLogger("k2.writer")
MAX_TRACKER_STATE = 64 * 1024
SOURCE = "binance_trades"


class OffsetBeyondEnd(RuntimeError):
    """The table records an offset its partition no longer reaches: the topic was truncated."""


@dataclass
class BatchReport:
    """One committed micro-batch, as the sensor reports it."""

    consumed: int
    written: int
    duplicates: int
    rejected: int
    dead_lettered: int  # producer dead letters moved to market.rejected (not counted in consumed)
    sequence_events: dict[str, int]  # in_order, gap, duplicate, out_of_order, ... as the tracker saw the batch
    offset_ranges: dict[int, tuple[int, int]]  # partition -> [first, last] offsets consumed
    snapshot_id: int | None
    partitions: dict[str, int]  # trade_date -> rows written
    latency_seconds: dict[str, float]  # exchange time -> committed, p50 / max over the batch
    committed_at: datetime


@dataclass
class _Batch:
    """A consumed micro-batch: the trade topic's messages as columns, the dead letters as messages, and
    the assignment generation of each partition it holds (a batch read under an older one is dropped)."""

    values: list[bytes]
    partitions: np.ndarray  # int64, one per value
    offsets: np.ndarray
    dead: list
    generations: dict[tuple[str, int], int]

    @classmethod
    def of(cls, messages: list, dead_letter_topic: str, generations: dict[tuple[str, int], int]) -> _Batch:
        dead = [m for m in messages if m.topic() == dead_letter_topic]
        if dead:
            messages = [m for m in messages if m.topic() != dead_letter_topic]
        n = len(messages)
        return cls([m.value() or b"" for m in messages], np.fromiter((m.partition() for m in messages), np.int64, n),
                   np.fromiter((m.offset() for m in messages), np.int64, n), dead, generations)

    def only(self, keep: np.ndarray) -> _Batch:
        return _Batch([v for v, k in zip(self.values, keep.tolist()) if k], self.partitions[keep], self.offsets[keep], self.dead,
                      self.generations)


def _hand_over(out: queue.Queue, item, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return
        except queue.Full:
            pass


class LiveWriter:
    """Drains a Kafka topic into market.trades in micro-batches (see the module docstring)."""

    def __init__(self, trades: Table, rejected: Table, bootstrap: str, *, topic: str = live_codec.TOPIC,
                 group_id: str | None = None, max_batch_rows: int = 250_000,
                 max_batch_seconds: float = 2.0, dead_letter_topic: str | None = None, metrics: WriterMetrics | None = None,
                 gaps: Table | None = None, join_timeout: float = 60.0, stall_after: float = 60.0,
                 session_timeout_ms: int = DEFAULT_SESSION_TIMEOUT_MS, give_up_after: float | None = None):
        self.trades, self.rejected, self.gaps = FencedTable.of(trades), FencedTable.of(rejected), gaps
        self.bootstrap, self.topic = bootstrap, topic
        # The producer's dead letters (frames that never became trades) end in market.rejected too.
        self.dead_letter_topic = dead_letter_topic if dead_letter_topic is not None else topic + ".dlq"
        self.group_id = group_id or f"k2-writer.{topic}"  # one group per topic: the sensor and `k2 writer` share it
        self.max_batch_rows = max_batch_rows
        self.max_batch_seconds = max_batch_seconds
        self.metrics = metrics or WriterMetrics()
        self.health = StoreHealth(self.metrics.store_state, stall_after)
        ensure_topics(bootstrap, {self.dead_letter_topic: 1})
        self.incarnation = topic_incarnation(bootstrap, topic)
        self.offsets_key = offsets.key(OFFSETS_KEY, topic, self.incarnation)
        self.rejects_key = offsets.key(REJECTED_KEY, topic, self.incarnation)
        self.dead_key = offsets.key(REJECTED_KEY, self.dead_letter_topic, topic_incarnation(bootstrap, self.dead_letter_topic))
        self._recorded = {key: OffsetIndex(key) for key in (self.offsets_key, self.rejects_key, self.dead_key)}
        self.seen = SeenIndex(live_codec.EXCHANGE)
        self.tracker = SequenceTracker(live_codec.EXCHANGE, resets_each_session=False)
        self._lock = threading.RLock()
        self._owned: dict[tuple[str, int], int] = {}  # (topic, partition) -> assignment generation
        self._generation = 0
        self.position: dict[int, int] = {}  # owned trade partition -> next offset this writer has handled
        self.committed: dict[int, int] = {}  # owned trade partition -> the offset market.trades records
        self.rejects_written: dict[int, int] = {}  # reject marks, as the table records them
        self.dead_letter_position: dict[int, int] = {}
        self.touched: set[tuple[date, str]] = set()  # (day, symbol) written since the last gap reconcile
        self._pending: list = []  # messages consumed while joining the group
        self._joined = threading.Event()
        self._stop = threading.Event()
        # Store outages met while starting are retried this long (None: until stop()); drain() sets its own.
        self._give_up_at: float | None = None if give_up_after is None else time.monotonic() + give_up_after
        self._group_commit: dict[int, int] | None = None  # set after each Iceberg commit, done by the consuming thread
        self._start_from_table()
        self.consumer = Consumer(consumer_config(bootstrap, self.group_id, session_timeout_ms))
        self.consumer.subscribe([topic, self.dead_letter_topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_revoke)
        self.join(join_timeout)

    # -- positions from the table ---------------------------------------------------------------

    def _start_from_table(self) -> None:
        def read():
            self.trades.refresh()
            self.rejected.refresh()
            return offsets.latest_property(self.trades, TRACKER_KEY), offsets.keys_for_topic(self.trades, OFFSETS_KEY, self.topic)

        state, keys = self.health.call(read, "reading market.trades", deadline=self._give_up_at, stop=self._stop)
        if state:
            self.tracker.restore(json.loads(state))
        self.seen.in_step.append(self.trades.metadata.current_snapshot_id)
        others = keys - {self.offsets_key}
        if others and self.offsets_key not in keys:
            self.metrics.incarnation_switches.inc()
            log.warning("topic %s is a new incarnation (%s); market.trades holds offsets of %s only: reading the new one "
                        "from its beginning", self.topic, self.incarnation, ", ".join(sorted(k.rsplit("@", 1)[1] for k in others)))

    def _positions(self, tps: list[TopicPartition]) -> dict[tuple[str, int], int]:
        """Where each partition resumes: the offsets the tables record, checked against the partition's end."""
        def read():
            trades = self.trades.catalog.load_table(self.trades.name())  # own objects: the writing thread uses the others
            rejected = self.rejected.catalog.load_table(self.rejected.name())
            return (offsets.recorded_offsets(trades, self.offsets_key), offsets.recorded_offsets(rejected, self.rejects_key),
                    offsets.recorded_offsets(rejected, self.dead_key))

        trade_offsets, marks, dead = self.health.call(read, "reading the recorded offsets", deadline=self._give_up_at, stop=self._stop)
        self.rejects_written.update({p: o for p, o in marks.items()})
        found = {}
        for tp in tps:
            recorded = (trade_offsets if tp.topic == self.topic else dead).get(tp.partition, 0)
            if recorded and not holds_offset(self.bootstrap, tp.topic, tp.partition, recorded - 1):
                self.metrics.offsets_beyond_end.inc()
                raise OffsetBeyondEnd(
                    f"partition {tp.partition} of {tp.topic} ({self.incarnation}) ends before offset {recorded}, which the table "
                    "records: the topic was truncated under the same id; nothing is read from it until an operator decides "
                    "(docs/live-path.md, 'Offsets beyond the end')")
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
            self._pending = [m for m in self._pending if self._owned.get((m.topic(), m.partition())) and (m.topic(), m.partition()) not in found]

    def _on_assign(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        try:
            if tps:
                self._take(tps)
                consumer.incremental_assign(tps)
                self.metrics.partitions_owned.set(sum(1 for t, _ in self._owned if t == self.topic))
                log.info("assigned %s", _names(tps))
        finally:
            self._joined.set()

    def _on_revoke(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        """A partition that moves to another writer is not committed by this one from here on."""
        with self._lock:
            for tp in tps:
                self._owned.pop((tp.topic, tp.partition), None)
                if tp.topic == self.topic:
                    self.position.pop(tp.partition, None)
                    self.committed.pop(tp.partition, None)
                else:
                    self.dead_letter_position.pop(tp.partition, None)
            self._pending = [m for m in self._pending if (m.topic(), m.partition()) in self._owned]
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
                raise TimeoutError(f"no partition assignment from consumer group {self.group_id} on {self.bootstrap} "
                                   f"within {timeout:.0f} s")
            got = self._good(self.consumer.consume(min(1000, self.max_batch_rows), timeout=0.1))  # may run _on_assign
            with self._lock:
                self._pending.extend(got)

    def _rewind(self) -> None:
        """After a discarded or failed batch: every owned partition back to the table's offsets."""
        with self._lock:
            tps = [TopicPartition(t, p) for t, p in self._owned]
            self._pending = []
        self.health.call(self.trades.refresh, "reading market.trades", deadline=self._give_up_at, stop=self._stop)
        self.seen.clear()
        self.seen.in_step.append(self.trades.metadata.current_snapshot_id)
        if tps:
            self._take(tps)
            self.consumer.incremental_unassign(tps)
            self.consumer.incremental_assign(tps)

    def stop(self) -> None:
        """Ask a drain in progress to stop (a signal handler may call it): retries end, the batch in hand is not committed."""
        self._stop.set()

    def close(self) -> None:
        with self._lock:
            self._group_commit = {p: o for p, o in self.committed.items()}  # synchronously, so the group ends where the table is
        self._commit_group_offsets(wait=True)
        self.consumer.close()

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

    # -- draining -------------------------------------------------------------------------------

    def drain(self, seconds: float, idle_seconds: float = 0.5, on_batch=None, give_up_after: float | None = None) -> list[BatchReport]:
        """Write micro-batches for up to `seconds`, stopping early once the topic is idle.

        A thread consumes the next micro-batch while this one is decoded and committed: Arrow's
        decoding and Parquet writing release the GIL, so the two overlap on two cores. A batch
        another writer won (Fenced) is discarded and the drain goes on from the table's offsets.
        Store outages are retried until `give_up_after` seconds have passed (None: until stop())."""
        reports: list[BatchReport] = []
        deadline = time.monotonic() + seconds
        self._give_up_at = None if give_up_after is None else time.monotonic() + give_up_after
        while not self._stop.is_set():
            try:
                self._drain_until(deadline, idle_seconds, reports, on_batch)
                break
            except Fenced as exc:
                self.metrics.fenced.inc()
                log.warning("batch discarded: %s; resuming from the table's offsets", exc)
                self._rewind()
                if time.monotonic() >= deadline:
                    break
            except BaseException:
                try:
                    self._rewind()
                except Exception:  # noqa: BLE001 - the original failure is the one to raise; the next writer re-reads the table
                    log.exception("could not re-read the committed offsets after a failed batch; this writer must be discarded")
                raise
        self._commit_group_offsets()
        return reports

    def _drain_until(self, deadline: float, idle_seconds: float, reports: list, on_batch) -> None:
        batches: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()
        consuming = threading.Thread(target=self._prefetch, args=(deadline, idle_seconds, batches, stop),
                                     name="k2-writer-consume", daemon=True)
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
                batch = _Batch.of(messages, self.dead_letter_topic, generations) if messages else None
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
            messages = self._good(self.consumer.consume(min(50_000, self.max_batch_rows - len(batch)), timeout=0.1))
            with self._lock:
                if self._owned != owned:  # a rebalance ran inside consume(): what was read under the old owners goes
                    changed = {k for k in owned.keys() | self._owned.keys() if owned.get(k) != self._owned.get(k)}
                    batch = [m for m in batch if (m.topic(), m.partition()) not in changed]
                    owned = dict(self._owned)
            if messages:
                batch.extend(m for m in messages if (m.topic(), m.partition()) in owned)
                idle_since = time.monotonic()
        return batch, owned

    # -- writing --------------------------------------------------------------------------------

    def _write(self, batch: _Batch) -> BatchReport | None:
        started = time.monotonic()
        report = self._write_batch(batch)
        if report is None:
            return None
        m = self.metrics
        m.batch_seconds.observe(time.monotonic() - started)
        m.consumed.inc(report.consumed)
        m.written.inc(report.written)
        m.rejected.inc(report.rejected + report.dead_lettered)
        m.duplicates.inc(report.duplicates)
        for event, count in report.sequence_events.items():
            m.sequence_events.labels(event).inc(count)
        if report.latency_seconds:
            m.freshness.set(report.latency_seconds["p95"])
        m.last_commit_time.set(report.committed_at.timestamp())
        return report

    def _current(self, batch: _Batch) -> _Batch | None:
        """The part of the batch read under this writer's current ownership, starting where it left off."""
        with self._lock:
            valid = {k for k, g in batch.generations.items() if self._owned.get(k) == g}
            position = dict(self.position)
        keep = np.zeros(len(batch.partitions), dtype=bool)
        for p in np.unique(batch.partitions).tolist():  # a few partitions: vectorized per partition
            if (self.topic, p) not in valid:
                continue
            fresh = (batch.partitions == p) & (batch.offsets >= position[p])
            keep |= fresh
            first = int(batch.offsets[fresh].min()) if fresh.any() else position[p]
            if first > position[p]:  # the broker no longer holds them (retention): say so, they cannot be read
                self.metrics.offsets_skipped_by_broker.inc(first - position[p])
                log.error("offsets %d..%d of partition %d of %s are gone from the broker; K2 never read them", position[p], first - 1, p,
                          self.topic)
        if not keep.all():
            batch = batch.only(keep)
        batch.dead = [m for m in batch.dead if (m.topic(), m.partition()) in valid]
        return batch if len(batch.partitions) or batch.dead else None

    def _write_batch(self, batch: _Batch) -> BatchReport | None:
        batch = self._current(batch)
        if batch is None:
            return None
        values, part, off, dead = batch.values, batch.partitions, batch.offsets, batch.dead
        rows, rejected = live_codec.decode_batch(values, self.topic, part, off, source=SOURCE)
        ranges = {int(p): (int(off[part == p].min()), int(off[part == p].max())) for p in np.unique(part)}
        next_offsets = {p: last + 1 for p, (_, last) in ranges.items()}
        with self._lock:
            starts = {p: self.committed.get(p) for p in ranges}
        if None in starts.values():
            raise Fenced(f"partitions {sorted(p for p, o in starts.items() if o is None)} of {self.topic} moved to another writer")

        rejected = self._fresh_rejects(rejected)
        dead_rows = _dead_letters(dead)
        if rejected.num_rows or dead_rows.num_rows:
            self._commit_rejects(rejected, dead_rows, next_offsets, dead)
            _crash_point("after_rejects_commit")

        # Judge the sequence in arrival order (before dedup: a repeat is an event worth counting).
        events = self.tracker.check(rows.column("symbol"), rows.column("source_sequence")).counts() if rows.num_rows else {}
        rows, duplicates = self._new_rows(rows)
        rows = rows.sort_by(writer.SORT_KEYS) if rows.num_rows else rows
        ids = rows.column("source_sequence").to_numpy(zero_copy_only=False).astype(np.int64) if rows.num_rows else None
        batch_ids = {key: ids[index] for key, index in groups(rows)} if rows.num_rows else {}
        properties = {self.offsets_key: json.dumps({str(p): o for p, o in next_offsets.items()}), "k2.source": SOURCE,
                      KEYS_KEY: keys_property(set(batch_ids))}
        state = self.tracker.dumps()
        if len(state) <= MAX_TRACKER_STATE:  # kept with the offsets it belongs to; a large state is rebuilt instead
            properties[TRACKER_KEY] = state
        snapshot_id = None
        if rows.num_rows or any(next_offsets[p] > starts[p] for p in next_offsets):
            # Also a batch of duplicates only records its offsets: the next batch's fence starts from them.
            snapshot_id = self._commit(self.trades, rows, properties, self._trades_fence(starts, batch_ids), "market.trades")
        _crash_point("after_trades_commit")
        with self._lock:
            for p, o in next_offsets.items():
                if (self.topic, p) in self._owned:
                    self.position[p] = self.committed[p] = o
            self._group_commit = dict(self.committed)
        self._remember(batch_ids)
        committed = datetime.now(timezone.utc)
        return BatchReport(
            consumed=len(values),
            written=rows.num_rows,
            duplicates=duplicates,
            rejected=rejected.num_rows,
            dead_lettered=dead_rows.num_rows,
            sequence_events={k: v for k, v in events.items() if v},
            offset_ranges=ranges,
            snapshot_id=snapshot_id,
            partitions=_per_day(rows),
            latency_seconds=_latency(rows, committed),
            committed_at=committed,
        )

    def _commit_rejects(self, rejected: pa.Table, dead_rows: pa.Table, next_offsets: dict[int, int], dead: list) -> None:
        with self._lock:
            expected = {self.rejects_key: {p: self.rejects_written.get(p, 0) for p in next_offsets},
                        self.dead_key: {m.partition(): self.dead_letter_position.get(m.partition(), 0) for m in dead}}
        marks = {**expected[self.rejects_key], **next_offsets}
        dead_marks = {**expected[self.dead_key], **{m.partition(): m.offset() + 1 for m in dead}}
        properties = {self.rejects_key: json.dumps({str(p): o for p, o in marks.items()})}
        if dead_marks:
            properties[self.dead_key] = json.dumps({str(p): o for p, o in dead_marks.items()})
        self._commit(self.rejected, pa.concat_tables([rejected, dead_rows]), properties, self._marks_fence(expected), "market.rejected")
        with self._lock:
            self.rejects_written.update(marks)
            self.dead_letter_position.update(dead_marks)

    def _moved(self, key: str, expected: dict[int, int], metadata, parent) -> dict[int, int]:
        """Partitions whose offset recorded under `key` at snapshot `parent` is not the expected one."""
        recorded = self._recorded[key].at(metadata, parent)
        return {p: recorded.get(p, 0) for p, offset in expected.items() if recorded.get(p, 0) != offset}

    def _trades_fence(self, starts: dict[int, int], batch_ids: dict):
        def fence(metadata, parent) -> None:
            moved = self._moved(self.offsets_key, starts, metadata, parent)
            if moved:
                raise Fenced(f"{self.topic} offsets {moved} were committed by another writer (this batch started at "
                             f"{ {p: starts[p] for p in moved} })")
            changed = self.seen.follow(metadata, parent, self.trades.io)
            if batch_ids and changed == "*":
                raise Fenced("market.trades was rewritten under this batch; deduplicating again")
            if any(key in changed and SeenIndex.contains(self.seen.ids[key], ids).any() for key, ids in batch_ids.items()):
                raise Fenced("another commit wrote trades of this batch first; deduplicating again")
        return fence

    def _marks_fence(self, expected: dict[str, dict[int, int]]):
        def fence(metadata, parent) -> None:
            for key, marks in expected.items():
                moved = self._moved(key, marks, metadata, parent)
                if moved:
                    raise Fenced(f"reject marks {moved} of {key} were moved by another writer")
        return fence

    def _commit(self, table: FencedTable, rows: pa.Table, properties: dict[str, str], fence, what: str) -> int | None:
        """One conditional append, retried through store outages; an attempt of unknown outcome is looked up by its token."""
        token = uuid.uuid4().hex
        properties = {**properties, BATCH_KEY: token}
        attempts = []

        def attempt() -> int | None:
            if attempts:  # after an error the commit may have landed all the same
                table.refresh()
                found = offsets.landed(table, token)
                if found is not None:
                    return found
            attempts.append(1)
            table.fence = fence
            try:
                with self.metrics.commit_seconds.time():
                    table.append(rows, snapshot_properties=properties)
            except Fenced:
                raise
            except Exception:
                self.metrics.commit_failures.inc()
                raise
            finally:
                table.fence = None
            snapshot = table.current_snapshot()
            return snapshot.snapshot_id if snapshot is not None else None

        snapshot_id = self.health.call(attempt, f"committing to {what}", deadline=self._give_up_at, stop=self._stop)
        if table is self.trades and snapshot_id is not None:
            self.seen.in_step.append(snapshot_id)
        return snapshot_id

    def _fresh_rejects(self, rejected: pa.Table) -> pa.Table:
        """Rejects below the recorded mark were written before (a crash, another writer): drop them."""
        if not rejected.num_rows or not self.rejects_written:
            return rejected
        marks = pa.array([self.rejects_written.get(p, 0) for p in rejected.column("kafka_partition").to_pylist()], pa.int64())
        return rejected.filter(pc.greater_equal(rejected.column("kafka_offset"), marks))

    def _new_rows(self, rows: pa.Table) -> tuple[pa.Table, int]:
        """Drop trades the partition already holds and repeats within the batch."""
        if not rows.num_rows:
            return rows, 0
        ids = rows.column("source_sequence").to_numpy(zero_copy_only=False).astype(np.int64)
        keep = np.zeros(rows.num_rows, dtype=bool)
        for (day, symbol), index in groups(rows):
            seen = self.seen.load(self.trades, day, symbol)
            group_ids = ids[index]
            _, first = np.unique(group_ids, return_index=True)  # first occurrence within the batch
            fresh = np.zeros(len(index), dtype=bool)
            fresh[first] = True
            fresh &= ~SeenIndex.contains(seen, group_ids)
            keep[index[fresh]] = True
        return rows.filter(pa.array(keep)), int((~keep).sum())

    def _remember(self, batch_ids: dict) -> None:
        """The committed trade ids, per (day, symbol): into the dedup index, and due for gap reconciling."""
        for (day, symbol), ids in batch_ids.items():
            if (day, symbol) in self.seen.ids:
                self.seen.add(day, symbol, ids)
            self.touched.add((day, symbol))

    # -- sequence gaps --------------------------------------------------------------------------

    def reconcile_gaps(self, detected_by: str = SOURCE, now: datetime | None = None) -> dict[date, pa.Table]:
        """Reconcile market.sequence_gaps for the (day, symbol)s written since the last call, from the
        stored ids; a gap that straddles midnight UTC belongs to the day of the trade after it.
        Returns each day's gap rows for the symbols reconciled."""
        if self.gaps is None or not self.touched:
            return {}
        now = now or datetime.now(timezone.utc)
        by_day: dict[date, list[str]] = {}
        for day, symbol in sorted(self.touched):
            by_day.setdefault(day, []).append(symbol)
        result = {}
        for day, symbols in sorted(by_day.items()):
            def reconcile(day=day, symbols=symbols) -> pa.Table:
                current = {}
                for symbol in symbols:
                    last = self.seen.last_before(self.trades, day, symbol)
                    found = integrity.holes(self.seen.load(self.trades, day, symbol), None if last is None else last + 1)
                    if found:
                        current[symbol] = found
                return integrity.reconcile_partition(self.gaps, current, exchange=live_codec.EXCHANGE, session_date=day,
                                                     detected_by=detected_by, now=now, metrics=self.metrics.gaps, symbols=symbols)

            result[day] = self.health.call(lambda: self._reconciled(reconcile), "reconciling market.sequence_gaps",
                                           deadline=self._give_up_at, stop=self._stop)
            self.touched -= {(day, s) for s in symbols}
        return result


    def _reconciled(self, reconcile, attempts: int = 8):
        """Reconcile from the table as it is now; another writer reconciling the same day first makes
        pyiceberg refuse the rebased overwrite, and the gaps are computed again from the newer view."""
        for attempt in range(attempts):
            self.trades.refresh()
            self.seen.follow(self.trades.metadata, self.trades.metadata.current_snapshot_id, self.trades.io)
            self.gaps.refresh()
            try:
                return reconcile()
            except (CommitFailedException, ValidationException):
                if attempt == attempts - 1:
                    raise
                time.sleep(random.uniform(0.05, 0.5))


def _names(tps: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in tps)


def _dead_letters(messages: list) -> pa.Table:
    """Dead-letter messages -> market.rejected rows, with the producer's reason."""
    now = datetime.now(timezone.utc)
    n = len(messages)
    headers = [dict(m.headers() or []) for m in messages]
    return schemas.build_table(
        schemas.REJECTED,
        {
            "source": pa.repeat(pa.scalar("binance_stream"), n),
            "partition_date": pa.repeat(pa.scalar(now.date(), pa.date32()), n),
            "exchange": pa.repeat(pa.scalar(live_codec.EXCHANGE), n),
            "kafka_topic": pa.array([m.topic() for m in messages], pa.string()),
            "kafka_partition": pa.array([m.partition() for m in messages], pa.int32()),
            "kafka_offset": pa.array([m.offset() for m in messages], pa.int64()),
            "raw": pa.array([m.value() or b"" for m in messages], pa.binary()),
            "reason": pa.array([(h.get("k2-reason") or b"dead-lettered without a reason").decode("utf-8", "replace") for h in headers]),
            "rejected_at": pa.repeat(pa.scalar(now, pa.timestamp("us", tz="UTC")), n),
        },
        n,
    )


def _per_day(rows: pa.Table) -> dict[str, int]:
    if not rows.num_rows:
        return {}
    counts = pc.value_counts(rows.column("trade_date"))
    return {item["values"].isoformat(): item["counts"] for item in counts.to_pylist()}


def _latency(rows: pa.Table, committed: datetime) -> dict[str, float]:
    """Seconds from the exchange's event time (Binance E, else the trade time) to the commit."""
    if not rows.num_rows:
        return {}
    trade_ms = pc.divide(rows.column("exchange_timestamp").cast(pa.int64()), 1000)
    event_ms = pc.cast(pc.map_lookup(rows.column("vendor_data"), "event_time", "first"), pa.int64(), safe=False)
    ms = pc.coalesce(event_ms, trade_ms).to_numpy(zero_copy_only=False).astype(np.float64)
    lag = committed.timestamp() - ms / 1e3
    return {"p50": float(np.percentile(lag, 50)), "p95": float(np.percentile(lag, 95)), "max": float(lag.max())}


def _crash_point(name: str) -> None:
    """Crash tests kill the writer exactly here (K2_WRITER_CRASH_POINT) to prove recovery."""
    if os.environ.get("K2_WRITER_CRASH_POINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    """`k2 writer`: drain the topic into Iceberg until interrupted (or --seconds), beside any other writers."""
    import argparse

    from k2_assets.core import catalog
    from k2_assets.core.settings import Settings
    from k2_assets.core.stopping import Stopper

    parser = argparse.ArgumentParser(prog="k2 writer", description=main.__doc__)
    parser.add_argument("--bootstrap", default=os.environ.get("K2_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    parser.add_argument("--topic", default=live_codec.TOPIC)
    parser.add_argument("--seconds", type=float, default=float("inf"))
    parser.add_argument("--max-batch-rows", type=int, default=250_000)
    parser.add_argument("--session-timeout-ms", type=int, default=int(os.environ.get("K2_KAFKA_SESSION_TIMEOUT_MS", DEFAULT_SESSION_TIMEOUT_MS)),
                        help="how long a dead or paused writer keeps its partitions (the broker's minimum or more)")
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("K2_WRITER_METRICS_PORT", "0")),
                        help="serve Prometheus /metrics on 127.0.0.1:PORT (0: off)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    cat = catalog.open_catalog(settings.catalog_uri, settings.warehouse)
    metrics = WriterMetrics()
    if args.metrics_port:
        serve(metrics.registry, args.metrics_port)
    deadline = time.monotonic() + args.seconds
    stopping = threading.Event()
    live: LiveWriter | None = None

    def stop() -> None:
        stopping.set()
        if live is not None:
            live.stop()

    Stopper("k2 writer", f"the writer of {args.topic} (a batch being committed finishes; the next writer resumes after it)",
            stop).install()

    def report(batch: BatchReport) -> None:
        print(json.dumps({"written": batch.written, "rejected": batch.rejected, "duplicates": batch.duplicates,
                          "snapshot_id": batch.snapshot_id, "offsets": batch.offset_ranges}), flush=True)

    while not stopping.is_set() and time.monotonic() < deadline:
        try:
            if live is None:
                tables = [catalog.ensure_table(cat, name) for name in ("trades", "rejected", "sequence_gaps")]
                live = LiveWriter(tables[0], tables[1], args.bootstrap, topic=args.topic, max_batch_rows=args.max_batch_rows,
                                  metrics=metrics, gaps=tables[2], session_timeout_ms=args.session_timeout_ms)
                print(json.dumps({"ready": True, "resume_offsets": live.position}), flush=True)
            live.drain(min(5.0, max(0.0, deadline - time.monotonic())), on_batch=report)
            live.reconcile_gaps(detected_by="k2_writer")
        except Exception as exc:  # noqa: BLE001 - a writer that meets an error is rebuilt from the table's offsets
            if stopping.is_set():
                break
            log.error("writer rebuilt from the table's offsets after: %s", one_line(exc))
            if live is not None:
                _close_quietly(live)
                live = None
            time.sleep(1.0)
    if live is not None:
        print(json.dumps({"stopping": True, "committed_offsets": live.committed}), flush=True)
        _close_quietly(live)
    return 0


def _close_quietly(live: LiveWriter) -> None:
    try:
        live.close()
    except Exception as exc:  # noqa: BLE001 - the table's offsets are the truth; the group's are for lag only
        log.warning("closing the writer: %s", exc)


if __name__ == "__main__":
    raise SystemExit(main())
