"""OHLCV bars from trades with DuckDB (vectorized SQL, no Python per bar). No Dagster.

- Open and close are the prices of the first and last trade by (exchange time, sequence), never by
  arrival order; high, low, volume, quote volume (exact decimal sums), trade count, taker-buy
  volume and quote volume (aggressor = buyer: Binance's is_buyer_maker = false), first and last
  sequence.
- Minutes without trades follow the exchange's convention (FILL_EMPTY_BARS): Binance publishes them
  as zero-volume bars at the previous close; the ASX vendor publishes no bar for a minute without
  trades, so neither does K2.
- Only price-forming trades (trades.price_forming; Binance futures: X = MARKET; ASX: on-market trades of
  the auctions and continuous trading) make prices, volume and trade_count, as the exchanges' own bars;
  volume_all and trade_count_all count every trade. A Binance minute with no price-forming trade is a
  filled bar; an ASX minute with off-market trades only has a bar with null prices.
- 5m and 1h bars derive from 1m bars, 1d bars from 1m bars of the session; each equals what
  recomputing it from the raw trades gives (the tests prove both).
"""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from k2_assets.core import decode, schemas
from k2_assets.core.checks import session_bounds

FILL_EMPTY_BARS = {"BINANCE": True, "BINANCE_UM": True, "ASX": False}
BUCKETS = {"1m": "1 minute", "5m": "5 minutes", "1h": "1 hour"}
BUCKET_MICROS = {"1m": 60_000_000, "5m": 300_000_000, "1h": 3_600_000_000}


# K2's one hardened DuckDB configuration: the rollups', also given to Dagster's DuckDBResource and (with its
# own memory limit) to the query engine. In memory, two threads on this machine kind, a memory ceiling; the
# data comes as registered Arrow tables, so SQL reads no file or URL, sees no Python variable, and loads
# no extension it would have to download.
DUCKDB_CONFIG = {
    "threads": 2,
    "memory_limit": "2GB",
    "enable_external_access": False,
    "python_enable_replacements": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
}


_databases: dict[int, duckdb.DuckDBPyConnection] = {}  # the process's hardened in-memory database (by pid: not forked)
_opening = threading.Lock()


def _after_fork() -> None:
    global _opening
    _opening = threading.Lock()  # a fork while another thread held it would leave the child's copy held forever


os.register_at_fork(after_in_child=_after_fork)


def session(con: duckdb.DuckDBPyConnection | None = None) -> duckdb.DuckDBPyConnection:
    """The connection to compute on (Dagster's, or a new cursor of our own hardened database), its clock in UTC.

    A cursor is a connection of its own: its registered tables and settings are its alone and go with it. Opening
    a new database instead costs 25-35 ms a call, a twentieth of a 10 M-trade rollup. The cursors of one process
    share the database's threads and memory limit (DUCKDB_CONFIG)."""
    if con is None:
        with _opening:
            database = _databases.get(os.getpid())
            if database is None:
                database = _databases[os.getpid()] = duckdb.connect(":memory:", config=DUCKDB_CONFIG)
            con = database.cursor()
    con.execute("SET TimeZone = 'UTC'")  # after connecting: as a connect option it wants the icu extension downloaded
    return con


