"""pyiceberg's commit path as K2 runs it (`iceberg_metadata_cache`): no deep copies of the metadata, parsed
metadata files kept by location, and Avro readers kept by header schema. None may change what a commit writes, what
a reader sees, or an earlier state; a metadata file holds the bytes pyiceberg itself would write."""

from __future__ import annotations

import subprocess
import sys
from datetime import date, timedelta

import hypothesis
import pyarrow as pa
import pyarrow.compute as pc
import pyiceberg.catalog
import pyiceberg.table
import pytest
from hypothesis import strategies as st
from pyiceberg.avro.file import AvroFile
from pyiceberg.expressions import EqualTo
from pyiceberg.partitioning import UNPARTITIONED_PARTITION_SPEC
from pyiceberg.serializers import ToOutputFile
from pyiceberg.types import StringType

from k2_assets.core import catalog as k2_catalog
from k2_assets.core import iceberg_metadata_cache, live_codec, live_decode, maintenance
from k2_assets.core.kafka_batch import Messages
from k2_assets.core.offsets import FencedTable
from k2_assets_tests.conftest import REPO, btc_trade_events

INGEST_US = 1_704_110_400_000_000
DAYS = [date(2024, 1, 1) + timedelta(days=i) for i in range(3)]


@pytest.fixture(scope="module")
def trades(btcusdt_dir) -> pa.Table:
    """200 real trades as the live writer decodes them."""
    values = [live_codec.encode(live_codec.trade_from_event(e, INGEST_US)) for e in btc_trade_events(btcusdt_dir)[:200]]
    rows, rejected = live_decode.decode_batch(Messages.of(values, [0] * len(values), range(len(values))), "t", source="test")
    assert rejected.num_rows == 0
    return rows


def on_day(rows: pa.Table, day: date) -> pa.Table:
    i = rows.schema.get_field_index("trade_date")
    return rows.set_column(i, rows.schema.field(i), pa.array([day] * rows.num_rows, pa.date32()))


def on_disk(table) -> str:
    """The table's current metadata file as pyiceberg alone parses it, serialized again."""
    return iceberg_metadata_cache._read_file(table.io.new_input(table.metadata_location)).model_dump_json()


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 200), st.sampled_from(DAYS)),
        st.tuples(st.just("delete_day"), st.sampled_from(DAYS)),
        st.tuples(st.just("set_property"), st.sampled_from(["a", "b"]), st.text("xyz", max_size=3)),
        st.tuples(st.just("remove_property"), st.sampled_from(["a", "b"])),
        st.tuples(st.just("expire_oldest")),
        st.tuples(st.just("k2_expiry")),
        st.tuples(st.just("add_column")),
    ),
    min_size=1,
    max_size=8,
)


