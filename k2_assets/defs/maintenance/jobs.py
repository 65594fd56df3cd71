"""Table maintenance ops: expire old snapshots, remove orphan files, compact small files.

One job runs the three in that order, one after the other in the run's process; none depends on another, so
one that fails holds up neither the others nor, within an op, the other tables. Each op takes its own config
(the Launchpad shows the defaults), and the UI's op selection runs one of them alone. The policy lives here,
the mechanics in k2_assets.core.maintenance (which also keeps the live writer's exactly-once offsets intact).
"""

# No `from __future__ import annotations`: Dagster reads the config classes from the op signatures.
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

import dagster as dg
from pydantic import Field
from pyiceberg.exceptions import CommitFailedException, NoSuchTableError, ValidationException
from pyiceberg.expressions import And, BooleanExpression, EqualTo, In, IsNull
from pyiceberg.table import Table
from pyiceberg.types import DateType

from k2_assets.core import catalog as k2_catalog
from k2_assets.core import maintenance
from k2_assets.core.metrics import MaintenanceMetrics, maintenance_failures
from k2_assets.core.text import one_line
from k2_assets.defs.resources import IcebergResource
from k2_assets.defs.run_metrics import MAINTENANCE, publish

ALL_TABLES = sorted(k2_catalog.TABLES)
PRIORITY = "dagster/priority"  # higher first: expiry, orphan removal, compaction
MIN_ORPHAN_GRACE_DAYS = 1.0  # a write (a backfill of many days) can take hours: never delete younger files


def _each_table(
    context: dg.OpExecutionContext, iceberg: IcebergResource, names: list[str], work: Callable[[str, Table], list[str]]
) -> list[str]:
    """Run `work` on each requested table that exists, and return what failed, one line each. A table whose work
    raises (its metadata unreadable, commits lost again and again) is logged and the others go on. Each table's
    count of failures (partitions for compaction, else 1) is pushed in a group of its own ({op, table}), 0 too,
    so a clean run clears the last one's and a run over other tables leaves it (the alert K2MaintenanceFailed)."""
    unknown = sorted(set(names) - set(k2_catalog.TABLES))
    if unknown:
        raise dg.Failure(description=f"unknown tables {unknown}; K2 tables are {ALL_TABLES}")
    failed = []
    for name in names:
        try:
            table = iceberg.catalog().load_table(k2_catalog.table_identifier(name))
        except NoSuchTableError:
            context.log.info(f"market.{name} does not exist yet: nothing to maintain")
            continue
        except Exception as exc:  # noqa: BLE001 - the catalog refusing one table must not stop the others
            failures = [f"market.{name}: {one_line(exc)}"]
        else:
            try:
                failures = work(name, table)
            except Exception as exc:  # noqa: BLE001 - as above
                failures = [f"market.{name}: {one_line(exc)}"]
        for line in failures:
            context.log.error(f"{context.op_def.name}: {line}")
        failed += failures
        publish(context, MAINTENANCE, maintenance_failures(len(failures)), table=name)
    return failed


def _failed(failed: list[str], what: str, metadata: dict) -> dg.Output:
    """The op's output, or, after every table had its turn, a failure naming each thing not done (the run is red)."""
    if failed:
        raise dg.Failure(description=f"{len(failed)} {what}: " + "; ".join(failed), metadata=metadata)
    return dg.Output(None, metadata=metadata)


def _publish(context: dg.OpExecutionContext, metrics: MaintenanceMetrics, started: float) -> None:
    """Time the op and push its metrics (K2_PUSHGATEWAY_URL), once it has done what it could."""
    metrics.seconds.labels(context.op_def.name).observe(time.monotonic() - started)
    publish(context, MAINTENANCE, metrics.registry)


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f}"


def _markdown(header: list[str], rows: list[list]) -> dg.MetadataValue:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return dg.MetadataValue.md("\n".join(lines) if rows else "nothing to report")


class CompactConfig(dg.Config):
    tables: list[str] = Field(default=ALL_TABLES, description="K2 tables (market.<name>) to compact.")
    days: list[str] = Field(
        default=[],
        description="Days (YYYY-MM-DD) whose partitions to compact; empty: the open days (today's UTC day, the "
        "current ASX session) and the last `lookback_days` closed ones. A partition being written is compacted as it goes.",
    )
    lookback_days: int = Field(
        default=3, description="With no `days`: compact the closed days this far back (a deferred day is retried)."
    )
    min_files: int = Field(
        default=8,
        description="Compact an open day's partition only once it has more than this many data files; a closed day "
        "is merged into one file whenever it has two or more small ones.",
    )


def _date_column(table: Table) -> str:
    schema = table.schema()
    fields = [schema.find_field(f.source_id) for f in table.spec().fields]
    return next(f.name for f in fields if isinstance(f.field_type, DateType))


def _partition_filter(partition: dict) -> BooleanExpression:
    parts = [IsNull(c) if v is None else EqualTo(c, v.isoformat() if isinstance(v, date) else v) for c, v in partition.items()]
    return parts[0] if len(parts) == 1 else And(*parts)


