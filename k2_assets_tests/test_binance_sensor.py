"""The binance_trades sensor on a real broker and catalog: its writer drains between ticks, and each tick reports
the micro-batches committed since the last one as materializations."""

from __future__ import annotations

import json
import time

import dagster as dg
import pyarrow.compute as pc

from k2_assets.defs.binance.resources import KafkaResource
from k2_assets.defs.binance.sensors import binance_trades_sensor, reset_writers
from k2_assets.defs.resources import IcebergResource
from k2_assets_tests.conftest import btc_trade_events
from k2_assets_tests.test_live_writer import produce, trade_messages

CYCLE_SECONDS = 4  # K2_SENSOR_DRAIN_SECONDS: the writer reconciles gaps (and asks for a gap check) this often


def evaluate(sensor, instance, resources: dict, cursor: str | None = None):
    """One tick of `sensor`, as the daemon evaluates it."""
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        return sensor(context)


def ticks_until(sensor, instance, resources: dict, until, cursor: str | None = None, timeout: float = 90.0) -> list:
    """Tick every 0.5 s (the daemon ticks every 5 s) until `until(results)` holds; the results of every tick."""
    results, deadline = [], time.monotonic() + timeout
    while True:
        results.append(evaluate(sensor, instance, resources, cursor))
        cursor = results[-1].cursor
        if until(results):
            return results
        assert time.monotonic() < deadline, f"not done after {timeout} s: {[skip_reason(r) for r in results[-3:]]}"
        time.sleep(0.5)


def materialized(results: list) -> list[dg.AssetMaterialization]:
    return [e for r in results for e in (r.asset_events or []) if isinstance(e, dg.AssetMaterialization)]


def written(results: list) -> int:
    return sum(e.metadata["rows_written"].value for e in materialized(results))


def skip_reason(result) -> str:
    return result.skip_reason.skip_message if result.skip_reason else ""


def resources_of(catalog_props, broker, topic) -> dict:
    return {
        "iceberg": IcebergResource(**catalog_props),
        "kafka": KafkaResource(bootstrap=broker.bootstrap, topic=topic, drain_seconds=CYCLE_SECONDS),
    }


def spot_ticks(catalog_props, broker, topic, instance, until, cursor=None, timeout: float = 90.0) -> list:
    return ticks_until(binance_trades_sensor, instance, resources_of(catalog_props, broker, topic), until, cursor, timeout)


def test_sensor_ticks_write_once_and_report_each_partition(btcusdt_dir, broker, topic, catalog_props, catalog):
    events = btc_trade_events(btcusdt_dir)
    produce(broker.bootstrap, topic, trade_messages(events[:10000]) + [(b"BTCUSDT", b"not json")])
    instance = dg.DagsterInstance.ephemeral()
    try:
        results = spot_ticks(
            catalog_props, broker, topic, instance, lambda rs: written(rs) == 10000 and any(r.run_requests for r in rs)
        )
        assert skip_reason(results[0]).startswith("started a writer draining")  # the first tick starts it
        events_out = materialized(results)
        # The day's gap check runs on its own, once per cycle that wrote, keyed by the cycle's last snapshot.
        (request,) = [r for result in results for r in result.run_requests or []]
        assert request.job_name == "binance_gap_check_job" and request.tags["dagster/partition"] == "2024-01-01"
        assert request.run_key == f"gaps-2024-01-01-{events_out[-1].metadata['snapshot_id'].value}"
        assert events_out and all(
            e.asset_key == dg.AssetKey("binance_trades") and e.partition == "2024-01-01" for e in events_out
        )
        assert sum(e.metadata["rows_rejected"].value for e in events_out) == 1
        first = events_out[0].metadata
        assert {"offset_ranges", "snapshot_id", "latency_p95_seconds", "dead_lettered"} <= set(first)
        assert json.loads(results[-1].cursor) == {"offsets": {"0": 10001, "1": 0, "2": 0}}

        # Nothing new: the tick says so.
        quiet = spot_ticks(catalog_props, broker, topic, instance, lambda rs: True, results[-1].cursor)
        assert "no new messages" in skip_reason(quiet[-1])

        # The writer is forgotten (a code-server restart): the next ticks resume from the table's offsets.
        reset_writers()
        produce(broker.bootstrap, topic, trade_messages(events[9000:]))  # overlaps 1,000 already written
        results = spot_ticks(
            catalog_props, broker, topic, instance, lambda rs: written(rs) == len(events) - 10000, quiet[-1].cursor
        )
        assert sum(e.metadata["rows_duplicate_skipped"].value for e in materialized(results)) == 1000
    finally:
        reset_writers()
    table = catalog.load_table("market.trades").scan().to_arrow()
    assert table.num_rows == 16702 == pc.count_distinct(table.column("message_id")).as_py()


