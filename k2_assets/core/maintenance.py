"""Iceberg table maintenance that keeps exactly-once intact: compaction, snapshot expiry, orphan files.

The live writer resumes from the highest Kafka offsets recorded in the table's snapshot lineage, and
its sequence tracker from the newest state the lineage holds. So every maintenance commit carries the
recorded offsets forward (maxima: restating them too low changes nothing) and the trackers' newest
state as of the snapshot the commit lands on (pyiceberg may rebase it over live commits after it was
built). Expiry never removes a snapshot that holds the highest recorded offset of any Kafka partition,
nor the newest one holding each tracker's state, so the lineage reads the same bookkeeping whatever
maintenance did, and a compaction moves those holders forward past an idle writer's last commit.

Compaction replaces exactly the files it read, so it runs on the partitions live writers still append
to: a commit that lands meanwhile is an append, and pyiceberg rebases the rewrite over it (snapshot
isolation, as Iceberg's RewriteFiles: the replaced files must still exist). A commit that replaced
any of them makes the attempt be made again on the new state. On an open day it merges by size tier,
so each row is rewritten a few times a day, not on every run; a closed day is merged whole. The merge
runs in a nicer child process, and sizes its files on disk.

Expiry only edits metadata; the files that only expired snapshots reached are deleted by orphan
removal, which deletes only files older than a grace period (an in-flight write's files are new).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import traceback
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse
from zoneinfo import ZoneInfo

import pyarrow.fs as pafs
from pyiceberg.exceptions import CommitFailedException, ValidationException
from pyiceberg.expressions import AlwaysTrue, BooleanExpression
from pyiceberg.io import FileIO
from pyiceberg.io.pyarrow import ArrowScan, PyArrowFileIO, _dataframe_to_data_files
from pyiceberg.manifest import DataFile
from pyiceberg.table import FileScanTask, Table, TableProperties
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.snapshots import Snapshot
from pyiceberg.utils.properties import property_as_int

from k2_assets.core import writer
from k2_assets.core.offsets import (
    OFFSETS_KEY,
    REJECTED_KEY,
    TRACKER_KEY,
    FencedTable,
    lineage,
    recorded_offsets,
    tracker_states,
)

CARRIED_PREFIXES = (OFFSETS_KEY, REJECTED_KEY)

TIME_TRAVEL_WINDOW = timedelta(days=7)  # promised to users: any snapshot of the last 7 days can be read
DENSE = timedelta(minutes=10)  # every snapshot of the last 10 minutes stays; older ones are thinned to one per THIN_TO
THIN_TO = timedelta(hours=1)
ORPHAN_GRACE = timedelta(days=3)  # an unreferenced file younger than this may belong to a write in flight
SMALL_FILE_BYTES = 32 * 2**20  # compaction rewrites files under this; larger ones are done
# An open day's files are tiered by size: tier 0 under FIRST_TIER_BYTES, each next tier up to TIER_GROWTH times the
# bound below; a tier is merged once it holds TIER_FILES files. A row is then rewritten about 4 times a day.
FIRST_TIER_BYTES = 2**20
TIER_GROWTH = 4
TIER_FILES = 4
# Compaction reads, sorts and writes in a child process this much nicer than its caller, so on a busy machine the
# live writers' commits come first; the merge waits, and the child's memory goes back when it ends.
REWRITE_NICENESS = 10
SYDNEY = ZoneInfo("Australia/Sydney")
T = TypeVar("T")


def open_days(now: datetime | None = None) -> set[date]:
    """The days live writers still append to: today's UTC day and the current ASX session."""
    now = now or datetime.now(UTC)
    return {now.astimezone(UTC).date(), now.astimezone(SYDNEY).date()}


def days_to_compact(lookback_days: int, now: datetime | None = None) -> list[date]:
    """The open days and the `lookback_days` closed days before them, oldest first (a deferred day is retried
    by the next hourly run)."""
    live = open_days(now)
    closed = min(live) - timedelta(days=1)
    return sorted(live | {closed - timedelta(days=i) for i in range(lookback_days)})


