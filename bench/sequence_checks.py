"""Sequence tracking throughput: 10,000,000 trades across 1,000 symbols, against a plain sort + diff.

The trades carry the anomalies live feeds have (0.1% each of skipped ids, duplicates and late
arrivals). They are fed in arrival order in batches of 100,000 (a live micro-batch), and once as a
single 10M-row batch; the raw floor is a stable argsort by symbol plus a diff of the sequences,
the least any gap detector must do, over the same arrays in the same run.
"""

from __future__ import annotations

import gc
import time
import tracemalloc

import numpy as np
import pyarrow as pa

from bench._common import environment, footer, progress, row, save
from k2_assets.core.sequence import EVENT_NAMES, SequenceTracker

TRADES = 10_000_000
SYMBOLS = 1_000
BATCH = 100_000
ANOMALY = 0.001


def make_trades(seed: int = 11) -> tuple[pa.Array, np.ndarray, dict]:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, SYMBOLS, TRADES)
    order = np.argsort(codes, kind="stable")
    counts = np.bincount(codes, minlength=SYMBOLS)
    seq = np.empty(TRADES, np.int64)
    seq[order] = np.concatenate([np.arange(1_000_000, 1_000_000 + c) for c in counts])
    keep = rng.random(TRADES) >= ANOMALY  # skipped ids: gaps
    dup = rng.random(TRADES) < ANOMALY  # repeated
    late = np.flatnonzero(rng.random(TRADES) < ANOMALY)  # swapped with a record up to 50 later
    seq, codes = seq.copy(), codes.copy()
    target = np.minimum(late + rng.integers(1, 50, len(late)), TRADES - 1)
    seq[late], seq[target] = seq[target], seq[late].copy()
    codes[late], codes[target] = codes[target], codes[late].copy()
    index = np.flatnonzero(keep)
    index = np.sort(np.concatenate([index, index[dup[index]]]))
    names = np.array([f"SYM{i:04d}USDT" for i in range(SYMBOLS)], dtype=object)
    symbols = pa.array(names[codes[index]])
    return symbols, seq[index], {"skipped": int((~keep).sum()), "duplicated": int(dup[keep].sum()), "swapped": len(late)}


def run() -> str:
    progress(f"sequence_checks: making {TRADES:,} trades over {SYMBOLS:,} symbols")
    symbols, seq, injected = make_trades()
    n = len(seq)
    load_before = __import__("os").getloadavg()[0]

    def batched() -> tuple[float, dict, SequenceTracker]:
        tracker = SequenceTracker("BINANCE", resets_each_session=False)
        counts = np.zeros(len(EVENT_NAMES), np.int64)
        cpu = time.process_time()
        start = time.perf_counter()
        for i in range(0, n, BATCH):
            result = tracker.check(symbols.slice(i, BATCH), seq[i : i + BATCH])
            counts += np.bincount(result.events, minlength=len(EVENT_NAMES))
        return (
            time.perf_counter() - start,
            {"cpu_s": time.process_time() - cpu, **dict(zip(EVENT_NAMES, counts.tolist()))},
            tracker,
        )

    progress("sequence_checks: batches of 100,000")
    batch_s, batch_counts, tracker = batched()
    open_gaps = len(tracker.open_gaps())
    progress("sequence_checks: one batch of everything")
    gc.collect()
    single = SequenceTracker("BINANCE", resets_each_session=False)
    cpu = time.process_time()
    start = time.perf_counter()
    result = single.check(symbols, seq)
    single_s, single_cpu = time.perf_counter() - start, time.process_time() - cpu
    progress("sequence_checks: memory of one batch of everything (traced, untimed)")
    gc.collect()
    tracemalloc.start()
    SequenceTracker("BINANCE", resets_each_session=False).check(symbols, seq)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert result.counts() == {k: batch_counts[k] for k in EVENT_NAMES}
    progress("sequence_checks: raw sort + diff")
    codes = __import__("pyarrow.compute", fromlist=["x"]).dictionary_encode(symbols).indices.to_numpy()
    start = time.perf_counter()
    order = np.argsort(codes, kind="stable")
    steps = np.diff(seq[order])
    raw_s = time.perf_counter() - start
    del steps, order
    state_bytes = len(tracker.dumps())
    results = {
        "trades": n,
        "symbols": SYMBOLS,
        "injected": injected,
        "batch_size": BATCH,
        "batched_s": batch_s,
        "batched_checks_per_s": n / batch_s,
        "batched_cpu_s": batch_counts["cpu_s"],
        "single_batch_s": single_s,
        "single_batch_checks_per_s": n / single_s,
        "single_batch_cpu_s": single_cpu,
        "single_batch_traced_peak_mb": traced_peak / 2**20,
        "raw_sort_diff_s": raw_s,
        "raw_checks_per_s": n / raw_s,
        "events": {k: batch_counts[k] for k in EVENT_NAMES},
        "open_gaps_after": open_gaps,
        "saved_state_bytes": state_bytes,
        "environment": environment(),
    }
    per_million = batch_counts["cpu_s"] / (n / 1e6)
    results["summary"] = [
        row(
            f"sequence checks, {n / 1e6:.0f} M trades in batches of {BATCH:,}",
            f"{n / batch_s / 1e6:.2f} M checks/s ({per_million:.3f} s CPU per 1 M)",
            f"stable argsort + diff {n / raw_s / 1e6:.2f} M/s",
            raw_s / batch_s,
            "< 0.5 s CPU per 1 M",
            per_million < 0.5,
        )
    ]
    save("sequence_checks", results, load_before)
    lines = [
        f"Sequence checks — {n:,} trades, {SYMBOLS:,} symbols; injected {injected}",
        f"  batches of {BATCH:,}:   {batch_s:6.2f} s  {n / batch_s:>12,.0f} checks/s  "
        f"({per_million:.3f} s CPU per 1M; target well under 1 s: "
        f"{'PASS' if per_million < 0.5 else 'MISS'})",
        f"  one batch of all:   {single_s:6.2f} s  {n / single_s:>12,.0f} checks/s  "
        f"(allocations peak {traced_peak / 2**20:,.0f} MB)",
        f"  raw sort + diff:    {raw_s:6.2f} s  {n / raw_s:>12,.0f} /s  (K2 batched at {raw_s / batch_s:.2f}x the raw rate)",
        f"  events: {', '.join(f'{k} {v:,}' for k, v in batch_counts.items() if k != 'cpu_s' and v)}",
        f"  open gaps after: {open_gaps:,}; saved state {state_bytes / 1024:,.0f} KiB",
        footer(results),
    ]
    return "\n".join(lines)
