"""k2_assets.core.query over a real SQLite-catalog warehouse holding the real ASX and BTCUSDT trades.

Expected values are computed independently from the vendor files (pyarrow.csv / csv + Decimal +
zoneinfo), never from K2's decoder or from the engine itself.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import duckdb
import hypothesis
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from k2_assets.cli import main as k2_main
from k2_assets.cli.common import settings
from k2_assets.core import asx, binance_history, query, schemas, writer
from k2_assets.core import catalog as k2_catalog
from k2_assets.core.query import (
    InvalidLimit,
    InvalidTimeRange,
    InvalidValue,
    QueryEngine,
    QueryError,
    QueryTimeout,
    UnknownColumn,
    UnknownExchange,
    UnknownInterval,
    UnknownSnapshot,
    UnknownSymbol,
)
from k2_assets_tests.conftest import REPO, shared_data_dir

SYDNEY = ZoneInfo("Australia/Sydney")
SESSIONS = (date(2014, 3, 10), date(2014, 3, 11))
BTC_DAY = date(2024, 1, 1)
BTC_FILE = "BTCUSDT-trades-2024-01-01_1200-1230.derived.csv"
INJECTION = "BHP' OR 1=1 --"


# ---------------------------------------------------------------- loading (through K2's core loaders)


def load_asx(cat, asx_dir: Path, sessions=SESSIONS) -> None:
    trades = k2_catalog.ensure_table(cat, "trades")
    for day in sessions:
        batch = asx.load_session(asx_dir, day, "trades", source="asx_trades")
        writer.replace_rows(trades, batch.rows, writer.partition_filter(asx.EXCHANGE, day))


def load_btc(cat, btcusdt_dir: Path):
    batch, notes = binance_history.load_day(btcusdt_dir, BTC_DAY, source="binance_trades_history")
    assert not notes
    trades = k2_catalog.ensure_table(cat, "trades")
    return writer.replace_rows(trades, batch.rows, writer.partition_filter("BINANCE", BTC_DAY)), batch


def bar_rows(symbol: str, day: date, minutes: int, first_price: Decimal, exchange: str = "BINANCE") -> pa.Table:
    """`minutes` 1m bars of ohlcv_v1, a deterministic walk: bar i opens at first_price + i/100."""
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    opens = [first_price + Decimal(i) / 100 for i in range(minutes)]
    qty = [Decimal(i % 7 + 1) for i in range(minutes)]

    def dec(values) -> pa.Array:
        return pa.array(values, pa.decimal128(38, 16))

    columns = {
        "exchange": pa.array([exchange] * minutes),
        "symbol": pa.array([symbol] * minutes),
        "interval": pa.array(["1m"] * minutes),
        "bar_start": pa.array([start + timedelta(minutes=i) for i in range(minutes)], pa.timestamp("us", tz="UTC")),
        "trade_date": pa.array([day] * minutes, pa.date32()),
        "open": dec(opens),
        "high": dec([o + Decimal("0.05") for o in opens]),
        "low": dec([o - Decimal("0.05") for o in opens]),
        "close": dec([o + Decimal("0.01") for o in opens]),
        "volume": dec(qty),
        "quote_volume": dec([o * q for o, q in zip(opens, qty)]),
        "vwap": dec(opens),
        "trade_count": pa.array([i % 5 + 1 for i in range(minutes)], pa.int64()),
        "taker_buy_volume": dec([q / 2 for q in qty]),
        "taker_buy_quote_volume": dec([o * q / 2 for o, q in zip(opens, qty)]),
        "first_sequence": pa.array([1000 + 10 * i for i in range(minutes)], pa.int64()),
        "last_sequence": pa.array([1009 + 10 * i for i in range(minutes)], pa.int64()),
        "filled": pa.array([False] * minutes),
        "source_snapshot_id": pa.array([1] * minutes, pa.int64()),
        "computed_at": pa.array([datetime(2024, 1, 2, tzinfo=UTC)] * minutes, pa.timestamp("us", tz="UTC")),
    }
    return schemas.build_table(schemas.OHLCV, columns, minutes)


# ---------------------------------------------------------------- independent expectations from the vendor files


def asx_source(asx_dir: Path) -> dict[tuple[date, str], dict]:
    """Per (session, symbol) from the vendor CSVs: count, volume, first/last UTC time, OHLC."""
    with open(asx_dir / "reference-data" / "company_info.csv", newline="") as f:
        symbols = {row["company_id"]: row["symbol"].strip().upper() for row in csv.DictReader(f)}
    names = ["date", "time", "price", "volume", "qualifiers", "venue", "buyer_id"]
    out: dict[tuple[date, str], dict] = {}
    for path in sorted((asx_dir / "trades").glob("*.csv")):
        table = pcsv.read_csv(
            path,
            read_options=pcsv.ReadOptions(column_names=names),
            convert_options=pcsv.ConvertOptions(column_types={n: pa.string() for n in names}),
        )
        groups = defaultdict(list)
        for i, (d, t, p, v) in enumerate(zip(*(table.column(n).to_pylist() for n in ("date", "time", "price", "volume")))):
            session = datetime.strptime(d, "%m/%d/%Y").date()
            local = datetime.strptime(f"{d} {t}", "%m/%d/%Y %H:%M:%S.%f").replace(tzinfo=SYDNEY)
            groups[session].append((local.astimezone(UTC), i, Decimal(p), Decimal(v)))
        for session, rows in groups.items():
            rows.sort(key=lambda r: (r[0], r[1]))  # exchange time, then vendor order
            out[(session, symbols[path.stem])] = {
                "trades": len(rows),
                "volume": sum(r[3] for r in rows),
                "first_time": rows[0][0],
                "last_time": rows[-1][0],
                "open": rows[0][2],
                "high": max(r[2] for r in rows),
                "low": min(r[2] for r in rows),
                "close": rows[-1][2],
                "rows": rows,
            }
    return out


def btc_source(btcusdt_dir: Path) -> list[tuple[datetime, int, Decimal, Decimal]]:
    with open(btcusdt_dir / BTC_FILE, newline="") as f:
        rows = list(csv.reader(f))[1:]
    out = [(datetime.fromtimestamp(int(r[4]) / 1000, UTC), int(r[0]), Decimal(r[1]), Decimal(r[2])) for r in rows]
    return sorted(out, key=lambda r: (r[0], r[1]))


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sources():
    data = shared_data_dir()
    return {
        "asx_dir": data / "asx_k2",
        "btc_dir": data / "binance_spot_btcusdt_trades_2024-01-01_1200-1230",
        "asx": asx_source(data / "asx_k2"),
        "btc": btc_source(data / "binance_spot_btcusdt_trades_2024-01-01_1200-1230"),
    }


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory, sources):
    """Read-only tests share one warehouse (loading it per test would dominate the run): a real SQLite
    catalog opened exactly as the `catalog` fixture does, holding two real ASX sessions, the real
    BTCUSDT day, and 1m bars written with the ohlcv_v1 schema."""
    home = tmp_path_factory.mktemp("k2-query")
    cat = k2_catalog.open_catalog(f"sqlite:///{home}/catalog.db", f"file://{home}/warehouse")
    load_asx(cat, sources["asx_dir"])
    load_btc(cat, sources["btc_dir"])
    bars = pa.concat_tables(
        [bar_rows("BTCUSDT", BTC_DAY, 120, Decimal(42000)), bar_rows("ETHUSDT", BTC_DAY, 120, Decimal(2300))]
        + [bar_rows(f"SYM{i:02d}USDT", BTC_DAY, 1, Decimal(1)) for i in range(25)]
    )
    writer.replace_rows(k2_catalog.ensure_table(cat, "ohlcv_1m"), bars, writer.partition_filter("BINANCE", BTC_DAY))
    return cat


@pytest.fixture(params=["own connection", "DuckDBResource"])
def engine(warehouse, request):
    """The engine on its own DuckDB connection (the CLI), and on dagster-duckdb's resource (as Dagster runs it)."""
    if request.param == "own connection":
        with QueryEngine(warehouse) as e:
            yield e
        return
    from dagster_duckdb import DuckDBResource

    from k2_assets.core.rollups import DUCKDB_CONFIG

    with (
        DuckDBResource(database=":memory:", connection_config=DUCKDB_CONFIG).get_connection() as con,
        QueryEngine(warehouse, connection=con) as e,
    ):
        # The one hardened configuration holds on the resource's connection too: no file access.
        with pytest.raises(duckdb.Error):
            con.execute("SELECT * FROM read_csv('/etc/hostname')").fetchall()
        yield e


