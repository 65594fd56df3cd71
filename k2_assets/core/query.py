"""Analyst queries over K2's Iceberg tables: trades, OHLCV bars, symbols and daily summaries.

    engine = QueryEngine(open_catalog(uri, warehouse))
    engine.trades(exchange="ASX", symbol="BHP", start="2014-03-11T00:00+11:00", end="2014-03-12T00:00+11:00")
    engine.bars("5m", exchange="BINANCE", symbol="BTCUSDT", start=..., end=...)
    engine.symbols(exchange="ASX", as_of="2024-06-01T00:00:00Z")
    engine.daily_summary(exchange="ASX", start_date="2014-03-10", end_date="2014-03-14")

Every query returns a pyarrow Table (`to_pandas(table)` or `engine.pandas("trades", ...)` for a
DataFrame). Times are UTC: `start`/`end` are datetimes or ISO 8601 strings (no offset means UTC), the
range is [start, end). `as_of` reads an older version of the table: an Iceberg snapshot id, or a time
(datetime / ISO string), meaning the snapshot that was current then according to the snapshot log.

Decision: how DuckDB reads Iceberg
    pyiceberg plans and reads the scan, with the row filter pushed down to partitions and file
    statistics (exchange and trade_date are partition columns; symbol prunes by the sorted files'
    bounds), into Arrow; DuckDB then runs the SQL over that Arrow table. This works with any DuckDB
    version and needs nothing downloaded at run time. DuckDB's own `iceberg` extension would be
    downloaded on first use (and the offline PyPI wheel of it pins duckdb 1.5.5), so it is not used.
    The price is that an Iceberg scan is not interruptible and reads whole partitions' columns; this
    is why scans are cached (below) and queries only pay DuckDB's time when warm.

How a query runs
    The Iceberg scan applies exchange, symbol and trade_date exactly (the partition filter; for
    trades/bars given start/end, the trade_date range is derived exactly from each exchange's time
    zone, e.g. ASX sessions are Sydney dates). Row queries (trades, bars) are then late-materialized:
    the cached scan is kept sorted in the query order and numbered, DuckDB evaluates the time range,
    ORDER BY and LIMIT over just the time and row-number columns and returns row numbers, and the
    requested columns are taken from Arrow by them (a zero-copy slice when they are consecutive, the
    usual case). Wide columns (lists, maps, strings) never pass through DuckDB, which is what keeps a
    warm 20k-row query in single-digit milliseconds. Aggregates (symbols, daily_summary) run wholly
    in DuckDB.

Caching and freshness
    Scanned Arrow data is kept in an LRU bounded by bytes (default 512 MB), keyed by (table,
    snapshot id, partition filter, columns): a snapshot never changes, so an entry never goes stale,
    and a query on the same snapshot skips the Iceberg scan. Table metadata is reloaded from the
    catalog at most every `refresh_ms` (default 1000 ms), so a new commit is visible within that time
    (`engine.refresh()` forces it). The symbol sets used to validate `symbol` are cached the same way.

Safety
    Every value (symbol, exchange, times, dates, limit) is bound as a DuckDB parameter (`$name`) and
    never formatted into SQL; table, interval, exchange and column names only come from allowlists.
    The DuckDB connection (one per engine, a cursor per query, so queries can run from several
    threads) has file system access, Python replacement scans and extension auto-install disabled,
    a memory limit (default 1GB), a thread limit, and then its configuration locked. Each query runs
    under a timeout (default 10 s): a watchdog thread calls `interrupt()` on the query's cursor and
    the caller gets `QueryTimeout`. Bad input raises a `QueryError` (a ValueError) saying what is
    wrong and what is allowed: unknown exchange, interval, column or snapshot, a symbol absent from
    the table (the message lists the symbols that exist, up to 20), a reversed time range, a limit
    outside 1..100,000.

A symbol is "unknown" when the table holds no row of it for the exchange filter (any exchange when
none is given) in the snapshot read; a known symbol with no rows in the time range gives an empty
table, not an error.

Command line: `python -m k2_assets.core.query trades|bars|symbols|summary ...` (`--help`), using the
catalog from the K2_* environment (Settings.from_env). Errors print one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Iterable
from zoneinfo import ZoneInfo

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import NoSuchTableError
from pyiceberg.expressions import AlwaysTrue, And, BooleanExpression, EqualTo, GreaterThanOrEqual, LessThanOrEqual
from pyiceberg.table import Table

from k2_assets.core import catalog as k2_catalog
from k2_assets.core import schemas, snapshots
from k2_assets.core.checks import EXCHANGES

__all__ = [
    "QueryEngine",
    "QueryError",
    "QueryTimeout",
    "UnknownExchange",
    "UnknownInterval",
    "UnknownSymbol",
    "UnknownSnapshot",
    "UnknownColumn",
    "InvalidTimeRange",
    "InvalidLimit",
    "InvalidValue",
    "INTERVALS",
    "MAX_LIMIT",
    "to_pandas",
    "main",
]

UTC = timezone.utc
MAX_LIMIT = 100_000
DEFAULT_TRADES_LIMIT = 1_000
DEFAULT_BARS_LIMIT = 10_000
MAX_LISTED_SYMBOLS = 20
INTERVALS: dict[str, str] = {interval: f"ohlcv_{interval}" for interval in schemas.INTERVALS}

# Columns returned when the caller does not choose; any column of the table's schema may be chosen.
TRADE_COLUMNS = (
    "exchange", "symbol", "exchange_timestamp", "trade_date", "price", "quantity", "side", "currency",
    "trade_id", "source_sequence", "trade_conditions", "venue", "message_id",
)
BAR_COLUMNS = (
    "exchange", "symbol", "interval", "bar_start", "trade_date", "open", "high", "low", "close", "volume",
    "quote_volume", "vwap", "trade_count", "taker_buy_volume", "taker_buy_quote_volume", "filled",
)
# Tables symbols() may list (they have exchange, symbol and trade_date columns).
SYMBOL_TABLES = ("trades", "quotes", *INTERVALS.values())
_MEMORY_LIMIT = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)


# ---------------------------------------------------------------- errors


class QueryError(ValueError):
    """A query K2 will not run as asked; the message says what is wrong and what is allowed."""


class UnknownExchange(QueryError):
    pass


class UnknownInterval(QueryError):
    pass


class UnknownSymbol(QueryError):
    pass


class UnknownSnapshot(QueryError):
    pass


class UnknownColumn(QueryError):
    pass


class InvalidTimeRange(QueryError):
    pass


class InvalidLimit(QueryError):
    pass


class InvalidValue(QueryError):
    """A value of the wrong type or format (a time that is not ISO 8601, a bad memory limit, ...)."""


class QueryTimeout(QueryError):
    """The query ran longer than its timeout and was cancelled."""


# ---------------------------------------------------------------- value parsing


def parse_time(value: Any, what: str) -> datetime:
    """`snapshots.parse_utc`, its error as the query's InvalidValue."""
    try:
        return snapshots.parse_utc(value, what)
    except ValueError as exc:
        raise InvalidValue(str(exc)) from None