def files_to_rewrite(sizes: Sequence[int], *, final: bool, small_bytes: int = SMALL_FILE_BYTES) -> list[int]:
    """The indexes of the files (by size in bytes) a compaction merges: on a closed day (`final`) every file under
    `small_bytes`; on an open day the files of each size tier that holds TIER_FILES of them. An empty list when
    there is nothing to merge."""
    small = [i for i, size in enumerate(sizes) if size < small_bytes]
    if final:
        return small if len(small) > 1 else []
    tiers = defaultdict(list)
    for i in small:
        tiers[_tier(sizes[i])].append(i)
    return sorted(i for members in tiers.values() if len(members) >= TIER_FILES for i in members)


def carried_properties(table: Table) -> dict[str, str]:
    """The recorded offsets of the lineage (Kafka's and the rejects' marks), to be restated by a maintenance commit."""
    keys = {
        key
        for snapshot in table.metadata.snapshots
        for key in (snapshot.summary.additional_properties if snapshot.summary else {})
        if key.startswith(CARRIED_PREFIXES)
    }
    return {key: json.dumps({str(p): o for p, o in sorted(recorded_offsets(table, key).items())}) for key in keys}


@dataclass(frozen=True)
class CompactionResult:
    rows: int
    files_before: int
    files_after: int
    snapshot_id: int | None
    bytes_before: int  # of the files merged
    bytes_after: int
    attempts: int  # including the accepted one (a live writer's commits refuse the others)


def _tier(size: int) -> int:
    """0 under FIRST_TIER_BYTES, then one more for each TIER_GROWTH times as large."""
    tier, bound = 0, FIRST_TIER_BYTES
    while size >= bound:
        tier, bound = tier + 1, bound * TIER_GROWTH
    return tier


def compact(
    table: Table, where: BooleanExpression, *, final: bool, attempts: int = 20, small_bytes: int = SMALL_FILE_BYTES
) -> CompactionResult:
    """Merge the data files `where` selects that `files_to_rewrite` picks into one, rows unchanged, in one
    commit: on a closed day (`final`) all files under `small_bytes`, on an open day full size tiers. Files
    already that large stay, so a day that grows to gigabytes at live rates is not read again each run.

    The commit replaces exactly the files it read (Iceberg's rewrite of files), so it commutes with a live
    writer appending to the same partition: a partition that is still being written is compacted as it goes.
    pyiceberg rebases it over appends that land meanwhile (the table's `write.delete.isolation-level` is
    snapshot). A commit that replaced or deleted any of its files makes pyiceberg refuse it, and the attempt
    is made again on the new state; the rewritten file is written once and reused while its inputs stand."""
    done: dict = {"files": [], "written": [], "rows": None, "attempts": 0}  # kept across attempts: written once, reused
    table = FencedTable.of(table)
    table.restate = tracker_states  # as of the snapshot the commit lands on, also when pyiceberg rebases it

    def attempt() -> CompactionResult:
        done["attempts"] += 1
        table.refresh()
        snapshot = table.current_snapshot()
        if snapshot is None:
            return CompactionResult(0, 0, 0, None, 0, 0, done["attempts"])
        tasks = [t for t in table.scan(row_filter=where, snapshot_id=snapshot.snapshot_id).plan_files()]
        current = {t.file.file_path for t in tasks}
        if not done["files"] or not {f.file_path for f in done["files"]} <= current:
            # First attempt, or another compaction or a load replaced files meanwhile: read and write again.
            # (Files a live writer added since are simply not part of this rewrite.)
            chosen = files_to_rewrite([t.file.file_size_in_bytes for t in tasks], final=final, small_bytes=small_bytes)
            if not chosen:
                return CompactionResult(0, 0, 0, None, 0, 0, done["attempts"])
            done["files"] = [tasks[i].file for i in chosen]
            done["rows"], done["written"] = in_nicer_child(_rewrite, table.metadata, table.io, [tasks[i] for i in chosen])
        properties = {**carried_properties(table), "k2.maintenance": "compact"}
        with table.transaction() as tx:
            with tx.update_snapshot(snapshot_properties=properties).overwrite() as rewrite:
                for data_file in done["files"]:
                    rewrite.delete_data_file(data_file)
                for data_file in done["written"]:
                    rewrite.append_data_file(data_file)
        after = table.current_snapshot()
        return CompactionResult(
            done["rows"],
            len(done["files"]),
            len(done["written"]),
            after.snapshot_id if after else None,
            bytes_before=_bytes(done["files"]),
            bytes_after=_bytes(done["written"]),
            attempts=done["attempts"],
        )

    return _retried(attempt, attempts, "compaction")