def sydney_day(day: date) -> tuple[str, str]:
    return f"{day.isoformat()}T00:00:00+11:00", f"{(day + timedelta(days=1)).isoformat()}T00:00:00+11:00"


# ---------------------------------------------------------------- results equal independent computations


def test_daily_summary_equals_the_vendor_files(engine, sources):
    result = engine.daily_summary("ASX", start_date="2014-03-10", end_date="2014-03-11").to_pylist()
    expected = {k: v for k, v in sources["asx"].items() if k[0] in SESSIONS}
    assert len(result) == len(expected) == 8  # 2 sessions x BHP, DVN, MWR, RIO
    for row in result:
        exp = expected[(row["trade_date"], row["symbol"])]
        assert row["exchange"] == "ASX"
        for key in ("trades", "volume", "first_time", "last_time", "open", "high", "low", "close"):
            assert row[key] == exp[key], (row["trade_date"], row["symbol"], key)
    # Binance: the real file's 16,702 trades and 296.54808 BTC.
    (btc,) = engine.daily_summary("BINANCE", "BTCUSDT", start_date=BTC_DAY, end_date=BTC_DAY).to_pylist()
    src = sources["btc"]
    assert (btc["trades"], btc["volume"]) == (len(src), sum(r[3] for r in src)) == (16702, Decimal("296.54808"))
    assert (btc["first_time"], btc["last_time"], btc["open"], btc["close"]) == (src[0][0], src[-1][0], src[0][2], src[-1][2])
    assert (btc["high"], btc["low"]) == (max(r[2] for r in src), min(r[2] for r in src))
    # No exchange: both, ordered by date.
    both = engine.daily_summary(start_date="2014-01-01", end_date="2024-12-31")
    assert both.num_rows == 9 and pc.sum(both.column("trades")).as_py() == sum(v["trades"] for v in expected.values()) + 16702


