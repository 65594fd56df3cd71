"""Compaction and snapshot expiry keep the rows, the exactly-once offsets and time travel inside retention."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pyarrow.compute as pc

from k2_assets.core import maintenance, writer
from k2_assets.core.live_writer import OFFSETS_KEY, recorded_offsets
from k2_assets_tests.conftest import btc_trade_events
from k2_assets_tests.test_live_writer import drain_all, produce, trade_messages, writer_for


def test_compaction_and_expiry_keep_rows_offsets_and_time_travel(btcusdt_dir, broker, topic, catalog):
    events = btc_trade_events(btcusdt_dir)[:8000]
    produce(broker.bootstrap, topic, trade_messages(events))
    live = writer_for(catalog, broker, topic, max_batch_rows=500)  # many small commits, as live traffic makes
    drain_all(live)
    live.close()
    trades = catalog.load_table("market.trades")
    offsets_before = recorded_offsets(trades, OFFSETS_KEY + topic)
    ids_before = sorted(trades.scan().to_arrow().column("message_id").to_pylist())
    old_snapshot = trades.current_snapshot().snapshot_id
    where = writer.partition_filter("BINANCE", datetime(2024, 1, 1).date())

    result = maintenance.compact(trades, where)
    assert result.rows == 8000 and result.files_before >= 16 and result.files_after == 1
    trades = catalog.load_table("market.trades")
    assert sorted(trades.scan().to_arrow().column("message_id").to_pylist()) == ids_before
    assert trades.current_snapshot().summary["k2.maintenance"] == "compact"
    assert recorded_offsets(trades, OFFSETS_KEY + topic) == offsets_before
    # Time travel inside the retention window still works after compaction.
    assert trades.scan(snapshot_id=old_snapshot).to_arrow().num_rows == 8000

    time.sleep(0.05)
    expired = maintenance.expire(trades, retain=timedelta(0), now=datetime.now(timezone.utc))
    trades = catalog.load_table("market.trades")
    assert expired >= 16 and len(trades.metadata.snapshots) <= 2
    assert recorded_offsets(trades, OFFSETS_KEY + topic) == offsets_before
    assert trades.snapshot_by_id(old_snapshot) is None  # outside the retention now
    # A writer started after all this resumes exactly where the table says: nothing re-read, nothing lost.
    produce(broker.bootstrap, topic, trade_messages(btc_trade_events(btcusdt_dir)[8000:9000]))
    resumed = writer_for(catalog, broker, topic)
    assert all(resumed.position[p] == offset for p, offset in offsets_before.items())
    reports = drain_all(resumed)
    resumed.close()
    assert sum(r.consumed for r in reports) == 1000 and sum(r.duplicates for r in reports) == 0
    table = catalog.load_table("market.trades").scan().to_arrow()
    assert table.num_rows == 9000 == pc.count_distinct(table.column("message_id")).as_py()


def test_expiry_keeps_the_time_travel_window(catalog, btcusdt_dir, broker, topic):
    produce(broker.bootstrap, topic, trade_messages(btc_trade_events(btcusdt_dir)[:1000]))
    live = writer_for(catalog, broker, topic, max_batch_rows=200)
    drain_all(live)
    live.close()
    trades = catalog.load_table("market.trades")
    snapshots = len(trades.metadata.snapshots)
    assert maintenance.expire(trades, retain=timedelta(days=7)) == 0
    assert len(catalog.load_table("market.trades").metadata.snapshots) == snapshots


def test_compacting_an_empty_partition_writes_nothing(catalog):
    from k2_assets.core import catalog as k2_catalog

    trades = k2_catalog.ensure_table(catalog, "trades")
    result = maintenance.compact(trades, writer.partition_filter("ASX", datetime(2014, 3, 10).date()))
    assert (result.rows, result.files_before, result.files_after) == (0, 0, 0)
    assert trades.scan().to_arrow().num_rows == 0
