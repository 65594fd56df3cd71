"""A local stand-in for Binance's market-data endpoints, spot or USD-M futures, for demos and tests without internet.

It speaks the wire format of wss://stream.binance.com:9443, or with market="um" of wss://fstream.binance.com
(raw `/ws/<stream>` and combined `/stream?streams=a/b` paths, `<symbol>@trade` events, SUBSCRIBE control
messages, ping frames), and answers on the same port the REST calls a gap-filling or reconciling client
makes (`/api/v3/historicalTrades`, `/klines`, `/ping`, `/exchangeInfo`; under `/fapi/v1/` for futures),
so K2's production client runs unchanged against it, only its base URL changed.

Trades come from a source: a data.binance.vision dump (`replay_file`) or an endless random walk
(`random_walk`). On request the server injects the faults a real feed has: disconnects, id gaps,
duplicates, swapped neighbours and garbled frames, each decided per trade from a seed. A futures
feed also mixes in trades that are not MARKET trades (`non_market_ratio`): INSURANCE_FUND trades,
priced 2% off the market as a liquidation's bankruptcy price is, and ADL trades.

    k2 feed --replay BTCUSDT-trades-2024-01-01.zip --port 9443 --speedup 10
    k2 feed --market um --random-walk BTCUSDT --rate 200 --non-market-ratio 0.01
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import csv
import heapq
import io
import itertools
import logging
import random
import re
import struct
import threading
import time
import zipfile
from collections.abc import Iterable, Iterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Self
from urllib.parse import parse_qs, urlsplit

import numpy as np
import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from k2_assets.core.binance_format import MARKETS, MICROS_FROM, PRICE_FORMING_CLASS, SPOT, quote_currency
from k2_assets.dev.feed_klines import INTERVALS, Klines

log = logging.getLogger(__name__)

DUMP_NAME = re.compile(r"^(?P<symbol>[A-Z0-9]+)-trades-")
DEFAULT_START_PRICES = {"BTCUSDT": "42690.21", "ETHUSDT": "2281.40", "BNBUSDT": "312.50", "SOLUSDT": "101.20"}

MAX_BATCH = 500  # frames written per event-loop turn when unpaced
MAX_SCAN = 20_000  # rows walked per turn, so a rarely traded subscription cannot stall the loop
MIN_TICK = 0.005  # paced sends are batched per tick of at least this many seconds
IDLE = 0.05  # poll period while there is nothing to send

# Per-trade faults, decided once when the trade enters the server.
NONE, SKIP, DUPLICATE, SWAP, MALFORMED = range(5)
INSURANCE_FUND_OFFSETS = (Decimal("0.98"), Decimal("1.02"))  # a liquidation's bankruptcy price, off the market
EIGHT_DP = Decimal("0.00000001")
INVALID_SYMBOL = 400, {"code": -1121, "msg": "Invalid symbol."}


# --- trade sources -----------------------------------------------------------------------------


def replay_file(path: str | Path, symbol: str | None = None) -> Iterator[dict]:
    """Trades of a data.binance.vision `SYMBOL-trades-*.csv|.zip` dump, in file order; a header column named
    X or type (a futures dump that has one) gives each trade its class."""
    path = Path(path)
    if symbol is None:
        match = DUMP_NAME.match(path.name)
        if not match:
            raise ValueError(f"{path.name}: cannot tell the symbol from the name; pass symbol=")
        symbol = match["symbol"]
    symbol = symbol.upper()
    class_at = None
    with _open_dump(path) as text:
        for row in csv.reader(text):
            if not row or not row[0].isdigit():
                # the optional header line
                names = [name.strip().lower() for name in row]
                class_at = next((i for i, name in enumerate(names) if name in ("x", "type")), None)
                continue
            fields = [f for i, f in enumerate(row) if i != class_at]
            trade_time = int(fields[4])
            if trade_time >= MICROS_FROM:
                trade_time //= 1000
            trade = {
                "trade_id": int(fields[0]),
                "price": _eight_dp(fields[1]),
                "qty": _eight_dp(fields[2]),
                "time_ms": trade_time,
                "is_buyer_maker": fields[5].strip().lower() == "true",
                "symbol": symbol,
            }
            if class_at is not None:
                trade["trade_class"] = row[class_at].strip()
            yield trade


@contextlib.contextmanager
def _open_dump(path: Path) -> Iterator[io.TextIOBase]:
    if path.suffix != ".zip":
        with path.open(newline="") as text:
            yield text
        return
    with zipfile.ZipFile(path) as archive:
        members = [m for m in archive.namelist() if m.endswith(".csv")]
        if len(members) != 1:
            raise ValueError(f"{path}: expected one .csv inside the zip, found {members}")
        with archive.open(members[0]) as raw:
            yield io.TextIOWrapper(raw, encoding="utf-8", newline="")


def _eight_dp(text: str) -> str:
    """A decimal string as the stream prints it: exactly 8 decimal places."""
    if text[-9:-8] == ".":
        return text  # the dumps' usual form
    whole, _, frac = text.strip().partition(".")
    if len(frac) > 8 and frac[8:].strip("0"):
        raise ValueError(f"{text!r} has more than 8 decimal places")
    return f"{whole}.{frac[:8]:0<8}"


def random_walk(
    symbols: Iterable[str] | str,
    start_prices: dict[str, str | float] | None = None,
    seed: int = 0,
    start_time_ms: int | None = None,
) -> Iterator[dict]:
    """Endless trades for `symbols`: a random walk on a 0.01 tick, contiguous ids per symbol, in time order."""
    if isinstance(symbols, str):
        symbols = symbols.split(",")
    symbols = [s.strip().upper() for s in symbols if s.strip()]
    if not symbols:
        raise ValueError("random_walk needs at least one symbol")
    rng = np.random.default_rng(seed)
    prices = {**DEFAULT_START_PRICES, **{k.upper(): str(v) for k, v in (start_prices or {}).items()}}
    ticks = [max(1, round(Decimal(prices.get(s, "100.00")) * 100)) for s in symbols]
    ids = [int(i) for i in rng.integers(10**8, 10**9, len(symbols))]
    now_ms = int(time.time() * 1000) if start_time_ms is None else start_time_ms
    moves = np.array([-2, -1, -1, 0, 0, 0, 1, 1, 2])
    chunk = 4096  # drawn with numpy a chunk at a time: per-trade Python RNG calls would cap the server near 60k msg/s
    while True:
        gaps = rng.exponential(40.0, chunk).astype(np.int64)  # ms; several trades often share a millisecond
        times = (now_ms + np.cumsum(gaps)).tolist()
        now_ms = times[-1]
        which = rng.integers(0, len(symbols), chunk).tolist()
        steps = rng.choice(moves, chunk).tolist()
        notionals = rng.lognormal(4.5, 1.6, chunk).tolist()  # quote-currency value: mostly tens to hundreds
        makers = (rng.random(chunk) < 0.5).tolist()
        for t, i, step, notional, maker in zip(times, which, steps, notionals, makers):
            tick = ticks[i] = max(1, ticks[i] + step)
            lots = max(1, int(notional * 10_000_000 / tick))  # 0.00001 lot size
            yield {
                "trade_id": ids[i],
                "price": f"{tick // 100}.{tick % 100:02d}000000",
                "qty": f"{lots // 100_000}.{lots % 100_000:05d}000",
                "time_ms": t,
                "is_buyer_maker": maker,
                "symbol": symbols[i],
            }
            ids[i] += 1


def merge_by_time(*sources: Iterable[dict]) -> Iterator[dict]:
    """Interleave several time-ordered sources (e.g. one dump per symbol) into one, by trade time."""
    return heapq.merge(*sources, key=lambda trade: trade["time_ms"])


# --- the market: every trade the server has taken from its source ----------------------------------


# A market row: (position, symbol, the source's trade dict, fault). Plain tuples of untracked values drop
# out of the garbage collector's scans; objects here made every full GC pass rescan the whole history.
Row = tuple[int, str, dict, int]


def _event_tail(trade: dict) -> bytes:
    """A spot trade event after its "E" field: the part that does not change between sends."""
    # Formatted rather than dumped (a third of the cost); symbols and decimals need no escaping.
    return (
        f',"s":"{trade["symbol"]}","t":{trade["trade_id"]},"p":"{trade["price"]}","q":"{trade["qty"]}",'
        f'"T":{trade["time_ms"]},"m":{"true" if trade["is_buyer_maker"] else "false"},"M":true}}'
    ).encode()


def _futures_event_tail(trade: dict) -> bytes:
    """A futures trade event after its "E" field, in fstream's order: no M, and X, how the trade came about."""
    return (
        f',"T":{trade["time_ms"]},"s":"{trade["symbol"]}","t":{trade["trade_id"]},"p":"{trade["price"]}",'
        f'"q":"{trade["qty"]}","X":"{trade.get("trade_class", PRICE_FORMING_CLASS)}",'
        f'"m":{"true" if trade["is_buyer_maker"] else "false"}}}'
    ).encode()


