"""What a query may ask for: the allowlists, the checks of every argument, and the errors they raise."""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import date, datetime
from typing import Any

import pyarrow as pa

from k2_assets.core import schemas, snapshots
from k2_assets.core.checks import EXCHANGES

MAX_LIMIT = 100_000
DEFAULT_TRADES_LIMIT = 1_000
DEFAULT_BARS_LIMIT = 10_000
MAX_LISTED_SYMBOLS = 20
INTERVALS: dict[str, str] = {interval: f"ohlcv_{interval}" for interval in schemas.INTERVALS}

# Columns returned when the caller does not choose; any column of the table's schema may be chosen.
TRADE_COLUMNS = (
    "exchange",
    "symbol",
    "exchange_timestamp",
    "trade_date",
    "price",
    "quantity",
    "side",
    "currency",
    "trade_id",
    "source_sequence",
    "trade_conditions",
    "venue",
    "message_id",
)
BAR_COLUMNS = (
    "exchange",
    "symbol",
    "interval",
    "bar_start",
    "trade_date",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "quote_volume",
    "vwap",
    "trade_count",
    "taker_buy_volume",
    "taker_buy_quote_volume",
    "filled",
)
# Tables symbols() may list (they have exchange, symbol and trade_date columns).
SYMBOL_TABLES = ("trades", "quotes", *INTERVALS.values())
MEMORY_LIMIT = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)


class QueryError(ValueError):
    """A query K2 will not run as asked; the message says what is wrong and what is allowed."""


class UnknownExchange(QueryError):
    """An exchange K2 does not load."""


class UnknownInterval(QueryError):
    """A bar interval K2 does not roll up."""


class UnknownSymbol(QueryError):
    """A symbol the table holds no row of."""


class UnknownSnapshot(QueryError):
    """An as_of that names no snapshot of the table."""


class UnknownColumn(QueryError):
    """A column the table does not have."""


class InvalidTimeRange(QueryError):
    """A time or date range that is reversed or empty."""


class InvalidLimit(QueryError):
    """A row limit that is not an integer in 1..MAX_LIMIT."""


class InvalidValue(QueryError):
    """A value of the wrong type or format (a time that is not ISO 8601, a bad memory limit, ...)."""


class QueryTimeout(QueryError):
    """The query ran longer than its timeout and was cancelled."""


def parse_time(value: Any, what: str) -> datetime:
    """`snapshots.parse_utc`, its error as the query's InvalidValue."""
    try:
        return snapshots.parse_utc(value, what)
    except ValueError as exc:
        raise InvalidValue(str(exc)) from None


def parse_as_of(value: Any) -> int | datetime:
    """`snapshots.parse_as_of`, its error as the query's InvalidValue."""
    try:
        return snapshots.parse_as_of(value, "as_of")
    except ValueError as exc:
        raise InvalidValue(str(exc)) from None


def parse_date(value: Any, what: str) -> date:
    """A date or a YYYY-MM-DD string as a date (a datetime is refused: a session date has no time)."""
    if isinstance(value, datetime):
        raise InvalidValue(f"{what} must be a date (YYYY-MM-DD), not a datetime ({value.isoformat()})")
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            raise InvalidValue(f"{what} {value!r} is not a YYYY-MM-DD date") from None
    raise InvalidValue(f"{what} must be a date or a YYYY-MM-DD string, not {type(value).__name__}")


def valid_exchange(value: str | None) -> str | None:
    """The exchange in upper case, if K2 loads it."""
    if value is None:
        return None
    if not isinstance(value, str) or value.strip().upper() not in EXCHANGES:
        raise UnknownExchange(f"unknown exchange {value!r}; K2 exchanges are {', '.join(sorted(EXCHANGES))}")
    return value.strip().upper()


def valid_symbol(value: str | None) -> str | None:
    """The symbol in upper case (whether the table holds it is the engine's check)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidValue(f"symbol must be a string, not {type(value).__name__}")
    return value.strip().upper()


def valid_limit(value: Any) -> int:
    """The row limit, an integer in 1..MAX_LIMIT."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidLimit(f"limit must be an integer in 1..{MAX_LIMIT:,}, not {value!r}")
    if not 1 <= value <= MAX_LIMIT:
        raise InvalidLimit(f"limit must be in 1..{MAX_LIMIT:,}, not {value:,}")
    return value


def valid_time_range(start: Any, end: Any) -> tuple[datetime | None, datetime | None]:
    """[start, end) as UTC datetimes (either may be open), start before end."""
    start_t = parse_time(start, "start") if start is not None else None
    end_t = parse_time(end, "end") if end is not None else None
    if start_t is not None and end_t is not None and start_t >= end_t:
        raise InvalidTimeRange(
            f"time range is reversed or empty: start {start_t.isoformat()} is not before end {end_t.isoformat()} "
            "(the range is [start, end), UTC)"
        )
    return start_t, end_t


def valid_columns(chosen: Iterable[str] | str | None, default: tuple[str, ...], schema: pa.Schema, table: str) -> tuple[str, ...]:
    """The chosen columns (a list, or one comma-separated string), each a column of `schema`; `default` if none chosen."""
    if chosen is None:
        return default
    if isinstance(chosen, str):
        chosen = [c.strip() for c in chosen.split(",") if c.strip()]
    chosen = tuple(chosen)
    allowed = schema.names
    unknown = [c for c in chosen if c not in allowed]
    if unknown or not chosen:
        raise UnknownColumn(f"unknown column(s) {unknown} for market.{table}; its columns are {', '.join(allowed)}")
    return chosen