def bars_from_trades(trades: pa.Table, interval: str, con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Bars of every traded bucket, straight from raw trades (also the proof for derived bars).

    Open, high, low, close, volume, quote and taker-buy volumes and trade_count come from price-forming trades
    only (the exchange's own rule); volume_all and trade_count_all count every trade. A bucket with no
    price-forming trade has null prices and zero volume. An aggregate trade counts its underlying trades."""
    if interval not in BUCKETS:
        raise ValueError(f"interval must be one of {sorted(BUCKETS)}")
    width = BUCKET_MICROS[interval]
    con = session(con)
    # Most days every trade forms a price and counts once (spot trades): then no price-forming key, no filters
    # and no unit sums.
    rows, every, single = _rollup_input(trades)
    con.register("trades", rows)
    forming = "" if every else " FILTER (WHERE forming)"
    buying = " FILTER (WHERE taker_buy)" if every else " FILTER (WHERE forming AND taker_buy)"
    count = "count(*)" if single else "sum(units)"
    # The bucket as an integer and the (time, sequence) order as one integer key: both far cheaper to group and
    # compare than time_bucket() on timestamptz or a struct. Within a bucket, the time since its start and the
    # sequence fit one BIGINT (1m: 26 bits of µs, 36 of sequence) when the sequences are small enough; else HUGEINT.
    room = 62 - (width - 1).bit_length()
    low, high = (v.as_py() for v in pc.min_max(rows.column("source_sequence")).values())
    small = rows.num_rows == 0 or (low >= 0 and high < 1 << room)
    order = (
        f"((epoch_us(exchange_timestamp) % {width}) << {room}) + source_sequence"
        if small
        else "(epoch_us(exchange_timestamp)::HUGEINT << 63) + source_sequence"
    )
    # A partition holds one exchange and one day: then those are constants, not group keys (hashing two
    # more columns per trade costs a fifth of the rollup).
    exchange, day = _single_value(rows.column("exchange")), _single_value(rows.column("trade_date"))
    constant = exchange is not None and day is not None
    keys = "symbol" if constant else "exchange, symbol, trade_date"
    # Two passes: first per bucket and side (and price-forming or not), each aggregate unfiltered; then per
    # bucket from those few rows. The taker-buy and price-forming figures then cost one more group key per
    # trade, not a filtered copy of every sum (the exact decimal notional most of all): a sixth less on 10M trades.
    split = "taker_buy" if every else "taker_buy, forming"
    return con.sql(
        f"""
        WITH keyed AS (
            SELECT {keys}, epoch_us(exchange_timestamp) // {width} AS bucket,
                   {order} AS trade_order,
                   price, quantity, price::DECIMAL(38,8) * quantity AS notional, side = 'BUY' AS taker_buy,
                   source_sequence{"" if every else ", forming"}{"" if single else ", units"}
            FROM trades
        ), sided AS (
            SELECT {keys}, bucket, {split},
                   min(trade_order) AS first_order, arg_min(price, trade_order) AS open,
                   max(trade_order) AS last_order, arg_max(price, trade_order) AS close,
                   max(price) AS high, min(price) AS low, {count} AS trades, sum(quantity) AS volume,
                   sum(notional) AS quote_volume,
                   min(source_sequence) AS first_sequence, max(source_sequence) AS last_sequence
            FROM keyed GROUP BY {keys}, bucket, {split}
        )
        SELECT {"$exchange AS exchange, symbol, $trade_date AS trade_date" if constant else keys},
               make_timestamptz(bucket * {width}) AS bar_start,
               arg_min(open, first_order){forming} AS open,
               max(high){forming} AS high, min(low){forming} AS low,
               arg_max(close, last_order){forming} AS close,
               coalesce(sum(trades){forming}, 0)::BIGINT AS trade_count,
               coalesce(sum(volume){forming}, 0)::DECIMAL(28,8) AS volume,
               coalesce(sum(quote_volume){forming}, 0)::DECIMAL(38,16) AS quote_volume,
               coalesce(sum(volume){buying}, 0)::DECIMAL(28,8) AS taker_buy_volume,
               coalesce(sum(quote_volume){buying}, 0)::DECIMAL(38,16) AS taker_buy_quote_volume,
               min(first_sequence) AS first_sequence,
               max(last_sequence) AS last_sequence,
               sum(volume)::DECIMAL(28,8) AS volume_all,
               sum(trades)::BIGINT AS trade_count_all
        FROM sided GROUP BY {keys}, bucket ORDER BY {keys}, bar_start
    """,
        params={"exchange": exchange, "trade_date": day} if constant else None,
    ).to_arrow_table()


def _single_value(column: pa.ChunkedArray):
    """The value every row of `column` holds (none null), else None; strings are compared as bytes, without
    hashing or comparing them one by one (a string min/max over 10 M rows costs 0.1 s)."""
    if len(column) == 0 or column.null_count:
        return None
    first = column[0].as_py()
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        low, high = pc.min_max(column).values()
        return first if low.as_py() == high.as_py() == first else None
    expected = first.encode()
    width = len(expected)
    for chunk in column.chunks:
        if not len(chunk):
            continue
        data = decode.fixed_width_bytes(chunk, width)
        if data is None or (width and not _repeats(data, expected)):
            return None
    return first


def _repeats(data: pa.Buffer, value: bytes) -> bool:
    """Whether `data` is `value` over and over: it starts with `value` and equals itself shifted by one value."""
    width = len(value)
    return data.slice(0, width).to_pybytes() == value and data.slice(width).equals(data.slice(0, data.size - width))


def _rollup_input(trades: pa.Table) -> tuple[pa.Table, bool, bool]:
    """The columns a rollup reads, whether every trade forms a price, and whether every trade counts once.

    With `forming` (price_forming; null, from before K2 classified trades, reads as true) unless every trade
    forms a price, and `units` (underlying trades: last_trade_id - first_trade_id + 1 for an aggTrade, else 1)
    unless every trade counts once."""
    n = trades.num_rows
    names = trades.column_names
    columns = ["exchange", "symbol", "trade_date", "exchange_timestamp", "source_sequence", "price", "quantity", "side"]
    rows = trades.select(columns)
    forming = pc.fill_null(trades.column("price_forming"), True) if "price_forming" in names and n else None
    every = forming is None or pc.all(forming).as_py()
    if not every:
        rows = rows.append_column("forming", forming)
    units = None
    if "vendor_data" in names and n:
        vendor = trades.column("vendor_data")
        first = pc.map_lookup(vendor, "first_trade_id", "first")
        if first.null_count < n:
            last = pc.map_lookup(vendor, "last_trade_id", "first")
            units = pc.fill_null(pc.add(pc.subtract(pc.cast(last, pa.int64()), pc.cast(first, pa.int64())), 1), 1)
    single = units is None or pc.max(units).as_py() == 1
    if not single:
        rows = rows.append_column("units", units)
    return rows, every, single


def one_minute_bars(
    trades: pa.Table,
    *,
    previous_close: dict[tuple[str, str], Decimal],
    complete_days: set[tuple[str, str]],
    snapshot_id: int,
    now: datetime | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
) -> pa.Table:
    """1m bars of a trades partition, empty minutes filled where the exchange does so.

    previous_close: (exchange, symbol) -> close before this partition, so a day can open with filled
    bars. complete_days: (exchange, symbol) whose day is over (later trades exist): filled to 23:59."""
    now = now or datetime.now(UTC)
    con = session(con)
    raw = bars_from_trades(trades, "1m", con)
    con.register("raw", raw)
    fills = []
    for exchange, symbol, day in con.sql("SELECT DISTINCT exchange, symbol, trade_date FROM raw").fetchall():
        if not FILL_EMPTY_BARS.get(exchange):
            continue
        start, end = session_bounds(exchange, day)
        seed = previous_close.get((exchange, symbol))
        fills.append(
            (
                exchange,
                symbol,
                day,
                start if seed is not None else None,
                end - timedelta(minutes=1) if (exchange, symbol) in complete_days else None,
                seed,
            )
        )
    grid = pa.table(
        {
            "exchange": pa.array([f[0] for f in fills], pa.string()),
            "symbol": pa.array([f[1] for f in fills], pa.string()),
            "trade_date": pa.array([f[2] for f in fills], pa.date32()),
            "grid_start": pa.array([f[3] for f in fills], pa.timestamp("us", tz="UTC")),
            "grid_end": pa.array([f[4] for f in fills], pa.timestamp("us", tz="UTC")),
            "seed_close": pa.array([f[5] for f in fills], pa.decimal128(18, 8)),
        }
    )
    con.register("grid", grid)
    bars = con.sql("""
        WITH spans AS (
            SELECT g.exchange, g.symbol, g.trade_date, g.seed_close,
                   coalesce(g.grid_start, min(r.bar_start)) AS first_minute, coalesce(g.grid_end, max(r.bar_start)) AS last_minute
            FROM grid g JOIN raw r USING (exchange, symbol, trade_date)
            GROUP BY g.exchange, g.symbol, g.trade_date, g.seed_close, g.grid_start, g.grid_end
        ),
        minutes AS (
            SELECT exchange, symbol, trade_date, seed_close,
                   unnest(generate_series(first_minute, last_minute, INTERVAL 1 minute)) AS bar_start
            FROM spans
        ),
        joined AS (
            SELECT m.exchange, m.symbol, m.trade_date, m.bar_start, m.seed_close,
                   r.* EXCLUDE (exchange, symbol, trade_date, bar_start)
            FROM minutes m LEFT JOIN raw r USING (exchange, symbol, trade_date, bar_start)
        ),
        carried AS (
            SELECT *, coalesce(last_value(close IGNORE NULLS) OVER (PARTITION BY exchange, symbol ORDER BY bar_start
                                ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), seed_close) AS prev_close
            FROM joined
        )
        SELECT exchange, symbol, trade_date, bar_start,
               coalesce(open, prev_close) AS open, coalesce(high, prev_close) AS high, coalesce(low, prev_close) AS low,
               coalesce(close, prev_close) AS close,
               coalesce(trade_count, 0)::BIGINT AS trade_count, coalesce(volume, 0)::DECIMAL(28,8) AS volume,
               coalesce(quote_volume, 0)::DECIMAL(38,16) AS quote_volume,
               coalesce(taker_buy_volume, 0)::DECIMAL(28,8) AS taker_buy_volume,
               coalesce(taker_buy_quote_volume, 0)::DECIMAL(38,16) AS taker_buy_quote_volume,
               first_sequence, last_sequence, open IS NULL AS filled,
               coalesce(volume_all, 0)::DECIMAL(28,8) AS volume_all, coalesce(trade_count_all, 0)::BIGINT AS trade_count_all
        FROM carried
        UNION ALL
        SELECT exchange, symbol, trade_date, bar_start, open, high, low, close, trade_count, volume, quote_volume,
               taker_buy_volume, taker_buy_quote_volume, first_sequence, last_sequence, false AS filled,
               volume_all, trade_count_all
        FROM raw WHERE (exchange, symbol, trade_date) NOT IN (SELECT (exchange, symbol, trade_date) FROM grid)
        ORDER BY exchange, symbol, bar_start
    """).to_arrow_table()
    return _finish(bars, "1m", snapshot_id, now, con)


def derive(
    bars: pa.Table, interval: str, snapshot_id: int, now: datetime | None = None, con: duckdb.DuckDBPyConnection | None = None
) -> pa.Table:
    """Coarser bars from 1m bars: 5m and 1h by UTC bucket, 1d by session (trade_date)."""
    now = now or datetime.now(UTC)
    con = session(con)
    con.register("m", bars)
    if interval == "1d":
        bucket = "trade_date"
    elif interval in BUCKETS:
        bucket = f"time_bucket(INTERVAL '{BUCKETS[interval]}', bar_start)"
    else:
        raise ValueError(f"interval must be one of {schemas.INTERVALS}")
    out = con.sql(f"""
        SELECT exchange, symbol, trade_date, {bucket} AS bucket,
               -- Minutes without a price-forming trade (filled at the previous close) only shape a bar that has none.
               coalesce(arg_min(open, bar_start) FILTER (WHERE trade_count > 0),
                        arg_min(open, bar_start) FILTER (WHERE open IS NOT NULL)) AS open,
               coalesce(max(high) FILTER (WHERE trade_count > 0), max(high)) AS high,
               coalesce(min(low) FILTER (WHERE trade_count > 0), min(low)) AS low,
               coalesce(arg_max(close, bar_start) FILTER (WHERE trade_count > 0),
                        arg_max(close, bar_start) FILTER (WHERE open IS NOT NULL)) AS close,
               sum(trade_count)::BIGINT AS trade_count, sum(volume)::DECIMAL(28,8) AS volume,
               sum(quote_volume)::DECIMAL(38,16) AS quote_volume, sum(taker_buy_volume)::DECIMAL(28,8) AS taker_buy_volume,
               sum(taker_buy_quote_volume)::DECIMAL(38,16) AS taker_buy_quote_volume,
               min(first_sequence) AS first_sequence, max(last_sequence) AS last_sequence, bool_and(filled) AS filled,
               sum(volume_all)::DECIMAL(28,8) AS volume_all, sum(trade_count_all)::BIGINT AS trade_count_all
        FROM m GROUP BY ALL ORDER BY exchange, symbol, bucket
    """).to_arrow_table()
    if interval == "1d":
        starts = [session_bounds(e, d)[0] for e, d in zip(out.column("exchange").to_pylist(), out.column("bucket").to_pylist())]
        out = out.set_column(out.schema.get_field_index("bucket"), "bar_start", pa.array(starts, pa.timestamp("us", tz="UTC")))
    else:
        out = out.rename_columns([c if c != "bucket" else "bar_start" for c in out.column_names])
    return _finish(out, interval, snapshot_id, now, con)


def _finish(bars: pa.Table, interval: str, snapshot_id: int, now: datetime, con: duckdb.DuckDBPyConnection) -> pa.Table:
    """Add VWAP, interval and lineage columns and conform to the ohlcv_v1 contract."""
    con.register("b", bars)
    vwap = (
        con.sql("""
        SELECT CASE WHEN volume > 0 THEN round(quote_volume::DOUBLE / volume::DOUBLE, 8)::DECIMAL(18,8) END AS vwap FROM b
    """)
        .to_arrow_table()
        .column("vwap")
    )
    n = bars.num_rows
    columns = {name: bars.column(name) for name in bars.column_names}
    columns.update(
        interval=pa.repeat(pa.scalar(interval), n),
        vwap=vwap,
        source_snapshot_id=pa.repeat(pa.scalar(snapshot_id, pa.int64()), n),
        computed_at=pa.repeat(pa.scalar(now, pa.timestamp("us", tz="UTC")), n),
        bar_start=bars.column("bar_start").cast(pa.timestamp("us", tz="UTC")),
    )
    return schemas.build_table(schemas.OHLCV, columns, n)
