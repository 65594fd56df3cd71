"""Fixtures: the real sample data beside the checkout, a fresh real Iceberg catalog per test, and the Prometheus
tools (promtool, a real Pushgateway)."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest

from k2_assets.core import catalog as k2_catalog

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    path = Path(os.environ.get("K2_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not (path / "MANIFEST.md").is_file():
        pytest.fail(f"real sample data not found at {path}: CI checks out ../shared beside the repo (or set K2_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_data_dir()


@pytest.fixture(scope="session")
def asx_dir(shared_data) -> Path:
    return shared_data / "asx_k2"


@pytest.fixture(scope="session")
def btcusdt_dir(shared_data) -> Path:
    return shared_data / "binance_spot_btcusdt_trades_2024-01-01_1200-1230"


@pytest.fixture
def k2_home(tmp_path, monkeypatch) -> Path:
    """A private K2_HOME with its own SQLite catalog and file warehouse."""
    home = tmp_path / "k2"
    for name in ("K2_CATALOG_URI", "K2_WAREHOUSE", "K2_ASX_DATA_DIR", "K2_BINANCE_HISTORY_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("K2_HOME", str(home))
    return home


@pytest.fixture
def catalog_props(k2_home) -> dict[str, str]:
    return {"catalog_uri": f"sqlite:///{k2_home}/catalog.db", "warehouse": f"file://{k2_home}/warehouse"}


@pytest.fixture
def catalog(catalog_props):
    return k2_catalog.open_catalog(catalog_props["catalog_uri"], catalog_props["warehouse"])


def make_resources(catalog_props: dict, asx_dir: Path | None = None, binance_dir: Path | None = None) -> dict:
    """The code location's resources, pointed at a test catalog and test source directories."""
    from dagster_duckdb import DuckDBResource

    from k2_assets.core.rollups import DUCKDB_CONFIG
    from k2_assets.defs.asx.resources import AsxFilesResource
    from k2_assets.defs.binance.resources import BinanceHistoryResource, BinanceRestResource
    from k2_assets.defs.resources import IcebergResource

    return {
        "iceberg": IcebergResource(**catalog_props),
        "duckdb": DuckDBResource(database=":memory:", connection_config=DUCKDB_CONFIG),
        "asx_files": AsxFilesResource(data_dir=str(asx_dir or "/nonexistent")),
        "binance_history": BinanceHistoryResource(history_dir=str(binance_dir or "/nonexistent")),
        "binance_rest": BinanceRestResource(base_url="http://127.0.0.1:9"),  # tests that repair pass their own exchange
    }


def split_by_day(source: Path, out: Path, time_column: int = 5, name: str = "XRPETH-aggTrades") -> list[str]:
    """A multi-day CSV with a header (freqtrade's XRP/ETH files) as one `NAME-YYYY-MM-DD.csv` per UTC day, values unchanged."""
    with open(source, newline="") as f:
        header, *rows = list(csv.reader(f))
    by_day: dict[str, list] = {}
    for r in rows:
        by_day.setdefault(datetime.fromtimestamp(int(r[time_column]) / 1000, tz=UTC).date().isoformat(), []).append(r)
    out.mkdir(parents=True, exist_ok=True)
    for day, day_rows in by_day.items():
        (out / f"{name}-{day}.csv").write_text(",".join(header) + "\n" + "".join(",".join(r) + "\n" for r in day_rows))
    return sorted(by_day)


def vendor_rows(path: Path) -> list[list[str]]:
    """A vendor CSV read independently of K2's decoder (for expected counts)."""
    return [line.split(",") for line in path.read_bytes().decode().split("\r\n") if line]


@pytest.fixture(scope="session")
def broker():
    """The embedded Kafka-compatible broker (Tansu), one per test process."""
    from k2_assets.dev.broker import EmbeddedBroker

    with EmbeddedBroker() as running:
        yield running


@pytest.fixture
def topic(broker, request) -> str:
    """A fresh topic per test (the broker outlives tests), with 3 partitions."""
    import re
    import uuid

    from k2_assets.core.kafka import ensure_topics

    name = "t." + re.sub(r"[^a-zA-Z0-9]", "_", request.node.name)[:60] + "." + uuid.uuid4().hex[:6]
    ensure_topics(broker.bootstrap, {name: 3})
    return name


def btc_trade_events(btcusdt_dir: Path) -> list[dict]:
    """The real BTCUSDT trades as Binance trade-stream events."""
    import csv

    with open(btcusdt_dir / "BTCUSDT-trades-2024-01-01_1200-1230.derived.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    return [
        {
            "e": "trade",
            "E": int(r[4]) + 1,
            "s": "BTCUSDT",
            "t": int(r[0]),
            "p": r[1],
            "q": r[2],
            "T": int(r[4]),
            "m": r[5] == "True",
            "M": True,
        }
        for r in rows
    ]


def offsets_key(broker, topic: str) -> str:
    """The snapshot-property key the live writer records `topic`'s offsets under (its incarnation's);
    `broker` is the fixture or a bootstrap address."""
    from k2_assets.core import offsets
    from k2_assets.core.kafka import topic_incarnation

    bootstrap = broker if isinstance(broker, str) else broker.bootstrap
    return offsets.key(offsets.OFFSETS_KEY, topic, topic_incarnation(bootstrap, topic))


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server (Debian's), one per test process; each test makes its own database."""
    from k2_assets_tests.postgres import start_postgres, stop_postgres

    server = start_postgres()
    yield server
    stop_postgres(server)


@pytest.fixture(params=["sqlite", "postgres"])
def any_catalog_props(request, k2_home) -> dict[str, str]:
    """The embedded SQLite catalog and the production PostgreSQL one, each with a file warehouse."""
    uri = (
        f"sqlite:///{k2_home}/catalog.db" if request.param == "sqlite" else request.getfixturevalue("postgres").create_database()
    )
    return {"catalog_uri": uri, "warehouse": f"file://{k2_home}/warehouse"}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = REPO / ".tools" / "promtool"
    found = str(path) if path.exists() else shutil.which("promtool")
    if not found:
        pytest.fail("promtool not found: `bash scripts/get-promtool` unpacks it from Debian's prometheus package into .tools/")
    return found


@pytest.fixture
def pushgateway() -> str:
    """A real Pushgateway on a free port; its URL."""
    from k2_assets.dev.broker import free_port

    path = REPO / ".tools" / "pushgateway"
    found = str(path) if path.exists() else shutil.which("pushgateway") or shutil.which("prometheus-pushgateway")
    if not found:
        pytest.fail(
            "pushgateway not found: `bash scripts/get-pushgateway` unpacks it from Debian's prometheus-pushgateway package "
            "into .tools/"
        )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [found, f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=2).read()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    why = process.stderr.read().decode() if process.poll() is not None else "timeout"
                    pytest.fail(f"pushgateway did not start: {why}")
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(10)
