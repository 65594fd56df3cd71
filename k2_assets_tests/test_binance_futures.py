"""Binance USD-M futures beside spot (exchange BINANCE_UM): the live path from the local feed through the real
producer, broker and writer; the history path from generated dumps; the feed's klines against bars recomputed
here from the trades it served."""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections import defaultdict
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import dagster as dg
import orjson
import pyarrow.compute as pc
import pytest
from confluent_kafka import Producer
from pyiceberg.expressions import EqualTo

from k2_assets.core import binance_history, checks, live_codec, writer
from k2_assets.core import catalog as k2_catalog
from k2_assets.core.binance_format import SPOT, UM
from k2_assets.core.binance_stream import BinanceProducer
from k2_assets.core.kafka import ensure_topics, producer_config
from k2_assets.core.live_writer import LiveWriter
from k2_assets.core.metrics import WriterMetrics
from k2_assets.core.offsets import TRACKER_KEY, lineage
from k2_assets.defs.binance.assets import binance_trades_history, binance_um_trades, binance_um_trades_history
from k2_assets.defs.binance.checks import (
    binance_trades_history_rules,
    binance_um_trades_history_rules,
    binance_um_trades_no_unexplained_gaps,
    binance_um_trades_rules,
)
from k2_assets.defs.binance.klines import binance_klines
from k2_assets.defs.binance.resources import BinanceRestResource, KafkaResource
from k2_assets.defs.binance.sensors import binance_um_gap_repair_sensor, binance_um_trades_sensor, reset_writers
from k2_assets.defs.resources import IcebergResource
from k2_assets.defs.rollups.assets import ohlcv_1m
from k2_assets.defs.rollups.checks import ohlcv_1m_matches_raw_trades
from k2_assets.defs.rollups.exchange_check import matches_exchange_bars
from k2_assets.dev.demo import write_futures_trades
from k2_assets.dev.feed_server import random_walk, run_in_thread
from k2_assets_tests.conftest import make_resources
from k2_assets_tests.test_binance_sensor import CYCLE_SECONDS, materialized, ticks_until, written
from k2_assets_tests.test_binance_stream import count_messages
from k2_assets_tests.test_feed_server import client, get, recv_n
from k2_assets_tests.test_live_end_to_end import ProducerThread, wait_until
from k2_assets_tests.test_metrics import scrape

T0 = 1_704_110_400_000  # 2024-01-01 12:00:00 UTC
DAY = date(2024, 1, 1)
EIGHT = Decimal("0.00000001")


def walk(n: int, seed: int, symbols=("BTCUSDT",)) -> list[dict]:
    return list(itertools.islice(random_walk(list(symbols), seed=seed, start_time_ms=T0 + 7_000), n))


def insurance_fund(trade: dict, factor: str = "1.02") -> dict:
    """The trade as an insurance-fund trade, priced off the market as a liquidation's bankruptcy price is."""
    price = (Decimal(trade["price"]) * Decimal(factor)).quantize(EIGHT)
    return {**trade, "trade_class": "INSURANCE_FUND", "price": f"{price:f}"}


# --- the live path ------------------------------------------------------------------------------------


def test_trade_events_of_each_market_become_v2_trades_with_their_class():
    event = {"e": "trade", "E": T0 + 1, "T": T0, "s": "BTCUSDT", "t": 7, "p": "42000.10", "q": "0.005", "m": True}
    spot = live_codec.trade_from_event({**event, "M": True}, 1)
    assert (spot["exchange"], spot["message_id"], spot["trade_class"], spot["price_forming"]) == (
        "BINANCE",
        "BINANCE:BTCUSDT:7",
        "MARKET",
        True,
    )
    for x, forming in (("MARKET", True), ("INSURANCE_FUND", False), ("ADL", False), ("NA", False)):
        trade = live_codec.trade_from_event({**event, "X": x}, 1, UM)
        assert (trade["exchange"], trade["message_id"], trade["trade_class"], trade["price_forming"]) == (
            "BINANCE_UM",
            "BINANCE_UM:BTCUSDT:7",
            x,
            forming,
        )
        assert trade["vendor_data"] == {"event_time": str(T0 + 1)}  # no M on the futures stream
    for bad in ({}, {"X": "LIQUIDATION"}, {"X": None}, {"X": 1}, {"X": "market"}):
        with pytest.raises(live_codec.InvalidEvent, match="trade class X"):
            live_codec.trade_from_event({**event, **bad}, 1, UM)


