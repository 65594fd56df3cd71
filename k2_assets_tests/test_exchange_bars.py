"""The exchange's own bars (market.exchange_bars) and K2's bars proven equal to them (matches_exchange_bars)."""

from __future__ import annotations

import csv
import shutil
import zipfile
from datetime import UTC, date, datetime
from decimal import ROUND_DOWN, ROUND_HALF_EVEN, Decimal

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import EqualTo

from k2_assets.core import binance_history, reconcile, rollups
from k2_assets.core.klines import COLUMNS
from k2_assets.defs.binance.assets import binance_trades_history
from k2_assets.defs.binance.klines import binance_klines
from k2_assets.defs.rollups.assets import ohlcv_1m
from k2_assets.defs.rollups.exchange_check import matches_exchange_bars
from k2_assets_tests.conftest import make_resources, split_by_day
from k2_assets_tests.test_report import k2_report

KLINES = "binance_spot_btcusdt_1m_klines_2020-01-01"
XRP = "freqtrade_binance_xrpeth_aggtrades_vs_1m"
BTC_TRADES = "binance_spot_btcusdt_trades_2024-01-01_1200-1230"


def _exchange_bars(catalog, day: str) -> list[dict]:
    return (
        catalog.load_table("market.exchange_bars")
        .scan(row_filter=EqualTo("trade_date", day))
        .to_arrow()
        .sort_by("bar_start")
        .to_pylist()
    )


def test_the_real_spot_kline_dump_loads_as_the_exchange_published_it(shared_data, tmp_path, catalog_props, catalog):
    resources = make_resources(catalog_props, binance_dir=shared_data / KLINES)
    result = dg.materialize([binance_klines], partition_key="2020-01-01", resources=resources)
    assert result.success
    bars = _exchange_bars(catalog, "2020-01-01")
    assert len(bars) == 1440 and bars[0]["bar_start"] == datetime(2020, 1, 1, tzinfo=UTC)
    assert (bars[0]["open"], bars[0]["trade_count"], bars[0]["quote_volume"]) == (
        Decimal("7195.24"),
        493,
        Decimal("371233.51835535"),
    )
    # The day as Binance's own 1d kline has it (reference_values_binance_spot_klines.md; its count matches the trades zip)
    assert sum(b["trade_count"] for b in bars) == 194_010
    assert max(b["high"] for b in bars) == Decimal("7255.00") and min(b["low"] for b in bars) == Decimal("7175.15")
    assert bars[-1]["close"] == Decimal("7200.85")
    assert sum(b["volume"] for b in bars).quantize(Decimal("0.01"), ROUND_DOWN) == Decimal(
        "16792.38"
    )  # the reference cuts to 2 places
    metadata = result.asset_materializations_for_node("binance_klines")[0].metadata
    assert metadata["rows_read"].value == 1440 and metadata["rows_rejected"].value == 0


def test_a_header_microseconds_and_bad_lines_load_the_same_bars_or_are_rejected_with_reasons(
    shared_data, tmp_path, catalog_props, catalog
):
    with zipfile.ZipFile(shared_data / KLINES / "BTCUSDT-1m-2020-01-01.zip") as z:
        lines = z.read(z.namelist()[0]).decode().splitlines()
    micro = []
    for line in lines:  # the spot dumps' layout from 2025: the same values, times in µs
        f = line.split(",")
        f[0], f[6] = str(int(f[0]) * 1000), str(int(f[6]) * 1000 + 999)
        micro.append(",".join(f))
    broken = list(micro)
    broken[10] = broken[10].replace(broken[10].split(",")[2], "1.0", 1)  # high below the low
    broken[20] = "not,a,kline"
    history = tmp_path / "history" / "spot"
    history.mkdir(parents=True)
    (history / "BTCUSDT-1m-2020-01-01.csv").write_text(",".join(COLUMNS) + "\n" + "\n".join(broken) + "\n")
    result = dg.materialize(
        [binance_klines], partition_key="2020-01-01", resources=make_resources(catalog_props, binance_dir=tmp_path / "history")
    )
    assert result.success
    bars = _exchange_bars(catalog, "2020-01-01")
    assert len(bars) == 1438 and sum(b["trade_count"] for b in bars) < 194_010
    assert bars[0]["bar_end"] == datetime(2020, 1, 1, 0, 0, 59, 999999, tzinfo=UTC)
    rejected = catalog.load_table("market.rejected").scan(row_filter=EqualTo("source", "binance_klines")).to_arrow().to_pylist()
    reasons = {r["source_row"]: r["reason"] for r in rejected}
    assert reasons == {12: "high is below open", 22: "expected 12 comma-separated fields, found 3"}
    ledger = catalog.load_table("market.source_files").scan().to_arrow().to_pylist()
    assert [(f["lines_read"], f["lines_written"], f["lines_rejected"]) for f in ledger] == [(1440, 1438, 2)]


