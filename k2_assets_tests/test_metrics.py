"""Prometheus metrics: the live path scraped over HTTP from 127.0.0.1 like Prometheus would, short runs through a real
Pushgateway."""

from __future__ import annotations

import logging
import re
import subprocess
import urllib.request

import dagster as dg
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pyiceberg.expressions import EqualTo

from k2_assets.core.binance_stream import BinanceProducer
from k2_assets.core.kafka import ensure_topics
from k2_assets.core.metrics import GapMetrics, LoadMetrics, RepairMetrics, RollupMetrics, WriterMetrics, push, serve
from k2_assets.dev.broker import free_port
from k2_assets.dev.feed_server import replay_file, run_in_thread
from k2_assets_tests.conftest import btc_trade_events, make_resources
from k2_assets_tests.test_live_end_to_end import BTC_FILE, ProducerThread, wait_until
from k2_assets_tests.test_live_writer import drain_all, produce, trade_messages, writer_for


def scrape(registry) -> dict[tuple[str, tuple], float]:
    port = free_port()
    server = serve(registry, port)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        server.shutdown()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_writer_shows_its_exchange_at_zero_before_it_records_anything():
    """Alerts read a missing series as nothing: each exchange's families exist at 0 from the writer's start."""
    metrics = WriterMetrics()
    metrics.for_exchange("BINANCE_UM")
    values = scrape(metrics.registry)
    um = (("exchange", "BINANCE_UM"),)
    for name in (
        "k2_writer_iceberg_commit_failures_total",
        "k2_writer_records_written_total",
        "k2_writer_last_commit_timestamp_seconds",
    ):
        assert values[(name, um)] == 0
    assert not [k for k in values if k[0].startswith("k2_writer_") and ("exchange", "BINANCE") in k[1]]  # no other exchange


def test_writer_metrics_count_what_the_batches_did(btcusdt_dir, broker, topic, catalog):
    events = btc_trade_events(btcusdt_dir)[:6000]
    produce(broker.bootstrap, topic, trade_messages(events) + trade_messages(events[:200]) + [(b"BTCUSDT", b"{bad")])
    writer = writer_for(catalog, broker, topic, max_batch_rows=2000)
    reports = drain_all(writer)
    writer.close()
    values = scrape(writer.metrics.registry)
    spot = (("exchange", "BINANCE"),)
    assert values[("k2_writer_records_consumed_total", spot)] == 6201
    assert values[("k2_writer_records_written_total", spot)] == 6000
    assert values[("k2_writer_duplicates_skipped_total", spot)] == 200
    assert values[("k2_writer_records_rejected_total", spot)] == 1
    assert values[("k2_sequence_events_total", (("event", "duplicate"), *spot))] == 200
    assert values[("k2_writer_batch_seconds_count", spot)] == len(reports)
    commits = sum(1 for r in reports if r.snapshot_id is not None) + sum(1 for r in reports if r.rejected or r.dead_lettered)
    assert values[("k2_writer_iceberg_commit_seconds_count", spot)] == commits
    assert values[("k2_writer_last_commit_timestamp_seconds", spot)] > 0
    # Drained to the end: no partition is behind (on Tansu the watermark is approximate; here it is exact at the end).
    assert {k[1]: v for k, v in values.items() if k[0] == "k2_writer_consumer_lag_records"} == {
        (("exchange", "BINANCE"), ("partition", str(p))): 0.0 for p in range(3)
    }


