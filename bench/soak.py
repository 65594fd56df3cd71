"""Soak: 30 minutes at 5,000 trades/s through the sensor's code path, with table maintenance on a compressed schedule.

Three processes beside the embedded broker, as in operation:
  feed + producer  a child process: FeedServer(random_walk, wall-clock trade times, rate 5,000/s) -> BinanceProducer -> Kafka.
  writer           this process: the sensor's BackgroundDrain (k2_assets/core/live_drain.py) around a LiveWriter built as
                   the sensor builds it (1 s micro-batches, 20 s cycles reconciling market.sequence_gaps), harvested every
                   5 s as the daemon's ticks do. Its RSS is this process's.
  maintenance      a child process: what table_maintenance_job does hourly, every MAINTENANCE_EVERY_S: compact the open
                   days by size tier and the day before whole (beside the writer), thin and expire snapshots, remove
                   orphan files, on a compressed schedule (below).
  disk probe       a child process: a metadata.json-sized file written and renamed every PROBE_EVERY_S, the raw limit
                   of a commit's file writes on this disk, per window beside the commits.

For every window (WINDOWS of them, 5 minutes each at 30 minutes) it reports the writer's peak RSS, the commit latency (the
Iceberg append: Parquet file, manifests, metadata swap) p50 and p95, the committing thread's CPU p50 and the largest
metadata.json (to tell work that grows from waiting), freshness p95 (Binance E -> commit, every row),
and the peak snapshots and data files of market.trades (read every tick). The last window must stay within FLAT x the first.
`K2_BENCH_SOAK_MINUTES` shortens the run (the windows shrink with it). Every window also reports the garbage
collector's pauses (in commits, and in the whole process) and the objects it tracks; `K2_BENCH_PROFILE=1` adds a
cProfile of every commit, per window, and prints the functions whose time per commit grew most from the first window
to the last.
"""

from __future__ import annotations

import cProfile
import gc
import logging
import multiprocessing
import os
import pstats
import tempfile
import time
import uuid
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import numpy as np
import psutil
import pyarrow.compute as pc
from pyiceberg.table.update.snapshot import _ManifestMergeManager

from bench._common import environment, footer, profile_rows, progress, row, save
from bench.live_freshness import ProducerThread, wall_clock_walk
from bench.live_throughput import broker, load_average, pid_cpu_seconds, temp_tables
from k2_assets.core import catalog, live_writer, maintenance, writer
from k2_assets.core.kafka import ensure_topics
from k2_assets.core.live_drain import BackgroundDrain
from k2_assets.core.live_report import lags
from k2_assets.core.metrics import WriterMetrics

NAME = "soak"
MINUTES = float(os.environ.get("K2_BENCH_SOAK_MINUTES", 30))
WINDOWS = 6
RATE = 5000
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
PARTITIONS = 3
TICK_SECONDS = 5.0  # the sensor's minimum_interval_seconds
CYCLE_SECONDS = 20.0  # K2_SENSOR_DRAIN_SECONDS
BATCH_SECONDS = 1.0  # K2_WRITER_BATCH_MS
# The maintenance schedule, compressed: hourly -> every minute; every snapshot of the last 10 minutes -> of the last
# minute, older ones thinned to one an hour -> one a minute; the 7-day time-travel window -> 10 minutes; 3 days' grace
# for orphan files -> 2 minutes.
MAINTENANCE_EVERY_S = 60.0
DENSE_S = 60.0
THIN_TO_S = 60.0
RETAIN_S = 600.0
ORPHAN_GRACE_S = 120.0
FLAT = 1.2
MAINTENANCE_COUNTS = ("files_compacted", "expired", "orphans_removed")
PROFILE = bool(os.environ.get("K2_BENCH_PROFILE"))
PROBE_EVERY_S = 0.25
PROBE_BYTES = 200 * 1024  # the soak's metadata.json
FIGURES = ("rss_mb", "commit_p50_s", "commit_p95_s", "freshness_p95_s", "snapshots", "data_files")


