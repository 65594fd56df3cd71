"""Compaction and snapshot expiry keep the rows, the exactly-once offsets and time travel inside retention."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

import psutil
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2_assets.core import maintenance, writer
from k2_assets.core.kafka_batch import Messages
from k2_assets.core.offsets import latest_property, recorded_offsets, tracker_key
from k2_assets_tests.conftest import btc_trade_events, offsets_key
from k2_assets_tests.test_live_writer import drain_all, produce, trade_messages, writer_for


def written_in_small_batches(btcusdt_dir, broker, topic, catalog, trades: int, batch_rows: int):
    """market.trades as live traffic leaves it: the first `trades` real trades, committed `batch_rows` at a time."""
    produce(broker.bootstrap, topic, trade_messages(btc_trade_events(btcusdt_dir)[:trades]))
    live = writer_for(catalog, broker, topic, max_batch_rows=batch_rows)
    drain_all(live)
    live.close()
    return catalog.load_table("market.trades")


def test_compaction_and_expiry_keep_rows_offsets_and_time_travel(btcusdt_dir, broker, topic, catalog):
    trades = written_in_small_batches(btcusdt_dir, broker, topic, catalog, trades=8000, batch_rows=500)
    offsets_before = recorded_offsets(trades, offsets_key(broker, topic))
    ids_before = sorted(trades.scan().to_arrow().column("message_id").to_pylist())
    old_snapshot = trades.current_snapshot().snapshot_id
    where = writer.partition_filter("BINANCE", datetime(2024, 1, 1).date())

    result = maintenance.compact(trades, where, final=True)
    assert result.rows == 8000 and result.files_before >= 16 and result.files_after == 1
    assert result.bytes_before > result.bytes_after > 0 and result.attempts == 1
    trades = catalog.load_table("market.trades")
    assert sorted(trades.scan().to_arrow().column("message_id").to_pylist()) == ids_before
    assert trades.current_snapshot().summary["k2.maintenance"] == "compact"
    assert recorded_offsets(trades, offsets_key(broker, topic)) == offsets_before
    # Time travel inside the retention window still works after compaction.
    assert trades.scan(snapshot_id=old_snapshot).to_arrow().num_rows == 8000

    time.sleep(0.05)
    expired = maintenance.expire(trades, retain=timedelta(0), now=datetime.now(UTC))
    trades = catalog.load_table("market.trades")
    assert expired >= 16 and len(trades.metadata.snapshots) == 1  # the compaction restated every holder's bookkeeping
    assert recorded_offsets(trades, offsets_key(broker, topic)) == offsets_before
    assert trades.snapshot_by_id(old_snapshot) is None  # outside the retention now
    # A writer started after all this resumes exactly where the table says: nothing re-read, nothing lost.
    produce(broker.bootstrap, topic, trade_messages(btc_trade_events(btcusdt_dir)[8000:9000]))
    resumed = writer_for(catalog, broker, topic)
    assert all(resumed.position[p] == offset for p, offset in offsets_before.items())
    reports = drain_all(resumed)
    resumed.close()
    assert sum(r.consumed for r in reports) == 1000 and sum(r.duplicates for r in reports) == 0
    table = catalog.load_table("market.trades").scan().to_arrow()
    assert table.num_rows == 9000 == pc.count_distinct(table.column("message_id")).as_py()


def test_a_merge_is_sized_by_its_bytes_on_disk_not_in_memory(btcusdt_dir, broker, topic, catalog):
    """pyiceberg sizes files by Arrow's in-memory bytes: merged files would come out small again, and be merged again."""
    trades = written_in_small_batches(btcusdt_dir, broker, topic, catalog, trades=8000, batch_rows=500)
    on_disk = sum(task.file.file_size_in_bytes for task in trades.scan().plan_files())
    in_memory = trades.scan().to_arrow().nbytes
    target = 2 * on_disk
    assert in_memory > 2 * target  # unscaled, the merge would be split into several files
    with trades.transaction() as tx:
        tx.set_properties({"write.target-file-size-bytes": str(target)})

    result = maintenance.compact(trades, writer.partition_filter("BINANCE", datetime(2024, 1, 1).date()), final=True)
    assert (result.rows, result.files_after) == (8000, 1)
    assert result.bytes_after < target


def test_the_merge_runs_in_a_child_that_yields_the_cpu():
    assert maintenance.in_nicer_child(os.nice, 0) == min(19, os.nice(0) + maintenance.REWRITE_NICENESS)