def test_producer_metrics_follow_the_stream(btcusdt_dir, broker, topic):
    ensure_topics(broker.bootstrap, {topic + ".dlq": 1})
    with run_in_thread(replay_file(btcusdt_dir / BTC_FILE), rate=8000, drop_every=6000, malformed_ratio=0.001, seed=5) as server:
        producer = BinanceProducer(
            ["BTCUSDT"],
            broker.bootstrap,
            base_url=server.ws_url,
            topic=topic,
            dead_letter_topic=topic + ".dlq",
            backoff_initial=0.05,
            backoff_max=0.2,
            statistics_interval_ms=200,
        )
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
    # Produce latency from librdkafka's statistics: the broker's answer time, and the wait in the client before it.
    latency = {
        dict(k[1])["stage"] + "@" + dict(k[1])["percentile"]: v
        for k, v in values.items()
        if k[0] == "k2_feed_produce_latency_seconds"
    }
    assert 0 < latency["round_trip@p50"] <= latency["round_trip@p99"] < 10
    assert 0 <= latency["queue@p50"] <= latency["queue@p99"] < 10


# --- Gaps opened and closed, on the code server's endpoint (the sensor reconciles market.sequence_gaps) ---


def sensor_values() -> dict[tuple[str, tuple], float]:
    import importlib

    return scrape(importlib.import_module("k2_assets.defs.binance.sensors")._metrics.registry)


