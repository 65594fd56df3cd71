"""A symbol's trades for the last N minutes, across the gap between Kafka and Iceberg.

The table holds everything the writer has committed; the Kafka tail past the offsets recorded in the
table holds what has arrived since. The answer is their union, deduplicated by message_id (a row
can be in both while a micro-batch commits), so it is fresh to the end of every partition when asked.

`RecentTrades` answers again and again (a dashboard, `k2 recent --every`): one consumer stays on the
tail and decodes each message once, and the table is read at a base snapshot. A later commit of
the live writer only moves rows the consumer already holds into the table, so it needs no new
scan; any other commit (gap repair, compaction, a reloaded partition) moves the base.
`recent_trades` is the one-shot form.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import Consumer, KafkaError, TopicPartition
from pyiceberg.expressions import And, EqualTo, GreaterThanOrEqual, In
from pyiceberg.table import Table

from k2_assets.core import live_codec, live_decode
from k2_assets.core.kafka import consumer_config, partition_count, topic_incarnation
from k2_assets.core.kafka_batch import Messages
from k2_assets.core.offsets import OFFSETS_KEY, key, lineage, recorded_offsets

MAX_MINUTES = 24 * 60


def recent_trades(
    trades: Table, bootstrap: str, symbol: str, minutes: float, *, topic: str = live_codec.TOPIC, now: datetime | None = None
) -> pa.Table:
    """Trades of `symbol` with exchange time in [now - minutes, now], oldest first."""
    _validate(symbol, minutes)
    recent = RecentTrades(trades, bootstrap, topic=topic, keep_minutes=MAX_MINUTES, max_tail_rows=2**62)
    try:
        return recent.query(symbol, minutes, now=now)
    finally:
        recent.close()


class RecentTrades:
    """Repeated recent-trades queries from one consumer on the Kafka tail (see the module docstring).

    The tail keeps `keep_minutes` of exchange time behind the newest trade; a query reaching further
    back is answered the one-shot way."""

    def __init__(
        self,
        trades: Table,
        bootstrap: str,
        *,
        topic: str = live_codec.TOPIC,
        keep_minutes: float = 15,
        max_tail_rows: int = 1_000_000,
        catch_up_seconds: float = 5.0,
    ):
        self.trades, self.bootstrap, self.topic = trades, bootstrap, topic
        self.keep_us = int(keep_minutes * 60e6)
        self.max_tail_rows = max_tail_rows
        self.catch_up_seconds = catch_up_seconds
        self.key = key(OFFSETS_KEY, topic, topic_incarnation(bootstrap, topic))
        self.partitions = partition_count(bootstrap, topic)
        trades.refresh()
        self._set_base()
        self.position = {p: self.base_offsets.get(p, 0) for p in range(self.partitions)}
        self.consumer = Consumer(consumer_config(bootstrap, f"k2-recent-{uuid.uuid4().hex[:8]}"))
        self.consumer.assign([TopicPartition(topic, p, o) for p, o in self.position.items()])
        self.tail: pa.Table | None = None  # decoded messages at or past the base offsets, all symbols
        self.trimmed_before_us: int | None = None  # exchange time before which tail rows were dropped

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self) -> RecentTrades:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def query(self, symbol: str, minutes: float, *, now: datetime | None = None) -> pa.Table:
        """Trades of `symbol` with exchange time in [now - minutes, now], oldest first."""
        symbol = _validate(symbol, minutes)
        now = now or datetime.now(UTC)
        start = now - timedelta(minutes=minutes)
        # The table first, then the tail: a row the writer committed was fetched before its commit,
        # so reading the tail afterwards (at least to the committed offsets) cannot miss it.
        self.trades.refresh()
        committed = self._follow_table()
        if not self._read_tail(committed):  # the tail is behind the table: read the table as it is now
            self.trades.refresh()
            self._move_base()
        if self.trimmed_before_us is not None and _us(start) < self.trimmed_before_us:
            return recent_trades(self.trades, self.bootstrap, symbol, minutes, topic=self.topic, now=now)
        stored = self._stored(symbol, start, now)
        tail = self._tail_rows(symbol, start, now)
        if tail.num_rows:
            stored = pa.concat_tables([stored, tail.cast(stored.schema)])
        if stored.num_rows:
            stored = stored.take(_first_of_each(stored.column("message_id")))
        return stored.sort_by([("exchange_timestamp", "ascending"), ("source_sequence", "ascending")])

    def _set_base(self) -> None:
        snapshot = self.trades.current_snapshot()
        self.base_id = snapshot.snapshot_id if snapshot else None
        self.base_offsets = recorded_offsets(self.trades, self.key)
        self.stored_cache: dict[str, tuple[int, pa.Table]] = {}

    def _move_base(self) -> None:
        """Read the table at its current snapshot from now on; the tail keeps only what that lacks."""
        self._set_base()
        self._drop_committed_tail()

    def _follow_table(self) -> dict[int, int]:
        """Keep the base if every commit since it is the live writer's append; otherwise move it (also
        when the tail has grown past `max_tail_rows`, to shed the rows the table now holds).
        Returns the offsets the table has committed, which the tail must reach."""
        if self.tail is None or self.tail.num_rows <= self.max_tail_rows:
            for snapshot, properties in lineage(self.trades):
                if snapshot.snapshot_id == self.base_id:
                    return recorded_offsets(self.trades, self.key)
                operation = snapshot.summary.operation.value if snapshot.summary else None
                if self.key not in properties or operation != "append":
                    break
            else:
                if self.base_id is None:  # only the writer has committed since the tail began at offset 0
                    return recorded_offsets(self.trades, self.key)
        self._move_base()
        return self.base_offsets

    def _read_tail(self, committed: dict[int, int]) -> bool:
        """Decode the new messages, up to the end of each partition as the broker reports it when asked,
        and at least up to `committed`. False if the committed offsets are not reached in time.

        The reported end is only a target: a partition that stops short of it (a transaction marker
        takes an offset but is never delivered) ends the read at the deadline, not in an error."""
        ends = {}
        for p in range(self.partitions):
            _, high = self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=5, cached=False)
            ends[p] = max(high, committed.get(p, 0))
        messages = []
        deadline = time.monotonic() + self.catch_up_seconds
        while True:
            short = any(self.position.get(p, 0) < end for p, end in ends.items())
            batch = self.consumer.consume(10_000, timeout=0.05 if short else 0)
            for m in batch:
                error = m.error()
                if error is None:
                    messages.append(m)
                    self.position[m.partition()] = m.offset() + 1
                elif error.code() != KafkaError._PARTITION_EOF:
                    raise RuntimeError(f"Kafka error while reading {self.topic}: {error}")
            if (not batch and not short) or time.monotonic() >= deadline:
                break
        self._append(messages)
        return not self._behind(committed)

    def _behind(self, committed: dict[int, int]) -> bool:
        return any(self.position.get(p, 0) < o for p, o in committed.items())

    def _append(self, messages: list) -> None:
        if not messages:
            return
        read = Messages.of(
            [m.value() or b"" for m in messages], [m.partition() for m in messages], [m.offset() for m in messages]
        )
        rows, _ = live_decode.decode_batch(read, self.topic, source="recent_trades")
        self.tail = rows if self.tail is None else pa.concat_tables([self.tail, rows])
        times = self.tail.column("exchange_timestamp")
        newest = pc.max(times).cast(pa.int64()).as_py()
        if newest is None:
            return
        cut = newest - self.keep_us
        if pc.min(times).cast(pa.int64()).as_py() < cut:
            self.tail = self.tail.filter(pc.greater_equal(times.cast(pa.int64()), cut)).combine_chunks()
            self.trimmed_before_us = cut

    def _drop_committed_tail(self) -> None:
        """Tail rows below the base's offsets are in the table already."""
        if self.tail is None or not self.tail.num_rows:
            return
        floor = pa.array([self.base_offsets.get(p, 0) for p in self.tail.column("kafka_partition").to_pylist()], pa.int64())
        self.tail = self.tail.filter(pc.greater_equal(self.tail.column("kafka_offset"), floor))

    def _stored(self, symbol: str, start: datetime, now: datetime) -> pa.Table:
        """The symbol's rows of the base snapshot in [start, now], scanned once per base and window."""
        cached = self.stored_cache.get(symbol)
        if cached is None or cached[0] > _us(start):
            days = {(start + timedelta(days=i)).date().isoformat() for i in range((now.date() - start.date()).days + 1)}
            where = And(
                And(EqualTo("exchange", live_codec.EXCHANGE), In("trade_date", days)),
                And(EqualTo("symbol", symbol), GreaterThanOrEqual("exchange_timestamp", start.isoformat())),
            )
            if self.base_id is None:
                rows = self.trades.schema().as_arrow().empty_table()
            else:
                rows = self.trades.scan(row_filter=where, snapshot_id=self.base_id).to_arrow()
            cached = self.stored_cache[symbol] = (_us(start), rows)
        return _within(cached[1], start, now)

    def _tail_rows(self, symbol: str, start: datetime, now: datetime) -> pa.Table:
        if self.tail is None or not self.tail.num_rows:
            return pa.schema([]).empty_table()
        return _within(self.tail.filter(pc.equal(self.tail.column("symbol"), symbol)), start, now)


def _validate(symbol: str, minutes: float) -> str:
    symbol = symbol.upper()
    if not symbol.isalnum():
        raise ValueError(f"symbol {symbol!r} is not a Binance symbol")
    if not 0 < minutes <= MAX_MINUTES:
        raise ValueError(f"minutes must be in (0, {MAX_MINUTES}], not {minutes}")
    return symbol


def _us(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def _within(rows: pa.Table, start: datetime, now: datetime) -> pa.Table:
    if not rows.num_rows:
        return rows
    ts = rows.column("exchange_timestamp")
    return rows.filter(pc.and_(pc.greater_equal(ts, pa.scalar(start, ts.type)), pc.less_equal(ts, pa.scalar(now, ts.type))))


def _first_of_each(ids: pa.ChunkedArray) -> pa.Array:
    """Row positions of the first occurrence of each id, in table order."""
    indices = pc.dictionary_encode(ids).combine_chunks().indices.to_numpy()
    _, first = np.unique(indices, return_index=True)
    return pa.array(np.sort(first))
