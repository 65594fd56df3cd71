"""binance_trades_history on Binance's real dumps, in every layout Binance has published."""

from __future__ import annotations

import csv
import zipfile
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from pyiceberg.expressions import EqualTo

from k2_assets.core import binance_format, binance_history
from k2_assets.core import catalog as k2_catalog
from k2_assets.defs.binance.assets import binance_trades_history
from k2_assets.defs.binance.checks import binance_trades_history_rules
from k2_assets_tests.conftest import make_resources

BTC_FILE = "BTCUSDT-trades-2024-01-01_1200-1230.derived.csv"
FIRST_ID, LAST_ID = 3345206428, 3345223129


def real_btc_rows(btcusdt_dir: Path) -> list[list[str]]:
    with open(btcusdt_dir / BTC_FILE, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][0] == "id"
    return rows[1:]


def metadata(result):
    (event,) = result.asset_materializations_for_node("binance_trades_history")
    return {k: v.value for k, v in event.metadata.items()}


def test_real_btcusdt_file_writes_16702_contiguous_trades(btcusdt_dir, catalog_props, catalog):
    resources = make_resources(catalog_props, binance_dir=btcusdt_dir)
    result = dg.materialize(
        [binance_trades_history, *binance_trades_history_rules], partition_key="2024-01-01", resources=resources
    )
    assert result.success
    meta = metadata(result)
    assert (meta["rows_read"], meta["rows_written"], meta["rows_rejected"]) == (16702, 16702, 0)
    assert all(e.passed for e in result.get_asset_check_evaluations())
    table = catalog.load_table("market.trades").scan(row_filter=EqualTo("exchange", "BINANCE")).to_arrow()
    assert table.num_rows == 16702
    assert sorted(table.column("source_sequence").to_pylist()) == list(range(FIRST_ID, LAST_ID + 1))
    assert pc.sum(table.column("quantity")).as_py() == Decimal("296.54808")
    source = real_btc_rows(btcusdt_dir)
    sells = sum(1 for r in source if r[5] == "True")
    assert table.filter(pc.equal(table.column("side"), "SELL")).num_rows == sells
    first = table.filter(pc.equal(table.column("source_sequence"), FIRST_ID)).to_pylist()[0]
    assert first["price"] == Decimal("42690.21") and first["message_id"] == f"BINANCE:BTCUSDT:{FIRST_ID}"
    assert first["exchange_timestamp"] == datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
    assert first["currency"] == "USDT" and first["asset_class"] == "CRYPTO" and first["trade_id"] == str(FIRST_ID)
    # A rerun replaces the day: still 16,702.
    assert dg.materialize(
        [binance_trades_history, *binance_trades_history_rules], partition_key="2024-01-01", resources=resources
    ).success
    assert catalog.load_table("market.trades").scan().to_arrow().num_rows == 16702


def write_variants(btcusdt_dir: Path, out: Path) -> dict[str, int]:
    """The real trades in Binance's other published layouts: headerless with is_best_match, zipped,
    and (moved to 2025-01-02) with microsecond timestamps."""
    rows = real_btc_rows(btcusdt_dir)
    out.mkdir(parents=True, exist_ok=True)
    headerless = "".join(",".join([*r, "True"]) + "\n" for r in rows[:5000])
    (out / "BTCUSDT-trades-2024-01-01.csv").write_text(headerless)
    with zipfile.ZipFile(out / "ETHUSDT-trades-2024-01-01.zip", "w") as z:
        z.writestr("ETHUSDT-trades-2024-01-01.csv", "".join(",".join(r) + "\n" for r in rows[5000:8000]))
    shift_us = int((datetime(2025, 1, 2, tzinfo=UTC) - datetime(2024, 1, 1, tzinfo=UTC)).total_seconds() * 1e6)
    micro = [[*r[:4], str(int(r[4]) * 1000 + shift_us), r[5], "True"] for r in rows[8000:9000]]
    (out / "BTCUSDT-trades-2025-01-02.csv").write_text("".join(",".join(r) + "\n" for r in micro))
    return {"plain": 5000, "zip": 3000, "micro": 1000}


