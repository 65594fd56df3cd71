"""The production stack's docker-compose.yml, validated statically (no Docker engine runs here): parsed
here, and resolved by `docker-compose config` (Debian's docker-compose, which needs no daemon)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml

from k2_assets_tests.conftest import REPO

COMPOSE = REPO / "docker-compose.yml"
K2_SERVICES = ("k2-code", "dagster-webserver", "dagster-daemon", "binance-producer")
TEST_ONLY = {"K2_WRITER_CRASH_POINT", "K2_BROKER_PORT", "K2_PRODUCER_METRICS_PORT", "K2_WRITER_METRICS_PORT"}
REQUIRED = ("K2_PG_PASSWORD", "K2_S3_ACCESS_KEY", "K2_S3_SECRET_KEY", "GRAFANA_ADMIN_PASSWORD")  # the file's ${VAR:?...}


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
    assert {
        "kafka",
        "minio",
        "postgres",
        "k2-code",
        "dagster-webserver",
        "dagster-daemon",
        "binance-producer",
        "pushgateway",
        "prometheus",
        "grafana",
    } <= services.keys()
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
    assert targets == {"binance-producer:9464", "binance-um-producer:9465", "k2-code:9465", "pushgateway:9091"}
    for producer in ("binance-producer", "binance-um-producer"):
        assert "--metrics-port" in compose["services"][producer]["command"]
    assert compose["services"]["binance-um-producer"]["command"][3:5] == ["--market", "um"]
    (gateway,) = [job for job in scrape["scrape_configs"] if job["static_configs"][0]["targets"] == ["pushgateway:9091"]]
    assert gateway["honor_labels"] is True  # the runs' job and asset labels, not the scrape job's
    assert compose["x-k2-env"]["K2_PUSHGATEWAY_URL"] == "${K2_PUSHGATEWAY_URL:-http://pushgateway:9091}"


def docker_compose(*args: str, **overrides: str) -> subprocess.CompletedProcess:
    found = shutil.which("docker-compose")
    if not found:
        pytest.fail(
            "docker-compose not found: `bash scripts/get-docker-compose` installs Debian's docker-compose package "
            "(`make test` runs it)"
        )
    env = {k: v for k, v in os.environ.items() if k not in REQUIRED and not k.startswith(("K2_", "COMPOSE_"))}
    env.update({name: f"dummy-{name.lower()}" for name in REQUIRED}, **overrides)
    return subprocess.run(
        [found, "--project-directory", str(REPO), "-f", str(COMPOSE), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_docker_compose_resolves_the_file_with_every_service_health_check_and_dependency(compose):
    assert (quiet := docker_compose("config", "--quiet")).returncode == 0, quiet.stderr
    result = docker_compose("config")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    services = resolved["services"]
    assert services.keys() == compose["services"].keys()
    for name, service in compose["services"].items():
        assert services[name]["healthcheck"]["test"] == service["healthcheck"]["test"], name
        wanted = {dep: spec["condition"] for dep, spec in (service.get("depends_on") or {}).items()}
        assert {dep: spec["condition"] for dep, spec in (services[name].get("depends_on") or {}).items()} == wanted, name
    # The anchors and interpolation resolved: secrets from the environment, defaults where unset.
    code = services["k2-code"]["environment"]
    assert code["K2_CATALOG_URI"] == "postgresql+psycopg2://k2:dummy-k2_pg_password@postgres:5432/k2"
    assert (
        code["K2_PUSHGATEWAY_URL"] == "http://pushgateway:9091" == services["dagster-daemon"]["environment"]["K2_PUSHGATEWAY_URL"]
    )
    assert services["binance-producer"]["command"][-1] == "9464"
    ports = [
        str(port).removesuffix("/tcp") for service in services.values() for port in service.get("ports", [])
    ]  # 1.29: short syntax
    assert all(port.startswith("127.0.0.1:") for port in ports) and {"127.0.0.1:9090:9090", "127.0.0.1:9091:9091"} <= set(ports)


def test_docker_compose_refuses_to_start_without_the_secrets():
    result = docker_compose("config", "--quiet", K2_PG_PASSWORD="")
    assert result.returncode != 0 and "set K2_PG_PASSWORD" in result.stderr
