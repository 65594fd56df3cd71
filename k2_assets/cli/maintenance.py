"""`k2 maintenance`: the table maintenance job from the command line, recorded in the Dagster instance, with progress."""

from __future__ import annotations

import threading
import time

import click

from k2_assets.cli.common import DATE, dagster_instance, progress

STEPS = ("expire_snapshots", "remove_orphan_files", "compact_partitions")  # the job's order


@click.command("maintenance")
@click.option(
    "--day", "days", type=DATE, multiple=True, help="compact these closed days (repeat)  [default: the last 3 closed days]"
)
@click.option("--table", "tables", multiple=True, help="only these tables (repeat), e.g. trades  [default: every K2 table]")
@click.option("--retention-days", type=float, default=7.0, show_default=True, help="expire snapshots older than this")
@click.option("--dry-run", is_flag=True, help="find orphan files, do not delete them")
def maintenance(days, tables, retention_days: float, dry_run: bool) -> int:
    """Expire old snapshots, remove orphan files and compact small files: `table_maintenance_job`, one run."""
    from dagster._core.utils import make_new_run_id

    from k2_assets.definitions import defs

    scope = {"tables": list(tables)} if tables else {}
    run_config = {
        "ops": {
            "compact_partitions": {"config": {**scope, **({"days": [d.isoformat() for d in days]} if days else {})}},
            "expire_snapshots": {"config": {**scope, "retention_days": retention_days}},
            "remove_orphan_files": {"config": {**scope, "dry_run": dry_run}},
        },
        "loggers": {"console": {"config": {"log_level": "WARNING"}}},
    }
    job = defs.resolve_job_def("table_maintenance_job")
    run_id = make_new_run_id()
    with dagster_instance() as instance:
        results = []
        worker = threading.Thread(
            target=lambda: results.append(
                job.execute_in_process(run_config=run_config, instance=instance, run_id=run_id, raise_on_error=False)
            )
        )
        worker.start()
        for _step in progress(_finished_steps(instance, run_id, worker), "table maintenance", length=len(STEPS)):
            pass
        worker.join()
    result = results[0]
    for step in STEPS:
        for event in result.events_for_node(step):
            if event.is_step_success or event.is_step_failure:
                click.echo(f"{step}: {'done' if event.is_step_success else 'FAILED'}")
    click.echo(f"k2: run {run_id} {'succeeded' if result.success else 'failed'} (its metadata is in the UI)", err=True)
    return 0 if result.success else 1


def _finished_steps(instance, run_id: str, worker: threading.Thread):
    """Yield each step as it finishes (read from the run's event log while the run goes on)."""
    import dagster as dg

    seen: set[str] = set()
    while True:
        alive = worker.is_alive()
        done = instance.all_logs(run_id, of_type={dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE})
        for event in done:
            if event.step_key not in seen:
                seen.add(event.step_key)
                yield event.step_key
        if not alive:
            return
        time.sleep(0.2)
