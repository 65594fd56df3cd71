"""The live path inside the running daemon, as `k2 demo` runs it, asserted over Dagster's GraphQL API.

`k2 demo` starts the embedded broker, the local feed, the producer and `dagster dev` (webserver, daemon,
code server). After at least six ticks of binance_trades_sensor, with the producer then paused so that
the table stops moving:
- no tick failed, also while the Iceberg catalog is locked for longer than a tick (the SQLite case): that
  tick ends with the outage as its reason, and the next materialization carries it;
- the `rows_written` of the partition's materializations add up to its rows in Iceberg;
- every tick that wrote asked for a run of the gap check, and each of those runs recorded an evaluation;
- the sensor's page in Chromium shows the recent ticks as succeeded (or skipped), none failed;
- Ctrl-C stops every process the demo started within 10 s, saying what it stops.

The second case runs Dagster's storage (runs, event log, schedules) on a real PostgreSQL through the
production `docker/dagster.yaml`, with the Iceberg catalog in the same server, as the compose stack does.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import psutil
import pytest

from k2_assets.dev.broker import free_port
from k2_assets_tests.dagster_ui import chromium_page, graphql, log_tail, wait_for_server

REPO = Path(__file__).resolve().parents[1]
K2 = REPO / ".venv" / "bin" / "k2"
SENSOR = "binance_trades_sensor"
CHECK = "no_unexplained_gaps"
MIN_TICKS = 6
DRAIN_SECONDS = 5  # per tick (K2_SENSOR_DRAIN_SECONDS): six ticks in about a minute
STARTUP_TIMEOUT = 120
TICKS_TIMEOUT = 240
STOP_LIMIT = 10.0

SELECTOR = {"repositoryLocationName": "k2", "repositoryName": "__repository__", "sensorName": SENSOR}
TICKS = """
query($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) {
    __typename
    ... on Sensor { sensorState { ticks(limit: 200) { id status timestamp runIds skipReason error { message } } } }
    ... on PythonError { message }
  }
}
"""
MATERIALIZATIONS = """
{ assetNodes(assetKeys: [{path: ["binance_trades"]}]) {
    assetMaterializations { partition runId
      metadataEntries { label ... on IntMetadataEntry { intValue } ... on TextMetadataEntry { text } } } } }
"""
ALL_SENSOR_TICKS = """
{ sensorsOrError(repositorySelector: {repositoryLocationName: "k2", repositoryName: "__repository__"}) {
    ... on Sensors { results { name sensorState { ticks(limit: 200) { status error { message } } } } } } }