def test_headerless_zip_and_microsecond_dumps(btcusdt_dir, tmp_path):
    history = tmp_path / "history"
    write_variants(btcusdt_dir, history)
    batch, notes = binance_history.load_day(history, date(2024, 1, 1), source="binance_trades_history")
    assert notes == [] and batch.rejected.num_rows == 0
    assert collections_count(batch.rows.column("symbol")) == {"BTCUSDT": 5000, "ETHUSDT": 3000}
    assert {f.path for f in batch.files} == {"BTCUSDT-trades-2024-01-01.csv", "ETHUSDT-trades-2024-01-01.zip"}
    assert batch.rows.filter(pc.equal(batch.rows.column("symbol"), "BTCUSDT")).slice(0, 1).to_pylist()[0]["source_row"] == 1
    best = pc.map_lookup(batch.rows.column("vendor_data"), "is_best_match", "first")
    assert pc.sum(pc.is_valid(best)).as_py() == 5000

    micro, _ = binance_history.load_day(history, date(2025, 1, 2), source="binance_trades_history")
    assert micro.rows.num_rows == 1000 and micro.rejected.num_rows == 0
    first = micro.rows.slice(0, 1).to_pylist()[0]
    rows = real_btc_rows(btcusdt_dir)
    expected = datetime.fromtimestamp(int(rows[8000][4]) / 1000, tz=UTC).replace(year=2025, month=1, day=2)
    assert first["exchange_timestamp"] == expected
    assert first["trade_date"] == date(2025, 1, 2)


def collections_count(column: pa.ChunkedArray) -> dict:
    counts = pc.value_counts(column)
    return {v["values"]: v["counts"] for v in counts.to_pylist()}


def test_bad_dump_rows_are_rejected_with_reasons(btcusdt_dir, tmp_path, catalog_props, catalog):
    rows = real_btc_rows(btcusdt_dir)[:100]
    bad = {
        3: ([rows[3][0], "abc", *rows[3][2:]], "price 'abc' is not a number"),
        4: (
            [rows[4][0], rows[4][1], "0.123456789", *rows[4][3:]],
            "quantity 0.123456789 does not fit decimal(18,8) without rounding",
        ),
        5: ([*rows[5][:5], "maybe"], "is_buyer_maker 'maybe' is not True or False"),
        6: ([*rows[6][:4], "1704153600000", rows[6][5]], "time 1704153600000 is outside the UTC day 2024-01-01"),
        7: (rows[7][:5], "expected 6 comma-separated fields, found 5"),
    }
    for i, (row, _) in bad.items():
        rows[i] = row
    history = tmp_path / "history"
    history.mkdir()
    (history / "BTCUSDT-trades-2024-01-01.csv").write_text("".join(",".join(r) + "\n" for r in rows))
    result = dg.materialize(
        [binance_trades_history, *binance_trades_history_rules],
        partition_key="2024-01-01",
        resources=make_resources(catalog_props, binance_dir=history),
    )
    meta = metadata(result)
    assert (meta["rows_read"], meta["rows_written"], meta["rows_rejected"]) == (100, 95, 5)
    rejected = catalog.load_table("market.rejected").scan().to_arrow().to_pylist()
    assert {r["source_row"]: r["reason"] for r in rejected} == {i + 1: reason for i, (_, reason) in bad.items()}
    assert {r["raw"].decode() for r in rejected} == {",".join(row) for row, _ in bad.values()}
    # Their ids are readable, so the holes they leave are explained by them, and the gap check passes.
    assert sorted(r["source_sequence"] for r in rejected) == [int(rows[i][0]) for i in sorted(bad)]
    gaps = catalog.load_table("market.sequence_gaps").scan().to_arrow().to_pylist()
    assert [(g["first_missing"], g["last_missing"], g["explained_by"]) for g in gaps] == [
        (int(rows[3][0]), int(rows[7][0]), "5 rejected row(s) in market.rejected")
    ]
    assert {c.check_name: c.passed for c in result.get_asset_check_evaluations()}["no_unexplained_gaps"]


