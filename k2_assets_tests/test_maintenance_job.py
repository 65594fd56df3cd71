"""The Dagster table maintenance job on a real catalog fed by the live writer: compaction, expiry and
orphan removal keep the rows, the exactly-once offsets and time travel inside the retention."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from datetime import UTC, date, datetime
from pathlib import Path
from urllib.parse import urlparse

import dagster as dg
import pyarrow as pa

from k2_assets.core import maintenance
from k2_assets.core.offsets import recorded_offsets
from k2_assets.defs.maintenance.jobs import table_maintenance_job
from k2_assets.defs.resources import IcebergResource
from k2_assets_tests.conftest import offsets_key
from k2_assets_tests.test_live_writer import produce, writer_for
from k2_assets_tests.test_maintenance import written_in_small_batches
from k2_assets_tests.test_metrics import gateway_text, pushed

TEN_DAYS_AGO = time.time() - 10 * 86400
REAL_REWRITE = maintenance._rewrite


def run(catalog_props, ops: dict, op_selection: list[str] | None = None, raise_on_error: bool = True):
    return table_maintenance_job.execute_in_process(
        run_config={"ops": {name: {"config": config} for name, config in ops.items()}},
        resources={"iceberg": IcebergResource(**catalog_props)},
        op_selection=op_selection,
        raise_on_error=raise_on_error,
    )


def step_metadata(result, step: str) -> dict:
    event = next(e for e in result.all_events if e.event_type_value == "STEP_OUTPUT" and e.step_key == step)
    return {key: value.value for key, value in event.event_specific_data.metadata.items()}


def failure(result, step: str) -> str:
    assert not result.success
    return result.failure_data_for_node(step).error.to_string()


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file()}


def test_maintenance_job_keeps_rows_offsets_and_time_travel(
    btcusdt_dir, broker, topic, catalog, catalog_props, pushgateway, monkeypatch
):
    monkeypatch.setenv("K2_PUSHGATEWAY_URL", pushgateway)
    trades = written_in_small_batches(btcusdt_dir, broker, topic, catalog, trades=8000, batch_rows=500)
    offsets_before = recorded_offsets(trades, offsets_key(broker, topic))
    ids_before = sorted(trades.scan().to_arrow().column("message_id").to_pylist())
    first_snapshot, last_live_snapshot = trades.metadata.snapshots[0].snapshot_id, trades.current_snapshot().snapshot_id
    first_rows = trades.scan(snapshot_id=first_snapshot).to_arrow().num_rows
    root = Path(urlparse(trades.location()).path)
    partition_dir = root / "data" / "exchange=BINANCE" / "trade_date=2024-01-01"
    small_files = files_under(partition_dir)
    assert len(small_files) >= 16
    small_bytes = sum(path.stat().st_size for path in small_files)
    # Every file of the table is older than the grace now: only references may protect them.
    for path in files_under(root):
        os.utime(path, (TEN_DAYS_AGO, TEN_DAYS_AGO))
    stray_old, stray_fresh = partition_dir / "stray-old.parquet", partition_dir / "stray-fresh.parquet"
    stray_meta = root / "metadata" / "stray-old.avro"
    for stray in (stray_old, stray_meta, stray_fresh):
        stray.write_bytes(b"left behind by a failed write")
    for stray in (stray_old, stray_meta):
        os.utime(stray, (TEN_DAYS_AGO, TEN_DAYS_AGO))

    # The nightly run with its defaults, on the closed day 2024-01-01.
    result = run(catalog_props, {"compact_partitions": {"days": ["2024-01-01"]}})
    compacted = step_metadata(result, "compact_partitions")
    assert compacted["partitions_compacted"] == 1 and compacted["rows_rewritten"] == 8000
    assert compacted["files_before"] >= 16 and compacted["files_after"] == 1
    assert compacted["bytes_before"] == small_bytes and 0 < compacted["bytes_after"] < small_bytes
    row = f"| {compacted['files_before']} | 1 | {small_bytes / 2**20:.1f} | {compacted['bytes_after'] / 2**20:.1f} | 8000 |"
    assert row in compacted["partitions"]  # the table the run view shows
    assert step_metadata(result, "expire_snapshots")["snapshots_expired"] == 0  # all inside the 7-day window
    orphans = step_metadata(result, "remove_orphan_files")
    assert orphans["orphan_files_removed"] == 2 and orphans["bytes_removed"] == 2 * len(b"left behind by a failed write")
    assert not stray_old.exists() and not stray_meta.exists() and stray_fresh.exists()  # the fresh one may be a write in flight
    assert small_files <= files_under(partition_dir)  # still referenced by snapshots inside the window
    # Each op pushed what it did to the Pushgateway, grouped by op.
    text = gateway_text(pushgateway)
    assert pushed(text, "k2_maintenance_partitions_compacted_total", table="trades", op="compact_partitions") == 1
    assert pushed(text, "k2_maintenance_data_files_replaced_total", table="trades") == compacted["files_before"] - 1
    assert pushed(text, "k2_maintenance_orphan_files_removed_total", table="trades", op="remove_orphan_files") == 2
    assert pushed(text, "k2_maintenance_seconds_count", op="expire_snapshots") == 1

    trades = catalog.load_table("market.trades")
    assert sorted(trades.scan().to_arrow().column("message_id").to_pylist()) == ids_before
    assert recorded_offsets(trades, offsets_key(broker, topic)) == offsets_before
    # Time travel inside the retention reads the old snapshots from the small files.
    assert trades.scan(snapshot_id=first_snapshot).to_arrow().num_rows == first_rows > 0
    assert trades.scan(snapshot_id=last_live_snapshot).to_arrow().num_rows == 8000

    # A second run compacts nothing more: the partition is compact already.
    again = run(catalog_props, {"compact_partitions": {"days": ["2024-01-01"]}}, ["compact_partitions"])
    again = step_metadata(again, "compact_partitions")
    assert (again["partitions_compacted"], again["partitions_already_compact"]) == (0, 1)

    # Past the retention (shortened here, on purpose): the old snapshots go, then the small files only they reached.
    time.sleep(0.05)
    result = run(
        catalog_props,
        {"expire_snapshots": {"retention_days": 0, "allow_short_retention": True}, "remove_orphan_files": {}},
        ["expire_snapshots", "remove_orphan_files"],
    )
    assert step_metadata(result, "expire_snapshots")["snapshots_expired"] >= 16
    orphans = step_metadata(result, "remove_orphan_files")
    assert orphans["orphan_files_removed"] >= len(small_files) and orphans["bytes_removed"] > 0
    remaining = files_under(partition_dir)
    assert not remaining & small_files and len(remaining - {stray_fresh}) == 1  # the one compacted file
    trades = catalog.load_table("market.trades")
    assert trades.snapshot_by_id(first_snapshot) is None
    table = trades.scan().to_arrow()
    assert sorted(table.column("message_id").to_pylist()) == ids_before
    assert recorded_offsets(trades, offsets_key(broker, topic)) == offsets_before
    resumed = writer_for(catalog, broker, topic)  # a writer started now resumes exactly where it stopped
    assert resumed.position == {p: offsets_before.get(p, 0) for p in resumed.position}
    resumed.close()


def test_a_closed_day_with_a_few_files_is_merged_into_one(btcusdt_dir, broker, topic, catalog, catalog_props):
    """Fewer files than `min_files` keep an open day as it is, but a closed day is read for years: it gets one file."""
    trades = written_in_small_batches(btcusdt_dir, broker, topic, catalog, trades=1200, batch_rows=400)
    ids_before = sorted(trades.scan().to_arrow().column("message_id").to_pylist())
    assert partition_files(trades, "2024-01-01") == 3
    result = run(catalog_props, {"compact_partitions": {"days": ["2024-01-01"]}}, ["compact_partitions"])
    assert step_metadata(result, "compact_partitions")["partitions_compacted"] == 1
    trades = catalog.load_table("market.trades")
    assert partition_files(trades, "2024-01-01") == 1
    assert sorted(trades.scan().to_arrow().column("message_id").to_pylist()) == ids_before
    again = run(catalog_props, {"compact_partitions": {"days": ["2024-01-01"]}}, ["compact_partitions"])
    assert step_metadata(again, "compact_partitions")["partitions_already_compact"] == 1


def test_maintenance_refuses_a_broken_promise(catalog_props):
    compact = ["compact_partitions"]
    result = run(catalog_props, {"expire_snapshots": {"retention_days": 1}}, ["expire_snapshots"], raise_on_error=False)
    assert "time-travel window promised to users" in failure(result, "expire_snapshots")

    result = run(catalog_props, {"remove_orphan_files": {"grace_days": 0.01}}, ["remove_orphan_files"], raise_on_error=False)
    assert "could delete a write in flight" in failure(result, "remove_orphan_files")

    result = run(catalog_props, {"compact_partitions": {"tables": ["trades", "nope"]}}, compact, raise_on_error=False)
    assert "unknown tables ['nope']" in failure(result, "compact_partitions")


def test_the_schedule_runs_the_job_hourly():
    from k2_assets.defs.maintenance.schedules import table_maintenance_schedule

    assert table_maintenance_schedule.cron_schedule == "30 * * * *"
    assert table_maintenance_schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    with dg.build_schedule_context(scheduled_execution_time=datetime(2024, 1, 2, 4, 30, tzinfo=UTC)) as context:
        request = table_maintenance_schedule.evaluate_tick(context).run_requests[0]
    assert request.run_key == "table-maintenance-2024-01-02T04:30"


def test_k2_maintenance_compacts_from_the_command_line_and_records_the_run(btcusdt_dir, broker, topic, catalog, k2_home):
    import subprocess
    import sys

    trades = written_in_small_batches(btcusdt_dir, broker, topic, catalog, trades=4000, batch_rows=250)  # 16 small files
    ids_before = sorted(trades.scan().to_arrow().column("message_id").to_pylist())
    env = {**os.environ, "K2_HOME": str(k2_home), "DAGSTER_HOME": str(k2_home / "dagster")}
    done = subprocess.run(
        [sys.executable, "-m", "k2_assets.cli", "maintenance", "--day", "2024-01-01", "--table", "trades"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["expire_snapshots: done", "remove_orphan_files: done", "compact_partitions: done"]
    trades = catalog.load_table("market.trades")
    assert trades.current_snapshot().summary["k2.maintenance"] == "compact"
    assert sorted(trades.scan().to_arrow().column("message_id").to_pylist()) == ids_before
    run_id = done.stderr.split("k2: run ")[1].split()[0]
    with dg.DagsterInstance.from_config(str(k2_home / "dagster")) as instance:
        run = instance.get_run_by_id(run_id)
        assert run.job_name == "table_maintenance_job" and run.status == dg.DagsterRunStatus.SUCCESS


def killed_on_the_first_day(metadata, io, tasks):
    """The merge's child as the kernel's OOM killer leaves it, on the first day's partition only."""
    if any("trade_date=2024-01-01" in task.file.file_path for task in tasks):
        signal.raise_signal(signal.SIGKILL)
    return REAL_REWRITE(metadata, io, tasks)


