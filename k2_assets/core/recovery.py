"""Disaster recovery of the Iceberg catalog: back it up, restore it, or rebuild it from the warehouse.

An Iceberg warehouse keeps each table's metadata beside its data, and K2's exactly-once state (Kafka offsets,
reject marks, tracker state) lives in the snapshot summaries of that metadata. So the catalog is only a pointer
per table to its current metadata file: a backup records those pointers, a restore puts them back (refusing to
roll a table back past newer metadata unless forced), and a rebuild finds each table's newest metadata file under
the warehouse and registers it again. The runbook is docs/runbooks/disaster-recovery.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
from contextlib import closing
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from glob import glob
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import NamespaceAlreadyExistsError, NoSuchTableError
from pyiceberg.io.pyarrow import PyArrowFileIO

from k2_assets.core import catalog as k2_catalog

MANIFEST = "k2-backup.json"
SQLITE_COPY = "catalog.db"
PG_DUMP = "catalog.pgdump"
METADATA_FILE = re.compile(r"^(\d+)-[0-9a-f-]+\.metadata\.json$")


class RecoveryError(Exception):
    """A recovery step K2 refuses, with what to do instead (one line)."""


@dataclass(frozen=True)
class TableState:
    metadata_location: str
    snapshot_id: int | None
    snapshots: int


def table_states(catalog: Catalog) -> dict[str, TableState]:
    """Every K2 table the catalog holds, with its current metadata file and snapshot."""
    states = {}
    for name in sorted(k2_catalog.TABLES):
        try:
            table = catalog.load_table(k2_catalog.table_identifier(name))
        except NoSuchTableError:
            continue
        current = table.current_snapshot()
        states[name] = TableState(
            table.metadata_location, current.snapshot_id if current else None, len(table.metadata.snapshots)
        )
    return states


# ---------------------------------------------------------------- the warehouse


def _filesystem(warehouse: str) -> tuple[pafs.FileSystem, str]:
    """The warehouse's filesystem (file:// or s3://, credentials from the environment as the catalog takes them)."""
    properties = k2_catalog.object_store_properties()
    io = PyArrowFileIO(properties)
    scheme, netloc, path = io.parse_location(warehouse, properties)
    return io.fs_by_scheme(scheme, netloc), path.rstrip("/")


def _location(warehouse: str, path: str) -> str:
    """A listed path as a location of the same scheme as the warehouse."""
    scheme = urlparse(warehouse).scheme
    return f"file://{path}" if scheme == "file" else f"{scheme}://{path}"


def version_of(location: str) -> int:
    match = METADATA_FILE.match(location.rsplit("/", 1)[-1])
    if not match:
        raise RecoveryError(f"{location} is not an Iceberg metadata file name (NNNNN-uuid.metadata.json)")
    return int(match.group(1))


def metadata_files(warehouse: str, name: str) -> list[str]:
    """The metadata files of `market.<name>` under the warehouse, oldest version first."""
    fs, root = _filesystem(warehouse)
    directory = f"{root}/{k2_catalog.NAMESPACE}/{name}/metadata"
    listed = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    files = [
        _location(warehouse, info.path)
        for info in listed
        if info.type == pafs.FileType.File and METADATA_FILE.match(info.base_name)
    ]
    return sorted(files, key=version_of)


def newest_metadata(warehouse: str, name: str) -> str | None:
    """The newest metadata file of `market.<name>`; refused when two files claim the newest version."""
    files = metadata_files(warehouse, name)
    if not files:
        return None
    newest = version_of(files[-1])
    candidates = [f for f in files if version_of(f) == newest]
    if len(candidates) > 1:
        # Two writers raced and one commit lost, or a metadata file was copied in: only the operator can tell.
        raise RecoveryError(
            f"market.{name}: {len(candidates)} metadata files claim version {newest} ({', '.join(sorted(candidates))}); "
            f"choose one with --metadata {name}=LOCATION"
        )
    return candidates[0]


# ---------------------------------------------------------------- rebuild


@dataclass(frozen=True)
class Registration:
    table: str
    metadata_location: str
    action: str  # "register", "already registered", "catalog points elsewhere"


def plan_rebuild(catalog: Catalog, warehouse: str, chosen: dict[str, str] | None = None) -> list[Registration]:
    """What a rebuild would do for each K2 table found under the warehouse."""
    chosen = chosen or {}
    unknown = sorted(set(chosen) - set(k2_catalog.TABLES))
    if unknown:
        raise RecoveryError(
            f"--metadata names no K2 table: {', '.join(unknown)} (tables: {', '.join(sorted(k2_catalog.TABLES))})"
        )
    plan = []
    for name in sorted(k2_catalog.TABLES):
        location = chosen.get(name) or newest_metadata(warehouse, name)
        if location is None:
            continue
        try:
            current = catalog.load_table(k2_catalog.table_identifier(name)).metadata_location
        except NoSuchTableError:
            current = None
        if current is None:
            action = "register"
        elif current == location:
            action = "already registered"
        else:
            action = "catalog points elsewhere"
        plan.append(Registration(name, location, action))
    return plan


