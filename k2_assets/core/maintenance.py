"""Iceberg table maintenance that keeps exactly-once intact: compaction, snapshot expiry, orphan files.

The live writer resumes from the highest Kafka offsets recorded in the table's snapshot lineage.
So every maintenance commit carries the recorded offsets (and the sequence tracker's state) forward,
and expiry never removes a snapshot that holds the highest recorded offset of any Kafka partition:
pyiceberg rebases a compaction over a writer's concurrent commit, so the compaction's restated
offsets may be older than its parent's, and the parent must survive expiry.

Expiry only edits metadata; the files that only expired snapshots reached are deleted by orphan
removal, which deletes only files older than a grace period (an in-flight write's files are new).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pyarrow.fs as pafs
from pyiceberg.expressions import BooleanExpression
from pyiceberg.io.pyarrow import PyArrowFileIO
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Snapshot

from k2_assets.core import writer
from k2_assets.core.offsets import OFFSETS_KEY, REJECTED_KEY, TRACKER_KEY, latest_property, lineage, recorded_offsets

CARRIED_PREFIXES = (OFFSETS_KEY, REJECTED_KEY)

TIME_TRAVEL_WINDOW = timedelta(days=7)  # promised to users: any snapshot of the last 7 days can be read
ORPHAN_GRACE = timedelta(days=3)  # an unreferenced file younger than this may belong to a write in flight
SYDNEY = ZoneInfo("Australia/Sydney")


def last_closed_day(now: datetime | None = None) -> date:
    """The newest day no writer appends to: before today's UTC day and before the current ASX (Sydney) session."""
    now = now or datetime.now(UTC)
    return min(now.astimezone(UTC).date(), now.astimezone(SYDNEY).date()) - timedelta(days=1)


def require_closed(day: date, now: datetime | None = None) -> None:
    """Refuse a day the live writer may still append to (compaction would race it)."""
    closed = last_closed_day(now)
    if day > closed:
        raise ValueError(
            f"refusing to compact {day.isoformat()}: the live writer may still append to today's UTC day and the "
            f"current ASX session; compact days up to {closed.isoformat()}"
        )


def carried_properties(table: Table) -> dict[str, str]:
    """The exactly-once bookkeeping of the lineage, to be restated by a maintenance commit."""
    keys = {
        key
        for snapshot in table.metadata.snapshots
        for key in (snapshot.summary.additional_properties if snapshot.summary else {})
        if key.startswith((*CARRIED_PREFIXES, TRACKER_KEY))
    }
    carried = {
        key: json.dumps({str(p): o for p, o in sorted(recorded_offsets(table, key).items())})
        for key in keys
        if key.startswith(CARRIED_PREFIXES)
    }
    for key in keys - carried.keys():  # each exchange's tracker state (offsets.tracker_key), the newest
        tracker = latest_property(table, key)
        if tracker:
            carried[key] = tracker
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


def _holders(table: Table) -> list[Snapshot]:
    """Snapshots expiry must keep so the lineage reads the same bookkeeping after it: for every recorded
    offset (each key and Kafka partition) the newest snapshot holding its highest value, and the newest
    snapshot holding each exchange's tracker state."""
    best: dict[tuple[str, int], tuple[int, Snapshot]] = {}
    trackers: dict[str, Snapshot] = {}
    for snapshot, properties in lineage(table):  # newest first
        for key, value in properties.items():
            if key.startswith(CARRIED_PREFIXES):
                for partition, offset in json.loads(value or "{}").items():
                    slot = (key, int(partition))
                    if slot not in best or offset > best[slot][0]:
                        best[slot] = (offset, snapshot)
            elif key.startswith(TRACKER_KEY) and value:
                trackers.setdefault(key, snapshot)
    return [snapshot for _, snapshot in best.values()] + list(trackers.values())