def test_one_symbol_day_of_trades_equals_the_vendor_rows(engine, sources):
    exp = sources["asx"][(date(2014, 3, 11), "BHP")]
    start, end = sydney_day(date(2014, 3, 11))
    result = engine.trades("ASX", "BHP", start, end, limit=100_000)
    assert result.num_rows == exp["trades"] == 21681
    assert pc.sum(result.column("quantity")).as_py() == exp["volume"]
    assert result.column("exchange_timestamp").to_pylist() == [r[0] for r in exp["rows"]]
    assert result.column("price").to_pylist() == [r[2] for r in exp["rows"]]
    assert set(result.column("symbol").to_pylist()) == {"BHP"}
    assert set(result.column("trade_date").to_pylist()) == {date(2014, 3, 11)}
    assert result.column_names == list(query.TRADE_COLUMNS)
    # The session date gives the same rows; so does a lowercase symbol and exchange.
    assert engine.trades("ASX", "BHP", trade_date="2014-03-11", limit=100_000).equals(result)
    assert engine.trades("asx", "bhp", start, end, limit=100_000).equals(result)
    # limit keeps the first trades by time
    first = engine.trades("ASX", "BHP", start, end, limit=20)
    assert first.equals(result.slice(0, 20))


def test_time_window_is_start_inclusive_end_exclusive(engine, sources):
    src = sources["btc"]
    start, end = datetime(2024, 1, 1, 12, 10, tzinfo=UTC), datetime(2024, 1, 1, 12, 20, tzinfo=UTC)
    expected = [r for r in src if start <= r[0] < end]
    result = engine.trades("BINANCE", "BTCUSDT", start, end, limit=100_000)
    assert result.num_rows == len(expected) > 1000
    assert result.column("source_sequence").to_pylist() == [r[1] for r in expected]
    # A window starting exactly at a trade includes it; ending exactly at it excludes it.
    t = src[500][0]
    at_t = [r for r in src if r[0] == t]
    assert engine.trades("BINANCE", "BTCUSDT", t, t + timedelta(microseconds=1)).num_rows == len(at_t)
    before = engine.trades("BINANCE", "BTCUSDT", src[0][0], t, limit=100_000)
    assert before.num_rows == len([r for r in src if r[0] < t])
    # ISO strings with Z, offsets or no offset (UTC) are the same instant.
    a = engine.trades("BINANCE", "BTCUSDT", "2024-01-01T12:10:00Z", "2024-01-01T23:20:00+11:00", limit=100_000)
    b = engine.trades("BINANCE", "BTCUSDT", "2024-01-01T12:10:00", "2024-01-01 12:20:00", limit=100_000)
    assert a.equals(result) and b.equals(result)


