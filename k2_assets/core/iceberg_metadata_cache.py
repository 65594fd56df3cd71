"""Commit latency that grows far less with the table's history. pyiceberg 0.12 spends, on every commit, time in
proportion to the snapshots the table keeps, and a live writer committing every second keeps thousands of them
between hourly maintenance runs (every commit of the hour, until expiry thins them):

- `Transaction.table_metadata` replays the staged updates on each read, and one append reads it about 20 times.
  Cached per (table metadata, staged updates), both immutable: a refresh or a staged update rebinds one of them,
  so the cache cannot go stale. Proposed upstream and approved there (apache/iceberg-python#3302, carried on in
  #3784).
- `update_table_metadata` ends in a deep copy of the whole metadata, every snapshot included; with the cache above
  a commit still calls it three times. The copy only guards against mutation in place, which neither pyiceberg's
  SQL catalog path nor K2 does: every update builds new lists and dicts (`model_copy(update=...)`), and the models
  are frozen. A shallow copy here, used only while pyiceberg's function is the one this was copied from.
- `SqlCatalog.commit_table` reads and parses the current metadata.json to check the commit's requirements. A
  metadata file never changes once written (its name carries a UUID), so the newest parse of each table's metadata
  directory is kept, including the file this process just wrote: one per table, so a reader that follows a writer
  holds one version, not a history of them.

- `ToOutputFile.table_metadata` dumps every snapshot on every commit, each summary through pydantic's Python
  serializer: 36 ms of a 74 ms commit at 4,400 snapshots. Each snapshot's JSON is kept from the table's last
  write, so a commit dumps the one it adds (the commit 47 ms; the file, 6 MB there, is still written whole). The
  bytes written are pyiceberg's own, byte for byte.
- Every manifest and manifest list read (`AvroFile.__enter__`) parses the schema JSON in the file's header into an
  Iceberg schema and resolves a reader tree from it: 4.5 ms of the 5.2 ms a manifest read took. A table's manifests
  share a few header schemas, so the pair is kept per (header schema, read schema, read types and enums); both are
  immutable once built. This is most of a manifest merge (every commit.manifest.min-count-to-merge commits, it reads
  every manifest of the table), and of a scan's planning.

A 5,000-trade append to `market.trades` on a SQLite catalog took 0.184 s at 1,500 snapshots with the first fix
alone, and 0.024 s with all three (0.018 s at 500); `bench/commit_history.py` measures it at the 4,400
snapshots an hourly maintenance run finds.
Drop each once a pyiceberg release has the equivalent.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import operator
import threading
from collections import OrderedDict
from datetime import datetime
from typing import NamedTuple

import pyiceberg.catalog
import pyiceberg.table
from pyiceberg.avro.decoder import new_decoder
from pyiceberg.avro.file import _SCHEMA_KEY, AvroFile
from pyiceberg.avro.resolver import resolve_reader
from pyiceberg.serializers import Compressor, FromInputFile, ToOutputFile
from pyiceberg.table import Transaction
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.update import _apply_table_update, _TableMetadataUpdateContext, _update_table_metadata_log
from pyiceberg.table.update import update_table_metadata as _deep_copying
from pyiceberg.typedef import UTF8
from pyiceberg.utils.config import Config
from pyiceberg.utils.datetime import datetime_to_millis

# pyiceberg 0.12.0's functions, hashed: each copy below is used only while its original matches.
COPIED_FROM = {
    "update_table_metadata": "cdfaa6553c2f4d68",
    "AvroFile.__enter__": "ee6d6eda1ce049c8",
    "ToOutputFile.table_metadata": "5fae1315550ee2b5",
}
log = logging.getLogger("k2.catalog")


def update_table_metadata(
    base_metadata: TableMetadata,
    updates: tuple,
    enforce_validation: bool = False,
    metadata_location: str | None = None,
) -> TableMetadata:
    """pyiceberg's `update_table_metadata`, less its final deep copy."""
    if enforce_validation:  # a table's first metadata: small, and rebuilt from a dump
        return _deep_copying(base_metadata, updates, enforce_validation, metadata_location)
    context = _TableMetadataUpdateContext()
    new_metadata = base_metadata
    for update in updates:
        new_metadata = _apply_table_update(update, new_metadata, context)
    if context.has_changes():
        if metadata_location:
            new_metadata = _update_table_metadata_log(new_metadata, metadata_location, base_metadata.last_updated_ms)
        if base_metadata.last_updated_ms == new_metadata.last_updated_ms:
            new_metadata = new_metadata.model_copy(update={"last_updated_ms": datetime_to_millis(datetime.now().astimezone())})
    new_metadata.spec().check_compatible(new_metadata.schema())
    new_metadata.sort_order().check_compatible(new_metadata.schema())
    return new_metadata.model_copy()


