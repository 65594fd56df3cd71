"""Shared by the batch sources: write one partition to Iceberg and describe it in Dagster."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
from prometheus_client import CollectorRegistry
from pyiceberg.expressions import And, BooleanExpression, EqualTo, NotEqualTo

from k2_assets.core import integrity, source_files, writer
from k2_assets.core.decode import Batch
from k2_assets.core.metrics import GapMetrics, LoadMetrics
from k2_assets.core.text import markdown_table
from k2_assets.defs.resources import IcebergResource
from k2_assets.defs.run_metrics import LOADS, publish


def reconcile_gaps(
    iceberg: IcebergResource,
    stored: pa.Table,
    *,
    exchange: str,
    session_date: date,
    detected_by: str,
    explained: dict | None = None,
    filled_how: str = "late_arrival",
    answers: dict | None = None,
    gap_metrics: GapMetrics | None = None,
) -> pa.Table:
    """Bring market.sequence_gaps up to date with a stored trades partition (counted in gap_metrics); the day's gap rows."""
    resets = exchange == "ASX"  # ASX numbers each session from 1; Binance trade ids run on across days
    last_before = None if resets else integrity.last_before(iceberg.table("trades"), exchange, session_date)
    return integrity.reconcile_partition(
        iceberg.table("sequence_gaps"),
        integrity.partition_holes(stored, resets, last_before),
        exchange=exchange,
        session_date=session_date,
        detected_by=detected_by,
        now=datetime.now(UTC),
        explained=explained,
        filled_how=filled_how,
        answers=answers,
        metrics=gap_metrics,
    )


def write_partition(
    context: dg.AssetExecutionContext,
    iceberg: IcebergResource,
    batch: Batch,
    *,
    kind: str,
    exchange: str,
    session_date: date,
    where: BooleanExpression,
    keep: BooleanExpression | None = None,
    stored_where: BooleanExpression | None = None,
    extra_metadata: dict | None = None,
) -> dg.MaterializeResult:
    """Replace the partition's rows and its rejects, record its files and gaps, report it all (and push its metrics).

    The rules run as the asset's own checks (`defs.rule_checks`), on the snapshots this reports. `stored_where` is
    the partition as it stands after the write (default: the exchange's session)."""
    started = time.monotonic()
    registry = CollectorRegistry()
    load, gap_metrics = LoadMetrics(registry), GapMetrics(registry, exchanges=(exchange,)) if kind == "trades" else None
    source = context.asset_key.to_user_string()
    properties = {"k2.source": source, "k2.partition": context.partition_key, "k2.run_id": context.run.run_id}
    result = writer.replace_rows(iceberg.table(kind), batch.rows, where, keep=keep, properties=properties)
    rejected_where = And(EqualTo("source", source), EqualTo("partition_date", session_date.isoformat()))
    rejected = writer.replace_rows(iceberg.table("rejected"), batch.rejected, rejected_where, properties=properties)
    context.log.info(
        f"{source} {context.partition_key}: read {batch.read}, wrote {result.written}, "
        f"already present {result.skipped_existing}, rejected {batch.rejected.num_rows}"
    )
    for file in batch.files:  # a row already in the table (from the live stream) is this file's duplicate
        moved = result.skipped_by_file.get(file.path, 0)
        file.written, file.duplicates = file.written - moved, file.duplicates + moved
    ledger_rows = record_files(context, iceberg, batch, source=source, session_date=session_date, snapshot_id=result.snapshot_id)
    stored = (
        iceberg.table(kind)
        .scan(row_filter=stored_where or writer.partition_filter(exchange, session_date), snapshot_id=result.snapshot_id)
        .to_arrow()
        if result.snapshot_id is not None
        else batch.rows.schema.empty_table()
    )
    if kind == "trades":
        reconcile_gaps(
            iceberg,
            stored,
            exchange=exchange,
            session_date=session_date,
            detected_by=source,
            explained=integrity.rejected_sequences(batch.rejected),
            gap_metrics=gap_metrics,
        )
    metadata = {
        "dagster/row_count": stored.num_rows,
        "rows_read": batch.read,
        "rows_written": result.written,
        "rows_already_present": result.skipped_existing,
        "rows_rejected": batch.rejected.num_rows,
        "snapshot_id": str(result.snapshot_id),
        "rejected_snapshot_id": str(rejected.snapshot_id),
        "table": f"market.{kind}",
        "rows_duplicate_skipped": batch.duplicates + result.skipped_existing,
        "files": dg.MetadataValue.md(files_table(batch.files)),
        "unreadable_files": dg.MetadataValue.json({f.path: f.error for f in batch.files if f.error is not None}),
        "changed_files": dg.MetadataValue.json(
            sorted(ledger_rows.filter(ledger_rows.column("changed")).column("path").to_pylist())
        ),
        **summary(batch.rows),
        **(extra_metadata or {}),
    }
    if batch.rejected.num_rows:
        reasons = batch.rejected.group_by("reason").aggregate([("reason", "count")]).sort_by([("reason_count", "descending")])
        metadata["rejected_reasons"] = dg.MetadataValue.md(markdown_table(("reason", "rows"), zip(*reasons.to_pydict().values())))
    load.read.labels(kind).inc(batch.read)
    load.written.labels(kind).inc(result.written)
    load.rejected.labels(kind).inc(batch.rejected.num_rows)
    load.seconds.labels(kind).observe(time.monotonic() - started)
    publish(context, LOADS, registry)
    return dg.MaterializeResult(metadata=metadata)