def _load_xrp(shared_data, tmp_path, catalog_props) -> tuple[list[str], dict]:
    history = tmp_path / "history"
    days = split_by_day(shared_data / XRP / "XRPETH-aggTrades-2019-10-11_2019-10-13.derived.csv", history)
    assert split_by_day(shared_data / XRP / "XRPETH-1m-2019-10-11_2019-10-13.derived.csv", history, 0, "XRPETH-1m") == days
    resources = make_resources(catalog_props, binance_dir=history)
    for day in days:
        assert dg.materialize([binance_trades_history, binance_klines], partition_key=day, resources=resources).success
    return days, resources


def _check(day: str, resources: dict, instance: dg.DagsterInstance | None = None) -> dg.AssetCheckEvaluation:
    result = dg.materialize(
        [ohlcv_1m, matches_exchange_bars], partition_key=day, resources=resources, raise_on_error=False, instance=instance
    )
    evaluations = [e for e in result.get_asset_check_evaluations() if e.check_name == "matches_exchange_bars"]
    assert len(evaluations) == 1
    return evaluations[0]


def test_k2_bars_match_the_exchange_bars_on_every_minute_of_real_xrp_eth(shared_data, tmp_path, catalog_props, catalog):
    days, resources = _load_xrp(shared_data, tmp_path, catalog_props)
    compared = 0
    for day in days:
        evaluation = _check(day, resources)
        assert evaluation.passed, evaluation.metadata["mismatches"].value
        assert evaluation.metadata["minutes_left_out"].value == 0
        assert evaluation.metadata["minutes_mismatched"].value == evaluation.metadata["minutes_missing_data"].value == 0
        compared += evaluation.metadata["bars_compared"].value
    assert compared == 3560  # every bar the exchange published, the 1,091 tradeless minutes too


def test_an_exchange_bar_that_differs_fails_the_check_naming_the_minute_and_the_field(shared_data, tmp_path, catalog_props):
    days, resources = _load_xrp(shared_data, tmp_path, catalog_props)
    day = days[1]
    path = tmp_path / "history" / f"XRPETH-1m-{day}.csv"
    with open(path, newline="") as f:
        header, *rows = list(csv.reader(f))
    traded = next(i for i, r in enumerate(rows) if Decimal(r[5]) > 0 and i > 100)
    rows[traded][2] = str(Decimal(rows[traded][2]) + Decimal("0.00000001"))  # the exchange's high one tick higher
    path.write_text(",".join(header) + "\n" + "".join(",".join(r) + "\n" for r in rows))
    assert dg.materialize([binance_klines], partition_key=day, resources=resources).success
    home = tmp_path / "dagster"
    home.mkdir()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        evaluation = _check(day, resources, instance)
    minute = datetime.fromtimestamp(int(rows[traded][0]) / 1000, tz=UTC)
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
    assert evaluation.metadata["minutes_mismatched"].value == 1
    listed = evaluation.metadata["mismatches"].value
    assert f"{minute:%H:%M}" in listed and "differs in high" in listed

    # The compliance report: per day and market, the bars compared, the minutes matching, and every mismatch.
    report = k2_report(home, "--start", days[0], "--end", days[-1], "--format", "md")
    assert report.returncode == 0, report.stderr
    section = report.stdout.split("## Against the exchange's own bars")[1]
    assert f"| {day} | BINANCE | 1440 | 1439 | 1 | 0 | 0 |  |" in section
    high = Decimal(rows[traded][2])
    both = f"high {high - Decimal('1e-8'):.8f} | high {high:.8f}"
    assert f"| {day} | BINANCE | XRPETH | {minute:%H:%M} | mismatch | differs in high | {both} |" in section


def _btc_trades(shared_data, tmp_path):
    """The real BTCUSDT trades of 2024-01-01 12:00-12:30 through K2's own dump decoder."""
    history = tmp_path / "btc"
    history.mkdir()
    shutil.copy(
        shared_data / BTC_TRADES / "BTCUSDT-trades-2024-01-01_1200-1230.derived.csv", history / "BTCUSDT-trades-2024-01-01.csv"
    )
    batch, _ = binance_history.load_day(history, date(2024, 1, 1), source="test")
    return batch.rows.sort_by([("exchange_timestamp", "ascending"), ("source_sequence", "ascending")])