def run_feed(source: list[dict], market, bootstrap: str, topic: str, extra_frames: list[bytes] = ()) -> BinanceProducer:
    """One market's local feed through the production producer into `topic`, until every trade has arrived."""
    with run_in_thread(source, market=market.name, ping_interval=5) as server:
        return stream_from(server, source, market, bootstrap, topic, extra_frames)


def stream_from(
    server, source: list[dict], market, bootstrap: str, topic: str, extra_frames: list[bytes] = ()
) -> BinanceProducer:
    """The production producer on a running feed's stream into `topic`, until every trade it serves has arrived."""
    producer = BinanceProducer(
        ["BTCUSDT"],
        bootstrap,
        market=market,
        base_url=server.ws_url,
        topic=topic,
        dead_letter_topic=topic + ".dlq",
        backoff_initial=0.05,
        backoff_max=0.2,
    )
    for frame in extra_frames:
        producer.handle_frame(frame, T0 * 1000)
    with ProducerThread(producer):
        wait_until(lambda: producer.stats.last_trade_id.get("BTCUSDT") == source[-1]["trade_id"], 60, "the last trade")
        wait_until(lambda: producer.stats.received == server.stats["frames"] + len(extra_frames), 10, "every frame")
    return producer


def drain_until_quiet(*writers: LiveWriter) -> None:
    for _ in range(10):
        if not sum([len(w.drain(10, idle_seconds=0.5)) for w in writers]):
            return


