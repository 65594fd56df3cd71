"""The code location as Dagster loads it: assets, checks, partitions, schedules, resources, schemas."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
import fastavro
import pyarrow as pa
import pytest
from dagster._core.instance.config import dagster_instance_config

from k2_assets.core import catalog as k2_catalog
from k2_assets.core import checks, schemas
from k2_assets.core.settings import Settings
from k2_assets.defs import rule_checks
from k2_assets.defs.asx.schedules import asx_daily_schedule
from k2_assets.defs.binance.schedules import binance_history_job, binance_history_schedule
from k2_assets.defs.partitions import asx_sessions, binance_days


def test_defs_load_with_every_asset_and_check():
    from k2_assets.definitions import defs

    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == {
        "asx_trades",
        "asx_quotes",
        "binance_trades_history",
        "binance_trades",
        "binance_um_trades_history",
        "binance_um_trades",
        "binance_klines",
        "kafka/market_crypto_trades_binance",
        "kafka/market_crypto_trades_binance_um",
        "ohlcv_1m",
        "ohlcv_5m",
        "ohlcv_1h",
        "ohlcv_1d",
    }
    binance = {"binance_trades_history", "binance_trades", "binance_um_trades_history", "binance_um_trades"}
    assert graph.get(dg.AssetKey("ohlcv_1m")).parent_keys == {dg.AssetKey(a) for a in {"asx_trades", *binance}}
    assert graph.get(dg.AssetKey("binance_klines")).parent_keys == {dg.AssetKey(a) for a in binance}
    assert graph.get(dg.AssetKey("binance_trades")).parent_keys == {dg.AssetKey(["kafka", "market_crypto_trades_binance"])}
    assert graph.get(dg.AssetKey("binance_um_trades")).parent_keys == {dg.AssetKey(["kafka", "market_crypto_trades_binance_um"])}
    check_names = {(c.asset_key.to_user_string(), c.name) for c in graph.asset_check_keys}
    # Each market's assets carry the same checks: the history loads the file rules too, the live asset its gap check.
    for history, live in (("binance_trades_history", "binance_trades"), ("binance_um_trades_history", "binance_um_trades")):
        assert {n for a, n in check_names if a == history} == {r.name for r in rule_checks.rules("trades", files=True)}
        assert {n for a, n in check_names if a == live} == {r.name for r in rule_checks.rules("trades")} | {"freshness_check"}
    for rule in checks.TRADE_RULES:
        assert ("asx_trades", rule.name) in check_names and ("binance_um_trades_history", rule.name) in check_names
    for rule in checks.QUOTE_RULES:
        assert ("asx_quotes", rule.name) in check_names
    assert ("ohlcv_1m", "matches_exchange_bars") in check_names
    # the exchange's bars feed the check that proves K2's bars against them: lineage in the UI
    exchange_check = graph.get_check_spec(dg.AssetCheckKey(dg.AssetKey("ohlcv_1m"), "matches_exchange_bars"))
    assert dg.AssetKey("binance_klines") in {d.asset_key for d in exchange_check.additional_deps}
    for key in graph.get_all_asset_keys():
        assert graph.get(key).description  # the one-line docstring shown in the UI
    repository = defs.get_repository_def()
    sensors = {s.name: s for s in repository.sensor_defs}
    for market in ("", "_um"):
        live = sensors[f"binance{market}_trades_sensor"]
        assert live.default_status == dg.DefaultSensorStatus.RUNNING
        assert [j.name for j in live.jobs] == [f"binance{market}_gap_check_job"]
        assert sensors[f"binance{market}_gap_repair_sensor"].job_name == f"binance{market}_trades_repair_job"
    assert binance_history_job.selection.resolve(graph) == {
        dg.AssetKey("binance_trades_history"),
        dg.AssetKey("binance_um_trades_history"),
    }


@pytest.mark.parametrize("instance_dir", [".", "docker"])
def test_every_sensor_ticks_in_a_thread_of_its_own(instance_dir):
    """A sensor waiting out a catalog outage must not hold up the live writer's sensor (its lease, its reports)."""
    from k2_assets.definitions import defs

    config, _ = dagster_instance_config(str(Path(__file__).resolve().parents[1] / instance_dir))
    sensors = {s.name for s in defs.sensors}
    assert {"binance_trades_sensor", "binance_gap_repair_sensor"} <= sensors
    assert config["sensors"]["use_threads"] and config["sensors"]["num_workers"] >= len(sensors), (config, sensors)


