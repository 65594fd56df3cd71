"""Commit latency after an hour of live commits: the live writer commits `market.trades` about once a second, and
the hourly maintenance thins its snapshots, so the table holds up to HISTORY snapshots (and as many small data files)
just before each run. The soak compresses that hour to a minute, so it never sees this depth.

Each commit is a 5,000-trade micro-batch (one second at 5,000 trades/s) decoded from real Binance trades, appended
with the offsets K2 records. The raw limit is the same commit on the same table with no history. Beside them, stock
pyiceberg at full depth, in a child process that never imports K2 (so none of `iceberg_metadata_cache`'s fixes).
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench._common import environment, footer, progress, row, save

NAME = "commit_history"
HISTORY = int(os.environ.get("K2_BENCH_COMMIT_HISTORY", 3600))
HISTORY_ROWS = 10  # snapshots and files are what the history costs; their rows do not matter
BATCH = 5000
TIMED = 30
TARGET_RATIO = 1.5
URI, WAREHOUSE = "sqlite:///{home}/catalog.db", "file://{home}/warehouse"
IDENTIFIER = "market.trades"


def append_times(table, rows: pa.Table, n: int, first: int = 0) -> list[float]:
    """Seconds of each of `n` appends of `rows`, each recording offsets as the live writer does."""
    times = []
    for i in range(first, first + n):
        start = time.perf_counter()
        table.append(rows, snapshot_properties={"k2.bench.offsets": f'{{"0": {i * len(rows)}}}'})
        times.append(time.perf_counter() - start)
    return times


def stock_commits(home: str, rows_path: str, n: int, first: int, out) -> None:
    """A child's appends with stock pyiceberg: no K2 module imported."""
    from pyiceberg.catalog.sql import SqlCatalog

    cat = SqlCatalog("k2", uri=URI.format(home=home), warehouse=WAREHOUSE.format(home=home))
    out.put(append_times(cat.load_table(IDENTIFIER), pq.read_table(rows_path), n, first))


def micro_batch() -> pa.Table:
    """BATCH trades as the live writer decodes them from the producer's messages."""
    from bench.live_throughput import SYMBOLS, real_trades, v2_messages
    from k2_assets.core import live_decode

    values = [value for _, value in v2_messages(real_trades(), SYMBOLS, BATCH, time.time_ns() // 1000)]
    rows, rejected = live_decode.decode_batch(values, "bench.trades", [0] * BATCH, list(range(BATCH)), source="bench")
    assert rows.num_rows == BATCH and rejected.num_rows == 0
    return rows


def p50_p95(times: list[float]) -> tuple[float, float]:
    return statistics.median(times), statistics.quantiles(times, n=20)[-1]


def run() -> str:
    from k2_assets.core import catalog

    rows = micro_batch()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="k2-bench-commits-") as home:
        cat = catalog.open_catalog(URI.format(home=home), WAREHOUSE.format(home=home))
        table = catalog.ensure_table(cat, "trades")
        progress(f"commit_history: {TIMED} commits of {BATCH:,} trades on a table with no history")
        fresh = append_times(table, rows, TIMED)
        progress(f"commit_history: building {HISTORY:,} snapshots of {HISTORY_ROWS} trades each")
        small = rows.slice(0, HISTORY_ROWS)
        for i in range(HISTORY - TIMED):
            table.append(small)
            if (i + 1) % 600 == 0:
                progress(f"commit_history: {TIMED + i + 1:,} snapshots")
        progress(f"commit_history: {TIMED} commits at {HISTORY:,} snapshots, K2")
        deep = append_times(table, rows, TIMED, TIMED)
        progress(f"commit_history: {TIMED} commits at {HISTORY + TIMED:,} snapshots, stock pyiceberg in a child")
        rows_path = str(Path(home) / "rows.parquet")
        pq.write_table(rows, rows_path)
        spawn = multiprocessing.get_context("spawn")
        out = spawn.Queue()
        child = spawn.Process(target=stock_commits, args=(home, rows_path, TIMED, 2 * TIMED, out))
        child.start()
        stock = out.get(timeout=1800)
        child.join()
        table.refresh()
        snapshots, files = len(table.metadata.snapshots), len(table.inspect.files())
    fresh_p, deep_p, stock_p = p50_p95(fresh), p50_p95(deep), p50_p95(stock)
    ratio = deep_p[0] / fresh_p[0]
    results = {
        "history_snapshots": HISTORY,
        "batch_trades": BATCH,
        "timed_commits": TIMED,
        "snapshots_at_end": snapshots,
        "data_files_at_end": files,
        "fresh_s": fresh,
        "k2_deep_s": deep,
        "stock_deep_s": stock,
        "fresh_p50_p95_s": fresh_p,
        "k2_deep_p50_p95_s": deep_p,
        "stock_deep_p50_p95_s": stock_p,
        "ratio_p50": ratio,
        "environment": environment(),
        "summary": [
            row(
                f"commit of {BATCH:,} trades at {HISTORY:,} snapshots",
                f"{deep_p[0] * 1000:.0f} ms p50",
                f"no history: {fresh_p[0] * 1000:.0f} ms",
                ratio,
                f"<= {TARGET_RATIO:g}x",
                ratio <= TARGET_RATIO,
            )
        ],
    }
    save(NAME, results, load_before)
    return "\n".join(
        [
            f"Commit latency after an hour of live commits ({BATCH:,}-trade appends to market.trades, SQLite catalog)",
            f"  no history:                 p50 {fresh_p[0] * 1000:6.1f} ms  p95 {fresh_p[1] * 1000:6.1f} ms",
            f"  {HISTORY:,} snapshots, K2:       p50 {deep_p[0] * 1000:6.1f} ms  p95 {deep_p[1] * 1000:6.1f} ms  "
            f"({ratio:.2f}x no history; goal <= {TARGET_RATIO:g}x)",
            f"  {HISTORY + TIMED:,} snapshots, stock:    p50 {stock_p[0] * 1000:6.1f} ms  p95 {stock_p[1] * 1000:6.1f} ms  "
            f"(pyiceberg {stock_p[0] / deep_p[0]:.1f}x K2's)",
            f"  table at the end: {snapshots:,} snapshots, {files:,} data files",
            footer(results),
        ]
    )