def parse_date(value: Any, what: str) -> date:
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


def _exchange(value: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value.strip().upper() not in EXCHANGES:
        raise UnknownExchange(f"unknown exchange {value!r}; K2 exchanges are {', '.join(sorted(EXCHANGES))}")
    return value.strip().upper()


def _symbol(value: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidValue(f"symbol must be a string, not {type(value).__name__}")
    return value.strip().upper()


def _limit(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidLimit(f"limit must be an integer in 1..{MAX_LIMIT:,}, not {value!r}")
    if not 1 <= value <= MAX_LIMIT:
        raise InvalidLimit(f"limit must be in 1..{MAX_LIMIT:,}, not {value:,}")
    return value


def _time_range(start: Any, end: Any) -> tuple[datetime | None, datetime | None]:
    start_t = parse_time(start, "start") if start is not None else None
    end_t = parse_time(end, "end") if end is not None else None
    if start_t is not None and end_t is not None and start_t >= end_t:
        raise InvalidTimeRange(
            f"time range is reversed or empty: start {start_t.isoformat()} is not before end {end_t.isoformat()} "
            "(the range is [start, end), UTC)"
        )
    return start_t, end_t


def _columns(chosen: Iterable[str] | None, default: tuple[str, ...], schema: pa.Schema, table: str) -> tuple[str, ...]:
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


def _session_dates(exchange: str | None, start: datetime | None, end: datetime | None) -> tuple[date | None, date | None]:
    """The trade_date partitions that can hold exchange times in [start, end): each exchange's session
    date is its local date (ASX: Sydney, BINANCE: UTC), so the bounds are exact, not padded."""
    zones = [ZoneInfo(EXCHANGES[exchange])] if exchange else [ZoneInfo(z) for z in EXCHANGES.values()]
    lo = min(start.astimezone(z).date() for z in zones) if start is not None else None
    hi = max((end - timedelta(microseconds=1)).astimezone(z).date() for z in zones) if end is not None else None
    return lo, hi


def _quote(identifier: str) -> str:
    """Quote an identifier that has already been checked against an allowlist."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", identifier):
        raise AssertionError(f"identifier {identifier!r} did not come from an allowlist")
    return f'"{identifier}"'


# ---------------------------------------------------------------- scan scope and cache


@dataclass(frozen=True)
class Scope:
    """What the Iceberg scan reads: the partition filter pushed down to pyiceberg (and the cache key)."""

    exchange: str | None = None
    date_lo: date | None = None
    date_hi: date | None = None
    symbol: str | None = None

    def expression(self) -> BooleanExpression:
        parts: list[BooleanExpression] = []
        if self.exchange is not None:
            parts.append(EqualTo("exchange", self.exchange))
        if self.date_lo is not None and self.date_lo == self.date_hi:
            parts.append(EqualTo("trade_date", self.date_lo.isoformat()))
        else:
            if self.date_lo is not None:
                parts.append(GreaterThanOrEqual("trade_date", self.date_lo.isoformat()))
            if self.date_hi is not None:
                parts.append(LessThanOrEqual("trade_date", self.date_hi.isoformat()))
        if self.symbol is not None:
            parts.append(EqualTo("symbol", self.symbol))
        if not parts:
            return AlwaysTrue()
        expr = parts[0]
        for part in parts[1:]:
            expr = And(expr, part)
        return expr


class ArrowCache:
    """An LRU of Arrow tables bounded by their total size in bytes; thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Any, tuple[pa.Table, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key) -> pa.Table | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key, table: pa.Table) -> None:
        size = table.get_total_buffer_size()
        if size > self.max_bytes:
            return  # larger than the whole cache: used once, not kept
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (table, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def info(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "entries": len(self._entries), "bytes": self._bytes,
                    "max_bytes": self.max_bytes}


# ---------------------------------------------------------------- timeouts


class _Watch:
    __slots__ = ("deadline", "cursor", "fired")

    def __init__(self, deadline: float, cursor):
        self.deadline = deadline
        self.cursor = cursor
        self.fired = False


class _Watchdog:
    """One long-lived thread per engine that interrupts the cursors of queries past their deadline.

    (A thread or Timer per query costs a thread start each time, which on a busy machine is
    milliseconds.) A due query is interrupted again every 50 ms until it ends, since an interrupt
    that lands before DuckDB has started the query is lost.
    """

    REPEAT_S = 0.05

    def __init__(self):
        self._cond = threading.Condition()
        self._active: dict[int, _Watch] = {}
        self._wake_at = float("inf")
        self._thread: threading.Thread | None = None
        self._stopped = False

    def watch(self, cursor, timeout_s: float) -> _Watch:
        entry = _Watch(time.monotonic() + timeout_s, cursor)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="k2-query-watchdog", daemon=True)
                self._thread.start()
            self._active[id(entry)] = entry
            if entry.deadline < self._wake_at:
                self._cond.notify()
        return entry

    def done(self, entry: _Watch) -> None:
        with self._cond:
            self._active.pop(id(entry), None)

    def stop(self) -> None:
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
                        try:
                            entry.cursor.interrupt()
                        except Exception:  # the cursor closed meanwhile
                            pass
                        wake = min(wake, now + self.REPEAT_S)
                    else:
                        wake = min(wake, entry.deadline)
                self._wake_at = wake
                self._cond.wait(None if wake == float("inf") else wake - now)
                self._wake_at = float("inf")


# ---------------------------------------------------------------- the engine

ROW_ID = "__row"  # position of a row in a cached scan: DuckDB returns these, Arrow then takes the rows
TRADE_ORDER = ("exchange_timestamp", "exchange", "symbol", "source_sequence")
BAR_ORDER = ("bar_start", "exchange", "symbol")


class QueryEngine:
    """Queries over one catalog's `market` tables: one DuckDB connection, cached table handles and scans.

    Row queries (trades, bars) are late-materialized: DuckDB evaluates the WHERE, ORDER BY and LIMIT
    over the narrow columns they need and returns row positions; the engine then takes those rows of
    the requested columns from the cached Arrow scan (a zero-copy slice when they are contiguous, the
    usual case since cached scans are stored in the queries' order). Aggregates (symbols,
    daily_summary) run wholly in DuckDB.
    """

    def __init__(self, catalog: Catalog, *, timeout_s: float = 10.0, memory_limit: str = "1GB", threads: int | None = None,
                 cache_bytes: int = 512 * 1024 * 1024, refresh_ms: float = 1000.0):
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise InvalidValue(f"timeout_s must be a positive number of seconds, not {timeout_s!r}")
        if not isinstance(memory_limit, str) or not _MEMORY_LIMIT.match(memory_limit):
            raise InvalidValue(f"memory_limit {memory_limit!r} is not a size such as '512MB' or '1GB'")
        threads = threads if threads is not None else max(1, min(4, os.cpu_count() or 1))
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise InvalidValue(f"threads must be a positive integer, not {threads!r}")
        if isinstance(refresh_ms, bool) or not isinstance(refresh_ms, (int, float)) or refresh_ms < 0:
            raise InvalidValue(f"refresh_ms must be a number >= 0, not {refresh_ms!r}")
        self.catalog = catalog
        self.timeout_s = float(timeout_s)
        self.memory_limit = memory_limit.strip()
        self.threads = threads
        self.refresh_s = refresh_ms / 1000.0
        self._cache = ArrowCache(cache_bytes)
        self._symbol_sets: dict[tuple, frozenset[str]] = {}
        self._tables: dict[str, tuple[Table | None, float]] = {}
        self._tables_lock = threading.Lock()
        self._watchdog = _Watchdog()
        self._con = duckdb.connect(":memory:", config={
            "threads": threads,
            "memory_limit": self.memory_limit,
            "enable_external_access": False,  # no file or network reads from SQL
            "python_enable_replacements": False,  # SQL never sees Python variables, only registered tables
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
        })
        self._con.execute("SET TimeZone = 'UTC'")
        self._con.execute("SET lock_configuration = true")
        self._closed = False
        # Close the connection even if the caller never does (DuckDB complains at exit otherwise).
        self._finalizer = weakref.finalize(self, _close_quietly, self._con, self._watchdog)

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._finalizer()
            self._cache.clear()

    def __enter__(self) -> "QueryEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def refresh(self) -> None:
        """Forget the loaded table metadata: the next query sees the catalog's current snapshots."""
        with self._tables_lock:
            self._tables.clear()

    def cache_info(self) -> dict:
        return self._cache.info()

    # ------------------------------------------------------------ public queries

    def trades(self, exchange: str | None = None, symbol: str | None = None, start=None, end=None, as_of=None,
               limit: int = DEFAULT_TRADES_LIMIT, *, trade_date=None, columns: Iterable[str] | None = None) -> pa.Table:
        """Trades with exchange time in [start, end), oldest first (then by exchange, symbol, sequence), at most `limit`.

        `trade_date` (optional) restricts to one session date of the exchange (ASX: the Sydney date);
        `columns` chooses columns of market.trades (default: TRADE_COLUMNS).
        """
        exchange, symbol, limit = _exchange(exchange), _symbol(symbol), _limit(limit)
        start_t, end_t = _time_range(start, end)
        session = parse_date(trade_date, "trade_date") if trade_date is not None else None
        cols = _columns(columns, TRADE_COLUMNS, schemas.arrow_schema(schemas.TRADE), "trades")
        scope = _scope(exchange, symbol, start_t, end_t, session)
        return self._rows("trades", schemas.TRADE, scope, as_of, "exchange_timestamp", start_t, end_t, TRADE_ORDER, limit, cols)

    def bars(self, interval: str = "1m", exchange: str | None = None, symbol: str | None = None, start=None, end=None,
             as_of=None, limit: int = DEFAULT_BARS_LIMIT, *, trade_date=None, columns: Iterable[str] | None = None) -> pa.Table:
        """OHLCV bars of `interval` (1m, 5m, 1h, 1d) with bar_start in [start, end), oldest first, at most `limit`."""
        if not isinstance(interval, str) or interval not in INTERVALS:
            raise UnknownInterval(f"unknown interval {interval!r}; allowed intervals are {', '.join(INTERVALS)}")
        table = INTERVALS[interval]
        exchange, symbol, limit = _exchange(exchange), _symbol(symbol), _limit(limit)
        start_t, end_t = _time_range(start, end)
        session = parse_date(trade_date, "trade_date") if trade_date is not None else None
        cols = _columns(columns, BAR_COLUMNS, schemas.arrow_schema(schemas.OHLCV), table)
        scope = _scope(exchange, symbol, start_t, end_t, session)
        return self._rows(table, schemas.OHLCV, scope, as_of, "bar_start", start_t, end_t, BAR_ORDER, limit, cols)

    def symbols(self, exchange: str | None = None, as_of=None, *, table: str = "trades") -> pa.Table:
        """Symbols present in `table` (default trades): exchange, symbol, first/last trade_date and row count."""
        if table not in SYMBOL_TABLES:
            raise QueryError(f"symbols() lists the tables {', '.join(SYMBOL_TABLES)}, not {table!r}")
        exchange = _exchange(exchange)
        where, params = _filters(exchange, None, None, None, "", None)
        sql = (
            "SELECT exchange, symbol, min(trade_date) AS first_date, max(trade_date) AS last_date, count(*) AS row_count "
            f"FROM src{_where(where)} GROUP BY exchange, symbol ORDER BY exchange, symbol"
        )
        handle = self._table(table)
        snapshot_id = self._snapshot_id(handle, table, as_of)
        data = self._scan(handle, table, TABLES_SCHEMA[table], snapshot_id, Scope(exchange), ("exchange", "symbol", "trade_date"))
        return _utc(self._execute(sql, params, data))

    def daily_summary(self, exchange: str | None = None, symbol: str | None = None, *, start_date, end_date,
                      as_of=None) -> pa.Table:
        """Per session date and symbol: trades, volume, first/last time, open/high/low/close.

        Open and close are the prices of the first and last trade by (exchange time, sequence);
        `start_date`..`end_date` are session dates (trade_date), both included.
        """
        exchange, symbol = _exchange(exchange), _symbol(symbol)
        lo, hi = parse_date(start_date, "start_date"), parse_date(end_date, "end_date")
        if lo > hi:
            raise InvalidTimeRange(f"date range is reversed: start_date {lo} is after end_date {hi}")
        where, params = _filters(exchange, symbol, None, None, "", None)
        where.append("trade_date BETWEEN $start_date AND $end_date")
        params.update(start_date=lo, end_date=hi)
        sql = (
            "SELECT trade_date, exchange, symbol, count(*) AS trades, sum(quantity) AS volume, "
            "min(exchange_timestamp) AS first_time, max(exchange_timestamp) AS last_time, "
            "first(price ORDER BY exchange_timestamp, source_sequence) AS open, max(price) AS high, min(price) AS low, "
            "first(price ORDER BY exchange_timestamp DESC, source_sequence DESC) AS close "
            f"FROM src{_where(where)} GROUP BY trade_date, exchange, symbol ORDER BY trade_date, exchange, symbol"
        )
        handle = self._table("trades")
        snapshot_id = self._snapshot_id(handle, "trades", as_of)
        if symbol is not None:
            self._check_symbol(handle, "trades", schemas.TRADE, snapshot_id, exchange, symbol)
        columns = ("exchange", "symbol", "trade_date", "exchange_timestamp", "source_sequence", "price", "quantity")
        data = self._scan(handle, "trades", schemas.TRADE, snapshot_id, Scope(exchange, lo, hi, symbol), columns)
        return _utc(self._execute(sql, params, data))

    def pandas(self, query: str, *args, exact: bool = False, **kwargs):
        """Run `query` (trades, bars, symbols or daily_summary) and return a pandas DataFrame (see to_pandas)."""
        methods = {"trades": self.trades, "bars": self.bars, "symbols": self.symbols, "daily_summary": self.daily_summary}
        if query not in methods:
            raise QueryError(f"unknown query {query!r}; queries are {', '.join(methods)}")
        return to_pandas(methods[query](*args, **kwargs), exact=exact)

    # ------------------------------------------------------------ internals

    def _rows(self, table: str, schema_name: str, scope: Scope, as_of, time_column: str, start: datetime | None,
              end: datetime | None, order: tuple[str, ...], limit: int, columns: tuple[str, ...]) -> pa.Table:
        """A row query, late-materialized.

        The Iceberg scan applies exchange, symbol and trade_date exactly (pyiceberg filters rows, not
        only files), and the cached scan is sorted by `order` and numbered in ROW_ID. DuckDB then
        applies the time range, the order (ORDER BY ROW_ID is ORDER BY `order`) and the limit over
        just those two columns, and returns row numbers; the requested columns are taken by them.
        """
        handle = self._table(table)
        snapshot_id = self._snapshot_id(handle, table, as_of)
        if scope.symbol is not None:
            self._check_symbol(handle, table, schema_name, snapshot_id, scope.exchange, scope.symbol)
        data = self._scan(handle, table, schema_name, snapshot_id, scope, ("*",), order=order)
        sql, params = row_query(time_column, start, end, limit)
        positions = self._execute(sql, params, data.select([time_column, ROW_ID])).column(0)
        return _take(data.select(list(columns)), positions)

    def _table(self, name: str, *, force: bool = False) -> Table | None:
        """The table handle, reloaded from the catalog when older than refresh_ms; None if the table does not exist."""
        now = time.monotonic()
        if not force:
            entry = self._tables.get(name)
            if entry is not None and now - entry[1] < self.refresh_s:
                return entry[0]
        try:
            handle: Table | None = self.catalog.load_table(k2_catalog.table_identifier(name))
        except NoSuchTableError:
            handle = None
        with self._tables_lock:
            self._tables[name] = (handle, now)
        return handle

    def _snapshot_id(self, handle: Table | None, name: str, as_of) -> int | None:
        """The snapshot to read: the current one, or the one `as_of` names (id) or was current at (time)."""
        if as_of is None:
            current = handle.current_snapshot() if handle is not None else None
            return current.snapshot_id if current is not None else None
        if isinstance(as_of, bool):
            raise InvalidValue(f"as_of must be a snapshot id or a time, not {as_of!r}")
        if isinstance(as_of, str) and re.fullmatch(r"\s*-?\d{9,}\s*", as_of):
            as_of = int(as_of)
        if isinstance(as_of, int):
            if handle is None or handle.snapshot_by_id(as_of) is None:
                handle = self._table(name, force=True)  # perhaps committed since the last refresh
            if handle is None or handle.snapshot_by_id(as_of) is None:
                raise UnknownSnapshot(f"snapshot {as_of} does not exist in market.{name}; {_describe_snapshots(handle)}")
            return as_of
        moment = parse_time(as_of, "as_of")
        snapshot = snapshots.snapshot_at(handle, moment) if handle is not None else None
        if snapshot is None:
            raise UnknownSnapshot(
                f"as_of {moment.isoformat()} is before the first snapshot of market.{name}; {_describe_snapshots(handle)}"
            )
        return snapshot.snapshot_id

    def _scan(self, handle: Table | None, name: str, schema_name: str, snapshot_id: int | None, scope: Scope,
              columns: tuple[str, ...], *, order: tuple[str, ...] = ()) -> pa.Table:
        """The Arrow data of `scope` at `snapshot_id`, from the cache or an Iceberg scan (then cached).

        With `order`, the rows are sorted by it and numbered in ROW_ID.
        """
        key = (name, snapshot_id, scope, columns, order)
        data = self._cache.get(key) if snapshot_id is not None else None
        if data is not None:
            return data
        if handle is None or snapshot_id is None:
            schema = schemas.arrow_schema(schema_name)
            data = (schema if columns == ("*",) else pa.schema([schema.field(c) for c in columns])).empty_table()
        else:
            data = handle.scan(row_filter=scope.expression(), snapshot_id=snapshot_id, selected_fields=columns).to_arrow()
        if order:
            data = data.sort_by([(c, "ascending") for c in order]) if data.num_rows else data
            data = data.combine_chunks().append_column(ROW_ID, pa.array(np.arange(data.num_rows, dtype=np.int64)))
        if snapshot_id is not None:
            self._cache.put(key, data)
        return data

    def _check_symbol(self, handle, name: str, schema_name: str, snapshot_id: int | None, exchange: str | None,
                      symbol: str) -> None:
        key = (name, snapshot_id, exchange)
        known = self._symbol_sets.get(key)
        if known is None:
            data = self._scan(handle, name, schema_name, snapshot_id, Scope(exchange), ("exchange", "symbol"))
            known = frozenset(pc.unique(data.column("symbol")).to_pylist()) if data.num_rows else frozenset()
            if len(self._symbol_sets) > 1024:
                self._symbol_sets.clear()
            self._symbol_sets[key] = known
        if symbol not in known:
            where = f" on {exchange}" if exchange else ""
            listed = sorted(known)
            shown = ", ".join(listed[:MAX_LISTED_SYMBOLS])
            if len(listed) > MAX_LISTED_SYMBOLS:
                shown += f", ... ({len(listed)} in all)"
            raise UnknownSymbol(
                f"unknown symbol {symbol!r}: market.{name} has no rows of it{where}"
                + (f"; symbols present: {shown}" if listed else "; the table holds no symbols there")
            )

    def _execute(self, sql: str, params: dict[str, Any] | None, data: pa.Table | None, *,
                 timeout_s: float | None = None) -> pa.Table:
        """Run `sql` (over `data` registered as `src`) on a fresh cursor under the timeout; the result as Arrow.

        Internal: `sql` must be built from allowlisted identifiers, every value passed in `params`.
        """
        if self._closed:
            raise QueryError("the query engine is closed")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        cursor = self._con.cursor()
        try:
            if data is not None:
                cursor.register("src", data)
            watch = self._watchdog.watch(cursor, timeout)
            try:
                return cursor.sql(sql, params=params or None).to_arrow_table()
            except duckdb.InterruptException:
                if watch.fired:
                    raise QueryTimeout(f"query cancelled after its {timeout:g} s timeout") from None
                raise QueryError("query was interrupted") from None
            except duckdb.OutOfMemoryException as exc:
                reason = str(exc).splitlines()[0]
                raise QueryError(f"query needs more than the memory limit {self.memory_limit}: {reason}") from None
            finally:
                self._watchdog.done(watch)
        finally:
            cursor.close()


def _close_quietly(con, watchdog: _Watchdog) -> None:
    watchdog.stop()
    try:
        con.close()
    except Exception:
        pass


def _scope(exchange, symbol, start, end, session) -> Scope:
    lo, hi = _session_dates(exchange, start, end)
    if session is not None:
        lo = session if lo is None else max(lo, session)
        hi = session if hi is None else min(hi, session)
    return Scope(exchange, lo, hi, symbol)


def _filters(exchange, symbol, start, end, time_column: str, session) -> tuple[list[str], dict[str, Any]]:
    """SQL conditions (constant text) and their parameter values."""
    where: list[str] = []
    params: dict[str, Any] = {}
    if exchange is not None:
        where.append("exchange = $exchange")
        params["exchange"] = exchange
    if symbol is not None:
        where.append("symbol = $symbol")
        params["symbol"] = symbol
    if start is not None:
        where.append(f"{_quote(time_column)} >= $start")
        params["start"] = start
    if end is not None:
        where.append(f"{_quote(time_column)} < $end")
        params["end"] = end
    if session is not None:
        where.append("trade_date = $trade_date")
        params["trade_date"] = session
    return where, params


def row_query(time_column: str, start: datetime | None, end: datetime | None, limit: int) -> tuple[str, dict[str, Any]]:
    """The SQL (and its parameters) a row query runs over a cached scan's time and ROW_ID columns."""
    where, params = _filters(None, None, start, end, time_column, None)
    params["limit"] = limit
    return f"SELECT {_quote(ROW_ID)} FROM src{_where(where)} ORDER BY {_quote(ROW_ID)} LIMIT $limit", params


def _take(data: pa.Table, positions: pa.ChunkedArray) -> pa.Table:
    """Rows of `data` at `positions`: a zero-copy slice when they are consecutive, else a take."""
    pos = positions.to_numpy()
    n = len(pos)
    if n == 0:
        return data.slice(0, 0)
    first = int(pos[0])
    if int(pos[-1]) - first == n - 1 and (n == 1 or bool(np.all(np.diff(pos) == 1))):
        return data.slice(first, n)
    return data.take(pa.array(pos))


TABLES_SCHEMA = {name: definition.schema for name, definition in k2_catalog.TABLES.items()}


def _where(clauses: list[str]) -> str:
    return (" WHERE " + " AND ".join(clauses)) if clauses else ""


def _utc(table: pa.Table) -> pa.Table:
    """DuckDB labels its UTC results 'Etc/UTC'; K2's tables say 'UTC'."""
    fields = [
        pa.field(f.name, pa.timestamp(f.type.unit, tz="UTC"), f.nullable) if pa.types.is_timestamp(f.type) and f.type.tz else f
        for f in table.schema
    ]
    schema = pa.schema(fields)
    return table if schema.equals(table.schema) else table.cast(schema)


def _describe_snapshots(handle: Table | None) -> str:
    if handle is None or not handle.metadata.snapshots:
        return "the table has no snapshots yet"
    history = handle.history()
    first = datetime.fromtimestamp(history[0].timestamp_ms / 1000, UTC) if history else None
    newest = sorted(handle.metadata.snapshots, key=lambda s: s.timestamp_ms, reverse=True)[:MAX_LISTED_SYMBOLS]
    ids = ", ".join(str(s.snapshot_id) for s in newest)
    return (f"first snapshot at {first.isoformat()}; " if first else "") + f"recent snapshot ids (newest first): {ids}"


# ---------------------------------------------------------------- pandas


def to_pandas(table: pa.Table, *, exact: bool = False):
    """The table as a pandas DataFrame; decimals become float64 unless `exact` (then Python Decimals)."""
    if not exact:
        fields = [pa.field(f.name, pa.float64(), f.nullable) if pa.types.is_decimal(f.type) else f for f in table.schema]
        table = table.cast(pa.schema(fields))
    return table.to_pandas()


# ---------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--as-of", help="snapshot id, or a time (ISO 8601, UTC unless an offset is given)")
    common.add_argument("--format", choices=("table", "csv", "json"), default="table")
    common.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    common.add_argument("--memory-limit", default="1GB")

    ranged = _Parser(add_help=False)
    ranged.add_argument("--exchange")
    ranged.add_argument("--symbol")
    ranged.add_argument("--start", help="ISO 8601 time, inclusive (UTC unless an offset is given)")
    ranged.add_argument("--end", help="ISO 8601 time, exclusive")
    ranged.add_argument("--trade-date", help="one session date, YYYY-MM-DD")
    ranged.add_argument("--columns", help="comma-separated column names")

    parser = _Parser(prog="k2 query",
                     description="Query K2's Iceberg tables (catalog from the K2_* environment).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    trades = sub.add_parser("trades", parents=[common, ranged], help="trades, oldest first")
    trades.add_argument("--limit", type=int, default=DEFAULT_TRADES_LIMIT)
    bars = sub.add_parser("bars", parents=[common, ranged], help="OHLCV bars")
    bars.add_argument("--interval", default="1m", help=f"one of {', '.join(INTERVALS)}")
    bars.add_argument("--limit", type=int, default=DEFAULT_BARS_LIMIT)
    symbols = sub.add_parser("symbols", parents=[common], help="symbols present")
    symbols.add_argument("--exchange")
    symbols.add_argument("--table", default="trades", help=f"one of {', '.join(SYMBOL_TABLES)}")
    summary = sub.add_parser("summary", parents=[common], help="per session date and symbol: trades, volume, OHLC")
    summary.add_argument("--exchange")
    summary.add_argument("--symbol")
    summary.add_argument("--start-date", required=True)
    summary.add_argument("--end-date", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    from k2_assets.core.settings import Settings

    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        engine = QueryEngine(k2_catalog.open_catalog(settings.catalog_uri, settings.warehouse),
                             timeout_s=args.timeout, memory_limit=args.memory_limit, refresh_ms=0)
        with engine:
            if args.command == "trades":
                result = engine.trades(args.exchange, args.symbol, args.start, args.end, args.as_of, args.limit,
                                       trade_date=args.trade_date, columns=args.columns)
            elif args.command == "bars":
                result = engine.bars(args.interval, args.exchange, args.symbol, args.start, args.end, args.as_of, args.limit,
                                     trade_date=args.trade_date, columns=args.columns)
            elif args.command == "symbols":
                result = engine.symbols(args.exchange, args.as_of, table=args.table)
            else:
                result = engine.daily_summary(args.exchange, args.symbol, start_date=args.start_date, end_date=args.end_date,
                                              as_of=args.as_of)
        from k2_assets.core.output import render

        render(result, args.format, sys.stdout)
    except Exception as exc:  # one clear line, no traceback: this is a user-facing command
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        label = "error" if isinstance(exc, QueryError) else f"error ({type(exc).__name__})"
        print(f"{label}: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