def test_agg_trades_load_by_utc_day_and_yield_to_raw_trades(shared_data, btcusdt_dir, tmp_path):
    source = shared_data / "freqtrade_binance_xrpeth_aggtrades_vs_1m" / "XRPETH-aggTrades-2019-10-11_2019-10-13.derived.csv"
    with open(source, newline="") as f:
        header, *rows = list(csv.reader(f))
    history = tmp_path / "history"
    history.mkdir()
    by_day: dict[str, list] = {}
    for r in rows:
        by_day.setdefault(datetime.fromtimestamp(int(r[5]) / 1000, tz=UTC).date().isoformat(), []).append(r)
    for day, day_rows in by_day.items():
        (history / f"XRPETH-aggTrades-{day}.csv").write_text(
            ",".join(header) + "\n" + "".join(",".join(r) + "\n" for r in day_rows)
        )
    total = 0
    for day, day_rows in by_day.items():
        batch, notes = binance_history.load_day(history, date.fromisoformat(day), source="binance_trades_history")
        assert batch.rejected.num_rows == 0 and batch.rows.num_rows == len(day_rows)
        seq = batch.rows.column("source_sequence").to_pylist()
        assert seq == list(range(seq[0], seq[0] + len(seq)))  # aggregate ids are contiguous
        first = batch.rows.slice(0, 1).to_pylist()[0]
        assert first["currency"] == "ETH" and first["message_id"] == f"BINANCE:XRPETH:agg:{seq[0]}"
        assert dict(first["vendor_data"])["record_type"] == "aggTrade"
        total += batch.rows.num_rows
    assert total == 12477

    # Raw trades and aggTrades of the same symbol and day: the raw trades win, the other is noted.
    (history / "XRPETH-trades-2019-10-11.csv").write_text("1,0.0014,10,0.014,1570752011620,True\n")
    batch, notes = binance_history.load_day(history, date(2019, 10, 11), source="binance_trades_history")
    assert batch.rows.num_rows == 1 and len(notes) == 1 and "skipped" in notes[0]


def test_history_never_duplicates_trades_that_arrived_live(btcusdt_dir, catalog_props, catalog):
    """Rows that came from Kafka stay; history inserts only the message_ids they do not have."""
    batch, _ = binance_history.load_day(btcusdt_dir, date(2024, 1, 1), source="test")
    live = batch.rows.slice(0, 1000)
    n = live.num_rows
    live = live.set_column(
        live.schema.get_field_index("kafka_topic"), "kafka_topic", pa.array(["market.crypto.trades.binance"] * n)
    )
    live = live.set_column(live.schema.get_field_index("kafka_offset"), "kafka_offset", pa.array(range(n), pa.int64()))
    live = live.set_column(live.schema.get_field_index("source_file"), "source_file", pa.nulls(n, pa.string()))
    # One live row with a timestamp outside the day must be caught by the check, not hidden.
    stray = live.slice(0, 1).to_pylist()[0]
    stray.update(
        message_id="BINANCE:BTCUSDT:999",
        trade_id="999",
        source_sequence=999,
        exchange_timestamp=datetime(2024, 1, 2, 0, 0, 1, tzinfo=UTC),
    )
    live = pa.concat_tables([live, pa.Table.from_pylist([stray], schema=live.schema)])
    k2_catalog.ensure_table(catalog, "trades").append(live)

    resources = make_resources(catalog_props, binance_dir=btcusdt_dir)
    result = dg.materialize(
        [binance_trades_history, *binance_trades_history_rules],
        partition_key="2024-01-01",
        resources=resources,
        raise_on_error=False,
    )
    # The bad live row fails a blocking (ERROR) check: the data is written and described, the run is red.
    assert not result.success
    assert "timestamp_in_session" in result.get_step_failure_events()[0].step_failure_data.error.message
    meta = metadata(result)
    assert meta["rows_already_present"] == 1000 and meta["rows_written"] == 15702
    table = catalog.load_table("market.trades").scan().to_arrow()
    assert table.num_rows == 16703
    assert pc.count_distinct(table.column("message_id")).as_py() == 16703
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["message_id_unique"].passed
    in_session = checks["timestamp_in_session"]
    assert not in_session.passed
    assert in_session.metadata["failed_rows"].value == 1
    assert in_session.metadata["sample"].value[0]["message_id"] == "BINANCE:BTCUSDT:999"
    assert in_session.severity == dg.AssetCheckSeverity.ERROR


@pytest.mark.parametrize(
    "symbol,currency", [("BTCUSDT", "USDT"), ("XRPETH", "ETH"), ("BNBFDUSD", "FDUSD"), ("ETHBTC", "BTC"), ("USDT", None)]
)
def test_quote_currency_from_symbol(symbol, currency):
    assert binance_format.quote_currency(symbol) == currency