@hypothesis.settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_window_and_limit_give_the_first_trades_in_range(engine, sources, data):
    """For any [start, end) (on a trade's own time, between trades, or outside the day) and any limit,
    the rows are exactly the vendor's trades in range, by (time, sequence), the first `limit` of them."""
    src = sources["btc"]
    base = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
    moment = st.one_of(
        st.sampled_from([r[0] for r in src]),
        st.integers(-3_600_000_000, 5_400_000_000).map(lambda us: base + timedelta(microseconds=us)),
    )
    start, end = sorted([data.draw(moment), data.draw(moment)])
    end += timedelta(microseconds=data.draw(st.integers(1, 1000)))
    limit = data.draw(st.integers(1, 20_000))
    expected = [r[1] for r in src if start <= r[0] < end][:limit]
    result = engine.trades("BINANCE", "BTCUSDT", start, end, limit=limit, columns=["source_sequence", "exchange_timestamp"])
    assert result.column("source_sequence").to_pylist() == expected
    times = result.column("exchange_timestamp").to_pylist()
    assert all(start <= t < end for t in times) and times == sorted(times)


def test_filters_by_exchange_symbol_and_columns(engine, sources):
    asx_total = sum(v["trades"] for k, v in sources["asx"].items() if k[0] in SESSIONS)
    everything = engine.trades(limit=100_000)
    assert everything.num_rows == 100_000  # capped: the table holds more
    asx_summary = engine.daily_summary("ASX", start_date=SESSIONS[0], end_date=SESSIONS[-1])
    assert sum(asx_summary.column("trades").to_pylist()) == asx_total
    binance = engine.trades("BINANCE", limit=100_000)
    assert binance.num_rows == 16702 and set(binance.column("exchange").to_pylist()) == {"BINANCE"}
    ts = binance.column("exchange_timestamp").to_pylist()
    assert ts == sorted(ts)
    dvn = engine.trades(symbol="DVN", limit=100_000)  # any exchange
    assert dvn.num_rows == sum(sources["asx"][(day, "DVN")]["trades"] for day in SESSIONS)
    # Trades across two ASX sessions come in time order, across symbols.
    start, _ = sydney_day(SESSIONS[0])
    _, end = sydney_day(SESSIONS[1])
    both = engine.trades("ASX", start=start, end=end, limit=100_000, columns=["exchange_timestamp", "symbol", "quantity"])
    assert both.column_names == ["exchange_timestamp", "symbol", "quantity"]
    assert both.num_rows == asx_total
    times = both.column("exchange_timestamp").to_pylist()
    assert times == sorted(times)
    assert engine.trades("ASX", "RIO", columns="price,side").column_names == ["price", "side"]


def test_symbols_lists_what_the_table_holds(engine, sources):
    rows = engine.symbols().to_pylist()
    got = {(r["exchange"], r["symbol"]): r for r in rows}
    assert set(got) == {("ASX", "BHP"), ("ASX", "DVN"), ("ASX", "MWR"), ("ASX", "RIO"), ("BINANCE", "BTCUSDT")}
    for (exchange, symbol), row in got.items():
        if exchange == "ASX":
            counts = [sources["asx"].get((d, symbol), {"trades": 0})["trades"] for d in SESSIONS]
            assert row["row_count"] == sum(counts)
            assert (row["first_date"], row["last_date"]) == SESSIONS
    assert got[("BINANCE", "BTCUSDT")]["row_count"] == 16702
    assert engine.symbols("BINANCE").column("symbol").to_pylist() == ["BTCUSDT"]
    assert engine.symbols("BINANCE", table="ohlcv_1m").num_rows == 27
    with pytest.raises(QueryError, match="symbols\\(\\) lists the tables"):
        engine.symbols(table="rejected")


def test_bars_return_the_written_rows(engine):
    start, end = datetime(2024, 1, 1, 0, 30, tzinfo=UTC), datetime(2024, 1, 1, 1, 0, tzinfo=UTC)
    bars = engine.bars("1m", "BINANCE", "BTCUSDT", start, end)
    written = bar_rows("BTCUSDT", BTC_DAY, 120, Decimal(42000))
    expected = written.slice(30, 30)
    assert bars.num_rows == 30
    assert bars.column_names == list(query.BAR_COLUMNS)
    for col in ("bar_start", "open", "high", "low", "close", "volume", "quote_volume", "vwap", "trade_count", "filled"):
        assert bars.column(col).to_pylist() == expected.column(col).to_pylist(), col
    assert bars.column("open").to_pylist()[0] == Decimal("42000.30")
    all_bars = engine.bars("1m", "BINANCE", limit=100_000)
    assert all_bars.num_rows == 265
    assert all_bars.column("bar_start").to_pylist() == sorted(all_bars.column("bar_start").to_pylist())
    eth = engine.bars("1m", symbol="ETHUSDT", limit=5).column("open").to_pylist()
    assert eth == [Decimal(2300) + Decimal(i) / 100 for i in range(5)]
    # A table nobody has written yet is empty, not an error (and is not created by reading).
    assert engine.bars("5m").num_rows == 0
    assert "ohlcv_5m" not in {name for _, name in engine.catalog.list_tables("market")}


