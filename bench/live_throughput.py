"""Live path, sustained Kafka -> Iceberg: `LiveWriter.drain` against the raw limit on the same messages.

One run, one embedded broker (Tansu, in memory), one fresh topic of 3 partitions:
  setup  N v2 trade messages (N = 1,000,000), built from the real BTCUSDT trades of 2024-01-01
         12:00-12:30 cycled over 4 symbols with fresh contiguous trade ids and times (30 minutes
         later each round), each made by `live_codec.trade_from_event` + `encode` (the first round
         literally; later rounds by shifting id and time in the first round's dict, spot-checked
         against trade_from_event), keyed by symbol, produced with K2's producer config.
  k2     `LiveWriter(trades, rejected, ...).drain(...)` into a fresh SQLite catalog + file warehouse,
         max_batch_rows=250,000, max_batch_seconds=2: decode, validate, dedup by (symbol, trade id),
         offsets in the snapshot summary. Timed from drain() to the on_batch of the batch that
         brings the written count to N; the table must then hold exactly N distinct message_ids.
         Per-stage time inside the writer comes from wrapping its methods from the outside; `consume`
         runs in the writer's consuming thread, overlapped with the other stages, so the stages add up
         to more than the wall time.
  raw    The same messages through a plain confluent-kafka Consumer (K2's consumer config, explicit
         assign, consume(num_messages=50,000)), the values joined and parsed by pyarrow's JSON reader
         (schema inferred) into an Arrow table, `pyarrow.parquet.write_table` (zstd) per batch of
         250,000 into a temp dir. The issue's raw limit.
  raw on the batch consumer
         The same, consumed with K2's batch consumer (kafka_batch.py), the one the writer reads with:
         the tighter limit, since K2's consuming no longer pays confluent-kafka's per-message objects.
Both are repeated REPEAT times, interleaved. Verdicts use the median.

This module also holds the helpers the other live_* benchmarks share (data file, cycled trades,
temp catalogs, percentiles, CPU accounting).
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pjson
import pyarrow.parquet as pq
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from bench._common import REPO, BenchUnavailable, Timing, environment, footer, profile_rows, progress, row, save
from k2_assets.core import catalog, live_codec, live_decode, live_writer
from k2_assets.core.kafka import consumer_config, ensure_topics, producer_config
from k2_assets.core.kafka_batch import BatchConsumer, Messages, lines
from k2_assets.dev.broker import EmbeddedBroker
from k2_assets.dev.feed_server import replay_file

NAME = "live_throughput"
N_MESSAGES = int(os.environ.get("K2_BENCH_LIVE_MESSAGES", 1_000_000))
SYMBOLS = ("BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT")
PARTITIONS = 3
MAX_BATCH_ROWS = 250_000
MAX_BATCH_SECONDS = 2.0
RAW_JSON_BLOCK = 4 << 20  # Arrow parses blocks in parallel; 4 MB was the fastest of 1, 4, 64 MB and one block
CONSUME_CHUNK = 50_000  # what LiveWriter._collect asks consume() for at most
REPEAT = int(os.environ.get("K2_BENCH_LIVE_REPEAT", 2))
# K2_BENCH_PROFILE=1 adds a cProfile of one more 250k micro-batch to the JSON (k2_profile_one_batch).
DRAIN_LIMIT_S = 120.0
TARGET_TRADES_PER_S = 150_000
TARGET_RAW_FRACTION = 0.85

DATASET = "binance_spot_btcusdt_trades_2024-01-01_1200-1230"
DATA_FILE = "BTCUSDT-trades-2024-01-01_1200-1230.derived.csv"


# ================================================================ shared by the live_* benchmarks


def binance_trades_file() -> Path:
    """The real BTCUSDT trades (16,702 of them), read in place beside the checkout."""
    shared = Path(os.environ["K2_SHARED_DATA"]) if os.environ.get("K2_SHARED_DATA") else REPO.parent / "shared" / "data"
    path = shared / DATASET / DATA_FILE
    if not path.is_file():
        how = "$K2_SHARED_DATA" if os.environ.get("K2_SHARED_DATA") else "the default ../shared/data beside the repo"
        raise BenchUnavailable(
            f"Binance BTCUSDT sample not found at {path} (from {how}): check out ../shared beside the repo "
            "or set K2_SHARED_DATA to the shared `data` directory"
        )
    return path


def real_trades() -> list[dict]:
    """The file's trades as FeedServer source dicts (trade_id, price, qty, time_ms, is_buyer_maker, symbol)."""
    return list(replay_file(binance_trades_file()))


