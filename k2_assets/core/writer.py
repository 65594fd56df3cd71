"""Idempotent Iceberg writes: a partition load replaces exactly what it owns, in one commit."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import And, BooleanExpression, EqualTo, In, IsNull
from pyiceberg.table import Table

SORT_KEYS = [("symbol", "ascending"), ("exchange_timestamp", "ascending"), ("source_sequence", "ascending")]


@dataclass(frozen=True)
class WriteResult:
    snapshot_id: int | None
    written: int
    skipped_existing: int
    skipped_by_file: dict[str, int] = field(default_factory=dict)  # source_file -> rows already in the table


def partition_filter(exchange: str, trade_date, symbols: list[str] | None = None, batch_only: bool = False) -> BooleanExpression:
    """Rows of one exchange session, optionally only some symbols and only rows that came from files."""
    expr: BooleanExpression = And(EqualTo("exchange", exchange), EqualTo("trade_date", trade_date.isoformat()))
    if symbols is not None:
        expr = And(expr, In("symbol", set(symbols)) if symbols else EqualTo("symbol", "\x00none"))
    if batch_only:
        expr = And(expr, IsNull("kafka_topic"))
    return expr


def replace_rows(
    table: Table,
    rows: pa.Table,
    where: BooleanExpression,
    *,
    keep: BooleanExpression | None = None,
    properties: dict[str, str] | None = None,
) -> WriteResult:
    """Delete what `where` matches and insert `rows`, atomically; reruns give the same table.

    `keep` selects rows that stay in the partition (e.g. live rows from Kafka): a new row whose
    message_id is already among them is not inserted again, so the table never holds it twice.
    """
    skipped, by_file = 0, {}
    if keep is not None and rows.num_rows:
        existing = table.scan(row_filter=keep, selected_fields=("message_id",)).to_arrow().column("message_id")
        if len(existing):
            fresh = pc.invert(pc.is_in(rows.column("message_id"), value_set=existing))
            skipped = rows.num_rows - pc.sum(fresh).as_py()
            if skipped and "source_file" in rows.column_names:
                counts = pc.value_counts(rows.filter(pc.invert(fresh)).column("source_file")).to_pylist()
                by_file = {c["values"]: c["counts"] for c in counts}
            rows = rows.filter(fresh)
    rows = rows.sort_by(SORT_KEYS) if "exchange_timestamp" in rows.column_names else rows
    before = table.current_snapshot()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Delete operation did not match any records")  # a first load
        if rows.num_rows:
            table.overwrite(rows, overwrite_filter=where, snapshot_properties=properties or {})
        else:
            table.delete(where, snapshot_properties=properties or {})
    after = table.current_snapshot()
    snapshot_id = after.snapshot_id if after is not None else None
    if before is not None and after is not None and before.snapshot_id == after.snapshot_id:
        snapshot_id = before.snapshot_id
    return WriteResult(snapshot_id, rows.num_rows, skipped, by_file)