def test_futures_stream_keeps_every_trade_class_and_coexists_with_spot_of_the_same_ids(broker, topic, catalog):
    spot_source = walk(3000, seed=5)
    # The same trade ids on the futures market, a few of them not market trades.
    futures_source = [
        insurance_fund(t) if i % 97 == 50 else {**t, "trade_class": "ADL"} if i % 131 == 60 else dict(t)
        for i, t in enumerate(spot_source)
    ]
    futures_source[777]["trade_class"] = "NA"
    classes = {t["trade_id"]: t.get("trade_class", "MARKET") for t in futures_source}
    assert sum(c != "MARKET" for c in classes.values()) > 40

    um_topic = topic + ".um"
    ensure_topics(broker.bootstrap, {um_topic: 3, um_topic + ".dlq": 1, topic + ".dlq": 1})
    tables = [k2_catalog.ensure_table(catalog, name) for name in ("trades", "rejected")]
    run_feed(spot_source[:1500], SPOT, broker.bootstrap, topic)
    shared = WriterMetrics()  # as in the code server: both markets' writers in one process, one /metrics
    spot_writer = LiveWriter(*tables, broker.bootstrap, topic=topic, metrics=shared)
    drain_until_quiet(spot_writer)
    # The futures writer's dedup index is in step with the table now. The spot commits that follow name the same
    # (day, symbol) and ids; it follows them before its own commits and must not take their ids for its own.
    # Small batches: a first batch overlapping those ids would be fenced and re-read, which would hide the mistake.
    um_writer = LiveWriter(*tables, broker.bootstrap, market=UM, topic=um_topic, max_batch_rows=1000, metrics=shared)
    run_feed(spot_source[1500:], SPOT, broker.bootstrap, topic)
    drain_until_quiet(spot_writer)
    event = {"e": "trade", "E": T0, "T": T0, "s": "BTCUSDT", "t": 1, "p": "1.0", "q": "1.0", "m": True}
    bad_frames = [orjson.dumps({**event, "X": "LIQUIDATION"}), orjson.dumps(event)]
    produced = run_feed(futures_source, UM, broker.bootstrap, um_topic, bad_frames)
    assert produced.stats.dead_lettered == 2 and produced.stats.produced == 3000
    # A spot trade that lands on the futures topic is rejected, not merged into the futures ids.
    stray = Producer(producer_config(broker.bootstrap))
    stray.produce(um_topic, key=b"BTCUSDT", value=live_codec.encode(live_codec.trade_from_event({**event, "M": True}, 1)))
    assert stray.flush(10) == 0

    drain_until_quiet(um_writer, spot_writer)

    stored = catalog.load_table("market.trades").scan().to_arrow()
    assert stored.num_rows == 6000 and pc.count_distinct(stored.column("message_id")).as_py() == 6000
    futures = {r["source_sequence"]: r for r in stored.filter(pc.equal(stored.column("exchange"), "BINANCE_UM")).to_pylist()}
    spot = {r["source_sequence"]: r for r in stored.filter(pc.equal(stored.column("exchange"), "BINANCE")).to_pylist()}
    assert set(futures) == set(spot) == set(classes)  # every id on both markets: no trade dropped as a duplicate
    for trade in futures_source:
        row = futures[trade["trade_id"]]
        assert row["message_id"] == f"BINANCE_UM:BTCUSDT:{trade['trade_id']}" and row["kafka_topic"] == um_topic
        assert (row["trade_class"], row["price_forming"]) == (classes[trade["trade_id"]], classes[trade["trade_id"]] == "MARKET")
        assert row["price"] == Decimal(trade["price"])  # an insurance-fund trade keeps its price, 2% off
    assert {(r["trade_class"], r["price_forming"]) for r in spot.values()} == {("MARKET", True)}
    # Each writer's metrics carry its exchange, so a stopped futures writer cannot hide behind the spot one.
    values = scrape(shared.registry)
    for exchange, consumed in (("BINANCE", 3000), ("BINANCE_UM", 3001)):  # the stray spot trade: read, rejected
        labels = (("exchange", exchange),)
        assert values[("k2_writer_records_written_total", labels)] == 3000
        assert values[("k2_writer_records_consumed_total", labels)] == consumed
        assert values[("k2_writer_last_commit_timestamp_seconds", labels)] > 0
        assert values[("k2_sequence_events_total", (("event", "in_order"), *labels))] > 0
    assert values[("k2_writer_records_rejected_total", (("exchange", "BINANCE_UM"),))] == 3  # the stray, 2 dead letters
    assert values[("k2_writer_records_rejected_total", (("exchange", "BINANCE"),))] == 0

    rejected = catalog.load_table("market.rejected").scan().to_arrow().to_pylist()
    dead = sorted((r["reason"], r["exchange"], r["kafka_topic"]) for r in rejected if r["kafka_topic"].endswith(".dlq"))
    assert dead == [
        ("trade class X 'LIQUIDATION' is not one of MARKET, INSURANCE_FUND, ADL, NA", "BINANCE_UM", um_topic + ".dlq"),
        ("trade class X None is not one of MARKET, INSURANCE_FUND, ADL, NA", "BINANCE_UM", um_topic + ".dlq"),
    ]
    (wrong,) = [r for r in rejected if r["kafka_topic"] == um_topic]
    assert (
        wrong["exchange"] == "BINANCE"
        and wrong["reason"] == f"exchange 'BINANCE' is not BINANCE_UM, the exchange of topic {um_topic}"
    )

    # Each exchange keeps its own sequence state, and writers restarted on the shared table resume from it.
    latest = {}
    for _, properties in lineage(catalog.load_table("market.trades")):
        for key, value in properties.items():
            if key.startswith(TRACKER_KEY):
                latest.setdefault(key, json.loads(value)["exchange"])
    assert latest == {TRACKER_KEY: "BINANCE", TRACKER_KEY + ".BINANCE_UM": "BINANCE_UM"}
    for w in (spot_writer, um_writer):
        w.close()
    again = [LiveWriter(*tables, broker.bootstrap, topic=topic), LiveWriter(*tables, broker.bootstrap, market=UM, topic=um_topic)]
    assert all(w.drain(3, idle_seconds=0.5) == [] for w in again)
    assert [w.tracker.state()["exchange"] for w in again] == ["BINANCE", "BINANCE_UM"]
    for w in again:
        w.close()

    partition = stored.filter(pc.equal(stored.column("exchange"), "BINANCE_UM"))
    outcomes = checks.validate(checks.to_frame(partition), "trades", "BINANCE_UM", DAY)
    assert all(o.passed for o in outcomes.values()), {n: o.sample for n, o in outcomes.items() if not o.passed}


