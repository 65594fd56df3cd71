"""Talking to a `dagster dev` server started by a test: wait for it, query its GraphQL API, show its log."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest


def log_tail(log: Path, lines: int = 60) -> str:
    """The end of a server's log, without librdkafka's connection chatter."""
    if not log.exists():
        return "(no log)"
    kept = [line for line in log.read_text(errors="replace").splitlines() if "rdkafka" not in line]
    return "\n".join(kept[-lines:])


def wait_for_server(port: int, process: subprocess.Popen, log: Path, *, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode} before the UI answered:\n{log_tail(log)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(1)
    pytest.fail(f"the Dagster UI did not answer on port {port} within {timeout:g} s:\n{log_tail(log)}")


def graphql(port: int, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.load(response)
    assert not body.get("errors"), body["errors"]
    return body["data"]
