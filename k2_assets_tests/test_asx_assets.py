"""asx_trades / asx_quotes materialized with Dagster into a real SQLite-catalog Iceberg warehouse."""

from __future__ import annotations

import collections

import dagster as dg
import pyarrow.compute as pc
import pytest
from pyiceberg.expressions import EqualTo

from k2_assets.core import catalog as k2_catalog
from k2_assets.defs.asx.assets import asx_quotes, asx_trades
from k2_assets.defs.asx.checks import asx_quotes_rules, asx_trades_rules
from k2_assets_tests.conftest import make_resources
from k2_assets_tests.test_asx_decode import BAD_LINES, SESSIONS, bad_copy, expected_counts


def trades_by_symbol_day(catalog, exchange="ASX"):
    table = catalog.load_table("market.trades").scan(row_filter=EqualTo("exchange", exchange)).to_arrow()
    return collections.Counter(zip(table.column("symbol").to_pylist(), table.column("trade_date").to_pylist())), table


def metadata(result, asset):
    (event,) = result.asset_materializations_for_node(asset)
    return {k: v.value for k, v in event.metadata.items()}


def test_five_sessions_write_exactly_the_source_rows_and_reruns_change_nothing(asx_dir, catalog_props, catalog):
    resources = make_resources(catalog_props, asx_dir=asx_dir)
    for session in SESSIONS:
        result = dg.materialize(
            [asx_trades, asx_quotes, *asx_trades_rules, *asx_quotes_rules], partition_key=session.isoformat(), resources=resources
        )
        assert result.success
        meta = metadata(result, "asx_trades")
        assert meta["rows_read"] == meta["rows_written"] + meta["rows_rejected"]
        assert meta["snapshot_id"] == str(
            catalog.load_table("market.trades").scan(row_filter=EqualTo("trade_date", session.isoformat())).snapshot().snapshot_id
        )
        evaluations = result.get_asset_check_evaluations()
        assert len(evaluations) == (13 + 2) + (10 + 2) and all(e.passed for e in evaluations)  # + the two ledger checks
        # The ledger: one row per company file per load, whose lines add up to the load's.
        ledger = (
            catalog.load_table("market.source_files").scan(row_filter=EqualTo("run_id", result.run_id)).to_arrow().to_pylist()
        )
        trades_files = [r for r in ledger if r["source"] == "asx_trades"]
        assert sorted(r["path"] for r in trades_files) == sorted(f"trades/{p.name}" for p in (asx_dir / "trades").glob("*.csv"))
        assert sum(r["lines_read"] for r in trades_files) == meta["rows_read"]
        assert all(
            len(r["sha256"]) == 64 and r["size_bytes"] > 0 and not r["changed"] and r["file_error"] is None for r in ledger
        )
    counts, table = trades_by_symbol_day(catalog)
    assert counts == expected_counts(asx_dir, "trades")
    assert pc.count_distinct(table.column("message_id")).as_py() == table.num_rows

    quotes = catalog.load_table("market.quotes").scan().to_arrow()
    assert quotes.num_rows == sum(expected_counts(asx_dir, "quotes").values())

    # Rerun two partitions: same rows, same ids, nothing left over.
    before_ids = sorted(table.column("message_id").to_pylist())
    for key in ("2014-03-10", "2014-03-13"):
        assert dg.materialize(
            [asx_trades, asx_quotes, *asx_trades_rules, *asx_quotes_rules], partition_key=key, resources=resources
        ).success
    counts_after, table_after = trades_by_symbol_day(catalog)
    assert counts_after == counts
    assert sorted(table_after.column("message_id").to_pylist()) == before_ids
    assert catalog.load_table("market.quotes").scan().to_arrow().num_rows == quotes.num_rows


