"""`k2 catalog backup|restore|rebuild|status`: disaster recovery of the Iceberg catalog (docs/runbooks/disaster-recovery.md)."""

from __future__ import annotations

from pathlib import Path

import click

from k2_assets.cli.common import UserError, progress, settings


@click.group("catalog")
def catalog() -> None:
    """Back up and restore the Iceberg catalog, or rebuild it from the warehouse after it is lost."""


def _recovery():
    from k2_assets.core import recovery

    return recovery


def _open():
    from k2_assets.core import catalog as k2_catalog

    config = settings()
    return k2_catalog.open_catalog(config.catalog_uri, config.warehouse)


def _one_line(call):
    recovery = _recovery()
    try:
        return call()
    except recovery.RecoveryError as exc:
        raise UserError(str(exc)) from None


@catalog.command("status")
def status() -> None:
    """Each K2 table: the metadata file the catalog points at, and the newest one in the warehouse."""
    recovery = _recovery()
    config = settings()
    states = _one_line(lambda: recovery.table_states(_open()))
    for name in _tables():
        newest = _one_line(lambda n=name: recovery.newest_metadata(config.warehouse, n))
        state = states.get(name)
        if state is None and newest is None:
            continue
        pointer = state.metadata_location.rsplit("/", 1)[-1] if state else "(not in the catalog)"
        click.echo(f"market.{name}: catalog {pointer}; newest in the warehouse {newest.rsplit('/', 1)[-1] if newest else '-'}")


@catalog.command("backup")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="directory to write the backup to")
def backup(out: Path) -> None:
    """Copy the catalog consistently while writers run (SQLite's backup API, or pg_dump) with every table's metadata location."""
    from k2_assets.core.metrics import BackupMetrics, push

    config = settings()
    manifest = _one_line(lambda: _recovery().backup(config.catalog_uri, config.warehouse, out))
    metrics = BackupMetrics()
    metrics.record(manifest)
    push(metrics.registry, "k2_backup", {"op": "backup_catalog"})  # the same series as the nightly job's
    click.echo(
        f"k2: {manifest['kind']} catalog backed up to {out} ({manifest['bytes']:,} bytes, {len(manifest['tables'])} tables)",
        err=True,
    )


@catalog.command("restore")
@click.argument("backup_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="restore even if it rolls tables back past newer metadata in the warehouse")
def restore(backup_dir: Path, force: bool) -> None:
    """Put a backup's catalog back. Refused, with what would be lost, if the warehouse holds newer metadata (unless --force)."""
    config = settings()
    manifest, rolled = _one_line(lambda: _recovery().restore(config.catalog_uri, config.warehouse, backup_dir, force=force))
    for r in rolled:
        click.echo(
            f"market.{r.table}: rolled back to {r.backed_up.rsplit('/', 1)[-1]}; {len(r.snapshots_lost)} newer snapshots "
            f"left out: {', '.join(map(str, r.snapshots_lost)) or '-'}"
        )
    click.echo(f"k2: catalog restored from the backup of {manifest['created_at']} ({len(manifest['tables'])} tables)", err=True)


@catalog.command("rebuild")
@click.option("--dry-run", is_flag=True, help="list what would be registered, change nothing")
@click.option(
    "--metadata",
    "chosen",
    multiple=True,
    metavar="TABLE=LOCATION",
    help="use this metadata file for TABLE (when two claim the newest version)",
)
def rebuild(dry_run: bool, chosen: tuple[str, ...]) -> None:
    """Register every K2 table at its newest metadata file under the warehouse (file:// or s3://), after the catalog is lost."""
    recovery = _recovery()
    picks = {}
    for item in chosen:
        table, _, location = item.partition("=")
        if not location:
            raise UserError(f"--metadata takes TABLE=LOCATION, not {item!r}")
        picks[table.removeprefix("market.")] = location
    config = settings()
    if not dry_run:
        aside = recovery.set_aside_if_unreadable(config.catalog_uri)
        if aside:
            click.echo(f"k2: the catalog database is not readable: moved to {aside}; rebuilding a new one", err=True)
    if dry_run:
        unreadable = not recovery.readable(config.catalog_uri)
        if unreadable:
            click.echo("k2: the catalog database is not readable: a rebuild would move it aside and start a new one", err=True)
        from k2_assets.core import catalog as k2_catalog

        current = k2_catalog.open_catalog("sqlite:///:memory:", config.warehouse) if unreadable else _open()
        plan = _one_line(lambda: recovery.plan_rebuild(current, config.warehouse, picks))
    else:
        plan = _one_line(
            lambda: recovery.rebuild(
                _open(), config.warehouse, picks, progress=lambda items: progress(items, "registering tables")
            )
        )
    for r in plan:
        verb = ("would register" if dry_run else "registered") if r.action == "register" else r.action
        click.echo(f"market.{r.table}: {verb} {r.metadata_location}")
    if not plan:
        click.echo(f"k2: no K2 table found under {config.warehouse}", err=True)


def _tables() -> list[str]:
    from k2_assets.core import catalog as k2_catalog

    return sorted(k2_catalog.TABLES)
