"""The vendor-file ledger: what each file was and what became of every one of its lines, per load.

Every file a batch load meets gets a `SourceFile`: its size, sha256 and modification time, and its lines
read, written, rejected and skipped as duplicates, so that read = written + rejected + duplicates for
every file. A file that cannot be read at all (empty, a corrupt or truncated zip, unreadable, a name that
does not parse) has `error` set and one record of its own in market.rejected, and the other files load.
The rows go to market.source_files; `core.ledger` proves the sums from the ledger and the tables.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import lru_cache
from pathlib import Path

import pyarrow as pa

from k2_assets.core import schemas
from k2_assets.core.text import one_line


@dataclass
class SourceFile:
    path: str  # relative to the source directory
    size: int | None = None
    sha256: str | None = None
    modified_at: datetime | None = None
    read: int = 0
    written: int = 0
    rejected: int = 0
    duplicates: int = 0
    error: str | None = None

    @property
    def balanced(self) -> bool:
        return self.read == self.written + self.rejected + self.duplicates


def describe(path: Path, rel: str) -> SourceFile:
    """Size, modification time and sha256 of a file, or the reason it cannot be read."""
    try:
        stat = path.stat()
        digest = _sha256(path.absolute(), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    except OSError as exc:
        return SourceFile(rel, error=one_line(exc))
    return SourceFile(rel, stat.st_size, digest, datetime.fromtimestamp(stat.st_mtime, tz=UTC))


@lru_cache(maxsize=4096)
def _sha256(path: Path, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    """Hashed once per content: any write changes ctime, which no user can set back."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_rejects(
    files: list[SourceFile],
    *,
    source: str,
    partition_date: date,
    exchange: str,
    now: datetime,
    symbols: dict[str, str | None] | None = None,
) -> pa.Table:
    """One market.rejected record per file that could not be read: no line number, the reason, empty raw bytes."""
    bad = [f for f in files if f.error is not None]
    n = len(bad)
    columns = {
        "source": pa.array([source] * n, pa.string()),
        "partition_date": pa.array([partition_date] * n, pa.date32()),
        "exchange": pa.array([exchange] * n, pa.string()),
        "symbol": pa.array([(symbols or {}).get(f.path) for f in bad], pa.string()),
        "source_file": pa.array([f.path for f in bad], pa.string()),
        "source_row": pa.nulls(n, pa.int64()),
        "kafka_topic": pa.nulls(n, pa.string()),
        "kafka_partition": pa.nulls(n, pa.int32()),
        "kafka_offset": pa.nulls(n, pa.int64()),
        "raw": pa.array([b""] * n, pa.binary()),
        "reason": pa.array([f"file could not be read: {f.error}" for f in bad], pa.string()),
        "rejected_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
    }
    return schemas.build_table(schemas.REJECTED, columns, n)


def ledger_rows(
    files: list[SourceFile],
    *,
    source: str,
    partition_date: date,
    run_id: str,
    snapshot_id: int | None,
    previous: dict[str, str],
    now: datetime,
) -> pa.Table:
    """The market.source_files rows of one load; `previous` maps path -> sha256 at the source's last earlier load."""
    n = len(files)
    prior = [previous.get(f.path) for f in files]
    columns = {
        "source": pa.array([source] * n, pa.string()),
        "partition_date": pa.array([partition_date] * n, pa.date32()),
        "run_id": pa.array([run_id] * n, pa.string()),
        "path": pa.array([f.path for f in files], pa.string()),
        "size_bytes": pa.array([f.size for f in files], pa.int64()),
        "sha256": pa.array([f.sha256 for f in files], pa.string()),
        "modified_at": pa.array([f.modified_at for f in files], pa.timestamp("us", tz="UTC")),
        "lines_read": pa.array([f.read for f in files], pa.int64()),
        "lines_written": pa.array([f.written for f in files], pa.int64()),
        "lines_rejected": pa.array([f.rejected for f in files], pa.int64()),
        "lines_duplicate": pa.array([f.duplicates for f in files], pa.int64()),
        "file_error": pa.array([f.error for f in files], pa.string()),
        "previous_sha256": pa.array(prior, pa.string()),
        "changed": pa.array([p is not None and f.sha256 is not None and p != f.sha256 for f, p in zip(files, prior)], pa.bool_()),
        "snapshot_id": pa.array([snapshot_id] * n, pa.int64()),
        "loaded_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
    }
    return schemas.build_table(schemas.SOURCE_FILE, columns, n)