def test_the_commit_path_is_k2s():
    """The tests below would pass on stock pyiceberg too: this one says they test K2's path."""
    assert pyiceberg.catalog.update_table_metadata is iceberg_metadata_cache.update_table_metadata
    assert pyiceberg.table.update_table_metadata is iceberg_metadata_cache.update_table_metadata
    assert AvroFile.__enter__ is iceberg_metadata_cache._enter_with_kept_reader
    assert ToOutputFile.table_metadata is iceberg_metadata_cache._write_metadata


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(operations=OPERATIONS)
@hypothesis.example(operations=[("add_column",), ("append", 5, DAYS[0]), ("delete_day", DAYS[0]), ("append", 3, DAYS[1])])
@hypothesis.example(operations=[("append", 5, DAYS[0]), ("append", 2, DAYS[2]), ("k2_expiry",), ("expire_oldest",)])
def test_every_commit_writes_what_it_holds_and_leaves_earlier_states_unchanged(tmp_path_factory, trades, operations):
    """For any sequence of K2's commits (fenced appends restating properties, K2's expiry) and pyiceberg's
    (deletes, property and schema changes, expiry by id): the metadata a commit holds is what pyiceberg alone
    parses from the file it wrote, no earlier metadata changed in place, and a reader sees the rows."""
    home = tmp_path_factory.mktemp("commits")
    uri, warehouse = f"sqlite:///{home}/catalog.db", f"file://{home}/warehouse"
    table = FencedTable.of(k2_catalog.ensure_table(k2_catalog.open_catalog(uri, warehouse), "trades"))
    table.restate = lambda metadata, parent: {"k2.test.parent": str(parent)}
    reader = k2_catalog.open_catalog(uri, warehouse)
    earlier = [(table.metadata, table.metadata.model_dump_json())]
    expected = {day: 0 for day in DAYS}
    for operation in operations:
        kind = operation[0]
        if kind == "append":
            table.append(on_day(trades.slice(0, operation[1]), operation[2]), snapshot_properties={"k2.test.n": "1"})
            expected[operation[2]] += operation[1]
        elif kind == "delete_day":
            table.delete(EqualTo("trade_date", operation[1].isoformat()))
            expected[operation[1]] = 0
        elif kind == "set_property":
            with table.transaction() as tx:
                tx.set_properties({f"k2.test.{operation[1]}": operation[2]})
        elif kind == "remove_property" and f"k2.test.{operation[1]}" in table.properties:
            with table.transaction() as tx:
                tx.remove_properties(f"k2.test.{operation[1]}")
        elif kind == "expire_oldest" and len(table.metadata.snapshots) > 1:
            table.maintenance.expire_snapshots().by_id(table.metadata.snapshots[0].snapshot_id).commit()
        elif kind == "k2_expiry":
            maintenance.expire(table, retain=timedelta(0))
        elif kind == "add_column" and "note" not in table.schema().column_names:
            with table.update_schema() as update:
                update.add_column("note", StringType())
        assert table.metadata.model_dump_json() == on_disk(table), f"after {operation}"
        with table.io.new_input(table.metadata_location).open() as written:
            assert written.read() == table.metadata.model_dump_json().encode(), f"{operation}: not pyiceberg's own bytes"
        for metadata, dumped in earlier:
            assert metadata.model_dump_json() == dumped, f"{operation} changed an earlier metadata in place"
        earlier.append((table.metadata, table.metadata.model_dump_json()))
        reread = reader.load_table("market.trades")
        assert reread.metadata_location == table.metadata_location
        assert reread.metadata is table.metadata, "the file this process wrote is read back from what it wrote"
        assert reread.metadata.model_dump_json() == on_disk(reread)
        days = reread.scan().to_arrow().column("trade_date")
        assert {day: pc.sum(pc.equal(days, pa.scalar(day, pa.date32()))).as_py() or 0 for day in DAYS} == expected
    reader.engine.dispose()


CHILD_APPEND = """
import sys
import pyarrow.parquet as pq
from pyiceberg.catalog.sql import SqlCatalog
home = sys.argv[1]
cat = SqlCatalog("k2", uri=f"sqlite:///{home}/catalog.db", warehouse=f"file://{home}/warehouse")
cat.load_table("market.trades").append(pq.read_table(f"{home}/rows.parquet"))
"""


def test_another_process_commit_is_read_not_the_kept_parse(tmp_path, trades):
    """A table object this process holds goes stale when another process commits: its next append is rebased
    onto the other commit (both land), and a reload reads the other process's metadata file."""
    import pyarrow.parquet as pq

    cat = k2_catalog.open_catalog(f"sqlite:///{tmp_path}/catalog.db", f"file://{tmp_path}/warehouse")
    table = k2_catalog.ensure_table(cat, "trades")
    table.append(trades.slice(0, 10))
    stale = cat.load_table("market.trades")
    pq.write_table(trades.slice(10, 20), tmp_path / "rows.parquet")
    subprocess.run([sys.executable, "-c", CHILD_APPEND, str(tmp_path)], cwd=REPO, check=True, timeout=120)
    reloaded = cat.load_table("market.trades")
    assert reloaded.metadata_location != table.metadata_location
    assert len(reloaded.metadata.snapshots) == 2 and reloaded.scan().to_arrow().num_rows == 30
    stale.append(trades.slice(30, 5))
    final = cat.load_table("market.trades")
    assert len(final.metadata.snapshots) == 3 and final.scan().to_arrow().num_rows == 35
    assert final.metadata.model_dump_json() == on_disk(final)