def feed_and_produce(bootstrap: str, topic: str, seconds: float, out) -> None:
    """The child process that plays the exchange and `k2 stream binance` for `seconds`."""
    from k2_assets.core.binance_stream import BinanceProducer
    from k2_assets.dev.feed_server import run_in_thread

    with run_in_thread(wall_clock_walk(SYMBOLS), rate=RATE, symbols=SYMBOLS) as server:
        producer = BinanceProducer(
            list(SYMBOLS), bootstrap, base_url=server.ws_url, topic=topic, dead_letter_topic=topic + ".dlq"
        )
        feeding = ProducerThread(producer).start()
        time.sleep(seconds)
        feeding.stop()
    out.put({"produced": producer.stats.produced, "dead_lettered": producer.stats.dead_lettered, "error": repr(feeding.error)})


def probe_disk(directory: Path, stop, out) -> None:
    """The child process that measures the disk alone, the raw limit of a commit's file writes: every PROBE_EVERY_S
    it writes a metadata.json-sized file beside the warehouse and renames it into place, as a commit does."""
    directory.mkdir(parents=True, exist_ok=True)
    payload, samples = os.urandom(PROBE_BYTES), []
    while not stop.wait(PROBE_EVERY_S):
        start = time.monotonic()
        with open(directory / "probe.tmp", "wb") as f:
            f.write(payload)
        os.replace(directory / "probe.tmp", directory / "probe.json")
        end = time.monotonic()
        samples.append((end, end - start))
    out.put(samples)


def maintain(catalog_uri: str, warehouse: str, stop, out) -> None:
    """The child process that runs table maintenance on the compressed schedule until `stop` is set."""
    cat = catalog.open_catalog(catalog_uri, warehouse)
    while not stop.wait(MAINTENANCE_EVERY_S):
        for name in ("trades", "rejected"):
            try:
                out.put(maintain_table(cat, name))
            except Exception as exc:  # noqa: BLE001 - a failed run is reported, as the job's would be; the next one runs
                out.put({"table": name, "error": f"{type(exc).__name__}: {exc}", **dict.fromkeys(MAINTENANCE_COUNTS, 0)})


def maintain_table(cat, name: str) -> dict:
    """One maintenance run of market.<name>, as table_maintenance_job's three ops do it, with each op's wall and
    CPU seconds (Arrow's threads and the merge's child process included)."""
    table = cat.load_table(f"market.{name}")
    timer = StepTimer()
    with timer("compact"):
        # The days the hourly job compacts: the open ones by size tier, the closed one before them whole (a soak
        # that runs past midnight UTC leaves yesterday's small files to that).
        live = maintenance.open_days()
        runs = [
            maintenance.compact(table, writer.partition_filter("BINANCE", day), final=day not in live)
            for day in maintenance.days_to_compact(lookback_days=1)
        ]
    with timer("expire"):
        expired = maintenance.expire(
            table, timedelta(seconds=RETAIN_S), dense=timedelta(seconds=DENSE_S), thin_to=timedelta(seconds=THIN_TO_S)
        )
    with timer("orphans"):
        removed = maintenance.remove_orphan_files(table, timedelta(seconds=ORPHAN_GRACE_S))
    merged = [run for run in runs if run.snapshot_id]
    return {
        "table": name,
        "started": timer.started,
        "files_compacted": sum(run.files_before for run in merged),
        "rows_rewritten": sum(run.rows for run in merged),
        "mib_in": sum(run.bytes_before for run in merged) / 2**20,
        "mib_out": sum(run.bytes_after for run in merged) / 2**20,
        "compact_attempts": sum(run.attempts for run in merged),
        "expired": expired,
        "orphans_removed": len(removed),
        "seconds": sum(timer.wall.values()),
        **{f"{step}_s": seconds for step, seconds in timer.wall.items()},
        **{f"{step}_cpu_s": seconds for step, seconds in timer.cpu.items()},
    }


class StepTimer:
    """Wall and CPU seconds of named steps: this process's and its children's that ended (the merge's)."""

    def __init__(self) -> None:
        self.started = time.time()
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, step: str):
        wall, cpu = time.monotonic(), pid_cpu_seconds(os.getpid())
        try:
            yield
        finally:
            self.wall[step] = time.monotonic() - wall
            self.cpu[step] = pid_cpu_seconds(os.getpid()) - cpu


def metadata_bytes(location: str) -> int:
    """The size of a table's current metadata.json (a file:// warehouse; 0 where it cannot be read)."""
    try:
        return os.path.getsize(location.removeprefix("file://"))
    except OSError:
        return 0


