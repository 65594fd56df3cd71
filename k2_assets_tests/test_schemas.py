"""Schema evolution: every contract in schemas/ stays BACKWARD-compatible with its last released version.

Data written with the released schema (schemas/history/) must read with the current one, through Avro
schema resolution in fastavro. A record is built for every field of the released schema, so every field
type takes part; a deliberately incompatible change proves the check can fail.
"""

from __future__ import annotations

import copy
import io
import json
from datetime import UTC, date, datetime
from decimal import Decimal

import fastavro
import pytest

from k2_assets.core import live_codec, schemas

HISTORY = schemas.SCHEMA_DIR / "history"
CONTRACTS = sorted(p.stem for p in schemas.SCHEMA_DIR.glob("*.avsc"))


def sample(avro_type):
    """One valid value of an Avro type (as parsed from the .avsc JSON)."""
    if isinstance(avro_type, list):  # a union: its first non-null branch
        return sample(next(t for t in avro_type if t != "null"))
    if isinstance(avro_type, dict):
        logical, kind = avro_type.get("logicalType"), avro_type["type"]
        if logical == "date":
            return date(2024, 1, 1)
        if logical in ("timestamp-micros", "timestamp-millis"):
            return datetime(2024, 1, 1, 12, tzinfo=UTC)
        if logical == "decimal":
            return Decimal("1.5").quantize(Decimal(1).scaleb(-avro_type["scale"]))
        if kind == "enum":
            return avro_type["symbols"][0]
        if kind == "array":
            return [sample(avro_type["items"])]
        if kind == "map":
            return {"k": sample(avro_type["values"])}
        if kind == "record":
            return {f["name"]: sample(f["type"]) for f in avro_type["fields"]}
        return sample(kind)
    return {"string": "x", "bytes": b"x", "long": 1, "int": 1, "boolean": True, "double": 1.0, "float": 1.0, "null": None}[
        avro_type
    ]


def round_trip(writer_schema: dict, reader_schema: dict) -> list[dict]:
    record = sample(writer_schema)
    buffer = io.BytesIO()
    fastavro.writer(buffer, fastavro.parse_schema(copy.deepcopy(writer_schema)), [record])
    buffer.seek(0)
    return list(fastavro.reader(buffer, reader_schema=fastavro.parse_schema(copy.deepcopy(reader_schema))))


@pytest.mark.parametrize("name", CONTRACTS)
def test_every_contract_reads_data_written_with_its_released_version(name):
    released = HISTORY / f"{name}.avsc"
    assert released.is_file(), f"{name} has no released version: copy schemas/{name}.avsc to {released} when you release it"
    (record,) = round_trip(json.loads(released.read_text()), schemas.avro_schema(name))
    assert set(record) == {f["name"] for f in schemas.avro_schema(name)["fields"]}


def test_an_incompatible_change_is_caught():
    released = json.loads((HISTORY / "trade_v2.avsc").read_text())
    changed = copy.deepcopy(released)
    changed["fields"].append({"name": "venue_code", "type": "string"})  # required, no default: old data cannot fill it
    with pytest.raises(fastavro.read.SchemaResolutionError):
        round_trip(released, changed)


def test_live_messages_name_their_contract_and_its_version():
    headers = dict(live_codec.HEADERS)
    assert headers["k2-schema"] == b"k2.market.v2.Trade"
    canonical = fastavro.schema.to_parsing_canonical_form(fastavro.parse_schema(schemas.avro_schema(schemas.TRADE)))
    assert headers["k2-schema-fingerprint"] == fastavro.schema.fingerprint(canonical, "CRC-64-AVRO").encode()