def in_nicer_child(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` in a child process REWRITE_NICENESS nicer than this one, its exception re-raised here.

    A child that ends without answering (killed, out of memory, unable to start) raises at once, naming its exit
    code. An interrupt (a run stopped in Dagster) terminates the child rather than waiting for it."""
    spawn = multiprocessing.get_context("spawn")  # a fork of a threaded caller (the writer, Dagster) may deadlock
    receive, send = spawn.Pipe(duplex=False)
    child = spawn.Process(target=_answer, args=(send, function, args), name="k2-nicer-child", daemon=True)
    try:
        child.start()
        send.close()  # the child holds the only sending end: its exit ends the pipe
        try:
            ok, value, trace = receive.recv()
        except EOFError:
            child.join(5)
            raise ChildProcessError(
                f"{getattr(function, '__name__', function)} in a child process: it ended with exit code "
                f"{child.exitcode} before answering"
            ) from None
    except BaseException:
        if child.is_alive():
            child.terminate()
        raise
    finally:
        receive.close()
        child.join(5)
        if child.is_alive():  # deaf to SIGTERM: a daemonic child left running would hang this interpreter's exit
            child.kill()
            child.join()
    if not ok:
        raise value from ChildProcessError(f"in the child process:\n{trace}")
    return value


def _answer(send, function: Callable[..., T], args: tuple) -> None:
    """In the child: lower its priority, run `function(*args)` and send back (True, result, "") or (False, exception,
    its traceback)."""
    os.nice(REWRITE_NICENESS)
    try:
        answer = (True, function(*args), "")
    except Exception as exc:
        answer = (False, exc, traceback.format_exc())
    try:
        send.send(answer)
    except Exception as exc:  # an answer that does not pickle still says what it was
        send.send((False, RuntimeError(f"the child could not send back its {type(answer[1]).__name__}: {exc}"), answer[2]))
    finally:
        send.close()


def _bytes(files: Iterable[DataFile]) -> int:
    return sum(f.file_size_in_bytes for f in files)


def _rewrite(metadata: TableMetadata, io: FileIO, tasks: list[FileScanTask]) -> tuple[int, list[DataFile]]:
    """The rows of `tasks` in the writer's sort order, written as new data files: (rows, files)."""
    rows = ArrowScan(metadata, io, metadata.schema(), AlwaysTrue()).to_table(tasks)
    if "exchange_timestamp" in rows.column_names:
        rows = rows.sort_by(writer.SORT_KEYS)
    sized = _sized_on_disk(metadata, rows.nbytes, _bytes(task.file for task in tasks))
    files = list(_dataframe_to_data_files(sized, rows, io, uuid.uuid4()))
    flush_to_disk(file.file_path for file in files)
    return rows.num_rows, files


def flush_to_disk(locations: Iterable[str]) -> list[str]:
    """fsync the local files among `locations` (an object store's upload is durable once done); the paths flushed.

    The commit that swaps them in comes after, so a crash cannot leave the table naming files that never reached
    the disk. And the merge's tens of MiB are written out here, in the nicer child, rather than by the kernel's
    writeback while the live writer's commits wait behind it."""
    flushed = []
    for location in locations:
        parsed = urlparse(location)
        if parsed.scheme not in ("", "file"):
            continue
        path = unquote(parsed.path) if parsed.scheme else location
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        flushed.append(path)
    return flushed


def _sized_on_disk(metadata: TableMetadata, bytes_in_memory: int, bytes_on_disk: int) -> TableMetadata:
    """`metadata` with its target file size scaled by how much larger the rows are in memory than on disk.

    pyiceberg measures the target in Arrow's in-memory bytes (its `bin_pack_arrow_table`), Iceberg in bytes on
    disk. Unscaled, a merge of four 20 MiB files came out as four 20 MiB files again, each still small, and was
    merged again on every run."""
    if bytes_on_disk <= 0 or bytes_in_memory <= bytes_on_disk:
        return metadata
    name = TableProperties.WRITE_TARGET_FILE_SIZE_BYTES
    target = property_as_int(metadata.properties, name, TableProperties.WRITE_TARGET_FILE_SIZE_BYTES_DEFAULT)
    scaled = int(target * bytes_in_memory / bytes_on_disk)
    return metadata.model_copy(update={"properties": {**metadata.properties, name: str(scaled)}})


def _retried(attempt: Callable[[], T], attempts: int, what: str) -> T:
    """`attempt()`, made again while pyiceberg refuses its commit because another commit landed meanwhile (it
    validated against that commit, so nothing changed); each attempt reads the table's new state itself."""
    for _ in range(attempts):
        try:
            return attempt()
        except (ValidationException, CommitFailedException):
            continue
    raise CommitFailedException(f"{what} lost to concurrent commits {attempts} times in a row; a later run retries")


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


def expire(
    table: Table,
    retain: timedelta,
    now: datetime | None = None,
    dense: timedelta | None = None,
    thin_to: timedelta = THIN_TO,
    attempts: int = 20,
) -> int:
    """Expire snapshots older than `retain` (the time-travel window promised to users), keeping the
    current lineage down to every snapshot that holds the highest recorded Kafka offset of a partition
    (and the tracker state). With `dense`, snapshots older than that are thinned to the newest one of
    each `thin_to` interval: live commits come every second, and every snapshot kept costs each later
    commit time (docs/live-path.md, "Table maintenance"). Returns how many were expired.

    A live writer commits every second, so the expiry's commit often finds the table moved: it is computed
    again on the new state and made again (pyiceberg does not retry it)."""
    now = now or datetime.now(UTC)

    def attempt() -> int:
        table.refresh()
        doomed = _doomed(table, retain, now, dense, thin_to)
        if doomed:
            table.maintenance.expire_snapshots().by_ids(doomed).commit()
        return len(doomed)

    return _retried(attempt, attempts, "snapshot expiry")


def _doomed(table: Table, retain: timedelta, now: datetime, dense: timedelta | None, thin_to: timedelta) -> list[int]:
    cutoff_ms = int((now - retain).timestamp() * 1000)
    holders = {snapshot.snapshot_id for snapshot in _holders(table)}
    keep = {ref.snapshot_id for ref in table.metadata.refs.values()}  # branch and tag heads: pyiceberg refuses them
    for snapshot, _ in lineage(table):  # newest first, down to the oldest holder (by lineage, whatever the clocks say)
        if not holders:
            break
        keep.add(snapshot.snapshot_id)
        holders.discard(snapshot.snapshot_id)
    doomed = [s.snapshot_id for s in table.metadata.snapshots if s.timestamp_ms < cutoff_ms and s.snapshot_id not in keep]
    if dense is not None:
        dense_ms, every_ms = int((now - dense).timestamp() * 1000), max(1, int(thin_to.total_seconds() * 1000))
        older = [s for s in table.metadata.snapshots if cutoff_ms <= s.timestamp_ms < dense_ms]
        older.sort(key=lambda s: s.timestamp_ms)
        newest = {s.timestamp_ms // every_ms: s.snapshot_id for s in older}  # `as of` a time in an interval reads its newest
        doomed += [s.snapshot_id for s in older if s.snapshot_id not in keep and s.snapshot_id not in newest.values()]
    return doomed


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