def rebuild(
    catalog: Catalog, warehouse: str, chosen: dict[str, str] | None = None, progress=lambda items: items
) -> list[Registration]:
    """Register every K2 table the catalog lacks at its newest metadata file; a table the catalog already knows is
    left alone (it may be newer than anything listed), and one it points elsewhere is reported, not changed."""
    plan = plan_rebuild(catalog, warehouse, chosen)
    conflicts = [r for r in plan if r.action == "catalog points elsewhere"]
    if conflicts:
        raise RecoveryError(
            "the catalog already registers "
            + "; ".join(f"market.{r.table} at another metadata file than {r.metadata_location}" for r in conflicts)
            + ": rebuild only fills a lost catalog (use restore, or drop those entries first)"
        )
    try:
        catalog.create_namespace(k2_catalog.NAMESPACE)
    except NamespaceAlreadyExistsError:
        pass
    for registration in progress([r for r in plan if r.action == "register"]):
        catalog.register_table(k2_catalog.table_identifier(registration.table), registration.metadata_location)
    return plan


# ---------------------------------------------------------------- backup and restore


SQLITE_LEFTOVERS = ("-wal", "-shm", "-journal")


def _leftovers(path: Path) -> list[Path]:
    """The journal files beside a SQLite database: a new database at `path` would fail on a lost one's."""
    return [p for p in (Path(f"{path}{suffix}") for suffix in SQLITE_LEFTOVERS) if p.exists()]


def readable(catalog_uri: str) -> bool:
    """False for a SQLite catalog file that is not a sound database, or a deleted one whose journal files remain
    (a missing one is fine otherwise: it will be created)."""
    path = _sqlite_path(catalog_uri) if catalog_uri.startswith("sqlite:///") else None
    if path is None:
        return True
    if not path.exists():
        return not _leftovers(path)
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as con:
            return con.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    except sqlite3.DatabaseError:
        return False


def set_aside_if_unreadable(catalog_uri: str, now: datetime | None = None) -> Path | None:
    """Rename a SQLite catalog that is not a readable database, or the journal files a deleted one left, out of the
    way (never deleted); where they went."""
    if not catalog_uri.startswith("sqlite:///"):
        return None
    path = _sqlite_path(catalog_uri)
    if readable(catalog_uri):
        return None
    aside = path.with_name(f"{path.name}.unreadable-{(now or datetime.now(UTC)):%Y%m%dT%H%M%S}")
    leftovers = _leftovers(path)
    if path.exists():
        os.replace(path, aside)
    for leftover in leftovers:
        os.replace(leftover, Path(f"{aside}{leftover.name.removeprefix(path.name)}"))
    return aside


def _sqlite_path(uri: str) -> Path:
    return Path(unquote(uri.removeprefix("sqlite:///")))


def _pg_tool(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        raise RecoveryError(
            f"{name} not found: install PostgreSQL's client tools (Debian: apt-get install postgresql-client, or "
            f"`bash scripts/get-postgresql`) to back up or restore a PostgreSQL catalog"
        )
    return found


def _sqlite_copy(source: Path, target: Path) -> None:
    """sqlite3's online backup API: a consistent copy even while writers commit (both connections closed after)."""
    with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(target)) as dst:
        src.backup(dst)


