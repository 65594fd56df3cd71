"""A live writer that drains its topic continuously, in a thread of its own, for as long as its lease is renewed.

The Dagster sensor used to drain Kafka inside its tick for 20 s, after which the daemon waited about 5 s before the
next tick: a trade that arrived in between waited for that tick, so freshness p95 was 6-7 s. Here the writer never
waits for a tick. Each tick renews the lease and collects what was committed since the last one (`harvest`); the
writer itself is the same LiveWriter, fenced on the offsets in the table, so exactly once does not depend on who
calls it, or on how many processes do (docs/live-path.md, "Freshness").
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from k2_assets.core.live_report import BatchReport
from k2_assets.core.live_writer import LiveWriter
from k2_assets.core.outage import TRANSIENT, StoreUnavailable
from k2_assets.core.text import one_line

log = logging.getLogger("k2.writer")


@dataclass
class Harvest:
    """What the writer did since the last harvest."""

    reports: list[BatchReport] = field(default_factory=list)  # committed micro-batches, oldest first
    reconciled: dict[str, int] = field(default_factory=dict)  # day whose gaps were reconciled -> its last snapshot
    error: str | None = None  # why the writer stopped, one line (it starts again at this harvest)
    position: dict[int, int] = field(default_factory=dict)  # partition -> next offset, as of the last cycle
    started: bool = False  # this harvest started the writer


def stop_reason(exc: BaseException, batches: int) -> str:
    """Why draining stopped, in one line: a store outage or an error, after how many micro-batches."""
    what = "a store outage" if isinstance(exc, (StoreUnavailable, *TRANSIENT)) else "an error"
    return f"drain ended by {what} after {batches} micro-batches: {one_line(exc)}"


class BackgroundDrain:
    """Runs `open_writer()`'s writer in a loop of cycles: drain for `cycle_seconds` (committing a micro-batch as
    soon as its window closes), then reconcile the sequence gaps of what the cycle wrote.

    The loop ends when nobody harvested for `lease_seconds` (the sensor was stopped, or its code server
    replaced), when `stop()` is called, or on an error, which the next harvest reports before starting anew."""

    def __init__(
        self,
        open_writer: Callable[[], LiveWriter],
        *,
        cycle_seconds: float,
        lease_seconds: float,
        detected_by: str,
    ):
        self.open_writer, self.cycle_seconds, self.lease_seconds = open_writer, cycle_seconds, lease_seconds
        self.detected_by = detected_by
        self._lock = threading.Lock()
        self._done = Harvest()
        self._cycle_days: dict[str, int] = {}
        self._lease_until = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.writer: LiveWriter | None = None

    def harvest(self) -> Harvest:
        """Renew the lease, take what was committed since the last harvest, and (re)start the writer if it is not running."""
        with self._lock:
            self._lease_until = time.monotonic() + self.lease_seconds
            done, self._done = self._done, Harvest(position=dict(self._done.position))
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="k2-live-drain", daemon=True)
                self._thread.start()
                done.started = True
        return done

    def stop(self, timeout: float = 30.0) -> None:
        """Stop draining: the batch in hand is not committed, and the writer leaves the consumer group."""
        self._stop.set()
        writer = self.writer
        if writer is not None:
            writer.stop()
        if self._thread is not None:
            self._thread.join(timeout)

    def _leased(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self._lease_until

    def _add(self, report: BatchReport) -> None:
        with self._lock:
            self._done.reports.append(report)
        for day in report.partitions:
            self._cycle_days[day] = report.snapshot_id

    def _run(self) -> None:
        batches, self._cycle_days = 0, {}
        try:
            self.writer = writer = self.open_writer()
            while self._leased():
                cycle_end = time.monotonic() + self.cycle_seconds
                while self._leased() and time.monotonic() < cycle_end:
                    # drain() returns early once the topic is idle; the next call waits for new messages.
                    batches += len(
                        writer.drain(cycle_end - time.monotonic(), give_up_after=self.cycle_seconds, on_batch=self._add)
                    )
                writer.reconcile_gaps(detected_by=self.detected_by)
                with self._lock:
                    self._done.reconciled.update(self._cycle_days)
                    self._done.position = dict(writer.position)
                self._cycle_days = {}
        except Exception as exc:
            error = stop_reason(exc, batches)
            log.warning(error) if isinstance(exc, (StoreUnavailable, *TRANSIENT)) else log.exception(error)
            with self._lock:
                self._done.error = error
        finally:
            writer, self.writer = self.writer, None
            if writer is not None:
                with contextlib.suppress(Exception):  # a writer that cannot say goodbye is dropped by the group's timeout
                    writer.close()
