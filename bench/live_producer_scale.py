"""Live path, producers per core: 1 and 2 `BinanceProducer` processes, split by symbol, against one feed.

The feed serves N real trades cycled over two symbols (BTCUSDT, ETHUSDT), unpaced, from a process of its own
(`python -m bench.live_producer_rate --serve N SYMBOLS`). Then:
  1 producer   one process subscribed to both symbols, until it produced N;
  2 producers  two processes, one symbol each, until each produced N/2 (a fresh feed);
each its own Python process (`python -m bench.live_producer_scale --produce ...`) with K2's producer config,
into one fresh topic. Reported: total msgs/s, and msgs per producer-CPU-second (each process's own CPU time),
the per-core figure docs/scaling.md projects from.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench._common import REPO, environment, footer, progress, row, save
from bench.live_producer_rate import FeedProcess, k2_producer
from bench.live_throughput import broker, cpu_seconds, load_average
from k2_assets.core.kafka import ensure_topics

NAME = "live_producer_scale"
N_MESSAGES = int(os.environ.get("K2_BENCH_PRODUCER_MESSAGES", 400_000))
SYMBOLS = ("BTCUSDT", "ETHUSDT")
PARTITIONS = 2


def produce(url: str, bootstrap: str, topic: str, n: int, symbols: tuple[str, ...]) -> None:
    """One producer process: produce n trades of `symbols`, then print its result and the CPU seconds that took
    (not the interpreter's start and imports) as JSON."""

    before = cpu_seconds()
    result = asyncio.run(k2_producer(url, bootstrap, topic, n, symbols))
    print(json.dumps({**result, "cpu_s": cpu_seconds() - before}), flush=True)


def processes(url: str, bootstrap: str, topic: str, split: list[tuple[str, ...]]) -> dict:
    share = N_MESSAGES // len(split)
    start = time.perf_counter()
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.live_producer_scale", "--produce", url, bootstrap, topic, str(share), ",".join(s)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for s in split
    ]
    results = []
    for child in children:
        out, _ = child.communicate(timeout=300)
        if child.returncode:
            raise RuntimeError(f"a producer process exited with {child.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    started = time.perf_counter() - start
    seconds = max(r["seconds"] for r in results)  # from each producer's start, as they run side by side
    produced = sum(r["produced"] for r in results)
    cpu = [r["cpu_s"] for r in results]
    return {
        "producers": len(split),
        "seconds": seconds,
        "seconds_with_process_start": started,
        "produced": produced,
        "msgs_per_s": produced / seconds,
        "cpu_s": cpu,
        "msgs_per_producer_cpu_s": produced / sum(cpu),
        "runs": results,
    }


def render(results: dict) -> str:
    header = f"{'producers':<10} {'seconds':>8} {'msgs/s':>10} {'CPU s per process':>20} {'msgs per producer-CPU-s':>24}"
    lines = [
        f"Producers per core — {N_MESSAGES:,} trades over {len(SYMBOLS)} symbols, feed in its own process, split by symbol",
        header,
        "-" * len(header),
    ]
    for r in results["runs"]:
        lines.append(
            f"{r['producers']:<10} {r['seconds']:>8.2f} {r['msgs_per_s']:>10,.0f} "
            f"{', '.join(f'{c:.1f}' for c in r['cpu_s']):>20} {r['msgs_per_producer_cpu_s']:>24,.0f}"
        )
    one, two = results["runs"]
    lines += [
        "-" * len(header),
        f"2 producers / 1: {two['msgs_per_s'] / one['msgs_per_s']:.2f}x on {results['environment']['cpu_count']} CPUs "
        "(the feed and the broker share them)",
        footer(results),
    ]
    return "\n".join(lines)


def run() -> str:
    load_before = load_average()
    progress(f"producers per core: {N_MESSAGES:,} trades (load average {load_before:.2f} on {os.cpu_count()} CPUs)")
    runs = []
    with tempfile.TemporaryDirectory(prefix="k2-bench-producer-scale-") as tmp, broker(Path(tmp)) as b:
        for split in ([SYMBOLS], [(s,) for s in SYMBOLS]):
            topic = f"bench.live.pscale.{uuid.uuid4().hex[:6]}"
            ensure_topics(b.bootstrap, {topic: PARTITIONS, topic + ".dlq": 1})
            with FeedProcess(N_MESSAGES, SYMBOLS) as url:
                runs.append(processes(url, b.bootstrap, topic, split))
            progress(f"{len(split)} producer(s): {runs[-1]['msgs_per_s']:,.0f} msgs/s")
    one = runs[0]
    results = {
        "benchmark": NAME,
        "environment": environment(),
        "messages": N_MESSAGES,
        "symbols": list(SYMBOLS),
        "runs": runs,
        "summary": [
            row(
                f"producers, {r['producers']} process(es) split by symbol",
                f"{r['msgs_per_s']:,.0f} msgs/s, {r['msgs_per_producer_cpu_s']:,.0f} per producer-core",
                f"1 process: {one['msgs_per_s']:,.0f}/s",
                r["msgs_per_s"] / one["msgs_per_s"],
                "measured per core (docs/scaling.md)",
                None,
            )
            for r in runs
        ],
    }
    return render(save(NAME, results, load_before))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--produce"]:
        url, bootstrap, topic, n, symbols = sys.argv[2:7]
        produce(url, bootstrap, topic, int(n), tuple(symbols.split(",")))
    else:
        sys.exit("usage: python -m bench.live_producer_scale --produce URL BOOTSTRAP TOPIC N SYMBOLS (the benchmark: --only)")
