"""The binance_trades sensor on a real broker and catalog: micro-batches become materializations."""

from __future__ import annotations

import json

import dagster as dg
import pyarrow.compute as pc

from k2_assets.defs.binance.resources import KafkaResource
from k2_assets.defs.binance.sensors import binance_trades_sensor, reset_writers
from k2_assets.defs.resources import IcebergResource
from k2_assets_tests.conftest import btc_trade_events
from k2_assets_tests.test_live_writer import produce, trade_messages


def tick(instance, catalog_props, broker, topic, cursor=None, drain_seconds=20.0):
    resources = {
        "iceberg": IcebergResource(**catalog_props),
        "kafka": KafkaResource(bootstrap=broker.bootstrap, topic=topic, drain_seconds=drain_seconds),
    }
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        return binance_trades_sensor(context)


def test_sensor_ticks_write_once_and_report_each_partition(btcusdt_dir, broker, topic, catalog_props, catalog):
    events = btc_trade_events(btcusdt_dir)
    produce(broker.bootstrap, topic, trade_messages(events[:10000]) + [(b"BTCUSDT", b"not json")])
    instance = dg.DagsterInstance.ephemeral()
    try:
        result = tick(instance, catalog_props, broker, topic)
        assert isinstance(result, dg.SensorResult)
        events_out = [e for e in result.asset_events if isinstance(e, dg.AssetMaterialization)]
        # The day's gap check runs on its own, once per tick that wrote, keyed by the tick's last snapshot.
        (request,) = result.run_requests
        assert request.job_name == "binance_gap_check_job" and request.tags["dagster/partition"] == "2024-01-01"
        assert request.run_key == f"gaps-2024-01-01-{events_out[-1].metadata['snapshot_id'].value}"
        assert events_out and all(
            e.asset_key == dg.AssetKey("binance_trades") and e.partition == "2024-01-01" for e in events_out
        )
        assert sum(e.metadata["rows_written"].value for e in events_out) == 10000
        assert sum(e.metadata["rows_rejected"].value for e in events_out) == 1
        first = events_out[0].metadata
        assert {"offset_ranges", "snapshot_id", "latency_p95_seconds", "dead_lettered"} <= set(first)
        assert json.loads(result.cursor) == {"offsets": {"0": 10001, "1": 0, "2": 0}}

        # Nothing new: the tick says so.
        assert "no new messages" in tick(instance, catalog_props, broker, topic, result.cursor).skip_reason.skip_message

        # The writer is forgotten (a code-server restart): the next tick resumes from the table's offsets.
        reset_writers()
        produce(broker.bootstrap, topic, trade_messages(events[9000:]))  # overlaps 1,000 already written
        result = tick(instance, catalog_props, broker, topic, result.cursor)
        materialized = [e for e in result.asset_events if isinstance(e, dg.AssetMaterialization)]
        assert sum(e.metadata["rows_written"].value for e in materialized) == len(events) - 10000
        assert sum(e.metadata["rows_duplicate_skipped"].value for e in materialized) == 1000
    finally:
        reset_writers()
    table = catalog.load_table("market.trades").scan().to_arrow()
    assert table.num_rows == 16702 == pc.count_distinct(table.column("message_id")).as_py()


def test_a_tick_during_a_catalog_outage_ends_cleanly_and_the_next_resumes(
    btcusdt_dir, broker, topic, catalog_props, catalog, monkeypatch
):
    """The catalog is locked for longer than a tick: the tick says so and ends without failing; once the
    catalog is back, the next tick writes everything, once."""
    import sqlite3
    import threading
    import time

    events = btc_trade_events(btcusdt_dir)
    produce(broker.bootstrap, topic, trade_messages(events[:3000]))
    instance = dg.DagsterInstance.ephemeral()
    try:
        first = tick(instance, catalog_props, broker, topic)
        assert sum(e.metadata["rows_written"].value for e in first.asset_events if isinstance(e, dg.AssetMaterialization)) == 3000
        produce(broker.bootstrap, topic, trade_messages(events[3000:]))
        locked, release = threading.Event(), threading.Event()

        def hold() -> None:
            db = sqlite3.connect(catalog_props["catalog_uri"].removeprefix("sqlite:///"), isolation_level=None, timeout=30)
            db.execute("BEGIN EXCLUSIVE")
            locked.set()
            release.wait(60)
            db.execute("ROLLBACK")
            db.close()

        holder = threading.Thread(target=hold)
        holder.start()
        locked.wait(10)
        started = time.monotonic()
        during = tick(instance, catalog_props, broker, topic, first.cursor, drain_seconds=4.0)  # must not raise
        assert time.monotonic() - started < 30
        assert "store outage" in during.skip_reason.skip_message and "unavailable" in during.skip_reason.skip_message
        release.set()
        holder.join()
        after = tick(instance, catalog_props, broker, topic, during.cursor)
        written = [e for e in after.asset_events if isinstance(e, dg.AssetMaterialization)]
        assert sum(e.metadata["rows_written"].value for e in written) == len(events) - 3000
        # The next materialization says how the tick before it ended; later ones do not repeat it.
        assert "store outage" in written[0].metadata["previous_tick_error"].value
        assert all("previous_tick_error" not in e.metadata for e in written[1:])
        assert "pending_error" not in json.loads(after.cursor)
    finally:
        reset_writers()
    table = catalog.load_table("market.trades").scan().to_arrow()
    assert table.num_rows == 16702 == pc.count_distinct(table.column("message_id")).as_py()


def test_a_tick_that_meets_an_error_ends_cleanly_and_the_next_materialization_says_so(
    btcusdt_dir, broker, topic, catalog_props, catalog
):
    """market.trades is dropped under a running writer: that tick reports the error instead of failing, and the
    next one rebuilds the writer from the (new, empty) table's offsets and writes everything into it once."""
    events = btc_trade_events(btcusdt_dir)
    produce(broker.bootstrap, topic, trade_messages(events[:2000]))
    instance = dg.DagsterInstance.ephemeral()
    try:
        first = tick(instance, catalog_props, broker, topic, drain_seconds=4.0)
        assert first.run_requests
        catalog.drop_table("market.trades")
        produce(broker.bootstrap, topic, trade_messages(events[2000:4000]))
        failed = tick(instance, catalog_props, broker, topic, first.cursor, drain_seconds=4.0)  # must not raise
        reason = failed.skip_reason.skip_message
        assert reason.startswith("tick ended by an error (NoSuchTableError) after 0 micro-batches") and "\n" not in reason
        assert json.loads(failed.cursor)["pending_error"] == reason
        after = tick(instance, catalog_props, broker, topic, failed.cursor, drain_seconds=4.0)
        written = [e for e in after.asset_events if isinstance(e, dg.AssetMaterialization)]
        assert written[0].metadata["previous_tick_error"].value == reason
        assert sum(e.metadata["rows_written"].value for e in written) == 4000
    finally:
        reset_writers()
    table = catalog.load_table("market.trades").scan().to_arrow()
    assert table.num_rows == 4000 == pc.count_distinct(table.column("message_id")).as_py()