def _rest_trade(trade: dict, spot: bool) -> dict:
    """A trade as /api/v3/historicalTrades (or /fapi/v1/historicalTrades, without isBestMatch) prints it."""
    quote = (Decimal(trade["price"]) * Decimal(trade["qty"])).quantize(EIGHT_DP, ROUND_HALF_UP)
    printed = {
        "id": trade["trade_id"],
        "price": trade["price"],
        "qty": trade["qty"],
        "quoteQty": f"{quote:f}",
        "time": trade["time_ms"],
        "isBuyerMaker": bool(trade["is_buyer_maker"]),
    }
    return {**printed, "isBestMatch": True} if spot else printed


class _Market:
    """Trades pulled lazily from the source, addressed by position; only the last `history_limit` are kept.

    The klines hold every trade below the frontier (the market's "now"): they are brought up to it before an
    answer and before trades are trimmed, so bars outlive the kept history."""

    CHUNK = 4096

    def __init__(
        self,
        source: Iterable[dict],
        history_limit: int,
        skip_ids: set[int],
        ratios: tuple[float, ...],
        seed: int,
        klines: Klines,
        non_market_ratio: float = 0.0,
    ):
        self._source = iter(source)
        self._limit = history_limit
        self._skip_ids = skip_ids
        self._thresholds = [sum(ratios[: i + 1]) for i in range(len(ratios))]  # skip, duplicate, swap, malformed
        self._rng = random.Random(seed)
        # Its own generator, so the faults a seed gives are the same with or without these trades.
        self._non_market = non_market_ratio
        self._class_rng = random.Random(f"trade classes {seed}")
        self.rows: list[Row] = []
        self.base = 0  # position of rows[0]
        self.by_symbol: dict[str, list[Row]] = {}
        self.exhausted = False
        self.frontier = 0  # the furthest position any connection reached: the market's "now"
        self.klines = klines
        self._in_klines = 0  # positions below this are in the klines

    @property
    def end(self) -> int:
        return self.base + len(self.rows)

    def pull(self) -> bool:
        """Take the next chunk from the source; False once it is exhausted."""
        if self.exhausted:
            return False
        chunk = list(itertools.islice(self._source, self.CHUNK))
        if len(chunk) < self.CHUNK:
            self.exhausted = True
        if self._non_market:
            chunk = [self._classified(trade) for trade in chunk]
        faults = [self._fault(trade) for trade in chunk] if self._skip_ids or self._thresholds[-1] else itertools.repeat(NONE)
        rows = [(pos, trade["symbol"], trade, fault) for pos, trade, fault in zip(itertools.count(self.end), chunk, faults)]
        self.rows += rows
        for row in rows:
            symbol_rows = self.by_symbol.get(row[1])
            if symbol_rows is None:
                symbol_rows = self.by_symbol[row[1]] = []
            symbol_rows.append(row)
        if len(self.rows) > 2 * self._limit:
            self._trim()
        return bool(rows)

    def _fault(self, trade: dict) -> int:
        if trade["trade_id"] in self._skip_ids:
            return SKIP
        r = self._rng.random()
        return next((i + 1 for i, t in enumerate(self._thresholds) if r < t), NONE)

    def _classified(self, trade: dict) -> dict:
        """The trade, or (at the non-MARKET ratio) an INSURANCE_FUND trade 2% off the market or an ADL trade."""
        rng = self._class_rng
        if "trade_class" in trade or rng.random() >= self._non_market:
            return trade
        if rng.random() < 0.5:
            return {**trade, "trade_class": "ADL"}
        price = (Decimal(trade["price"]) * rng.choice(INSURANCE_FUND_OFFSETS)).quantize(EIGHT_DP)
        return {**trade, "trade_class": "INSURANCE_FUND", "price": f"{price:f}"}

    def count_served(self) -> None:
        """Bring the klines up to the frontier."""
        start, stop = max(self._in_klines, self.base), min(self.frontier, self.end)
        add = self.klines.add
        for row in self.rows[start - self.base : stop - self.base]:
            add(row[2])
        self._in_klines = max(self._in_klines, stop)

    def _trim(self) -> None:
        self.count_served()
        cut = len(self.rows) - self._limit
        del self.rows[:cut]
        self.base += cut
        for rows in self.by_symbol.values():
            del rows[: bisect.bisect_left(rows, self.base, key=lambda row: row[0])]

    def time_at(self, pos: int) -> int | None:
        """Trade time of the row at `pos` (pulling as needed), None past the end of a finite source."""
        while pos >= self.end:
            if not self.pull():
                return None
        return self.rows[max(pos, self.base) - self.base][2]["time_ms"]

    def from_id(self, symbol: str, from_id: int, limit: int) -> list[Row]:
        pulled = 0
        while not self.exhausted and pulled < 1_000_000:  # a far-future fromId on an endless walk must not hang
            rows = self.by_symbol.get(symbol)
            if rows and rows[-1][2]["trade_id"] >= from_id + limit - 1:
                break
            self.pull()
            pulled += self.CHUNK
        rows = self.by_symbol.get(symbol, [])
        start = bisect.bisect_left(rows, from_id, key=lambda row: row[2]["trade_id"])
        return rows[start : start + limit]

    def before(self, symbol: str, pos: int, limit: int) -> list[Row]:
        rows = self.by_symbol.get(symbol, [])
        stop = bisect.bisect_left(rows, pos, key=lambda row: row[0])
        return rows[max(0, stop - limit) : stop]