@dg.op(out=dg.Out(dg.Nothing), tags={PRIORITY: "1"})
def compact_partitions(context: dg.OpExecutionContext, config: CompactConfig, iceberg: IcebergResource) -> dg.Output:
    """Merge each partition's small files (a closed day whole, an open day by size tier), rows and Kafka offsets unchanged."""
    if config.days:
        days = sorted({date.fromisoformat(d) for d in config.days})
    else:
        days = maintenance.days_to_compact(config.lookback_days)
    live = maintenance.open_days()
    counts = ("compacted", "already_compact", "deferred", "files_before", "files_after", "rows", "bytes_before", "bytes_after")
    rows, totals = [], dict.fromkeys(counts, 0)
    metrics, started = MaintenanceMetrics(), time.monotonic()

    def compact_table(name: str, table: Table) -> list[str]:
        failed = []
        if table.current_snapshot() is None:
            return failed  # created, never written
        selected = In(_date_column(table), {day.isoformat() for day in days})
        partitions = table.inspect.partitions(row_filter=selected).to_pylist()  # one pass over the manifests
        for stats in sorted(partitions, key=lambda p: tuple(str(v) for v in p["partition"].values())):
            partition, files = stats["partition"], stats["file_count"]
            label = "/".join(f"{c}={v}" for c, v in partition.items())
            final = not live & set(partition.values())  # a closed day is merged whole, an open one by size tier
            if files <= (1 if final else config.min_files):
                totals["already_compact"] += 1
                continue
            try:
                result = maintenance.compact(table, _partition_filter(partition), final=final)
            except (CommitFailedException, ValidationException) as exc:
                # Commits kept landing between reading and committing: nothing changed; a later run retries.
                context.log.warning(f"market.{name} {label}: deferred, a concurrent commit won ({exc})")
                totals["deferred"] += 1
                rows.append([name, label, files, "deferred", "", "", stats["record_count"], ""])
                continue
            except Exception as exc:  # noqa: BLE001 - a merge that failed here (its child killed, out of memory) must not stop the others
                # A compaction never changes rows, and commits whole or not at all: the partition's rows are as they were.
                failed.append(f"market.{name} {label}: {one_line(exc)}")
                rows.append([name, label, files, "failed", "", "", stats["record_count"], ""])
                continue
            if result.snapshot_id is None:  # an open day whose size tiers are not full yet
                totals["already_compact"] += 1
                continue
            context.log.info(
                f"market.{name} {label}: {result.files_before} -> {result.files_after} files "
                f"({_mib(result.bytes_before)} -> {_mib(result.bytes_after)} MiB), {result.rows} rows"
            )
            totals["compacted"] += 1
            totals["files_before"] += result.files_before
            totals["files_after"] += result.files_after
            totals["rows"] += result.rows
            totals["bytes_before"] += result.bytes_before
            totals["bytes_after"] += result.bytes_after
            metrics.compacted.labels(name).inc()
            metrics.files_removed.labels(name).inc(max(0, result.files_before - result.files_after))
            rows.append(
                [
                    name,
                    label,
                    result.files_before,
                    result.files_after,
                    _mib(result.bytes_before),
                    _mib(result.bytes_after),
                    result.rows,
                    result.snapshot_id,
                ]
            )
        return failed

    failed = _each_table(context, iceberg, config.tables, compact_table)
    _publish(context, metrics, started)
    metadata = {
        "days": [d.isoformat() for d in days],
        "partitions_compacted": totals["compacted"],
        "partitions_already_compact": totals["already_compact"],
        "partitions_deferred": totals["deferred"],
        "partitions_failed": len(failed),
        "files_before": totals["files_before"],
        "files_after": totals["files_after"],
        "rows_rewritten": totals["rows"],
        "bytes_before": totals["bytes_before"],
        "bytes_after": totals["bytes_after"],
        "partitions": _markdown(
            ["table", "partition", "files before", "files after", "MiB before", "MiB after", "rows", "snapshot"], rows
        ),
    }
    return _failed(failed, "partition(s) or table(s) not compacted", metadata)


class ExpireConfig(dg.Config):
    tables: list[str] = Field(default=ALL_TABLES, description="K2 tables (market.<name>) whose snapshots to expire.")
    retention_days: float = Field(
        default=maintenance.TIME_TRAVEL_WINDOW.days,
        description="Keep every snapshot this recent: the time-travel window promised to users (7 days).",
    )
    allow_short_retention: bool = Field(default=False, description="Allow a retention shorter than the promised 7 days.")
    dense_hours: float = Field(
        default=maintenance.DENSE.total_seconds() / 3600,
        description="Keep every snapshot this recent; older ones are thinned to the newest of each `thin_to_minutes`.",
    )
    thin_to_minutes: float = Field(
        default=maintenance.THIN_TO.total_seconds() / 60,
        description="Beyond `dense_hours`, time travel resolves to the newest snapshot of each interval this long.",
    )