# ---------------------------------------------------------------- time travel


def test_as_of_snapshot_id_and_time_return_the_data_before_a_correction(catalog, btcusdt_dir):
    first, batch = load_btc(catalog, btcusdt_dir)
    table = catalog.load_table("market.trades")
    first_snapshot = table.snapshot_by_id(first.snapshot_id)
    first_time = datetime.fromtimestamp(first_snapshot.timestamp_ms / 1000, UTC)
    time.sleep(0.05)
    between = datetime.now(UTC)
    time.sleep(0.05)
    # The vendor corrects the day: the last 1,000 trades are withdrawn and one price changes.
    corrected = batch.rows.slice(0, batch.rows.num_rows - 1000)
    price = corrected.column("price").to_pylist()
    price[0] = Decimal("42000.00000000")
    field = corrected.schema.field("price")
    corrected = corrected.set_column(corrected.schema.get_field_index("price"), field, pa.array(price, field.type))
    second = writer.replace_rows(table, corrected, writer.partition_filter("BINANCE", BTC_DAY))
    assert second.snapshot_id != first.snapshot_id

    with QueryEngine(catalog, refresh_ms=0) as engine:
        now = engine.trades("BINANCE", "BTCUSDT", limit=100_000)
        assert now.num_rows == 15702 and now.column("price")[0].as_py() == Decimal(42000)
        older = (first.snapshot_id, str(first.snapshot_id), first_time, first_time.isoformat(), between, between.isoformat())
        for as_of in older:
            old = engine.trades("BINANCE", "BTCUSDT", as_of=as_of, limit=100_000)
            assert old.num_rows == 16702, as_of
            assert old.column("price")[0].as_py() == Decimal("42690.21")
        assert engine.trades("BINANCE", "BTCUSDT", as_of=second.snapshot_id, limit=100_000).num_rows == 15702
        assert engine.trades("BINANCE", "BTCUSDT", as_of=datetime.now(UTC), limit=100_000).num_rows == 15702
        (old_summary,) = engine.daily_summary(
            "BINANCE", start_date=BTC_DAY, end_date=BTC_DAY, as_of=first.snapshot_id
        ).to_pylist()
        assert old_summary["trades"] == 16702 and old_summary["volume"] == Decimal("296.54808")
        assert engine.symbols(as_of=first.snapshot_id).column("row_count").to_pylist() == [16702]

        with pytest.raises(UnknownSnapshot, match=r"snapshot 123456789 does not exist in market.trades; .*recent snapshot ids"):
            engine.trades(as_of=123456789)
        before = first_time - timedelta(seconds=10)
        with pytest.raises(UnknownSnapshot, match="is before the first snapshot of market.trades"):
            engine.trades(as_of=before)
        with pytest.raises(UnknownSnapshot, match="is before the first snapshot"):
            engine.symbols(as_of="2000-01-01T00:00:00Z")
        with pytest.raises(UnknownSnapshot, match="has no snapshots"):
            engine.bars("1h", as_of=first.snapshot_id)
        with pytest.raises(InvalidValue, match="not an ISO 8601"):
            engine.trades(as_of="yesterday")


def test_new_commits_are_seen_after_refresh_ms_and_cached_scans_are_reused(catalog, btcusdt_dir, asx_dir):
    load_btc(catalog, btcusdt_dir)
    with QueryEngine(catalog, refresh_ms=3_600_000) as engine:
        assert engine.symbols().column("symbol").to_pylist() == ["BTCUSDT"]
        a = engine.trades("BINANCE", "BTCUSDT", limit=500)
        info = engine.cache_info()
        b = engine.trades("BINANCE", "BTCUSDT", limit=500)
        assert a.equals(b)
        after = engine.cache_info()
        assert after["misses"] == info["misses"] and after["hits"] > info["hits"]  # no second Iceberg scan
        load_asx(catalog, asx_dir, sessions=(date(2014, 3, 12),))
        assert engine.symbols().column("symbol").to_pylist() == ["BTCUSDT"]  # metadata younger than refresh_ms
        engine.refresh()
        assert engine.symbols().column("symbol").to_pylist() == ["BHP", "DVN", "MWR", "RIO", "BTCUSDT"]
    with QueryEngine(catalog, refresh_ms=0, cache_bytes=1) as engine:  # nothing fits: still correct, never cached
        assert engine.trades("BINANCE", "BTCUSDT", limit=500).equals(a)
        assert engine.cache_info()["entries"] == 0 and engine.cache_info()["bytes"] == 0