def _table_metadata(self: Transaction) -> TableMetadata:
    base, updates = self._table.metadata, self._updates
    cached = self.__dict__.get("_k2_metadata")
    if cached is None or cached[0] is not base or cached[1] is not updates:
        cached = self.__dict__["_k2_metadata"] = (base, updates, update_table_metadata(base, updates))
    return cached[2]


_parsed: dict[str, tuple[str, TableMetadata]] = {}  # metadata directory -> its newest location kept, and its parse
_parsed_lock = threading.Lock()
_read_file = FromInputFile.table_metadata
_write_file = ToOutputFile.table_metadata


def _directory(location: str) -> str:
    return location.rsplit("/", 1)[0]


def _keep(location: str, metadata: TableMetadata) -> None:
    with _parsed_lock:
        _parsed[_directory(location)] = (location, metadata)


def _read_metadata(input_file, encoding: str = "utf-8") -> TableMetadata:
    with _parsed_lock:
        kept = _parsed.get(_directory(input_file.location))
    if kept is not None and kept[0] == input_file.location:
        return kept[1]
    metadata = _read_file(input_file, encoding)
    _keep(input_file.location, metadata)
    return metadata


def _write_and_keep(metadata: TableMetadata, output_file, overwrite: bool = False) -> None:
    _write_file(metadata, output_file, overwrite)
    _keep(output_file.location, metadata)


def _write_metadata(metadata: TableMetadata, output_file, overwrite: bool = False) -> None:
    """pyiceberg's `ToOutputFile.table_metadata`, each snapshot serialized once (`_metadata_json`)."""
    with output_file.create(overwrite=overwrite) as output_stream:
        # As pyiceberg: None values are dumped only to write a None current-snapshot-id as -1.
        exclude_none = not Config().get_bool("legacy-current-snapshot-id")
        json_bytes = _metadata_json(metadata, _directory(output_file.location)) if exclude_none else None
        if json_bytes is None:
            json_bytes = metadata.model_dump_json(exclude_none=exclude_none).encode(UTF8)
        output_stream.write(Compressor.get_compressor(output_file.location).bytes_compressor()(json_bytes))
    _keep(output_file.location, metadata)


class _Dumped(NamedTuple):
    snapshots: list  # the snapshots of the table's last write, in order
    joined: bytes  # their JSON, comma-separated
    by_id: dict[int, tuple]  # snapshot id -> (snapshot, its JSON)


_SNAPSHOTS_MARK = '"snapshots":[]'
_dumped: dict[str, _Dumped] = {}  # metadata directory -> its last write's snapshots
_dumped_lock = threading.Lock()


def _metadata_json(metadata: TableMetadata, directory: str) -> bytes | None:
    """The metadata as pyiceberg dumps it, with the snapshots' JSON kept from the table's last write: a snapshot
    never changes once committed (the models are frozen; a change is a new object), and a commit adds one at the
    end. Dumping thousands of snapshots, each summary through pydantic's Python serializer, was half of a commit at
    depth. None where pyiceberg writes them otherwise (format v1 drops their sequence numbers)."""
    if metadata.format_version < 2:
        return None
    rest = metadata.model_copy(update={"snapshots": []}).model_dump_json()
    if rest.count(_SNAPSHOTS_MARK) != 1:
        return None
    snapshots = metadata.snapshots
    with _dumped_lock:
        last = _dumped.get(directory)
        if last is not None and len(snapshots) >= len(last.snapshots) and all(map(operator.is_, last.snapshots, snapshots)):
            by_id = last.by_id  # appended to: the usual commit
            added = [_snapshot_entry(snapshot, by_id) for snapshot in snapshots[len(last.snapshots) :]]
            joined = b",".join([last.joined, *added]) if last.joined else b",".join(added)
        else:  # the first write here, or expiry removed some: each snapshot's JSON from its last dump
            kept = last.by_id if last else {}
            by_id = {s.snapshot_id: kept[s.snapshot_id] for s in snapshots if s.snapshot_id in kept}
            joined = b",".join([_snapshot_entry(snapshot, by_id) for snapshot in snapshots])
        _dumped[directory] = _Dumped(list(snapshots), joined, by_id)
    head, tail = rest.encode(UTF8).split(_SNAPSHOTS_MARK.encode(), 1)
    return b"".join([head, b'"snapshots":[', joined, b"]", tail])


