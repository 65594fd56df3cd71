"""The Iceberg catalog and K2's tables: namespace `market`, schemas derived from the Avro contracts."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from pyiceberg.catalog import Catalog
from pyiceberg.catalog.sql import SqlCatalog, SqlCatalogBaseTable
from pyiceberg.exceptions import CommitFailedException, NamespaceAlreadyExistsError, NoSuchTableError, TableAlreadyExistsError
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.table import Table
from pyiceberg.table.sorting import SortField, SortOrder
from pyiceberg.transforms import IdentityTransform
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from k2_assets.core import iceberg_metadata_cache, schemas
from k2_assets.core.text import one_line

iceberg_metadata_cache.install()

log = logging.getLogger("k2.catalog")
NAMESPACE = "market"

# Small metadata: merge manifests on commit, keep a bounded metadata.json history.
TABLE_PROPERTIES = {
    "format-version": "2",
    "commit.manifest-merge.enabled": "true",
    "commit.manifest.min-count-to-merge": "20",
    # A merge rewrites every entry of the manifests it merges, and pyiceberg's Avro writer (pure Python) takes about
    # 0.35 ms an entry (~0.53 KB). Iceberg's 8 MB default is ~15,000 entries, some 5 s every 20th live commit once the
    # history is deep; 256 KB bounds a merge to ~480 entries (~0.17 s). 100,000 files make ~200 manifests, pruned by
    # partition at planning.
    "commit.manifest.target-size-bytes": str(256 * 1024),
    "write.metadata.delete-after-commit.enabled": "true",
    "write.metadata.previous-versions-max": "50",
    "write.parquet.compression-codec": "zstd",
    # Compaction's rewrite is pyiceberg's overwrite with file deletes, which takes its isolation from this property.
    # Serializable (the default) refuses it whenever a live writer appended meanwhile, so beside a writer committing
    # every second it lost every attempt on a loaded machine. At snapshot isolation it validates what Iceberg's
    # RewriteFiles does (the files it replaces still exist, and no deletes reached them) and is rebased over appends.
    "write.delete.isolation-level": "snapshot",
    # A commit the catalog refused (another landed first: maintenance's, or the other writer's) is rebased and made
    # again after 10 ms, then 20, 40 ... 640: about the patience of Iceberg's default (100 ms doubling, 4 times), but a
    # live commit that lost to a maintenance commit no longer waits 100 ms, which was the soak's p95.
    "commit.retry.min-wait-ms": "10",
    "commit.retry.num-retries": "7",
}


@dataclass(frozen=True)
class TableDef:
    schema: str
    partition_by: tuple[str, ...]
    sort_by: tuple[str, ...] = ()


TABLES: dict[str, TableDef] = {
    "trades": TableDef(schemas.TRADE, ("exchange", "trade_date"), ("symbol", "exchange_timestamp", "source_sequence")),
    "quotes": TableDef(schemas.QUOTE, ("exchange", "trade_date"), ("symbol", "exchange_timestamp", "source_sequence")),
    "rejected": TableDef(schemas.REJECTED, ("source", "partition_date"), ("source_file", "source_row")),
    "sequence_gaps": TableDef(schemas.SEQUENCE_GAP, ("exchange", "session_date"), ("symbol", "first_missing")),
    "source_files": TableDef(schemas.SOURCE_FILE, ("source", "partition_date"), ("path",)),
    "exchange_bars": TableDef(schemas.EXCHANGE_BAR, ("exchange", "trade_date"), ("symbol", "bar_start")),
    **{f"ohlcv_{i}": TableDef(schemas.OHLCV, ("exchange", "trade_date"), ("symbol", "bar_start")) for i in schemas.INTERVALS},
}


def open_catalog(uri: str, warehouse: str) -> Catalog:
    """A pyiceberg SQL catalog: SQLite by default, Postgres by URI; file or s3:// warehouse."""
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if warehouse.startswith("file://"):
        Path(urlparse(warehouse).path).mkdir(parents=True, exist_ok=True)
    # Another process or thread may create one of the catalog's own tables between pyiceberg's check and its
    # CREATE (PostgreSQL: a unique violation on pg_type; SQLite: table already exists). Each such failure means
    # one more table exists, so one attempt per table and a last one always see them all.
    for _ in SqlCatalogBaseTable.metadata.tables:
        try:
            return _write_ahead(SqlCatalog("k2", uri=uri, warehouse=warehouse, **object_store_properties()))
        except (IntegrityError, OperationalError, ProgrammingError):
            pass
    return _write_ahead(SqlCatalog("k2", uri=uri, warehouse=warehouse, **object_store_properties()))