# ---------------------------------------------------------------- errors and safety


def test_unknown_symbol_names_the_symbols_that_exist(engine):
    message = r"unknown symbol 'XYZ': market.trades has no rows of it on ASX; symbols present: BHP, DVN, MWR, RIO$"
    with pytest.raises(UnknownSymbol, match=message):
        engine.trades("ASX", "XYZ")
    with pytest.raises(UnknownSymbol, match="symbols present: BHP, BTCUSDT, DVN, MWR, RIO$"):
        engine.daily_summary(symbol="XYZ", start_date="2014-03-10", end_date="2014-03-10")
    with pytest.raises(UnknownSymbol, match="on BINANCE; symbols present: BTCUSDT$"):
        engine.trades("BINANCE", "BHP")  # BHP exists, but not on Binance
    with pytest.raises(UnknownSymbol) as too_many:
        engine.bars("1m", "BINANCE", "NOPE")
    message = str(too_many.value)
    assert "BTCUSDT, ETHUSDT, SYM00USDT" in message and "SYM17USDT, ... (27 in all)" in message and "SYM18USDT" not in message
    # A known symbol with nothing in the window is an empty result, not an error.
    assert engine.trades("ASX", "BHP", "2020-01-01", "2020-01-02").num_rows == 0


def test_an_injection_in_symbol_is_an_unknown_symbol_not_sql(engine):
    for attempt in (INJECTION, "BHP'; DROP TABLE src; --", 'x" OR "1"="1', "BHP%", "*"):
        with pytest.raises(UnknownSymbol, match="symbols present: BHP, DVN, MWR, RIO"):
            engine.trades("ASX", attempt)
        with pytest.raises(UnknownSymbol):
            engine.daily_summary("ASX", attempt, start_date="2014-03-10", end_date="2014-03-11")
    with pytest.raises(UnknownExchange):
        engine.trades("ASX' OR 1=1 --")
    with pytest.raises(UnknownColumn):
        engine.trades("ASX", columns=["price FROM src; --"])
    # Nothing was executed: the data is all still there.
    assert engine.symbols().num_rows == 5


def test_bad_arguments_raise_clear_query_errors(engine):
    cases = [
        (UnknownExchange, "unknown exchange 'NYSE'; K2 exchanges are ASX, BINANCE", lambda: engine.trades("NYSE")),
        (
            InvalidTimeRange,
            "time range is reversed or empty: start 2014-03-12T00:00:00\\+00:00 is not before end 2014-03-11",
            lambda: engine.trades("ASX", "BHP", "2014-03-12", "2014-03-11"),
        ),
        (InvalidTimeRange, "is not before end", lambda: engine.bars("1m", start="2024-01-01T01:00Z", end="2024-01-01T01:00Z")),
        (
            InvalidTimeRange,
            "date range is reversed: start_date 2014-03-11 is after end_date 2014-03-10",
            lambda: engine.daily_summary(start_date="2014-03-11", end_date="2014-03-10"),
        ),
        (InvalidLimit, "limit must be in 1..100,000, not 0", lambda: engine.trades(limit=0)),
        (InvalidLimit, "limit must be in 1..100,000, not 100,001", lambda: engine.trades(limit=100_001)),
        (InvalidLimit, "limit must be an integer", lambda: engine.trades(limit="10")),
        (InvalidLimit, "limit must be an integer", lambda: engine.bars(limit=True)),
        (UnknownInterval, "unknown interval '2m'; allowed intervals are 1m, 5m, 1h, 1d", lambda: engine.bars("2m")),
        (UnknownInterval, "allowed intervals", lambda: engine.bars("1m; DROP TABLE x")),
        (
            UnknownColumn,
            "unknown column\\(s\\) \\['nope'\\] for market.trades; its columns are message_id, ",
            lambda: engine.trades(columns=["price", "nope"]),
        ),
        (InvalidValue, "start 'soon' is not an ISO 8601 date/time", lambda: engine.trades(start="soon")),
        (
            InvalidValue,
            "start_date must be a date",
            lambda: engine.daily_summary(start_date=datetime(2014, 3, 10), end_date="2014-03-10"),
        ),
        (InvalidValue, "as_of must be a snapshot id or a time", lambda: engine.trades(as_of=True)),
        (QueryError, "unknown query 'drop'", lambda: engine.pandas("drop")),
    ]
    for kind, message, call in cases:
        with pytest.raises(kind, match=message):
            call()
    for kind, _, _ in cases:
        assert issubclass(kind, QueryError) and issubclass(kind, ValueError)
    bad_settings = (
        {"timeout_s": 0},
        {"memory_limit": "lots"},
        {"memory_limit": "1GB'; SET threads=99; --"},
        {"threads": 0},
        {"refresh_ms": -1},
    )
    for bad in bad_settings:
        with pytest.raises(InvalidValue):
            QueryEngine(engine.catalog, **bad)


