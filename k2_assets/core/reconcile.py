"""K2's 1m bars against the exchange's own (market.exchange_bars), minute by minute, in DuckDB. No Dagster.

Every minute the exchange published gets one outcome:
- match: open, high, low, close, volume, trade count, quote volume and taker-buy volume all agree;
- mismatch: some differ (listed by name, with both values);
- missing_data: K2 holds fewer trades than the exchange counted, or no bar where the exchange has trades,
  even when K2's trade ids look contiguous;
- left_out: a minute K2 did not see whole by design: before, or at the start of, a live capture that began
  mid-minute, and likewise at its end. Only live captures have such edges: a dump holds the whole day.
A minute K2 traded in that the exchange did not publish is a mismatch, unless it comes after the exchange's
last published minute (not yet closed when the exchange's bars were fetched): then it is left out.

Prices, volume and counts compare exactly. Quote volumes compare within half a unit of the 8th decimal per
trade, since the exchange rounds each trade's quote quantity to 8 places before it sums them and K2 sums exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

import duckdb
import pyarrow as pa
from pyiceberg.expressions import EqualTo
from pyiceberg.table import Table

from k2_assets.core import rollups, snapshots

FIELDS = ("open", "high", "low", "close", "volume", "trade_count", "quote_volume", "taker_buy_volume")
OUTCOMES = ("match", "mismatch", "missing_data", "left_out")


@dataclass(frozen=True)
class Reconciliation:
    minutes: pa.Table  # every minute but the matching: exchange, symbol, bar_start, outcome, fields, both values, reason
    summary: pa.Table  # per exchange and symbol: compared, matching, mismatched, missing_data, left_out
    unreconciled: list[tuple[str, str]]  # (exchange, symbol) K2 has bars for and the exchange published none

    @property
    def passed(self) -> bool:
        return self.minutes.filter(_in(self.minutes, ("mismatch", "missing_data"))).num_rows == 0


def _in(table: pa.Table, outcomes: tuple[str, ...]):
    import pyarrow.compute as pc

    return pc.is_in(table.column("outcome"), pa.array(outcomes))


def capture_edges(trades: pa.Table, con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Per (exchange, symbol): K2's first and last trade of the day, and whether each came from the live capture."""
    con = rollups.session(con)
    con.register("edge_trades", trades.select(["exchange", "symbol", "exchange_timestamp", "source_sequence", "kafka_topic"]))
    return con.sql("""
        SELECT exchange, symbol,
               min(exchange_timestamp) AS first_at, max(exchange_timestamp) AS last_at,
               arg_min(kafka_topic IS NOT NULL, (exchange_timestamp, source_sequence)) AS first_live,
               arg_max(kafka_topic IS NOT NULL, (exchange_timestamp, source_sequence)) AS last_live
        FROM edge_trades GROUP BY ALL
    """).to_arrow_table()


# In order: the first that holds is the minute's outcome, with its reason.
RULES = (
    ("NOT on_exchange AND published = 0", "unreconciled", "''"),
    (
        "NOT on_exchange AND bar_start > last_published",
        "left_out",
        "'after the last minute the exchange had closed when its bars were fetched'",
    ),
    ("NOT on_exchange", "mismatch", "'the exchange published no bar for a minute K2 has trades in'"),
    ("first_at IS NULL", "left_out", "'K2 holds no trades of this symbol on this day'"),
    (
        "first_live AND bar_start < first_minute",
        "left_out",
        "'before K2''s live capture began at ' || strftime(first_at, '%X.%f')",
    ),
    ("last_live AND bar_start > last_minute", "left_out", "'after K2''s live capture ended at ' || strftime(last_at, '%X.%f')"),
    (
        "first_live AND bar_start = first_minute AND k_count < e_count",
        "left_out",
        "'K2''s live capture began inside this minute, at ' || strftime(first_at, '%X.%f')",
    ),
    (
        "last_live AND bar_start = last_minute AND k_count < e_count",
        "left_out",
        "'K2''s live capture ended inside this minute, at ' || strftime(last_at, '%X.%f')",
    ),
    (
        "NOT in_k2 AND e_count = 0 AND e_volume = 0",
        "left_out",
        "'no trades in this minute, and K2 has no bar for it: K2 fills only between the day''s trades, or to 23:59 "
        "once the next day is loaded'",
    ),
    (
        "NOT in_k2",
        "missing_data",
        "'the exchange counted ' || coalesce(e_trade_count::VARCHAR, 'some') || ' trades; K2 has no bar'",
    ),
    ("k_count < e_count", "missing_data", "'K2 holds ' || k_count || ' trades, the exchange counted ' || e_count"),
    ("differs", "mismatch", "'differs in ' || array_to_string(fields, ', ')"),
)