def test_a_child_that_fails_or_dies_says_so_at_once():
    with pytest.raises(ValueError, match="invalid literal"):
        maintenance.in_nicer_child(int, "x")
    started = time.monotonic()
    with pytest.raises(ChildProcessError, match="_exit in a child process: it ended with exit code 3 before answering"):
        maintenance.in_nicer_child(os._exit, 3)
    with pytest.raises(ChildProcessError, match=f"exit code -{signal.SIGKILL} "):  # as the kernel's OOM killer does
        maintenance.in_nicer_child(signal.raise_signal, signal.SIGKILL)
    assert time.monotonic() - started < 30


def test_an_interrupt_terminates_the_child_instead_of_waiting_for_it():
    def interrupt(signum, frame):
        raise KeyboardInterrupt  # what a run stopped in Dagster raises in the op

    previous = signal.signal(signal.SIGALRM, interrupt)
    started = time.monotonic()
    try:
        signal.alarm(3)
        with pytest.raises(KeyboardInterrupt):
            maintenance.in_nicer_child(time.sleep, 120)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 15
    children = [c for c in psutil.Process().children() if "spawn_main" in " ".join(c.cmdline())]
    assert not [c for c in children if c.status() != psutil.STATUS_ZOMBIE], children


def test_expiry_keeps_the_time_travel_window(catalog, btcusdt_dir, broker, topic):
    trades = written_in_small_batches(btcusdt_dir, broker, topic, catalog, trades=1000, batch_rows=200)
    snapshots = len(trades.metadata.snapshots)
    assert maintenance.expire(trades, retain=timedelta(days=7)) == 0
    assert len(catalog.load_table("market.trades").metadata.snapshots) == snapshots


def test_the_merge_s_files_reach_the_disk_before_it_returns(btcusdt_dir, broker, topic, catalog, monkeypatch, tmp_path):
    trades = written_in_small_batches(btcusdt_dir, broker, topic, catalog, trades=3000, batch_rows=1000)
    synced, fsync = [], os.fsync

    def recorded(descriptor):
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        return fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recorded)
    rows, files = maintenance._rewrite(trades.metadata, trades.io, list(trades.scan().plan_files()))
    assert rows == 3000 and files
    assert sorted(synced) == sorted(os.path.realpath(urlparse(f.file_path).path) for f in files)

    spaced = tmp_path / "a day" / "x%.parquet"
    spaced.parent.mkdir()
    spaced.write_bytes(b"PAR1")
    flushed = maintenance.flush_to_disk([spaced.as_uri(), str(spaced), "s3://bucket/warehouse/x.parquet"])
    assert flushed == [str(spaced), str(spaced)]  # a file URL is unquoted; an object store's upload is left alone


def test_compacting_an_empty_partition_writes_nothing(catalog):
    from k2_assets.core import catalog as k2_catalog

    trades = k2_catalog.ensure_table(catalog, "trades")
    result = maintenance.compact(trades, writer.partition_filter("ASX", datetime(2014, 3, 10).date()), final=True)
    assert (result.rows, result.files_before, result.files_after) == (0, 0, 0)
    assert trades.scan().to_arrow().num_rows == 0


def _next_day(events: list[dict]) -> list[dict]:
    """The same real trades, a day later (trade_date 2024-01-02): the live writer's next partition."""
    return [{**e, "T": e["T"] + 86_400_000, "E": e["E"] + 86_400_000} for e in events]


def test_expiry_keeps_the_offsets_a_rebased_compaction_restated_too_low(btcusdt_dir, broker, topic, catalog):
    events = btc_trade_events(btcusdt_dir)
    produce(broker.bootstrap, topic, trade_messages(events[:2000]))
    live = writer_for(catalog, broker, topic, max_batch_rows=500)
    drain_all(live)
    # A compaction of 2024-01-01 read the table here, before the writer's next commit ...
    stale = catalog.load_table("market.trades")
    where = writer.partition_filter("BINANCE", datetime(2024, 1, 1).date())
    rows = stale.scan(row_filter=where).to_arrow()
    restated = {**maintenance.carried_properties(stale), "k2.maintenance": "compact"}
    produce(broker.bootstrap, topic, trade_messages(_next_day(events[2000:2500])))
    drain_all(live)
    live.close()
    offsets = recorded_offsets(catalog.load_table("market.trades"), offsets_key(broker, topic))
    # ... and commits after it: pyiceberg retries and rebases the commit onto the writer's (another partition),
    # so the compaction snapshot restates offsets lower than its parent's.
    writer.replace_rows(stale, rows, where, properties=restated)
    trades = catalog.load_table("market.trades")
    assert trades.current_snapshot().summary["k2.maintenance"] == "compact"
    assert json.loads(trades.current_snapshot().summary[offsets_key(broker, topic)]) != {str(p): o for p, o in offsets.items()}
    assert recorded_offsets(trades, offsets_key(broker, topic)) == offsets

    time.sleep(0.05)
    assert maintenance.expire(trades, retain=timedelta(0)) > 0
    trades = catalog.load_table("market.trades")
    assert (
        recorded_offsets(trades, offsets_key(broker, topic)) == offsets
    )  # the writer's snapshot with the highest offsets stayed
    assert trades.scan().to_arrow().num_rows == 2500
    resumed = writer_for(catalog, broker, topic)
    assert resumed.position == {p: offsets.get(p, 0) for p in resumed.position}
    assert drain_all(resumed) == []  # nothing read twice
    resumed.close()


