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

    def run(script: str = RUNNER) -> subprocess.Popen:
        started.append(subprocess.Popen([sys.executable, "-c", script, str(tmp_path), "x"], stderr=subprocess.PIPE, text=True))
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


STOPPING_RUNNER = """
import sys
from pathlib import Path
from k2_assets import supervisor
stamp = '''
import signal, sys, time
def stop(*_):
    time.sleep(float(sys.argv[2]))
    open(sys.argv[1], "w").write(repr(time.time()))
    sys.exit(0)
signal.signal(signal.SIGINT, stop)
time.sleep(600)
'''
home = Path(sys.argv[1])
processes = supervisor.Supervisor(home)
processes.start("broker", "the broker", [sys.executable, "-c", stamp, str(home / "broker"), "0"])
processes.start("dagster", "the main process", [sys.executable, "-c", stamp, str(home / "main"), "1.5"])
processes.start("producer", "the producer", [sys.executable, "-c", stamp, str(home / "producer"), "0"])
sys.exit(processes.run())
"""


def test_ctrl_c_stops_the_broker_after_the_processes_that_read_from_it(start, tmp_path):
    """The sensors' consumers close on a live broker rather than retrying one that is gone (which held Ctrl-C)."""
    runner = start(STOPPING_RUNNER)
    deadline = time.monotonic() + 10
    while len(psutil.Process(runner.pid).children()) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # their signal handlers are installed
    runner.send_signal(signal.SIGINT)
    assert runner.wait(timeout=15) == 0, runner.stderr.read()
    stopped = {name: float((tmp_path / name).read_text()) for name in ("broker", "main", "producer")}
    assert stopped["broker"] > stopped["main"] > stopped["producer"]
    assert "killing" not in runner.stderr.read()