def partition_files(table, day: str) -> int:
    return sum(1 for task in table.scan(row_filter=f"trade_date = '{day}'").plan_files())


def test_a_killed_merge_leaves_its_partition_and_the_others_are_compacted(
    btcusdt_dir, broker, topic, catalog, catalog_props, pushgateway, monkeypatch
):
    monkeypatch.setenv("K2_PUSHGATEWAY_URL", pushgateway)
    produce(broker.bootstrap, topic, [(b"BTCUSDT", b"{bad")])  # a reject: market.rejected has a snapshot too
    trades = written_in_small_batches(btcusdt_dir, broker, topic, catalog, trades=4000, batch_rows=400)
    rows = trades.scan().to_arrow()
    column = rows.schema.get_field_index("trade_date")
    next_day = rows.set_column(column, rows.schema.field(column), pa.repeat(pa.scalar(date(2024, 1, 2)), rows.num_rows))
    for start in range(0, rows.num_rows, 400):  # a second day, in as many small files
        trades.append(next_day.slice(start, 400))
    trades = catalog.load_table("market.trades")
    ids_before = sorted(trades.scan().to_arrow().column("message_id").to_pylist())
    files_first_day = partition_files(trades, "2024-01-01")
    assert files_first_day >= 10 and partition_files(trades, "2024-01-02") == 10

    monkeypatch.setattr(maintenance, "_rewrite", killed_on_the_first_day)
    config = {"compact_partitions": {"days": ["2024-01-01", "2024-01-02"]}}
    result = run(catalog_props, config, ["compact_partitions"], raise_on_error=False)
    error = failure(result, "compact_partitions")
    assert "1 partition(s) or table(s) not compacted: market.trades exchange=BINANCE/trade_date=2024-01-01: " in error
    assert f"exit code -{signal.SIGKILL} before answering" in error
    trades = catalog.load_table("market.trades")
    assert partition_files(trades, "2024-01-01") == files_first_day  # untouched
    assert partition_files(trades, "2024-01-02") == 1  # compacted after the failure, not stopped by it
    assert sorted(trades.scan().to_arrow().column("message_id").to_pylist()) == ids_before
    text = gateway_text(pushgateway)  # what K2MaintenanceFailed reads
    assert pushed(text, "k2_maintenance_failures", table="trades", op="compact_partitions") == 1
    assert pushed(text, "k2_maintenance_partitions_compacted_total", table="trades") == 1
    # The failure held up neither expiry nor orphan removal.
    whole = run(catalog_props, {**config, "expire_snapshots": {}, "remove_orphan_files": {}}, raise_on_error=False)
    assert whole.is_node_success("expire_snapshots") and whole.is_node_success("remove_orphan_files")
    assert "market.trades exchange=BINANCE/trade_date=2024-01-01" in failure(whole, "compact_partitions")
    # A run over another table leaves the trades' failure standing.
    run(catalog_props, {"compact_partitions": {**config["compact_partitions"], "tables": ["rejected"]}}, ["compact_partitions"])
    text = gateway_text(pushgateway)
    assert pushed(text, "k2_maintenance_failures", table="rejected", op="compact_partitions") == 0
    assert pushed(text, "k2_maintenance_failures", table="trades", op="compact_partitions") == 1

    # The next run, with the memory back, compacts the day and clears the failure.
    monkeypatch.setattr(maintenance, "_rewrite", REAL_REWRITE)
    compacted = step_metadata(run(catalog_props, config, ["compact_partitions"]), "compact_partitions")
    assert (compacted["partitions_compacted"], compacted["partitions_failed"]) == (1, 0)
    trades = catalog.load_table("market.trades")
    assert partition_files(trades, "2024-01-01") == 1
    assert sorted(trades.scan().to_arrow().column("message_id").to_pylist()) == ids_before
    assert pushed(gateway_text(pushgateway), "k2_maintenance_failures", table="trades", op="compact_partitions") == 0