def test_a_live_commit_landing_during_a_compaction_is_rebased_over_not_lost_to(btcusdt_dir, broker, topic, catalog, monkeypatch):
    events = btc_trade_events(btcusdt_dir)
    produce(broker.bootstrap, topic, trade_messages(events[:2000]))
    live = writer_for(catalog, broker, topic, max_batch_rows=400)
    drain_all(live)
    produce(broker.bootstrap, topic, trade_messages(events[2000:2500]))  # the same day, still being written
    restate, landed = maintenance.carried_properties, []

    def live_commit_meanwhile(table):  # the merge is read and written; the writer commits before the rewrite does
        if not landed:
            landed.extend(drain_all(live))
        return restate(table)

    monkeypatch.setattr(maintenance, "carried_properties", live_commit_meanwhile)
    tracker = tracker_key("BINANCE")
    state_when_read = latest_property(catalog.load_table("market.trades"), tracker)
    day = writer.partition_filter("BINANCE", datetime(2024, 1, 1).date())
    result = maintenance.compact(catalog.load_table("market.trades"), day, final=True)
    live.close()
    assert landed and (result.attempts, result.files_before, result.files_after, result.rows) == (1, 5, 1, 2000)

    trades = catalog.load_table("market.trades")
    ids = trades.scan(row_filter=day, selected_fields=("message_id",)).to_arrow().column("message_id")
    assert len(ids) == len(pc.unique(ids)) == 2500
    assert len(trades.inspect.files()) == 1 + len(landed)  # the merged file and those the writer appended meanwhile
    # The compaction restates the tracker state of the commit it landed on, not the older one it read.
    compaction, appended = trades.current_snapshot(), trades.snapshot_by_id(trades.current_snapshot().parent_snapshot_id)
    assert appended.summary[tracker] != state_when_read
    assert compaction.summary[tracker] == appended.summary[tracker] == latest_property(trades, tracker)
    resumed = writer_for(catalog, broker, topic)
    assert drain_all(resumed) == []  # nothing read twice
    resumed.close()


def test_remove_orphan_files_deletes_only_old_unreferenced_files(catalog, btcusdt_dir):
    from k2_assets.core import catalog as k2_catalog
    from k2_assets.core import live_codec, live_decode
    from k2_assets_tests.test_live_writer import INGEST_US

    events = btc_trade_events(btcusdt_dir)[:600]
    values = [live_codec.encode(live_codec.trade_from_event(e, INGEST_US)) for e in events]
    rows, _ = live_decode.decode_batch(Messages.of(values, [0] * 600, range(600)), "t", source="test")
    trades = k2_catalog.ensure_table(catalog, "trades")
    for start in range(0, 600, 200):
        trades.append(rows.slice(start, 200))
    root = Path(urlparse(trades.location()).path)
    old = time.time() - 10 * 86400
    for path in root.rglob("*"):
        os.utime(path, (old, old))  # referenced files older than the grace too
    stray_old, stray_fresh = root / "data" / "stray-old.parquet", root / "data" / "stray-fresh.parquet"
    stray_old.write_bytes(b"x")
    stray_fresh.write_bytes(b"x")
    os.utime(stray_old, (old, old))

    assert maintenance.remove_orphan_files(trades, older_than=timedelta(days=3)) == [f"file://{stray_old}"]
    assert not stray_old.exists() and stray_fresh.exists()
    assert maintenance.remove_orphan_files(trades, older_than=timedelta(days=3)) == []
    assert catalog.load_table("market.trades").scan().to_arrow().num_rows == 600
    # A data path outside the table's location may hold other tables' files: refused.
    trades.transaction().set_properties({"write.data.path": f"file://{root.parent}/shared"}).commit_transaction()
    with pytest.raises(ValueError, match="outside the table location"):
        maintenance.find_orphan_files(catalog.load_table("market.trades"))


