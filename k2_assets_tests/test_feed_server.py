"""The local Binance feed server, exercised over real sockets on 127.0.0.1 with a real websockets client."""

from __future__ import annotations

import asyncio
import csv
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

from k2_assets.dev.feed_server import FeedServer, merge_by_time, random_walk, replay_file, run_in_thread

SHARED = Path(os.environ.get("K2_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DUMP = SHARED / "binance_spot_btcusdt_trades_2024-01-01_1200-1230" / "BTCUSDT-trades-2024-01-01_1200-1230.derived.csv"
COUNT, FIRST_ID, LAST_ID = 16_702, 3345206428, 3345223129
EVENT_KEYS = ["e", "E", "s", "t", "p", "q", "T", "m", "M"]
WAIT = 5.0  # bound on every single await


@pytest.fixture(scope="module")
def csv_rows() -> list[list[str]]:
    if not DUMP.is_file():
        pytest.fail(f"real sample data not found at {DUMP}: check out ../shared beside the repo (or set K2_SHARED_DATA)")
    with DUMP.open(newline="") as f:
        return list(csv.reader(f))[1:]


async def recv_n(ws, n: int) -> list[str]:
    # One deadline for the lot: a wait_for per message costs an event-loop turn each, and with the server
    # thread busy every turn can wait out a GIL switch interval.
    async with asyncio.timeout(WAIT + n / 5000):
        return [await ws.recv() for _ in range(n)]


async def recv_until_quiet(ws, quiet: float = 0.5, cap: float = 15.0) -> list[str]:
    """Everything the server sends until it has nothing more for `quiet` seconds (or the socket closes)."""
    out: list[str] = []
    async with asyncio.timeout(cap):
        while True:
            try:
                out.append(await asyncio.wait_for(ws.recv(), quiet))
            except (TimeoutError, ConnectionClosed):
                return out


def client(url: str, **kwargs):
    """A websockets client as production uses it; no client pings, so only the server's are seen."""
    return connect(url, open_timeout=WAIT, close_timeout=1, max_queue=None, ping_interval=None, **kwargs)


def get(url: str) -> tuple[int, object, str]:
    try:
        with urllib.request.urlopen(url, timeout=WAIT) as response:
            return response.status, json.loads(response.read()), response.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers["Content-Type"]


# --- sources -------------------------------------------------------------------------------------


def test_replay_file_reads_the_real_dump_exactly(csv_rows):
    trades = list(replay_file(DUMP))
    assert len(trades) == COUNT
    assert [t["trade_id"] for t in trades] == list(range(FIRST_ID, LAST_ID + 1))
    assert trades[0] == {
        "trade_id": FIRST_ID,
        "price": "42690.21000000",
        "qty": "0.00237000",
        "time_ms": 1704110400000,
        "is_buyer_maker": False,
        "symbol": "BTCUSDT",
    }
    for trade, row in zip(trades, csv_rows):
        fields = (str(trade["trade_id"]), trade["price"], trade["qty"], str(trade["time_ms"]), str(trade["is_buyer_maker"]))
        assert fields == tuple(row[:3] + row[4:6])


def test_replay_file_reads_zip_without_header_and_microsecond_times(tmp_path, csv_rows):
    # The 2025+ layout: µs times, no header, an is_best_match column, zipped, under a symbol's own name.
    lines = [",".join([*r[:4], r[4] + "123", r[5].lower(), "true"]) for r in csv_rows[:50]]
    archive = tmp_path / "BTCUSDT-trades-2025-01-01.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("BTCUSDT-trades-2025-01-01.csv", "\n".join(lines) + "\n")
    assert list(replay_file(archive)) == list(itertools.islice(replay_file(DUMP), 50))
    assert {t["symbol"] for t in replay_file(archive, symbol="xbtusdt")} == {"XBTUSDT"}
    with pytest.raises(ValueError):
        list(replay_file(tmp_path / "trades.csv"))


def test_random_walk_is_a_deterministic_tick_walk_with_contiguous_ids():
    trades = list(itertools.islice(random_walk(["BTCUSDT", "ETHUSDT"], seed=7, start_time_ms=1_700_000_000_000), 5000))
    assert trades == list(itertools.islice(random_walk("BTCUSDT,ETHUSDT", seed=7, start_time_ms=1_700_000_000_000), 5000))
    assert trades != list(itertools.islice(random_walk(["BTCUSDT", "ETHUSDT"], seed=8, start_time_ms=1_700_000_000_000), 5000))
    assert [t["time_ms"] for t in trades] == sorted(t["time_ms"] for t in trades)
    assert trades[0]["time_ms"] >= 1_700_000_000_000
    for symbol in ("BTCUSDT", "ETHUSDT"):
        mine = [t for t in trades if t["symbol"] == symbol]
        assert [t["trade_id"] for t in mine] == list(range(mine[0]["trade_id"], mine[0]["trade_id"] + len(mine)))
        cents = [int(t["price"].replace(".", "")) // 10**6 for t in mine]
        assert all(re.fullmatch(r"\d+\.\d{8}", t["price"]) and t["price"].endswith("000000") for t in mine)
        assert max(abs(a - b) for a, b in zip(cents, cents[1:])) <= 2  # a few 0.01 ticks per trade
        quantities = sorted(float(t["qty"]) for t in mine)
        assert quantities[0] > 0 and all(re.fullmatch(r"\d+\.\d{8}", t["qty"]) for t in mine)
        assert quantities[len(quantities) // 2] * float(mine[0]["price"]) < 2000  # median trade is small
    first = next(t for t in trades if t["symbol"] == "BTCUSDT")
    assert abs(float(first["price"]) - 42690.21) <= 0.02  # starts from the default start price


def test_merge_by_time_interleaves_sources():
    a = [{"time_ms": t, "symbol": "A"} for t in (1, 4, 9)]
    b = [{"time_ms": t, "symbol": "B"} for t in (2, 4, 5)]
    merged = [(t["time_ms"], t["symbol"]) for t in merge_by_time(a, b)]
    assert merged == [(1, "A"), (2, "B"), (4, "A"), (4, "B"), (5, "B"), (9, "A")]


# --- streams -------------------------------------------------------------------------------------


def test_combined_stream_replays_every_real_trade_in_order_with_exact_fields(csv_rows):
    async def run(url):
        async with client(url + "/stream?streams=btcusdt@trade") as ws:
            frames = await recv_n(ws, COUNT)
            extra = await recv_until_quiet(ws, quiet=0.3)
        return frames, extra

    with run_in_thread(replay_file(DUMP)) as server:
        assert server.ws_url == f"ws://127.0.0.1:{server.port}" and server.port > 0
        before = int(time.time() * 1000)
        frames, extra = asyncio.run(run(server.ws_url))
        assert extra == []
        assert server.stats["frames"] == server.stats["events"] == COUNT
    envelopes = [orjson.loads(f) for f in frames]
    assert all(list(e) == ["stream", "data"] and e["stream"] == "btcusdt@trade" for e in envelopes)
    events = [e["data"] for e in envelopes]
    assert all(list(e) == EVENT_KEYS for e in events)
    assert [e["t"] for e in events] == list(range(FIRST_ID, LAST_ID + 1))
    for event, row in zip(events, csv_rows):
        assert (event["e"], event["s"], event["M"]) == ("trade", "BTCUSDT", True)
        assert (str(event["t"]), event["p"], event["q"], str(event["T"]), str(event["m"])) == tuple(row[:3] + row[4:6])
        assert isinstance(event["E"], int) and event["E"] >= before  # when the event left the server
    # Byte-exact with Binance's own encoding (no spaces, this key order, 8dp strings).
    assert frames[0].startswith('{"stream":"btcusdt@trade","data":{"e":"trade","E":')
    assert frames[0].endswith(
        ',"s":"BTCUSDT","t":3345206428,"p":"42690.21000000","q":"0.00237000","T":1704110400000,"m":false,"M":true}}'
    )


def test_raw_path_sends_bare_events_and_unknown_streams_send_nothing():
    async def run(url):
        async with client(url + "/stream?streams=btcusdt@trade/ethusdt@trade/btcusdt@depth") as ws:
            combined = [orjson.loads(f) for f in await recv_n(ws, 5)]
        async with client(url + "/ws/btcusdt@trade") as ws:
            raw = [orjson.loads(f) for f in await recv_n(ws, 5)]
        async with client(url + "/ws/ethusdt@trade") as ws:  # a symbol the source does not trade
            nothing = await recv_until_quiet(ws, quiet=0.3)
        return combined, raw, nothing

    with run_in_thread(replay_file(DUMP), shared_cursor=False) as server:
        combined, raw, nothing = asyncio.run(run(server.ws_url))
    assert {e["stream"] for e in combined} == {"btcusdt@trade"}
    assert [{**e["data"], "E": 0} for e in combined] == [{**e, "E": 0} for e in raw]
    assert list(raw[0]) == EVENT_KEYS and raw[0]["t"] == FIRST_ID
    assert nothing == []


def test_subscribe_control_messages_like_binance():
    async def run(url):
        async with client(url + "/ws") as ws:
            assert await recv_until_quiet(ws, quiet=0.2) == []  # nothing subscribed yet
            await ws.send('{"method":"SUBSCRIBE","params":["btcusdt@trade","xrpusdt@trade"],"id":1}')
            reply = await asyncio.wait_for(ws.recv(), WAIT)
            first = orjson.loads(await asyncio.wait_for(ws.recv(), WAIT))
            await ws.send('{"method":"LIST_SUBSCRIPTIONS","id":2}')
            await ws.send("not json")
            await ws.send('{"method":"FLY","id":3}')
            replies = []
            async with asyncio.timeout(WAIT):
                while len(replies) < 3:  # the replies arrive among the trade events
                    message = await ws.recv()
                    if '"e":"trade"' not in message:
                        replies.append(message)
            return reply, first, replies

    with run_in_thread(replay_file(DUMP)) as server:
        reply, first, replies = asyncio.run(run(server.ws_url))
        assert server.stats["control_messages"] == 4
    assert reply == '{"result":null,"id":1}'
    assert list(first) == EVENT_KEYS and first["t"] == FIRST_ID  # bare events on /ws
    replies = [orjson.loads(r) for r in replies]
    assert replies[0] == {"result": ["btcusdt@trade", "xrpusdt@trade"], "id": 2}
    assert replies[1]["code"] == 3 and replies[1]["msg"].startswith("Invalid JSON")
    assert replies[2]["code"] == 2 and replies[2]["id"] == 3


def test_multiple_symbols_interleave_by_time_on_one_combined_stream():
    async def run(url):
        async with client(url + "/stream?streams=btcusdt@trade/ethusdt@trade") as ws:
            return [orjson.loads(f) for f in await recv_n(ws, 3000)]

    walk = itertools.islice(random_walk(["BTCUSDT", "ETHUSDT"], seed=1, start_time_ms=1_700_000_000_000), 3000)
    with run_in_thread(walk) as server:
        envelopes = asyncio.run(run(server.ws_url))
    assert {e["stream"] for e in envelopes} == {"btcusdt@trade", "ethusdt@trade"}
    assert all(e["stream"] == e["data"]["s"].lower() + "@trade" for e in envelopes)
    times = [e["data"]["T"] for e in envelopes]
    assert times == sorted(times)


# --- disconnects and the shared cursor --------------------------------------------------------------


def test_drop_every_closes_abruptly_and_a_reconnect_continues_at_the_next_trade():
    async def session(url):
        async with client(url + "/ws/btcusdt@trade") as ws:
            frames = await recv_until_quiet(ws, quiet=2.0)
            await asyncio.wait_for(ws.wait_closed(), WAIT)
            return [orjson.loads(f)["t"] for f in frames], ws.close_code, ws.protocol.close_rcvd

    with run_in_thread(replay_file(DUMP), drop_every=1000) as server:
        first, code, close_frame = asyncio.run(session(server.ws_url))
        second, _, _ = asyncio.run(session(server.ws_url))
        assert server.stats["drops"] == 2 and server.cursor == 2000
    assert first == list(range(FIRST_ID, FIRST_ID + 1000))
    assert code == 1006 and close_frame is None  # no close frame: the TCP connection just ended
    assert second == list(range(FIRST_ID + 1000, FIRST_ID + 2000))

    with run_in_thread(replay_file(DUMP), drop_every=1000, shared_cursor=False) as server:
        asyncio.run(session(server.ws_url))
        again, _, _ = asyncio.run(session(server.ws_url))
    assert again == list(range(FIRST_ID, FIRST_ID + 1000))  # every connection replays from the start


def test_shared_cursor_loses_trades_sent_while_away():
    async def run(url):
        async with client(url + "/ws/btcusdt@trade") as ws:  # our client, which then goes away
            mine = [orjson.loads(f)["t"] for f in await recv_n(ws, 100)]
        async with client(url + "/ws/btcusdt@trade") as other:  # the market goes on for someone else
            await recv_n(other, 5000)
        async with client(url + "/ws/btcusdt@trade") as ws:
            back = orjson.loads(await asyncio.wait_for(ws.recv(), WAIT))["t"]
        return mine, back

    with run_in_thread(replay_file(DUMP), rate=20_000) as server:
        mine, back = asyncio.run(run(server.ws_url))
    assert mine == list(range(FIRST_ID, FIRST_ID + 100))
    assert back >= FIRST_ID + 5100


def test_max_connection_seconds_closes_like_the_24_hour_limit():
    async def run(url):
        async with client(url + "/ws/btcusdt@trade") as ws:
            start = time.monotonic()
            frames = await recv_until_quiet(ws, quiet=2.0)
            await asyncio.wait_for(ws.wait_closed(), WAIT)
            return frames, time.monotonic() - start, ws.close_code

    with run_in_thread(replay_file(DUMP), rate=200, max_connection_seconds=0.5) as server:
        frames, seconds, code = asyncio.run(run(server.ws_url))
        assert server.stats["expired"] == 1
    assert 0.4 < seconds < 2.0 and code == 1001
    assert 40 <= len(frames) <= 160  # 0.5 s at 200 msg/s


def test_streaming_continues_across_trimmed_history():
    async def run(url):
        async with client(url + "/ws/btcusdt@trade") as ws:
            return [orjson.loads(f)["t"] for f in await recv_n(ws, 20_000)]

    with run_in_thread(random_walk(["BTCUSDT"], seed=2), history_limit=5000) as server:
        ids = asyncio.run(run(server.ws_url))
        status, oldest, _ = get(server.http_url + f"/api/v3/historicalTrades?symbol=BTCUSDT&fromId={ids[0]}&limit=3")
    assert ids == list(range(ids[0], ids[0] + 20_000))
    assert status == 200 and oldest[0]["id"] > ids[0] + 5000  # only the last history_limit trades are kept
    assert [t["id"] for t in oldest] == list(range(oldest[0]["id"], oldest[0]["id"] + 3))


# --- faults --------------------------------------------------------------------------------------


def test_injected_faults_do_what_they_say_and_stats_reconcile():
    skip = {FIRST_ID + 10, FIRST_ID + 11, FIRST_ID + 5000}
    faults = dict(skip_ids=skip, skip_ids_ratio=0.01, duplicate_ratio=0.02, out_of_order_ratio=0.02, malformed_ratio=0.01, seed=3)

    async def run(url, n=None):
        async with client(url + "/ws/btcusdt@trade") as ws:
            return await recv_until_quiet(ws, quiet=0.5) if n is None else await recv_n(ws, n)

    with run_in_thread(replay_file(DUMP), shared_cursor=False, **faults) as server:
        frames = asyncio.run(run(server.ws_url))
        stats = dict(server.stats)
        repeat = asyncio.run(run(server.ws_url, len(frames)))  # faults are decided per trade: a replay is identical

    events, garbled = [], 0
    for frame in frames:
        try:
            events.append(orjson.loads(frame))
        except orjson.JSONDecodeError:
            garbled += 1
    ids = [e["t"] for e in events]
    missing = set(range(FIRST_ID, LAST_ID + 1)) - set(ids)
    distinct = [t for i, t in enumerate(ids) if i == 0 or t != ids[i - 1]]  # duplicates arrive back to back
    assert len(frames) == stats["frames"]
    assert garbled == stats["malformed"] > 0
    assert len(ids) - len(set(ids)) == len(ids) - len(distinct) == stats["duplicates"] > 0
    assert sum(b < a for a, b in zip(distinct, distinct[1:])) == stats["out_of_order"] > 0
    assert all(a == b + 1 for a, b in zip(distinct, distinct[1:]) if b < a)  # each swap exchanges two neighbours
    assert skip <= missing and len(missing) == stats["skipped"] + stats["malformed"]
    assert stats["skipped"] > len(skip)  # the ratio added more
    assert stats["events"] == len(set(ids))
    assert stats["events"] + stats["skipped"] + stats["malformed"] == COUNT
    assert stats["frames"] == stats["events"] + stats["duplicates"] + stats["malformed"]
    assert _without_event_time(repeat) == _without_event_time(frames)


def _without_event_time(frames: list[str]) -> list[str]:
    return [re.sub(r'"E":\d+', "", f) for f in frames]


def test_out_of_order_swaps_adjacent_trades():
    async def run(url):
        async with client(url + "/ws/btcusdt@trade") as ws:
            return [orjson.loads(f)["t"] for f in await recv_n(ws, 2000)]

    with run_in_thread(replay_file(DUMP), out_of_order_ratio=0.1, seed=5) as server:
        ids = asyncio.run(run(server.ws_url))
    assert sorted(ids) == list(range(FIRST_ID, FIRST_ID + 2000))
    descents = [i for i in range(1, len(ids)) if ids[i] < ids[i - 1]]
    assert descents and all(ids[i - 1] == ids[i] + 1 for i in descents)  # each swap exchanges two neighbours


def test_fault_arguments_are_checked():
    with pytest.raises(ValueError):
        FeedServer([], duplicate_ratio=0.6, malformed_ratio=0.6)
    with pytest.raises(ValueError):
        FeedServer([], rate=10, speedup=2)
    with pytest.raises(ValueError):
        FeedServer([], drop_every=0)


# --- pacing --------------------------------------------------------------------------------------


def test_rate_paces_messages_per_second():
    async def run(url):
        async with client(url + "/ws/btcusdt@trade") as ws:
            start = time.monotonic()
            n = 0
            async with asyncio.timeout(WAIT):
                while time.monotonic() - start < 0.5:
                    await ws.recv()
                    n += 1
            return n / (time.monotonic() - start)

    with run_in_thread(replay_file(DUMP), rate=2000) as server:
        rate = asyncio.run(run(server.ws_url))
    assert 1200 < rate < 2800


def test_speedup_replays_at_n_times_the_original_pace():
    async def run(url):
        async with client(url + "/ws/btcusdt@trade") as ws:
            first = orjson.loads(await asyncio.wait_for(ws.recv(), WAIT))
            start = time.monotonic()
            last = first
            async with asyncio.timeout(WAIT):
                while time.monotonic() - start < 0.6:
                    last = orjson.loads(await ws.recv())
            return (last["T"] - first["T"]) / 1000, time.monotonic() - start

    with run_in_thread(replay_file(DUMP), speedup=300) as server:
        market_seconds, wall_seconds = asyncio.run(run(server.ws_url))
    # 30 minutes of trades at 300x take 6 s; in ~0.6 s the market moves ~180 s.
    assert 0.5 * 300 * wall_seconds < market_seconds <= 300 * (wall_seconds + 0.1)


# --- pings ---------------------------------------------------------------------------------------


def raw_client(port: int, seconds: float, answer_pings: bool) -> list[tuple[float, Frame]]:
    """A sans-I/O websockets client on a bare socket: it sees every frame, pings included."""
    protocol = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/ws"))
    frames: list[tuple[float, Frame]] = []
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        protocol.send_request(protocol.connect())
        for data in protocol.data_to_send():
            sock.sendall(data)
        start = time.monotonic()
        while (left := seconds - (time.monotonic() - start)) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            protocol.receive_data(data)
            frames += [(time.monotonic() - start, e) for e in protocol.events_received() if isinstance(e, Frame)]
            pending = protocol.data_to_send()  # pongs, queued by the protocol for every ping
            if answer_pings:
                for data in pending:
                    sock.sendall(data)
    return frames


def test_server_pings_at_the_configured_interval_and_closes_when_no_pong():
    with run_in_thread(replay_file(DUMP), ping_interval=0.2, ping_timeout=0.3) as server:
        answered = raw_client(server.port, 1.1, answer_pings=True)
        silent = raw_client(server.port, 3.0, answer_pings=False)
    pings = [t for t, f in answered if f.opcode is Opcode.PING]
    assert len(pings) >= 4 and not [f for _, f in answered if f.opcode is Opcode.CLOSE]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert all(0.12 < gap < 0.4 for gap in gaps)
    closes = [(t, f) for t, f in silent if f.opcode is Opcode.CLOSE]
    assert closes, "a client that never pongs must be disconnected"
    t, close = closes[0]
    assert t < 0.2 + 0.3 + 0.5 and int.from_bytes(close.data[:2], "big") == 1011


# --- REST ----------------------------------------------------------------------------------------


def test_rest_historical_trades_like_binance(csv_rows):
    skipped = {FIRST_ID + 1, FIRST_ID + 2}
    with run_in_thread(replay_file(DUMP), skip_ids=skipped) as server:
        api = server.http_url + "/api/v3"
        assert server.http_url == f"http://127.0.0.1:{server.port}"
        assert get(api + "/ping") == (200, {}, "application/json;charset=UTF-8")

        status, trades, _ = get(api + f"/historicalTrades?symbol=BTCUSDT&fromId={FIRST_ID}&limit=5")
        assert status == 200 and [t["id"] for t in trades] == list(range(FIRST_ID, FIRST_ID + 5))  # skipped ones included
        row = csv_rows[0]
        assert trades[0] == {
            "id": FIRST_ID,
            "price": row[1],
            "qty": row[2],
            "quoteQty": row[3],
            "time": int(row[4]),
            "isBuyerMaker": False,
            "isBestMatch": True,
        }
        assert list(trades[0]) == ["id", "price", "qty", "quoteQty", "time", "isBuyerMaker", "isBestMatch"]
        assert all(t["quoteQty"] == r[3] for t, r in zip(trades, csv_rows))

        status, trades, _ = get(api + f"/historicalTrades?symbol=BTCUSDT&fromId={FIRST_ID + 9000}")
        assert [t["id"] for t in trades] == list(range(FIRST_ID + 9000, FIRST_ID + 9500))  # default limit 500
        status, trades, _ = get(api + f"/historicalTrades?symbol=BTCUSDT&fromId={FIRST_ID + 100}&limit=1000")
        assert [t["id"] for t in trades] == list(range(FIRST_ID + 100, FIRST_ID + 1100))
        status, trades, _ = get(api + f"/historicalTrades?symbol=BTCUSDT&fromId={LAST_ID - 2}&limit=10")
        assert [t["id"] for t in trades] == [LAST_ID - 2, LAST_ID - 1, LAST_ID]
        assert get(api + f"/historicalTrades?symbol=BTCUSDT&fromId={LAST_ID + 1}")[:2] == (200, [])

        assert get(api + "/historicalTrades?symbol=BTCUSDT&limit=1001")[:2] == (
            400,
            {"code": -1100, "msg": "Illegal characters found in parameter 'limit'; legal range is '1 to 1000'."},
        )
        assert get(api + "/historicalTrades?symbol=BTCUSDT&fromId=abc")[1]["code"] == -1100
        assert get(api + "/historicalTrades?symbol=ETHUSDT&fromId=1")[:2] == (400, {"code": -1121, "msg": "Invalid symbol."})
        assert get(api + "/historicalTrades?fromId=1")[1]["code"] == get(api + "/historicalTrades")[1]["code"] == -1102

        status, info, _ = get(api + "/exchangeInfo")
        assert status == 200
        assert [(s["symbol"], s["baseAsset"], s["quoteAsset"]) for s in info["symbols"]] == [("BTCUSDT", "BTC", "USDT")]
        assert get(api + "/exchangeInfo?symbol=NOPE")[:2] == (400, {"code": -1121, "msg": "Invalid symbol."})
        assert server.stats["rest_requests"] >= 10


def test_rest_without_from_id_returns_the_trades_streamed_so_far():
    async def run(url):
        async with client(url + "/ws/btcusdt@trade") as ws:
            return [orjson.loads(f)["t"] for f in await recv_until_quiet(ws, quiet=1.0)]

    with run_in_thread(replay_file(DUMP), drop_every=300) as server:
        streamed = asyncio.run(run(server.ws_url))
        status, trades, _ = get(server.http_url + "/api/v3/historicalTrades?symbol=BTCUSDT&limit=3")
    assert streamed[-1] == FIRST_ID + 299
    assert [t["id"] for t in trades] == streamed[-3:]


# --- binding and the command line -------------------------------------------------------------------


def test_server_binds_loopback_only():
    with run_in_thread(replay_file(DUMP)) as server:
        assert server.host == "127.0.0.1"
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT):
            pass
        other = _non_loopback_address()
        if other is None:
            pytest.skip("no non-loopback address on this machine")
        with pytest.raises(OSError):
            socket.create_connection((other, server.port), timeout=1).close()


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outbound interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_command_line_serves_the_dump_until_sigterm():
    command = [sys.executable, "-m", "k2_assets.cli", "feed", "--replay", str(DUMP), "--port", "0", "--unpaced"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        port = None
        deadline = time.monotonic() + 20
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if match := re.search(r"serving ws://127\.0\.0\.1:(\d+)", line):
                port = int(match[1])
        assert port, "the server did not report its address"

        async def run():
            async with client(f"ws://127.0.0.1:{port}/stream?streams=btcusdt@trade") as ws:
                start = time.monotonic()
                frames = await recv_n(ws, COUNT)
                return frames, COUNT / (time.monotonic() - start)

        frames, rate = asyncio.run(run())
        assert orjson.loads(frames[-1])["data"]["t"] == LAST_ID
        assert rate > 10_000, f"unpaced replay ran at only {rate:.0f} msg/s"
        proc.send_signal(signal.SIGTERM)
        log = proc.communicate(timeout=WAIT)[1]
        assert proc.returncode == 0
        assert re.search(r"connection 1 from 127\.0\.0\.1:\d+ /stream\?streams=btcusdt@trade: sent 16702 frames", log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
