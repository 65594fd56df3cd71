"""Decoding a batch of v2 Kafka messages into `market.trades` rows and `market.rejected` records (Arrow).

The writer's side of the wire format: the message layout is derived from schemas/trade_v2.avsc. The producer's
side (k2_assets.core.live_codec) stays free of Arrow, so a producer starts fast.
"""

from __future__ import annotations

from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pjson

from k2_assets.core import decode, schemas
from k2_assets.core.kafka_batch import Messages, lines
from k2_assets.core.live_codec import EXCHANGE

VENDOR_KEYS = ("event_time", "is_best_match")  # what Binance's trade stream carries beyond the v2 core
NOT_ON_THE_WIRE = ("source_file", "source_row", "kafka_topic", "kafka_partition", "kafka_offset")  # files' and Kafka's own


def _wire_type(avro_type) -> pa.DataType:
    """How a v2 field travels in the JSON message: decimals and dates as text, timestamps as epoch µs."""
    if isinstance(avro_type, list):
        return _wire_type(next(t for t in avro_type if t != "null"))
    if isinstance(avro_type, dict):
        logical, kind = avro_type.get("logicalType"), avro_type["type"]
        if logical in ("decimal", "date") or kind == "enum":
            return pa.string()
        if kind == "array":
            return pa.list_(_wire_type(avro_type["items"]))
        if kind == "map":  # Arrow's JSON reader takes an object as a struct of the keys the producer sets
            return pa.struct([(k, _wire_type(avro_type["values"])) for k in VENDOR_KEYS])
        return _wire_type(kind)
    return {"string": pa.string(), "long": pa.int64(), "int": pa.int32(), "boolean": pa.bool_()}[avro_type]


def _wire() -> tuple[pa.Schema, tuple[str, ...]]:
    """What the writer reads from each message, derived from schemas/trade_v2.avsc, and the fields it must carry."""
    fields = [f for f in schemas.avro_schema(schemas.TRADE)["fields"] if f["name"] not in NOT_ON_THE_WIRE]
    wire = pa.schema([(f["name"], _wire_type(f["type"])) for f in fields])
    required = tuple(
        f["name"]
        for f in fields
        if not (isinstance(f["type"], list) and "null" in f["type"])
        and not pa.types.is_nested(wire.field(f["name"]).type)
        and f["name"] != "trade_date"
    )  # the writer derives the day
    return wire, required


_WIRE, _REQUIRED = _wire()


