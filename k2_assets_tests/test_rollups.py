"""OHLCV rollups: equal to Binance's own bars, equal to a recompute from raw trades, reproducible as of a snapshot."""

from __future__ import annotations

import csv
from datetime import UTC, datetime, timedelta
from decimal import Decimal, localcontext

import dagster as dg
import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pyiceberg.expressions import And, EqualTo

from k2_assets.core import rollups, schemas, writer
from k2_assets.defs.asx.assets import asx_trades
from k2_assets.defs.binance.assets import binance_trades_history
from k2_assets.defs.resources import IcebergResource
from k2_assets.defs.rollups.assets import ohlcv_1d, ohlcv_1h, ohlcv_1m, ohlcv_5m
from k2_assets.defs.rollups.checks import (
    ohlcv_1d_matches_raw_trades,
    ohlcv_1h_matches_raw_trades,
    ohlcv_1m_matches_raw_trades,
    ohlcv_5m_matches_raw_trades,
)
from k2_assets_tests.conftest import make_resources, split_by_day

ROLLUPS = [
    ohlcv_1m,
    ohlcv_5m,
    ohlcv_1h,
    ohlcv_1d,
    ohlcv_1m_matches_raw_trades,
    ohlcv_5m_matches_raw_trades,
    ohlcv_1h_matches_raw_trades,
    ohlcv_1d_matches_raw_trades,
]
XRP = "freqtrade_binance_xrpeth_aggtrades_vs_1m"


def test_one_minute_bars_equal_binance_bars_for_every_minute(shared_data, tmp_path, catalog_props, catalog):
    days = split_by_day(shared_data / XRP / "XRPETH-aggTrades-2019-10-11_2019-10-13.derived.csv", tmp_path / "history")
    resources = make_resources(catalog_props, binance_dir=tmp_path / "history")
    for day in days:
        assert dg.materialize([binance_trades_history], partition_key=day, resources=resources).success
    for day in days:
        result = dg.materialize(ROLLUPS, partition_key=day, resources=resources)
        assert result.success
        evaluations = result.get_asset_check_evaluations()
        assert len(evaluations) == 4 and all(e.passed for e in evaluations)  # matches_raw_trades on every interval
    bars = catalog.load_table("market.ohlcv_1m").scan(row_filter=EqualTo("symbol", "XRPETH")).to_arrow()
    mine = {int(b["bar_start"].timestamp() * 1000): b for b in bars.to_pylist()}
    with open(shared_data / XRP / "XRPETH-1m-2019-10-11_2019-10-13.derived.csv", newline="") as f:
        reference = list(csv.reader(f))[1:]
    assert len(reference) == 3560 == len(mine)
    for open_ms, o, h, low, c, v in reference:
        bar = mine[int(open_ms)]
        assert (bar["open"], bar["high"], bar["low"], bar["close"], bar["volume"]) == tuple(map(Decimal, (o, h, low, c, v))), (
            open_ms
        )
    traded = [b for b in mine.values() if not b["filled"]]
    assert len(traded) == 2469 and len(mine) - len(traded) == 1091  # the MANIFEST's own count of empty minutes
    assert all(b["volume"] == 0 and b["open"] == b["close"] and b["trade_count"] == 0 for b in mine.values() if b["filled"])

    daily = catalog.load_table("market.ohlcv_1d").scan().to_arrow().sort_by("bar_start").to_pylist()
    assert [d["trade_date"].isoformat() for d in daily] == days
    # The exchange counts underlying trades: 12,477 aggTrades span 14,672 trade ids (the MANIFEST's count).
    assert sum(d["trade_count"] for d in daily) == sum(d["trade_count_all"] for d in daily) == 14672
    trades = catalog.load_table("market.trades").scan(selected_fields=("vendor_data",)).to_arrow().column("vendor_data")
    assert trades.length() == 12477
    spans = [int(v["last_trade_id"]) - int(v["first_trade_id"]) + 1 for v in map(dict, trades.to_pylist())]
    assert sum(spans) == 14672
    assert daily[0]["open"] == Decimal(reference[0][1]) and daily[-1]["close"] == Decimal(reference[-1][4])


