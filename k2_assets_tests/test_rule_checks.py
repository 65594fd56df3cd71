"""Every rule is an asset check of its own: run alone, on a stored partition, at its latest materialization's snapshot."""

from __future__ import annotations

import os
import subprocess
import sys
from decimal import Decimal

import dagster as dg
import pyarrow as pa
from pyiceberg.expressions import EqualTo

from k2_assets.cli.common import run_selection
from k2_assets.defs.asx.assets import asx_trades
from k2_assets.defs.asx.checks import asx_trades_rules
from k2_assets_tests.conftest import make_resources

DAY = "2014-03-10"
PRICE_POSITIVE = dg.AssetCheckKey(dg.AssetKey("asx_trades"), "price_positive")


def test_one_check_runs_alone_on_the_snapshot_its_partition_was_materialized_at(asx_dir, catalog_props, catalog, monkeypatch):
    # run_selection runs the code location's own job, whose resources read the settings from the environment.
    for name, value in {
        "K2_ASX_DATA_DIR": str(asx_dir),
        "K2_CATALOG_URI": catalog_props["catalog_uri"],
        "K2_WAREHOUSE": catalog_props["warehouse"],
    }.items():
        monkeypatch.setenv(name, value)
    with dg.DagsterInstance.ephemeral() as instance:
        loaded = dg.materialize(
            [asx_trades, *asx_trades_rules],
            partition_key=DAY,
            instance=instance,
            resources=make_resources(catalog_props, asx_dir=asx_dir),
        )
        assert loaded.success and all(e.passed for e in loaded.get_asset_check_evaluations())
        (event,) = loaded.asset_materializations_for_node("asx_trades")
        loaded_snapshot = event.metadata["snapshot_id"].value

        # A row written behind Dagster's back: not part of the partition's materialization, so the check does not see it ...
        trades = catalog.load_table("market.trades")
        stored = trades.scan(row_filter=EqualTo("trade_date", DAY), limit=1).to_arrow()
        row = {**stored.to_pylist()[0], "price": Decimal(-1), "message_id": "tampered"}
        trades.append(pa.Table.from_pylist([row], schema=stored.schema))
        alone = run_selection(set(), {PRICE_POSITIVE}, DAY, instance)
        (evaluation,) = alone.get_asset_check_evaluations()
        assert alone.success and evaluation.check_name == "price_positive" and evaluation.passed
        assert evaluation.metadata["snapshot_id"].value == loaded_snapshot and evaluation.partition == DAY
        assert not alone.get_asset_materialization_events()  # a check run writes nothing

        # ... until a materialization reports the snapshot that holds it (as the live sensor does per micro-batch).
        tampered = str(catalog.load_table("market.trades").metadata.current_snapshot_id)
        instance.report_runless_asset_event(
            dg.AssetMaterialization("asx_trades", partition=DAY, metadata={"snapshot_id": tampered})
        )
        again = run_selection(set(), {PRICE_POSITIVE}, DAY, instance)
        (evaluation,) = again.get_asset_check_evaluations()
        assert not evaluation.passed and evaluation.metadata["failed_rows"].value == 1
        assert evaluation.metadata["snapshot_id"].value == tampered
        assert evaluation.metadata["sample"].value[0]["message_id"] == "tampered"
        assert not again.success  # price_positive blocks: its failure fails the run, as in a materialization


def test_k2_check_runs_checks_alone_from_the_command_line(asx_dir, k2_home):
    env = {**os.environ, "K2_HOME": str(k2_home), "K2_ASX_DATA_DIR": str(asx_dir)}
    k2 = [sys.executable, "-m", "k2_assets.cli"]
    backfill = subprocess.run(
        [*k2, "backfill", "asx_trades", "--start", DAY, "--end", DAY], env=env, capture_output=True, text=True, timeout=300
    )
    assert backfill.returncode == 0 and "1 of 1 partitions materialized" in backfill.stderr, backfill.stderr[-2000:]
    run = subprocess.run(
        [*k2, "check", "run", "asx_trades", "price_positive", "lines_accounted_for", "--partition", DAY],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines() == [f"{DAY} asx_trades:price_positive passed", f"{DAY} asx_trades:lines_accounted_for passed"]
    wrong = subprocess.run(
        [*k2, "check", "run", "asx_trades", "no_such_rule", "--partition", DAY],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert wrong.returncode == 2 and wrong.stderr.strip().count("\n") == 0 and "no check no_such_rule" in wrong.stderr
