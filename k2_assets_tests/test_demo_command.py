"""`k2 demo` end to end, as a user on a fresh machine runs it.

Starts the real command with K2_HOME unset (the default ./.k2 of its working directory), waits for the
Dagster UI, checks what the UI's GraphQL API shows, runs one ASX partition through the daemon, sees live
trades arrive from the local feed through Kafka and the sensor, compacts the live day with the maintenance job
beside the live writer, and stops everything with Ctrl-C (SIGINT).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from datetime import date
from pathlib import Path

import pytest

from k2_assets.core import catalog, writer
from k2_assets.dev.broker import free_port
from k2_assets_tests.dagster_ui import graphql, log_tail, wait_for_server

REPO = Path(__file__).resolve().parents[1]
K2 = REPO / ".venv" / "bin" / "k2"
SESSION = "2014-03-10"  # the first ASX session in the demo data

STARTUP_TIMEOUT = 90
RUN_TIMEOUT = 120
SHUTDOWN_TIMEOUT = 10

ASSETS_QUERY = """
{
  assetNodes {
    assetKey { path }
    isPartitioned
    assetChecksOrError { __typename ... on AssetChecks { checks { name } } }
  }
}
"""

REPOSITORIES_QUERY = """
{
  repositoriesOrError {
    __typename
    ... on RepositoryConnection { nodes { name location { name } jobs { name } schedules { name } } }
    ... on PythonError { message }
  }
}
"""

LAUNCH_RUN = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on Error { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""

LIVE_QUERY = """
query($partition: String!) {
  assetNodes(assetKeys: [{path: ["binance_trades"]}]) {
    assetMaterializations(partitions: [$partition], limit: 5) {
      partition metadataEntries { label ... on IntMetadataEntry { intValue } }
    }
  }
}
"""

RUN_STATUS = """
query($runId: ID!) { runOrError(runId: $runId) { __typename ... on Run { status } } }
"""

MATERIALIZATION_QUERY = """
query($partition: String!) {
  assetNodes(assetKeys: [{path: ["asx_trades"]}]) {
    assetMaterializations(partitions: [$partition]) {
      partition
      runId
      metadataEntries { label ... on IntMetadataEntry { intValue } }
    }
    assetChecksOrError {
      ... on AssetChecks {
        checks { name executionForLatestMaterialization { runId status evaluation { success } } }
      }
    }
  }
}
"""


def non_loopback_address() -> str | None:
    """The address this machine would use to reach another host (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def launch_run(port: int, job: str, tags: dict[str, str] | None = None, config: dict | None = None) -> str:
    params = {
        "selector": {"repositoryLocationName": "k2", "repositoryName": "__repository__", "jobName": job},
        "runConfigData": config or {},
        "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]},
    }
    result = graphql(port, LAUNCH_RUN, {"params": params})["launchRun"]
    assert result["__typename"] == "LaunchRunSuccess", result
    return result["run"]["runId"]


def wait_for_run(port: int, run_id: str, log: Path, timeout: float = RUN_TIMEOUT) -> str:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = graphql(port, RUN_STATUS, {"runId": run_id})["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        time.sleep(1)
    pytest.fail(f"run {run_id} still {status} after {timeout} s:\n{log_tail(log)}")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop(process: subprocess.Popen, log: Path) -> None:
    """Ctrl-C in the terminal: SIGINT to the whole foreground group at once. Within 10 s every process is gone."""
    started = time.monotonic()
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=SHUTDOWN_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"k2 demo still running {SHUTDOWN_TIMEOUT} s after SIGINT:\n{log_tail(log)}")
    while group_alive(process.pid) and time.monotonic() - started < SHUTDOWN_TIMEOUT:
        time.sleep(0.2)
    assert not group_alive(process.pid), f"children of k2 demo outlived it after SIGINT:\n{log_tail(log)}"
    assert process.returncode == 0, log_tail(log)
    assert "k2: stopped in" in log.read_text(errors="replace"), log_tail(log)


def test_k2_demo_serves_the_lakehouse_and_stops_on_ctrl_c(tmp_path):
    # No K2_HOME, as `make demo` runs it: the default ./.k2 is relative to the working directory, while Dagster
    # runs its processes in DAGSTER_HOME; they must use the same home.
    home = tmp_path / ".k2"
    env = {name: value for name, value in os.environ.items() if not name.startswith(("K2_", "DAGSTER_"))}
    port = free_port()
    log = tmp_path / "k2-demo.log"

    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(K2), "demo", "--port", str(port)],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_server(port, process, log, what="k2 demo", timeout=STARTUP_TIMEOUT)

        # The demo vendor files, written on first start.
        data = home / "data"
        assert (data / "asx" / "reference-data" / "company_info.csv").is_file()
        assert sorted((data / "asx" / "trades").glob("*.csv"))
        assert sorted((data / "asx" / "quotes").glob("*.csv"))
        assert [*(data / "binance").glob("*-trades-*.csv"), *(data / "binance").glob("*-trades-*.zip")]
        assert (home / "dagster" / "dagster.yaml").is_file()

        # The UI listens on loopback only.
        address = non_loopback_address()
        if address is not None:
            with pytest.raises(OSError), socket.create_connection((address, port), timeout=3):
                pass

        # What the asset catalog shows.
        nodes = {tuple(n["assetKey"]["path"]): n for n in graphql(port, ASSETS_QUERY)["assetNodes"]}
        assert {("asx_trades",), ("asx_quotes",), ("binance_trades_history",)} <= nodes.keys()
        checks = {}
        for key in ("asx_trades", "asx_quotes", "binance_trades_history"):
            node = nodes[(key,)]
            assert node["isPartitioned"], key
            assert node["assetChecksOrError"]["__typename"] == "AssetChecks", node
            checks[key] = {c["name"] for c in node["assetChecksOrError"]["checks"]}
        assert {"price_positive", "message_id_unique", "timestamp_in_session", "trade_date_is_partition"} <= checks["asx_trades"]
        assert {"bid_price_positive", "ask_price_positive", "message_id_unique"} <= checks["asx_quotes"]
        assert {"price_positive", "message_id_unique"} <= checks["binance_trades_history"]

        # Jobs and schedules of the code location.
        repositories = graphql(port, REPOSITORIES_QUERY)["repositoriesOrError"]
        assert repositories["__typename"] == "RepositoryConnection", repositories
        (repository,) = repositories["nodes"]
        assert repository["location"]["name"] == "k2"
        assert {"asx_history_job", "binance_history_job"} <= {j["name"] for j in repository["jobs"]}
        assert {"asx_daily_schedule", "binance_history_schedule"} <= {s["name"] for s in repository["schedules"]}

        # One ASX session through the queue, the daemon and the code server.
        run_id = launch_run(port, "asx_history_job", {"dagster/partition": SESSION})
        assert wait_for_run(port, run_id, log) == "SUCCESS", log_tail(log)

        (asset,) = graphql(port, MATERIALIZATION_QUERY, {"partition": SESSION})["assetNodes"]
        (materialization,) = asset["assetMaterializations"]
        assert materialization["partition"] == SESSION
        assert materialization["runId"] == run_id
        metadata = {e["label"]: e.get("intValue") for e in materialization["metadataEntries"]}
        assert metadata["rows_written"] > 0
        assert metadata["dagster/row_count"] == metadata["rows_written"]
        executions = {c["name"]: c["executionForLatestMaterialization"] for c in asset["assetChecksOrError"]["checks"]}
        assert executions.keys() == checks["asx_trades"]
        for name, execution in executions.items():
            assert execution is not None, name
            assert execution["runId"] == run_id, name
            assert execution["status"] == "SUCCEEDED", (name, execution)
            assert execution["evaluation"]["success"], (name, execution)

        # Live trades from the local feed arrive through Kafka and the sensor, as materializations of today's partition.
        today = time.strftime("%Y-%m-%d", time.gmtime())
        deadline = time.monotonic() + RUN_TIMEOUT
        live = []
        while not live and time.monotonic() < deadline:
            (node,) = graphql(port, LIVE_QUERY, {"partition": today})["assetNodes"]
            live = node["assetMaterializations"]
            time.sleep(2)
        assert live, f"no live micro-batch reached binance_trades:\n{log_tail(log)}"
        rows = {e["label"]: e.get("intValue") for e in live[0]["metadataEntries"]}
        assert rows["rows_written"] > 0 and rows["rows_rejected"] == 0

        # Table maintenance as its hourly schedule runs it, beside the live writer: today's small files are merged
        # (in the op's own child process) and every live row stays.
        lake = catalog.open_catalog(f"sqlite:///{home}/catalog.db", f"file://{home}/warehouse")
        today_binance = writer.partition_filter("BINANCE", date.fromisoformat(today))
        deadline = time.monotonic() + RUN_TIMEOUT
        while len(list(lake.load_table("market.trades").scan(row_filter=today_binance).plan_files())) < 12:
            assert time.monotonic() < deadline, f"the live writer made fewer than 12 files:\n{log_tail(log)}"
            time.sleep(2)
        # market.trades only: the job's other tables make the run longer, not different; it may queue behind gap checks.
        ops = ("compact_partitions", "expire_snapshots", "remove_orphan_files")
        run_id = launch_run(port, "table_maintenance_job", config={"ops": {op: {"config": {"tables": ["trades"]}} for op in ops}})
        assert wait_for_run(port, run_id, log, timeout=3 * RUN_TIMEOUT) == "SUCCESS", log_tail(log)
        trades = lake.load_table("market.trades")
        compactions = [
            s
            for s in trades.metadata.snapshots
            if s.summary and s.summary.additional_properties.get("k2.maintenance") == "compact"
        ]
        # The writer's commits each second land between the merge's read and its commit; the commit is rebased over
        # them (before, at pyiceberg's serializable default, a loaded machine could lose every attempt and defer the day).
        assert compactions, f"no compaction commit in market.trades:\n{log_tail(log)}"
        for compaction in compactions:  # it rewrote files, no row more or less
            parent = trades.snapshot_by_id(compaction.parent_snapshot_id)
            assert compaction.summary["total-records"] == parent.summary["total-records"]

        stop(process, log)
    finally:
        # Whatever failed above, leave no process behind.
        if process.poll() is None or group_alive(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