def reconcile(
    k2_bars: pa.Table, exchange_bars: pa.Table, edges: pa.Table, con: duckdb.DuckDBPyConnection | None = None
) -> Reconciliation:
    """Compare one day's 1m bars of K2 (market.ohlcv_1m rows) with the exchange's (market.exchange_bars rows)."""
    con = rollups.session(con)
    con.register("k2", k2_bars.select(["exchange", "symbol", "bar_start", *FIELDS, "trade_count_all"]))
    con.register("ex", exchange_bars.select(["exchange", "symbol", "bar_start", *FIELDS]))
    con.register("edges", edges)
    pairs = ", ".join(f"k.{f} AS k_{f}, e.{f} AS e_{f}" for f in FIELDS)
    differs = [_differs(f) for f in FIELDS]
    values = lambda side: ", ".join(f"{f} := {side}_{f}::VARCHAR" for f in FIELDS)  # noqa: E731
    # Same rules in the same order: the outcome for every minute, the reason only for those shown.
    outcome = "CASE " + " ".join(f"WHEN {when} THEN '{o}'" for when, o, _ in RULES) + " ELSE 'match' END"
    reason = "CASE " + " ".join(f"WHEN {when} THEN {r}" for when, _, r in RULES) + " END"
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE outcomes AS
        WITH paired AS (
            SELECT exchange, symbol, bar_start, e.exchange_ IS NOT NULL AS on_exchange, k.exchange_ IS NOT NULL AS in_k2,
                   {pairs}, coalesce(k.trade_count, 0) AS k_count, coalesce(e.trade_count, 0) AS e_count,
                   g.first_at, g.first_live, g.last_at, g.last_live,
                   time_bucket(INTERVAL 1 minute, g.first_at) AS first_minute,
                   time_bucket(INTERVAL 1 minute, g.last_at) AS last_minute,
                   max(e.bar_start) OVER symbol_day AS last_published, count(e.exchange_) OVER symbol_day AS published
            FROM (SELECT *, exchange AS exchange_ FROM ex) e
            FULL OUTER JOIN (SELECT *, exchange AS exchange_ FROM k2) k USING (exchange, symbol, bar_start)
            LEFT JOIN edges g USING (exchange, symbol)
            WINDOW symbol_day AS (PARTITION BY exchange, symbol)
        )
        SELECT *, {outcome} AS outcome
        FROM (SELECT *, ({" IS NOT NULL OR ".join(differs)} IS NOT NULL) AS differs FROM paired)
    """)
    minutes = con.sql(f"""
        SELECT exchange, symbol, bar_start, outcome, fields,
               struct_pack({values("k")}) AS k2_values, struct_pack({values("e")}) AS exchange_values, {reason} AS reason
        FROM (SELECT *, list_filter([{", ".join(differs)}], lambda x: x IS NOT NULL) AS fields
              FROM outcomes WHERE outcome NOT IN ('match', 'unreconciled'))
        ORDER BY exchange, symbol, bar_start
    """)
    summary = con.sql("""
        SELECT exchange, symbol,
               count(*) FILTER (WHERE outcome IN ('match', 'mismatch', 'missing_data')) AS compared,
               count(*) FILTER (WHERE outcome = 'match') AS matching,
               count(*) FILTER (WHERE outcome = 'mismatch') AS mismatched,
               count(*) FILTER (WHERE outcome = 'missing_data') AS missing_data,
               count(*) FILTER (WHERE outcome = 'left_out') AS left_out
        FROM outcomes WHERE outcome <> 'unreconciled' GROUP BY ALL ORDER BY ALL
    """)
    unreconciled = con.sql("SELECT DISTINCT exchange, symbol FROM outcomes WHERE outcome = 'unreconciled' ORDER BY ALL")
    return Reconciliation(minutes.to_arrow_table(), summary.to_arrow_table(), [tuple(r) for r in unreconciled.fetchall()])


def reconcile_day(
    ohlcv_1m: Table, exchange_bars: Table, trades: Table, day: date, *, bars_snapshot_id: int | None = None, con=None
) -> Reconciliation:
    """One day from the tables: K2's 1m bars (at `bars_snapshot_id`, else current), the exchange's, and the capture
    edges from the trades snapshot the bars were computed from."""
    columns = ("exchange", "symbol", "exchange_timestamp", "source_sequence", "kafka_topic")
    bars, traded = snapshots.bars_and_their_trades(ohlcv_1m, trades, day, bars_snapshot_id, columns)
    published = exchange_bars.scan(row_filter=EqualTo("trade_date", day.isoformat())).to_arrow()
    edges = capture_edges(traded, con) if traded is not None and traded.num_rows else _no_edges()
    return reconcile(bars, published, edges, con)


def _no_edges() -> pa.Table:
    ts = pa.timestamp("us", tz="UTC")
    return pa.table(
        {"exchange": pa.array([], pa.string()), "symbol": pa.array([], pa.string()), "first_at": pa.array([], ts),
         "last_at": pa.array([], ts), "first_live": pa.array([], pa.bool_()), "last_live": pa.array([], pa.bool_())}
    )  # fmt: skip


def _differs(field: str) -> str:
    k, e = f"k_{field}", f"e_{field}"
    if field in ("quote_volume",):
        # the exchange's rounding of each trade's quote quantity: half a unit of the 8th place per trade
        same = f"abs({k} - {e}) <= 0.000000005 * greatest(coalesce(k_trade_count, 0), 1)"
    else:
        same = f"{k} = {e}"
    return f"CASE WHEN {e} IS NOT NULL AND {k} IS DISTINCT FROM {e} AND NOT coalesce({same}, false) THEN '{field}' END"