def test_rejected_rows_land_in_market_rejected_once_per_partition(asx_dir, tmp_path, catalog_props, catalog):
    data = bad_copy(asx_dir, tmp_path)
    resources = make_resources(catalog_props, asx_dir=data)
    for _ in range(2):  # the rerun replaces the partition's rejects, it does not add to them
        result = dg.materialize([asx_trades, *asx_trades_rules], partition_key="2014-03-10", resources=resources)
        assert result.success
        meta = metadata(result, "asx_trades")
        assert meta["rows_rejected"] == len(BAD_LINES)
        assert meta["rows_read"] == meta["rows_written"] + meta["rows_rejected"]
        rejected = catalog.load_table("market.rejected").scan().to_arrow()
        assert rejected.num_rows == len(BAD_LINES)
    assert set(rejected.column("reason").to_pylist()) == set(BAD_LINES.values())
    assert set(rejected.column("source").to_pylist()) == {"asx_trades"}
    written = catalog.load_table("market.trades").scan().to_arrow()
    assert written.num_rows == meta["rows_written"]
    assert "does not fit decimal(18,8)" in meta["rejected_reasons"]
    # The rejected rows leave a hole in BHP's sequence, and the hole is explained by them.
    gaps = catalog.load_table("market.sequence_gaps").scan().to_arrow().to_pylist()
    assert [(g["symbol"], g["first_missing"], g["last_missing"], g["closed_at"]) for g in gaps] == [
        ("BHP", 101, 100 + len(BAD_LINES), None)
    ]
    assert gaps[0]["explained_by"] == f"{len(BAD_LINES)} rejected row(s) in market.rejected"
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["no_unexplained_gaps"].passed and checks["time_monotonic_in_sequence"].passed


def test_rerun_after_the_vendor_corrects_a_file_leaves_no_leftovers(asx_dir, tmp_path, catalog_props, catalog):
    data = bad_copy(asx_dir, tmp_path)
    resources = make_resources(catalog_props, asx_dir=data)
    assert dg.materialize([asx_trades, *asx_trades_rules], partition_key="2014-03-10", resources=resources).success
    # The vendor redelivers BHP without its bad lines and without its last 10 rows of the session.
    path = data / "trades" / "7078.csv"
    lines = [line for line in path.read_bytes().decode().split("\r\n") if line not in BAD_LINES]
    session_idx = [i for i, line in enumerate(lines) if line.startswith("03/10/2014")]
    del lines[session_idx[-10] : session_idx[-1] + 1]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    result = dg.materialize([asx_trades, *asx_trades_rules], partition_key="2014-03-10", resources=resources)
    assert metadata(result, "asx_trades")["rows_rejected"] == 0
    bhp = catalog.load_table("market.trades").scan(row_filter=EqualTo("symbol", "BHP")).to_arrow()
    assert bhp.num_rows == len(session_idx) - 10
    assert catalog.load_table("market.rejected").scan().to_arrow().num_rows == 0


def test_tables_are_partitioned_sorted_and_keep_metadata_small(asx_dir, catalog_props, catalog):
    resources = make_resources(catalog_props, asx_dir=asx_dir)
    assert dg.materialize([asx_trades, *asx_trades_rules], partition_key="2014-03-12", resources=resources).success
    table = catalog.load_table("market.trades")
    assert [f.name for f in table.spec().fields] == ["exchange", "trade_date"]
    names = {f.field_id: f.name for f in table.schema().fields}
    assert [names[f.source_id] for f in table.sort_order().fields] == ["symbol", "exchange_timestamp", "source_sequence"]
    assert table.properties["commit.manifest-merge.enabled"] == "true"
    summary = table.current_snapshot().summary
    assert summary["k2.source"] == "asx_trades" and summary["k2.partition"] == "2014-03-12"
    # Files are written sorted: within a symbol, time then sequence ascend.
    rows = table.scan(row_filter=EqualTo("symbol", "RIO")).to_arrow()
    ts = rows.column("exchange_timestamp").to_pylist()
    assert ts == sorted(ts)
    assert k2_catalog.table_identifier("trades") == "market.trades"
    with pytest.raises(ValueError):
        k2_catalog.table_identifier("trades; DROP TABLE x")


def test_missing_vendor_directory_is_a_clear_error(catalog_props, tmp_path):
    resources = make_resources(catalog_props, asx_dir=tmp_path / "nowhere")
    result = dg.materialize(
        [asx_trades, *asx_trades_rules], partition_key="2014-03-10", resources=resources, raise_on_error=False
    )
    assert not result.success
    error = result.get_step_failure_events()[0].step_failure_data.error
    assert error.cause.cls_name == "FileNotFoundError"
    assert "reference-data/company_info.csv is missing (set K2_ASX_DATA_DIR)" in error.cause.message
