"""Iceberg table maintenance that keeps exactly-once intact: compaction and snapshot expiry.

The live writer resumes from the highest Kafka offsets recorded in the table's snapshot lineage.
So every maintenance commit carries the recorded offsets (and the sequence tracker's state) forward,
and expiry never removes the newest snapshot that records offsets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from pyiceberg.expressions import BooleanExpression
from pyiceberg.table import Table

from k2_assets.core import writer
from k2_assets.core.live_writer import OFFSETS_KEY, REJECTED_KEY, TRACKER_KEY, _latest_property, lineage, recorded_offsets

CARRIED_PREFIXES = (OFFSETS_KEY, REJECTED_KEY)


def carried_properties(table: Table) -> dict[str, str]:
    """The exactly-once bookkeeping of the lineage, to be restated by a maintenance commit."""
    keys = {
        key
        for snapshot in table.metadata.snapshots
        for key in (snapshot.summary.additional_properties if snapshot.summary else {})
        if key.startswith(CARRIED_PREFIXES)
    }
    carried = {key: json.dumps({str(p): o for p, o in sorted(recorded_offsets(table, key).items())}) for key in keys}
    tracker = _latest_property(table, TRACKER_KEY)
    if tracker:
        carried[TRACKER_KEY] = tracker
    return carried


@dataclass(frozen=True)
class CompactionResult:
    rows: int
    files_before: int
    files_after: int
    snapshot_id: int | None


def _files(table: Table, where: BooleanExpression) -> int:
    return sum(1 for _ in table.scan(row_filter=where).plan_files())


def compact(table: Table, where: BooleanExpression) -> CompactionResult:
    """Rewrite the rows `where` selects into as few files as possible, unchanged, in one commit.

    Commits are optimistic: if another writer commits first, pyiceberg raises and nothing changes.
    Run it on partitions no writer is appending to (past sessions and days)."""
    table.refresh()
    before = _files(table, where)
    rows = table.scan(row_filter=where).to_arrow()
    properties = {**carried_properties(table), "k2.maintenance": "compact"}
    result = writer.replace_rows(table, rows, where, properties=properties)
    return CompactionResult(rows.num_rows, before, _files(table, where), result.snapshot_id)


def expire(table: Table, retain: timedelta, now: datetime | None = None) -> int:
    """Expire snapshots older than `retain` (the time-travel window promised to users), keeping the
    newest snapshot that records Kafka offsets. Returns how many snapshots were expired."""
    now = now or datetime.now(timezone.utc)
    table.refresh()
    cutoff_ms = int((now - retain).timestamp() * 1000)
    current = table.current_snapshot()
    newest_with_offsets = next(
        (snapshot for snapshot, properties in lineage(table) if any(k.startswith(OFFSETS_KEY) for k in properties)), current
    )
    if newest_with_offsets is not None:
        cutoff_ms = min(cutoff_ms, newest_with_offsets.timestamp_ms)
    doomed = [s for s in table.metadata.snapshots if s.timestamp_ms < cutoff_ms and s.snapshot_id != (current.snapshot_id if current else None)]
    if not doomed:
        return 0
    table.maintenance.expire_snapshots().older_than(datetime.fromtimestamp(cutoff_ms / 1000, tz=timezone.utc)).commit()
    return len(doomed)
