"""The nightly catalog backup (docs/runbooks/disaster-recovery.md): a consistent copy while writers run, and its age."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from k2_assets.core import recovery
from k2_assets.core.metrics import BackupMetrics
from k2_assets.defs.resources import IcebergResource
from k2_assets.defs.run_metrics import BACKUP, publish


class CatalogBackupResource(dg.ConfigurableResource):
    """Where the catalog backups go (K2_BACKUP_DIR); keep it off the catalog's own disk."""

    directory: str


class BackupConfig(dg.Config):
    keep: int = Field(default=7, ge=1, description="backups to keep; older ones are removed")


@dg.op(out=dg.Out(dg.Nothing))
def backup_catalog(
    context: dg.OpExecutionContext, config: BackupConfig, iceberg: IcebergResource, catalog_backup: CatalogBackupResource
) -> dg.Output:
    """Copy the Iceberg catalog and record every table's metadata location; push the backup's time for the age alert."""
    out, manifest = recovery.backup_rotating(iceberg.catalog_uri, iceberg.warehouse, Path(catalog_backup.directory), config.keep)
    metrics = BackupMetrics()
    metrics.record(manifest)
    publish(context, BACKUP, metrics.registry)
    context.log.info(f"catalog backed up to {out}")
    return dg.Output(
        None,
        metadata={"directory": str(out), "bytes": manifest["bytes"], "tables": len(manifest["tables"]), "kind": manifest["kind"]},
    )


@dg.job(description="Back up the Iceberg catalog (SQLite backup API or pg_dump) with every table's metadata location.")
def catalog_backup_job():
    backup_catalog()


catalog_backup_schedule = dg.ScheduleDefinition(
    name="catalog_backup_schedule",
    job=catalog_backup_job,
    cron_schedule="30 3 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Nightly at 03:30 UTC, before table maintenance removes anything.",
)

# A module's Definitions object is all the defs folder loads from it, so it names everything here.
defs = dg.Definitions(
    jobs=[catalog_backup_job],
    schedules=[catalog_backup_schedule],
    resources={"catalog_backup": CatalogBackupResource(directory=dg.EnvVar("K2_BACKUP_DIR"))},
)
