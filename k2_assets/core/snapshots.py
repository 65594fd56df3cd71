"""Time travel: ISO 8601 times as UTC, "as of" values (a snapshot id or a time), and the snapshot current at a time."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import Any


def parse_utc(value: Any, what: str) -> datetime:
    """A datetime or ISO 8601 string (a date alone is midnight) as an aware UTC datetime; naive means UTC.
    ValueError, in one line, for anything else."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"{what} {value!r} is not an ISO 8601 date/time (e.g. 2014-03-11T10:00:00Z)") from None
    else:
        # ValueError for every bad value, whatever its type: callers report it to the user as one.
        raise ValueError(f"{what} must be a datetime or an ISO 8601 string, not {type(value).__name__}")  # noqa: TRY004
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def parse_as_of(value: Any, what: str = "as_of") -> int | datetime:
    """An "as of" value as a snapshot id (an int, or a string of nine or more digits) or else a time (as parse_utc reads it)."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a snapshot id or a time, not {value!r}")  # noqa: TRY004
    if isinstance(value, int):
        return value
    # Snapshot ids are long random numbers; eight digits could be a basic ISO date (20140311), so that is read as one.
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d{9,}\s*", value):
        return int(value)
    return parse_utc(value, what)


def snapshot_at(table, moment: datetime):
    """The snapshot of `table` that was current at `moment`, or None if the table is younger."""
    return table.snapshot_as_of_timestamp(int(moment.timestamp() * 1000))


def bars_and_their_trades(bars_table, trades_table, day: date, bars_snapshot_id: int | None, columns=None):
    """A day's bars (at `bars_snapshot_id`, else current) and the day's trades at the snapshot those bars were
    computed from (their source_snapshot_id), `columns` only; no trades when the day has no bars from trades."""
    from pyiceberg.expressions import EqualTo

    where = EqualTo("trade_date", day.isoformat())
    bars = bars_table.scan(row_filter=where, snapshot_id=bars_snapshot_id).to_arrow()
    sources = [s for s in set(bars.column("source_snapshot_id").to_pylist()) if s]
    if not sources:
        return bars, None
    scan = trades_table.scan(row_filter=where, snapshot_id=max(sources), **({"selected_fields": columns} if columns else {}))
    return bars, scan.to_arrow()
