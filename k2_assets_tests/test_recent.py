"""Recent trades across Kafka and Iceberg, deduplicated, on the real broker and catalog."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime

import orjson
import pyarrow.compute as pc
import pytest
from pyiceberg.expressions import In

from k2_assets.core import catalog as k2_catalog
from k2_assets.core.recent import RecentTrades, recent_trades
from k2_assets_tests.conftest import btc_trade_events
from k2_assets_tests.test_live_writer import produce, trade_messages, writer_for

END = datetime(2024, 1, 1, 12, 30, tzinfo=UTC)


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


def test_a_long_lived_reader_answers_as_the_one_shot_query_does_while_the_table_moves(btcusdt_dir, broker, topic, catalog):
    events = btc_trade_events(btcusdt_dir)
    produce(broker.bootstrap, topic, trade_messages(events[:12000]))
    writer = writer_for(catalog, broker, topic)
    writer.drain(10)
    trades = k2_catalog.ensure_table(catalog, "trades")
    expected = [e["t"] for e in events if e["T"] >= (END.timestamp() - 600) * 1000]

    def both():
        kept = recent.query("BTCUSDT", 10, now=END)
        fresh = recent_trades(trades, broker.bootstrap, "BTCUSDT", 10, topic=topic, now=END)
        assert kept.column("message_id").to_pylist() == fresh.column("message_id").to_pylist()
        assert pc.count_distinct(kept.column("message_id")).as_py() == kept.num_rows
        return kept.column("source_sequence").to_pylist()

    with RecentTrades(trades, broker.bootstrap, topic=topic) as recent:
        assert both() == [t for t in expected if t <= events[11999]["t"]]
        base = recent.base_id

        # Kafka only, 500 of them repeats of committed trades: the tail answers for them.
        produce(broker.bootstrap, topic, trade_messages(events[11500:]))
        assert sorted(both()) == sorted(expected)

        # The writer commits them: the same answer, from the same base snapshot (no new scan).
        writer.drain(10)
        trades.refresh()
        assert trades.scan().to_arrow().num_rows == len(events)
        assert sorted(both()) == sorted(expected)
        assert recent.base_id == base

        # Any other commit (here trades removed from the table) moves the base, and the answer follows it.
        removed = expected[-100:]
        trades.delete(In("source_sequence", removed))
        assert sorted(both()) == sorted(expected[:-100])
        assert recent.base_id != base
    writer.close()


def test_k2_recent_prints_the_merged_trades(btcusdt_dir, broker, topic, catalog, k2_home):
    """The command line: table part and Kafka tail, as JSON lines."""
    events = btc_trade_events(btcusdt_dir)[-3000:]
    produce(broker.bootstrap, topic, trade_messages(events[:2000]))
    writer = writer_for(catalog, broker, topic)
    writer.drain(10)
    writer.close()
    produce(broker.bootstrap, topic, trade_messages(events[1000:]))
    minutes = f"{(END.timestamp() * 1000 - events[500]['T']) / 60_000:.4f}"
    expected = [e["t"] for e in events if END.timestamp() * 1000 - float(minutes) * 60_000 <= e["T"]]
    env = {**os.environ, "K2_HOME": str(k2_home), "K2_KAFKA_BOOTSTRAP": broker.bootstrap}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "k2_assets.cli",
            "recent",
            "--symbol",
            "btcusdt",
            "--minutes",
            minutes,
            "--until",
            "2024-01-01T12:30:00",
            "--topic",
            topic,
            "--format",
            "json",
        ],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    lines = orjson.loads(done.stdout)  # one JSON array, as every `k2` command's --format json prints
    assert 2400 < len(expected) < 2600
    assert [row["source_sequence"] for row in lines] == expected
