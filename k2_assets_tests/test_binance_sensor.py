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


def tick(instance, catalog_props, broker, topic, cursor=None):
    resources = {"iceberg": IcebergResource(**catalog_props), "kafka": KafkaResource(bootstrap=broker.bootstrap, topic=topic)}
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
        gap_checks = [e for e in result.asset_events if isinstance(e, dg.AssetCheckEvaluation)]
        assert [(c.check_name, c.partition, c.passed) for c in gap_checks] == [("no_unexplained_gaps", "2024-01-01", True)]
        assert events_out and all(e.asset_key == dg.AssetKey("binance_trades") and e.partition == "2024-01-01" for e in events_out)
        assert sum(e.metadata["rows_written"].value for e in events_out) == 10000
        assert sum(e.metadata["rows_rejected"].value for e in events_out) == 1
        first = events_out[0].metadata
        assert {"offset_ranges", "snapshot_id", "latency_p95_seconds", "dead_lettered"} <= set(first)
        assert json.loads(result.cursor) == {"0": 10001, "1": 0, "2": 0}

        # Nothing new: the tick says so.
        assert isinstance(tick(instance, catalog_props, broker, topic, result.cursor), dg.SkipReason)

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