def test_timeout_cancels_a_slow_query_and_the_engine_keeps_working(warehouse):
    with QueryEngine(warehouse, timeout_s=0.5) as engine:
        started = time.monotonic()
        with pytest.raises(QueryTimeout, match="query cancelled after its 0.5 s timeout"):
            # ~10^12 rows: hours if it were not interrupted.
            engine._execute("SELECT sum(a.range * b.range) FROM range(1000000) a, range(1000000) b", None, None)
        assert time.monotonic() - started < 5
        assert engine.trades("BINANCE", "BTCUSDT", limit=10).num_rows == 10
        # a per-call timeout through the same hook, and a fast query under a tiny one still finishes
        with pytest.raises(QueryTimeout):
            engine._execute("SELECT count(*) FROM range(1000000) a, range(1000000) b", None, None, timeout_s=0.05)
        assert engine._execute("SELECT 42 AS x", None, None).column("x").to_pylist() == [42]


def test_a_closed_engine_refuses_every_query(warehouse):
    engine = QueryEngine(warehouse)
    assert engine.trades("BINANCE", "BTCUSDT", limit=1).num_rows == 1
    engine.close()
    for query_call in (
        lambda: engine.trades("BINANCE", "BTCUSDT", limit=1),
        lambda: engine.bars("1m", "BINANCE", "BTCUSDT"),
        lambda: engine.symbols("BINANCE"),
    ):
        with pytest.raises(QueryError, match="the query engine is closed"):
            query_call()
    assert engine.cache_info()["entries"] == 0


def test_duckdb_is_limited_and_locked(warehouse):
    with QueryEngine(warehouse, memory_limit="64MB", threads=1) as engine:
        sql = "SELECT current_setting('memory_limit') AS m, current_setting('threads') AS t"
        settings = engine._execute(sql, None, None).to_pylist()[0]
        assert settings["t"] == 1 and settings["m"].endswith("MiB") and float(settings["m"].split()[0]) <= 64
        with pytest.raises(duckdb.Error, match="locked"):
            engine._execute("SET memory_limit = '100GB'", None, None)
        with pytest.raises(duckdb.Error, match="disabled by configuration"):
            engine._execute("SELECT * FROM read_csv('/etc/passwd')", None, None)
        with pytest.raises(QueryError, match="memory limit 64MB"):
            engine._execute("SELECT list(range) FROM range(100000000) GROUP BY range % 2", None, None)


def test_concurrent_queries_from_threads_agree(engine):
    start, end = sydney_day(date(2014, 3, 10))
    expected = {s: engine.trades("ASX", s, start, end, limit=100_000) for s in ("BHP", "RIO", "DVN")}
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda s: (s, engine.trades("ASX", s, start, end, limit=100_000)), ["BHP", "RIO", "DVN"] * 8))
    assert all(r.equals(expected[s]) for s, r in results)


def test_pandas_helper(engine):
    frame = engine.pandas("trades", "ASX", "BHP", trade_date="2014-03-11", limit=5)
    assert list(frame.columns) == list(query.TRADE_COLUMNS) and len(frame) == 5
    assert str(frame["price"].dtype) == "float64" and str(frame["exchange_timestamp"].dt.tz) == "UTC"
    exact = engine.pandas("daily_summary", "ASX", "BHP", start_date="2014-03-11", end_date="2014-03-11", exact=True)
    assert isinstance(exact["volume"][0], Decimal)


