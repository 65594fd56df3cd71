"""market.sequence_gaps reconciled from the trade ids a LiveWriter wrote, for the (day, symbol)s it touched."""

from __future__ import annotations

import random
import time
from datetime import UTC, date, datetime

import pyarrow as pa
from pyiceberg.exceptions import CommitFailedException, ValidationException

from k2_assets.core import integrity
from k2_assets.core.live_properties import SOURCE


class GapReconciling:
    """LiveWriter's gap side, mixed into it: reconcile_gaps after draining."""

    def reconcile_gaps(self, detected_by: str = SOURCE, now: datetime | None = None) -> dict[date, pa.Table]:
        """Reconcile market.sequence_gaps for the (day, symbol)s written since the last call, from the
        stored ids; a gap that straddles midnight UTC belongs to the day of the trade after it.
        Returns each day's gap rows for the symbols reconciled."""
        if self.gaps is None or not self.touched:
            return {}
        now = now or datetime.now(UTC)
        by_day: dict[date, list[str]] = {}
        for day, symbol in sorted(self.touched):
            by_day.setdefault(day, []).append(symbol)
        result = {}
        for day, symbols in sorted(by_day.items()):

            def reconcile(day=day, symbols=symbols) -> pa.Table:
                current = {}
                for symbol in symbols:
                    last = self.seen.last_before(self.trades, day, symbol)
                    found = self.seen.load(self.trades, day, symbol).holes(None if last is None else last + 1)
                    if found:
                        current[symbol] = found
                return integrity.reconcile_partition(
                    self.gaps,
                    current,
                    exchange=self.exchange,
                    session_date=day,
                    detected_by=detected_by,
                    now=now,
                    metrics=self.metrics.gaps,
                    symbols=symbols,
                )

            result[day] = self.health.call(
                lambda: self._reconciled(reconcile),
                "reconciling market.sequence_gaps",
                deadline=self._give_up_at,
                stop=self._stop,
            )
            self.touched -= {(day, s) for s in symbols}
        return result

    def _reconciled(self, reconcile, attempts: int = 8):
        """Reconcile from the table as it is now; another writer reconciling the same day first makes
        pyiceberg refuse the rebased overwrite, and the gaps are computed again from the newer view."""
        for attempt in range(attempts):
            self.trades.refresh()
            self.seen.follow(self.trades.metadata, self.trades.metadata.current_snapshot_id, self.trades.io)
            self.gaps.refresh()
            try:
                return reconcile()
            except (CommitFailedException, ValidationException):
                if attempt == attempts - 1:
                    raise
                time.sleep(random.uniform(0.05, 0.5))
