"""Shaping query results: a time window of a sorted scan, UTC labels, and pandas DataFrames."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def time_window(data: pa.Table, time_column: str, start: datetime | None, end: datetime | None, limit: int) -> pa.Table:
    """The first `limit` rows of `data` with `time_column` in [start, end), in `data`'s order.

    `data` must be one chunk sorted by `time_column` first (a cached scan is), so the rows form one
    run, found by binary search: a zero-copy slice, in microseconds however large the day."""
    times = data.column(time_column)
    times = times.chunk(0) if times.num_chunks == 1 else times.combine_chunks()
    values = times.cast(pa.int64()).to_numpy()  # the schemas' time columns are required: no nulls
    per_micro = TICKS_PER_MICRO[times.type.unit]
    lo = int(np.searchsorted(values, _micros(start) * per_micro, "left")) if start is not None else 0
    hi = int(np.searchsorted(values, _micros(end) * per_micro, "left")) if end is not None else len(values)
    return data.slice(lo, max(0, min(hi - lo, limit)))


TICKS_PER_MICRO = {"us": 1, "ns": 1000}  # Iceberg's timestamps are us (ns from format v3)


def _micros(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)


def utc(table: pa.Table) -> pa.Table:
    """DuckDB labels its UTC results 'Etc/UTC'; K2's tables say 'UTC'."""
    fields = [
        pa.field(f.name, pa.timestamp(f.type.unit, tz="UTC"), f.nullable) if pa.types.is_timestamp(f.type) and f.type.tz else f
        for f in table.schema
    ]
    schema = pa.schema(fields)
    return table if schema.equals(table.schema) else table.cast(schema)


def to_pandas(table: pa.Table, *, exact: bool = False):
    """The table as a pandas DataFrame; decimals become float64 unless `exact` (then Python Decimals)."""
    if not exact:
        fields = [pa.field(f.name, pa.float64(), f.nullable) if pa.types.is_decimal(f.type) else f for f in table.schema]
        table = table.cast(pa.schema(fields))
    return table.to_pandas()
