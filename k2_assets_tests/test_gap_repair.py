"""Gaps in real Binance trade ids: found exactly, repaired through the local exchange, closed once."""

from __future__ import annotations

import csv

import dagster as dg
import pyarrow.compute as pc

from k2_assets.defs.binance.assets import binance_trades, binance_trades_history
from k2_assets.defs.binance.checks import binance_trades_history_rules, binance_trades_no_unexplained_gaps, binance_trades_rules
from k2_assets.defs.binance.resources import BinanceRestResource
from k2_assets.defs.binance.sensors import binance_gap_repair_sensor
from k2_assets.defs.resources import IcebergResource
from k2_assets.dev.feed_server import replay_file, run_in_thread
from k2_assets_tests.conftest import make_resources

BTC_FILE = "BTCUSDT-trades-2024-01-01_1200-1230.derived.csv"
FIRST = 3345206428


def write_without(btcusdt_dir, path, removed: set[int]) -> None:
    with open(btcusdt_dir / BTC_FILE, newline="") as f:
        header, *rows = list(csv.reader(f))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(",".join(header) + "\n" + "".join(",".join(r) + "\n" for r in rows if int(r[0]) not in removed))


def test_removed_ids_are_reported_exactly_then_repaired_and_closed(btcusdt_dir, tmp_path, catalog_props, catalog):
    single, run_start, run_end, last = FIRST + 100, FIRST + 5000, FIRST + 5049, FIRST + 16700
    removed = {single, *range(run_start, run_end + 1), last}
    history = tmp_path / "history"
    write_without(btcusdt_dir, history / "BTCUSDT-trades-2024-01-01.csv", removed)
    resources = make_resources(catalog_props, binance_dir=history)

    result = dg.materialize(
        [binance_trades_history, *binance_trades_history_rules], partition_key="2024-01-01", resources=resources
    )
    gaps_check = {e.check_name: e for e in result.get_asset_check_evaluations()}["no_unexplained_gaps"]
    assert not gaps_check.passed and gaps_check.severity == dg.AssetCheckSeverity.WARN
    assert gaps_check.metadata["failed_rows"].value == len(removed)
    expected = [(single, single), (run_start, run_end), (last, last)]
    assert [(s["first_missing"], s["last_missing"]) for s in gaps_check.metadata["sample"].value] == expected
    gaps = catalog.load_table("market.sequence_gaps").scan().to_arrow().to_pylist()
    assert sorted((g["first_missing"], g["last_missing"], g["closed_at"]) for g in gaps) == [(a, b, None) for a, b in expected]
    assert catalog.load_table("market.trades").scan().to_arrow().num_rows == 16702 - len(removed)

    # The repair sensor asks for one run of the day; the same open gaps never make a second one.
    instance = dg.DagsterInstance.ephemeral()
    with dg.build_sensor_context(instance=instance, resources={"iceberg": IcebergResource(**catalog_props)}) as context:
        requests = binance_gap_repair_sensor(context)
    assert [r.partition_key for r in requests] == ["2024-01-01"]

    # The exchange (the local server replaying the full real file) has every trade.
    with run_in_thread(replay_file(btcusdt_dir / BTC_FILE)) as exchange:
        repair_resources = {**resources, "binance_rest": BinanceRestResource(base_url=exchange.http_url)}
        result = dg.materialize(
            [binance_trades, *binance_trades_rules, binance_trades_no_unexplained_gaps],
            partition_key="2024-01-01",
            resources=repair_resources,
        )
        again = dg.materialize(
            [binance_trades, *binance_trades_rules, binance_trades_no_unexplained_gaps],
            partition_key="2024-01-01",
            resources=repair_resources,
        )
    assert result.success and again.success
    (event,) = result.asset_materializations_for_node("binance_trades")
    assert event.metadata["rows_written"].value == len(removed)
    (event_again,) = again.asset_materializations_for_node("binance_trades")
    assert event_again.metadata["rows_written"].value == 0  # nothing left to repair, nothing written twice
    table = catalog.load_table("market.trades").scan().to_arrow()
    assert table.num_rows == 16702 == pc.count_distinct(table.column("message_id")).as_py()
    assert sorted(table.column("source_sequence").to_pylist()) == list(range(FIRST, FIRST + 16702))
    gaps = catalog.load_table("market.sequence_gaps").scan().to_arrow().to_pylist()
    assert sorted((g["first_missing"], g["last_missing"], g["closed_how"]) for g in gaps) == [
        (a, b, "repair") for a, b in expected
    ]
    assert all(e.passed for e in result.get_asset_check_evaluations())


def test_a_gap_the_exchange_cannot_fill_stays_open_with_its_answer(btcusdt_dir, tmp_path, catalog_props, catalog):
    lost = FIRST + 200
    history = tmp_path / "history"
    write_without(btcusdt_dir, history / "BTCUSDT-trades-2024-01-01.csv", {lost, lost + 1})
    exchange_file = tmp_path / "exchange" / "BTCUSDT-trades-2024-01-01.csv"
    write_without(btcusdt_dir, exchange_file, {lost})  # the exchange itself lacks one of the two
    resources = make_resources(catalog_props, binance_dir=history)
    dg.materialize([binance_trades_history, *binance_trades_history_rules], partition_key="2024-01-01", resources=resources)
    with run_in_thread(replay_file(exchange_file)) as exchange:
        result = dg.materialize(
            [binance_trades, *binance_trades_rules, binance_trades_no_unexplained_gaps],
            partition_key="2024-01-01",
            resources={**resources, "binance_rest": BinanceRestResource(base_url=exchange.http_url)},
        )
    (event,) = result.asset_materializations_for_node("binance_trades")
    assert event.metadata["rows_written"].value == 1
    open_gaps = [g for g in catalog.load_table("market.sequence_gaps").scan().to_arrow().to_pylist() if g["closed_at"] is None]
    assert [(g["first_missing"], g["last_missing"]) for g in open_gaps] == [(lost, lost)]
    assert "exchange" in open_gaps[0]["explained_by"] and str(lost) in open_gaps[0]["explained_by"]
    # Explained, so the check no longer warns; the gap stays on record as open.
    assert {e.check_name: e.passed for e in result.get_asset_check_evaluations()}["no_unexplained_gaps"]