def test_compaction_runs_beside_a_live_writer_on_the_same_partition(btcusdt_dir, broker, topic, catalog):
    """A live writer commits small batches to the day while compaction rewrites it and expiry thins its snapshots,
    again and again: every compaction and expiry lands (an attempt a writer's commit beat is made again), no trade
    is lost or doubled, the writer is never fenced by it, and the day ends in few files."""
    import threading

    WEEK = timedelta(days=7)  # noqa: N806

    events = btc_trade_events(btcusdt_dir)
    where = writer.partition_filter("BINANCE", datetime(2024, 1, 1).date())
    live = writer_for(catalog, broker, topic, max_batch_rows=300, max_batch_seconds=0.2)
    stop, reports = threading.Event(), []

    def write() -> None:
        while not stop.is_set():
            reports.extend(live.drain(1, idle_seconds=0.3))

    writing = threading.Thread(target=write)
    writing.start()
    compactions, thinned = [], []
    try:
        for chunk in range(0, 12_000, 1_500):
            produce(broker.bootstrap, topic, trade_messages(events[chunk : chunk + 1_500]))
            time.sleep(0.5)
            compactions.append(maintenance.compact(catalog.load_table("market.trades"), where, final=False))
            # Thinning as the hourly job does, compressed: its commit is made again whenever the writer's lands first.
            thinned.append(
                maintenance.expire(
                    catalog.load_table("market.trades"), WEEK, dense=timedelta(seconds=1), thin_to=timedelta(seconds=5)
                )
            )
        deadline = time.monotonic() + 60
        while sum(r.written for r in reports) < 12_000 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        writing.join(30)
        committed = {p: o for p, o in live.committed.items() if o}
        live.close()
    assert sum(r.written for r in reports) == 12_000
    assert live.metrics.fenced._value.get() == 0  # a compaction never throws out a writer's batch
    assert sum(1 for c in compactions if c.snapshot_id is not None) >= 4 and sum(thinned) > 0
    trades = catalog.load_table("market.trades")
    table = trades.scan().to_arrow()
    ids = sorted(table.column("source_sequence").to_pylist())
    assert table.num_rows == 12_000 == len(set(ids)) and ids == list(range(ids[0], ids[0] + 12_000))
    maintenance.compact(trades, where, final=True)  # whatever the open-day runs left, the day ends in one file
    trades = catalog.load_table("market.trades")
    assert len(list(trades.scan(row_filter=where).plan_files())) == 1 and trades.scan().to_arrow().num_rows == 12_000
    assert recorded_offsets(trades, offsets_key(broker, topic)) == committed


def _tiers_below_small() -> int:
    size, tiers = maintenance.FIRST_TIER_BYTES, 1
    while size < maintenance.SMALL_FILE_BYTES:
        size, tiers = size * maintenance.TIER_GROWTH, tiers + 1
    return tiers


@settings(max_examples=300, deadline=None)
@given(
    arrivals=st.lists(st.lists(st.integers(1, 40 * 2**20), max_size=80), min_size=1, max_size=40),
)
def test_open_day_compaction_rewrites_each_byte_a_few_times_and_keeps_few_files(arrivals):
    """Whatever files the writers leave between runs: a run merges only full size tiers, each byte is rewritten
    about once per tier (plus under one tier's base per run), an open day keeps few small files after each run,
    and the day's close merges all of them."""
    small = maintenance.SMALL_FILE_BYTES
    files: list[int] = []
    written = rewritten = 0
    for new in arrivals:
        files += new
        written += sum(new)
        chosen = maintenance.files_to_rewrite(files, final=False)
        assert all(files[i] < small for i in chosen)
        if chosen:
            merged = sum(files[i] for i in chosen)
            rewritten += merged
            files = [size for i, size in enumerate(files) if i not in set(chosen)] + [merged]
        assert sum(1 for size in files if size < small) <= (maintenance.TIER_FILES - 1) * _tiers_below_small() + 1
        assert not maintenance.files_to_rewrite(files[:-1] if chosen else files, final=False)  # nothing full is left
    # With a merged file as large as its inputs, a byte rises a tier per merge, except in a merge that stays in tier 0.
    assert rewritten <= _tiers_below_small() * written + len(arrivals) * maintenance.FIRST_TIER_BYTES
    left = [i for i, size in enumerate(files) if size < small]
    assert maintenance.files_to_rewrite(files, final=True) == (left if len(left) > 1 else [])