def _write_ahead(catalog: SqlCatalog) -> SqlCatalog:
    """A SQLite catalog in WAL mode, synchronous=NORMAL, on every connection from now on.

    In SQLite's default rollback journal every commit syncs the disk, and a reader's open transaction (the daemon,
    the maintenance job) holds a writer's commit back. Behind compaction's writes, SQLite's own commit grew from 2
    to 11 ms over the soak's 30 minutes. In WAL mode readers never block the writer, and a commit appends to the
    log without a sync. A process that dies (SIGKILL) loses no commit; a power cut may lose the last ones,
    offsets and rows together, which the writer then consumes again from Kafka: still exactly once."""
    if catalog.engine.dialect.name != "sqlite" or catalog.engine.url.database in (None, "", ":memory:"):
        return catalog  # an in-memory database lives only as long as its one connection
    event.listen(catalog.engine, "connect", _sqlite_pragmas)
    catalog.engine.dispose()  # the connection that created the catalog's tables had none of them
    return catalog


def _sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")  # persistent in the file; busy while another process switches it
    except Exception as exc:  # noqa: BLE001 - sqlite3.OperationalError: the next connection tries again
        log.debug("SQLite catalog stays in its journal mode for now: %s", one_line(exc))
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def object_store_properties() -> dict[str, str]:
    """The S3 properties of the warehouse: credentials and endpoint come from the environment only."""
    properties = {}
    for env_name, prop in (
        ("K2_S3_ENDPOINT", "s3.endpoint"),
        ("AWS_ACCESS_KEY_ID", "s3.access-key-id"),
        ("AWS_SECRET_ACCESS_KEY", "s3.secret-access-key"),
        ("AWS_REGION", "s3.region"),
    ):
        if os.environ.get(env_name):
            properties[prop] = os.environ[env_name]
    return properties


def table_identifier(name: str) -> str:
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; K2 tables are {sorted(TABLES)}")
    return f"{NAMESPACE}.{name}"


def ensure_table(catalog: Catalog, name: str) -> Table:
    """Load `market.<name>`, creating the namespace and table on first use (safe when writers race)."""
    identifier = table_identifier(name)
    try:
        return evolve(catalog.load_table(identifier), name)
    except NoSuchTableError:
        pass
    definition = TABLES[name]
    schema = schemas.iceberg_schema(definition.schema)
    spec = PartitionSpec(
        *(
            PartitionField(source_id=schema.find_field(col).field_id, field_id=1000 + i, transform=IdentityTransform(), name=col)
            for i, col in enumerate(definition.partition_by)
        )
    )
    order = SortOrder(
        *(SortField(source_id=schema.find_field(col).field_id, transform=IdentityTransform()) for col in definition.sort_by)
    )
    try:
        catalog.create_namespace(NAMESPACE)
    except (NamespaceAlreadyExistsError, IntegrityError):  # IntegrityError: created by a racer after pyiceberg's check
        pass
    try:
        return catalog.create_table(identifier, schema=schema, partition_spec=spec, sort_order=order, properties=TABLE_PROPERTIES)
    except TableAlreadyExistsError:
        return catalog.load_table(identifier)


def evolve(table: Table, name: str) -> Table:
    """Bring a table made from an older contract up to schemas/: add the optional columns the contract gained,
    and make optional what it made optional. Only these compatible changes; a writer racing to do the same
    is retried by pyiceberg or already done."""
    table = _with_missing_properties(table)
    contract = schemas.iceberg_schema(TABLES[name].schema)
    current = {f.name: f for f in table.schema().fields}
    missing = [f for f in contract.fields if f.name not in current]
    loosened = [f.name for f in contract.fields if f.name in current and f.optional and current[f.name].required]
    if not missing and not loosened:
        return table
    try:
        with table.update_schema() as update:
            for f in missing:
                update.add_column(f.name, f.field_type, doc=f.doc)
            for column in loosened:
                update.make_column_optional(column)
    except CommitFailedException:
        table = table.refresh()
        if any(f.name not in {c.name for c in table.schema().fields} for f in missing):
            raise
    return table


def _with_missing_properties(table: Table) -> Table:
    """`table` with the TABLE_PROPERTIES it was created without (an older K2 made it); values already set stay."""
    missing = {k: v for k, v in TABLE_PROPERTIES.items() if k != "format-version" and k not in table.properties}
    if not missing:
        return table
    try:
        with table.transaction() as tx:
            tx.set_properties(missing)
    except Exception as exc:  # a concurrent commit, a locked catalog, a read-only role: the next load adds them
        log.warning("market table %s: could not add properties %s: %s", table.name(), sorted(missing), one_line(exc))
    return table