def _pg(tool: str, *args: str) -> None:
    """Run one of PostgreSQL's client tools; its last line of error as a RecoveryError if it fails."""
    done = subprocess.run([_pg_tool(tool), *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        said = done.stderr.strip().splitlines()
        raise RecoveryError(f"{tool} failed: {said[-1] if said else f'exit code {done.returncode}'}")


def _pg_url(uri: str) -> str:
    """libpq's URL for a SQLAlchemy URI (postgresql+psycopg2://... -> postgresql://...)."""
    return re.sub(r"^postgresql\+\w+://", "postgresql://", uri)


def backup(catalog_uri: str, warehouse: str, out: Path, now: datetime | None = None) -> dict:
    """A consistent copy of the catalog database in `out`, with the metadata location of every table (while writers run)."""
    out.mkdir(parents=True, exist_ok=True)
    if catalog_uri.startswith("sqlite:///"):
        kind = "sqlite"
        source = _sqlite_path(catalog_uri)
        if not source.exists():
            raise RecoveryError(f"no catalog at {source}: nothing to back up")
        target = out / SQLITE_COPY
        target.unlink(missing_ok=True)
        _sqlite_copy(source, target)
        copy = target
        # The pointers as the copy holds them, not as the live catalog holds them by now.
        states = table_states(k2_catalog.open_catalog(f"sqlite:///{copy}", warehouse))
    elif catalog_uri.startswith("postgresql"):
        kind = "postgresql"
        copy = out / PG_DUMP
        # Read before the dump: the dump holds these pointers or newer ones, so a restore's rollback check errs safe.
        states = table_states(k2_catalog.open_catalog(catalog_uri, warehouse))
        _pg("pg_dump", "--format=custom", f"--file={copy}", _pg_url(catalog_uri))
    else:
        raise RecoveryError(f"K2 backs up SQLite and PostgreSQL catalogs, not {catalog_uri.split(':', 1)[0]}")
    manifest = {
        "created_at": (now or datetime.now(UTC)).isoformat(),
        "kind": kind,
        "file": copy.name,
        "bytes": copy.stat().st_size,
        "warehouse": warehouse,
        "tables": {name: asdict(state) for name, state in states.items()},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def backup_rotating(
    catalog_uri: str, warehouse: str, directory: Path, keep: int, now: datetime | None = None
) -> tuple[Path, dict]:
    """A new backup in `directory`/<UTC time>, keeping the newest `keep` backups there."""
    now = now or datetime.now(UTC)
    out = directory / now.strftime("%Y%m%dT%H%M%SZ")
    manifest = backup(catalog_uri, warehouse, out, now=now)
    backups = sorted(p for p in directory.iterdir() if (p / MANIFEST).exists())
    for old in backups[:-keep]:
        shutil.rmtree(old)
    return out, manifest


def read_manifest(backup_dir: Path) -> dict:
    path = backup_dir / MANIFEST
    if not path.exists():
        raise RecoveryError(f"{backup_dir} is not a K2 catalog backup (no {MANIFEST})")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class Rollback:
    table: str
    backed_up: str
    newest: str
    snapshots_lost: list[int]


def _snapshot_ids(location: str) -> set[int]:
    with PyArrowFileIO(k2_catalog.object_store_properties()).new_input(location).open() as stream:
        return {snapshot["snapshot-id"] for snapshot in json.load(stream).get("snapshots", [])}


def rollbacks(manifest: dict, warehouse: str) -> list[Rollback]:
    """Tables whose warehouse holds newer metadata than the backup: what a restore would roll back, and lose."""
    found = []
    for name, state in sorted(manifest["tables"].items()):
        newest = newest_metadata(warehouse, name)
        if newest is None or version_of(newest) <= version_of(state["metadata_location"]):
            continue
        lost = sorted(_snapshot_ids(newest) - _snapshot_ids(state["metadata_location"]))
        found.append(Rollback(name, state["metadata_location"], newest, lost))
    return found


def restore(catalog_uri: str, warehouse: str, backup_dir: Path, force: bool = False) -> tuple[dict, list[Rollback]]:
    """Put the backed-up catalog back; refused if that rolls a table back past newer metadata, unless `force`."""
    manifest = read_manifest(backup_dir)
    rolled = rollbacks(manifest, warehouse)
    if rolled and not force:
        raise RecoveryError(
            "restoring would roll back "
            + "; ".join(
                f"market.{r.table} from {r.newest.rsplit('/', 1)[-1]} to {r.backed_up.rsplit('/', 1)[-1]}"
                f" ({len(r.snapshots_lost)} newer snapshots lost)"
                for r in rolled
            )
            + ": `k2 catalog rebuild` keeps them; pass --force to restore anyway"
        )
    copy = backup_dir / manifest["file"]
    if manifest["kind"] == "sqlite":
        if not catalog_uri.startswith("sqlite:///"):
            raise RecoveryError("this backup is of a SQLite catalog; K2_CATALOG_URI names another kind")
        target = _sqlite_path(catalog_uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_name(target.name + ".restoring")
        staged.unlink(missing_ok=True)
        _sqlite_copy(copy, staged)
        for leftover in _leftovers(target):  # a corrupt catalog's leftovers must not replay over the copy
            leftover.unlink()
        os.replace(staged, target)
    else:
        if not catalog_uri.startswith("postgresql"):
            raise RecoveryError("this backup is of a PostgreSQL catalog; K2_CATALOG_URI names another kind")
        _pg("pg_restore", "--clean", "--if-exists", "--no-owner", f"--dbname={_pg_url(catalog_uri)}", str(copy))
    return manifest, rolled