def test_asx_bars_follow_the_vendor_convention_and_derive_consistently(asx_dir, catalog_props, catalog):
    resources = make_resources(catalog_props, asx_dir=asx_dir)
    assert dg.materialize([asx_trades], partition_key="2014-03-10", resources=resources).success
    result = dg.materialize(ROLLUPS, partition_key="2014-03-10", resources=resources)
    assert result.success and len(result.get_asset_check_evaluations()) == 4
    assert all(e.passed for e in result.get_asset_check_evaluations())
    minute = catalog.load_table("market.ohlcv_1m").scan().to_arrow()
    assert pc.sum(minute.column("filled")).as_py() == 0  # no bar for a minute without trades
    trades = catalog.load_table("market.trades").scan().to_arrow()
    forming = trades.filter(trades.column("price_forming"))
    assert pc.sum(minute.column("trade_count_all")).as_py() == trades.num_rows > pc.sum(minute.column("trade_count")).as_py()
    assert pc.sum(minute.column("trade_count")).as_py() == forming.num_rows
    assert pc.sum(minute.column("volume")).as_py() == pc.sum(forming.column("quantity")).as_py()
    assert pc.sum(minute.column("volume_all")).as_py() == pc.sum(trades.column("quantity")).as_py()
    # BHP's session starts with an off-market report: its minute keeps the trade and forms no price.
    bhp = minute.filter(pc.equal(minute.column("symbol"), "BHP")).sort_by("bar_start").to_pylist()
    assert bhp[0]["first_sequence"] == 1 and bhp[0]["open"] is None and bhp[0]["trade_count_all"] > bhp[0]["trade_count"] == 0
    # Open is decided by (time, sequence): the first priced bar opens at the session's first price-forming trade.
    first = forming.filter(pc.equal(forming.column("symbol"), "BHP")).sort_by(
        [("exchange_timestamp", "ascending"), ("source_sequence", "ascending")]
    )
    priced = [b for b in bhp if b["open"] is not None]
    assert (
        priced[0]["open"] == first.column("price")[0].as_py()
        and priced[0]["first_sequence"] <= first.column("source_sequence")[0].as_py()
    )
    bhp = priced
    (day,) = [d for d in catalog.load_table("market.ohlcv_1d").scan().to_arrow().to_pylist() if d["symbol"] == "BHP"]
    assert day["bar_start"] == datetime(2014, 3, 9, 13, tzinfo=UTC)  # the Sydney session day
    assert day["high"] == max(b["high"] for b in bhp) and day["close"] == bhp[-1]["close"]
    (event,) = result.asset_materializations_for_node("ohlcv_1m")
    assert event.metadata["chart"].value.startswith("![")  # the candlestick PNG, inline


def test_time_travel_reproduces_the_bars_published_before_a_correction(asx_dir, catalog_props, catalog):
    resources = make_resources(catalog_props, asx_dir=asx_dir)
    assert dg.materialize([asx_trades], partition_key="2014-03-11", resources=resources).success
    assert dg.materialize(ROLLUPS, partition_key="2014-03-11", resources=resources).success
    first_5m = catalog.load_table("market.ohlcv_5m").scan().to_arrow()
    published_from = catalog.load_table("market.trades").current_snapshot().snapshot_id

    # A correction: BHP's first price-forming trade of the session was really at 99.00.
    trades = catalog.load_table("market.trades")
    bhp = trades.scan(row_filter=And(EqualTo("symbol", "BHP"), EqualTo("trade_date", "2014-03-11"))).to_arrow()
    first = pc.min(bhp.filter(bhp.column("price_forming")).column("source_sequence")).as_py()
    index = pc.index(bhp.column("source_sequence"), first).as_py()
    price = bhp.column("price").to_pylist()
    price[index] = Decimal("99.00000000")
    corrected = bhp.set_column(
        bhp.schema.get_field_index("price"), bhp.schema.field("price"), pa.array(price, bhp.schema.field("price").type)
    )
    writer.replace_rows(trades, corrected, And(EqualTo("symbol", "BHP"), EqualTo("trade_date", "2014-03-11")))
    assert dg.materialize(ROLLUPS, partition_key="2014-03-11", resources=resources).success
    assert (
        not catalog.load_table("market.ohlcv_5m")
        .scan()
        .to_arrow()
        .select(["symbol", "bar_start", "high"])
        .equals(first_5m.select(["symbol", "bar_start", "high"]))
    )

    # The time-travel backfill: as of the old snapshot, the bars are exactly those first published.
    config = {
        "ops": {
            name: {"config": {"as_of_snapshot_id": published_from}} for name in ("ohlcv_1m", "ohlcv_5m", "ohlcv_1h", "ohlcv_1d")
        }
    }
    result = dg.materialize(ROLLUPS, partition_key="2014-03-11", resources=resources, run_config=config)
    assert result.success
    again = catalog.load_table("market.ohlcv_5m").scan().to_arrow()
    keys = [
        "exchange",
        "symbol",
        "bar_start",
        "open",
        "high",
        "low",
        "close",
        "volume",
        "quote_volume",
        "trade_count",
        "source_snapshot_id",
    ]
    assert (
        again.select(keys)
        .sort_by([("symbol", "ascending"), ("bar_start", "ascending")])
        .equals(first_5m.select(keys).sort_by([("symbol", "ascending"), ("bar_start", "ascending")]))
    )
    (event,) = result.asset_materializations_for_node("ohlcv_1m")
    assert event.metadata["trades_snapshot_id"].value == str(published_from)
    assert IcebergResource(**catalog_props).table("ohlcv_1m").current_snapshot().summary["k2.as_of"] == "True"