"""
OUTAGE_SECONDS = 3 * DRAIN_SECONDS + 2  # longer than a tick waits for the store
RUNS = """
query($ids: [String!]) {
  runsOrError(filter: {runIds: $ids}) { ... on Runs { results { runId status jobName tags { key value } } } }
}
"""
CHECK_EXECUTIONS = """
query($partition: String) {
  assetCheckExecutions(
    assetKey: {path: ["binance_trades"]}, checkName: "no_unexplained_gaps", limit: 500, partition: $partition
  ) {
    runId status evaluation { success partition }
  }
}
"""


def ticks(port: int) -> list[dict]:
    result = graphql(port, TICKS, {"selector": SELECTOR})["sensorOrError"]
    if result["__typename"] != "Sensor":
        return []  # the code location is still loading
    return result["sensorState"]["ticks"]


def wait_for(what: str, read, done, log: Path, timeout: float):
    deadline = time.monotonic() + timeout
    seen = read()
    while not done(seen):
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout:g} s; last seen: {seen}\n{log_tail(log)}")
        time.sleep(1)
        seen = read()
    return seen


def producer_of(demo: subprocess.Popen) -> psutil.Process:
    for child in psutil.Process(demo.pid).children():
        if "stream" in child.cmdline():
            return child
    raise AssertionError("k2 demo runs no producer")


def iceberg_rows_by_day(env: dict) -> dict[str, int]:
    from pyiceberg.expressions import And, EqualTo, NotNull

    from k2_assets.core import catalog as k2_catalog

    cat = k2_catalog.open_catalog(env["K2_CATALOG_URI"], env["K2_WAREHOUSE"])
    rows = (
        cat.load_table("market.trades")
        .scan(row_filter=And(EqualTo("exchange", "BINANCE"), NotNull("kafka_topic")), selected_fields=("trade_date",))
        .to_arrow()
    )
    counts = defaultdict(int)
    for day in rows.column("trade_date").to_pylist():
        counts[day.isoformat()] += 1
    return dict(counts)


def storage_env(storage: str, tmp_path: Path, request) -> dict:
    """Where Dagster and the Iceberg catalog keep their state: the embedded SQLite defaults, or PostgreSQL."""
    home = tmp_path / "k2"
    env = {"K2_HOME": str(home), "K2_CATALOG_URI": f"sqlite:///{home}/catalog.db", "K2_WAREHOUSE": f"file://{home}/warehouse"}
    if storage == "postgres":
        server = request.getfixturevalue("postgres")
        dagster_db = server.create_database().rsplit("/", 1)[1]
        env |= {
            "K2_CATALOG_URI": server.create_database(),
            "DAGSTER_HOME": str(tmp_path / "dagster"),
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": str(server.port),
            "DAGSTER_PG_USER": server.user,
            "DAGSTER_PG_PASSWORD": "",
            "DAGSTER_PG_DB": dagster_db,
        }
        (tmp_path / "dagster").mkdir()
        shutil.copy(REPO / "docker" / "dagster.yaml", tmp_path / "dagster" / "dagster.yaml")  # the production instance
    return env


@pytest.mark.parametrize("storage", ["sqlite", "postgres"])
def test_the_live_sensor_in_the_running_daemon_never_fails_and_records_every_batch_and_check(storage, tmp_path, request):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("K2_", "DAGSTER_"))}
    env |= storage_env(storage, tmp_path, request) | {"K2_SENSOR_DRAIN_SECONDS": str(DRAIN_SECONDS)}
    port = free_port()
    log = tmp_path / "k2-demo.log"
    with log.open("wb") as out:
        demo = subprocess.Popen(
            [str(K2), "demo", "--port", str(port)],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    everything: dict[int, psutil.Process] = {}
    try:
        wait_for_server(port, demo, log, what="k2 demo", timeout=STARTUP_TIMEOUT)
        done = wait_for(
            f"{MIN_TICKS} finished sensor ticks, {MIN_TICKS - 2} of them writing",
            lambda: ticks(port),
            lambda seen: (
                sum(t["status"] == "SUCCESS" for t in seen) >= MIN_TICKS - 2
                and sum(t["status"] != "STARTED" for t in seen) >= MIN_TICKS
            ),
            log,
            TICKS_TIMEOUT,
        )

        if storage == "sqlite":
            ride_out_a_catalog_outage(port, env, log)

        # Pause the producer: once a tick finds nothing new, the table stands still.
        producer = producer_of(demo)
        producer.send_signal(signal.SIGSTOP)
        paused_at = time.time()
        try:
            wait_for(
                "a tick with nothing new after the producer paused",
                lambda: ticks(port),
                lambda seen: any(
                    t["status"] == "SKIPPED"
                    and t["timestamp"] > paused_at + DRAIN_SECONDS
                    and "no new messages" in (t["skipReason"] or "")
                    for t in seen
                ),
                log,
                TICKS_TIMEOUT,
            )
            done = ticks(port)
            finished = [t for t in done if t["status"] != "STARTED"]
            assert len(finished) >= MIN_TICKS
            sensors = graphql(port, ALL_SENSOR_TICKS)["sensorsOrError"]["results"]
            failed = {s["name"]: [t for t in s["sensorState"]["ticks"] if t["status"] == "FAILURE"] for s in sensors}
            assert not any(failed.values()), f"failed ticks: {failed}"

            # The writer's cycles that wrote asked for gap-check runs of their days; each of those runs evaluated the check.
            writing = [t for t in finished if t["status"] == "SUCCESS"]
            assert len(writing) >= MIN_TICKS - 2
            run_ids = [run_id for t in writing for run_id in t["runIds"]]
            assert run_ids, writing

            def runs():
                return graphql(port, RUNS, {"ids": run_ids})["runsOrError"]["results"]

            finished_runs = wait_for(
                "every gap-check run finished",
                runs,
                lambda seen: len(seen) == len(run_ids) and all(r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in seen),
                log,
                TICKS_TIMEOUT,
            )
            assert {r["status"] for r in finished_runs} == {"SUCCESS"}, finished_runs
            assert {r["jobName"] for r in finished_runs} == {"binance_gap_check_job"}
            executions = graphql(port, CHECK_EXECUTIONS, {"partition": None})["assetCheckExecutions"]
            evaluated = {e["runId"]: e for e in executions if e["evaluation"] is not None}
            assert set(run_ids) <= evaluated.keys(), f"runs without an evaluation: {set(run_ids) - evaluated.keys()}"
            partitions = {r["runId"]: {t["key"]: t["value"] for t in r["tags"]}["dagster/partition"] for r in finished_runs}
            for run_id in run_ids:
                assert evaluated[run_id]["evaluation"]["partition"] == partitions[run_id]
                assert evaluated[run_id]["status"] in ("SUCCEEDED", "FAILED")

            # The micro-batches' rows_written add up, per day, to the live rows in Iceberg.
            (node,) = graphql(port, MATERIALIZATIONS)["assetNodes"]
            reported = defaultdict(int)
            notes = []
            for event in node["assetMaterializations"]:
                metadata = {e["label"]: e.get("intValue", e.get("text")) for e in event["metadataEntries"]}
                reported[event["partition"]] += metadata["rows_written"]
                notes += [metadata["previous_tick_error"]] if "previous_tick_error" in metadata else []
            if storage == "sqlite":  # the tick the outage ended said so in the next materialization
                assert any(n.startswith("drain ended by a store outage") for n in notes), notes
            stored = iceberg_rows_by_day(env)
            assert stored and dict(reported) == stored, (dict(reported), stored)
            assert len(node["assetMaterializations"]) >= len(writing)

            if storage == "sqlite":
                sensor_page_shows_recent_ticks_succeeded(port, tmp_path, log)
        finally:
            with contextlib.suppress(psutil.NoSuchProcess):
                producer.send_signal(signal.SIGCONT)

        # Ctrl-C: every process the demo started is gone within 10 s, and the demo said what it stopped.
        everything = {p.pid: p for p in psutil.Process(demo.pid).children(recursive=True)}
        assert len(everything) >= 6  # broker (and tansu), feed, producer, dagster dev, webserver, daemon, code server
        os.kill(demo.pid, signal.SIGINT)
        started = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):
            demo.wait(timeout=STOP_LIMIT)
        _, alive = psutil.wait_procs(list(everything.values()), timeout=max(0.1, STOP_LIMIT - (time.monotonic() - started)))
        took = time.monotonic() - started
        assert demo.poll() is not None and not alive, (
            f"after {took:.1f} s still running: {[p.cmdline() for p in alive if p.is_running()]}\n{log_tail(log)}"
        )
        assert took <= STOP_LIMIT
        said = log.read_text(errors="replace")
        assert "k2: asked to stop: stopping the embedded broker, the local Binance feed, the producer, dagster dev" in said
        assert "k2: stopped in" in said
    finally:
        if demo.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(demo.pid, signal.SIGKILL)
        for process in everything.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def ride_out_a_catalog_outage(port: int, env: dict, log: Path) -> None:
    """The SQLite catalog locked for longer than a tick waits: a tick ends with the outage as its reason, then writing resumes."""
    began = time.time()
    db = sqlite3.connect(env["K2_CATALOG_URI"].removeprefix("sqlite:///"), isolation_level=None, timeout=30)
    try:
        db.execute("BEGIN EXCLUSIVE")
        wait_for(
            "a tick saying the catalog outage ended the drain",
            lambda: ticks(port),
            lambda seen: any(
                t["status"] == "SKIPPED"
                and t["timestamp"] > began
                and (t["skipReason"] or "").startswith("drain ended by a store outage")
                for t in seen
            ),
            log,
            OUTAGE_SECONDS + 60,
        )
        time.sleep(max(0.0, began + OUTAGE_SECONDS - time.time()))
    finally:
        db.execute("ROLLBACK")
        db.close()
    ended = time.time()
    wait_for(
        "a tick writing after the outage",
        lambda: ticks(port),
        lambda seen: any(t["status"] == "SUCCESS" and t["timestamp"] > ended for t in seen),
        log,
        TICKS_TIMEOUT,
    )


SENSOR_TICKS_JS = """
() => [...document.querySelectorAll('table tbody tr')].map(r => r.innerText.replace(/\\s+/g, ' ').trim()).filter(t => t)
"""


def sensor_page_shows_recent_ticks_succeeded(port: int, tmp_path: Path, log: Path) -> None:
    """The sensor's page as a person sees it: its recent ticks in the tick table, none of them failed."""
    with chromium_page(tmp_path, log) as page:
        page.goto(f"http://127.0.0.1:{port}/locations/k2/sensors/{SENSOR}")
        page.get_by_text(SENSOR).first.wait_for()
        page.get_by_text("Running").first.wait_for()
        # A tick that wrote says how many gap-check runs it requested; a failed one would say Failure.
        wrote = re.compile(r"\b[1-9]\d* runs? requested")
        deadline = time.monotonic() + 60
        rows = page.evaluate(SENSOR_TICKS_JS)
        while not any(wrote.search(r) for r in rows) and time.monotonic() < deadline:
            page.wait_for_timeout(500)
            rows = page.evaluate(SENSOR_TICKS_JS)
        assert rows, "the sensor page shows no ticks"
        assert not [r for r in rows if "Failure" in r or "Failed" in r], rows
        assert any(wrote.search(r) for r in rows), rows
        page.screenshot(path=tmp_path / "sensor-page.png")
