"""A symbol's trades for the last N minutes, across the gap between Kafka and Iceberg.

The table holds everything the writer has committed; the Kafka tail past the offsets recorded in the
table holds what has arrived since. The answer is their union, deduplicated by message_id (a row
can be in both while a micro-batch commits), so it is fresh to the last message produced.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import Consumer, KafkaError, TopicPartition
from pyiceberg.expressions import And, EqualTo, GreaterThanOrEqual, In, LessThanOrEqual
from pyiceberg.table import Table

from k2_assets.core import live_codec
from k2_assets.core.kafka import consumer_config, partition_count
from k2_assets.core.live_writer import OFFSETS_KEY, recorded_offsets

MAX_MINUTES = 24 * 60


def recent_trades(trades: Table, bootstrap: str, symbol: str, minutes: float, *, topic: str = live_codec.TOPIC,
                  now: datetime | None = None, idle_seconds: float = 0.2) -> pa.Table:
    """Trades of `symbol` with exchange time in [now - minutes, now], oldest first."""
    symbol = symbol.upper()
    if not symbol.isalnum():
        raise ValueError(f"symbol {symbol!r} is not a Binance symbol")
    if not 0 < minutes <= MAX_MINUTES:
        raise ValueError(f"minutes must be in (0, {MAX_MINUTES}], not {minutes}")
    now = now or datetime.now(timezone.utc)
    start = now - timedelta(minutes=minutes)
    trades.refresh()
    days = {(start + timedelta(days=i)).date().isoformat() for i in range((now.date() - start.date()).days + 1)}
    where = And(
        And(EqualTo("exchange", live_codec.EXCHANGE), In("trade_date", days)),
        And(EqualTo("symbol", symbol), And(GreaterThanOrEqual("exchange_timestamp", start.isoformat()),
                                           LessThanOrEqual("exchange_timestamp", now.isoformat()))),
    )
    stored = trades.scan(row_filter=where).to_arrow()
    tail = _kafka_tail(trades, bootstrap, topic, idle_seconds, symbol)
    if tail.num_rows:
        ts = tail.column("exchange_timestamp")
        keep = pc.and_(pc.equal(tail.column("symbol"), symbol),
                       pc.and_(pc.greater_equal(ts, pa.scalar(start, ts.type)), pc.less_equal(ts, pa.scalar(now, ts.type))))
        tail = tail.filter(keep)
        tail = tail.filter(pc.invert(pc.is_in(tail.column("message_id"), value_set=stored.column("message_id"))))
        stored = pa.concat_tables([stored, tail.cast(stored.schema)])
    if stored.num_rows:
        _, first = _unique_first(stored.column("message_id"))
        stored = stored.take(first)
    return stored.sort_by([("exchange_timestamp", "ascending"), ("source_sequence", "ascending")])


def _unique_first(ids: pa.ChunkedArray):
    encoded = pc.dictionary_encode(ids).combine_chunks()
    indices = encoded.indices.to_numpy()
    _, first = np.unique(indices, return_index=True)
    return encoded.dictionary, pa.array(np.sort(first))


def _kafka_tail(trades: Table, bootstrap: str, topic: str, idle_seconds: float, symbol: str) -> pa.Table:
    """The symbol's messages past the offsets the table has committed, read to the end of each partition."""
    committed = recorded_offsets(trades, OFFSETS_KEY + topic)
    consumer = Consumer(consumer_config(bootstrap, f"k2-recent-{uuid.uuid4().hex[:8]}", **{"enable.partition.eof": True}))
    key = symbol.encode()
    try:
        partitions = partition_count(bootstrap, topic)
        consumer.assign([TopicPartition(topic, p, committed.get(p, 0)) for p in range(partitions)])
        messages, at_end = [], set()
        deadline = time.monotonic() + idle_seconds
        while len(at_end) < partitions and time.monotonic() < deadline:
            for m in consumer.consume(10_000, timeout=0.02):
                error = m.error()
                if error is None:
                    deadline = time.monotonic() + idle_seconds  # still reading: not idle
                    if m.key() == key:  # trades are keyed by symbol: decode only this one's
                        messages.append(m)
                elif error.code() == KafkaError._PARTITION_EOF:
                    at_end.add(m.partition())
    finally:
        consumer.close()
    if not messages:
        return pa.schema([]).empty_table()
    rows, _ = live_codec.decode_batch([m.value() or b"" for m in messages], topic, [m.partition() for m in messages],
                                      [m.offset() for m in messages], source="recent_trades")
    return rows
