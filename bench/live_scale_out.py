"""Live path scale-out: 1 and 2 `k2 writer` processes on one topic, against the raw limit in the same run.

One embedded broker (Tansu, in memory), one topic of 4 partitions, N v2 trade messages (N = 600,000)
from `live_throughput.v2_messages` (the real BTCUSDT trades of 2024-01-01 12:00-12:30 cycled over 4
symbols), symbol i produced to partition i, so 2 writers own 2 partitions each.
  k2 x1, x2   `python -m k2_assets.cli writer` processes (`k2 writer`) in one consumer
              group, each into the same fresh SQLite catalog + file warehouse per run, fenced commits.
              Timed from the moment every writer has its assignment (the group join is left out; it is
              about half the session timeout, once) to the batch line that brings the written total to N.
              CPU per writer process from /proc. The table must then hold exactly N distinct message_ids.
  raw         `live_throughput.raw_consume_decode_write` on the same messages: one consumer, pyarrow JSON,
              Parquet per batch of 250,000, no catalog.
The projection: trades/s per writer core (aggregate rate over the writers' CPU), times the cores a
deployment gives the writers. Commits to one table serialize, so it holds while commit time stays a
small share of a batch (the report gives that share).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from confluent_kafka import Producer

from bench._common import REPO, environment, footer, progress, row, save
from bench.live_throughput import (
    SYMBOLS,
    broker,
    load_average,
    pid_cpu_seconds,
    raw_consume_decode_write,
    real_trades,
    v2_messages,
)
from k2_assets.core import catalog, live_codec
from k2_assets.core.kafka import ensure_topics, producer_config

NAME = "live_scale_out"
N_MESSAGES = int(os.environ.get("K2_BENCH_SCALE_MESSAGES", 600_000))
PARTITIONS = 4
MAX_BATCH_ROWS = 250_000
WRITER_LIMIT_S = 300.0


def produce_by_symbol(bootstrap: str, topic: str, messages) -> int:
    """Symbol i to partition i % PARTITIONS: an even split between writers, whatever the key hash does."""
    producer = Producer(producer_config(bootstrap))
    index = {s.encode(): i % PARTITIONS for i, s in enumerate(SYMBOLS)}
    n = 0
    for key, value in messages:
        while True:
            try:
                producer.produce(topic, key=key, value=value, partition=index[key], headers=live_codec.HEADERS)
                break
            except BufferError:
                producer.poll(0.05)
        n += 1
    if producer.flush(120):
        raise RuntimeError("messages still unflushed after 120 s")
    return n


def writers_run(bootstrap: str, topic: str, count: int, home: Path) -> dict:
    """`count` writer processes drain the topic into a fresh catalog under `home`; rate, CPU, table check."""
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("K2_")}
    env.update(K2_HOME=str(home), PYTHONPATH=str(REPO), K2_KAFKA_SESSION_TIMEOUT_MS="3000")
    cat = catalog.open_catalog(f"sqlite:///{home}/catalog.db", f"file://{home}/warehouse")
    for name in ("trades", "rejected", "sequence_gaps"):
        catalog.ensure_table(cat, name)
    state = {"ready": 0, "written": 0, "start": None, "end": None, "batches": 0}
    lock = threading.Lock()

    def follow(process: subprocess.Popen) -> None:
        for line in process.stdout:
            if not line.startswith(b"{"):
                continue
            event = json.loads(line)
            with lock:
                if event.get("ready"):
                    state["ready"] += 1
                    if state["ready"] == count:
                        state["start"] = time.perf_counter()
                elif "written" in event:
                    state["written"] += event["written"]
                    state["batches"] += 1
                    if state["written"] >= N_MESSAGES and state["end"] is None:
                        state["end"] = time.perf_counter()

    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "k2_assets.cli",
                "writer",
                "--bootstrap",
                bootstrap,
                "--topic",
                topic,
                "--seconds",
                str(WRITER_LIMIT_S),
                "--max-batch-rows",
                str(MAX_BATCH_ROWS),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(count)
    ]
    readers = [threading.Thread(target=follow, args=(p,), daemon=True) for p in processes]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + WRITER_LIMIT_S
    while state["start"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    cpu_at_start = [pid_cpu_seconds(p.pid) for p in processes]
    while state["end"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    cpu = [pid_cpu_seconds(p.pid) - c for p, c in zip(processes, cpu_at_start)]
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(timeout=60)
    if state["end"] is None:
        raise AssertionError(f"{count} writer(s) wrote {state['written']:,} of {N_MESSAGES:,} within {WRITER_LIMIT_S:.0f} s")
    seconds = state["end"] - state["start"]
    trades = cat.load_table("market.trades")
    ids = trades.scan(selected_fields=("message_id",)).to_arrow().column("message_id")
    distinct = len(set(ids.to_pylist()))
    if len(ids) != N_MESSAGES or distinct != N_MESSAGES:
        raise AssertionError(f"market.trades holds {len(ids)} rows, {distinct} distinct; expected exactly {N_MESSAGES}")
    commits = [
        s for s in trades.metadata.snapshots if s.summary and s.summary.additional_properties.get("k2.source") == "binance_trades"
    ]
    return {
        "writers": count,
        "seconds": seconds,
        "trades_per_s": N_MESSAGES / seconds,
        "batches": state["batches"],
        "commits": len(commits),
        "writer_cpu_s": cpu,
        "writer_cores": [c / seconds for c in cpu],
        "trades_per_writer_core_s": N_MESSAGES / sum(cpu) if sum(cpu) else 0.0,
        "table_rows": len(ids),
    }


def render(results: dict) -> str:
    raw, runs = results["raw"], results["runs"]
    lines = [
        f"Live scale-out — {N_MESSAGES:,} v2 trade messages on {PARTITIONS} partitions ({len(SYMBOLS)} symbols), "
        f"`k2 writer` processes in one group ({results['environment']['cpu_count']} CPUs)",
        f"{'stage':<34} {'seconds':>8} {'trades/s':>10} {'CPU per writer (cores)':>24} {'trades per writer-CPU-s':>24}",
        "-" * 104,
    ]
    for run in runs:
        lines.append(
            f"{'K2, ' + str(run['writers']) + ' writer(s)':<34} {run['seconds']:>8.2f} {run['trades_per_s']:>10,.0f} "
            f"{', '.join(f'{c:.2f}' for c in run['writer_cores']):>24} {run['trades_per_writer_core_s']:>24,.0f}"
        )
    lines.append(f"{'  raw: consume + JSON + parquet':<34} {raw['seconds']:>8.2f} {raw['trades_per_s']:>10,.0f}")
    one, two = runs
    per_core = two["trades_per_writer_core_s"]
    lines += [
        "-" * 104,
        f"2 writers / 1 writer: {two['trades_per_s'] / one['trades_per_s']:.2f}x; "
        f"K2 x1 / raw {one['trades_per_s'] / raw['trades_per_s']:.2f}x; "
        f"every run: exactly {N_MESSAGES:,} distinct trades in the table",
        f"projection at {per_core:,.0f} trades per writer-CPU-second: 4 cores for writers ~{4 * per_core:,.0f}/s, "
        f"8 cores ~{8 * per_core:,.0f}/s, while one table's commits (one every ~{two['seconds'] / max(1, two['commits']):.2f} s "
        f"here) stay a small share of each writer's batch time",
        footer(results),
    ]
    return "\n".join(lines)


def run() -> str:
    trades = real_trades()
    load_before = load_average()
    progress(f"live scale-out: N={N_MESSAGES:,} (load average {load_before:.2f} on {os.cpu_count()} CPUs)")
    with tempfile.TemporaryDirectory(prefix="k2-bench-scale-out-") as tmp:
        home = Path(tmp)
        with broker(home) as b:
            topic = f"bench.scale.{uuid.uuid4().hex[:6]}"
            ensure_topics(b.bootstrap, {topic: PARTITIONS})
            produce_by_symbol(b.bootstrap, topic, v2_messages(trades, SYMBOLS, N_MESSAGES, time.time_ns() // 1000))
            progress(f"pre-produced {N_MESSAGES:,} messages into {topic}")
            out = home / "raw"
            out.mkdir()
            raw_seconds, _ = raw_consume_decode_write(b.bootstrap, topic, N_MESSAGES, out, b.process.pid, PARTITIONS)
            progress(f"raw: {raw_seconds:.2f} s")
            runs = []
            for count in (1, 2):
                runs.append(writers_run(b.bootstrap, topic, count, home / f"k2-{count}"))
                progress(f"k2 x{count}: {runs[-1]['seconds']:.2f} s ({runs[-1]['trades_per_s']:,.0f} trades/s)")
    results = {
        "benchmark": NAME,
        "messages": N_MESSAGES,
        "partitions": PARTITIONS,
        "environment": environment(),
        "raw": {"seconds": raw_seconds, "trades_per_s": N_MESSAGES / raw_seconds},
        "runs": runs,
        "summary": [
            row(
                f"Kafka -> Iceberg, {run['writers']} `k2 writer` process(es)",
                f"{run['trades_per_s']:,.0f} trades/s, {run['trades_per_writer_core_s']:,.0f} per writer-core",
                f"consume + JSON + Parquet: {N_MESSAGES / raw_seconds:,.0f}/s",
                run["trades_per_s"] * raw_seconds / N_MESSAGES,
                "measured per core (docs/scaling.md)",
                None,
            )
            for run in runs
        ],
    }
    return render(save(NAME, results, load_before))
