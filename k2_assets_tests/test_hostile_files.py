"""Hostile vendor files through the Dagster assets into Iceberg: nothing stops a load, every line is accounted for.

Each case is a real sample file plus bad things beside it or inside it. The loads succeed; the bad
lines and files are in market.rejected with their reasons; market.source_files has a row per file per
load whose lines add up; source_files_readable warns about the files that could not be read, and
lines_accounted_for proves the sums from the ledger and the tables.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from datetime import date

import dagster as dg
import pyarrow.compute as pc
from pyiceberg.expressions import EqualTo

from k2_assets.core.decode import split_lines
from k2_assets.defs.asx.assets import asx_quotes, asx_trades
from k2_assets.defs.asx.checks import asx_quotes_rules, asx_trades_rules
from k2_assets.defs.binance.assets import binance_trades_history
from k2_assets.defs.binance.checks import binance_trades_history_rules
from k2_assets_tests.conftest import make_resources

BTC_FILE = "BTCUSDT-trades-2024-01-01_1200-1230.derived.csv"
BAD_BYTES = b"3345206999,42690.2\xff0000,0.001,42.69,1704110400500,True"
SESSIONS = [date(2014, 3, d) for d in range(10, 15)]


def checks_of(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def ledger_of(catalog, run_id: str) -> dict[str, dict]:
    rows = catalog.load_table("market.source_files").scan(row_filter=EqualTo("run_id", run_id)).to_arrow().to_pylist()
    return {r["path"]: r for r in rows}


def hostile_binance_day(btcusdt_dir, folder):
    """The real BTCUSDT dump with a line that is not UTF-8, an exact repeat and a conflicting repeat; beside it an
    empty dump, a truncated zip, a broken link, a name that does not parse and a day before any partition."""
    folder.mkdir()
    header, *lines = split_lines((btcusdt_dir / BTC_FILE).read_bytes()).to_pylist()
    conflicting = lines[20].split(b",")
    conflicting[1] = b"1.00000000"
    body = [header, *lines[:10], BAD_BYTES, *lines[10:30], lines[5], b",".join(conflicting), *lines[30:]]
    (folder / "BTCUSDT-trades-2024-01-01.csv").write_bytes(b"\n".join(body) + b"\n")
    (folder / "ETHUSDT-trades-2024-01-01.csv").write_bytes(b"")
    with zipfile.ZipFile(folder / "BNBUSDT-trades-2024-01-01.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("BNBUSDT-trades-2024-01-01.csv", b"\n".join(lines[:2000]))
    whole = (folder / "BNBUSDT-trades-2024-01-01.zip").read_bytes()
    (folder / "BNBUSDT-trades-2024-01-01.zip").write_bytes(whole[: len(whole) // 2])
    os.symlink(folder / "gone.csv", folder / "LTCUSDT-trades-2024-01-01.csv")
    (folder / "XRPUSDT-trades-2024-02-30.csv").write_bytes(b"\n".join(lines[:5]))
    (folder / "ADAUSDT-trades-2016-01-01.csv").write_bytes(b"\n".join(lines[:5]))
    return len(lines)


def test_a_day_of_hostile_binance_dumps_loads_every_good_trade_once(btcusdt_dir, tmp_path, catalog_props, catalog):
    real = hostile_binance_day(btcusdt_dir, tmp_path / "history")
    resources = make_resources(catalog_props, binance_dir=tmp_path / "history")
    for _ in range(2):  # a rerun gives the same table, the same rejects, and a ledger row per load
        result = dg.materialize(
            [binance_trades_history, *binance_trades_history_rules], partition_key="2024-01-01", resources=resources
        )
        assert result.success
        trades = catalog.load_table("market.trades").scan().to_arrow()
        assert trades.num_rows == real == pc.count_distinct(trades.column("message_id")).as_py()
        rejected = catalog.load_table("market.rejected").scan().to_arrow().to_pylist()
        lines = {r["reason"]: r for r in rejected if r["source_row"] is not None}
        files = {r["source_file"]: r["reason"] for r in rejected if r["source_row"] is None}
        assert len(rejected) == 2 + 5
        (bad,) = [r for reason, r in lines.items() if "not valid UTF-8" in reason]
        assert bad["raw"] == BAD_BYTES and bad["source_row"] == 12 and bad["source_sequence"] == 3345206999
        (conflict,) = [reason for reason in lines if "appears again with other values" in reason]
        assert "first at BTCUSDT-trades-2024-01-01.csv line 23" in conflict
        assert files["ETHUSDT-trades-2024-01-01.csv"] == "file could not be read: ValueError: the file is empty"
        assert "BadZipFile" in files["BNBUSDT-trades-2024-01-01.zip"] or "zip" in files["BNBUSDT-trades-2024-01-01.zip"].lower()
        assert "FileNotFoundError" in files["LTCUSDT-trades-2024-01-01.csv"]
        assert "does not parse" in files["XRPUSDT-trades-2024-02-30.csv"]
        assert "before 2017-07-14" in files["ADAUSDT-trades-2016-01-01.csv"]
        assert all("\n" not in reason for reason in files.values())

        checks = checks_of(result)
        assert (
            not checks["source_files_readable"].passed and checks["source_files_readable"].severity == dg.AssetCheckSeverity.WARN
        )
        assert checks["source_files_readable"].metadata["failed_rows"].value == 5
        assert checks["lines_accounted_for"].passed and checks["message_id_unique"].passed
        ledger = ledger_of(catalog, result.run_id)
        assert len(ledger) == 6
        btc = ledger["BTCUSDT-trades-2024-01-01.csv"]
        assert (btc["lines_read"], btc["lines_written"], btc["lines_rejected"], btc["lines_duplicate"]) == (real + 3, real, 2, 1)
        assert btc["sha256"] and btc["size_bytes"] and not btc["changed"]
        assert {p for p, r in ledger.items() if r["file_error"]} == set(files)
        (event,) = result.asset_materializations_for_node("binance_trades_history")
        assert event.metadata["rows_duplicate_skipped"].value == 1
        assert set(event.metadata["unreadable_files"].value) == set(files)


def hostile_asx_copy(asx_dir, data):
    """The sample with a line that is not UTF-8 and a Saturday line in DVN's trades, a Sunday line at a time the
    daylight-saving change skips at the end of BHP's, and MWR's quotes file empty."""
    shutil.copytree(asx_dir, data)
    dvn = (data / "trades" / "7181.csv").read_bytes().split(b"\r\n")
    dvn[3:3] = [b"03/10/2014,10:\xe9\xff:00.000,1.11,100,,,", b"03/15/2014,10:00:00.000,1.11,100,,,"]
    (data / "trades" / "7181.csv").write_bytes(b"\r\n".join(dvn))
    with open(data / "trades" / "7078.csv", "ab") as f:
        f.write(b"10/05/2014,02:30:00.000,36.10,100,,,\r\n")
    (data / "quotes" / "3153.csv").write_bytes(b"")


def test_hostile_asx_files_lose_no_line_and_lines_on_no_session_are_rejected_by_one(asx_dir, tmp_path, catalog_props, catalog):
    data = tmp_path / "asx"
    hostile_asx_copy(asx_dir, data)
    resources = make_resources(catalog_props, asx_dir=data)
    read: dict[str, int] = {}
    for session in SESSIONS:
        result = dg.materialize(
            [asx_trades, asx_quotes, *asx_trades_rules, *asx_quotes_rules], partition_key=session.isoformat(), resources=resources
        )
        assert result.success
        checks = {(e.asset_key.path[-1], e.check_name): e for e in result.get_asset_check_evaluations()}
        assert checks[("asx_trades", "lines_accounted_for")].passed and checks[("asx_quotes", "lines_accounted_for")].passed
        assert checks[("asx_trades", "source_files_readable")].passed
        assert not checks[("asx_quotes", "source_files_readable")].passed  # the empty quotes file, in every session's load
        for path, row in ledger_of(catalog, result.run_id).items():
            read[path] = read.get(path, 0) + row["lines_read"]
    # Every line of every file was read by exactly one session's load.
    for kind in ("trades", "quotes"):
        for path in (data / kind).glob("*.csv"):
            assert read[f"{kind}/{path.name}"] == len(split_lines(path.read_bytes())), path
    rejected = catalog.load_table("market.rejected").scan().to_arrow().to_pylist()
    by_reason = {r["reason"]: r for r in rejected}
    saturday = by_reason["date '03/15/2014' is not an ASX session date (a Saturday)"]
    assert saturday["partition_date"] == date(2014, 3, 10) and saturday["source_file"] == "trades/7181.csv"
    sunday = by_reason["date '10/05/2014' is not an ASX session date (a Sunday)"]
    assert sunday["partition_date"] == date(2014, 3, 14) and sunday["source_file"] == "trades/7078.csv"
    (utf8,) = [r for r in rejected if "not valid UTF-8" in r["reason"]]
    assert utf8["raw"] == b"03/10/2014,10:\xe9\xff:00.000,1.11,100,,," and utf8["source_row"] == 4
    empty = [r for r in rejected if r["source_file"] == "quotes/3153.csv"]
    assert len(empty) == len(SESSIONS) and all(r["reason"] == "file could not be read: the file is empty" for r in empty)


def test_a_vendor_file_whose_bytes_changed_is_flagged_and_reloaded(asx_dir, tmp_path, catalog_props, catalog):
    data = tmp_path / "asx"
    shutil.copytree(asx_dir, data)
    resources = make_resources(catalog_props, asx_dir=data)
    first = dg.materialize([asx_trades, *asx_trades_rules], partition_key="2014-03-10", resources=resources)
    path = data / "trades" / "7181.csv"
    before = path.stat()
    body = path.read_bytes()
    line = body.split(b"\r\n")[0]
    fixed = line.replace(b",0.67,", b",0.68,", 1)
    assert len(fixed) == len(line) and fixed != line
    path.write_bytes(body.replace(line, fixed, 1))  # the vendor corrects a price: same size ...
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # ... and the same modification time
    second = dg.materialize([asx_trades, *asx_trades_rules], partition_key="2014-03-10", resources=resources)
    assert first.success and second.success
    old, new = ledger_of(catalog, first.run_id)["trades/7181.csv"], ledger_of(catalog, second.run_id)["trades/7181.csv"]
    assert (new["changed"], new["previous_sha256"], new["sha256"]) == (True, old["sha256"], new["sha256"]) and old[
        "sha256"
    ] != new["sha256"]
    assert not ledger_of(catalog, second.run_id)["trades/7078.csv"]["changed"]
    (event,) = second.asset_materializations_for_node("asx_trades")
    assert event.metadata["changed_files"].value == ["trades/7181.csv"]
    row = catalog.load_table("market.trades").scan(row_filter=EqualTo("message_id", "ASX:DVN:20140310:1")).to_arrow().to_pylist()
    assert str(row[0]["price"]) == "0.68000000"


def test_a_file_with_classic_mac_line_endings_loads_like_the_original(asx_dir, tmp_path):
    from k2_assets.core import asx

    data = tmp_path / "asx"
    shutil.copytree(asx_dir, data)
    original = sum(asx.load_session(asx_dir, s, "trades", source="asx_trades").rows.num_rows for s in SESSIONS)
    path = data / "trades" / "7181.csv"
    path.write_bytes(path.read_bytes().replace(b"\r\n", b"\r"))
    batches = [asx.load_session(data, s, "trades", source="asx_trades") for s in SESSIONS]
    assert sum(b.rows.num_rows for b in batches) == original and not any(b.rejected.num_rows for b in batches)


def test_a_folder_named_like_a_dump_is_reported_not_skipped(btcusdt_dir, tmp_path):
    from k2_assets.core import binance_history

    folder = tmp_path / "history"
    (folder / "ETHUSDT-trades-2024-01-01.csv").mkdir(parents=True)
    shutil.copy(btcusdt_dir / BTC_FILE, folder / "BTCUSDT-trades-2024-01-01.csv")
    batch, _ = binance_history.load_day(folder, date(2024, 1, 1), source="binance_trades_history")
    errors = {f.path: f.error for f in batch.files if f.error}
    assert list(errors) == ["ETHUSDT-trades-2024-01-01.csv"] and "IsADirectoryError" in errors["ETHUSDT-trades-2024-01-01.csv"]
    assert batch.rows.num_rows == 16702


def test_the_same_dump_twice_in_a_day_is_written_once_and_counted_as_duplicates(btcusdt_dir, tmp_path):
    from k2_assets.core import binance_history

    folder = tmp_path / "history"
    folder.mkdir()
    shutil.copy(btcusdt_dir / BTC_FILE, folder / "BTCUSDT-trades-2024-01-01.csv")
    with zipfile.ZipFile(folder / "BTCUSDT-trades-2024-01-01.zip", "w") as archive:
        archive.write(btcusdt_dir / BTC_FILE, "BTCUSDT-trades-2024-01-01.csv")
    batch, _ = binance_history.load_day(folder, date(2024, 1, 1), source="binance_trades_history")
    files = {f.path: f for f in batch.files}
    assert batch.rows.num_rows == 16702 == pc.count_distinct(batch.rows.column("message_id")).as_py()
    first, second = files["BTCUSDT-trades-2024-01-01.csv"], files["BTCUSDT-trades-2024-01-01.zip"]
    assert (first.read, first.written, first.duplicates) == (16702, 16702, 0)
    assert (second.read, second.written, second.rejected, second.duplicates) == (16702, 0, 0, 16702)
