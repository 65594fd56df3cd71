"""Binance trade stream -> Kafka: the long-running producer.

Connects to the combined stream (`/stream?streams=btcusdt@trade/...`) of one Binance market (spot, or
USD-M futures), turns every trade event into a v2 trade (k2_assets.core.live_codec) and produces it,
keyed by symbol, with an idempotent acks=all producer. Anything that cannot become a trade goes to the
dead-letter topic with its raw bytes and the reason. Reconnects back off exponentially with full jitter,
the connection is renewed before Binance's 24-hour cut, and every reconnect is logged with the last
trade id seen per symbol, so a gap across the outage is visible (and repairable by trade id).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

from confluent_kafka import Producer
from picows import WSCloseCode, WSError, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from k2_assets.core import live_codec
from k2_assets.core.binance_format import SPOT, Market
from k2_assets.core.kafka import producer_config
from k2_assets.core.logs import get_logger
from k2_assets.core.metrics import ProducerMetrics
from k2_assets.core.settings import Settings

LOGGER = "k2.stream"
MAX_CONNECTION_SECONDS = 23.5 * 3600  # Binance closes every connection at 24 hours
METRICS_EVERY_US = 250_000


@dataclass
class StreamStats:
    received: int = 0
    produced: int = 0
    dead_lettered: int = 0
    produce_errors: int = 0
    reconnects: int = 0
    last_trade_id: dict[str, int] = field(default_factory=dict)
    gaps: list[dict] = field(default_factory=list)


def stream_url(base_url: str, symbols: list[str]) -> str:
    return base_url.rstrip("/") + "/stream?streams=" + "/".join(f"{s.lower()}@trade" for s in symbols)


def _event(name: str, **fields) -> None:
    """One structured log line per notable event: JSON in `k2 stream binance`, through `logging` in a library."""
    # Looked up per event, not at import: the command configures JSON logs after importing this module.
    get_logger(LOGGER).info(name, **fields)


class _Frames(WSListener):
    """picows hands every frame to this from its Cython read loop: a trade is produced right there, with no
    per-frame coroutine or queue (the websockets library spent about 13 µs a frame on that alone).
    Pings are answered by picows (auto pong); the client pings an idle connection itself (auto ping)."""

    def __init__(self, producer: BinanceProducer):
        self.producer, self.partial, self.ended = producer, None, "connection lost without a close frame"

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
            if frame.fin:
                self.producer.handle_frame(frame.get_payload_as_bytes(), time.time_ns() // 1000)
            else:
                self.partial = bytearray(frame.get_payload_as_memoryview())
        elif kind is WSMsgType.CONTINUATION and self.partial is not None:  # a message in fragments
            self.partial += frame.get_payload_as_memoryview()
            if frame.fin:
                whole, self.partial = bytes(self.partial), None
                self.producer.handle_frame(whole, time.time_ns() // 1000)
        elif kind is WSMsgType.CLOSE:
            self.ended = f"closed by the server: {frame.get_close_code()} {frame.get_close_message() or b''!r}"
            hang_up(transport, frame.get_close_code())


def hang_up(transport: WSTransport, code: WSCloseCode = WSCloseCode.OK) -> None:
    """Send a close frame with `code`, then drop the connection."""
    transport.send_close(code)
    transport.disconnect()


class BinanceProducer:
    """One WebSocket connection at a time into one Kafka producer, for one market (spot or USD-M futures):
    the market gives the defaults of the base URL and topics, and the exchange code of its trades."""

    def __init__(
        self,
        symbols: list[str],
        bootstrap: str,
        *,
        market: Market = SPOT,
        base_url: str | None = None,
        topic: str | None = None,
        dead_letter_topic: str | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        max_connection_seconds: float = MAX_CONNECTION_SECONDS,
        metrics: ProducerMetrics | None = None,
        statistics_interval_ms: int = 5000,
        linger_ms: int | None = None,
    ):
        if not symbols:
            raise ValueError("at least one symbol is required")
        self.symbols = [s.upper() for s in symbols]
        self.market = market
        self.url = stream_url(base_url or market.ws_url, self.symbols)
        self.topic, self.dead_letter_topic = topic or market.topic, dead_letter_topic or market.dead_letter_topic
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.max_connection_seconds = max_connection_seconds
        self.stats = StreamStats()
        self.metrics = metrics or ProducerMetrics()
        self._produced = {s: self.metrics.produced.labels(s) for s in self.symbols}
        self._unpublished: dict[str, int] = {}  # trades produced per symbol, not yet in the metrics
        self._last_trade_us: dict[str, int] = {}  # exchange time of the newest trade per symbol, not yet published
        self._published = {"received": 0, "dead_lettered": 0}
        self._published_us = 0
        # producer_config asks for delivery reports of failures only; _delivered gets those.
        self.producer = Producer(
            producer_config(
                bootstrap,
                **{
                    "linger.ms": Settings.from_env().producer_linger_ms if linger_ms is None else linger_ms,
                    "error_cb": self._on_error,
                    "on_delivery": self._delivered,
                    "stats_cb": self._on_statistics,
                    "statistics.interval.ms": statistics_interval_ms,
                },
            )
        )
        self.stop_event = asyncio.Event()
        self._ws: WSTransport | None = None
        self._connecting: asyncio.Future | None = None

    def _on_error(self, error) -> None:
        _event("kafka_error", error=str(error))

    def _on_statistics(self, document: str) -> None:
        self.metrics.record_statistics(json.loads(document))

    def _delivered(self, error, message) -> None:
        if error is not None:
            self.stats.produce_errors += 1
            self.metrics.produce_errors.inc()
            _event("produce_error", error=str(error), topic=message.topic())

    def handle_frame(self, raw: bytes | str, ingest_us: int) -> None:
        """Decode one frame and produce its trade, or dead-letter it with the reason."""
        stats = self.stats
        stats.received += 1
        raw_bytes = raw.encode() if isinstance(raw, str) else raw
        try:
            (event,) = live_codec.events_in_frame(raw_bytes)
            symbol, trade_id, trade_us, value = live_codec.message_from_event(event, ingest_us, self.market)
        except live_codec.InvalidEvent as exc:
            stats.dead_lettered += 1
            self._produce(
                self.dead_letter_topic, None, raw_bytes, [("k2-reason", str(exc).encode()), ("k2-source", self.url.encode())]
            )
            self.publish_metrics()
            return
        last = stats.last_trade_id.get(symbol)
        if last is not None and trade_id > last + 1:
            stats.gaps.append({"symbol": symbol, "first_missing": last + 1, "last_missing": trade_id - 1})
        if last is None or trade_id > last:
            stats.last_trade_id[symbol] = trade_id
            self._last_trade_us[symbol] = trade_us
        self._produce(self.topic, symbol.encode(), value, live_codec.HEADERS)
        stats.produced += 1
        self._unpublished[symbol] = self._unpublished.get(symbol, 0) + 1
        if ingest_us - self._published_us >= METRICS_EVERY_US:
            self.publish_metrics(ingest_us)

    def publish_metrics(self, now_us: int | None = None) -> None:
        """Move the counts into the Prometheus metrics. Per frame that would cost more than the frame's
        own work, so the hot path calls this at most every METRICS_EVERY_US (and at every reconnect)."""
        m, stats = self.metrics, self.stats
        m.received.inc(stats.received - self._published["received"])
        m.dead_letters.inc(stats.dead_lettered - self._published["dead_lettered"])
        self._published.update(received=stats.received, dead_lettered=stats.dead_lettered)
        for symbol, count in self._unpublished.items():
            counter = self._produced.get(symbol) or self._produced.setdefault(symbol, m.produced.labels(symbol))
            counter.inc(count)
        self._unpublished.clear()
        for symbol, us in self._last_trade_us.items():
            m.last_trade_id.labels(symbol).set(stats.last_trade_id[symbol])
            m.last_trade_time.labels(symbol).set(us / 1e6)
        self._last_trade_us.clear()
        self._published_us = now_us if now_us is not None else time.time_ns() // 1000
        self.producer.poll(0)  # delivery failures and statistics callbacks, even when frames are few

    def _produce(self, topic: str, key: bytes | None, value: bytes, headers: list) -> None:
        while True:
            try:
                self.producer.produce(topic, key=key, value=value, headers=headers)
                return
            except BufferError:  # local queue full: let deliveries drain, then retry
                self.producer.poll(0.05)

    async def run(self) -> StreamStats:
        """Stream until stop() is called; reconnect on any connection failure."""
        attempt = 0
        while not self.stop_event.is_set():
            started = time.monotonic()
            try:
                await self._connection()
            except (TimeoutError, OSError, WSError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            else:
                reason = "renewed before the 24-hour limit" if not self.stop_event.is_set() else "stopped"
            if self.stop_event.is_set():
                break
            # A connection that lived a while was healthy: start the backoff again from the bottom.
            attempt = 0 if time.monotonic() - started > 60 else attempt + 1
            delay = random.uniform(0, min(self.backoff_max, self.backoff_initial * 2**attempt))
            self.stats.reconnects += 1
            self.metrics.reconnects.inc()
            self.publish_metrics()
            _event(
                "reconnect",
                reason=reason,
                attempt=attempt,
                delay_seconds=round(delay, 3),
                last_trade_id=dict(self.stats.last_trade_id),
            )
            try:
                await asyncio.wait_for(self.stop_event.wait(), timeout=delay)
            except TimeoutError:
                pass
        self.close()
        return self.stats

    async def _connection(self) -> None:
        self._connecting = asyncio.ensure_future(
            ws_connect(
                lambda: _Frames(self),
                self.url,
                websocket_handshake_timeout=10,
                enable_auto_ping=True,
                auto_ping_idle_timeout=30,  # a connection silent this long is pinged, and dropped if no pong in as long
                auto_ping_reply_timeout=30,
                max_frame_size=2**20,
            )
        )
        try:
            transport, frames = await self._connecting
        except asyncio.CancelledError:
            if self.stop_event.is_set() and not asyncio.current_task().cancelling():
                return  # stop() cancelled the handshake
            raise
        finally:
            self._connecting = None
        self._ws = transport
        if self.stop_event.is_set():  # stop() came after the handshake ended, before this resumed
            hang_up(transport)
        _event("connected", url=self.url, last_trade_id=dict(self.stats.last_trade_id))
        try:
            async with asyncio.timeout(self.max_connection_seconds):
                await transport.wait_disconnected()
        except TimeoutError:
            hang_up(transport)
            return  # renew the connection before the exchange cuts it
        finally:
            self._ws = None
            self.publish_metrics()
        if not self.stop_event.is_set():
            raise ConnectionError(frames.ended)

    def stop(self) -> None:
        """End the stream (on the producer's event loop): a handshake under way is cancelled, a connection closed."""
        self.stop_event.set()
        if self._connecting is not None:
            self._connecting.cancel()
        if self._ws is not None:
            hang_up(self._ws)

    def close(self, timeout: float = 5.0) -> None:  # inside the 10 s a Ctrl-C may take; what is left is counted
        remaining = self.producer.flush(timeout)
        self.publish_metrics()
        _event(
            "stopped",
            produced=self.stats.produced,
            dead_lettered=self.stats.dead_lettered,
            unflushed=remaining,
            last_trade_id=dict(self.stats.last_trade_id),
        )