def _snapshot_entry(snapshot, by_id: dict[int, tuple]) -> bytes:
    """The snapshot's JSON, dumped now unless `by_id` holds it; `by_id` then holds it."""
    entry = by_id.get(snapshot.snapshot_id)
    if entry is None or entry[0] is not snapshot:
        entry = by_id[snapshot.snapshot_id] = (snapshot, snapshot.model_dump_json().encode(UTF8))
    return entry[1]


_READERS_KEPT = 64
_readers: OrderedDict[tuple, tuple] = OrderedDict()  # key -> (read schema, file schema, reader)
_readers_lock = threading.Lock()
_enter_avro_file = AvroFile.__enter__


def _enter_with_kept_reader(self: AvroFile) -> AvroFile:
    """pyiceberg's `AvroFile.__enter__`, with the header's schema and its reader kept by what they are built from.
    The read schema is keyed by identity (pyiceberg passes module constants) and held, so its id is not reused."""
    with self.input_file.open() as f:
        self.decoder = new_decoder(f.read())
    self.header = self._read_header()
    types, enums = tuple(self.read_types.items()), tuple(self.read_enums.items())
    key = (self.header.meta.get(_SCHEMA_KEY), id(self.read_schema), types, enums)
    with _readers_lock:
        kept = _readers.get(key)
        if kept is not None:
            _readers.move_to_end(key)
    if kept is None or kept[0] is not self.read_schema:
        schema = self.header.get_schema()
        kept = (self.read_schema, schema, resolve_reader(schema, self.read_schema or schema, self.read_types, self.read_enums))
        with _readers_lock:
            _readers[key] = kept
            while len(_readers) > _READERS_KEPT:
                _readers.popitem(last=False)
    _, self.schema, self.reader = kept
    if not self.read_schema:
        self.read_schema = self.schema
    return self


def _copied_from_this_pyiceberg(name: str, function) -> bool:
    try:
        return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16] == COPIED_FROM[name]
    except OSError:  # installed without its source
        return False


def install() -> None:
    """Replace pyiceberg's functions once per process (idempotent)."""
    if Transaction.__dict__.get("table_metadata") is not _PROPERTY:
        Transaction.table_metadata = _PROPERTY
        if _copied_from_this_pyiceberg("update_table_metadata", _deep_copying):
            pyiceberg.table.update_table_metadata = update_table_metadata
            pyiceberg.catalog.update_table_metadata = update_table_metadata
        else:
            log.warning("pyiceberg's update_table_metadata changed since K2 copied it: its deep copy stays")
        if _copied_from_this_pyiceberg("AvroFile.__enter__", _enter_avro_file):
            AvroFile.__enter__ = _enter_with_kept_reader
        else:
            log.warning("pyiceberg's AvroFile.__enter__ changed since K2 copied it: every read parses its header again")
        FromInputFile.table_metadata = staticmethod(_read_metadata)
        if _copied_from_this_pyiceberg("ToOutputFile.table_metadata", _write_file):
            ToOutputFile.table_metadata = staticmethod(_write_metadata)
        else:
            log.warning("pyiceberg's ToOutputFile.table_metadata changed since K2 copied it: every write dumps every snapshot")
            ToOutputFile.table_metadata = staticmethod(_write_and_keep)


_PROPERTY = property(_table_metadata)
