"""The processes `k2 demo` runs: started together, watched, and all of them stopped within seconds of Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from k2_assets.core.stopping import Stopper

# A stop asks politely, then kills whatever is left: Ctrl-C returns within 10 s, whatever a process is doing
# (a sensor tick mid-drain is safe to kill: every Iceberg commit is fenced, and the next writer resumes).
STOP_GRACE_SECONDS = 6.0
# The broker stops last: the producer flushes to it, and the sensors' consumers close on it rather than retrying
# a broker that is gone (which held Ctrl-C for seconds); after this long it is stopped whatever still runs.
BROKER_AFTER_SECONDS = 4.0
# A helper (broker, feed, producer) that dies is started again; one that keeps dying stops the demo.
MAX_RESTARTS, RESTART_WINDOW_SECONDS = 5, 60.0
WATCH_SECONDS = 1.0
# The embedded broker keeps its topics in memory: after it restarts, the producer's idempotent session and
# queued messages belong to a broker that is gone, so the producer starts afresh too.
DEPENDENTS = {"broker": ("producer",)}


class Supervisor:
    def __init__(self, logs: Path):
        self.logs = logs
        self.children: dict[str, subprocess.Popen] = {}
        self.labels: dict[str, str] = {}
        self.known: dict[int, psutil.Process] = {}  # every descendant seen, so none outlives us once orphaned
        self.stop_started: float | None = None
        self.failed = False  # stopped because a process exited on its own
        self.launches: dict[str, tuple[list[str], bool, dict]] = {}
        self.restarts: dict[str, list[float]] = {}
        self.broker_signalled = False

    def start(self, name: str, label: str, command: list[str], *, log: bool = True, **kwargs) -> subprocess.Popen:
        # A process started from a non-interactive shell inherits SIGINT as ignored, and dagster dev would
        # then never stop: restore the default handlers in each child before it starts.
        out = open(self.logs / f"{name}.log", "ab") if log else None
        process = subprocess.Popen(command, stdout=out, stderr=out, preexec_fn=_default_signals, **kwargs)
        self.children[name], self.labels[name] = process, label
        self.launches[name] = (command, log, kwargs)
        return process

    def restart(self, name: str) -> bool:
        """Start a helper that died again, unless it died too often lately; False means it should not be."""
        now = time.monotonic()
        recent = [t for t in self.restarts.get(name, []) if now - t < RESTART_WINDOW_SECONDS]
        if len(recent) >= MAX_RESTARTS:
            return False
        self.restarts[name] = [*recent, now]
        command, log, kwargs = self.launches[name]
        code = self.children[name].returncode
        print(
            f"k2: {self.labels[name]} exited with {code}; starting it again ({len(recent) + 1} of {MAX_RESTARTS} "
            f"restarts in {RESTART_WINDOW_SECONDS:g} s; see {self.logs})",
            file=sys.stderr,
            flush=True,
        )
        self.start(name, self.labels[name], command, log=log, **kwargs)
        for dependent in DEPENDENTS.get(name, ()):
            process = self.children.get(dependent)
            if process is not None and process.poll() is None:
                print(
                    f"k2: restarting {self.labels[dependent]} too: {self.labels[name]} came back empty",
                    file=sys.stderr,
                    flush=True,
                )
                process.kill()
        return True

    def watch(self) -> None:
        """Remember every descendant (a run's worker, the code server) while its parent still knows it, and
        forget those that are gone: one walk of the process table for all of them."""
        self.known = {pid: p for pid, p in self.known.items() if _alive(p)}
        for child in psutil.Process().children(recursive=True):
            self.known.setdefault(child.pid, child)

    def stop(self, why: str) -> None:
        if self.stop_started is not None:
            return
        self.watch()
        self.stop_started = time.monotonic()
        running = [self.labels[name] for name, p in self.children.items() if p.poll() is None]
        processes = sum(1 for p in self.known.values() if _alive(p))
        print(
            f"k2: {why}: stopping {', '.join(running)} ({processes} processes in all); "
            f"anything still running after {STOP_GRACE_SECONDS:g} s is killed",
            file=sys.stderr,
            flush=True,
        )
        for name, process in self.children.items():
            if name != "broker" and process.poll() is None:
                process.send_signal(signal.SIGINT)

    def _step_stop(self) -> None:
        elapsed = time.monotonic() - self.stop_started
        broker = self.children.get("broker")
        others_stopped = all(p.poll() is not None for name, p in self.children.items() if name != "broker")
        if broker is not None and not self.broker_signalled and (others_stopped or elapsed > BROKER_AFTER_SECONDS):
            self.broker_signalled = True
            if broker.poll() is None:
                broker.send_signal(signal.SIGINT)
        if elapsed > STOP_GRACE_SECONDS:
            self.kill_all()

    def kill_all(self) -> None:
        self.watch()
        left = [p for p in self.known.values() if _alive(p)]
        left += [psutil.Process(p.pid) for p in self.children.values() if p.poll() is None and p.pid not in self.known]
        if left:
            names = sorted({_name(p) for p in left})
            print(f"k2: killing {len(left)} processes still running: {', '.join(names)}", file=sys.stderr, flush=True)
        for process in left:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        for process in self.children.values():
            process.wait()

    def everything_stopped(self) -> bool:
        return all(p.poll() is not None for p in self.children.values()) and not any(_alive(p) for p in self.known.values())

    def run(self, main: str = "dagster") -> int:
        """Until Ctrl-C or SIGTERM. A helper that exits is started again; if `main` exits, or a helper keeps
        exiting, everything stops and the exit code is 1."""
        Stopper("k2 demo", "the demo", lambda: self.stop("asked to stop"), force=self.kill_all).install()
        watched = 0.0
        try:
            while True:
                if self.stop_started is None and time.monotonic() - watched >= WATCH_SECONDS:
                    self.watch()  # each walk reads all of /proc: once a second is enough while running
                    watched = time.monotonic()
                if self.stop_started is None:
                    for name, process in list(self.children.items()):
                        if process.poll() is not None and (name == main or not self.restart(name)):
                            self.failed = True
                            self.stop(f"{self.labels[name]} exited with {process.returncode} (see {self.logs})")
                            break
                else:
                    self.watch()
                    self._step_stop()
                    if self.everything_stopped():
                        print(f"k2: stopped in {time.monotonic() - self.stop_started:.1f} s", file=sys.stderr, flush=True)
                        return 1 if self.failed else 0
                time.sleep(0.2)
        finally:
            if not self.everything_stopped():
                self.kill_all()


def _default_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _name(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline()[:3]) or process.name()
    except psutil.Error:
        return str(process.pid)