# --- the server ----------------------------------------------------------------------------------


class _Connection:
    """What the server tracks for one WebSocket client."""

    def __init__(self, number: int, ws: ServerConnection, pos: int):
        self.number = number
        self.ws = ws
        self.pos = pos  # next market position to consider
        self.streams: list[str] = []
        self.combined = False
        self.prefixes: dict[str, bytes] = {}  # subscribed symbol -> payload start up to the "E" value
        self.suffix = b""
        self.sent = 0  # frames sent on this connection
        self.reason = ""  # why the server ended it, if it did

    def subscribe(self, streams: Iterable[str]) -> None:
        for stream in streams:
            if stream not in self.streams:
                self.streams.append(stream)
        self._refresh()

    def unsubscribe(self, streams: Iterable[str]) -> None:
        gone = set(streams)
        self.streams = [s for s in self.streams if s not in gone]
        self._refresh()

    def _refresh(self) -> None:
        self.prefixes = {}
        for stream in self.streams:
            symbol, _, kind = stream.partition("@")
            if kind == "trade" and symbol:
                start = b'{"stream":"%s","data":' % stream.encode() if self.combined else b""
                self.prefixes[symbol.upper()] = start + b'{"e":"trade","E":'
        self.suffix = b"}" if self.combined else b""


class FeedServer:
    """A Binance market-data server serving the trades of `source` (an iterable of trade dicts).

    `market`: "spot" (stream.binance.com's formats, REST under /api/v3) or "um" (USD-M futures: fstream's
    events, with X and without M, REST under /fapi/v1); `non_market_ratio` (futures) of the trades become
    INSURANCE_FUND or ADL trades, decided per trade from `seed`, unless the source gives a trade its class.

    Pacing: `rate` frames/s per connection, or `speedup` x the trades' own time gaps; neither = as fast
    as the client reads. `shared_cursor`: a new connection starts where the furthest one got to (the
    market went on), else every connection replays from the start of the kept history.
    Faults, decided per trade from `seed`: `skip_ids` / `skip_ids_ratio` (never streamed, still in REST),
    `duplicate_ratio` (sent twice), `out_of_order_ratio` (sent after the next trade), `malformed_ratio`
    (a truncated frame instead). `drop_every` N frames the TCP connection ends without a close frame;
    after `max_connection_seconds` it is closed with 1001. `stats` counts what was sent and injected:
    frames == events + duplicates + malformed, and per subscribed trade events + skipped + malformed.
    `symbols` lists the exchange's symbols (default: those seen in the source); `history_limit` trades
    are kept for replays and REST.
    """

    def __init__(
        self,
        source: Iterable[dict],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        rate: float | None = None,
        speedup: float | None = None,
        shared_cursor: bool = True,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 60.0,
        drop_every: int | None = None,
        max_connection_seconds: float | None = None,
        skip_ids: Iterable[int] = (),
        skip_ids_ratio: float = 0.0,
        duplicate_ratio: float = 0.0,
        out_of_order_ratio: float = 0.0,
        malformed_ratio: float = 0.0,
        seed: int = 0,
        symbols: Iterable[str] | None = None,
        history_limit: int = 200_000,
        market: str = "spot",
        non_market_ratio: float = 0.0,
    ):
        if rate is not None and speedup is not None:
            raise ValueError("pace by rate or by speedup, not both")
        if (rate is not None and rate <= 0) or (speedup is not None and speedup <= 0):
            raise ValueError("rate and speedup must be positive (None = unpaced)")
        if drop_every is not None and drop_every < 1:
            raise ValueError("drop_every must be at least 1")
        ratios = (skip_ids_ratio, duplicate_ratio, out_of_order_ratio, malformed_ratio)
        if min(ratios) < 0 or sum(ratios) > 1:
            raise ValueError("fault ratios must be >= 0 and add up to at most 1")
        if market not in MARKETS:
            raise ValueError(f"market must be one of {', '.join(MARKETS)}, not {market!r}")
        self.market = MARKETS[market]
        if not 0 <= non_market_ratio <= 1 or (non_market_ratio and not self.market.classified):
            raise ValueError("non_market_ratio is a share (0 to 1) of a futures market's trades; spot trades are all MARKET")
        self._tail = _futures_event_tail if self.market.classified else _event_tail
        self.host, self.port = host, port
        self.rate, self.speedup = rate, speedup
        self.shared_cursor = shared_cursor
        self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
        self.drop_every, self.max_connection_seconds = drop_every, max_connection_seconds
        klines = Klines(price_forming_only=self.market.classified)
        self._market = _Market(source, history_limit, set(skip_ids), ratios, seed, klines, non_market_ratio)
        self._symbols = {s.upper() for s in symbols} if symbols is not None else None
        self._cursor = 0  # where the next connection starts when the cursor is shared
        self._server: Server | None = None
        self._connections = 0
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "connections",
                "frames",
                "events",
                "duplicates",
                "skipped",
                "malformed",
                "out_of_order",
                "drops",
                "expired",
                "control_messages",
                "rest_requests",
            ),
            0,
        )

    # lifecycle

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def symbols(self) -> set[str]:
        """Symbols the exchange lists: given explicitly, or those seen in the source so far."""
        return self._symbols if self._symbols is not None else set(self._market.by_symbol)

    @property
    def cursor(self) -> int:
        """Market position (0-based index into the source) where the next connection starts."""
        return self._cursor if self.shared_cursor else self._market.base

    async def start(self) -> Self:
        self._market.pull()  # learn the symbols before the first REST call
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            process_request=self._process_request,
            compression=None,  # Binance negotiates none, and frames are written pre-encoded (see _write)
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            write_limit=2**20,
        )  # a deep send buffer lets the next batch be built while the client reads
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def serve_forever(self) -> None:
        assert self._server is not None, "start() first"
        await self._server.serve_forever()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # WebSocket

    async def _handle(self, ws: ServerConnection) -> None:
        self._connections += 1
        self.stats["connections"] += 1
        conn = _Connection(self._connections, ws, self.cursor)
        url = urlsplit(ws.request.path)
        conn.combined = url.path.startswith("/stream")
        if conn.combined:
            streams = parse_qs(url.query).get("streams", [""])[0].split("/")
        else:
            streams = url.path.removeprefix("/ws").split("/")
        conn.subscribe(s.lower() for s in streams if s)
        reader = asyncio.create_task(self._read(conn))
        try:
            await self._pump(conn)
        except ConnectionClosed:
            pass
        finally:
            reader.cancel()
            peer = ws.remote_address[:2] if ws.remote_address else ("?", 0)
            reason = conn.reason or f"closed, code {ws.close_code} {ws.close_reason or ''}".rstrip()
            log.info(
                "connection %d from %s:%s %s: sent %d frames, now at position %d; %s",
                conn.number,
                *peer,
                ws.request.path,
                conn.sent,
                conn.pos,
                reason,
            )

    async def _read(self, conn: _Connection) -> None:
        """Answer Binance's live control messages (SUBSCRIBE, UNSUBSCRIBE, LIST_SUBSCRIPTIONS, ...)."""
        with contextlib.suppress(ConnectionClosed):
            async for message in conn.ws:
                self.stats["control_messages"] += 1
                await conn.ws.send(orjson.dumps(self._control(conn, message)).decode())

    def _control(self, conn: _Connection, message: str | bytes) -> dict:
        try:
            request = orjson.loads(message)
        except orjson.JSONDecodeError as exc:
            return {"code": 3, "msg": f"Invalid JSON: {exc}"}
        if not isinstance(request, dict):
            return {"code": 3, "msg": "Invalid JSON: expected an object"}
        method, params, request_id = request.get("method"), request.get("params"), request.get("id")
        if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
            if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
                return {"code": 2, "msg": "Invalid request: 'params' must be a list of stream names", "id": request_id}
            streams = [p.lower() for p in params]
            conn.subscribe(streams) if method == "SUBSCRIBE" else conn.unsubscribe(streams)
            return {"result": None, "id": request_id}
        if method == "LIST_SUBSCRIPTIONS":
            return {"result": list(conn.streams), "id": request_id}
        if method == "SET_PROPERTY" and isinstance(params, list) and params[:1] == ["combined"]:
            conn.combined = bool(params[1:2] and params[1])
            conn._refresh()
            return {"result": None, "id": request_id}
        if method == "GET_PROPERTY" and params == ["combined"]:
            return {"result": conn.combined, "id": request_id}
        return {
            "code": 2,
            "msg": f"Invalid request: unknown variant {method!r}, expected one of SUBSCRIBE, "
            "UNSUBSCRIBE, LIST_SUBSCRIPTIONS, SET_PROPERTY, GET_PROPERTY",
            "id": request_id,
        }

    async def _pump(self, conn: _Connection) -> None:
        """Send the market to one connection, paced, with the configured faults, until it closes."""
        ws = conn.ws
        loop = asyncio.get_running_loop()
        opened = loop.time()
        anchor: tuple[float, int] | None = None  # (loop time, trade time or frames sent) pacing starts from
        while ws.state is State.OPEN:
            now = loop.time()
            if self.max_connection_seconds is not None and now - opened >= self.max_connection_seconds:
                self.stats["expired"] += 1
                conn.reason = "closed by server: max_connection_seconds"
                await ws.close(1001, "connection lifetime exceeded")
                return
            if not conn.prefixes.keys() & self.symbols:
                await asyncio.sleep(IDLE)  # nothing subscribed that trades: wait for a SUBSCRIBE
                continue
            budget, until_ms = MAX_BATCH, None
            if self.rate is not None:
                anchor = anchor or (now, conn.sent)
                budget = min(MAX_BATCH, int((now - anchor[0]) * self.rate) - (conn.sent - anchor[1]))
                if budget <= 0:
                    await asyncio.sleep(max(MIN_TICK, (conn.sent - anchor[1] + 1) / self.rate - (now - anchor[0])))
                    continue
            elif self.speedup is not None:
                if anchor is None:
                    first = self._market.time_at(conn.pos)
                    anchor = (now, first) if first is not None else None
                if anchor is not None:
                    until_ms = anchor[1] + (now - anchor[0]) * 1000 * self.speedup
            payloads, stop = self._take(conn, budget, until_ms)
            if payloads:
                await self._write(ws, payloads)
                conn.sent += len(payloads)
            if self.drop_every is not None and conn.sent >= self.drop_every:
                # Abrupt, like a dropped TCP link: no close frame. close() still flushes what was written.
                self.stats["drops"] += 1
                conn.reason = "dropped by server: drop_every"
                ws.transport.close()
                await ws.wait_closed()
                return
            if stop == "end":
                await asyncio.sleep(IDLE)
            elif stop == "time":
                due = (self._market.time_at(conn.pos) - anchor[1]) / 1000 / self.speedup - (loop.time() - anchor[0])
                await asyncio.sleep(min(max(due, MIN_TICK), IDLE))
            else:
                await asyncio.sleep(0)  # let pings, control replies and other clients run

    def _take(self, conn: _Connection, budget: int, until_ms: float | None) -> tuple[list[bytes], str]:
        """Advance `conn` through the market; return the frames to send now and why it stopped."""
        stats = self.stats
        limit = budget if self.drop_every is None else min(budget, self.drop_every - conn.sent)
        event_ms = b"%d" % int(time.time() * 1000)  # "E": when the event leaves the exchange
        prefixes, suffix, tail = conn.prefixes, conn.suffix, self._tail
        out: list[bytes] = []
        stop = "budget"
        for _ in range(MAX_SCAN):
            if len(out) >= limit:
                break
            row = self._row(conn)
            if row is None:
                stop = "end"
                break
            _, symbol, trade, fault = row
            if until_ms is not None and trade["time_ms"] > until_ms:
                stop = "time"
                break
            conn.pos += 1
            prefix = prefixes.get(symbol)
            if prefix is None:
                continue
            if fault == SKIP:
                stats["skipped"] += 1
                continue
            payload = prefix + event_ms + tail(trade) + suffix
            if fault == MALFORMED:
                out.append(payload[: len(payload) // 2])  # a truncated frame: the event is lost
                stats["malformed"] += 1
                continue
            if fault == SWAP and limit - len(out) >= 2:
                partner = self._row(conn)
                if partner is not None and partner[3] == NONE and partner[1] in prefixes:
                    conn.pos += 1
                    out.append(prefixes[partner[1]] + event_ms + tail(partner[2]) + suffix)
                    stats["events"] += 1
                    stats["out_of_order"] += 1
            out.append(payload)
            stats["events"] += 1
            if fault == DUPLICATE and len(out) < limit:
                out.append(payload)
                stats["duplicates"] += 1
        stats["frames"] += len(out)
        if self.shared_cursor:
            self._cursor = max(self._cursor, conn.pos)
        self._market.frontier = max(self._market.frontier, conn.pos)
        return out, stop

    def _row(self, conn: _Connection) -> Row | None:
        """The market row at the connection's position, pulling from the source as needed."""
        market = self._market
        conn.pos = max(conn.pos, market.base)  # a slow reader fell behind the kept history: those trades are gone
        while (index := conn.pos - market.base) >= len(market.rows):
            if not market.pull():
                return None
            conn.pos = max(conn.pos, market.base)  # a pull trims, and may trim more than history_limit < CHUNK keeps
        return market.rows[index]

    @staticmethod
    async def _write(ws: ServerConnection, payloads: list[bytes]) -> None:
        # websockets' send() costs ~10 µs a frame, too slow for 100k msg/s: all but the last frame are
        # framed here (unmasked, unfragmented, no extension) and written at once; send() then writes the
        # last one and applies flow control.
        parts = []
        for payload in payloads[:-1]:
            n = len(payload)
            parts.append(
                struct.pack("!BB", 0x81, n)
                if n < 126
                else struct.pack("!BBH", 0x81, 126, n)
                if n < 65536
                else struct.pack("!BBQ", 0x81, 127, n)
            )
            parts.append(payload)
        if parts and ws.state is State.OPEN:
            ws.transport.write(b"".join(parts))
        await ws.send(payloads[-1], text=True)

    # REST

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path in ("/ws", "/stream") or url.path.startswith("/ws/"):
            return None  # a WebSocket handshake
        if not url.path.startswith(self.market.rest_prefix.rsplit("/", 1)[0] + "/"):  # /api/ or /fapi/
            return connection.respond(404, "Not Found\n")
        self.stats["rest_requests"] += 1
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        status, body = self._rest(url.path, query)
        response = connection.respond(status, orjson.dumps(body).decode())
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = "application/json;charset=UTF-8"
        return response

    def _server_ms(self) -> int:
        """The exchange's clock: never behind the trades it has served (a random walk's times can run ahead of
        the wall clock), so a client asking which minutes are closed gets the market's answer."""
        self._market.count_served()
        return max(int(time.time() * 1000), (self._market.klines.now_ms or 0) + 1)

    def _rest(self, path: str, query: dict[str, str]) -> tuple[int, object]:
        prefix = self.market.rest_prefix
        endpoint = path.removeprefix(prefix) if path.startswith(prefix + "/") else None
        if endpoint == "/ping":
            return 200, {}
        if endpoint == "/time":
            return 200, {"serverTime": self._server_ms()}
        if endpoint == "/exchangeInfo":
            symbols = sorted(self.symbols)
            if "symbol" in query:
                if query["symbol"].upper() not in symbols:
                    return INVALID_SYMBOL
                symbols = [query["symbol"].upper()]
            return 200, {
                "timezone": "UTC",
                "serverTime": self._server_ms(),
                "rateLimits": [],
                "exchangeFilters": [],
                "symbols": [_symbol_info(s, self.market is SPOT) for s in symbols],
            }
        if endpoint in ("/historicalTrades", "/trades"):
            return self._trades(query, from_id_allowed=endpoint == "/historicalTrades")
        if endpoint == "/klines":
            return self._klines(query)
        return 404, {"code": -1000, "msg": f"Unknown endpoint {path}."}

    def _trades(self, query: dict[str, str], from_id_allowed: bool) -> tuple[int, object]:
        error = _parameter_error(query, ("limit", "fromId"), 1000)
        if error is not None:
            return error
        symbol, limit = query["symbol"].upper(), int(query.get("limit", 500))
        if symbol not in self.symbols:
            return INVALID_SYMBOL
        if from_id_allowed and "fromId" in query:
            rows = self._market.from_id(symbol, int(query["fromId"]), limit)
        else:
            rows = self._market.before(symbol, self._market.frontier, limit)
        spot = self.market is SPOT
        # Binance's futures trade lists hold market trades only: no INSURANCE_FUND or ADL trade.
        trades = [row[2] for row in rows if row[2].get("trade_class", PRICE_FORMING_CLASS) == PRICE_FORMING_CLASS]
        return 200, [_rest_trade(trade, spot) for trade in trades]

    def _klines(self, query: dict[str, str]) -> tuple[int, object]:
        """The bars of the trades served so far (feed_klines.py), as Binance's klines endpoint answers."""
        error = _parameter_error(query, ("limit", "startTime", "endTime"), self.market.klines_max_limit, ("interval",))
        if error is not None:
            return error
        if query["interval"] not in INTERVALS:
            return 400, {"code": -1120, "msg": "Invalid interval."}
        symbol = query["symbol"].upper()
        if symbol not in self.symbols:
            return INVALID_SYMBOL
        start, end = (int(query[name]) if name in query else None for name in ("startTime", "endTime"))
        if start is not None and end is not None and start > end:
            return 400, {"code": -1023, "msg": "Start time is greater than end time."}
        self._market.count_served()
        width = INTERVALS[query["interval"]]
        return 200, self._market.klines.select(symbol, width, start, end, int(query.get("limit", 500)))


def _parameter_error(
    query: dict[str, str], numbers: tuple[str, ...], max_limit: int, required: tuple[str, ...] = ()
) -> tuple[int, dict] | None:
    """Binance's answer to a missing symbol (or other mandatory parameter), a number that is not one, or a limit out of range."""
    for name in ("symbol", *required):
        if not query.get(name):
            return 400, {"code": -1102, "msg": f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed."}
    for name in numbers:
        if name in query and not re.fullmatch(r"[0-9]{1,20}", query[name]):
            return 400, {
                "code": -1100,
                "msg": f"Illegal characters found in parameter '{name}'; legal range is '^[0-9]{{1,20}}$'.",
            }
    if not 1 <= int(query.get("limit", 500)) <= max_limit:
        return 400, {
            "code": -1100,
            "msg": f"Illegal characters found in parameter 'limit'; legal range is '1 to {max_limit}'.",
        }
    return None


def _symbol_info(symbol: str, spot: bool) -> dict:
    quote = quote_currency(symbol) or symbol[-4:]
    info = {
        "symbol": symbol,
        "status": "TRADING",
        "baseAsset": symbol[: -len(quote)],
        "quoteAsset": quote,
        "filters": [
            {"filterType": "PRICE_FILTER", "minPrice": "0.01000000", "maxPrice": "1000000.00000000", "tickSize": "0.01000000"}
        ],
    }
    if not spot:
        return {**info, "pair": symbol, "contractType": "PERPETUAL", "pricePrecision": 2, "quantityPrecision": 3}
    return {
        **info,
        "baseAssetPrecision": 8,
        "quotePrecision": 8,
        "quoteAssetPrecision": 8,
        "orderTypes": ["LIMIT", "MARKET"],
        "isSpotTradingAllowed": True,
        "permissions": ["SPOT"],
    }


# --- running it ------------------------------------------------------------------------------------


@contextlib.contextmanager
def run_in_thread(source: Iterable[dict], **kwargs) -> Iterator[FeedServer]:
    """Run a FeedServer(source, **kwargs) on its own event loop in a background thread; yield it started.

    The thread shares the GIL with the caller: pace the feed (rate/speedup) for in-process clients, and
    run the command line in its own process to measure throughput.
    """
    server = FeedServer(source, **kwargs)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="feed-server", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=10)
        yield server
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()
