"""Time travel: ISO 8601 times as UTC, and the Iceberg snapshot that was current at a time."""

from __future__ import annotations

from datetime import date, datetime, timezone
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
        raise ValueError(f"{what} must be a datetime or an ISO 8601 string, not {type(value).__name__}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def snapshot_at(table, moment: datetime):
    """The snapshot of `table` that was current at `moment`, or None if the table is younger."""
    return table.snapshot_as_of_timestamp(int(moment.timestamp() * 1000))
