"""`k2 recent`: a symbol's latest trades, from the table plus the Kafka tail."""

from __future__ import annotations

import sys
from datetime import datetime

import click

from k2_assets.cli.common import UTC_TIME, default, settings, topic_option
from k2_assets.core.output import FORMATS

COLUMNS = ["exchange_timestamp", "symbol", "source_sequence", "side", "price", "quantity", "kafka_offset"]


@click.command("recent")
@click.option("--symbol", required=True, help="e.g. BTCUSDT")
@click.option("--minutes", default=5.0, show_default=True, help="length of the window")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@click.option("--limit", default=50, show_default=True, help="rows to print (table format: the newest)")
@click.option("--until", type=UTC_TIME, help="end of the window, ISO 8601  [default: now]")
@topic_option(default="market.crypto.trades.binance", show_default=True, help="the trades topic")
@click.option("--bootstrap", default=default("kafka_bootstrap"), help="Kafka bootstrap servers  [default: K2_KAFKA_BOOTSTRAP]")
@click.option("--every", default=0.0, help="ask again every SECONDS from one Kafka reader, until Ctrl-C")
def recent(
    symbol: str, minutes: float, fmt: str, limit: int, until: datetime | None, topic: str, bootstrap: str, every: float
) -> None:
    """A symbol's trades of the last N minutes: market.trades plus the Kafka tail, deduplicated."""
    from k2_assets.core import catalog
    from k2_assets.core.recent import RecentTrades, recent_trades

    config = settings()
    table = catalog.ensure_table(catalog.open_catalog(config.catalog_uri, config.warehouse), "trades")
    if not every:
        _show(recent_trades(table, bootstrap, symbol, minutes, topic=topic, now=until), symbol, minutes, fmt, limit)
        return
    import threading

    from k2_assets.core.stopping import Stopper

    stopping = threading.Event()
    Stopper("k2 recent", f"asking every {every:g} s for {symbol.upper()} (and its Kafka reader)", stopping.set).install()
    with RecentTrades(table, bootstrap, topic=topic, keep_minutes=minutes) as reader:
        while not stopping.is_set():
            _show(reader.query(symbol, minutes, now=until), symbol, minutes, fmt, limit)
            sys.stdout.flush()
            stopping.wait(every)


def _show(rows, symbol: str, minutes: float, fmt: str, limit: int) -> None:
    from k2_assets.core.output import render

    view = rows.select(COLUMNS)
    if fmt == "table":
        print(f"{rows.num_rows} trades of {symbol.upper()} in the last {minutes:g} minutes")
        view = view.slice(max(0, view.num_rows - limit))
    render(view, fmt, sys.stdout)
