"""QueryEngine: analyst queries over one catalog's `market` tables, answered from cached Iceberg scans (aggregates by DuckDB)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Self

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import NoSuchTableError
from pyiceberg.table import Table

from k2_assets.core import catalog as k2_catalog
from k2_assets.core import schemas, snapshots
from k2_assets.core.query.cache import ArrowCache, Scope, row_scope
from k2_assets.core.query.results import time_window, to_pandas, utc
from k2_assets.core.query.sql import filters, where
from k2_assets.core.query.validation import (
    BAR_COLUMNS,
    DEFAULT_BARS_LIMIT,
    DEFAULT_TRADES_LIMIT,
    INTERVALS,
    MAX_LISTED_SYMBOLS,
    MEMORY_LIMIT,
    SYMBOL_TABLES,
    TRADE_COLUMNS,
    InvalidTimeRange,
    InvalidValue,
    QueryError,
    QueryTimeout,
    UnknownInterval,
    UnknownSnapshot,
    UnknownSymbol,
    parse_as_of,
    parse_date,
    valid_columns,
    valid_exchange,
    valid_limit,
    valid_symbol,
    valid_time_range,
)
from k2_assets.core.query.watchdog import Watchdog
from k2_assets.core.rollups import DUCKDB_CONFIG

TRADE_ORDER = ("exchange_timestamp", "exchange", "symbol", "source_sequence")
BAR_ORDER = ("bar_start", "exchange", "symbol")
TABLES_SCHEMA = {name: definition.schema for name, definition in k2_catalog.TABLES.items()}


log = logging.getLogger("k2.query")


class QueryEngine:
    """Queries over one catalog's `market` tables: one DuckDB connection, cached table handles and scans.

    Row queries (trades, bars) need no query engine: a cached scan is stored sorted in the query's
    order, time first, so the rows of [start, end) are one run of it, found by binary search and
    returned as a zero-copy slice. Aggregates (symbols, daily_summary) run in DuckDB.
    """

    def __init__(
        self,
        catalog: Catalog,
        *,
        timeout_s: float = 10.0,
        memory_limit: str = "1GB",
        threads: int | None = None,
        cache_bytes: int = 512 * 1024 * 1024,
        refresh_ms: float = 1000.0,
        connection: duckdb.DuckDBPyConnection | None = None,
    ):
        """`connection`: an open DuckDB connection to run on, such as dagster_duckdb's `DuckDBResource.get_connection()`
        when Dagster runs the engine (it has the same hardened configuration); by default the engine opens its own."""
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise InvalidValue(f"timeout_s must be a positive number of seconds, not {timeout_s!r}")
        if not isinstance(memory_limit, str) or not MEMORY_LIMIT.match(memory_limit):
            raise InvalidValue(f"memory_limit {memory_limit!r} is not a size such as '512MB' or '1GB'")
        threads = threads if threads is not None else DUCKDB_CONFIG["threads"]
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
        self._reloading: set[str] = set()
        self._watchdog = Watchdog()
        if connection is None:
            connection = duckdb.connect(
                ":memory:", config={**DUCKDB_CONFIG, "threads": threads, "memory_limit": self.memory_limit}
            )
        self._con = connection
        self._con.execute(f"SET threads = {threads}")
        self._con.execute(f"SET memory_limit = '{self.memory_limit}'")  # validated against MEMORY_LIMIT above
        self._con.execute("SET TimeZone = 'UTC'")
        # Locked last: no query can lift the limits or turn file access back on.
        self._con.execute("SET lock_configuration = true")
        self._closed = False
        # Close the connection even if the caller never does (DuckDB complains at exit otherwise).
        self._finalizer = weakref.finalize(self, _close_quietly, self._con, self._watchdog)

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the DuckDB connection, stop the watchdog and drop the cache."""
        if not self._closed:
            self._closed = True
            self._finalizer()
            self._cache.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def refresh(self) -> None:
        """Forget the loaded table metadata: the next query sees the catalog's current snapshots."""
        with self._tables_lock:
            self._tables.clear()

    def cache_info(self) -> dict:
        """The scan cache's hits, misses, entries and bytes."""
        return self._cache.info()

    # ------------------------------------------------------------ public queries

    def trades(
        self,
        exchange: str | None = None,
        symbol: str | None = None,
        start=None,
        end=None,
        as_of=None,
        limit: int = DEFAULT_TRADES_LIMIT,
        *,
        trade_date=None,
        columns: Iterable[str] | None = None,
    ) -> pa.Table:
        """Trades with exchange time in [start, end), oldest first (then by exchange, symbol, sequence), at most `limit`.

        `trade_date` (optional) restricts to one session date of the exchange (ASX: the Sydney date);
        `columns` chooses columns of market.trades (default: TRADE_COLUMNS).
        """
        exchange, symbol, limit = valid_exchange(exchange), valid_symbol(symbol), valid_limit(limit)
        start_t, end_t = valid_time_range(start, end)
        session = parse_date(trade_date, "trade_date") if trade_date is not None else None
        cols = valid_columns(columns, TRADE_COLUMNS, schemas.arrow_schema(schemas.TRADE), "trades")
        scope = row_scope(exchange, symbol, start_t, end_t, session)
        return self._rows("trades", schemas.TRADE, scope, as_of, "exchange_timestamp", start_t, end_t, TRADE_ORDER, limit, cols)

    def bars(
        self,
        interval: str = "1m",
        exchange: str | None = None,
        symbol: str | None = None,
        start=None,
        end=None,
        as_of=None,
        limit: int = DEFAULT_BARS_LIMIT,
        *,
        trade_date=None,
        columns: Iterable[str] | None = None,
    ) -> pa.Table:
        """OHLCV bars of `interval` (1m, 5m, 1h, 1d) with bar_start in [start, end), oldest first, at most `limit`."""
        if not isinstance(interval, str) or interval not in INTERVALS:
            raise UnknownInterval(f"unknown interval {interval!r}; allowed intervals are {', '.join(INTERVALS)}")
        table = INTERVALS[interval]
        exchange, symbol, limit = valid_exchange(exchange), valid_symbol(symbol), valid_limit(limit)
        start_t, end_t = valid_time_range(start, end)
        session = parse_date(trade_date, "trade_date") if trade_date is not None else None
        cols = valid_columns(columns, BAR_COLUMNS, schemas.arrow_schema(schemas.OHLCV), table)
        scope = row_scope(exchange, symbol, start_t, end_t, session)
        return self._rows(table, schemas.OHLCV, scope, as_of, "bar_start", start_t, end_t, BAR_ORDER, limit, cols)

    def symbols(self, exchange: str | None = None, as_of=None, *, table: str = "trades") -> pa.Table:
        """Symbols present in `table` (default trades): exchange, symbol, first/last trade_date and row count."""
        if table not in SYMBOL_TABLES:
            raise QueryError(f"symbols() lists the tables {', '.join(SYMBOL_TABLES)}, not {table!r}")
        exchange = valid_exchange(exchange)
        conditions, params = filters(exchange, None, None, None, "", None)
        sql = (
            "SELECT exchange, symbol, min(trade_date) AS first_date, max(trade_date) AS last_date, count(*) AS row_count "
            f"FROM src{where(conditions)} GROUP BY exchange, symbol ORDER BY exchange, symbol"
        )
        handle = self._table(table)
        snapshot_id = self._snapshot_id(handle, table, as_of)
        data = self._scan(handle, table, TABLES_SCHEMA[table], snapshot_id, Scope(exchange), ("exchange", "symbol", "trade_date"))
        return utc(self._execute(sql, params, data))

    def daily_summary(
        self, exchange: str | None = None, symbol: str | None = None, *, start_date, end_date, as_of=None
    ) -> pa.Table:
        """Per session date and symbol: trades, volume, first/last time, open/high/low/close.

        Open and close are the prices of the first and last trade by (exchange time, sequence);
        `start_date`..`end_date` are session dates (trade_date), both included.
        """
        exchange, symbol = valid_exchange(exchange), valid_symbol(symbol)
        lo, hi = parse_date(start_date, "start_date"), parse_date(end_date, "end_date")
        if lo > hi:
            raise InvalidTimeRange(f"date range is reversed: start_date {lo} is after end_date {hi}")
        conditions, params = filters(exchange, symbol, None, None, "", None)
        conditions.append("trade_date BETWEEN $start_date AND $end_date")
        params.update(start_date=lo, end_date=hi)
        sql = (
            "SELECT trade_date, exchange, symbol, count(*) AS trades, sum(quantity) AS volume, "
            "min(exchange_timestamp) AS first_time, max(exchange_timestamp) AS last_time, "
            "first(price ORDER BY exchange_timestamp, source_sequence) AS open, max(price) AS high, min(price) AS low, "
            "first(price ORDER BY exchange_timestamp DESC, source_sequence DESC) AS close "
            f"FROM src{where(conditions)} GROUP BY trade_date, exchange, symbol ORDER BY trade_date, exchange, symbol"
        )
        handle = self._table("trades")
        snapshot_id = self._snapshot_id(handle, "trades", as_of)
        if symbol is not None:
            self._check_symbol(handle, "trades", schemas.TRADE, snapshot_id, exchange, symbol)
        columns = ("exchange", "symbol", "trade_date", "exchange_timestamp", "source_sequence", "price", "quantity")
        data = self._scan(handle, "trades", schemas.TRADE, snapshot_id, Scope(exchange, lo, hi, symbol), columns)
        return utc(self._execute(sql, params, data))

    def pandas(self, query: str, *args, exact: bool = False, **kwargs):
        """Run `query` (trades, bars, symbols or daily_summary) and return a pandas DataFrame (see to_pandas)."""
        methods = {"trades": self.trades, "bars": self.bars, "symbols": self.symbols, "daily_summary": self.daily_summary}
        if query not in methods:
            raise QueryError(f"unknown query {query!r}; queries are {', '.join(methods)}")
        return to_pandas(methods[query](*args, **kwargs), exact=exact)

    # ------------------------------------------------------------ internals

    def _rows(
        self,
        table: str,
        schema_name: str,
        scope: Scope,
        as_of,
        time_column: str,
        start: datetime | None,
        end: datetime | None,
        order: tuple[str, ...],
        limit: int,
        columns: tuple[str, ...],
    ) -> pa.Table:
        """A row query: the Iceberg scan applies exchange, symbol and trade_date exactly (pyiceberg
        filters rows, not only files); the cached scan is sorted by `order`, whose first column is
        `time_column`, so the time range and the limit are a slice of it."""
        handle = self._table(table)
        snapshot_id = self._snapshot_id(handle, table, as_of)
        if scope.symbol is not None:
            self._check_symbol(handle, table, schema_name, snapshot_id, scope.exchange, scope.symbol)
        data = self._scan(handle, table, schema_name, snapshot_id, scope, ("*",), order=order)
        if order[0] != time_column:
            raise AssertionError(f"a row query's order must start with its time column {time_column}, not {order[0]}")
        return time_window(data, time_column, start, end, limit).select(list(columns))

    def _table(self, name: str, *, force: bool = False) -> Table | None:
        """The table handle; None if the table does not exist.

        A handle older than refresh_ms is reloaded from the catalog in the background: the query in hand reads
        the one loaded, so no query waits for a metadata load (a query's p99 did, once a second). With
        refresh_ms=0, or `force`, the handle is reloaded before the query."""
        if self._closed:  # every query starts here
            raise QueryError("the query engine is closed")
        entry = self._tables.get(name)
        if not force and entry is not None and self.refresh_s > 0:
            if time.monotonic() - entry[1] >= self.refresh_s:
                self._reload_in_background(name)
            return entry[0]
        return self._load(name)

    def _reload_in_background(self, name: str) -> None:
        with self._tables_lock:
            if name in self._reloading:
                return
            self._reloading.add(name)

        def reload() -> None:
            try:
                self._load(name)
            except Exception:  # noqa: BLE001 - the next query tries again, and a query that needs it loads it itself
                log.warning("reloading market.%s in the background failed", name, exc_info=True)
            finally:
                with self._tables_lock:
                    self._reloading.discard(name)

        threading.Thread(target=reload, name="k2-query-refresh", daemon=True).start()

    def _load(self, name: str) -> Table | None:
        now = time.monotonic()
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
        wanted = parse_as_of(as_of)
        if isinstance(wanted, int):
            if handle is None or handle.snapshot_by_id(wanted) is None:
                handle = self._table(name, force=True)  # perhaps committed since the last refresh
            if handle is None or handle.snapshot_by_id(wanted) is None:
                raise UnknownSnapshot(f"snapshot {wanted} does not exist in market.{name}; {_describe_snapshots(handle)}")
            return wanted
        snapshot = snapshots.snapshot_at(handle, wanted) if handle is not None else None
        if snapshot is None:
            raise UnknownSnapshot(
                f"as_of {wanted.isoformat()} is before the first snapshot of market.{name}; {_describe_snapshots(handle)}"
            )
        return snapshot.snapshot_id

    def _scan(
        self,
        handle: Table | None,
        name: str,
        schema_name: str,
        snapshot_id: int | None,
        scope: Scope,
        columns: tuple[str, ...],
        *,
        order: tuple[str, ...] = (),
    ) -> pa.Table:
        """The Arrow data of `scope` at `snapshot_id`, from the cache or an Iceberg scan (then cached).

        With `order`, the rows are sorted by it, in one chunk.
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
            data = data.combine_chunks()
        if snapshot_id is not None:
            self._cache.put(key, data)
        return data

    def _check_symbol(
        self, handle, name: str, schema_name: str, snapshot_id: int | None, exchange: str | None, symbol: str
    ) -> None:
        key = (name, snapshot_id, exchange)
        known = self._symbol_sets.get(key)
        if known is None:
            data = self._scan(handle, name, schema_name, snapshot_id, Scope(exchange), ("exchange", "symbol"))
            known = frozenset(pc.unique(data.column("symbol")).to_pylist()) if data.num_rows else frozenset()
            if len(self._symbol_sets) > 1024:
                self._symbol_sets.clear()
            self._symbol_sets[key] = known
        if symbol not in known:
            on = f" on {exchange}" if exchange else ""
            listed = sorted(known)
            shown = ", ".join(listed[:MAX_LISTED_SYMBOLS])
            if len(listed) > MAX_LISTED_SYMBOLS:
                shown += f", ... ({len(listed)} in all)"
            raise UnknownSymbol(
                f"unknown symbol {symbol!r}: market.{name} has no rows of it{on}"
                + (f"; symbols present: {shown}" if listed else "; the table holds no symbols there")
            )

    def _execute(
        self, sql: str, params: dict[str, Any] | None, data: pa.Table | None, *, timeout_s: float | None = None
    ) -> pa.Table:
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


def _close_quietly(con, watchdog: Watchdog) -> None:
    watchdog.stop()
    with contextlib.suppress(duckdb.Error):
        con.close()


def _describe_snapshots(handle: Table | None) -> str:
    if handle is None or not handle.metadata.snapshots:
        return "the table has no snapshots yet"
    history = handle.history()
    first = datetime.fromtimestamp(history[0].timestamp_ms / 1000, UTC) if history else None
    newest = sorted(handle.metadata.snapshots, key=lambda s: s.timestamp_ms, reverse=True)[:MAX_LISTED_SYMBOLS]
    ids = ", ".join(str(s.snapshot_id) for s in newest)
    return (f"first snapshot at {first.isoformat()}; " if first else "") + f"recent snapshot ids (newest first): {ids}"