def _binance_klines(trades: pa.Table) -> pa.Table:
    """1m klines the way Binance computes them, in plain Python: each trade's quote quantity rounded to 8 places."""
    bars: dict = {}
    for t in trades.to_pylist():
        minute = t["exchange_timestamp"].replace(second=0, microsecond=0)
        b = bars.setdefault(minute, {"open": t["price"], "high": t["price"], "low": t["price"], "volume": Decimal(0),
                                     "quote_volume": Decimal(0), "trade_count": 0, "taker_buy_volume": Decimal(0)})  # fmt: skip
        b["high"], b["low"], b["close"] = max(b["high"], t["price"]), min(b["low"], t["price"]), t["price"]
        b["volume"] += t["quantity"]
        b["quote_volume"] += (t["price"] * t["quantity"]).quantize(Decimal("1e-8"), ROUND_HALF_EVEN)
        b["trade_count"] += 1
        b["taker_buy_volume"] += t["quantity"] if t["side"] == "BUY" else 0
    rows = [{"exchange": "BINANCE", "symbol": "BTCUSDT", "bar_start": m, **b} for m, b in sorted(bars.items())]
    return pa.Table.from_pylist(rows)


def _live(trades: pa.Table, first: int, last: int) -> pa.Table:
    """Trades [first, last) as a live capture holds them: from Kafka."""
    part = trades.slice(first, last - first)
    return part.set_column(part.schema.get_field_index("kafka_topic"), "kafka_topic", pa.repeat(pa.scalar("t"), part.num_rows))


def test_a_live_capture_compares_only_whole_minutes_and_says_why_the_edges_are_left_out(shared_data, tmp_path):
    trades = _btc_trades(shared_data, tmp_path)
    exchange = _binance_klines(trades)
    times = trades.column("exchange_timestamp").to_pylist()
    start = next(i for i, t in enumerate(times) if t >= datetime(2024, 1, 1, 12, 3, 20, tzinfo=UTC))
    end = next(i for i, t in enumerate(times) if t >= datetime(2024, 1, 1, 12, 26, 40, tzinfo=UTC))
    captured = _live(trades, start, end)
    result = reconcile.reconcile(rollups.bars_from_trades(captured, "1m"), exchange, reconcile.capture_edges(captured))
    assert result.passed, result.minutes.to_pylist()[:3]
    summary = result.summary.to_pylist()[0]
    assert (summary["compared"], summary["matching"], summary["left_out"]) == (
        22,
        22,
        9,
    )  # 12:04-12:25 whole; 12:00-12:03, 12:26-12:30
    reasons = dict(
        zip(pc.strftime(result.minutes.column("bar_start"), "%H:%M").to_pylist(), result.minutes.column("reason").to_pylist())
    )
    assert reasons["12:00"].startswith("before K2's live capture began at 12:03:20")
    assert reasons["12:03"].startswith("K2's live capture began inside this minute, at 12:03:20")
    assert reasons["12:26"].startswith("K2's live capture ended inside this minute, at 12:26:39")
    assert reasons["12:30"].startswith("after K2's live capture ended")


def test_fewer_trades_than_the_exchange_counted_is_missing_data_even_with_contiguous_ids(shared_data, tmp_path):
    trades = _btc_trades(shared_data, tmp_path)
    exchange = _binance_klines(trades)
    times = trades.column("exchange_timestamp").to_pylist()
    lost = next(i for i, t in enumerate(times) if t >= datetime(2024, 1, 1, 12, 10, 30, tzinfo=UTC))
    kept = pa.concat_tables([trades.slice(0, lost), trades.slice(lost + 1)])
    # renumbered so the ids show no hole: only the exchange's count can tell
    renumbered = kept.set_column(
        kept.schema.get_field_index("source_sequence"), "source_sequence", pa.array(range(1, kept.num_rows + 1), pa.int64())
    )
    result = reconcile.reconcile(rollups.bars_from_trades(renumbered, "1m"), exchange, reconcile.capture_edges(renumbered))
    assert not result.passed
    wrong = result.minutes.filter(pc.equal(result.minutes.column("outcome"), "missing_data")).to_pylist()
    assert [f"{m['bar_start']:%H:%M}" for m in wrong] == ["12:10"]
    count = exchange.filter(pc.equal(exchange.column("bar_start"), wrong[0]["bar_start"])).column("trade_count")[0].as_py()
    assert wrong[0]["reason"] == f"K2 holds {count - 1} trades, the exchange counted {count}"


def test_every_demo_day_matches_the_exchange_bars_of_its_generator(tmp_path, catalog_props):
    """The demo's Binance days (ms and µs dumps, an aggTrades file, deliberately bad rows) against its kline dumps."""
    from k2_assets.dev import demo

    summary = demo.generate_demo_data(tmp_path / "data", asx_days=1, binance_rows_per_day=3_000)
    resources = make_resources(catalog_props, binance_dir=tmp_path / "data" / "binance")
    days = sorted({name.rsplit("-1m-", 1)[1][:10] for name in summary["files"] if "-1m-" in name})
    assert days == ["2024-01-01", "2024-01-02", "2025-01-02"]
    for day in days:
        assert dg.materialize([binance_trades_history, binance_klines], partition_key=day, resources=resources).success
    for day in days:
        evaluation = _check(day, resources)
        assert evaluation.passed, (day, evaluation.metadata["mismatches"].value)
        assert evaluation.metadata["bars_compared"].value >= 2 * 1400, day
    # The aggTrades symbol is counted by its underlying trades, as its klines count them.
    assert "XRPETH" in _check(days[0], resources).metadata["per_symbol"].value