def test_a_table_that_cannot_be_read_holds_up_no_op_and_no_other_table(
    btcusdt_dir, broker, topic, catalog, catalog_props, pushgateway, monkeypatch
):
    monkeypatch.setenv("K2_PUSHGATEWAY_URL", pushgateway)
    produce(broker.bootstrap, topic, [(b"BTCUSDT", b"{bad")])  # market.rejected has a snapshot too
    trades = written_in_small_batches(btcusdt_dir, broker, topic, catalog, trades=4000, batch_rows=400)
    ids_before = sorted(trades.scan().to_arrow().column("message_id").to_pylist())
    assert partition_files(trades, "2024-01-01") >= 10
    stray = Path(urlparse(trades.location()).path) / "data" / "stray-old.parquet"
    stray.write_bytes(b"left behind by a failed write")
    os.utime(stray, (TEN_DAYS_AGO, TEN_DAYS_AGO))
    # The catalog points market.rejected at a metadata file that is gone (a restore that missed it): every op fails there.
    lost = Path(urlparse(catalog.load_table("market.rejected").metadata_location).path).with_name("lost.metadata.json")
    with sqlite3.connect(urlparse(catalog_props["catalog_uri"]).path) as db:
        db.execute("UPDATE iceberg_tables SET metadata_location = ? WHERE table_name = ?", (lost.as_uri(), "rejected"))

    ops = ("expire_snapshots", "remove_orphan_files", "compact_partitions")
    scope = {"tables": ["rejected", "trades"]}
    result = run(
        catalog_props, {op: scope for op in ops} | {"compact_partitions": {**scope, "days": ["2024-01-01"]}}, raise_on_error=False
    )
    said = {
        "expire_snapshots": "1 table(s) not expired: market.rejected: ",
        "remove_orphan_files": "1 table(s) not cleared of orphan files: market.rejected: ",
        "compact_partitions": "1 partition(s) or table(s) not compacted: market.rejected: ",
    }
    for op in ops:  # each op failed, naming the table and why, after doing the other table's work
        assert said[op] in failure(result, op) and lost.name in failure(result, op)
    trades = catalog.load_table("market.trades")
    assert partition_files(trades, "2024-01-01") == 1  # compacted, though expiry and orphan removal failed before it
    assert not stray.exists()
    assert sorted(trades.scan().to_arrow().column("message_id").to_pylist()) == ids_before
    text = gateway_text(pushgateway)  # what K2MaintenanceFailed reads, per op and table
    for op in ops:
        assert pushed(text, "k2_maintenance_failures", op=op, table="rejected") == 1
        assert pushed(text, "k2_maintenance_failures", op=op, table="trades") == 0
