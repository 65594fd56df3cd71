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

This module holds the writer and its commit path; beside it are live_ownership.py (the consumer group),
live_consuming.py (the consuming thread), live_properties.py (what a commit records), live_dead_letters.py,
live_gaps.py (sequence gaps) and live_report.py (a batch's report and the metrics it moves).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.table import Table

from k2_assets.core import live_decode, offsets, writer
from k2_assets.core.binance_format import SPOT, Market
from k2_assets.core.kafka import DEFAULT_SESSION_TIMEOUT_MS, consumer_config, ensure_topics, topic_incarnation
from k2_assets.core.kafka_batch import BatchConsumer, Messages
from k2_assets.core.live_consuming import Batch, Consuming
from k2_assets.core.live_dead_letters import dead_letter_rows
from k2_assets.core.live_dedup import SeenIndex, groups
from k2_assets.core.live_gaps import GapReconciling
from k2_assets.core.live_ownership import Ownership
from k2_assets.core.live_properties import SOURCE, rejects_properties, tracker_state, trades_properties
from k2_assets.core.live_report import BatchReport, latency, record, rows_per_day
from k2_assets.core.metrics import WriterMetrics
from k2_assets.core.offsets import BATCH_KEY, OFFSETS_KEY, REJECTED_KEY, Fenced, FencedTable, OffsetIndex
from k2_assets.core.outage import StoreHealth
from k2_assets.core.sequence import SequenceTracker

log = logging.getLogger("k2.writer")
StageHook = Callable[[str], None]
STAGES = ("after_rejects_commit", "after_trades_commit")  # stage_hook's stages: a commit landed, nothing acknowledged it yet


class LiveWriter(Ownership, Consuming, GapReconciling):
    """Drains a Kafka topic into market.trades in micro-batches (see the module docstring)."""

    def __init__(
        self,
        trades: Table,
        rejected: Table,
        bootstrap: str,
        *,
        market: Market = SPOT,
        topic: str | None = None,
        group_id: str | None = None,
        max_batch_rows: int = 250_000,
        max_batch_seconds: float = 1.0,
        dead_letter_topic: str | None = None,
        metrics: WriterMetrics | None = None,
        gaps: Table | None = None,
        join_timeout: float = 60.0,
        stall_after: float = 60.0,
        session_timeout_ms: int = DEFAULT_SESSION_TIMEOUT_MS,
        give_up_after: float | None = None,
        stage_hook: StageHook | None = None,
    ):
        self.trades, self.rejected, self.gaps = FencedTable.of(trades), FencedTable.of(rejected), gaps
        # One writer drains one market's topic: its trades, dedup index and sequences are those of its exchange.
        self.exchange = market.exchange
        topic = topic or market.topic
        self.bootstrap, self.topic = bootstrap, topic
        # The producer's dead letters (frames that never became trades) end in market.rejected too.
        self.dead_letter_topic = dead_letter_topic if dead_letter_topic is not None else topic + ".dlq"
        self.group_id = group_id or f"k2-writer.{topic}"  # one group per topic: the sensor and `k2 writer` share it
        self.max_batch_rows = max_batch_rows
        self.max_batch_seconds = max_batch_seconds
        self.metrics = (metrics or WriterMetrics()).for_exchange(self.exchange)
        self.health = StoreHealth(self.metrics.store_state, stall_after)
        ensure_topics(bootstrap, {self.dead_letter_topic: 1})
        self.incarnation = topic_incarnation(bootstrap, topic)
        self.offsets_key = offsets.key(OFFSETS_KEY, topic, self.incarnation)
        self.rejects_key = offsets.key(REJECTED_KEY, topic, self.incarnation)
        self.dead_key = offsets.key(REJECTED_KEY, self.dead_letter_topic, topic_incarnation(bootstrap, self.dead_letter_topic))
        self._recorded = {key: OffsetIndex(key) for key in (self.offsets_key, self.rejects_key, self.dead_key)}
        self.seen = SeenIndex(self.exchange)
        self.tracker = SequenceTracker(self.exchange, resets_each_session=False)
        self.tracker_key = offsets.tracker_key(self.exchange)
        self._tracker_kept = "whole"
        self._lock = threading.RLock()
        self._owned: dict[tuple[str, int], int] = {}  # (topic, partition) -> assignment generation
        self._generation = 0
        self.position: dict[int, int] = {}  # owned trade partition -> next offset this writer has handled
        self.committed: dict[int, int] = {}  # owned trade partition -> the offset market.trades records
        self.rejects_written: dict[int, int] = {}  # reject marks, as the table records them
        self.dead_letter_position: dict[int, int] = {}
        self.touched: set[tuple[date, str]] = set()  # (day, symbol) written since the last gap reconcile
        self._pending: list[Messages] = []  # read while joining the group, or before a rebalance
        self._joined = threading.Event()
        self._stop = threading.Event()
        # Store outages met while starting are retried this long (None: until stop()); drain() sets its own.
        self._give_up_at: float | None = None if give_up_after is None else time.monotonic() + give_up_after
        self._group_commit: dict[int, int] | None = None  # set after each Iceberg commit, done by the consuming thread
        self.stage_hook = stage_hook  # called with each of STAGES as the writer passes it (crash tests kill it there)
        self._start_from_table()
        self.consumer = BatchConsumer(consumer_config(bootstrap, self.group_id, session_timeout_ms), topic)
        self.consumer.subscribe(
            [topic, self.dead_letter_topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke
        )
        self.join(join_timeout)

    def stop(self) -> None:
        """Ask a drain in progress to stop (a signal handler may call it): retries end, the batch in hand is not committed."""
        self._stop.set()

    def close(self) -> None:
        """Leave the consumer group, its offsets committed where the table's are."""
        with self._lock:
            self._group_commit = {p: o for p, o in self.committed.items()}  # synchronously, so the group ends where the table is
        self._commit_group_offsets(wait=True)
        self.consumer.close()

    def drain(
        self, seconds: float, idle_seconds: float = 0.5, on_batch=None, give_up_after: float | None = None
    ) -> list[BatchReport]:
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
                except Exception:  # the original failure is the one to raise; the next writer re-reads the table
                    log.exception("could not re-read the committed offsets after a failed batch; this writer must be discarded")
                raise
        self._commit_group_offsets()
        return reports

    def _write(self, batch: Batch) -> BatchReport | None:
        started = time.monotonic()
        report = self._write_batch(batch)
        if report is not None:
            record(self.metrics, report, time.monotonic() - started)
        return report

    def _current(self, batch: Batch) -> Batch | None:
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
                log.error(
                    "offsets %d..%d of partition %d of %s are gone from the broker; K2 never read them",
                    position[p],
                    first - 1,
                    p,
                    self.topic,
                )
        messages = batch.messages.only(keep).of_partitions(self.topic, valid)
        return Batch(messages, batch.generations) if len(messages) else None

    def _write_batch(self, batch: Batch) -> BatchReport | None:
        batch = self._current(batch)
        if batch is None:
            return None
        part, off, dead = batch.partitions, batch.offsets, batch.dead
        rows, rejected = live_decode.decode_batch(batch.messages, self.topic, source=SOURCE, exchange=self.exchange)
        ranges = {int(p): (int(off[part == p].min()), int(off[part == p].max())) for p in np.unique(part)}
        next_offsets = {p: last + 1 for p, (_, last) in ranges.items()}
        with self._lock:
            starts = {p: self.committed.get(p) for p in ranges}
        if None in starts.values():
            moved = sorted(p for p, o in starts.items() if o is None)
            raise Fenced(f"partitions {moved} of {self.topic} moved to another writer")

        rejected = self._fresh_rejects(rejected)
        dead_rows = dead_letter_rows(dead, self.exchange)
        if rejected.num_rows or dead_rows.num_rows:
            self._commit_rejects(rejected, dead_rows, next_offsets, dead)
            self._reached("after_rejects_commit")

        # Judge the sequence in arrival order (before dedup: a repeat is an event worth counting).
        events = self.tracker.check(rows.column("symbol"), rows.column("source_sequence")).counts() if rows.num_rows else {}
        rows, duplicates, batch_ids = self._new_rows(rows)
        rows = rows.sort_by(writer.SORT_KEYS) if rows.num_rows else rows
        state, kept = tracker_state(self.tracker)
        if kept != self._tracker_kept:
            log.log(logging.INFO if kept == "whole" else logging.WARNING, "sequence tracker state recorded: %s", kept)
            self._tracker_kept = kept
        properties = trades_properties(self.offsets_key, next_offsets, batch_ids, self.tracker_key, state)
        snapshot_id = None
        if rows.num_rows or any(next_offsets[p] > starts[p] for p in next_offsets):
            # Also a batch of duplicates only records its offsets: the next batch's fence starts from them.
            snapshot_id = self._commit(self.trades, rows, properties, self._trades_fence(starts, batch_ids), "market.trades")
        self._reached("after_trades_commit")
        with self._lock:
            for p, o in next_offsets.items():
                if (self.topic, p) in self._owned:
                    self.position[p] = self.committed[p] = o
            self._group_commit = dict(self.committed)
        self._remember(batch_ids)
        committed = datetime.now(UTC)
        return BatchReport(
            consumed=len(part),
            written=rows.num_rows,
            duplicates=duplicates,
            rejected=rejected.num_rows,
            dead_lettered=dead_rows.num_rows,
            sequence_events={k: v for k, v in events.items() if v},
            offset_ranges=ranges,
            snapshot_id=snapshot_id,
            partitions=rows_per_day(rows),
            latency_seconds=latency(rows, committed),
            committed_at=committed,
        )

    def _commit_rejects(self, rejected: pa.Table, dead_rows: pa.Table, next_offsets: dict[int, int], dead: list) -> None:
        with self._lock:
            expected = {
                self.rejects_key: {p: self.rejects_written.get(p, 0) for p in next_offsets},
                self.dead_key: {m.partition: self.dead_letter_position.get(m.partition, 0) for m in dead},
            }
        marks = {**expected[self.rejects_key], **next_offsets}
        dead_marks = {**expected[self.dead_key], **{m.partition: m.offset + 1 for m in dead}}
        properties = rejects_properties(self.rejects_key, marks, self.dead_key, dead_marks)
        self._commit(
            self.rejected, pa.concat_tables([rejected, dead_rows]), properties, self._marks_fence(expected), "market.rejected"
        )
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
                raise Fenced(
                    f"{self.topic} offsets {moved} were committed by another writer (this batch started at "
                    f"{ {p: starts[p] for p in moved} })"
                )
            changed = self.seen.follow(metadata, parent, self.trades.io)
            if batch_ids and changed == "*":
                raise Fenced("market.trades was rewritten under this batch; deduplicating again")
            if any(key in changed and self.seen.ids[key].contains(ids).any() for key, ids in batch_ids.items()):
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

    def _new_rows(self, rows: pa.Table) -> tuple[pa.Table, int, dict]:
        """Drop trades the partition already holds and repeats within the batch; also the new ids, sorted, per (day, symbol)."""
        if not rows.num_rows:
            return rows, 0, {}
        ids = rows.column("source_sequence").to_numpy(zero_copy_only=False).astype(np.int64)
        keep = np.zeros(rows.num_rows, dtype=bool)
        batch_ids = {}
        for (day, symbol), index in groups(rows):
            seen = self.seen.load(self.trades, day, symbol)
            unique, first = np.unique(ids[index], return_index=True)  # first occurrence within the batch
            new = ~seen.contains(unique)
            keep[index[first[new]]] = True
            if new.any():
                batch_ids[(day, symbol)] = unique[new]
        if keep.all():
            return rows, 0, batch_ids
        return rows.filter(pa.array(keep)), int((~keep).sum()), batch_ids

    def _remember(self, batch_ids: dict) -> None:
        """The committed trade ids, per (day, symbol): into the dedup index, and due for gap reconciling."""
        for (day, symbol), ids in batch_ids.items():
            if (day, symbol) in self.seen.ids:
                self.seen.add(day, symbol, ids)
            self.touched.add((day, symbol))

    def _reached(self, stage: str) -> None:
        if self.stage_hook is not None:
            self.stage_hook(stage)