def test_resources_read_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("K2_HOME", str(tmp_path))
    for name in ("K2_CATALOG_URI", "K2_WAREHOUSE", "K2_ASX_DATA_DIR", "K2_BINANCE_HISTORY_DIR"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings.from_env()
    assert settings.catalog_uri == f"sqlite:///{tmp_path}/catalog.db"
    assert settings.warehouse == f"file://{tmp_path}/warehouse"
    monkeypatch.setenv("K2_CATALOG_URI", "postgresql+psycopg2://k2@db:5432/k2")
    monkeypatch.setenv("K2_WAREHOUSE", "s3://k2-warehouse/")
    settings = Settings.from_env()
    assert settings.catalog_uri.startswith("postgresql+psycopg2://") and settings.warehouse == "s3://k2-warehouse/"


def test_asx_partitions_are_sydney_weekdays_and_the_schedule_loads_the_day_just_closed():
    keys = asx_sessions.get_partition_keys(current_time=datetime(2014, 3, 15, tzinfo=ZoneInfo("UTC")))
    assert {"2014-03-10", "2014-03-14"} <= set(keys)
    assert "2014-03-08" not in keys and "2014-03-09" not in keys  # weekend
    # 19:30 Sydney on Monday 10 March 2014 is 08:30 UTC the same day.
    with dg.build_schedule_context(scheduled_execution_time=datetime(2014, 3, 10, 8, 30, tzinfo=ZoneInfo("UTC"))) as context:
        request = asx_daily_schedule(context)
    assert request.partition_key == "2014-03-10"
    # Binance: today's UTC partition exists (live batches land in it); the history schedule loads yesterday.
    assert binance_days.get_partition_keys(current_time=datetime(2024, 1, 2, 5, tzinfo=ZoneInfo("UTC")))[-1] == "2024-01-02"
    with dg.build_schedule_context(scheduled_execution_time=datetime(2024, 1, 2, 3, tzinfo=ZoneInfo("UTC"))) as context:
        assert binance_history_schedule(context).partition_key == "2024-01-01"


def test_iceberg_schemas_are_derived_from_the_avro_contracts(catalog):
    for name, definition in k2_catalog.TABLES.items():
        avro = json.loads((schemas.SCHEMA_DIR / f"{definition.schema}.avsc").read_text())
        fastavro.parse_schema(avro)  # a valid Avro schema for the Kafka messages too
        table = k2_catalog.ensure_table(catalog, name)
        assert [f.name for f in table.schema().fields] == [f["name"] for f in avro["fields"]]
        arrow = schemas.arrow_schema(definition.schema)
        for field in avro["fields"]:
            nullable = isinstance(field["type"], list) and "null" in field["type"]
            assert arrow.field(field["name"]).nullable == nullable
    trade = schemas.arrow_schema(schemas.TRADE)
    assert trade.field("price").type == pa.decimal128(18, 8)
    assert trade.field("exchange_timestamp").type == pa.timestamp("us", tz="UTC")
    assert schemas.enum_symbols(schemas.TRADE, "side") == ["BUY", "SELL", "UNKNOWN"]


def test_a_table_an_older_k2_made_gains_the_properties_it_lacks_and_keeps_its_own(catalog):
    trades = k2_catalog.ensure_table(catalog, "trades")
    with trades.transaction() as tx:  # as an older K2 left it, with an operator's own compression
        tx.remove_properties("write.delete.isolation-level")
        tx.set_properties({"write.parquet.compression-codec": "snappy"})
    assert "write.delete.isolation-level" not in catalog.load_table("market.trades").properties
    loaded = k2_catalog.ensure_table(catalog, "trades")
    assert loaded.properties["write.delete.isolation-level"] == "snapshot"
    assert catalog.load_table("market.trades").properties["write.parquet.compression-codec"] == "snappy"


@pytest.mark.parametrize("storage", ["sqlite", "postgres"])
def test_threads_opening_a_new_catalog_and_its_tables_at_once_all_succeed(storage, tmp_path, request):
    """As the daemon's sensors do, each in its own thread, on their first tick against a fresh catalog."""
    if storage == "sqlite":
        uri = f"sqlite:///{tmp_path}/catalog.db"
    else:
        uri = request.getfixturevalue("postgres").create_database()
    start = threading.Barrier(6)

    def first_tick(name: str) -> str:
        start.wait()
        return k2_catalog.ensure_table(k2_catalog.open_catalog(uri, f"file://{tmp_path}/warehouse"), name).name()[-1]

    names = ["trades", "trades", "sequence_gaps", "sequence_gaps", "rejected", "rejected"]
    with ThreadPoolExecutor(len(names)) as pool:
        assert list(pool.map(first_tick, names)) == names


def test_avro_round_trip_of_a_decoded_trade(asx_dir):
    """A trade K2 decoded serializes under the Avro contract and reads back equal."""
    import io
    from datetime import date

    from k2_assets.core import asx

    batch = asx.load_session(asx_dir, date(2014, 3, 10), "trades", source="asx_trades")
    record = batch.rows.slice(0, 1).to_pylist()[0]
    record["vendor_data"] = dict(record["vendor_data"])
    parsed = fastavro.parse_schema(schemas.avro_schema(schemas.TRADE))
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, parsed, record)
    buffer.seek(0)
    back = fastavro.schemaless_reader(buffer, parsed)
    assert back["price"] == record["price"] and back["message_id"] == record["message_id"]
    assert back["exchange_timestamp"] == record["exchange_timestamp"]