class GcPauses:
    """Seconds this process spent in the garbage collector so far, and its full collections."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full = 0
        self._started = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.full += info["generation"] == 2


class Commit(NamedTuple):
    """One append to market.trades. CPU that rises with the wall time is work that grows; wall time alone rising
    is waiting."""

    at: float  # monotonic, when it ended
    wall_s: float
    cpu_s: float  # the committing thread's (a manifest merge runs on pyiceberg's pool, so it shows as wall time)
    metadata_bytes: int  # metadata.json after it
    gc_s: float  # the garbage collector's pauses inside it
    kind: str  # one of COMMIT_KINDS
    queued_s: float  # of the time off CPU, how long the thread was runnable but waited for a core (the rest blocked)


# plain: one manifest added; merging: pyiceberg's manifest merge rewrote the table's manifests into one (every
# commit.manifest.min-count-to-merge commits); rebased: the catalog refused the first attempt (a concurrent commit,
# maintenance's) and pyiceberg made it again on the new state.
COMMIT_KINDS = ("plain", "merging", "rebased")


class CommitEvents(logging.Filter):
    """Counts, in this process, pyiceberg's manifest merges and its retries on a concurrent commit."""

    def __init__(self) -> None:
        super().__init__()
        self.merges = self.rebases = 0

    def filter(self, record: logging.LogRecord) -> bool:
        self.rebases += str(record.msg).startswith("Commit failed due to a concurrent update")
        return True

    @contextmanager
    def installed(self):
        create = _ManifestMergeManager._create_manifest

        def counted(manager, *args, **kwargs):
            self.merges += 1
            return create(manager, *args, **kwargs)

        _ManifestMergeManager._create_manifest = counted
        logging.getLogger("pyiceberg.table").addFilter(self)
        try:
            yield self
        finally:
            _ManifestMergeManager._create_manifest = create
            logging.getLogger("pyiceberg.table").removeFilter(self)

    def kind(self, merges: int, rebases: int) -> str:
        """The kind of a commit, from these counts before it."""
        return "rebased" if self.rebases > rebases else "merging" if self.merges > merges else "plain"


class Recorder:
    """What the writer did, stamped with when it did it: commits and every row's freshness."""

    def __init__(self) -> None:
        self.commits: list[Commit] = []
        self.fresh: list[tuple[float, np.ndarray]] = []  # (monotonic, lags of the batch's rows)
        self._latency = live_writer.latency
        self.gc = GcPauses()
        self._gc_at = (0.0, 0)
        self.events = CommitEvents()
        self.profile = cProfile.Profile() if PROFILE else None

    @contextmanager
    def installed(self):
        """Its hooks in place for the run: the freshness of every batch, the garbage collector's pauses, and the
        counts of merges and rebases."""
        live_writer.latency = self.latency
        gc.callbacks.append(self.gc)
        try:
            with self.events.installed():
                yield self
        finally:
            live_writer.latency = self._latency
            gc.callbacks.remove(self.gc)

    def install(self, writer: live_writer.LiveWriter) -> live_writer.LiveWriter:
        append = writer.trades.append

        def timed_append(*args, **kwargs):
            start, cpu, gc_s, queued = time.monotonic(), time.thread_time(), self.gc.seconds, run_queue_seconds()
            merges, rebases = self.events.merges, self.events.rebases
            if self.profile is not None:
                result = self.profile.runcall(append, *args, **kwargs)
            else:
                result = append(*args, **kwargs)
            wall, cpu, queued = time.monotonic() - start, time.thread_time() - cpu, run_queue_seconds() - queued
            size = metadata_bytes(writer.trades.metadata_location)
            kind = self.events.kind(merges, rebases)
            self.commits.append(Commit(time.monotonic(), wall, cpu, size, self.gc.seconds - gc_s, kind, queued))
            return result

        writer.trades.append = timed_append
        return writer

    def latency(self, rows, committed):
        if rows.num_rows:
            self.fresh.append((time.monotonic(), lags(rows, committed).astype(np.float32)))
        return self._latency(rows, committed)

    def window(self, start: float, end: float) -> dict:
        """The figures of [start, end); what came before `end` is then let go, so the bench's own records do not
        add to the RSS it measures."""
        inside = [c for c in self.commits if start <= c.at < end]
        commits = np.array([c.wall_s for c in inside])
        commit_cpu = np.array([c.cpu_s for c in inside])
        fresh = [a for t, a in self.fresh if start <= t < end]
        for records in (self.commits, self.fresh):  # in time order; in place, as the writer thread appends meanwhile
            del records[: sum(1 for t, *_ in list(records) if t < end)]
        fresh = np.concatenate(fresh) if fresh else np.array([])
        gc_s, full = self.gc.seconds - self._gc_at[0], self.gc.full - self._gc_at[1]
        self._gc_at = (self.gc.seconds, self.gc.full)
        figures = {
            "commits": len(commits),
            "commit_p50_s": float(np.percentile(commits, 50)) if len(commits) else float("nan"),
            "commit_p95_s": float(np.percentile(commits, 95)) if len(commits) else float("nan"),
            "commit_cpu_p50_s": float(np.percentile(commit_cpu, 50)) if len(commit_cpu) else float("nan"),
            "commit_gc_ms_mean": 1000 * sum(c.gc_s for c in inside) / max(len(inside), 1),
            "kinds": kinds(inside),
            "gc_s": gc_s,
            "gc_full": full,
            "gc_objects": len(gc.get_objects()),
            "metadata_kb_max": max((c.metadata_bytes for c in inside), default=0) / 1024,
            "rows": len(fresh),
            "freshness_p95_s": float(np.percentile(fresh, 95)) if len(fresh) else float("nan"),
        }
        if self.profile is not None:
            self.profile.disable()
            figures["profile"] = profile_rows(pstats.Stats(self.profile))
            self.profile = cProfile.Profile()
        return figures