def test_the_sensor_counts_gaps_opened_and_closed_by_late_arrival(btcusdt_dir, broker, topic, catalog_props, catalog):
    from k2_assets.defs.binance.sensors import reset_writers
    from k2_assets_tests.test_binance_sensor import spot_ticks, written

    events = btc_trade_events(btcusdt_dir)[:3000]
    late = events[1000:1010]  # ten trade ids held back: one gap
    instance = dg.DagsterInstance.ephemeral()
    before = sensor_values()  # the sensor's registry lives as long as the process: compare with what it held
    try:
        produce(broker.bootstrap, topic, trade_messages(events[:1000] + events[1010:]))

        def reconciled(rs):
            return any(r.run_requests for r in rs)  # the cycle that wrote them reconciled their gaps

        cursor = spot_ticks(catalog_props, broker, topic, instance, lambda rs: written(rs) == 2990 and reconciled(rs))[-1].cursor
        opened = sensor_values()
        produce(broker.bootstrap, topic, trade_messages(late + events[:100]))  # the late ten, then 100 repeats
        spot_ticks(catalog_props, broker, topic, instance, lambda rs: written(rs) == 10 and reconciled(rs), cursor)
        closed = sensor_values()
    finally:
        reset_writers()

    def delta(after, name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert delta(opened, "k2_sequence_gaps_opened_total", exchange="BINANCE") == 1
    assert delta(opened, "k2_sequence_gap_ids_opened_total", exchange="BINANCE") == 10  # the size is a value, not a label
    assert delta(opened, "k2_sequence_gaps_closed_total", exchange="BINANCE", outcome="late_arrival") == 0
    assert delta(opened, "k2_sequence_events_total", event="gap", exchange="BINANCE") == 1
    assert delta(closed, "k2_sequence_gaps_opened_total", exchange="BINANCE") == 1
    assert delta(closed, "k2_sequence_gaps_closed_total", exchange="BINANCE", outcome="late_arrival") == 1
    assert delta(closed, "k2_sequence_gaps_closed_total", exchange="BINANCE", outcome="repair") == 0
    assert delta(closed, "k2_sequence_events_total", event="out_of_order", exchange="BINANCE") == 10
    assert delta(closed, "k2_sequence_events_total", event="duplicate", exchange="BINANCE") == 100
    (gap,) = catalog.load_table("market.sequence_gaps").scan().to_arrow().to_pylist()
    assert (gap["missing_count"], gap["closed_how"]) == (10, "late_arrival")


def test_every_new_family_passes_promtool_as_served(promtool):
    registry = CollectorRegistry()
    GapMetrics(registry).record("ASX", 2, 7, {"late_arrival": 1, "repair": 1, "unheard_of": 1})
    RollupMetrics(registry).record("5m", 288, 12, 0.4)
    LoadMetrics(registry).read.labels("trades").inc(10)
    RepairMetrics(registry).written.inc(3)
    values = scrape(registry)
    assert values[("k2_sequence_gaps_closed_total", (("exchange", "ASX"), ("outcome", "other")))] == 1  # outcomes stay bounded
    assert (
        values[("k2_sequence_gaps_closed_total", (("exchange", "BINANCE"), ("outcome", "repair")))] == 0
    )  # known ones start at 0
    assert values[("k2_rollup_bars_written_total", (("interval", "5m"),))] == 288
    result = subprocess.run([promtool, "check", "metrics"], input=generate_latest(registry), capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


# --- Short runs push to a real Pushgateway (Debian's prometheus-pushgateway, unpacked by scripts/get-pushgateway;
# the pushgateway fixture is in conftest.py) ---


def gateway_text(url: str) -> str:
    return urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()


def pushed(text: str, name: str, **labels) -> float:
    """The one sample of `name` whose labels include `labels`."""
    (value,) = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    ]
    return value


def k2_families(text: str) -> bytes:
    """What K2 pushed, without the gateway's own metrics and its push_time_seconds bookkeeping."""
    return "".join(line + "\n" for line in text.splitlines() if re.match(r"(# (HELP|TYPE) )?k2_", line)).encode()


def test_rollup_and_load_runs_push_what_they_wrote_to_the_pushgateway(
    pushgateway, promtool, asx_dir, catalog_props, catalog, monkeypatch
):
    from k2_assets.defs.asx.assets import asx_trades
    from k2_assets_tests.test_rollups import ROLLUPS

    monkeypatch.setenv("K2_PUSHGATEWAY_URL", pushgateway)
    resources = make_resources(catalog_props, asx_dir=asx_dir)
    assert dg.materialize([asx_trades], partition_key="2014-03-10", resources=resources).success
    assert dg.materialize(ROLLUPS, partition_key="2014-03-10", resources=resources).success
    text = gateway_text(pushgateway)

    for interval in ("1m", "5m", "1h", "1d"):
        group = {"job": "k2_rollups", "asset": f"ohlcv_{interval}", "interval": interval}
        rows = (
            catalog.load_table(f"market.ohlcv_{interval}")
            .scan(row_filter=EqualTo("trade_date", "2014-03-10"))
            .to_arrow()
            .num_rows
        )
        assert rows > 0
        assert pushed(text, "k2_rollup_bars_written_total", **group) == rows, interval
        assert pushed(text, "k2_rollup_filled_bars_written_total", **group) == 0  # ASX: no bar for a minute without trades
        assert pushed(text, "k2_rollup_seconds_count", **group) == 1
        assert pushed(text, "k2_rollup_seconds_sum", **group) > 0
        assert pushed(text, "push_time_seconds", job="k2_rollups", asset=f"ohlcv_{interval}") > 0

    trades = catalog.load_table("market.trades").scan().to_arrow().num_rows
    load = {"job": "k2_loads", "asset": "asx_trades", "table": "trades"}
    assert pushed(text, "k2_load_rows_written_total", **load) == trades
    assert pushed(text, "k2_load_seconds_count", **load) == 1
    gaps = catalog.load_table("market.sequence_gaps").scan().to_arrow()
    assert pushed(text, "k2_sequence_gaps_opened_total", job="k2_loads", asset="asx_trades", exchange="ASX") == gaps.num_rows
    assert pushed(text, "k2_sequence_gap_ids_opened_total", job="k2_loads", asset="asx_trades", exchange="ASX") == (
        sum(gaps.column("missing_count").to_pylist())
    )

    families = k2_families(text)
    assert b"k2_rollup_bars_written_total" in families
    result = subprocess.run([promtool, "check", "metrics"], input=families, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_a_repair_run_pushes_the_gaps_it_closed(pushgateway, btcusdt_dir, tmp_path, catalog_props, monkeypatch):
    from k2_assets.defs.binance.assets import binance_trades, binance_trades_history
    from k2_assets.defs.binance.resources import BinanceRestResource
    from k2_assets.dev.feed_server import replay_file, run_in_thread
    from k2_assets_tests.test_gap_repair import BTC_FILE as HISTORY_FILE
    from k2_assets_tests.test_gap_repair import FIRST, write_without

    monkeypatch.setenv("K2_PUSHGATEWAY_URL", pushgateway)
    removed = {FIRST + 100, *range(FIRST + 5000, FIRST + 5050)}  # two gaps, 51 ids
    write_without(btcusdt_dir, tmp_path / "history" / "BTCUSDT-trades-2024-01-01.csv", removed)
    resources = make_resources(catalog_props, binance_dir=tmp_path / "history")
    assert dg.materialize([binance_trades_history], partition_key="2024-01-01", resources=resources).success
    with run_in_thread(replay_file(btcusdt_dir / HISTORY_FILE)) as exchange:
        assert dg.materialize(
            [binance_trades],
            partition_key="2024-01-01",
            resources={**resources, "binance_rest": BinanceRestResource(base_url=exchange.http_url)},
        ).success
    text = gateway_text(pushgateway)
    history = {"job": "k2_loads", "asset": "binance_trades_history", "exchange": "BINANCE"}
    assert pushed(text, "k2_sequence_gaps_opened_total", **history) == 2
    assert pushed(text, "k2_sequence_gap_ids_opened_total", **history) == 51
    repair = {"job": "k2_gap_repair", "asset": "binance_trades"}
    assert pushed(text, "k2_sequence_gaps_closed_total", **repair, exchange="BINANCE", outcome="repair") == 2
    assert pushed(text, "k2_sequence_gaps_closed_total", **repair, exchange="BINANCE", outcome="late_arrival") == 0
    assert pushed(text, "k2_sequence_gaps_opened_total", **repair, exchange="BINANCE") == 0
    assert pushed(text, "k2_repair_ids_requested_total", **repair) == 51
    assert pushed(text, "k2_repair_trades_written_total", **repair) == 51
    assert pushed(text, "k2_repair_ranges_unavailable_total", **repair) == 0


def test_pushing_is_off_without_a_gateway_and_a_gateway_that_is_down_never_fails_a_run(asx_dir, catalog_props, monkeypatch):
    from k2_assets.defs.asx.assets import asx_trades
    from k2_assets.defs.rollups.assets import ohlcv_1m

    monkeypatch.delenv("K2_PUSHGATEWAY_URL", raising=False)
    assert push(CollectorRegistry(), "k2_rollups", {"asset": "ohlcv_1m"}) is False  # unset: nothing is attempted

    monkeypatch.setenv("K2_PUSHGATEWAY_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    resources = make_resources(catalog_props, asx_dir=asx_dir)
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([asx_trades], partition_key="2014-03-10", resources=resources, instance=instance).success
    result = dg.materialize([ohlcv_1m], partition_key="2014-03-10", resources=resources, instance=instance)
    assert result.success
    warnings = [e.user_message for e in instance.all_logs(result.run_id) if e.level == logging.WARNING]
    assert any("not pushed to http://127.0.0.1:" in m and "k2_rollups" in m for m in warnings), warnings


def test_an_op_that_is_no_asset_pushes_under_its_op_name(pushgateway, monkeypatch):
    from k2_assets.core.metrics import MaintenanceMetrics
    from k2_assets.defs.run_metrics import MAINTENANCE, publish

    @dg.op
    def expire_something(context) -> None:
        metrics = MaintenanceMetrics()
        metrics.expired.labels("trades").inc(4)
        metrics.seconds.labels("expire_something").observe(0.2)
        assert publish(context, MAINTENANCE, metrics.registry)

    @dg.job
    def maintenance_like():
        expire_something()

    monkeypatch.setenv("K2_PUSHGATEWAY_URL", pushgateway)
    assert maintenance_like.execute_in_process().success
    text = gateway_text(pushgateway)
    assert (
        pushed(text, "k2_maintenance_snapshots_expired_total", job="k2_maintenance", op="expire_something", table="trades") == 4
    )
    assert pushed(text, "k2_maintenance_seconds_count", job="k2_maintenance", op="expire_something") == 1
