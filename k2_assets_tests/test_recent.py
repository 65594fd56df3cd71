"""Recent trades across Kafka and Iceberg, deduplicated, on the real broker and catalog."""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow.compute as pc
import pytest

from k2_assets.core import catalog as k2_catalog
from k2_assets.core.recent import recent_trades
from k2_assets_tests.conftest import btc_trade_events
from k2_assets_tests.test_live_writer import produce, trade_messages, writer_for

END = datetime(2024, 1, 1, 12, 30, tzinfo=timezone.utc)


def test_recent_trades_merge_table_and_kafka_tail(btcusdt_dir, broker, topic, catalog):
    events = btc_trade_events(btcusdt_dir)
    produce(broker.bootstrap, topic, trade_messages(events[:12000]))
    writer = writer_for(catalog, broker, topic)
    writer.drain(10)
    writer.close()
    # The last trades are in Kafka only; 500 of them repeat trades already in the table.
    produce(broker.bootstrap, topic, trade_messages(events[11500:]))
    trades = k2_catalog.ensure_table(catalog, "trades")
    assert trades.scan().to_arrow().num_rows == 12000

    result = recent_trades(trades, broker.bootstrap, "btcusdt", 10, topic=topic, now=END)
    expected = [e["t"] for e in events if e["T"] >= (END.timestamp() - 600) * 1000]
    assert sorted(result.column("source_sequence").to_pylist()) == sorted(expected)
    assert pc.count_distinct(result.column("message_id")).as_py() == result.num_rows
    assert result.column("exchange_timestamp").to_pylist() == sorted(result.column("exchange_timestamp").to_pylist())
    assert result.column("kafka_offset").null_count == 0

    assert recent_trades(trades, broker.bootstrap, "ETHUSDT", 10, topic=topic, now=END).num_rows == 0
    with pytest.raises(ValueError, match="minutes"):
        recent_trades(trades, broker.bootstrap, "BTCUSDT", 0, topic=topic)
    with pytest.raises(ValueError, match="symbol"):
        recent_trades(trades, broker.bootstrap, "BTC'; DROP", 5, topic=topic)