def kinds(commits: list[Commit]) -> dict[str, dict]:
    """Per kind of commit: how many, wall p50 and p95, and p95 of the time off the committing thread's CPU (waiting:
    on the disk, on pyiceberg's pool, on the other processes' use of the cores)."""
    out = {}
    for kind in COMMIT_KINDS:
        some = [c for c in commits if c.kind == kind]
        wall = np.array([c.wall_s for c in some])
        off_cpu = np.array([c.wall_s - c.cpu_s for c in some])
        out[kind] = {
            "commits": len(some),
            "p50_s": float(np.percentile(wall, 50)) if some else float("nan"),
            "p95_s": float(np.percentile(wall, 95)) if some else float("nan"),
            "off_cpu_p95_s": float(np.percentile(off_cpu, 95)) if some else float("nan"),
            "queued_p95_s": float(np.percentile([c.queued_s for c in some], 95)) if some else float("nan"),
        }
    return out


def run_queue_seconds() -> float:
    """How long this thread has been runnable but waiting for a core (the scheduler's schedstat)."""
    with open("/proc/thread-self/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


class CpuShares:
    """Cores each process used since the last reading: whether a window's latency is K2's own work or a neighbour's."""

    def __init__(self, pids: dict[str, int]):
        self.pids: dict[str, int] = {}
        self.last: dict[str, float] = {}
        self.at = time.monotonic()
        for name, pid in pids.items():
            self.add(name, pid)

    def add(self, name: str, pid: int) -> None:
        self.pids[name] = pid
        self.last[name] = pid_cpu_seconds(pid)

    def since_last(self) -> dict[str, float]:
        now = time.monotonic()
        shares = {}
        for name, pid in self.pids.items():
            seconds = pid_cpu_seconds(pid)
            shares[f"{name}_cores"] = (seconds - self.last[name]) / max(now - self.at, 1e-9)
            self.last[name] = seconds
        self.at = now
        return shares


def table_state(cat) -> dict:
    """Snapshots and data files of market.trades now. Maintenance makes both a sawtooth (tiers fill, then merge),
    so a window reports the peak of its readings, one per tick: a single reading at its end would measure where
    in the cycle the window ended, not whether the table grows."""
    table = cat.load_table("market.trades")
    current = table.current_snapshot()
    summary = current.summary.additional_properties if current and current.summary else {}
    return {"snapshots": len(table.metadata.snapshots), "data_files": int(summary.get("total-data-files", 0))}


def soak(home: Path) -> dict:
    seconds = MINUTES * 60
    window_s = seconds / WINDOWS
    spawn = multiprocessing.get_context("spawn")
    recorder = Recorder()
    with broker(home) as b, recorder.installed():
        topic = f"bench.soak.{uuid.uuid4().hex[:6]}"
        ensure_topics(b.bootstrap, {topic: PARTITIONS, topic + ".dlq": 1})
        lake = home / "lake"
        cat, trades, rejected = temp_tables(lake)
        gaps = catalog.ensure_table(cat, "sequence_gaps")

        def open_writer() -> live_writer.LiveWriter:
            return recorder.install(
                live_writer.LiveWriter(
                    trades,
                    rejected,
                    b.bootstrap,
                    topic=topic,
                    gaps=gaps,
                    metrics=WriterMetrics(),
                    max_batch_seconds=BATCH_SECONDS,
                    give_up_after=CYCLE_SECONDS,
                )
            )

        drain = BackgroundDrain(open_writer, cycle_seconds=CYCLE_SECONDS, lease_seconds=60, detected_by="soak")
        fed, maintained, probed, stop_children = spawn.Queue(), spawn.Queue(), spawn.Queue(), spawn.Event()
        feeder = spawn.Process(target=feed_and_produce, args=(b.bootstrap, topic, seconds, fed), name="soak-feed")
        maintainer = spawn.Process(
            target=maintain, args=(f"sqlite:///{lake}/catalog.db", f"file://{lake}/warehouse", stop_children, maintained)
        )
        prober = spawn.Process(target=probe_disk, args=(lake / "disk-probe", stop_children, probed), name="soak-probe")
        me = psutil.Process()
        cpu = CpuShares({"writer": os.getpid(), "broker": b.process.pid})
        windows, errors, rss, states = [], [], [], []
        try:
            feeder.start()
            maintainer.start()
            prober.start()
            cpu.add("maintenance", maintainer.pid)
            cpu.add("feed+producer", feeder.pid)
            started, started_at = time.monotonic(), time.time()
            window_start = started
            while len(windows) < WINDOWS:
                harvest = drain.harvest()
                if harvest.error:
                    errors.append(harvest.error)
                rss.append((time.monotonic(), me.memory_info().rss / 2**20))
                states.append((time.monotonic(), table_state(cat)))
                now = time.monotonic()
                if now - started >= window_s * (len(windows) + 1):
                    figures = recorder.window(window_start, now)
                    figures["rss_mb"] = max(r for t, r in rss if t >= window_start)
                    inside = [state for t, state in states if t >= window_start]
                    figures.update({key: max(state[key] for state in inside) for key in inside[-1]})
                    figures["minute"], figures["span"] = (now - started) / 60, (window_start, now)
                    figures.update(cpu.since_last(), load_1min=os.getloadavg()[0])
                    # K2's own work per trade: flat if the writer's latency grows only from its neighbours' CPU.
                    cpu_ms = figures["writer_cores"] * (now - window_start) * 1000
                    figures["writer_cpu_ms_per_1k"] = cpu_ms * 1000 / max(figures["rows"], 1)
                    windows.append(figures)
                    progress(
                        f"soak window {len(windows)}/{WINDOWS}: "
                        + ", ".join(f"{k} {figures[k]:.3g}" for k in ("minute", *FIGURES, "commits", "rows"))
                    )
                    window_start = now
                time.sleep(max(0.0, TICK_SECONDS - (time.monotonic() - now)))
            feeder.join(120)
            produced = fed.get(timeout=10)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # what is still in flight after the feed stopped
                drain.harvest()
                state = catalog.open_catalog(f"sqlite:///{lake}/catalog.db", f"file://{lake}/warehouse")
                rows = state.load_table("market.trades").scan(selected_fields=("message_id",)).to_arrow()
                if rows.num_rows >= produced["produced"] - produced["dead_lettered"]:
                    break
                time.sleep(TICK_SECONDS)
        finally:
            stop_children.set()
            drain.stop()
            maintainer.join(120)
            disk = probed.get(timeout=30) if prober.is_alive() or not probed.empty() else []
            for child in (feeder, maintainer, prober):
                child.join(5)
                if child.is_alive():
                    child.kill()
        for w in windows:
            inside = [seconds for at, seconds in disk if w["span"][0] <= at < w["span"][1]]
            w["disk_p95_s"] = float(np.percentile(inside, 95)) if inside else float("nan")
        runs = []
        while not maintained.empty():
            runs.append(maintained.get())
        return {
            "windows": windows,
            "started_at": started_at,
            "errors": errors,
            "maintenance_runs": runs,
            "produced": produced,
            "table_rows": rows.num_rows,
            "distinct_message_ids": pc.count_distinct(rows.column("message_id")).as_py(),
        }


def render(results: dict) -> str:
    windows, runs = results["windows"], results["maintenance_runs"]
    header = f"{'window':<8} {'minute':>6} {'RSS MB':>8} {'commit p50 s':>12} {'commit p95 s':>12} {'its CPU p50 s':>13} "
    header += f"{'metadata KB':>11} {'disk p95 s':>10} {'fresh p95 s':>11} "
    header += f"{'snapshots':>9} {'data files':>10} {'commits':>8} {'rows':>10}  "
    header += f"{'cores: writer broker maint feed':>31} {'load':>5}"
    lines = [
        f"Soak — {MINUTES:g} min at {RATE:,} trades/s through the sensor's BackgroundDrain; maintenance every "
        f"{MAINTENANCE_EVERY_S:g} s (compact the open days, the day before whole; every snapshot of {DENSE_S:g} s, "
        f"then one per {THIN_TO_S:g} s, for {RETAIN_S:g} s; orphan grace {ORPHAN_GRACE_S:g} s)",
        header,
        "-" * len(header),
    ]
    for i, w in enumerate(windows, 1):
        lines.append(
            f"{i:<8} {w['minute']:>6.1f} {w['rss_mb']:>8.0f} {w['commit_p50_s']:>12.3f} {w['commit_p95_s']:>12.3f} "
            f"{w['commit_cpu_p50_s']:>13.3f} {w['metadata_kb_max']:>11.0f} {w['disk_p95_s']:>10.3f} "
            f"{w['freshness_p95_s']:>11.2f} "
            f"{w['snapshots']:>9} {w['data_files']:>10} {w['commits']:>8} {w['rows']:>10,}  "
            f"{w['writer_cores']:>13.2f} {w['broker_cores']:>6.2f} {w['maintenance_cores']:>5.2f} "
            f"{w['feed+producer_cores']:>4.2f} {w['load_1min']:>5.2f}"
        )
    lines += [
        "-" * len(header),
        "last / first: "
        + ", ".join(f"{k} {v['ratio']:.2f}x {v['verdict']}" for k, v in results["flatness"].items())
        + f" (goal <= {FLAT:g}x); writer CPU per 1,000 trades {windows[0]['writer_cpu_ms_per_1k']:.0f} -> "
        + f"{windows[-1]['writer_cpu_ms_per_1k']:.0f} ms, broker {windows[0]['broker_cores']:.2f} -> "
        + f"{windows[-1]['broker_cores']:.2f} cores; the disk alone (a metadata.json written and renamed every "
        + f"{PROBE_EVERY_S:g} s) p95 {windows[0]['disk_p95_s']:.3f} -> {windows[-1]['disk_p95_s']:.3f} s",
        f"table {results['table_rows']:,} rows = {results['distinct_message_ids']:,} distinct message_ids; produced "
        f"{results['produced']['produced']:,}; drain errors {len(results['errors'])}; maintenance runs {len(runs)}: "
        + ", ".join(f"{key.replace('_', ' ')} {sum(r[key] for r in runs):,}" for key in MAINTENANCE_COUNTS)
        + f", failed runs {sum('error' in r for r in runs)}",
        *maintenance_profile(results),
        *kind_lines(windows),
        *collector_lines(windows),
        *profile_growth(windows),
        footer(results),
    ]
    return "\n".join(lines)


def maintenance_profile(results: dict) -> list[str]:
    """market.trades' maintenance runs by the window they started in: where its cores went."""
    window_s = results["minutes"] * 60 / WINDOWS
    lines = [
        "maintenance of market.trades by window: runs, rows rewritten, MiB in -> out, compact attempts, "
        "seconds wall (CPU): compact, expire, orphans"
    ]
    for i in range(WINDOWS):
        runs = [
            r
            for r in results["maintenance_runs"]
            if r["table"] == "trades" and "error" not in r and int((r["started"] - results["started_at"]) // window_s) == i
        ]
        if not runs:
            lines.append(f"  {i + 1}: no runs")
            continue
        total = {
            key: sum(r[key] for r in runs) for key, value in runs[0].items() if key != "started" and not isinstance(value, str)
        }
        steps = ", ".join(f"{total[f'{step}_s']:.1f} ({total[f'{step}_cpu_s']:.1f})" for step in ("compact", "expire", "orphans"))
        lines.append(
            f"  {i + 1}: {len(runs)} runs, {total['rows_rewritten']:,} rows, "
            f"{total['mib_in']:.0f} -> {total['mib_out']:.0f} MiB, {total['compact_attempts']} attempts; {steps}"
        )
    return lines


def kind_lines(windows: list[dict]) -> list[str]:
    """The commits by kind and window: a p95 that moves because the share of merging commits crossed 5% is not
    a p95 that grows."""
    lines = ["commits by kind and window: count, wall p50 / p95 s, (off-CPU p95 s, of which waiting for a core p95 s)"]
    for i, w in enumerate(windows, 1):
        parts = []
        for kind, k in w["kinds"].items():
            if not k["commits"]:
                parts.append(f"{kind} 0")
                continue
            parts.append(
                f"{kind} {k['commits']} {k['p50_s']:.3f} / {k['p95_s']:.3f} ({k['off_cpu_p95_s']:.3f}, {k['queued_p95_s']:.3f})"
            )
        lines.append(f"  {i}: " + "; ".join(parts))
    return lines


def collector_lines(windows: list[dict]) -> list[str]:
    """The garbage collector by window: work that grows with the heap shows here, not in the table."""
    lines = ["garbage collector by window: pauses s (full collections), mean ms of it inside a commit, objects tracked"]
    for i, w in enumerate(windows, 1):
        lines.append(f"  {i}: {w['gc_s']:.1f} ({w['gc_full']}), {w['commit_gc_ms_mean']:.2f} ms, {w['gc_objects']:,}")
    return lines


def profile_growth(windows: list[dict], top: int = 15) -> list[str]:
    """With K2_BENCH_PROFILE: the functions whose cumulative time per commit grew most, first window to last."""
    first, last = windows[0], windows[-1]
    if "profile" not in first or not first["commits"] or not last["commits"]:
        return []

    def per_commit(w: dict, name: str) -> float:
        return 1000 * w["profile"].get(name, {}).get("cumulative_s", 0.0) / w["commits"]

    names = set(first["profile"]) | set(last["profile"])
    grown = sorted(names, key=lambda n: per_commit(last, n) - per_commit(first, n), reverse=True)[:top]
    lines = ["cProfile of the commits: cumulative ms per commit, first window -> last (calls per commit), most grown"]
    for name in grown:
        calls = last["profile"].get(name, {}).get("calls", 0) / last["commits"]
        lines.append(f"  {per_commit(first, name):8.2f} -> {per_commit(last, name):8.2f}  ({calls:,.1f})  {name}")
    return lines


def run() -> str:
    load_before = load_average()
    progress(f"soak: {MINUTES:g} min at {RATE:,} trades/s (load average {load_before:.2f} on {os.cpu_count()} CPUs)")
    with tempfile.TemporaryDirectory(prefix="k2-bench-soak-") as tmp:
        out = soak(Path(tmp))
    first, last = out["windows"][0], out["windows"][-1]
    flatness = {}
    for key in FIGURES:
        ratio = last[key] / first[key] if first[key] else float("inf")
        flatness[key] = {"first": first[key], "last": last[key], "ratio": ratio, "verdict": "PASS" if ratio <= FLAT else "MISS"}
    results = {
        "benchmark": NAME,
        "environment": environment(),
        "minutes": MINUTES,
        "rate": RATE,
        "schedule": {
            "maintenance_every_s": MAINTENANCE_EVERY_S,
            "dense_s": DENSE_S,
            "thin_to_s": THIN_TO_S,
            "retain_s": RETAIN_S,
            "orphan_grace_s": ORPHAN_GRACE_S,
        },
        **out,
        "flatness": flatness,
        "summary": [
            row(
                f"soak {MINUTES:g} min at {RATE:,}/s, last window / first: {key}",
                f"{v['last']:.3g}",
                f"first window: {v['first']:.3g}",
                v["ratio"],
                f"<= {FLAT:g}x",
                v["ratio"] <= FLAT,
            )
            for key, v in flatness.items()
        ],
    }
    expected = out["produced"]["produced"] - out["produced"]["dead_lettered"]
    if out["table_rows"] != out["distinct_message_ids"] or out["table_rows"] != expected:
        raise AssertionError(f"market.trades: {out['table_rows']} rows, {out['distinct_message_ids']} distinct, not {expected}")
    return render(save(NAME, results, load_before))
