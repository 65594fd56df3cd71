"""Talking to a `dagster dev` server started by a test: wait for it, query its GraphQL API, show its log, open it in Chromium."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
VIEWPORT = {"width": 1600, "height": 1500}  # the whole asset graph, every group expanded
UI_TIMEOUT_MS = 90_000


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


@contextlib.contextmanager
def chromium_page(tmp_path: Path, log: Path):
    """A page in Debian's headless Chromium, driven by Playwright; on failure a screenshot and the server's log tail."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: run `bash scripts/get-chromium` (make test does) to install Debian's chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: `.venv/bin/pip install -e '.[dev]'` (never `playwright install`)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(UI_TIMEOUT_MS)
        try:
            yield page
        except BaseException:
            page.screenshot(path=tmp_path / "failure.png")
            print(f"screenshot of the failure: {tmp_path / 'failure.png'}\n{log_tail(log)}")
            raise
        finally:
            browser.close()
