"""Alert rules checked and unit-tested with promtool; what the live path serves passes `promtool check metrics`."""

from __future__ import annotations

import subprocess

from prometheus_client import generate_latest

from k2_assets_tests.conftest import REPO, btc_trade_events
from k2_assets_tests.test_live_writer import drain_all, produce, trade_messages, writer_for

RULES = REPO / "config" / "prometheus" / "rules" / "k2.yml"
TESTS = REPO / "config" / "prometheus" / "tests" / "k2_test.yml"
ALERTS = (
    "K2ConsumerLagHigh",
    "K2NoDataIngested",
    "K2RejectedRateHigh",
    "K2SequenceGaps",
    "K2IcebergCommitFailures",
    "K2FreshnessBreach",
    "K2FeedReconnectStorm",
)


def run(promtool: str, *args, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], input=stdin, capture_output=True, timeout=60)


def test_rules_are_valid_and_every_alert_has_a_runbook(promtool):
    result = run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    text = RULES.read_text()
    for alert in ALERTS:
        assert f"alert: {alert}" in text
    for link in [line.split('"')[1] for line in text.splitlines() if "runbook_url" in line]:
        assert (REPO / link).is_file(), link


def test_every_alert_fires_and_stays_quiet_as_the_unit_tests_say(promtool):
    result = run(promtool, "test", "rules", str(TESTS))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    tests = TESTS.read_text()
    for alert in ALERTS:  # each alert is tested both ways
        assert tests.count(f"alertname: {alert}") >= 2, alert


def test_served_metrics_pass_promtool(promtool, btcusdt_dir, broker, topic, catalog):
    from k2_assets.core.metrics import ProducerMetrics

    produce(broker.bootstrap, topic, trade_messages(btc_trade_events(btcusdt_dir)[:2000]))
    writer = writer_for(catalog, broker, topic)
    drain_all(writer)
    writer.close()
    producer = ProducerMetrics()
    producer.produced.labels("BTCUSDT").inc(5)
    producer.last_trade_id.labels("BTCUSDT").set(3345206428)
    producer.record_statistics(
        {"brokers": {"b1": {"rtt": {"cnt": 3, "p50": 900, "p99": 2100}, "int_latency": {"cnt": 0, "p50": 0, "p99": 0}}}}
    )
    assert (
        producer.registry.get_sample_value("k2_feed_produce_latency_seconds", {"stage": "round_trip", "percentile": "p99"})
        == 0.0021
    )
    for registry in (writer.metrics.registry, producer.registry):
        exposition = generate_latest(registry)
        result = run(promtool, "check", "metrics", stdin=exposition)
        assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
        assert b"k2_" in exposition


def test_every_dashboard_query_is_valid_promql(promtool, tmp_path):
    import json

    import yaml

    dashboard = json.loads((REPO / "config" / "grafana" / "dashboards" / "k2.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert any("k2_rollup_bars_written_total" in e for e in exprs) and any("k2_sequence_gaps_closed_total" in e for e in exprs)
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"k2:dashboard_query_{i}", "expr": e} for i, e in enumerate(exprs)]}
        ]
    }
    path = tmp_path / "dashboard.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
