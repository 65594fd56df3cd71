"""Kafka offsets recorded in Iceberg snapshots, and the fence that keeps N writers exactly once.

Every live commit records, in its snapshot summary, the next offset to read for the Kafka partitions
it covers, under a key that names the topic *and its incarnation* (`k2.kafka.offsets.<topic>@<id>`):
offsets of a deleted and re-created topic, or of a restarted in-memory broker, never apply to the new
one. A partition's recorded offset is the highest one in the table's current lineage.

A commit is conditional (see `FencedTable`): right before pyiceberg sends it, and again before every
one of its automatic retries, the offsets recorded in the snapshot the commit will be applied on are
compared with where the batch started. The catalog applies the commit only if the branch still points
at that snapshot, so check and commit are one atomic step: a writer that lost the race, a zombie
that resumes after SIGSTOP, or a writer whose partition moved to another group member, gets
`Fenced` and writes nothing.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Iterator

from pyiceberg.exceptions import ValidationException
from pyiceberg.table import Table
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.snapshots import Summary
from pyiceberg.table.update import AddSnapshotUpdate, AssertRefSnapshotId

OFFSETS_KEY = "k2.kafka.offsets."
REJECTED_KEY = "k2.kafka.rejected."
TRACKER_KEY = "k2.sequence.tracker"
BATCH_KEY = "k2.batch"
INCARNATION_SEPARATOR = "@"


def key(prefix: str, topic: str, incarnation: str) -> str:
    """The snapshot-property key of one topic incarnation's offsets (prefix OFFSETS_KEY or REJECTED_KEY)."""
    return f"{prefix}{topic}{INCARNATION_SEPARATOR}{incarnation}"


def tracker_key(exchange: str) -> str:
    """The snapshot-property key of one exchange's sequence-tracker state. Binance spot keeps the key K2 used
    before it took a second market, so existing tables resume with their state."""
    return TRACKER_KEY if exchange == "BINANCE" else f"{TRACKER_KEY}.{exchange}"


def lineage(table: Table | TableMetadata, snapshot_id: int | None = None) -> Iterator[tuple[object, dict]]:
    """The snapshots of the current branch (or ending at `snapshot_id`), newest first, with their summary properties."""
    metadata = table.metadata if isinstance(table, Table) else table
    by_id = {s.snapshot_id: s for s in metadata.snapshots}
    snapshot = by_id.get(snapshot_id) if snapshot_id is not None else metadata.current_snapshot()
    while snapshot is not None:
        yield snapshot, (snapshot.summary.additional_properties if snapshot.summary else {})
        snapshot = by_id.get(snapshot.parent_snapshot_id) if snapshot.parent_snapshot_id is not None else None


def recorded_offsets(table: Table | TableMetadata, key: str, snapshot_id: int | None = None) -> dict[int, int]:
    """Highest next-offset per partition recorded under `key` in the lineage."""
    offsets: dict[int, int] = {}
    for _, properties in lineage(table, snapshot_id):
        _merge(offsets, properties.get(key))
    return offsets


def latest_property(table: Table, key: str) -> str | None:
    """The value of `key` in the newest snapshot of the current lineage that has it."""
    return next((properties[key] for _, properties in lineage(table) if properties.get(key)), None)


def keys_for_topic(table: Table, prefix: str, topic: str) -> set[str]:
    """Every incarnation key of `topic` under `prefix` that the lineage records."""
    start = f"{prefix}{topic}{INCARNATION_SEPARATOR}"
    return {k for _, properties in lineage(table) for k in properties if k.startswith(start)}


def _merge(offsets: dict[int, int], recorded: str | None) -> None:
    for partition, offset in json.loads(recorded or "{}").items():
        offsets[int(partition)] = max(offsets.get(int(partition), 0), offset)


class OffsetIndex:
    """Recorded offsets under one key at any snapshot, walking only the snapshots added since the last
    answer (a writer asks before every commit; a day holds tens of thousands of snapshots)."""

    def __init__(self, key: str, remembered: int = 16):
        self.key = key
        self._at: OrderedDict[int, dict[int, int]] = OrderedDict()
        self._remembered = remembered

    def at(self, metadata: TableMetadata, snapshot_id: int | None) -> dict[int, int]:
        if snapshot_id is None:
            return {}
        if snapshot_id in self._at:
            return dict(self._at[snapshot_id])
        newer: list[str | None] = []
        offsets: dict[int, int] = {}
        for snapshot, properties in lineage(metadata, snapshot_id):
            if snapshot.snapshot_id in self._at:
                offsets = dict(self._at[snapshot.snapshot_id])
                break
            newer.append(properties.get(self.key))
        for recorded in reversed(newer):
            _merge(offsets, recorded)
        self._at[snapshot_id] = dict(offsets)
        while len(self._at) > self._remembered:
            self._at.popitem(last=False)
        return offsets


class Fenced(ValidationException):
    """The recorded offsets moved under this batch: another writer owns it now. The batch is discarded.

    A ValidationException, so pyiceberg deletes the files it wrote for the refused commit."""


Fence = Callable[[TableMetadata, int | None], None]


class FencedTable(Table):
    """A table whose every commit attempt first runs `fence(metadata, parent_snapshot_id)`.

    `parent_snapshot_id` is the snapshot the attempt asserts the branch still points at, so the
    fence judges exactly the state the catalog will accept the commit on, also inside pyiceberg's
    automatic retry, which rebases an append onto a concurrent writer's snapshot."""

    fence: Fence | None = None
    # Properties to state in the new snapshot as of the snapshot it lands on (the parent pyiceberg rebased it onto).
    restate: Callable[[TableMetadata, int | None], dict[str, str]] | None = None

    @classmethod
    def of(cls, table: Table) -> FencedTable:
        return cls(table.name(), table.metadata, table.metadata_location, table.io, table.catalog, table.config)

    def _do_commit(self, updates, requirements) -> None:
        parent = next(
            (r.snapshot_id for r in requirements if isinstance(r, AssertRefSnapshotId) and r.ref == "main"),
            self.metadata.current_snapshot_id,
        )
        if self.fence is not None:
            self.fence(self.metadata, parent)
        if self.restate is not None:
            stated = self.restate(self.metadata, parent)
            updates = tuple(_stating(u, stated) if isinstance(u, AddSnapshotUpdate) else u for u in updates)
        super()._do_commit(updates, requirements)


def _stating(update: AddSnapshotUpdate, properties: dict[str, str]) -> AddSnapshotUpdate:
    """`update` with `properties` in its snapshot's summary (the summary lives only in the table metadata)."""
    summary = update.snapshot.summary
    restated = Summary(summary.operation, **{**summary.additional_properties, **properties})
    return AddSnapshotUpdate(snapshot=update.snapshot.model_copy(update={"summary": restated}))


def tracker_states(metadata: TableMetadata, snapshot_id: int | None) -> dict[str, str]:
    """Each exchange's newest sequence-tracker state in the lineage ending at `snapshot_id`."""
    states: dict[str, str] = {}
    for _, properties in lineage(metadata, snapshot_id):
        for key, value in properties.items():
            if key.startswith(TRACKER_KEY) and value:
                states.setdefault(key, value)
    return states


def landed(table: Table, token: str, depth: int = 200) -> int | None:
    """The snapshot id of a commit carrying `token` (BATCH_KEY) among the newest `depth` of the lineage:
    after an error of unknown outcome (a connection lost mid-commit), whether the commit happened."""
    for i, (snapshot, properties) in enumerate(lineage(table)):
        if properties.get(BATCH_KEY) == token:
            return snapshot.snapshot_id
        if i >= depth:
            break
    return None