def record_files(
    context: dg.AssetExecutionContext,
    iceberg: IcebergResource,
    batch: Batch,
    *,
    source: str,
    session_date: date,
    snapshot_id: int | None,
) -> pa.Table:
    """The load's rows in market.source_files, flagging files whose bytes changed since their last load."""
    table = iceberg.table("source_files")
    run_id = context.run.run_id
    earlier = table.scan(
        row_filter=And(EqualTo("source", source), NotEqualTo("run_id", run_id)), selected_fields=("path", "sha256", "loaded_at")
    ).to_arrow()
    previous = {row["path"]: row["sha256"] for row in earlier.sort_by("loaded_at").to_pylist()}  # the latest wins
    rows = source_files.ledger_rows(
        batch.files,
        source=source,
        partition_date=session_date,
        run_id=run_id,
        snapshot_id=snapshot_id,
        previous=previous,
        now=datetime.now(UTC),
    )
    # Appended: a run loads its partition once (K2 sets no step retries; a re-execution is a new run).
    if rows.num_rows:
        table.append(rows, snapshot_properties={"k2.source": source, "k2.run_id": run_id})
    for path in rows.filter(rows.column("changed")).column("path").to_pylist():
        context.log.warning(f"{path}: its bytes changed since its last load by {source}; this load reads the new ones")
    for file in batch.files:
        if file.error is not None:
            context.log.warning(f"{file.path}: could not be read ({file.error}); one rejected record, the other files loaded")
    return rows


def files_table(files: list[source_files.SourceFile]) -> str:
    """Per vendor file: what became of its lines (markdown, shown in the UI)."""
    return markdown_table(
        ("file", "read", "written", "rejected", "duplicates", "error"),
        ((f.path, f.read, f.written, f.rejected, f.duplicates, f.error) for f in files),
    )


def summary(rows: pa.Table) -> dict:
    """Symbols, per-symbol counts and the time range of what was written."""
    if rows.num_rows == 0:
        return {"symbols": dg.MetadataValue.json([])}
    time = "exchange_timestamp" if "exchange_timestamp" in rows.column_names else "bar_start"
    per_symbol = rows.group_by("symbol").aggregate([("symbol", "count"), (time, "min"), (time, "max")]).sort_by("symbol")
    columns = ("symbol", "symbol_count", f"{time}_min", f"{time}_max")
    table = markdown_table(
        ("symbol", "rows", "first (UTC)", "last (UTC)"),
        (
            (s, n, f"{first:%Y-%m-%d %H:%M:%S.%f}", f"{last:%Y-%m-%d %H:%M:%S.%f}")
            for s, n, first, last in zip(*(per_symbol.column(c).to_pylist() for c in columns))
        ),
    )
    ts = rows.column(time)
    return {
        "symbols": dg.MetadataValue.json(per_symbol.column("symbol").to_pylist()),
        "per_symbol": dg.MetadataValue.md(table),
        "first_timestamp": pc.min(ts).as_py().isoformat(),
        "last_timestamp": pc.max(ts).as_py().isoformat(),
    }
