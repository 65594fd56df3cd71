"""Bars whose prices lie outside the session's market by more than a band. No Dagster.

A bar takes open, high and low from price-forming trades (docs/asx.md, docs/binance-futures.md). The reference
is narrower: the range of the session's continuous trading (ASX: class CONTINUOUS; Binance: MARKET trades, or
every spot trade). An auction print or a misclassified trade far from that range is what this catches, as the
off-market 40.00 of BHP on 2014-03-11 against a market of 35.84–36.45.
"""

from __future__ import annotations

from decimal import Decimal

import duckdb
import pyarrow as pa

from k2_assets.core import rollups

# 5% beyond the range: wide enough for a penny stock's auction one tick outside the day (0.066 against 0.054-0.065,
# 1.5%), narrow enough for an off-market print such as BHP's 40.00 against 36.45 (9.7%).
BAND = Decimal("0.05")
REFERENCE_CLASSES = ("CONTINUOUS", "MARKET")  # the continuous market of each exchange; null class: a spot trade


def outside(bars: pa.Table, trades: pa.Table, band: Decimal = BAND, con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Per bar outside the band: exchange, symbol, bar_start, the field, its price and the session's range."""
    con = rollups.session(con)
    con.register("band_bars", bars.select(["exchange", "symbol", "bar_start", "open", "high", "low"]))
    con.register("band_trades", trades.select(["exchange", "symbol", "price", "price_forming", "trade_class"]))
    return con.sql(
        """
        WITH reference AS (
            SELECT exchange, symbol, min(price) AS range_low, max(price) AS range_high
            FROM band_trades
            WHERE coalesce(price_forming, true) AND (trade_class IS NULL OR list_contains($classes, trade_class))
            GROUP BY ALL
        ),
        prices AS (
            SELECT b.exchange, b.symbol, b.bar_start, r.range_low, r.range_high,
                   unnest(['open', 'high', 'low']) AS field, unnest([b.open, b.high, b.low]) AS price
            FROM band_bars b JOIN reference r USING (exchange, symbol)
        )
        SELECT exchange, symbol, bar_start, field, price, range_low, range_high
        FROM prices
        WHERE price > range_high * (1 + $band) OR price < range_low * (1 - $band)
        ORDER BY exchange, symbol, bar_start, field
        """,
        params={"classes": list(REFERENCE_CLASSES), "band": band},
    ).to_arrow_table()
