"""The producer's dead letters (frames that never became trades) as market.rejected rows."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa

from k2_assets.core import schemas
from k2_assets.core.kafka_batch import Message


def dead_letter_rows(messages: list[Message], exchange: str) -> pa.Table:
    """Dead-letter messages of `exchange`'s producer -> market.rejected rows, with the producer's reason."""
    now = datetime.now(UTC)
    n = len(messages)
    return schemas.build_table(
        schemas.REJECTED,
        {
            "source": pa.repeat(pa.scalar("binance_stream"), n),
            "partition_date": pa.repeat(pa.scalar(now.date(), pa.date32()), n),
            "exchange": pa.repeat(pa.scalar(exchange), n),
            "kafka_topic": pa.array([m.topic for m in messages], pa.string()),
            "kafka_partition": pa.array([m.partition for m in messages], pa.int32()),
            "kafka_offset": pa.array([m.offset for m in messages], pa.int64()),
            "raw": pa.array([m.value for m in messages], pa.binary()),
            "reason": pa.array(
                [(m.headers.get("k2-reason") or b"dead-lettered without a reason").decode("utf-8", "replace") for m in messages]
            ),
            "rejected_at": pa.repeat(pa.scalar(now, pa.timestamp("us", tz="UTC")), n),
        },
        n,
    )
