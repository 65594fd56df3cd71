"""Query timeouts: one thread per engine that interrupts the DuckDB cursors of queries past their deadline."""

from __future__ import annotations

import contextlib
import threading
import time

import duckdb


class Watch:
    """One query being watched: its deadline, its cursor, and whether it was interrupted."""

    __slots__ = ("cursor", "deadline", "fired")

    def __init__(self, deadline: float, cursor):
        self.deadline = deadline
        self.cursor = cursor
        self.fired = False


class Watchdog:
    """One long-lived thread per engine that interrupts the cursors of queries past their deadline.

    (A thread or Timer per query costs a thread start each time, which on a busy machine is
    milliseconds.) A due query is interrupted again every 50 ms until it ends, since an interrupt
    that lands before DuckDB has started the query is lost.
    """

    REPEAT_S = 0.05

    def __init__(self):
        self._cond = threading.Condition()
        self._active: dict[int, Watch] = {}
        self._wake_at = float("inf")
        self._thread: threading.Thread | None = None
        self._stopped = False

    def watch(self, cursor, timeout_s: float) -> Watch:
        """Interrupt `cursor` once `timeout_s` have passed, until `done` is called."""
        entry = Watch(time.monotonic() + timeout_s, cursor)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="k2-query-watchdog", daemon=True)
                self._thread.start()
            self._active[id(entry)] = entry
            if entry.deadline < self._wake_at:
                self._cond.notify()
        return entry

    def done(self, entry: Watch) -> None:
        """The query of `entry` ended: stop watching it."""
        with self._cond:
            self._active.pop(id(entry), None)

    def stop(self) -> None:
        """End the thread."""
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                wake = float("inf")
                for entry in self._active.values():
                    if entry.deadline <= now:
                        entry.fired = True
                        with contextlib.suppress(duckdb.ConnectionException):  # the cursor closed meanwhile
                            entry.cursor.interrupt()
                        wake = min(wake, now + self.REPEAT_S)
                    else:
                        wake = min(wake, entry.deadline)
                self._wake_at = wake
                self._cond.wait(None if wake == float("inf") else wake - now)
                self._wake_at = float("inf")