def test_a_futures_kline_dump_with_binance_futures_header_loads_as_binance_um(shared_data, tmp_path, catalog_props, catalog):
    with zipfile.ZipFile(shared_data / KLINES / "BTCUSDT-1m-2020-01-01.zip") as z:
        lines = z.read(z.namelist()[0]).decode().splitlines()
    folder = tmp_path / "history" / "data" / "futures" / "um" / "daily" / "klines" / "BTCUSDT" / "1m"
    folder.mkdir(parents=True)
    # the header Binance's futures kline dumps carry (taker_buy_volume, not taker_buy_base_volume)
    header = "open_time,open,high,low,close,volume,close_time,quote_volume,count,taker_buy_volume,taker_buy_quote_volume,ignore"
    with zipfile.ZipFile(folder / "BTCUSDT-1m-2020-01-01.zip", "w") as z:
        z.writestr("BTCUSDT-1m-2020-01-01.csv", header + "\n" + "\n".join(lines[:60]) + "\n")
    resources = make_resources(catalog_props, binance_dir=tmp_path / "history")
    assert dg.materialize([binance_klines], partition_key="2020-01-01", resources=resources).success
    bars = _exchange_bars(catalog, "2020-01-01")
    assert len(bars) == 60 and {b["exchange"] for b in bars} == {"BINANCE_UM"}
    assert bars[0]["taker_buy_volume"] == Decimal("19.59823000") and bars[0]["trade_count"] == 493


def test_a_trade_lost_from_a_dump_is_missing_data_at_its_minute(tmp_path, catalog_props):
    from k2_assets.dev import demo

    demo.generate_demo_data(tmp_path / "data", asx_days=1, binance_rows_per_day=3_000, bad_row_rate=0)
    dump = tmp_path / "data" / "binance" / "BTCUSDT-trades-2024-01-01.csv"
    header, *lines = dump.read_text().splitlines()
    lost = lines.pop(1500)
    dump.write_text("\n".join([header, *lines]) + "\n")
    resources = make_resources(catalog_props, binance_dir=tmp_path / "data" / "binance")
    assert dg.materialize([binance_trades_history, binance_klines], partition_key="2024-01-01", resources=resources).success
    evaluation = _check("2024-01-01", resources)
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
    assert evaluation.metadata["minutes_missing_data"].value == 1, evaluation.metadata["mismatches"].value
    # If the lost trade closed its minute, the tradeless minutes after it repeat a close the exchange never had.
    assert evaluation.metadata["minutes_mismatched"].value <= 3, evaluation.metadata["mismatches"].value
    minute = datetime.fromtimestamp(int(lost.split(",")[4]) / 1000, tz=UTC)
    assert f"| BINANCE | BTCUSDT | {minute:%H:%M} | missing_data |" in evaluation.metadata["mismatches"].value


def test_the_check_is_asked_for_again_when_the_exchange_bars_land(tmp_path, catalog_props):
    """Automation: bars proven before the exchange's bars were loaded (WARN) are proven again once they are."""
    from k2_assets.definitions import defs
    from k2_assets.dev import demo

    demo.generate_demo_data(tmp_path / "data", asx_days=1, binance_rows_per_day=1_000, binance_dates=[date(2024, 1, 1)])
    resources = make_resources(catalog_props, binance_dir=tmp_path / "data" / "binance")
    instance = dg.DagsterInstance.ephemeral()
    check = dg.AssetCheckKey(dg.AssetKey("ohlcv_1m"), "matches_exchange_bars")

    def requested(cursor):
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
        return result, {r.key for r in result.results if r.true_subset.size}

    result, _ = requested(None)
    assert dg.materialize([binance_trades_history], partition_key="2024-01-01", resources=resources, instance=instance).success
    result, keys = requested(result.cursor)
    assert {dg.AssetKey("ohlcv_1m"), dg.AssetKey("binance_klines"), check} <= keys
    early = _check("2024-01-01", resources, instance)
    assert not early.passed and early.severity == dg.AssetCheckSeverity.WARN  # nothing to prove the bars against yet
    assert early.metadata["symbols_without_exchange_bars"].value
    result, keys = requested(result.cursor)
    assert check not in keys
    assert dg.materialize([binance_klines], partition_key="2024-01-01", resources=resources, instance=instance).success
    result, keys = requested(result.cursor)
    assert check in keys
    proven = _check("2024-01-01", resources, instance)
    assert proven.passed and proven.metadata["bars_compared"].value > 0
