"""The production stack's docker-compose.yml, validated statically (no Docker engine runs here)."""

from __future__ import annotations

import re
import pytest
import yaml

from k2_assets_tests.conftest import REPO

COMPOSE = REPO / "docker-compose.yml"
K2_SERVICES = ("k2-code", "dagster-webserver", "dagster-daemon", "binance-producer")
TEST_ONLY = {"K2_WRITER_CRASH_POINT", "K2_BROKER_PORT", "K2_PRODUCER_METRICS_PORT", "K2_WRITER_METRICS_PORT"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def variables_k2_reads() -> set[str]:
    found = set()
    for path in (REPO / "k2_assets").rglob("*.py"):
        found |= set(re.findall(r"[\"'](K2_[A-Z0-9_]+|AWS_[A-Z_]+|DAGSTER_PG_[A-Z_]+)[\"']", path.read_text()))
    found |= set(re.findall(r"env: (DAGSTER_PG_[A-Z_]+)", (REPO / "docker" / "dagster.yaml").read_text()))
    return found


def test_every_service_of_the_stack_is_there_with_a_health_check(compose):
    services = compose["services"]
    assert {"kafka", "minio", "postgres", "k2-code", "dagster-webserver", "dagster-daemon", "binance-producer", "prometheus",
            "grafana"} <= services.keys()
    for name, service in services.items():
        assert "healthcheck" in service and service["healthcheck"]["test"], name
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper


def test_every_setting_k2_reads_is_wired_to_the_services_that_need_it(compose):
    wanted = variables_k2_reads() - TEST_ONLY
    assert {"K2_CATALOG_URI", "K2_WAREHOUSE", "K2_KAFKA_BOOTSTRAP", "DAGSTER_PG_PASSWORD"} <= wanted
    for name in K2_SERVICES:
        env = compose["services"][name]["environment"]
        missing = wanted - set(env)
        assert not missing, f"{name} lacks {sorted(missing)}"
    assert compose["services"]["k2-code"]["environment"]["K2_WRITER_METRICS_PORT"] == "9465"
    assert "postgresql+psycopg2://" in compose["services"]["k2-code"]["environment"]["K2_CATALOG_URI"]
    assert compose["services"]["k2-code"]["environment"]["K2_WAREHOUSE"].startswith("s3://")


def test_secrets_come_from_the_environment_and_ports_bind_to_loopback(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
        for key, value in (service.get("environment") or {}).items():
            if any(word in key for word in ("PASSWORD", "SECRET", "API_KEY")):
                assert str(value).startswith("${"), (name, key)


def test_files_the_stack_mounts_exist_and_prometheus_scrapes_the_exporters(compose):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./config"):
                assert (REPO / source).exists(), (name, source)
    assert (REPO / "Dockerfile").is_file() and (REPO / "docker" / "workspace.yaml").is_file()
    scrape = yaml.safe_load((REPO / "config" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert targets == {"binance-producer:9464", "k2-code:9465"}
    assert "--metrics-port" in compose["services"]["binance-producer"]["command"]
