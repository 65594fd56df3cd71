"""The Avro contracts in schemas/ are the single source of truth; Iceberg and Arrow schemas derive from them."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa
    from pyiceberg.schema import Schema

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"

TRADE = "trade_v2"
QUOTE = "quote_v2"
REJECTED = "rejected_v1"
SEQUENCE_GAP = "sequence_gap_v1"
SOURCE_FILE = "source_file_v1"
OHLCV = "ohlcv_v1"
EXCHANGE_BAR = "exchange_bar_v1"
INTERVALS = ("1m", "5m", "1h", "1d")
# A decimal(18,8) as text: at most 10 integer digits and 8 significant decimals.
DECIMAL_PATTERN = r"^\d{1,10}(\.\d{0,8}0*)?$"


@cache
def avro_schema(name: str) -> dict:
    """The parsed Avro schema `schemas/<name>.avsc`."""
    return json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())


@cache
def iceberg_schema(name: str) -> Schema:
    from pyiceberg.utils.schema_conversion import AvroSchemaConversion  # pyiceberg loads pandas: only when needed

    return AvroSchemaConversion().avro_to_iceberg(avro_schema(name))


@cache
def arrow_schema(name: str) -> pa.Schema:
    """Arrow schema matching the Iceberg table (field ids, nullability), with plain string/binary types."""
    import pyarrow as pa
    from pyiceberg.io.pyarrow import schema_to_pyarrow

    schema = schema_to_pyarrow(iceberg_schema(name))
    return pa.schema([_plain(f) for f in schema])


def _plain(field: pa.Field) -> pa.Field:
    import pyarrow as pa

    large = {pa.large_string(): pa.string(), pa.large_binary(): pa.binary()}
    t = field.type
    if t in large:
        t = large[t]
    elif pa.types.is_large_list(t) or pa.types.is_list(t):
        t = pa.list_(_plain(t.value_field))
    elif pa.types.is_map(t):
        t = pa.map_(_plain(t.key_field), _plain(t.item_field))
    # No field-id metadata: the catalog assigns column ids, and pyiceberg matches Arrow columns by name.
    return pa.field(field.name, t, nullable=field.nullable)


def build_table(name: str, columns: dict[str, pa.Array], n: int) -> pa.Table:
    import pyarrow as pa

    """A table of schema `name` from named columns; optional columns not given are null."""
    schema = arrow_schema(name)
    arrays = []
    for f in schema:
        if f.name in columns:
            column = columns[f.name]
            arrays.append(column if column.type == f.type else column.cast(f.type))
        elif f.nullable:
            arrays.append(pa.nulls(n, f.type))
        else:
            raise KeyError(f"{name}: required column {f.name!r} missing")
    return pa.Table.from_arrays(arrays, schema=schema)


def enum_symbols(name: str, field: str) -> list[str]:
    """Allowed values of an Avro enum field (e.g. side)."""
    for f in avro_schema(name)["fields"]:
        if f["name"] == field:
            return list(f["type"]["symbols"])
    raise KeyError(field)
