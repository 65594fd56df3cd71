"""Riding out catalog and object-store outages: retries with back-off and jitter, and a health state.

A locked or unreachable catalog (SQLite `database is locked`, Postgres down) and an object store that
fails surface as SQLAlchemy operational errors or OSError. The writer retries the step that met
them, so it pauses instead of dying, and consuming pauses with it (the consuming thread blocks on
the hand-over queue, so memory stays at two micro-batches). The state is healthy, degraded (a
retry under way) or stalled (retrying for longer than `stall_after` seconds); it is a gauge and is
logged when it changes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy.exc
from pyiceberg.exceptions import CommitStateUnknownException
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential_jitter

from k2_assets.core.text import one_line

log = logging.getLogger("k2.writer")
T = TypeVar("T")

TRANSIENT = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
    CommitStateUnknownException,
    OSError,
    TimeoutError,
)
STATES = ("healthy", "degraded", "stalled")


class StoreUnavailable(RuntimeError):
    """The catalog or object store stayed unavailable for the whole time this step could wait."""


class StoreHealth:
    """Retries store steps until they succeed, the deadline passes or `stop` is set; tracks the state."""

    def __init__(self, gauge=None, stall_after: float = 60.0, logger: logging.Logger = log):
        self.gauge = gauge  # a Gauge with a `state` label, or None
        self.stall_after = stall_after
        self.log = logger
        self.state = "healthy"
        self._since: float | None = None  # when the current outage began
        self._lock = threading.Lock()
        self._set("healthy", quiet=True)

    def call(self, step: Callable[[], T], what: str, *, deadline: float | None = None, stop: threading.Event | None = None) -> T:
        """Run `step`, retrying transient store errors with exponential back-off and full jitter."""

        def give_up(state: RetryCallState) -> bool:
            now = time.monotonic()
            return (deadline is not None and now >= deadline) or (stop is not None and stop.is_set())

        retrying = Retrying(
            retry=retry_if_exception_type(TRANSIENT),
            wait=wait_exponential_jitter(initial=0.2, max=5.0, jitter=1.0),
            stop=give_up,
            before_sleep=lambda state: self._failed(what, state),
            reraise=True,
        )
        try:
            result = retrying(step)
        except TRANSIENT as exc:
            waited = time.monotonic() - (self._since or time.monotonic())
            raise StoreUnavailable(f"{what}: catalog or object store unavailable for {waited:.0f} s: {one_line(exc)}") from exc
        self._recovered(what)
        return result

    def _failed(self, what: str, state: RetryCallState) -> None:
        with self._lock:
            now = time.monotonic()
            if self._since is None:
                self._since = now
            stalled = now - self._since >= self.stall_after
        exc = state.outcome.exception() if state.outcome else None
        self._set("stalled" if stalled else "degraded", detail=f"{what} failed (attempt {state.attempt_number}): {one_line(exc)}")

    def _recovered(self, what: str) -> None:
        with self._lock:
            since, self._since = self._since, None
        if since is not None:
            self._set("healthy", detail=f"{what} succeeded after {time.monotonic() - since:.1f} s of outage")

    def _set(self, state: str, detail: str = "", quiet: bool = False) -> None:
        changed = state != self.state
        self.state = state
        if self.gauge is not None:
            for name in STATES:
                self.gauge.labels(name).set(1 if name == state else 0)
        if changed and not quiet:
            (self.log.warning if state != "healthy" else self.log.info)("store state %s: %s", state, detail)
