"""`k2 query trades|bars|symbols|summary`: queries over the Iceberg tables, printed as a table, csv or json."""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import date

import click

from k2_assets.cli.common import DATE, UserError, settings
from k2_assets.core.output import FORMATS
from k2_assets.core.schemas import INTERVALS


def _options(*options):
    """Apply click options in the order listed (decorators apply bottom-up)."""

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command

    return apply


_ranged = _options(
    click.option("--exchange", help="ASX, BINANCE or BINANCE_UM  [default: every exchange]"),
    click.option("--symbol", help="e.g. BHP or BTCUSDT  [default: every symbol]"),
    click.option("--start", help="ISO 8601 time, inclusive (UTC unless an offset is given)  [default: open]"),
    click.option("--end", help="ISO 8601 time, exclusive (UTC unless an offset is given)  [default: open]"),
    click.option("--trade-date", type=DATE, help="one session date of the exchange (ASX: the Sydney date)  [default: any]"),
    click.option("--columns", help="comma-separated column names  [default: the usual columns]"),
)
_common = _options(
    click.option(
        "--as-of", help="a snapshot id, or a time (ISO 8601, UTC unless an offset is given)  [default: the current snapshot]"
    ),
    click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True, help="output format"),
    click.option(
        "--timeout",
        type=click.FloatRange(0, min_open=True),
        default=10.0,
        show_default=True,
        help="seconds a DuckDB query (symbols, summary) may run before it is cancelled",
    ),
    click.option("--memory-limit", default="1GB", show_default=True, help="DuckDB's memory ceiling, e.g. 512MB"),
)


@click.group("query")
def query() -> None:
    """Queries over the Iceberg tables (the catalog of the K2_* settings)."""


# The limits' defaults are the engine's DEFAULT_TRADES_LIMIT and DEFAULT_BARS_LIMIT, written out so that
# `k2 --help` does not import DuckDB and pyiceberg.
@query.command("trades")
@_ranged
@click.option("--limit", type=int, default=1_000, show_default=True, help="most rows to print (1..100,000)")
@_common
def trades(
    exchange: str | None,
    symbol: str | None,
    start: str | None,
    end: str | None,
    trade_date: date | None,
    columns: str | None,
    limit: int,
    as_of: str | None,
    fmt: str,
    timeout: float,
    memory_limit: str,
) -> None:
    """Trades with exchange time in [--start, --end), oldest first."""
    _run(
        lambda engine: engine.trades(exchange, symbol, start, end, as_of, limit, trade_date=trade_date, columns=columns),
        fmt,
        timeout,
        memory_limit,
    )


@query.command("bars")
@_ranged
@click.option("--interval", default="1m", show_default=True, help=f"bar interval: {', '.join(INTERVALS)}")
@click.option("--limit", type=int, default=10_000, show_default=True, help="most rows to print (1..100,000)")
@_common
def bars(
    exchange: str | None,
    symbol: str | None,
    start: str | None,
    end: str | None,
    trade_date: date | None,
    columns: str | None,
    interval: str,
    limit: int,
    as_of: str | None,
    fmt: str,
    timeout: float,
    memory_limit: str,
) -> None:
    """OHLCV bars with bar_start in [--start, --end), oldest first."""
    _run(
        lambda engine: engine.bars(interval, exchange, symbol, start, end, as_of, limit, trade_date=trade_date, columns=columns),
        fmt,
        timeout,
        memory_limit,
    )


@query.command("symbols")
@click.option("--exchange", help="ASX, BINANCE or BINANCE_UM  [default: every exchange]")
@click.option("--table", default="trades", show_default=True, help="table to list: trades, quotes or ohlcv_<interval>")
@_common
def symbols(exchange: str | None, table: str, as_of: str | None, fmt: str, timeout: float, memory_limit: str) -> None:
    """Symbols present in a table: first and last session date, and row count."""
    _run(lambda engine: engine.symbols(exchange, as_of, table=table), fmt, timeout, memory_limit)


@query.command("summary")
@click.option("--exchange", help="ASX, BINANCE or BINANCE_UM  [default: every exchange]")
@click.option("--symbol", help="e.g. BHP or BTCUSDT  [default: every symbol]")
@click.option("--start-date", required=True, type=DATE, help="first session date")
@click.option("--end-date", required=True, type=DATE, help="last session date, inclusive")
@_common
def summary(
    exchange: str | None,
    symbol: str | None,
    start_date: date,
    end_date: date,
    as_of: str | None,
    fmt: str,
    timeout: float,
    memory_limit: str,
) -> None:
    """Per session date and symbol: trades, volume, first and last time, open, high, low and close."""
    _run(
        lambda engine: engine.daily_summary(exchange, symbol, start_date=start_date, end_date=end_date, as_of=as_of),
        fmt,
        timeout,
        memory_limit,
    )


def _run(ask: Callable, fmt: str, timeout: float, memory_limit: str) -> None:
    """Ask the settings' catalog through a fresh engine and print the result."""
    from k2_assets.core import catalog
    from k2_assets.core.output import render
    from k2_assets.core.query import QueryEngine

    config = settings()
    try:
        with QueryEngine(
            catalog.open_catalog(config.catalog_uri, config.warehouse), timeout_s=timeout, memory_limit=memory_limit, refresh_ms=0
        ) as engine:
            result = ask(engine)
    except ValueError as exc:  # a QueryError, or a library's complaint about a value the user gave
        raise UserError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    render(result, fmt, sys.stdout)