def expire(table: Table, retain: timedelta, now: datetime | None = None) -> int:
    """Expire snapshots older than `retain` (the time-travel window promised to users), keeping the
    current lineage down to every snapshot that holds the highest recorded Kafka offset of a partition
    (and the tracker state). Returns how many snapshots were expired."""
    now = now or datetime.now(UTC)
    table.refresh()
    cutoff_ms = int((now - retain).timestamp() * 1000)
    holders = {snapshot.snapshot_id for snapshot in _holders(table)}
    keep = {ref.snapshot_id for ref in table.metadata.refs.values()}  # branch and tag heads: pyiceberg refuses them
    for snapshot, _ in lineage(table):  # newest first, down to the oldest holder (by lineage, whatever the clocks say)
        if not holders:
            break
        keep.add(snapshot.snapshot_id)
        holders.discard(snapshot.snapshot_id)
    doomed = [s.snapshot_id for s in table.metadata.snapshots if s.timestamp_ms < cutoff_ms and s.snapshot_id not in keep]
    if not doomed:
        return 0
    table.maintenance.expire_snapshots().by_ids(doomed).commit()
    return len(doomed)


@dataclass(frozen=True)
class OrphanFile:
    path: str  # as the table addresses it, e.g. file:///... or s3://bucket/...
    size: int
    modified: datetime


def referenced_files(table: Table) -> set[str]:
    """Every file the table's metadata reaches: current and logged metadata files, statistics, and for every
    snapshot its manifest list, its manifests and their live data and delete files."""
    table.refresh()
    metadata = table.metadata
    paths = {table.metadata_location, *(entry.metadata_file for entry in metadata.metadata_log)}
    paths |= {s.statistics_path for s in metadata.statistics} | {s.statistics_path for s in metadata.partition_statistics}
    manifests = {}
    for snapshot in metadata.snapshots:
        paths.add(snapshot.manifest_list)
        manifests.update((m.manifest_path, m) for m in snapshot.manifests(table.io))
    paths |= set(manifests)
    for manifest in manifests.values():
        paths |= {entry.data_file.file_path for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True)}
    return {_key(path) for path in paths}


def _key(location: str) -> str:
    """A location as the filesystem lists it (file:///a/b -> /a/b, s3://bucket/k -> bucket/k)."""
    return PyArrowFileIO.parse_location(location)[2]


def _filesystem(table: Table) -> pafs.FileSystem:
    """The table's own pyarrow filesystem (credentials and endpoint from its FileIO properties)."""
    io = table.io if isinstance(table.io, PyArrowFileIO) else PyArrowFileIO(table.io.properties)
    scheme, netloc, _ = io.parse_location(table.location(), io.properties)
    return io.fs_by_scheme(scheme, netloc)


def find_orphan_files(table: Table, older_than: timedelta = ORPHAN_GRACE, now: datetime | None = None) -> list[OrphanFile]:
    """Files under the table's data and metadata directories that no snapshot, manifest or metadata file
    references, and that are older than `older_than` (younger ones may belong to a write in flight)."""
    now = now or datetime.now(UTC)
    location = table.location().rstrip("/")
    root = _key(location)
    provider = table.location_provider()
    directories = []
    for directory in (provider.data_path, provider.metadata_path):
        path = _key(directory).rstrip("/")
        if not path.startswith(root + "/"):
            raise ValueError(f"{directory} is outside the table location {location}: it may hold other tables' files")
        directories.append(path)
    fs = _filesystem(table)
    listed = [
        info
        for directory in directories
        for info in fs.get_file_info(pafs.FileSelector(directory, recursive=True, allow_not_found=True))
        if info.type == pafs.FileType.File
    ]
    referenced = referenced_files(table)  # after listing: a file committed meanwhile is seen as referenced
    cutoff = now - older_than
    return [
        OrphanFile(location + info.path[len(root) :], info.size, info.mtime)
        for info in listed
        if info.path not in referenced and info.mtime is not None and info.mtime < cutoff
    ]


def delete_files(table: Table, files: Iterable[OrphanFile]) -> list[str]:
    """Delete files (found by find_orphan_files) through the table's filesystem; returns what was deleted."""
    fs = _filesystem(table)
    deleted = []
    for orphan in files:
        try:
            fs.delete_file(_key(orphan.path))
        except FileNotFoundError:
            continue  # someone else removed it
        deleted.append(orphan.path)
    return deleted


def remove_orphan_files(table: Table, older_than: timedelta = ORPHAN_GRACE, now: datetime | None = None) -> list[str]:
    """Delete the table's orphan files older than `older_than` (see find_orphan_files); returns their paths."""
    return delete_files(table, find_orphan_files(table, older_than, now))
