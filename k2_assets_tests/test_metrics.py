"""Prometheus metrics of the live path, scraped over HTTP from 127.0.0.1 like Prometheus would."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from k2_assets.core.binance_stream import BinanceProducer
from k2_assets.core.feed_server import replay_file, run_in_thread
from k2_assets.core.kafka import ensure_topics, free_port
from k2_assets.core.metrics import serve
from k2_assets_tests.conftest import btc_trade_events
from k2_assets_tests.test_live_end_to_end import BTC_FILE, ProducerThread, wait_until
from k2_assets_tests.test_live_writer import drain_all, produce, trade_messages, writer_for


def scrape(registry) -> dict[tuple[str, tuple], float]:
    port = free_port()
    server = serve(registry, port)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        server.shutdown()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_writer_metrics_count_what_the_batches_did(btcusdt_dir, broker, topic, catalog):
    events = btc_trade_events(btcusdt_dir)[:6000]
    produce(broker.bootstrap, topic, trade_messages(events) + trade_messages(events[:200]) + [(b"BTCUSDT", b"{bad")])
    writer = writer_for(catalog, broker, topic, max_batch_rows=2000)
    reports = drain_all(writer)
    writer.close()
    values = scrape(writer.metrics.registry)
    assert values[("k2_writer_records_consumed_total", ())] == 6201
    assert values[("k2_writer_records_written_total", ())] == 6000
    assert values[("k2_writer_duplicates_skipped_total", ())] == 200
    assert values[("k2_writer_records_rejected_total", ())] == 1
    assert values[("k2_sequence_events_total", (("event", "duplicate"),))] == 200
    assert values[("k2_writer_batch_seconds_count", ())] == len(reports)
    assert values[("k2_writer_iceberg_commit_seconds_count", ())] == sum(1 for r in reports if r.written)
    assert values[("k2_writer_last_commit_timestamp_seconds", ())] > 0
    # Drained to the end: no partition is behind (on Tansu the watermark is approximate; here it is exact at the end).
    assert {k[1]: v for k, v in values.items() if k[0] == "k2_writer_consumer_lag_records"} == {
        (("partition", str(p)),): 0.0 for p in range(3)}


def test_producer_metrics_follow_the_stream(btcusdt_dir, broker, topic):
    ensure_topics(broker.bootstrap, {topic + ".dlq": 1})
    with run_in_thread(replay_file(btcusdt_dir / BTC_FILE), drop_every=6000, malformed_ratio=0.001, seed=5) as server:
        producer = BinanceProducer(["BTCUSDT"], broker.bootstrap, base_url=server.ws_url, topic=topic,
                                   dead_letter_topic=topic + ".dlq", backoff_initial=0.05, backoff_max=0.2)
        with ProducerThread(producer):
            wait_until(lambda: producer.stats.last_trade_id.get("BTCUSDT") == 3345223129, 60, "the last trade")
            wait_until(lambda: producer.stats.received == server.stats["frames"], 10, "every frame")
    values = scrape(producer.metrics.registry)
    assert values[("k2_feed_frames_received_total", ())] == server.stats["frames"]
    assert values[("k2_feed_trades_produced_total", (("symbol", "BTCUSDT"),))] == producer.stats.produced
    assert values[("k2_feed_dead_letters_total", ())] == server.stats["malformed"] > 0
    assert values[("k2_feed_reconnects_total", ())] == producer.stats.reconnects >= server.stats["drops"]
    assert values[("k2_feed_last_trade_id", (("symbol", "BTCUSDT"),))] == 3345223129
    assert values[("k2_feed_last_trade_timestamp_seconds", (("symbol", "BTCUSDT"),))] == 1704112200.0
