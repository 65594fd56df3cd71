"""Live path, producer rate: FeedServer (unpaced) -> BinanceProducer -> Kafka, against its raw limits.

The feed is the real BTCUSDT trades of 2024-01-01 12:00-12:30 cycled to N = 500,000 trades with fresh
contiguous trade ids and times (30 minutes later each round), served by FeedServer unpaced (as fast as
the client reads) on Binance's combined-stream path. The server runs in a subprocess of its own
(`python -m bench.live_producer_rate --serve N`): the exchange is not on the producer's CPU in
production, and in a thread it would share the producer's GIL. Each measurement gets a fresh server.
  k2       BinanceProducer(["BTCUSDT"], ...).run() with K2's producer config into a fresh topic of 3
           partitions, timed from run() until stats.produced reaches N and the flush completes.
  raw (a)  a bare `websockets` client on the same URL, counting N frames: no decoding, no Kafka.
  raw (b)  a bare confluent-kafka produce loop (K2's producer config, same key and headers) of the
           same N trades, encoded in advance by live_codec.message_from_event.
  profile  the per-frame cost of what BinanceProducer.handle_frame does, each piece timed alone over
           the same frames: events_in_frame, message_from_event, Producer.produce, and
           handle_frame whole.
Verdict: K2 msgs/s >= 100,000. One repetition of each (the suite must stay within minutes).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect
from websockets.asyncio.client import connect

from bench._common import REPO, environment, footer, peak_rss_mb, progress, row, save
from bench.live_throughput import (
    CpuMeter,
    binance_trades_file,
    broker,
    cycled_trades,
    load_average,
    produce_all,
    real_trades,
    v2_messages,
    verdict,
)
from k2_assets.core import live_codec
from k2_assets.core.binance_stream import BinanceProducer, stream_url
from k2_assets.core.kafka import ensure_topics
from k2_assets.dev.feed_server import FeedServer

NAME = "live_producer_rate"
N_MESSAGES = int(os.environ.get("K2_BENCH_PRODUCER_MESSAGES", 500_000))
SYMBOLS = ("BTCUSDT",)
PARTITIONS = 3
PROFILE_FRAMES = 50_000
TARGET_RAW_FRACTION = 0.6  # of the bare websockets client, measured in the same run
TIME_LIMIT_S = 150.0


# ================================================================ the feed server, in its own process


def serve(n: int, symbols: tuple[str, ...] = SYMBOLS) -> None:
    """Serve n cycled real trades unpaced on a free port; print {"port": ...}; stop on SIGTERM or stdin EOF."""

    async def main() -> None:
        # Every connection reads the market from its start: producers split by symbol each get all of theirs.
        server = FeedServer(
            cycled_trades(real_trades(), symbols, n), symbols=symbols, rate=None, speedup=None, shared_cursor=False
        )
        await server.start()
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stopping.set)
        threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stopping.set)), daemon=True).start()
        print(json.dumps({"port": server.port}), flush=True)
        await stopping.wait()
        await server.stop()

    asyncio.run(main())


class FeedProcess:
    """`python -m bench.live_producer_rate --serve N` as a context manager: yields the combined-stream base URL."""

    def __init__(self, n: int, symbols: tuple[str, ...] = SYMBOLS):
        self.n, self.symbols = n, symbols
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> str:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.live_producer_rate", "--serve", str(self.n), ",".join(self.symbols)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout=30):
                self.__exit__()
                raise TimeoutError("the feed server subprocess did not report its port within 30 s")
        line = self.proc.stdout.readline()
        if not line:
            self.__exit__()
            raise RuntimeError(f"the feed server subprocess exited with {self.proc.wait()}")
        return f"ws://127.0.0.1:{json.loads(line)['port']}"

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self.proc = None


# ================================================================ measurements


async def k2_producer(base_url: str, bootstrap: str, topic: str, n: int, symbols: tuple[str, ...] = SYMBOLS) -> dict:
    producer = BinanceProducer(list(symbols), bootstrap, base_url=base_url, topic=topic, dead_letter_topic=topic + ".dlq")
    start = time.perf_counter()
    task = asyncio.create_task(producer.run())
    deadline = time.monotonic() + TIME_LIMIT_S
    while producer.stats.produced + producer.stats.dead_lettered < n:
        if task.done():
            task.result()
            raise RuntimeError(f"BinanceProducer.run returned after {producer.stats.produced} of {n} messages")
        if time.monotonic() > deadline:
            producer.stop()
            await task
            raise TimeoutError(f"BinanceProducer produced {producer.stats.produced} of {n} messages in {TIME_LIMIT_S:.0f} s")
        await asyncio.sleep(0.01)
    produced_at = time.perf_counter()
    producer.stop()
    stats = await task  # run() ends with close(): flush
    end = time.perf_counter()
    unflushed = len(producer.producer)
    result = {
        "seconds": end - start,
        "seconds_to_produced": produced_at - start,
        "flush_s": end - produced_at,
        "received": stats.received,
        "produced": stats.produced,
        "dead_lettered": stats.dead_lettered,
        "produce_errors": stats.produce_errors,
        "reconnects": stats.reconnects,
        "gaps": len(stats.gaps),
        "unflushed": unflushed,
    }
    del producer
    return result


async def _bare_websocket(base_url: str, n: int, keep: list) -> dict:
    """Count n frames as they arrive; the first len(keep) of them are kept (for the per-frame profile)."""
    start = time.perf_counter()
    count, wanted = 0, len(keep)
    # The connection BinanceProducer._connection opens, minus everything it does per frame.
    url = stream_url(base_url, list(SYMBOLS))
    async with connect(url, ping_interval=20, ping_timeout=60, max_size=2**20, open_timeout=10) as ws:
        async for frame in ws:
            if count < wanted:
                keep[count] = frame
            count += 1
            if count >= n:
                break
    return {"seconds": time.perf_counter() - start, "received": count}


async def _bare_picows(base_url: str, n: int) -> dict:
    """Count n frames with picows, the client BinanceProducer uses, doing nothing else."""
    done = asyncio.get_running_loop().create_future()

    class Count(WSListener):
        count = 0

        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            if frame.msg_type is WSMsgType.TEXT:
                frame.get_payload_as_bytes()
                self.count += 1
                if self.count >= n and not done.done():
                    done.set_result(None)
                    transport.disconnect()

    start = time.perf_counter()
    _, listener = await ws_connect(Count, stream_url(base_url, list(SYMBOLS)), max_frame_size=2**20)
    await done
    return {"seconds": time.perf_counter() - start, "received": listener.count}


def per_frame_profile(bootstrap: str, topic: str, frames: list[str]) -> dict:
    """µs per frame of each piece of BinanceProducer.handle_frame, timed alone over the same frames
    (as the server sent them, received as text by websockets)."""
    ingest = time.time_ns() // 1000
    out: dict[str, float] = {}

    def clock(label: str, fn) -> None:
        # Without the collector: keeping 50k results alive would make its full passes part of the figure.
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            fn()
            out[label] = (time.perf_counter() - start) / len(frames) * 1e6
        finally:
            gc.enable()

    raw: list = []
    events: list = []
    values: list = []
    clock("str.encode", lambda: raw.extend(f.encode() for f in frames))
    clock("events_in_frame (orjson.loads)", lambda: events.extend(live_codec.events_in_frame(f)[0] for f in raw))
    clock("message_from_event", lambda: values.extend(live_codec.message_from_event(e, ingest)[3] for e in events))
    producer = BinanceProducer(list(SYMBOLS), bootstrap, topic=topic, dead_letter_topic=topic + ".dlq")
    # Connected and warm before timing: the first produce would otherwise wait for metadata.
    producer.producer.list_topics(topic, timeout=10)
    producer._produce(topic, b"BTCUSDT", values[0], live_codec.HEADERS)
    producer.producer.flush(10)

    def produce_values() -> None:
        for v in values:
            producer._produce(topic, b"BTCUSDT", v, live_codec.HEADERS)
        producer.producer.flush(60)

    clock("Producer.produce + flush (K2 config)", produce_values)
    clock("handle_frame whole + flush", lambda: ([producer.handle_frame(f, ingest) for f in frames], producer.producer.flush(60)))
    producer.producer.flush(60)
    # Let go of the Kafka producer now. Rebound rather than deleted: produce_values and the lambda above
    # close over `producer`, and a `del` would leave their name unbound.
    producer = None
    out["sum of the pieces"] = sum(v for k, v in out.items() if k != "handle_frame whole + flush")
    return out


# ================================================================ report


def render(results: dict) -> str:
    m = results["measurements"]
    header = f"{'path':<52} {'messages':>9} {'seconds':>8} {'msgs/s':>10}  {'target':<16} verdict"
    lines = [
        f"Producer rate — real BTCUSDT trades cycled to {results['messages']:,}, FeedServer unpaced in its own process, "
        f"K2 producer config ({results['environment']['cpu_count']} CPUs)",
        header,
        "-" * len(header),
    ]
    for label, key, target, ok in (
        (
            "K2: FeedServer -> BinanceProducer -> Kafka (flushed)",
            "k2",
            f">= {TARGET_RAW_FRACTION:g}x raw (a)",
            results["verdicts"]["k2_msgs_per_s"],
        ),
        ("  raw (a): bare websockets client, no Kafka", "raw_websocket", "", ""),
        ("  raw (c): bare picows client (K2's), no Kafka", "raw_picows", "", ""),
        ("  raw (b): bare confluent-kafka produce loop", "raw_produce", "", ""),
    ):
        x = m[key]
        lines.append(f"{label:<52} {x['messages']:>9,} {x['seconds']:>8.2f} {x['msgs_per_s']:>10,.0f}  {target:<16} {ok}")
    k2 = m["k2"]
    lines += [
        "-" * len(header),
        f"K2 split: {k2['seconds_to_produced']:.2f} s to produce() the last message, flush {k2['flush_s']:.2f} s; "
        f"received {k2['received']:,}, dead-lettered {k2['dead_lettered']}, produce errors {k2['produce_errors']}, "
        f"unflushed {k2['unflushed']}",
        "per-frame cost, µs (each piece timed alone over the same frames, GC off): "
        + ", ".join(f"{k} {v:.1f}" for k, v in results["per_frame_us"].items()),
        f"CPU during K2: this process {k2['cpu']['process_cores']:.2f} cores, broker {k2['cpu']['broker_cores']:.2f} "
        f"(feed server in its own process, not counted); machine steal {k2['cpu']['machine_steal_fraction']:.1%}",
        footer(results),
    ]
    return "\n".join(lines)


def run() -> str:
    trades = real_trades()
    load_before = load_average()
    progress(f"producer rate: {N_MESSAGES:,} cycled BTCUSDT trades (load average {load_before:.2f} on {os.cpu_count()} CPUs)")
    m: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="k2-bench-producer-rate-") as tmp, broker(Path(tmp)) as b:
        run_id = uuid.uuid4().hex[:6]
        topics = {
            f"bench.live.prod.{run_id}": PARTITIONS,
            f"bench.live.prod.{run_id}.dlq": 1,
            f"bench.live.raw.{run_id}": PARTITIONS,
            f"bench.live.prof.{run_id}": PARTITIONS,
            f"bench.live.prof.{run_id}.dlq": 1,
        }
        ensure_topics(b.bootstrap, topics)
        k2_topic, raw_topic, profile_topic = (f"bench.live.{k}.{run_id}" for k in ("prod", "raw", "prof"))

        frames: list = [None] * min(PROFILE_FRAMES, N_MESSAGES)
        with FeedProcess(N_MESSAGES) as url:
            result = asyncio.run(_bare_websocket(url, N_MESSAGES, frames))
        m["raw_websocket"] = {
            "messages": result["received"],
            "seconds": result["seconds"],
            "msgs_per_s": result["received"] / result["seconds"],
            "load_1min_after": load_average(),
        }
        progress(
            f"raw websockets client: {result['received']:,} frames in {result['seconds']:.2f} s "
            f"({m['raw_websocket']['msgs_per_s']:,.0f}/s); "
            f"peak RSS {peak_rss_mb():.0f} MB"
        )

        with FeedProcess(N_MESSAGES) as url:
            result = asyncio.run(_bare_picows(url, N_MESSAGES))
        m["raw_picows"] = {
            "messages": result["received"],
            "seconds": result["seconds"],
            "msgs_per_s": result["received"] / result["seconds"],
        }
        progress(f"raw picows client: {result['received']:,} frames in {result['seconds']:.2f} s")

        with FeedProcess(N_MESSAGES) as url, CpuMeter(b.process.pid) as meter:
            result = asyncio.run(k2_producer(url, b.bootstrap, k2_topic, N_MESSAGES))
        gc.collect()
        m["k2"] = {
            "messages": result["produced"],
            "msgs_per_s": result["produced"] / result["seconds"],
            **result,
            "cpu": meter.as_dict(),
            "load_1min_after": load_average(),
        }
        progress(
            f"K2 BinanceProducer: {result['produced']:,} in {result['seconds']:.2f} s ({m['k2']['msgs_per_s']:,.0f}/s), "
            f"flush {result['flush_s']:.2f} s; peak RSS {peak_rss_mb():.0f} MB"
        )
        if result["produce_errors"] or result["unflushed"] or result["dead_lettered"]:
            raise AssertionError(f"BinanceProducer: {result}")

        # orjson.dumps leaves each result in a ~8 KB buffer; right-sized copies keep 500k of them at ~250 MB, not 4 GB.
        messages = v2_messages(trades, SYMBOLS, N_MESSAGES, time.time_ns() // 1000)
        values = [(key, bytes(memoryview(value))) for key, value in messages]
        with CpuMeter(b.process.pid) as meter:
            count, seconds = produce_all(b.bootstrap, raw_topic, values)
        m["raw_produce"] = {
            "messages": count,
            "seconds": seconds,
            "msgs_per_s": count / seconds,
            "cpu": meter.as_dict(),
            "load_1min_after": load_average(),
        }
        progress(f"raw produce loop: {count:,} in {seconds:.2f} s ({count / seconds:,.0f}/s); peak RSS {peak_rss_mb():.0f} MB")
        del values

        per_frame = per_frame_profile(b.bootstrap, profile_topic, frames)
        del frames
        progress("per frame, µs: " + ", ".join(f"{k} {v:.1f}" for k, v in per_frame.items()))
        gc.collect()
    results = {
        "benchmark": NAME,
        "data_file": os.path.relpath(binance_trades_file(), REPO),
        "source": "real BTCUSDT trades (replay_file) cycled with fresh contiguous ids and times; FeedServer unpaced, own process",
        "messages": N_MESSAGES,
        "environment": environment(),
        "targets": {"fraction_of_raw_websocket": TARGET_RAW_FRACTION},
        "verdicts": {"k2_msgs_per_s": verdict(m["k2"]["msgs_per_s"] >= TARGET_RAW_FRACTION * m["raw_websocket"]["msgs_per_s"])},
        "measurements": m,
        "k2_over_raw_websocket": m["k2"]["msgs_per_s"] / m["raw_websocket"]["msgs_per_s"],
        "k2_over_raw_produce": m["k2"]["msgs_per_s"] / m["raw_produce"]["msgs_per_s"],
        "per_frame_us": per_frame,
        "summary": [
            row(
                "producer, local feed -> Kafka",
                f"{m['k2']['msgs_per_s']:,.0f} msgs/s",
                f"bare websockets client: {m['raw_websocket']['msgs_per_s']:,.0f}/s",
                m["k2"]["msgs_per_s"] / m["raw_websocket"]["msgs_per_s"],
                f">= {TARGET_RAW_FRACTION:g}x",
                m["k2"]["msgs_per_s"] >= TARGET_RAW_FRACTION * m["raw_websocket"]["msgs_per_s"],
            )
        ],
        "profile_frames": min(PROFILE_FRAMES, N_MESSAGES),
    }
    return render(save(NAME, results, load_before))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(int(sys.argv[2]), tuple(sys.argv[3].split(",")) if len(sys.argv) > 3 else SYMBOLS)
    else:
        sys.exit(
            "usage: python -m bench.live_producer_rate --serve N   "
            "(the benchmark itself: python -m bench --only live_producer_rate)"
        )