def test_a_catalog_outage_ends_the_drain_cleanly_and_the_next_tick_resumes(btcusdt_dir, broker, topic, catalog_props, catalog):
    """The catalog is locked for longer than the writer waits: a tick says so without failing; once the catalog is
    back, the writer started again writes everything, once, and its first materialization says what happened."""
    import sqlite3
    import threading

    events = btc_trade_events(btcusdt_dir)
    produce(broker.bootstrap, topic, trade_messages(events[:3000]))
    instance = dg.DagsterInstance.ephemeral()
    try:
        first = spot_ticks(catalog_props, broker, topic, instance, lambda rs: written(rs) == 3000)
        locked, release = threading.Event(), threading.Event()

        def hold() -> None:
            db = sqlite3.connect(catalog_props["catalog_uri"].removeprefix("sqlite:///"), isolation_level=None, timeout=30)
            db.execute("BEGIN EXCLUSIVE")
            locked.set()
            release.wait(90)
            db.execute("ROLLBACK")
            db.close()

        holder = threading.Thread(target=hold)
        holder.start()
        locked.wait(10)
        produce(broker.bootstrap, topic, trade_messages(events[3000:]))
        during = spot_ticks(
            catalog_props, broker, topic, instance, lambda rs: "store outage" in skip_reason(rs[-1]), first[-1].cursor
        )  # no tick raises
        reason = skip_reason(during[-1])
        assert reason.startswith("drain ended by a store outage") and "unavailable" in reason and "\n" not in reason
        assert written(during) == 0
        release.set()
        holder.join()
        after = spot_ticks(
            catalog_props, broker, topic, instance, lambda rs: written(rs) == len(events) - 3000, during[-1].cursor
        )
        done = materialized(after)
        # The next materialization says how the drain before it ended; later ones do not repeat it.
        assert "store outage" in done[0].metadata["previous_tick_error"].value
        assert all("previous_tick_error" not in e.metadata for e in done[1:])
        assert "pending_error" not in json.loads(after[-1].cursor)
    finally:
        reset_writers()
    table = catalog.load_table("market.trades").scan().to_arrow()
    assert table.num_rows == 16702 == pc.count_distinct(table.column("message_id")).as_py()


def test_an_error_ends_the_drain_cleanly_and_the_next_materialization_says_so(btcusdt_dir, broker, topic, catalog_props, catalog):
    """market.trades is dropped under a running writer: a tick reports the error instead of failing, and the writer
    started again from the (new, empty) table's offsets writes everything into it once."""
    events = btc_trade_events(btcusdt_dir)
    produce(broker.bootstrap, topic, trade_messages(events[:2000]))
    instance = dg.DagsterInstance.ephemeral()
    try:
        first = spot_ticks(
            catalog_props, broker, topic, instance, lambda rs: written(rs) == 2000 and any(r.run_requests for r in rs)
        )
        catalog.drop_table("market.trades")
        produce(broker.bootstrap, topic, trade_messages(events[2000:4000]))
        failed = spot_ticks(
            catalog_props, broker, topic, instance, lambda rs: skip_reason(rs[-1]).startswith("drain ended"), first[-1].cursor
        )  # no tick raises
        reason = skip_reason(failed[-1])
        assert reason.startswith("drain ended by an error after ") and "\n" not in reason
        assert "micro-batches: NoSuchTableError: Table does not exist: market.trades" in reason
        assert json.loads(failed[-1].cursor)["pending_error"] == reason
        after = spot_ticks(catalog_props, broker, topic, instance, lambda rs: written(rs) == 4000, failed[-1].cursor)
        assert materialized(after)[0].metadata["previous_tick_error"].value == reason
    finally:
        reset_writers()
    table = catalog.load_table("market.trades").scan().to_arrow()
    assert table.num_rows == 4000 == pc.count_distinct(table.column("message_id")).as_py()


def test_a_writer_nobody_harvests_stops(btcusdt_dir, broker, topic, catalog_props, catalog):
    """The sensor stopped in the UI (no ticks): its writer stops once its lease runs out and leaves the group."""
    from k2_assets.core import catalog as k2_catalog
    from k2_assets.core.live_drain import BackgroundDrain
    from k2_assets.core.live_writer import LiveWriter

    produce(broker.bootstrap, topic, trade_messages(btc_trade_events(btcusdt_dir)[:500]))
    tables = [k2_catalog.ensure_table(catalog, name) for name in ("trades", "rejected", "sequence_gaps")]
    drain = BackgroundDrain(
        lambda: LiveWriter(tables[0], tables[1], broker.bootstrap, topic=topic, gaps=tables[2]),
        cycle_seconds=1,
        lease_seconds=10,  # longer than joining the group takes
        detected_by="test",
    )
    assert drain.harvest().started
    deadline = time.monotonic() + 30
    while drain._thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not drain._thread.is_alive() and drain.writer is None
    late = drain.harvest()  # what it committed before it stopped is still reported, and harvesting starts it again
    assert sum(r.written for r in late.reports) == 500 and late.started and late.error is None
    drain.stop()
    assert catalog.load_table("market.trades").scan().to_arrow().num_rows == 500