@dg.op(out=dg.Out(dg.Nothing), tags={PRIORITY: "3"})
def expire_snapshots(context: dg.OpExecutionContext, config: ExpireConfig, iceberg: IcebergResource) -> dg.Output:
    """Expire snapshots older than the promised time-travel window, keeping the snapshots that hold the Kafka offsets."""
    retain = timedelta(days=config.retention_days)
    if retain < maintenance.TIME_TRAVEL_WINDOW and not config.allow_short_retention:
        raise dg.Failure(
            description=f"retention_days={config.retention_days} is shorter than the "
            f"{maintenance.TIME_TRAVEL_WINDOW.days}-day time-travel window promised to users; "
            "set allow_short_retention to do it anyway"
        )
    if retain < timedelta(0):
        raise dg.Failure(description="retention_days must not be negative")
    rows, expired_total = [], 0
    now = datetime.now(UTC)
    metrics, started = MaintenanceMetrics(), time.monotonic()

    def expire_table(name: str, table: Table) -> list[str]:
        nonlocal expired_total
        before = len(table.metadata.snapshots)
        expired = maintenance.expire(
            table, retain, now, dense=timedelta(hours=config.dense_hours), thin_to=timedelta(minutes=config.thin_to_minutes)
        )
        table.refresh()
        oldest = min((s.timestamp_ms for s in table.metadata.snapshots), default=None)
        oldest_text = datetime.fromtimestamp(oldest / 1000, tz=UTC).isoformat(timespec="seconds") if oldest else ""
        context.log.info(f"market.{name}: {expired} of {before} snapshots expired")
        expired_total += expired
        metrics.expired.labels(name).inc(expired)
        rows.append([name, before, expired, len(table.metadata.snapshots), oldest_text])
        return []

    failed = _each_table(context, iceberg, config.tables, expire_table)
    _publish(context, metrics, started)
    metadata = {
        "retention_days": config.retention_days,
        "dense_hours": config.dense_hours,
        "thin_to_minutes": config.thin_to_minutes,
        "snapshots_expired": expired_total,
        "tables": _markdown(["table", "snapshots before", "expired", "snapshots after", "oldest kept"], rows),
    }
    return _failed(failed, "table(s) not expired", metadata)


class OrphanConfig(dg.Config):
    tables: list[str] = Field(default=ALL_TABLES, description="K2 tables (market.<name>) whose orphan files to remove.")
    grace_days: float = Field(
        default=maintenance.ORPHAN_GRACE.days,
        description="Only delete unreferenced files older than this (at least 1 day): younger ones may be a write in flight.",
    )
    dry_run: bool = Field(default=False, description="Report the orphan files without deleting them.")


@dg.op(out=dg.Out(dg.Nothing), tags={PRIORITY: "2"})
def remove_orphan_files(context: dg.OpExecutionContext, config: OrphanConfig, iceberg: IcebergResource) -> dg.Output:
    """Delete files no snapshot references (failed writes, expired snapshots' files) once older than the grace period."""
    if config.grace_days < MIN_ORPHAN_GRACE_DAYS:
        raise dg.Failure(
            description=f"grace_days={config.grace_days} is under {MIN_ORPHAN_GRACE_DAYS} day: it could delete a write in flight"
        )
    rows, removed_total, bytes_total, sample = [], 0, 0, []
    metrics, started = MaintenanceMetrics(), time.monotonic()

    def remove_from(name: str, table: Table) -> list[str]:
        nonlocal removed_total, bytes_total, sample
        orphans = maintenance.find_orphan_files(table, timedelta(days=config.grace_days))
        removed = [o.path for o in orphans] if config.dry_run else maintenance.delete_files(table, orphans)
        gone = set(removed)
        size = sum(o.size for o in orphans if o.path in gone)
        context.log.info(f"market.{name}: {len(removed)} orphan files ({size} bytes) {'found' if config.dry_run else 'removed'}")
        removed_total += len(removed)
        bytes_total += size
        sample += removed[: max(0, 20 - len(sample))]
        if not config.dry_run:
            metrics.orphans.labels(name).inc(len(removed))
        rows.append([name, len(removed), size])
        return []

    failed = _each_table(context, iceberg, config.tables, remove_from)
    _publish(context, metrics, started)
    metadata = {
        "dry_run": config.dry_run,
        "grace_days": config.grace_days,
        "orphan_files_removed": 0 if config.dry_run else removed_total,
        "orphan_files_found": removed_total,
        "bytes_removed": 0 if config.dry_run else bytes_total,
        "tables": _markdown(["table", "orphan files", "bytes"], rows),
        "sample": dg.MetadataValue.json(sample),
    }
    return _failed(failed, "table(s) not cleared of orphan files", metadata)


@dg.job(
    description="Expire snapshots past the 7-day time-travel window, remove orphan files, compact small files.",
    # One after the other in the run's process, in the order of their priority: run side by side, expiry and
    # compaction would commit to the same tables at once, and each op would pay its own process's start.
    executor_def=dg.in_process_executor,
)
def table_maintenance_job():
    # No op takes another's output: one that fails (a merge out of memory, every hour) holds up none of the others,
    # and expiry and orphan removal keep metadata and storage bounded whatever compaction does.
    expire_snapshots()
    remove_orphan_files()
    compact_partitions()