def decode_batch(
    messages: Messages,
    topic: str,
    *,
    source: str,
    exchange: str = EXCHANGE,
    now: datetime | None = None,
) -> tuple[pa.Table, pa.Table]:
    """A topic's Kafka messages -> (v2 trade rows, market.rejected rows). Every message is in exactly one.

    A topic carries the trades of one exchange (Binance spot or USD-M futures): a trade of another is rejected,
    since the writer's dedup index and sequence tracking are those of the topic's exchange."""
    now = now or decode.utc_now()
    values = messages.values
    wire, reasons = _parse(values)
    partition_column, offset_column = pa.array(messages.partitions, pa.int32()), pa.array(messages.offsets, pa.int64())
    rows = decode.Rows.from_reasons(reasons)
    for name in _REQUIRED:
        if wire.column(name).null_count:  # a count Arrow keeps: most batches skip the pass
            rows.reject(pc.is_null(wire.column(name)), f"field {name} is missing")
    rows.reject(
        pc.not_equal(pc.fill_null(wire.column("exchange"), exchange), exchange),
        "exchange '",
        pc.fill_null(wire.column("exchange"), ""),
        f"' is not {exchange}, the exchange of topic {topic}",
    )
    price = rows.decimal(pc.fill_null(wire.column("price"), "0"), "price")
    quantity = rows.decimal(pc.fill_null(wire.column("quantity"), "0"), "quantity")
    rows.reject(
        pc.invert(pc.is_in(wire.column("side"), pa.array(["BUY", "SELL", "UNKNOWN"]))),
        "side '",
        pc.fill_null(wire.column("side"), ""),
        "' is not BUY, SELL or UNKNOWN",
    )
    ts = pc.cast(pc.fill_null(wire.column("exchange_timestamp"), 0), pa.timestamp("us", tz="UTC"))
    day = pc.cast(ts, pa.date32())
    rows.reject(
        pc.fill_null(pc.not_equal(day, decode.by_unique(wire.column("trade_date"), _iso_day)), True),
        "trade_date does not match exchange_timestamp's UTC date",
    )
    ok = rows.accepted()
    every = len(ok) == len(values)  # the usual batch: nothing to take out

    def take(column):
        return column if every else pc.take(column, ok)

    columns = {name: take(wire.column(name)) for name in _WIRE.names}
    columns.update(
        price=take(price),
        quantity=take(quantity),
        exchange_timestamp=take(ts),
        trade_date=take(day),
        ingest_timestamp=pc.cast(columns["ingest_timestamp"], pa.timestamp("us", tz="UTC")),
        trade_conditions=pc.fill_null(columns["trade_conditions"], pa.scalar([], pa.list_(pa.string()))),
        kafka_topic=pa.repeat(pa.scalar(topic), len(ok)),
        kafka_partition=take(partition_column),
        kafka_offset=take(offset_column),
    )
    vendor = columns["vendor_data"]
    columns["vendor_data"] = decode.string_map(list(VENDOR_KEYS), [pc.struct_field(vendor, k) for k in VENDOR_KEYS], len(ok))
    trades = schemas.build_table(schemas.TRADE, columns, len(ok))
    bad = rows.rejected()
    rejected = schemas.build_table(
        schemas.REJECTED,
        {
            "source": pa.repeat(pa.scalar(source), len(bad)),
            # A message without a usable exchange time belongs to the day it was consumed.
            "partition_date": pc.take(
                pc.if_else(pc.is_valid(wire.column("exchange_timestamp")), day, pa.scalar(now.date(), pa.date32())), bad
            ),
            "exchange": pc.take(pc.fill_null(wire.column("exchange"), exchange), bad),
            "symbol": pc.take(wire.column("symbol"), bad),
            "source_sequence": pc.take(wire.column("source_sequence"), bad),
            "kafka_topic": pa.repeat(pa.scalar(topic), len(bad)),
            "kafka_partition": pc.take(partition_column, bad),
            "kafka_offset": pc.take(offset_column, bad),
            "raw": pc.binary_slice(pc.take(values, bad), 0, -1),  # without the newline that ends each value
            "reason": pc.take(rows.reasons, bad),
            "rejected_at": pa.repeat(pa.scalar(now, pa.timestamp("us", tz="UTC")), len(bad)),
        },
        len(bad),
    )
    return trades, rejected


def _iso_day(text: pa.StringArray) -> pa.Array:
    """YYYY-MM-DD, exactly as the date prints -> date32; null otherwise (a few distinct values per batch)."""
    parsed = pc.cast(pc.strptime(text, "%Y-%m-%d", "s", error_is_null=True), pa.date32())
    return pc.if_else(pc.equal(pc.cast(parsed, pa.string()), text), parsed, pa.scalar(None, pa.date32()))


def _parse(values: pa.BinaryArray) -> tuple[pa.Table, pa.Array]:
    """Parse all values with Arrow's JSON reader; a value that is not one v2 JSON object gets a reason.

    A batch with bad messages is split in halves until each bad one stands alone, so a few bad
    messages cost a few extra parses, not one per message."""
    if not len(values):
        return _WIRE.empty_table(), pa.array([], pa.string())
    try:
        # A value holding a newline would parse as several rows: _read's row count catches it.
        return _read(values), pa.nulls(len(values), pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        if len(values) == 1:
            return pa.Table.from_pylist([{}], schema=_WIRE), pa.array([f"not a v2 trade JSON object: {exc}"], pa.string())
    half = len(values) // 2
    first, first_reasons = _parse(values.slice(0, half))
    second, second_reasons = _parse(values.slice(half))
    return pa.concat_tables([first, second]), pa.concat_arrays([first_reasons, second_reasons])


def _read(values: pa.BinaryArray) -> pa.Table:
    table = pjson.read_json(
        pa.BufferReader(lines(values)),  # zero-copy: a Python file object would be read under the GIL
        read_options=pjson.ReadOptions(block_size=4 << 20),  # several blocks parse on several cores
        parse_options=pjson.ParseOptions(explicit_schema=_WIRE, unexpected_field_behavior="ignore"),
    )
    if table.num_rows != len(values):
        raise pa.ArrowInvalid(f"{len(values)} messages parsed as {table.num_rows} rows")
    return table.combine_chunks()
