"""The supervisor `k2 demo` runs its processes under, with real processes: a helper that dies is started
again, one that keeps dying or the main process dying stops everything, and Ctrl-C leaves nothing."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time

import psutil
import pytest

RUNNER = """
import sys
from pathlib import Path
from k2_assets import supervisor
supervisor.MAX_RESTARTS = 3
sleeper = [sys.executable, "-c", "import time, sys; time.sleep(600)", sys.argv[2]]
processes = supervisor.Supervisor(Path(sys.argv[1]))
processes.start("dagster", "the main process", [*sleeper[:-1], "main"])
processes.start("feed", "the helper", [*sleeper[:-1], "helper"])
sys.exit(processes.run())
"""


@pytest.fixture
def start(tmp_path):
    """Start the runner; whatever a failing test leaves behind is killed."""
    started: list[subprocess.Popen] = []

    def run() -> subprocess.Popen:
        started.append(subprocess.Popen([sys.executable, "-c", RUNNER, str(tmp_path), "x"], stderr=subprocess.PIPE, text=True))
        return started[-1]

    yield run
    for runner in started:
        with contextlib.suppress(psutil.Error):
            for process in [*psutil.Process(runner.pid).children(recursive=True), psutil.Process(runner.pid)]:
                process.kill()


def child(runner: subprocess.Popen, role: str, timeout: float = 10) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in psutil.Process(runner.pid).children():
            try:
                if process.status() != psutil.STATUS_ZOMBIE and process.cmdline()[-1] == role:
                    return process
            except psutil.Error:  # it died, or is a zombie, while we looked
                continue
        time.sleep(0.1)
    raise AssertionError(f"no {role} process")


def finish(runner: subprocess.Popen, family: list[psutil.Process]) -> tuple[int, str]:
    code = runner.wait(timeout=10)
    _, alive = psutil.wait_procs(family, timeout=5)
    assert not alive, alive
    return code, runner.stderr.read()


def test_a_helper_that_dies_is_started_again_and_ctrl_c_stops_everything(start):
    runner = start()
    first = child(runner, "helper")
    first.kill()
    again = child(runner, "helper")
    while again.pid == first.pid:
        again = child(runner, "helper")
    family = [child(runner, "main"), again]
    runner.send_signal(signal.SIGINT)
    code, said = finish(runner, family)
    assert code == 0
    assert "the helper exited with -9; starting it again (1 of 3 restarts" in said
    assert "stopping the main process, the helper" in said and "k2: stopped in" in said


def test_a_helper_that_keeps_dying_or_the_main_process_dying_stops_everything(start):
    runner = start()
    main = child(runner, "main")
    seen = set()
    while runner.poll() is None and len(seen) < 10:
        try:
            helper = child(runner, "helper", timeout=3)
        except AssertionError:
            break
        if helper.pid not in seen:
            seen.add(helper.pid)
            helper.kill()
        time.sleep(0.05)
    code, said = finish(runner, [main])
    assert code == 1 and len(seen) == 4  # the first and three restarts
    assert "the helper exited with -9 (see" in said

    runner = start()
    helper = child(runner, "helper")
    child(runner, "main").kill()
    code, said = finish(runner, [helper])
    assert code == 1 and "the main process exited with -9" in said