def test_new_trades_cascade_into_bars_by_declarative_automation(asx_dir, catalog_props):
    from k2_assets.defs.binance.assets import binance_trades

    defs = dg.Definitions(
        assets=[asx_trades, binance_trades_history, binance_trades, *ROLLUPS],
        resources=make_resources(catalog_props, asx_dir=asx_dir),
    )
    instance = dg.DagsterInstance.ephemeral()
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert result.total_requested == 0  # nothing has changed yet
    cursor = result.cursor
    assert dg.materialize(
        [asx_trades], partition_key="2014-03-12", instance=instance, resources=make_resources(catalog_props, asx_dir=asx_dir)
    ).success
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
    assert result.get_requested_partitions(dg.AssetKey("ohlcv_1m")) == {"2014-03-12"}
    # The derived bars follow in the same request, in dependency order.
    for interval in ("5m", "1h", "1d"):
        assert result.get_requested_partitions(dg.AssetKey(f"ohlcv_{interval}")) == {"2014-03-12"}
    # A live micro-batch reported by the sensor counts as a change too.
    instance.report_runless_asset_event(dg.AssetMaterialization("binance_trades", partition="2024-01-01"))
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
    assert result.get_requested_partitions(dg.AssetKey("ohlcv_1m")) == {"2024-01-01"}


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(
        st.one_of(st.none(), st.sampled_from(["ASX", "BINANCE", "BINANCE_UM", "", "ASXASX", "AS", "Ü"])), max_size=40
    ),
    cut=st.integers(0, 40),
    offset=st.integers(0, 5),
    large=st.booleans(),
)
def test_a_column_is_single_valued_exactly_when_every_row_holds_one_value(values, cut, offset, large):
    """The rollup drops exchange and trade_date from its group keys only when the whole column holds one value:
    checked over chunked, sliced and large strings, nulls and values that repeat each other's bytes."""
    kind = pa.large_string() if large else pa.string()
    arrays = [pa.array(values[:cut], kind), pa.array(["X"] * offset + values[cut:], kind).slice(offset)]
    column = pa.chunked_array(arrays, kind)
    distinct = set(values)
    expected = values[0] if values and len(distinct) == 1 and None not in distinct else None
    assert rollups._single_value(column) == expected
    dates = pa.chunked_array([pa.array([len(v) if v else None for v in values], pa.int32()).cast(pa.date32())])
    lengths = {len(v) if v else None for v in values}
    expect_date = dates[0].as_py() if values and len(lengths) == 1 and None not in lengths else None
    assert rollups._single_value(dates) == expect_date


def test_each_session_is_hardened_and_sees_only_its_own_tables(tmp_path):
    """Sessions share one in-memory database but nothing else: a table registered in one is unknown to the next,
    each clock is UTC, and none reads a file."""
    first, second = rollups.session(), rollups.session()
    first.register("trades", pa.table({"price": [1]}))
    with pytest.raises(duckdb.CatalogException):
        second.sql("SELECT * FROM trades")
    first.execute("SET TimeZone = 'Australia/Sydney'")
    assert rollups.session().execute("SELECT current_setting('TimeZone')").fetchone()[0] == "UTC"
    (tmp_path / "x.csv").write_text("a\n1\n")
    with pytest.raises(duckdb.PermissionException):
        second.sql(f"SELECT * FROM read_csv('{tmp_path / 'x.csv'}')")


