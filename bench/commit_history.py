"""Commit latency after an hour of live commits: the live writer commits `market.trades` about once a second, and
the hourly maintenance thins its snapshots, so the table holds up to HISTORY snapshots (and as many small data files)
just before each run. The soak compresses that hour to a minute, so it never sees this depth.

Every commit, of the history too, records what a live commit does (offsets, source, the day-symbols written, the
sequence tracker's state); the timed ones are 5,000-trade micro-batches (one second at 5,000 trades/s) decoded from
real Binance trades. The raw limit is the same commit on the same table with no history. Beside them, stock pyiceberg
at full depth, in a child process that never imports K2 (so none of `iceberg_metadata_cache`'s fixes), and K2's
commit path as it was before 2026-12-02 (its Transaction cache only).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench._common import environment, footer, progress, row, save
from k2_assets.core.kafka_batch import Messages

NAME = "commit_history"
# Just before an hourly run: the hour's 3,600 commits, the 10 minutes before it kept whole, 168 hourly ones.
HISTORY = int(os.environ.get("K2_BENCH_COMMIT_HISTORY", 4400))
HISTORY_ROWS = 10  # snapshots and files are what the history costs; their rows do not matter
BATCH = 5000
TIMED = 60  # three manifest merges (one every 20 commits) in each timed run
STOCK_TIMED = 20  # seconds each, at full depth
TARGET_RATIO = 1.5
URI, WAREHOUSE = "sqlite:///{home}/catalog.db", "file://{home}/warehouse"
IDENTIFIER = "market.trades"


def append_times(table, rows: pa.Table, n: int, properties: dict[str, str]) -> list[float]:
    """Seconds of each of `n` appends of `rows`, each recording `properties` with offsets moved on."""
    times = []
    for i in range(n):
        start = time.perf_counter()
        table.append(rows, snapshot_properties={**properties, "k2.kafka.offsets.bench": f'{{"0": {i * len(rows)}}}'})
        times.append(time.perf_counter() - start)
    return times


def timed_in_child(cat, rows_path: str, properties: dict[str, str], out) -> None:
    """A child's STOCK_TIMED appends of the rows at `rows_path` through catalog `cat`, their seconds put on `out`."""
    out.put(append_times(cat.load_table(IDENTIFIER), pq.read_table(rows_path), STOCK_TIMED, properties))


def stock_commits(home: str, rows_path: str, properties: dict[str, str], out) -> None:
    """A child's appends with stock pyiceberg: no K2 module imported."""
    from pyiceberg.catalog.sql import SqlCatalog

    timed_in_child(SqlCatalog("k2", uri=URI.format(home=home), warehouse=WAREHOUSE.format(home=home)), rows_path, properties, out)


def transaction_cache_only_commits(home: str, rows_path: str, properties: dict[str, str], out) -> None:
    """A child's appends with K2's commit path as it was before 2026-12-02: the Transaction cache only."""
    import pyiceberg.catalog
    import pyiceberg.table
    from pyiceberg.avro.file import AvroFile
    from pyiceberg.serializers import FromInputFile, ToOutputFile

    from k2_assets.core import catalog, iceberg_metadata_cache

    pyiceberg.table.update_table_metadata = pyiceberg.catalog.update_table_metadata = iceberg_metadata_cache._deep_copying
    FromInputFile.table_metadata = staticmethod(iceberg_metadata_cache._read_file)
    ToOutputFile.table_metadata = staticmethod(iceberg_metadata_cache._write_file)
    AvroFile.__enter__ = iceberg_metadata_cache._enter_avro_file
    timed_in_child(catalog.open_catalog(URI.format(home=home), WAREHOUSE.format(home=home)), rows_path, properties, out)


def live_properties(rows: pa.Table) -> dict[str, str]:
    """What a live writer's commit of `rows` records beside its offsets."""
    from k2_assets.core import live_properties as recorded
    from k2_assets.core.offsets import tracker_key
    from k2_assets.core.sequence import SequenceTracker

    tracker = SequenceTracker("BINANCE", resets_each_session=False)
    tracker.check(rows.column("symbol"), rows.column("source_sequence").to_numpy())
    day_symbols = set(zip(rows.column("trade_date").to_pylist(), rows.column("symbol").to_pylist(), strict=True))
    state, _ = recorded.tracker_state(tracker)
    return recorded.trades_properties("k2.kafka.offsets.bench", {0: 0, 1: 0, 2: 0}, day_symbols, tracker_key("BINANCE"), state)


