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

The package: `validation` (allowlists, argument checks, the QueryError family), `cache` (the scan
scope and the Arrow LRU), `sql` (the SQL text and its parameters), `results` (shaping results),
`watchdog` (timeouts) and `engine` (QueryEngine). The command line is `k2 query` (k2_assets.cli.query).

Decision: how DuckDB reads Iceberg
    pyiceberg plans and reads the scan, with the row filter pushed down to partitions and file
    statistics (exchange and trade_date are partition columns; symbol prunes by the sorted files'
    bounds), into Arrow; DuckDB then runs the SQL over that Arrow table. This works with any DuckDB
    version and needs nothing downloaded at run time. DuckDB's own `iceberg` extension would be
    downloaded on first use (and the offline PyPI wheel of it pins duckdb 1.5.5), so it is not used.
    The price is that an Iceberg scan is not interruptible and reads whole partitions' columns; this
    is why scans are cached (below): a warm query pays only the slice, or DuckDB's time for aggregates.

How a query runs
    The Iceberg scan applies exchange, symbol and trade_date exactly (the partition filter; for
    trades/bars given start/end, the trade_date range is derived exactly from each exchange's time
    zone, e.g. ASX sessions are Sydney dates). Row queries (trades, bars) then need no SQL: the
    cached scan is kept sorted in the query order, time first, so the rows of [start, end) are one
    run of it. Two binary searches on the time column find it, and the first `limit` rows of it are
    returned as a zero-copy slice of the requested columns: a warm 20k-row query takes tens of
    microseconds, whatever the width of the columns. (DuckDB evaluating the range, order and limit
    cost milliseconds per query, mostly for a cursor, a registration and planning.) Aggregates
    (symbols, daily_summary) run in DuckDB.

Caching and freshness
    Scanned Arrow data is kept in an LRU bounded by bytes (default 512 MB), keyed by (table,
    snapshot id, partition filter, columns): a snapshot never changes, so an entry never goes stale,
    and a query on the same snapshot skips the Iceberg scan. Table metadata is reloaded from the
    catalog at most every `refresh_ms` (default 1000 ms), so a new commit is visible within that time
    (`engine.refresh()` forces it). The symbol sets used to validate `symbol` are cached the same way.

Safety
    Every value a DuckDB query takes (exchange, symbol, dates) is bound as a parameter (`$name`) and
    never formatted into SQL; table, interval, exchange and column names only come from allowlists.
    The DuckDB connection (one per engine, a cursor per query, so queries can run from several
    threads) is opened from K2's one hardened configuration (rollups.DUCKDB_CONFIG: no file system
    access, no Python replacement scans, no extension auto-install, a thread limit) with the engine's
    own memory limit (default 1GB), and then its configuration is locked. Each DuckDB query runs under a
    timeout (default 10 s): a watchdog thread calls `interrupt()` on the query's cursor and the caller
    gets `QueryTimeout`. Bad input raises a `QueryError` (a ValueError) saying what is wrong and what
    is allowed: unknown exchange, interval, column or snapshot, a symbol absent from the table (the
    message lists the symbols that exist, up to 20), a reversed time range, a limit outside 1..100,000.

A symbol is "unknown" when the table holds no row of it for the exchange filter (any exchange when
none is given) in the snapshot read; a known symbol with no rows in the time range gives an empty
table, not an error.
"""

from __future__ import annotations

# bench/query_latency.py times the engine's steps one by one under these two private names.
from k2_assets.core.query.cache import row_scope as _scope  # noqa: F401
from k2_assets.core.query.engine import BAR_ORDER, TRADE_ORDER, QueryEngine
from k2_assets.core.query.results import time_window as _time_window  # noqa: F401
from k2_assets.core.query.results import to_pandas
from k2_assets.core.query.validation import (
    BAR_COLUMNS,
    DEFAULT_BARS_LIMIT,
    DEFAULT_TRADES_LIMIT,
    INTERVALS,
    MAX_LIMIT,
    SYMBOL_TABLES,
    TRADE_COLUMNS,
    InvalidLimit,
    InvalidTimeRange,
    InvalidValue,
    QueryError,
    QueryTimeout,
    UnknownColumn,
    UnknownExchange,
    UnknownInterval,
    UnknownSnapshot,
    UnknownSymbol,
)

__all__ = [
    "BAR_COLUMNS",
    "BAR_ORDER",
    "DEFAULT_BARS_LIMIT",
    "DEFAULT_TRADES_LIMIT",
    "INTERVALS",
    "MAX_LIMIT",
    "SYMBOL_TABLES",
    "TRADE_COLUMNS",
    "TRADE_ORDER",
    "InvalidLimit",
    "InvalidTimeRange",
    "InvalidValue",
    "QueryEngine",
    "QueryError",
    "QueryTimeout",
    "UnknownColumn",
    "UnknownExchange",
    "UnknownInterval",
    "UnknownSnapshot",
    "UnknownSymbol",
    "to_pandas",
]
