"""The disaster-recovery drill, step by step as docs/runbooks/disaster-recovery.md says, with the real commands.

History (ASX and Binance) is loaded, the live writer writes from Kafka, then the catalog database is lost: deleted,
corrupted, or replaced by a backup taken mid-stream. After `k2 catalog rebuild` or `k2 catalog restore`, every
table has the rows and snapshot lineage it had, time travel works, the writer resumes with nothing lost and nothing
duplicated, and the Dagster assets materialize again.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pyarrow.compute as pc
import pytest

from k2_assets.core import catalog as k2_catalog
from k2_assets.defs.asx.assets import asx_trades
from k2_assets.defs.asx.checks import asx_trades_rules
from k2_assets.defs.binance.assets import binance_trades_history
from k2_assets_tests.conftest import btc_trade_events, make_resources
from k2_assets_tests.test_live_writer import drain_all, produce, trade_messages, writer_for

FIRST, SECOND = 3000, 6000  # live trades before the backup, before the disaster; the rest come after the recovery


def k2(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "K2_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "k2_assets.cli", *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def lake_state(catalog) -> dict[str, tuple[int, list[int]]]:
    """Per K2 table: its rows and its snapshot lineage."""
    state = {}
    for name in sorted(k2_catalog.TABLES):
        try:
            table = catalog.load_table(k2_catalog.table_identifier(name))
        except Exception:  # noqa: BLE001 - a table the catalog lacks is absent from the state
            continue
        state[name] = (table.scan().to_arrow().num_rows, [s.snapshot_id for s in table.metadata.snapshots])
    return state


def live_ids(catalog) -> list[str]:
    trades = catalog.load_table("market.trades").scan(row_filter="symbol == 'ETHUSDT'", selected_fields=("message_id",))
    return trades.to_arrow().column("message_id").to_pylist()


@pytest.mark.parametrize("disaster", ["deleted", "corrupted", "restored from a mid-stream backup"])
def test_the_drill(disaster, asx_dir, btcusdt_dir, broker, topic, k2_home, catalog_props, tmp_path):
    # 1. History: an ASX session and a Binance day, through the assets.
    resources = make_resources(catalog_props, asx_dir=asx_dir, binance_dir=btcusdt_dir)
    assert dg.materialize([asx_trades, *asx_trades_rules], partition_key="2014-03-10", resources=resources).success
    assert dg.materialize([binance_trades_history], partition_key="2024-01-01", resources=resources).success

    # 2. The live writer (the real trades, as another symbol so history and live never overlap).
    events = [{**e, "s": "ETHUSDT"} for e in btc_trade_events(btcusdt_dir)]
    catalog = k2_catalog.open_catalog(catalog_props["catalog_uri"], catalog_props["warehouse"])
    produce(broker.bootstrap, topic, trade_messages(events[:FIRST]))
    writer = writer_for(catalog, broker, topic)
    drain_all(writer)
    backup = tmp_path / "backup"
    taken = k2(k2_home, "catalog", "backup", "--out", str(backup))
    assert taken.returncode == 0, taken.stderr
    at_backup = lake_state(catalog)
    produce(broker.bootstrap, topic, trade_messages(events[FIRST:SECOND]))
    drain_all(writer)
    writer.close()
    before = lake_state(catalog)
    assert len(live_ids(catalog)) == SECOND

    # 3. The disaster.
    database = Path(catalog_props["catalog_uri"].removeprefix("sqlite:///"))
    if disaster == "corrupted":
        database.write_bytes(os.urandom(4096) + database.read_bytes()[4096:])
    else:
        database.unlink()

    # 4. Recovery, as the runbook says.
    if disaster == "restored from a mid-stream backup":
        refused = k2(k2_home, "catalog", "restore", str(backup))
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "market.trades" in refused.stderr and "newer snapshots lost" in refused.stderr and "--force" in refused.stderr
        restored = k2(k2_home, "catalog", "restore", str(backup), "--force")
        assert restored.returncode == 0, restored.stderr
        expected = at_backup
    else:
        planned = k2(k2_home, "catalog", "rebuild", "--dry-run")
        assert planned.returncode == 0, planned.stderr
        assert sorted(line.split(":")[0] for line in planned.stdout.splitlines()) == [f"market.{t}" for t in sorted(before)]
        assert all("would register" in line for line in planned.stdout.splitlines())
        rebuilt = k2(k2_home, "catalog", "rebuild")
        assert rebuilt.returncode == 0, rebuilt.stderr
        if disaster == "corrupted":
            assert "not readable: moved to" in rebuilt.stderr and list(database.parent.glob("catalog.db.unreadable-*"))
        expected = before

    # 5. The proof: rows and lineage as they were, time travel, the writer resumes exactly once, the assets run.
    catalog = k2_catalog.open_catalog(catalog_props["catalog_uri"], catalog_props["warehouse"])
    assert lake_state(catalog) == expected
    trades = catalog.load_table("market.trades")
    asx_rows = trades.scan(row_filter="exchange == 'ASX'").to_arrow().num_rows
    assert trades.scan(snapshot_id=trades.metadata.snapshots[0].snapshot_id).to_arrow().num_rows == asx_rows  # the ASX load
    rows_at_backup, lineage_at_backup = at_backup["trades"]
    assert trades.scan(snapshot_id=lineage_at_backup[-1]).to_arrow().num_rows == rows_at_backup

    produce(broker.bootstrap, topic, trade_messages(events[SECOND:]))
    writer = writer_for(catalog, broker, topic)
    drain_all(writer)
    writer.close()
    ids = live_ids(catalog)
    assert (
        len(ids) == len(set(ids)) == len(events)
    )  # nothing lost (the restore's rolled-back batch is written again), no duplicate
    assert dg.materialize([asx_trades, *asx_trades_rules], partition_key="2014-03-11", resources=resources).success
    days = pc.unique(catalog.load_table("market.trades").scan(row_filter="exchange == 'ASX'").to_arrow().column("trade_date"))
    assert sorted(d.isoformat() for d in days.to_pylist()) == ["2014-03-10", "2014-03-11"]


def test_the_nightly_backup_job_keeps_the_newest_and_pushes_its_age(asx_dir, catalog_props, k2_home, pushgateway, monkeypatch):
    import time

    from k2_assets.core import recovery
    from k2_assets.defs.maintenance.backup import CatalogBackupResource, catalog_backup_job
    from k2_assets.defs.resources import IcebergResource
    from k2_assets_tests.test_metrics import gateway_text, pushed

    monkeypatch.setenv("K2_PUSHGATEWAY_URL", pushgateway)
    resources = make_resources(catalog_props, asx_dir=asx_dir)
    assert dg.materialize([asx_trades], partition_key="2014-03-10", resources=resources).success
    directory = k2_home / "backups"
    started = time.time()
    for _ in range(3):
        result = catalog_backup_job.execute_in_process(
            run_config={"ops": {"backup_catalog": {"config": {"keep": 2}}}},
            resources={
                "iceberg": IcebergResource(**catalog_props),
                "catalog_backup": CatalogBackupResource(directory=str(directory)),
            },
        )
        assert result.success
        time.sleep(1.1)  # backups are named by the second
    kept = sorted(directory.iterdir())
    assert len(kept) == 2
    manifest = recovery.read_manifest(kept[-1])
    trades = k2_catalog.open_catalog(catalog_props["catalog_uri"], catalog_props["warehouse"]).load_table("market.trades")
    assert manifest["tables"]["trades"]["metadata_location"] == trades.metadata_location
    text = gateway_text(pushgateway)
    assert pushed(text, "k2_catalog_backup_last_success_timestamp_seconds", job="k2_backup") >= started
    assert pushed(text, "k2_catalog_backup_bytes", job="k2_backup") == manifest["bytes"]


def test_backup_and_restore_of_a_postgresql_catalog(asx_dir, postgres, k2_home, tmp_path):
    """The production catalog: pg_dump while it runs, then pg_restore over a catalog that lost its pointers."""
    import sqlalchemy

    uri, warehouse = postgres.create_database(), f"file://{k2_home}/warehouse"
    props = {"catalog_uri": uri, "warehouse": warehouse}
    assert dg.materialize([asx_trades], partition_key="2014-03-10", resources=make_resources(props, asx_dir=asx_dir)).success
    catalog = k2_catalog.open_catalog(uri, warehouse)
    before = lake_state(catalog)
    env = {**os.environ, "K2_HOME": str(k2_home), "K2_CATALOG_URI": uri, "K2_WAREHOUSE": warehouse}

    def k2_pg(*args):
        return subprocess.run(
            [sys.executable, "-m", "k2_assets.cli", *args], env=env, capture_output=True, text=True, timeout=300, check=False
        )

    taken = k2_pg("catalog", "backup", "--out", str(tmp_path / "pg"))
    assert taken.returncode == 0 and (tmp_path / "pg" / "catalog.pgdump").stat().st_size > 0, taken.stderr
    with sqlalchemy.create_engine(uri).begin() as con:  # the pointers are lost; the warehouse is intact
        con.execute(sqlalchemy.text("DELETE FROM iceberg_tables"))
    assert lake_state(k2_catalog.open_catalog(uri, warehouse)) == {}
    restored = k2_pg("catalog", "restore", str(tmp_path / "pg"))
    assert restored.returncode == 0, restored.stderr
    assert lake_state(k2_catalog.open_catalog(uri, warehouse)) == before


@pytest.fixture
def s3_warehouse(monkeypatch):
    """An S3 warehouse: moto's S3-compatible server on a loopback port (no object store runs on this machine)."""
    from moto.server import ThreadedMotoServer

    from k2_assets.dev.broker import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    for name, value in {
        "K2_S3_ENDPOINT": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "k2",
        "AWS_SECRET_ACCESS_KEY": "k2-secret",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    import pyarrow.fs as pafs

    pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{port}",
        scheme="http",
        access_key="k2",
        secret_key="k2-secret",
        region="us-east-1",
        allow_bucket_creation=True,
    ).create_dir("k2-warehouse")
    yield "s3://k2-warehouse/lake"
    server.stop()


def test_rebuild_finds_the_tables_in_an_s3_warehouse(asx_dir, s3_warehouse, k2_home, tmp_path):
    uri = f"sqlite:///{k2_home}/catalog.db"
    props = {"catalog_uri": uri, "warehouse": s3_warehouse}
    assert dg.materialize([asx_trades], partition_key="2014-03-10", resources=make_resources(props, asx_dir=asx_dir)).success
    before = lake_state(k2_catalog.open_catalog(uri, s3_warehouse))
    assert before["trades"][0] > 0 and all(
        loc.startswith("s3://")
        for loc in (k2_catalog.open_catalog(uri, s3_warehouse).load_table("market.trades").metadata_location,)
    )
    (k2_home / "catalog.db").unlink()
    env = {**os.environ, "K2_HOME": str(k2_home), "K2_WAREHOUSE": s3_warehouse}
    run = [sys.executable, "-m", "k2_assets.cli", "catalog", "rebuild"]
    planned = subprocess.run([*run, "--dry-run"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert planned.returncode == 0, planned.stderr
    assert all(" would register s3://k2-warehouse/lake/market/" in line for line in planned.stdout.splitlines())
    rebuilt = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert lake_state(k2_catalog.open_catalog(uri, s3_warehouse)) == before