def cycled_trades(trades: list[dict], symbols: tuple[str, ...], n: int) -> Iterator[dict]:
    """`n` FeedServer source trades: the real ones over and over, symbol by symbol, each round with
    fresh contiguous trade ids (+len(trades) per round) and times (+ the file's span per round)."""
    length = len(trades)
    span = trades[-1]["time_ms"] - trades[0]["time_ms"] + 1
    k = 0
    for r in range(n // (length * len(symbols)) + 1):
        id_shift, time_shift = r * length, r * span
        for trade in trades:
            for symbol in symbols:
                if k == n:
                    return
                k += 1
                yield {
                    **trade,
                    "symbol": symbol,
                    "trade_id": trade["trade_id"] + id_shift,
                    "time_ms": trade["time_ms"] + time_shift,
                }


def binance_event(trade: dict, event_ms: int) -> dict:
    """A source trade as Binance's `<symbol>@trade` event (what the feed server sends)."""
    return {
        "e": "trade",
        "E": event_ms,
        "s": trade["symbol"],
        "t": trade["trade_id"],
        "p": trade["price"],
        "q": trade["qty"],
        "T": trade["time_ms"],
        "m": trade["is_buyer_maker"],
        "M": True,
    }


def v2_messages(
    trades: list[dict], symbols: tuple[str, ...], n: int, ingest_us: int, spot_check_every: int = 9973
) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of `n` v2 trade messages over `cycled_trades`, event time E = trade time T.

    The first round goes through `live_codec.trade_from_event` + `encode` as the producer does. At
    ~10-25 µs a trade that would take most of a minute for 1M, so later rounds shift id and time in
    the first round's dict; every `spot_check_every`-th message is compared with trade_from_event."""
    length, nsym = len(trades), len(symbols)
    span = trades[-1]["time_ms"] - trades[0]["time_ms"] + 1
    first_round: list[dict] = []
    days: dict[int, str] = {}
    for k, trade in enumerate(cycled_trades(trades, symbols, n)):
        r = k // (length * nsym)
        if r == 0:
            v2 = live_codec.trade_from_event(binance_event(trade, trade["time_ms"]), ingest_us)
            first_round.append(v2)
        else:
            base = first_round[k % (length * nsym)]
            tid, t_ms = base["source_sequence"] + r * length, base["exchange_timestamp"] // 1000 + r * span
            day = days.get(t_ms // 86_400_000)
            if day is None:
                day = days[t_ms // 86_400_000] = datetime.fromtimestamp(t_ms / 1000, tz=UTC).date().isoformat()
            v2 = {
                **base,
                "message_id": f"{live_codec.EXCHANGE}:{base['symbol']}:{tid}",
                "trade_id": str(tid),
                "source_sequence": tid,
                "exchange_timestamp": t_ms * 1000,
                "trade_date": day,
                "vendor_data": {**base["vendor_data"], "event_time": str(t_ms)},
            }
            if k % spot_check_every == 0:
                expected = live_codec.trade_from_event(binance_event(trade, trade["time_ms"]), ingest_us)
                if expected != v2:
                    raise AssertionError(f"derived message {k} differs from trade_from_event: {v2} != {expected}")
        yield v2["symbol"].encode(), live_codec.encode(v2)


def produce_all(bootstrap: str, topic: str, messages, config_overrides: dict | None = None) -> tuple[int, float]:
    """Produce (key, value) pairs with K2's producer config and headers; (count, seconds to flushed)."""
    producer = Producer(producer_config(bootstrap, **(config_overrides or {})))
    start = time.perf_counter()
    n = 0
    for key, value in messages:
        while True:
            try:
                producer.produce(topic, key=key, value=value, headers=live_codec.HEADERS)
                break
            except BufferError:
                producer.poll(0.05)
        n += 1
        if n % 10_000 == 0:
            producer.poll(0)
    remaining = producer.flush(120)
    seconds = time.perf_counter() - start
    if remaining:
        raise RuntimeError(f"{remaining} messages still unflushed after 120 s")
    del producer
    return n, seconds


@contextlib.contextmanager
def broker(home: Path) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(log_path=home / "tansu.log") as b:
        try:
            yield b
        finally:
            gc.collect()  # Kafka clients still referenced would log disconnects when the broker goes


def temp_tables(home: Path):
    """A fresh SQLite catalog + file warehouse under `home`: (catalog, trades table, rejected table)."""
    cat = catalog.open_catalog(f"sqlite:///{home}/catalog.db", f"file://{home}/warehouse")
    return cat, catalog.ensure_table(cat, "trades"), catalog.ensure_table(cat, "rejected")


def percentiles(values, scale: float = 1.0) -> dict:
    arr = np.asarray(values, dtype=np.float64) * scale
    if not arr.size:
        return {"n": 0}
    return {
        "n": int(arr.size),
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "p99": float(np.percentile(arr, 99)),
        "max": float(arr.max()),
        "min": float(arr.min()),
    }


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def cpu_seconds() -> float:
    """CPU time of this process, all threads (librdkafka's included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _proc_stat_cpu() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs since boot; (0, 0) where there is no /proc."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[7], sum(fields[:8])
    except (OSError, IndexError, ValueError):
        return 0, 0


def pid_cpu_seconds(pid: int) -> float:
    """CPU time of another process (the broker), with its children's once they ended (a compaction's merge
    runs in one), from /proc; 0 where there is no /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class CpuMeter:
    """Wall, own-process CPU and broker CPU over a block: `with CpuMeter(broker_pid) as m: ...; m.as_dict()`."""

    def __init__(self, broker_pid: int | None):
        self.broker_pid = broker_pid

    def __enter__(self) -> CpuMeter:
        self.wall0, self.cpu0 = time.perf_counter(), cpu_seconds()
        self.broker0 = pid_cpu_seconds(self.broker_pid) if self.broker_pid else 0.0
        self.stat0 = _proc_stat_cpu()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = cpu_seconds() - self.cpu0
        self.broker = (pid_cpu_seconds(self.broker_pid) - self.broker0) if self.broker_pid else 0.0
        steal, total = (b - a for a, b in zip(self.stat0, _proc_stat_cpu()))
        self.steal = steal / total if total else 0.0

    def as_dict(self) -> dict:
        return {
            "wall_s": self.wall,
            "process_cpu_s": self.cpu,
            "broker_cpu_s": self.broker,
            "process_cores": self.cpu / self.wall if self.wall else 0.0,
            "broker_cores": self.broker / self.wall if self.wall else 0.0,
            "machine_steal_fraction": self.steal,
        }


def load_average() -> float:
    return os.getloadavg()[0]


# ================================================================ the raw limit


def raw_consume_decode_write(
    bootstrap: str, topic: str, n: int, out_dir: Path, broker_pid: int, partitions: int = PARTITIONS, batch: bool = False
) -> tuple[float, dict]:
    """Consumer + pyarrow JSON decode + Parquet write per 250k batch; (seconds for n, details). The consumer is
    confluent-kafka's, or with `batch` K2's batch consumer (kafka_batch.py), which the writer reads with."""
    config = consumer_config(bootstrap, f"bench-raw-{uuid.uuid4().hex[:8]}")
    consumer = BatchConsumer(config, topic) if batch else Consumer(config)
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    steps = {"consume": 0.0, "decode": 0.0, "parquet": 0.0}
    total, batches, out_bytes = 0, 0, 0
    try:
        with CpuMeter(broker_pid) as meter:
            start = time.perf_counter()
            deadline = time.monotonic() + DRAIN_LIMIT_S
            while total < n:
                t0 = time.perf_counter()
                read, count = [], 0
                while count < MAX_BATCH_ROWS and total + count < n:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"raw consumer got {total + count} of {n} messages in {DRAIN_LIMIT_S:.0f} s")
                    polled = consumer.consume(num_messages=min(CONSUME_CHUNK, MAX_BATCH_ROWS - count), timeout=0.1)
                    if batch:
                        if any(e.code() != KafkaError._PARTITION_EOF for e in polled.errors):
                            raise RuntimeError(f"raw consumer: {polled.errors}")
                        read.append(polled)
                        count += len(polled)
                        continue
                    for m in polled:
                        if m.error() is None:
                            read.append(m)
                        elif m.error().code() != KafkaError._PARTITION_EOF:
                            raise RuntimeError(f"raw consumer: {m.error()}")
                    count = len(read)
                t1 = time.perf_counter()
                data = lines(Messages.concat(read).values) if batch else b"\n".join([m.value() for m in read])
                table = pjson.read_json(pa.BufferReader(data), read_options=pjson.ReadOptions(block_size=RAW_JSON_BLOCK))
                if table.num_rows != count:
                    raise AssertionError(f"raw decode: {count} values parsed as {table.num_rows} rows")
                t2 = time.perf_counter()
                path = out_dir / f"batch-{batches:04d}.parquet"
                pq.write_table(table, path, compression="zstd")
                t3 = time.perf_counter()
                out_bytes += path.stat().st_size
                steps["consume"] += t1 - t0
                steps["decode"] += t2 - t1
                steps["parquet"] += t3 - t2
                total += count
                batches += 1
            seconds = time.perf_counter() - start
    finally:
        consumer.close()
    return seconds, {"messages": total, "batches": batches, "parquet_bytes": out_bytes, "steps_s": steps, "cpu": meter.as_dict()}


K2_STEPS = ("consume", "decode", "rejects", "dedup", "sort+other", "iceberg append", "remember ids", "kafka commit+report")


class _StageClock:
    """Times LiveWriter's stages by wrapping its methods from the outside (nothing in k2_assets changes)."""

    def __init__(self, writer: live_writer.LiveWriter):
        self.writer = writer
        # Only the writer's own thread is timed: the one that calls _write (a sensor's drain runs it in a thread of its own).
        self.thread: int | None = None
        stages = ("consume", "write", "decode", "rejects", "dedup", "iceberg append", "remember ids")
        self.seconds: dict[str, float] = dict.fromkeys(stages, 0.0)
        self.calls: dict[str, int] = dict.fromkeys(self.seconds, 0)
        self._saved_decode = live_decode.decode_batch
        self.idle_collect = 0.0  # a _collect that returned nothing: drain's idle wait at the end, not work
        for attr, stage in (
            ("_write", "write"),
            ("_fresh_rejects", "rejects"),
            ("_new_rows", "dedup"),
            ("_remember", "remember ids"),
        ):
            setattr(writer, attr, self._wrap(getattr(writer, attr), stage))
        collect = writer._collect

        def timed_collect(*args, **kwargs):
            start = time.perf_counter()
            batch = collect(*args, **kwargs)
            if batch:
                self.seconds["consume"] += time.perf_counter() - start
                self.calls["consume"] += 1
            else:
                self.idle_collect += time.perf_counter() - start
            return batch

        writer._collect = timed_collect
        writer.trades.append = self._wrap(writer.trades.append, "iceberg append")
        live_decode.decode_batch = self._wrap(live_decode.decode_batch, "decode")  # live_writer calls it through the module

    def _wrap(self, fn, stage: str):
        def timed_call(*args, **kwargs):
            if stage == "write" and self.thread is None:
                self.thread = threading.get_ident()
            if threading.get_ident() != self.thread:  # e.g. recent_trades decoding in another thread
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start
                self.calls[stage] += 1

        return timed_call

    def restore(self) -> None:
        live_decode.decode_batch = self._saved_decode
        for attr in ("_collect", "_write", "_fresh_rejects", "_new_rows", "_remember"):
            self.writer.__dict__.pop(attr, None)
        self.writer.trades.__dict__.pop("append", None)

    def breakdown(self) -> dict[str, float]:
        s = self.seconds
        inside = s["decode"] + s["rejects"] + s["dedup"] + s["iceberg append"] + s["remember ids"]
        # What _write does besides the wrapped calls: offset ranges, row sort, consumer.commit, report.
        return {
            "consume": s["consume"],
            "decode": s["decode"],
            "rejects": s["rejects"],
            "dedup": s["dedup"],
            "iceberg append": s["iceberg append"],
            "remember ids": s["remember ids"],
            "rest of _write (sort, offsets, commit, report)": s["write"] - inside,
        }


def k2_drain(bootstrap: str, topic: str, n: int, home: Path, broker_pid: int) -> tuple[float, dict]:
    """LiveWriter.drain until n trades are written; (seconds, details). The table is checked after."""
    _, trades, rejected = temp_tables(home)
    writer = live_writer.LiveWriter(
        trades,
        rejected,
        bootstrap,
        topic=topic,
        group_id=f"bench-k2-{uuid.uuid4().hex[:8]}",
        max_batch_rows=MAX_BATCH_ROWS,
        max_batch_seconds=MAX_BATCH_SECONDS,
    )
    clock = _StageClock(writer)
    written = {"n": 0, "consumed": 0, "end": None, "batches": []}

    def on_batch(report: live_writer.BatchReport) -> None:
        written["n"] += report.written
        written["consumed"] += report.consumed
        written["batches"].append(
            {
                "consumed": report.consumed,
                "written": report.written,
                "duplicates": report.duplicates,
                "rejected": report.rejected,
                "latency_s": report.latency_seconds,
            }
        )
        if written["n"] >= n and written["end"] is None:
            written["end"] = time.perf_counter()

    try:
        with CpuMeter(broker_pid) as meter:
            start = time.perf_counter()
            writer.drain(DRAIN_LIMIT_S, idle_seconds=1.0, on_batch=on_batch)
    finally:
        clock.restore()
        writer.close()
    if written["end"] is None:
        raise AssertionError(
            f"LiveWriter wrote {written['n']} of {n} trades within {DRAIN_LIMIT_S:.0f} s (consumed {written['consumed']})"
        )
    seconds = written["end"] - start
    trades.refresh()
    ids = trades.scan(selected_fields=("message_id",)).to_arrow().column("message_id")
    distinct = pc.count_distinct(ids).as_py()
    rejected.refresh()
    n_rejected = rejected.scan(selected_fields=("source",)).to_arrow().num_rows
    if len(ids) != n or distinct != n:
        raise AssertionError(f"market.trades holds {len(ids)} rows, {distinct} distinct message_ids; expected exactly {n}")
    return seconds, {
        "written": written["n"],
        "consumed": written["consumed"],
        "table_rows": len(ids),
        "distinct_message_ids": distinct,
        "rejected_rows": n_rejected,
        "batches": written["batches"],
        "steps_s": clock.breakdown(),
        "step_calls": clock.calls,
        "cpu": meter.as_dict(),
        "tail_after_last_batch_s": time.perf_counter() - written["end"],
    }


class _FirstBatchDone(Exception):
    pass


def k2_profile_one_batch(bootstrap: str, topic: str, home: Path, top: int = 30) -> dict:
    """cProfile of one full micro-batch (K2_BENCH_PROFILE=1): the top functions by own time."""
    import cProfile
    import pstats

    _, trades, rejected = temp_tables(home)
    writer = live_writer.LiveWriter(
        trades,
        rejected,
        bootstrap,
        topic=topic,
        group_id=f"bench-prof-{uuid.uuid4().hex[:8]}",
        max_batch_rows=MAX_BATCH_ROWS,
        max_batch_seconds=MAX_BATCH_SECONDS,
    )
    sizes = []

    def on_batch(report):
        sizes.append(report.consumed)
        raise _FirstBatchDone

    profile = cProfile.Profile()
    try:
        profile.enable()
        try:
            writer.drain(DRAIN_LIMIT_S, idle_seconds=1.0, on_batch=on_batch)
        except _FirstBatchDone:
            pass
        profile.disable()
    finally:
        writer.close()
    rows = [{"function": name, **figures} for name, figures in profile_rows(pstats.Stats(profile)).items()]
    by_own = sorted(rows, key=lambda r: r["own_s"], reverse=True)[:top]
    by_cum = [r for r in sorted(rows, key=lambda r: r["cumulative_s"], reverse=True) if "k2_assets" in r["function"]][:top]
    by_cum_all = sorted(rows, key=lambda r: r["cumulative_s"], reverse=True)[:top]
    return {
        "batch_messages": sizes[0] if sizes else 0,
        "top_own_time": by_own,
        "k2_assets_by_cumulative": by_cum,
        "top_cumulative": by_cum_all,
    }


# ================================================================ report


def render(results: dict) -> str:
    s, v = results["stages"], results["verdicts"]
    k2, raw, raw_batch = s["k2_live_writer"], s["raw_consume_decode_parquet"], s["raw_batch_consume_decode_parquet"]
    ratio = results["k2_over_raw_median"]
    rows = [
        (
            "K2 LiveWriter.drain -> market.trades",
            k2,
            f">= {TARGET_TRADES_PER_S:,}/s & >= {TARGET_RAW_FRACTION:g}x raw",
            f"{v['trades_per_s']} / {v['vs_raw']}",
        ),
        ("  raw: consume + pyarrow JSON + parquet", raw, "", ""),
        ("  raw on K2's batch consumer", raw_batch, f">= {TARGET_RAW_FRACTION:g}x of this too", v["vs_raw_batch"]),
    ]
    header = (
        f"{'stage':<40} {'n':>2} {'best s':>8} {'median s':>9} {'msgs/s best':>13} {'msgs/s median':>14}  {'target':<32} verdict"
    )
    lines = [
        f"Live throughput — {results['messages']:,} v2 trade messages ({len(SYMBOLS)} symbols, real BTCUSDT trades cycled) on "
        f"{PARTITIONS} partitions, batches of {MAX_BATCH_ROWS:,} / {MAX_BATCH_SECONDS:g} s "
        f"({results['environment']['cpu_count']} CPUs, pyiceberg {results['environment']['versions']['pyiceberg']})",
        header,
        "-" * len(header),
    ]
    for label, t, target, ok in rows:
        lines.append(
            f"{label:<40} {t['repetitions']:>2} {t['best_s']:>8.3f} {t['median_s']:>9.3f} "
            f"{t['rows_per_s_best']:>13,.0f} {t['rows_per_s_median']:>14,.0f}  {target:<32} {ok}"
        )
    steps, raw_steps = results["k2_steps_median_s"], results["raw_steps_median_s"]
    kc, rc = results["k2_cpu_median"], results["raw_cpu_median"]
    lines += [
        "-" * len(header),
        f"K2 / raw (medians): {ratio:.2f}x; K2 / raw on the batch consumer: {results['k2_over_raw_batch_median']:.2f}x; "
        f"pre-produce {results['produce']['messages']:,} msgs "
        f"in {results['produce']['seconds']:.1f} s "
        f"({results['produce']['messages'] / results['produce']['seconds']:,.0f} msgs/s, K2 producer config)",
        "K2 by stage (median s per run): " + ", ".join(f"{k} {x:.2f}" for k, x in steps.items()),
        "raw by stage (median s per run): " + ", ".join(f"{k} {x:.2f}" for k, x in raw_steps.items()),
        "raw on the batch consumer by stage: "
        + ", ".join(f"{k} {x:.2f}" for k, x in results["raw_batch_steps_median_s"].items()),
        f"CPU (median run): K2 process {kc['process_cores']:.2f} cores + broker {kc['broker_cores']:.2f}; "
        f"raw process {rc['process_cores']:.2f} + broker {rc['broker_cores']:.2f}; "
        f"machine steal {kc['machine_steal_fraction']:.1%} (K2) / {rc['machine_steal_fraction']:.1%} (raw)",
        f"table check: {results['check']['table_rows']:,} rows, "
        f"{results['check']['distinct_message_ids']:,} distinct message_ids, "
        f"{results['check']['rejected_rows']} rejected (expected exactly {results['messages']:,} and 0) — every K2 run",
        footer(results, "; verdicts use the median"),
    ]
    return "\n".join(lines)


def run() -> str:
    trades = real_trades()
    load_before = load_average()
    progress(
        f"live throughput: {len(trades):,} real trades from {binance_trades_file().name}, N={N_MESSAGES:,} "
        f"(load average {load_before:.2f} on {os.cpu_count()} CPUs)"
    )
    k2, raw, raw_batch = Timing(rows=N_MESSAGES), Timing(rows=N_MESSAGES), Timing(rows=N_MESSAGES)
    k2_details, raw_details, raw_batch_details = [], [], []
    with tempfile.TemporaryDirectory(prefix="k2-bench-live-throughput-") as tmp:
        home = Path(tmp)
        with broker(home) as b:
            topic = f"bench.live.trades.{uuid.uuid4().hex[:6]}"
            ensure_topics(b.bootstrap, {topic: PARTITIONS})
            ingest_us = time.time_ns() // 1000
            count, seconds = produce_all(b.bootstrap, topic, v2_messages(trades, SYMBOLS, N_MESSAGES, ingest_us))
            produced = {"messages": count, "seconds": seconds}
            progress(f"pre-produced {count:,} messages into {topic} in {seconds:.1f} s ({count / seconds:,.0f} msgs/s)")
            for i in range(REPEAT):
                # Interleaved so both see the same machine state.
                out = home / f"raw-{i}"
                out.mkdir()
                seconds, details = raw_consume_decode_write(b.bootstrap, topic, N_MESSAGES, out, b.process.pid)
                raw.seconds.append(seconds)
                raw_details.append(details)
                progress(
                    f"raw {i + 1}/{REPEAT}: {seconds:.2f} s ({N_MESSAGES / seconds:,.0f} msgs/s) "
                    + ", ".join(f"{k} {x:.2f}" for k, x in details["steps_s"].items())
                )
                for f in out.iterdir():
                    f.unlink()
                seconds, details = raw_consume_decode_write(b.bootstrap, topic, N_MESSAGES, out, b.process.pid, batch=True)
                raw_batch.seconds.append(seconds)
                raw_batch_details.append(details)
                progress(
                    f"raw, batch consumer {i + 1}/{REPEAT}: {seconds:.2f} s ({N_MESSAGES / seconds:,.0f} msgs/s) "
                    + ", ".join(f"{k} {x:.2f}" for k, x in details["steps_s"].items())
                )
                for f in out.iterdir():
                    f.unlink()
                warehouse = home / f"k2-{i}"
                seconds, details = k2_drain(b.bootstrap, topic, N_MESSAGES, warehouse, b.process.pid)
                k2.seconds.append(seconds)
                k2_details.append(details)
                progress(
                    f"k2 {i + 1}/{REPEAT}: {seconds:.2f} s ({N_MESSAGES / seconds:,.0f} trades/s), "
                    f"{len(details['batches'])} batches; " + ", ".join(f"{k} {x:.2f}" for k, x in details["steps_s"].items())
                )
                gc.collect()
            profile = None
            if os.environ.get("K2_BENCH_PROFILE"):
                profile = k2_profile_one_batch(b.bootstrap, topic, home / "k2-profile")
    median_of = lambda details, key: {k: statistics.median(d[key][k] for d in details) for k in details[0][key]}  # noqa: E731
    k2_rate, raw_rate, batch_rate = k2.rate(k2.median), raw.rate(raw.median), raw_batch.rate(raw_batch.median)
    k2_median_run = sorted(k2_details, key=lambda d: d["cpu"]["wall_s"])[len(k2_details) // 2]
    raw_median_run = sorted(raw_details, key=lambda d: d["cpu"]["wall_s"])[len(raw_details) // 2]
    results = {
        "benchmark": NAME,
        "data_file": os.path.relpath(binance_trades_file(), REPO),
        "messages": N_MESSAGES,
        "symbols": list(SYMBOLS),
        "partitions": PARTITIONS,
        "writer_settings": {"max_batch_rows": MAX_BATCH_ROWS, "max_batch_seconds": MAX_BATCH_SECONDS, "idle_seconds": 1.0},
        "environment": environment(),
        "targets": {"trades_per_s": TARGET_TRADES_PER_S, "fraction_of_raw": TARGET_RAW_FRACTION, "judged_on": "median"},
        "produce": produced,
        "stages": {
            "k2_live_writer": k2.as_dict(),
            "raw_consume_decode_parquet": raw.as_dict(),
            "raw_batch_consume_decode_parquet": raw_batch.as_dict(),
        },
        "k2_over_raw_median": k2_rate / raw_rate,
        "k2_over_raw_batch_median": k2_rate / batch_rate,
        "verdicts": {
            "trades_per_s": verdict(k2_rate >= TARGET_TRADES_PER_S),
            "vs_raw": verdict(k2_rate >= TARGET_RAW_FRACTION * raw_rate),
            "vs_raw_batch": verdict(k2_rate >= TARGET_RAW_FRACTION * batch_rate),
        },
        "k2_steps_median_s": median_of(k2_details, "steps_s"),
        "raw_steps_median_s": median_of(raw_details, "steps_s"),
        "raw_batch_steps_median_s": median_of(raw_batch_details, "steps_s"),
        "k2_cpu_median": k2_median_run["cpu"],
        "raw_cpu_median": raw_median_run["cpu"],
        "check": {k: k2_details[-1][k] for k in ("table_rows", "distinct_message_ids", "rejected_rows")},
        "k2_profile_one_batch": profile,
        "summary": [
            row(
                f"Kafka -> Iceberg, exactly once ({N_MESSAGES:,} messages)",
                f"{k2_rate:,.0f} trades/s",
                f"consume + Arrow JSON + Parquet: {raw_rate:,.0f}/s",
                k2_rate / raw_rate,
                f">= {TARGET_RAW_FRACTION:g}x and >= {TARGET_TRADES_PER_S:,}/s",
                k2_rate >= TARGET_RAW_FRACTION * raw_rate and k2_rate >= TARGET_TRADES_PER_S,
            ),
            row(
                "  the same, against the raw path on K2's batch consumer",
                f"{k2_rate:,.0f} trades/s",
                f"batch consume + Arrow JSON + Parquet: {batch_rate:,.0f}/s",
                k2_rate / batch_rate,
                f">= {TARGET_RAW_FRACTION:g}x",
                k2_rate >= TARGET_RAW_FRACTION * batch_rate,
            ),
        ],
        "k2_runs": k2_details,
        "raw_runs": raw_details,
        "raw_batch_runs": raw_batch_details,
    }
    return render(save(NAME, results, load_before))