def test_k2_feed_and_k2_stream_binance_serve_and_produce_the_futures_market(broker, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("K2_")} | {"PYTHONUNBUFFERED": "1"}
    feed = subprocess.Popen(
        [sys.executable, "-m", "k2_assets.cli", "feed", "--market", "um", "--random-walk", "BTCUSDT"]
        + ["--rate", "1000", "--non-market-ratio", "0.05", "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    stream = None
    try:
        port, deadline = None, time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            if match := re.search(r"serving ws://127\.0\.0\.1:(\d+) \(um streams", feed.stderr.readline()):
                port = int(match[1])
        assert port, "the feed did not report its address"
        ensure_topics(broker.bootstrap, {UM.topic: 3, UM.dead_letter_topic: 1})  # as the command does: counted from the start
        log = tmp_path / "producer.log"
        with open(log, "wb") as out:
            stream = subprocess.Popen(
                [sys.executable, "-m", "k2_assets.cli", "stream", "binance", "--market", "um", "--symbols", "BTCUSDT"]
                + ["--url", f"ws://127.0.0.1:{port}", "--bootstrap", broker.bootstrap],
                stdout=out,
                stderr=out,
                env=env,
            )
            messages = count_messages(broker.bootstrap, UM.topic, 3, 1000)
            stream.send_signal(signal.SIGTERM)
            assert stream.wait(timeout=30) == 0
        assert len(messages) >= 1000
        trades = [json.loads(m.value()) for m in messages]
        assert {t["exchange"] for t in trades} == {"BINANCE_UM"} and all(
            t["message_id"].startswith("BINANCE_UM:") for t in trades
        )
        assert {t["trade_class"] for t in trades} == {"MARKET", "INSURANCE_FUND", "ADL"}
        assert all(t["price_forming"] == (t["trade_class"] == "MARKET") for t in trades)
        assert '"connected"' in log.read_text() and "fstream" not in log.read_text()  # the given URL, not the default
    finally:
        for process in (stream, feed):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


# --- the history path ---------------------------------------------------------------------------------


def dump_rows(path: Path) -> list[dict]:
    with zipfile.ZipFile(path) as archive:
        return list(csv.DictReader(io.StringIO(archive.read(archive.namelist()[0]).decode())))


def test_generated_futures_dumps_load_with_their_classes_beside_spot_of_the_same_ids(tmp_path, catalog):
    history = tmp_path / "binance"
    (classified,) = write_futures_trades(history, DAY, symbols=("BTCUSDT",), rows=3000, seed=11, non_market_ratio=0.02)
    (plain,) = write_futures_trades(history / "mirror", DAY, symbols=("ETHUSDT",), rows=500, seed=12, class_column=False)
    rows = dump_rows(classified)
    assert rows[0].keys() == {"id", "price", "qty", "quote_qty", "time", "is_buyer_maker", "X"}
    assert {r["X"] for r in rows} == {"MARKET", "INSURANCE_FUND", "ADL"}
    # The spot market's dump of the same symbol and day, with the same trade ids.
    spot_dump = history / "spot" / "daily" / "trades" / "BTCUSDT" / "BTCUSDT-trades-2024-01-01.csv"
    spot_dump.parent.mkdir(parents=True)
    spot_dump.write_text("".join(f"{r['id']},{r['price']},{r['qty']},{r['quote_qty']},{r['time']},True\n" for r in rows))
    # A redistributed futures dump naming its class column `type`, with a class Binance does not have.
    odd = history / "futures" / "um" / "daily" / "trades" / "SOLUSDT" / "SOLUSDT-trades-2024-01-01.csv"
    odd.parent.mkdir(parents=True)
    odd.write_text(
        "id,price,qty,quote_qty,time,is_buyer_maker,type\n"
        f"1,101.20,1.5,151.8,{T0},true,MARKET\n2,99.1760,2,198.352,{T0 + 1},false,INSURANCE_FUND\n"
        f"3,101.21,1,101.21,{T0 + 2},false,LIQUIDATION\n"
    )

    futures, notes = binance_history.load_day(history, DAY, source="binance_futures_history", market=UM)
    spot, _ = binance_history.load_day(history, DAY, source="binance_trades_history")
    assert notes == [] and {f.path for f in spot.files} == {"spot/daily/trades/BTCUSDT/BTCUSDT-trades-2024-01-01.csv"}
    assert {f.path for f in futures.files} == {
        "futures/um/daily/trades/BTCUSDT/BTCUSDT-trades-2024-01-01.zip",
        "futures/um/daily/trades/SOLUSDT/SOLUSDT-trades-2024-01-01.csv",
        "mirror/futures/um/daily/trades/ETHUSDT/ETHUSDT-trades-2024-01-01.zip",
    }
    loaded = futures.rows.to_pylist()
    assert len(loaded) == 3000 + 500 + 2 and {r["exchange"] for r in loaded} == {"BINANCE_UM"}
    by_id = {r["source_sequence"]: r for r in loaded if r["symbol"] == "BTCUSDT"}
    for r in rows:
        row = by_id[int(r["id"])]
        assert (row["trade_class"], row["price_forming"], row["price"]) == (r["X"], r["X"] == "MARKET", Decimal(r["price"]))
        assert row["message_id"] == f"BINANCE_UM:BTCUSDT:{r['id']}" and row["side"] == (
            "SELL" if r["is_buyer_maker"] == "true" else "BUY"
        )
    # Without a class column (Binance's own dumps) every trade reads as MARKET.
    assert {(r["trade_class"], r["price_forming"]) for r in loaded if r["symbol"] == "ETHUSDT"} == {("MARKET", True)}
    assert len(dump_rows(plain)) == 500
    assert [(r["source_sequence"], r["trade_class"]) for r in loaded if r["symbol"] == "SOLUSDT"] == [
        (1, "MARKET"),
        (2, "INSURANCE_FUND"),
    ]
    (bad,) = futures.rejected.to_pylist()
    assert (bad["exchange"], bad["source_row"], bad["source_sequence"]) == ("BINANCE_UM", 4, 3)
    assert bad["reason"] == "trade class 'LIQUIDATION' is not one of MARKET, INSURANCE_FUND, ADL, NA"
    assert {(r["exchange"], r["trade_class"]) for r in spot.rows.to_pylist()} == {("BINANCE", "MARKET")}

    # Both days' partitions in one table: the same ids, apart.
    trades = k2_catalog.ensure_table(catalog, "trades")
    writer.replace_rows(trades, spot.rows, writer.partition_filter("BINANCE", DAY))
    writer.replace_rows(trades, futures.rows, writer.partition_filter("BINANCE_UM", DAY))
    stored = trades.refresh().scan().to_arrow()
    assert stored.num_rows == 3000 + 3502 and pc.count_distinct(stored.column("message_id")).as_py() == stored.num_rows
    partition = stored.filter(pc.equal(stored.column("exchange"), "BINANCE_UM"))
    outcomes = checks.validate(checks.to_frame(partition), "trades", "BINANCE_UM", DAY)
    assert all(o.passed for o in outcomes.values()), {n: o.sample for n, o in outcomes.items() if not o.passed}


def minute_of(ms: int | str) -> int:
    return int(ms) - int(ms) % 60_000


def bars_by_minute(catalog, exchange: str) -> dict[int, dict]:
    bars = catalog.load_table("market.ohlcv_1m").scan(row_filter=EqualTo("exchange", exchange)).to_arrow().to_pylist()
    return {int(b["bar_start"].timestamp() * 1000): b for b in bars}


def test_the_futures_history_asset_loads_the_dumps_and_its_bars_are_of_market_trades_beside_spot(
    tmp_path, catalog_props, catalog
):
    history = tmp_path / "binance"
    (dump,) = write_futures_trades(history, DAY, symbols=("BTCUSDT",), rows=3000, seed=11, non_market_ratio=0.02)
    rows = dump_rows(dump)
    # The spot market's dump of the same symbol and day, the same trades: every one a market trade there.
    spot_dump = history / "spot" / "daily" / "trades" / "BTCUSDT" / "BTCUSDT-trades-2024-01-01.csv"
    spot_dump.parent.mkdir(parents=True)
    spot_dump.write_text("".join(f"{r['id']},{r['price']},{r['qty']},{r['quote_qty']},{r['time']},True\n" for r in rows))
    resources = make_resources(catalog_props, binance_dir=history)
    loads = [binance_trades_history, binance_um_trades_history, *binance_trades_history_rules, *binance_um_trades_history_rules]
    result = dg.materialize(loads, partition_key=DAY.isoformat(), resources=resources)
    assert result.success
    evaluations = result.get_asset_check_evaluations()
    assert {e.asset_key.to_user_string() for e in evaluations} == {"binance_trades_history", "binance_um_trades_history"}
    assert [(e.asset_key.to_user_string(), e.check_name) for e in evaluations if not e.passed] == []
    (event,) = result.asset_materializations_for_node("binance_um_trades_history")
    assert event.metadata["rows_written"].value == event.metadata["dagster/row_count"].value == 3000
    stored = catalog.load_table("market.trades").scan(row_filter=EqualTo("exchange", "BINANCE_UM")).to_arrow()
    assert {(r["source_file"], r["trade_class"]) for r in stored.to_pylist()} >= {
        (dump.relative_to(history).as_posix(), "INSURANCE_FUND")
    }

    bars = dg.materialize([ohlcv_1m, ohlcv_1m_matches_raw_trades], partition_key=DAY.isoformat(), resources=resources)
    assert bars.success and all(e.passed for e in bars.get_asset_check_evaluations())
    futures, spot = bars_by_minute(catalog, "BINANCE_UM"), bars_by_minute(catalog, "BINANCE")
    market = [r for r in rows if r["X"] == "MARKET"]
    assert sum(b["trade_count"] for b in futures.values()) == len(market) < len(rows)
    assert sum(b["trade_count_all"] for b in futures.values()) == len(rows) == sum(b["trade_count"] for b in spot.values())
    # An insurance-fund trade 2% above the market: it moves neither the futures bar's high nor its volume nor its
    # count, only volume_all; on spot the same trade is a market trade and makes the high.
    by_minute = defaultdict(list)
    for r in rows:
        by_minute[minute_of(r["time"])].append(r)
    minute, insured = next(
        (m, r)
        for m, trades in sorted(by_minute.items())
        for r in trades
        if r["X"] == "INSURANCE_FUND" and Decimal(r["price"]) > max(Decimal(t["price"]) for t in trades if t["X"] == "MARKET")
    )
    in_minute = by_minute[minute]
    forming = [r for r in in_minute if r["X"] == "MARKET"]
    bar, spot_bar = futures[minute], spot[minute]
    assert (bar["exchange"], bar["symbol"], spot_bar["exchange"], spot_bar["symbol"]) == (
        "BINANCE_UM",
        "BTCUSDT",
        "BINANCE",
        "BTCUSDT",
    )
    assert bar["high"] == max(Decimal(r["price"]) for r in forming) < Decimal(insured["price"])
    assert (bar["trade_count"], bar["volume"]) == (len(forming), sum(Decimal(r["qty"]) for r in forming))
    assert (bar["trade_count_all"], bar["volume_all"]) == (len(in_minute), sum(Decimal(r["qty"]) for r in in_minute))
    assert spot_bar["high"] == max(Decimal(r["price"]) for r in in_minute) >= Decimal(insured["price"])
    assert spot_bar["trade_count"] == len(in_minute) > bar["trade_count"]


# --- the feed's klines --------------------------------------------------------------------------------


def recomputed(trades: list[dict], symbol: str, width: int, now_ms: int, futures: bool) -> list[list]:
    """Binance's bars from the events a client received: MARKET trades only on futures, empty bars at the previous close."""
    buckets = defaultdict(list)
    for t in trades:
        if t["s"] == symbol and (not futures or t["X"] == "MARKET"):
            buckets[t["T"] - t["T"] % width].append(t)
    bars, close = [], None
    for opened in range(min(buckets), now_ms - now_ms % width + 1, width):
        mine = buckets.get(opened, [])
        prices = [Decimal(t["p"]) for t in mine] or [close] * 4
        taker = [t for t in mine if not t["m"]]
        close = prices[-1]

        def total(ts, quote=False):
            amount = sum((Decimal(t["q"]) * (Decimal(t["p"]) if quote else 1) for t in ts), Decimal(0))
            return f"{amount.quantize(EIGHT, ROUND_HALF_UP):f}"

        text = [f"{p.quantize(EIGHT):f}" for p in (prices[0], max(prices), min(prices), close)]
        bars.append(
            [opened, *text, total(mine), opened + width - 1, total(mine, True), len(mine), total(taker), total(taker, True), "0"]
        )
    return bars


async def served(url: str, n: int) -> list[dict]:
    async with client(url) as ws:
        return [json.loads(frame)["data"] for frame in await recv_n(ws, n)]


@pytest.mark.parametrize("market", [SPOT, UM], ids=["spot", "um"])
def test_klines_are_the_bars_of_the_served_trades(market):
    source = walk(9000, seed=9, symbols=("BTCUSDT", "ETHUSDT"))
    for t in source[5000:]:
        t["time_ms"] += 150_000  # no trade for over two minutes: empty bars at the previous close
    at = next(i for i in range(2500, 9000) if source[i]["symbol"] == "BTCUSDT")
    if market is UM:
        source[at] = insurance_fund(source[at])
    futures = market is UM
    options = {"non_market_ratio": 0.02} if futures else {}
    # A short kept history: bars outlive the trades the server trims.
    with run_in_thread(source, market=market.name, history_limit=4096, seed=4, **options) as server:
        trades = asyncio.run(served(server.ws_url + "/stream?streams=btcusdt@trade/ethusdt@trade", len(source)))
        api = server.http_url + market.rest_prefix
        now = max(t["T"] for t in trades)

        def klines(query: str) -> list:
            status, body, _ = get(f"{api}/klines?symbol=BTCUSDT&{query}")
            assert status == 200, body
            return body

        every = klines(f"interval=1m&limit={market.klines_max_limit}")
        assert every == recomputed(trades, "BTCUSDT", 60_000, now, futures)
        assert klines("interval=5m") == recomputed(trades, "BTCUSDT", 300_000, now, futures)
        assert any(k[8] == 0 and k[1] == k[4] == every[i - 1][4] for i, k in enumerate(every) if i)
        # The current bar is included, still open; every other one has closed.
        assert every[-1][0] <= now < every[-1][6] and all(k[6] < now for k in every[:-1])
        assert klines("interval=1m&limit=3") == every[-3:]
        assert klines(f"interval=1m&limit=2&startTime={every[2][0] + 1}") == every[3:5]  # open_time >= startTime
        assert klines(f"interval=1m&limit=2&endTime={every[4][0] + 59_999}") == every[3:5]  # open_time <= endTime
        assert klines(f"interval=1m&startTime={every[1][0]}&endTime={every[3][0]}") == every[1:4]
        assert klines(f"interval=1m&startTime={now + 60_000}") == []

        if futures:
            insured = next(t for t in trades if t["s"] == "BTCUSDT" and t["t"] == source[at]["trade_id"])
            assert insured["X"] == "INSURANCE_FUND" and insured["p"] == source[at]["price"]
            assert {t["X"] for t in trades} == {"MARKET", "INSURANCE_FUND", "ADL"}
            minute = next(k for k in every if k[0] <= insured["T"] <= k[6])
            market_trades = [t for t in trades if t["s"] == "BTCUSDT" and minute[0] <= t["T"] <= minute[6] and t["X"] == "MARKET"]
            # The insurance-fund trade, 2% above the market, moves neither the high nor the volume nor the count.
            assert Decimal(minute[2]) == max(Decimal(t["p"]) for t in market_trades) < Decimal(insured["p"]) / Decimal("1.01")
            assert minute[8] == len(market_trades) and Decimal(minute[5]) == sum(Decimal(t["q"]) for t in market_trades)
            # Binance's futures trade lists hold market trades only.
            status, listed, _ = get(f"{api}/historicalTrades?symbol=BTCUSDT&limit=1000")
            ids = [t["id"] for t in listed]
            window = [t for t in trades if t["s"] == "BTCUSDT" and ids[0] <= t["t"] <= ids[-1]]
            assert status == 200 and ids == [t["t"] for t in window if t["X"] == "MARKET"] and len(ids) < len(window)
            assert "isBestMatch" not in listed[0]

        status, body, _ = get(f"{api}/klines?symbol=XRPUSDT&interval=1m")
        assert (status, body) == (400, {"code": -1121, "msg": "Invalid symbol."})
        assert get(f"{api}/klines?symbol=BTCUSDT")[1]["code"] == -1102
        assert get(f"{api}/klines?symbol=BTCUSDT&interval=2s")[:2] == (400, {"code": -1120, "msg": "Invalid interval."})
        assert get(f"{api}/klines?symbol=BTCUSDT&interval=1m&startTime=5&endTime=4")[1]["code"] == -1023
        too_many = market.klines_max_limit + 1
        assert get(f"{api}/klines?symbol=BTCUSDT&interval=1m&limit={too_many}")[:2] == (
            400,
            {"code": -1100, "msg": f"Illegal characters found in parameter 'limit'; legal range is '1 to {too_many - 1}'."},
        )
        other = SPOT if futures else UM
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"{server.http_url}{other.rest_prefix}/klines?symbol=BTCUSDT&interval=1m", timeout=5)


# --- the Dagster live path ----------------------------------------------------------------------------


def test_futures_go_through_the_sensor_repair_and_klines_and_k2_bars_equal_the_exchange_bars(
    broker, topic, tmp_path, catalog_props, catalog
):
    """The futures sensor drains what the real producer took from the local futures feed, a repair run fetches the ids
    the stream skipped from /fapi/v1/historicalTrades, and the feed's /fapi/v1/klines then equal K2's bars."""
    source = walk(3000, seed=21)
    # The stream skips five ids; one of them is an insurance-fund trade, which no futures trade list holds.
    skipped = [t["trade_id"] for t in source[1503:1508]]
    for i in range(1503, 1508):
        source[i] = insurance_fund(source[i]) if i == 1505 else {**source[i], "trade_class": "MARKET"}
    day = DAY.isoformat()
    history = tmp_path / "history"
    history.mkdir()
    instance = dg.DagsterInstance.ephemeral()
    live = {
        "iceberg": IcebergResource(**catalog_props),
        "kafka": KafkaResource(bootstrap=broker.bootstrap, um_topic=topic, drain_seconds=CYCLE_SECONDS),
    }
    with run_in_thread(source, market="um", ping_interval=5, skip_ids=skipped, non_market_ratio=0.02, seed=3) as server:
        stream_from(server, source, UM, broker.bootstrap, topic)
        try:
            results = ticks_until(
                binance_um_trades_sensor,
                instance,
                live,
                lambda rs: written(rs) >= len(source) - len(skipped) and any(r.run_requests for r in rs),
            )
        finally:
            reset_writers()
        events, cursor = materialized(results), results[-1].cursor
        requests = [r for result in results for r in result.run_requests or []]
        assert sum(e.metadata["rows_written"].value for e in events) == len(source) - len(skipped)
        assert {(e.asset_key, e.partition) for e in events} == {(dg.AssetKey("binance_um_trades"), day)}
        assert {(r.job_name, r.tags["dagster/partition"]) for r in requests} == {("binance_um_gap_check_job", day)}
        assert json.loads(cursor)["offsets"]
        gaps = catalog.load_table("market.sequence_gaps").scan().to_arrow().to_pylist()
        assert [(g["exchange"], g["first_missing"], g["last_missing"]) for g in gaps] == [("BINANCE_UM", skipped[0], skipped[-1])]

        # The repair sensor asks for the day; the run fills the market trades and leaves the insurance-fund one explained.
        with dg.build_sensor_context(instance=instance, resources={"iceberg": live["iceberg"]}) as context:
            assert [r.partition_key for r in binance_um_gap_repair_sensor(context)] == [day]
        resources = {
            **make_resources(catalog_props, binance_dir=history),
            "binance_rest": BinanceRestResource(base_url="http://127.0.0.1:9", um_base_url=server.http_url),
        }
        repaired = dg.materialize(
            [binance_um_trades, *binance_um_trades_rules, binance_um_trades_no_unexplained_gaps],
            partition_key=day,
            resources=resources,
            instance=instance,
        )
        assert repaired.success and all(e.passed for e in repaired.get_asset_check_evaluations())
        (event,) = repaired.asset_materializations_for_node("binance_um_trades")
        assert event.metadata["rows_written"].value == 4
        (unavailable,) = event.metadata["repair_unavailable"].value
        assert str(skipped[2]) in unavailable["answer"]

        # The exchange's bars of the live day, from the futures REST API.
        klines = dg.materialize([binance_klines], partition_key=day, resources=resources)
        assert klines.success
        metadata = klines.asset_materializations_for_node("binance_klines")[0].metadata
        assert metadata["bars_from_rest"].value > 0 and metadata["rest_failures"].value == {}

    trades = catalog.load_table("market.trades").scan(row_filter=EqualTo("exchange", "BINANCE_UM")).to_arrow().to_pylist()
    assert len(trades) == len(source) - 1 and {t["message_id"].split(":")[0] for t in trades} == {"BINANCE_UM"}
    classes = {t["trade_class"] for t in trades}
    assert {"MARKET", "INSURANCE_FUND", "ADL"} <= classes
    repaired_rows = [t for t in trades if t["kafka_topic"] is None]
    assert sorted(t["source_sequence"] for t in repaired_rows) == [skipped[i] for i in (0, 1, 3, 4)]
    assert {t["source_file"] for t in repaired_rows} == {"rest:/fapi/v1/historicalTrades"}

    result = dg.materialize([ohlcv_1m, matches_exchange_bars], partition_key=day, resources=resources)
    exchange_bars = {
        int(b["bar_start"].timestamp() * 1000): b
        for b in catalog.load_table("market.exchange_bars")
        .scan(row_filter=EqualTo("exchange", "BINANCE_UM"))
        .to_arrow()
        .to_pylist()
    }
    (check,) = result.get_asset_check_evaluations()
    assert check.passed, check.metadata["mismatches"].value
    assert check.metadata["bars_compared"].value == len(exchange_bars) > 0 and check.metadata["minutes_left_out"].value == 0
    assert check.metadata["minutes_mismatched"].value == check.metadata["minutes_missing_data"].value == 0
    # Minutes with non-market trades were compared: an insurance-fund trade there lies above the exchange's high.
    insured = [t for t in trades if t["trade_class"] == "INSURANCE_FUND"]
    assert any(t["price"] > exchange_bars[minute_of(int(t["exchange_timestamp"].timestamp() * 1000))]["high"] for t in insured)
