"""Shaping query results: rows taken by position, UTC labels, and pandas DataFrames."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def take(data: pa.Table, positions: pa.ChunkedArray) -> pa.Table:
    """Rows of `data` at `positions`: a zero-copy slice when they are consecutive, else a take."""
    pos = positions.to_numpy()
    n = len(pos)
    if n == 0:
        return data.slice(0, 0)
    first = int(pos[0])
    if int(pos[-1]) - first == n - 1 and (n == 1 or bool(np.all(np.diff(pos) == 1))):
        return data.slice(first, n)
    return data.take(pa.array(pos))


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