def test_a_reader_in_another_process_never_blocks_a_commit(tmp_path, trades):
    """The SQLite catalog runs in WAL mode: a process that holds a read transaction open (the daemon, a backup, a
    query) does not hold a commit back, and still sees the catalog as it was when its transaction began."""
    cat = k2_catalog.open_catalog(f"sqlite:///{tmp_path}/catalog.db", f"file://{tmp_path}/warehouse")
    table = k2_catalog.ensure_table(cat, "trades")
    table.append(trades.slice(0, 10))
    reader = subprocess.Popen(
        [sys.executable, "-c", HOLDING_READER, f"{tmp_path}/catalog.db"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        before = reader.stdout.readline().strip()  # the reader's transaction is open from here
        assert before == table.metadata_location
        table.append(trades.slice(10, 10))  # in a rollback journal: "database is locked" after the 5 s busy wait
        assert cat.load_table("market.trades").scan().to_arrow().num_rows == 20
        reader.stdin.write("again\n")
        reader.stdin.flush()
        assert reader.stdout.readline().strip() == before  # its snapshot of the catalog, unchanged
    finally:
        reader.kill()
        reader.wait()


HOLDING_READER = """
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], timeout=0, isolation_level=None)
query = "SELECT metadata_location FROM iceberg_tables WHERE table_name = 'trades'"
con.execute("BEGIN")
print(con.execute(query).fetchone()[0], flush=True)
sys.stdin.readline()
print(con.execute(query).fetchone()[0], flush=True)
"""


def entries(table, snapshot) -> list[tuple]:
    """Every manifest of `snapshot` (its manifest list read first) and every entry of each, as plain values."""
    out = []
    for manifest in snapshot.manifests(table.io):
        out.append((manifest.manifest_path, manifest.added_files_count, manifest.existing_files_count, str(manifest.partitions)))
        for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=False):
            f = entry.data_file
            out.append(
                (entry.status, entry.snapshot_id, f.file_path, str(f.partition), f.record_count, f.lower_bounds, f.upper_bounds)
            )
    return out


def test_manifests_read_through_kept_readers_equal_pyiceberg_s_own_reads(tmp_path, trades):
    """Two tables whose manifests' headers differ (partitioned by exchange and day, and unpartitioned), merged and
    read in turn: every manifest list and manifest read through K2's kept readers gives what pyiceberg's own
    `AvroFile.__enter__` gives, entry by entry."""
    cat = k2_catalog.open_catalog(f"sqlite:///{tmp_path}/catalog.db", f"file://{tmp_path}/warehouse")
    partitioned = k2_catalog.ensure_table(cat, "trades")
    flat = cat.create_table(
        "market.flat",
        schema=partitioned.schema(),
        partition_spec=UNPARTITIONED_PARTITION_SPEC,
        properties=k2_catalog.TABLE_PROPERTIES,
    )
    for i in range(22):  # past commit.manifest.min-count-to-merge: merges read the other headers' manifests too
        for table in (partitioned, flat):
            table.append(on_day(trades.slice(i * 5, 5), DAYS[i % len(DAYS)]))
    tables = [partitioned, flat]
    kept = [[entries(t, s) for s in t.metadata.snapshots[::4]] for t in tables]
    AvroFile.__enter__ = iceberg_metadata_cache._enter_avro_file
    try:
        own = [[entries(t, s) for s in t.metadata.snapshots[::4]] for t in tables]
    finally:
        AvroFile.__enter__ = iceberg_metadata_cache._enter_with_kept_reader
    assert kept == own
    assert {e[3] for e in kept[1][-1] if len(e) == 7} == {"Record[]"}, "the unpartitioned table read as itself"
    assert len(kept[0][-1]) > len(partitioned.current_snapshot().manifests(partitioned.io)), "entries were read"