TRADE = st.tuples(
    st.sampled_from(["BINANCE", "ASX"]),
    st.sampled_from(["BTCUSDT", "BHP"]),
    st.integers(0, 1),  # day
    st.sampled_from([0, 1, 59_999_999, 60_000_000, 299_999_999, 300_000_001, 3_600_000_000]),  # µs into the day
    st.integers(1, 10**17),  # price, 1e-8 units
    st.integers(1, 10**12),  # quantity, 1e-8 units
    st.sampled_from(["BUY", "SELL", "UNKNOWN"]),
    st.sampled_from([None, True, False]),  # price_forming
    st.one_of(st.none(), st.tuples(st.integers(0, 10**12), st.integers(0, 50))),  # aggTrade ids: first, count - 1
)


@settings(max_examples=250, deadline=None)
@given(
    trades=st.lists(TRADE, max_size=30),
    interval=st.sampled_from(["1m", "5m", "1h"]),
    first_sequence=st.sampled_from([0, 1 << 36, 1 << 61]),
)
# A quote volume of 29 digits, one more than Python's default decimal context keeps (found by CI).
@example(
    trades=[("BINANCE", "BTCUSDT", 0, 0, 99_996_400_005_604_259, 100_003_600_128, "BUY", None, None)],
    interval="1m",
    first_sequence=0,
)
def test_bars_equal_a_plain_recount_of_any_trades(trades, interval, first_sequence):
    """Every bar field equals a recount in Python with exact decimals, for any mix of exchanges, days, sides,
    price-forming flags, aggregate trades, equal times and sequences past what the one-integer order key holds."""
    day0 = datetime(2024, 1, 1, tzinfo=UTC)
    rows = [
        {
            "exchange": exchange,
            "symbol": symbol,
            "trade_date": (day0 + timedelta(days=day)).date(),
            "exchange_timestamp": day0 + timedelta(days=day, microseconds=us),
            "source_sequence": first_sequence + i,
            "price": Decimal(price).scaleb(-8),
            "quantity": Decimal(quantity).scaleb(-8),
            "side": side,
            "price_forming": forming,
            "vendor_data": [] if ids is None else [("first_trade_id", str(ids[0])), ("last_trade_id", str(sum(ids)))],
        }
        for i, (exchange, symbol, day, us, price, quantity, side, forming, ids) in enumerate(trades)
    ]
    schema = schemas.arrow_schema("trade_v2")
    table = pa.Table.from_pylist(rows, pa.schema([schema.field(name) for name in rows[0]] if rows else schema))
    width = timedelta(microseconds=rollups.BUCKET_MICROS[interval])
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        start = day0 + (row["exchange_timestamp"] - day0) // width * width
        groups.setdefault((row["exchange"], row["symbol"], row["trade_date"], start), []).append(row)
    expected = []
    # Exact sums: the default context keeps 28 digits, and a bar's quote volume can need 31.
    with localcontext(prec=60):
        for key, group in sorted(groups.items()):
            forming = [r for r in group if r["price_forming"] is not False]
            buying = [r for r in forming if r["side"] == "BUY"]
            ordered = sorted(forming, key=lambda r: (r["exchange_timestamp"], r["source_sequence"]))
            ids = [dict(r["vendor_data"]) for r in group]
            units = [int(i.get("last_trade_id", 0)) - int(i.get("first_trade_id", 0)) + 1 for i in ids]
            weight = {id(r): u for r, u in zip(group, units, strict=True)}
            expected.append(
                dict(
                    zip(("exchange", "symbol", "trade_date", "bar_start"), key),
                    open=ordered[0]["price"] if ordered else None,
                    high=max((r["price"] for r in forming), default=None),
                    low=min((r["price"] for r in forming), default=None),
                    close=ordered[-1]["price"] if ordered else None,
                    trade_count=sum(weight[id(r)] for r in forming),
                    volume=sum(r["quantity"] for r in forming),
                    quote_volume=sum(r["price"] * r["quantity"] for r in forming),
                    taker_buy_volume=sum(r["quantity"] for r in buying),
                    taker_buy_quote_volume=sum(r["price"] * r["quantity"] for r in buying),
                    first_sequence=min(r["source_sequence"] for r in group),
                    last_sequence=max(r["source_sequence"] for r in group),
                    volume_all=sum(r["quantity"] for r in group),
                    trade_count_all=sum(units),
                )
            )
    assert rollups.bars_from_trades(table, interval).to_pylist() == expected