def test_query_package_does_not_import_dagster():
    modules = sorted((REPO / "k2_assets" / "core" / "query").glob("*.py"))
    assert len(modules) > 1
    for module in modules:
        tree = ast.parse(module.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not any(name.split(".")[0] == "dagster" for name in imported), (module.name, imported)


# ---------------------------------------------------------------- command line


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    # Libraries' import-time warnings are not the CLI's output: silence them here.
    return subprocess.run(
        [sys.executable, "-m", "k2_assets.cli", "query", *args],
        check=False,
        cwd=REPO,
        env={**env, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_cli_against_the_k2_home_catalog(k2_home, catalog, asx_dir, btcusdt_dir):
    load_asx(catalog, asx_dir, sessions=(date(2014, 3, 11),))
    first, _ = load_btc(catalog, btcusdt_dir)
    env = {**os.environ, "K2_HOME": str(k2_home)}  # K2_CATALOG_URI / K2_WAREHOUSE default from it
    start, end = sydney_day(date(2014, 3, 11))
    done = cli(
        "trades",
        "--symbol",
        "BHP",
        "--exchange",
        "ASX",
        "--start",
        start,
        "--end",
        end,
        "--limit",
        "20",
        "--format",
        "csv",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    with QueryEngine(catalog) as engine:
        expected = engine.trades("ASX", "BHP", start, end, limit=20).to_pylist()
    assert len(rows) == 20
    assert [r["message_id"] for r in rows] == [e["message_id"] for e in expected]
    assert [Decimal(r["price"]) for r in rows] == [e["price"] for e in expected]
    assert rows[0]["exchange_timestamp"] == expected[0]["exchange_timestamp"].isoformat().replace("+00:00", "Z")

    done = cli(
        "summary",
        "--start-date",
        "2024-01-01",
        "--end-date",
        "2024-01-01",
        "--format",
        "json",
        "--as-of",
        str(first.snapshot_id),
        env=env,
    )
    assert done.returncode == 0, done.stderr
    (summary,) = json.loads(done.stdout)
    assert (summary["symbol"], summary["trades"], summary["volume"]) == ("BTCUSDT", 16702, "296.54808")

    done = cli("trades", "--symbol", INJECTION, "--exchange", "ASX", env=env)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        'k2: error: unknown symbol "BHP\' OR 1=1 --": market.trades has no rows of it on ASX; symbols present: BHP, DVN, MWR, RIO'
    ]


@pytest.fixture
def fresh_settings():
    """`k2` reads its settings once per process; each in-process run here has its own K2_HOME."""
    settings.cache_clear()
    yield
    settings.cache_clear()


def test_cli_main_formats_and_one_line_errors(k2_home, catalog, btcusdt_dir, fresh_settings, capsys):
    """The same entry point in-process (each subprocess pays the package's Dagster import)."""
    load_btc(catalog, btcusdt_dir)
    assert k2_main(["query", "symbols"]) == 0
    out = capsys.readouterr().out
    assert "BTCUSDT" in out and "(1 row)" in out
    assert k2_main(["query", "bars", "--interval", "5m", "--exchange", "BINANCE"]) == 0
    assert "(0 rows)" in capsys.readouterr().out
    args = ["query", "trades", "--exchange", "BINANCE", "--limit", "3", "--format", "json", "--columns", "source_sequence,price"]
    assert k2_main(args) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"source_sequence": 3345206428 + i, "price": p} for i, p in enumerate(["42690.21", "42690.2", "42690.2"])
    ]
    for args, message in [
        (["bars", "--interval", "7m"], "k2: error: unknown interval '7m'; allowed intervals are 1m, 5m, 1h, 1d"),
        (["trades", "--limit", "0"], "k2: error: limit must be in 1..100,000, not 0"),
        (["trades", "--start", "2024-01-02", "--end", "2024-01-01"], "k2: error: time range is reversed or empty"),
        (["trades", "--exchange", "NYSE"], "k2: error: unknown exchange 'NYSE'"),
        (["trades", "--as-of", "1234567890123"], "k2: error: snapshot 1234567890123 does not exist in market.trades"),
        (
            ["summary", "--start-date", "2024-01-01", "--end-date", "2024-01-01", "--symbol", "ETHUSDT"],
            "k2: error: unknown symbol 'ETHUSDT'",
        ),
        (["trades", "--memory-limit", "lots"], "k2: error: memory_limit 'lots' is not a size"),
        (["trades", "--limit", "abc"], "k2 query trades: error: Invalid value for '--limit': 'abc' is not a valid integer"),
        (
            ["summary", "--start-date", "2024-13-01", "--end-date", "2024-01-01"],
            "k2 query summary: error: Invalid value for '--start-date': '2024-13-01' is not a YYYY-MM-DD date",
        ),
    ]:
        assert k2_main(["query", *args]) == 2, args
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), (args, captured.err)
        assert captured.out == ""