def micro_batch() -> pa.Table:
    """BATCH trades as the live writer decodes them from the producer's messages."""
    from bench.live_throughput import SYMBOLS, real_trades, v2_messages
    from k2_assets.core import live_decode

    values = [value for _, value in v2_messages(real_trades(), SYMBOLS, BATCH, time.time_ns() // 1000)]
    rows, rejected = live_decode.decode_batch(Messages.of(values, [0] * BATCH, range(BATCH)), "bench.trades", source="bench")
    assert rows.num_rows == BATCH and rejected.num_rows == 0
    return rows


def in_child(target, *args) -> list[float]:
    """`target(*args, out)` in a spawned process; what it put, or an error if it died first."""
    spawn = multiprocessing.get_context("spawn")
    out = spawn.Queue()
    child = spawn.Process(target=target, args=(*args, out))
    child.start()
    while True:
        try:
            value = out.get(timeout=5)
            break
        except queue.Empty:
            if not child.is_alive():
                raise RuntimeError(f"the {target.__name__} child exited with code {child.exitcode} before reporting") from None
    child.join()
    return value


def p50_p95_mean(times: list[float]) -> tuple[float, float, float]:
    return statistics.median(times), statistics.quantiles(times, n=20)[-1], statistics.fmean(times)


def run() -> str:
    from k2_assets.core import catalog

    rows = micro_batch()
    properties = live_properties(rows)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="k2-bench-commits-") as home:
        cat = catalog.open_catalog(URI.format(home=home), WAREHOUSE.format(home=home))
        table = catalog.ensure_table(cat, "trades")
        progress(f"commit_history: {TIMED} commits of {BATCH:,} trades on a table with no history")
        fresh = append_times(table, rows, TIMED, properties)
        progress(f"commit_history: building {HISTORY:,} snapshots of {HISTORY_ROWS} trades each")
        small = rows.slice(0, HISTORY_ROWS)
        for i in range(HISTORY - TIMED):
            table.append(small, snapshot_properties=properties)
            if (i + 1) % 600 == 0:
                progress(f"commit_history: {TIMED + i + 1:,} snapshots")
        progress(f"commit_history: {TIMED} commits at {HISTORY:,} snapshots, K2")
        deep = append_times(table, rows, TIMED, properties)
        progress(f"commit_history: {STOCK_TIMED} commits at {HISTORY + TIMED:,} snapshots, stock pyiceberg in a child")
        rows_path = str(Path(home) / "rows.parquet")
        pq.write_table(rows, rows_path)
        stock = in_child(stock_commits, home, rows_path, properties)
        progress(f"commit_history: {STOCK_TIMED} commits, K2's commit path before 2026-12-02, in a child")
        earlier = in_child(transaction_cache_only_commits, home, rows_path, properties)
        table.refresh()
        snapshots, files = len(table.metadata.snapshots), len(table.inspect.files())
    fresh_p, deep_p, stock_p, earlier_p = (p50_p95_mean(t) for t in (fresh, deep, stock, earlier))
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
        "fresh_p50_p95_mean_s": fresh_p,
        "k2_deep_p50_p95_mean_s": deep_p,
        "stock_deep_p50_p95_mean_s": stock_p,
        "transaction_cache_only_s": earlier,
        "transaction_cache_only_p50_p95_mean_s": earlier_p,
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
            *(
                f"  {label:<28} p50 {p[0] * 1000:7.1f} ms  p95 {p[1] * 1000:7.1f} ms  mean {p[2] * 1000:7.1f} ms"
                for label, p in (
                    (f"0-{TIMED} snapshots, K2:", fresh_p),
                    (f"{HISTORY:,} snapshots, K2:", deep_p),
                    (f"{HISTORY + TIMED:,} snapshots, stock:", stock_p),
                    (f"{HISTORY + TIMED + STOCK_TIMED:,}, K2 before 12-02:", earlier_p),
                )
            ),
            f"  K2 at depth / no history: p50 {ratio:.2f}x (goal <= {TARGET_RATIO:g}x); stock pyiceberg / K2 at depth: "
            f"p50 {stock_p[0] / deep_p[0]:.1f}x",
            f"  table at the end: {snapshots:,} snapshots, {files:,} data files",
            footer(results),
        ]
    )
