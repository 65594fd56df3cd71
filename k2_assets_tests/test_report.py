"""The compliance report, read from a real Dagster instance after real materializations."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from html.parser import HTMLParser

import dagster as dg

from k2_assets.defs.asx.assets import asx_trades
from k2_assets.defs.asx.checks import asx_trades_rules
from k2_assets.defs.binance.assets import binance_trades_history
from k2_assets.defs.binance.checks import binance_trades_history_rules
from k2_assets_tests.conftest import REPO, make_resources, vendor_rows
from k2_assets_tests.test_gap_repair import FIRST, write_without

SESSIONS = ["2014-03-10", "2014-03-11", "2014-03-12", "2014-03-13", "2014-03-14"]


class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self.cell.strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def k2_report(dagster_home, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "k2_assets.cli", "report", "checks", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_report_lists_every_check_result_with_its_snapshot_and_run(asx_dir, btcusdt_dir, tmp_path, catalog_props):
    home = tmp_path / "dagster"
    home.mkdir()
    history = tmp_path / "history"
    write_without(btcusdt_dir, history / "BTCUSDT-trades-2024-01-01.csv", {FIRST + 10, FIRST + 11})
    resources = make_resources(catalog_props, asx_dir=asx_dir, binance_dir=history)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        for session in SESSIONS:
            assert dg.materialize(
                [asx_trades, *asx_trades_rules], partition_key=session, resources=resources, instance=instance
            ).success
        assert dg.materialize(
            [binance_trades_history, *binance_trades_history_rules],
            partition_key="2024-01-01",
            resources=resources,
            instance=instance,
        ).success

    result = k2_report(home, "--start", "2014-03-10", "--end", "2014-03-14", "--format", "csv")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 15 * len(
        SESSIONS
    )  # every rule (13, and the ledger's 2) on every ASX session; Binance's day is outside the range
    assert {r["partition"] for r in rows} == set(SESSIONS) and {r["asset"] for r in rows} == {"asx_trades"}
    assert all(r["passed"] == "True" and r["snapshot_id"] and r["run_id"] for r in rows)
    dvn = [r for r in rows if r["check"] == "message_id_unique"]
    assert all(int(r["checked_rows"]) > 0 for r in dvn)

    out = tmp_path / "report.html"
    result = k2_report(home, "--start", "2014-01-01", "--end", "2024-12-31", "--format", "html", "--out", str(out))
    assert result.returncode == 0, result.stderr
    page = _Tables()
    page.feed(out.read_text())
    summary, details, files = page.tables
    assert summary[0][:3] == ["asset", "check", "severity"]
    gaps = [row for row in summary[1:] if row[0] == "binance_trades_history" and row[1] == "no_unexplained_gaps"]
    assert gaps == [["binance_trades_history", "no_unexplained_gaps", "WARN", "1", "0", "1", "2024-01-01"]]
    failing = [row for row in details[1:] if row[4] == "FAILED"]
    assert len(failing) == 1 and failing[0][5] == "2"  # two missing trade ids
    assert str(FIRST + 10) in out.read_text()  # the failing range is in the sample
    assert len(details) - 1 == 15 * len(SESSIONS) + 15

    # The ledger closes the report: per partition and vendor file, what became of every line.
    assert files[0][:4] == ["partition", "asset", "file", "sha256"]
    assert len(files) - 1 == 4 * len(SESSIONS) + 1  # four company files per session, one Binance dump
    (dump,) = [row for row in files[1:] if row[1] == "binance_trades_history"]
    assert dump[2] == "BTCUSDT-trades-2024-01-01.csv" and int(dump[4]) == int(dump[5]) + int(dump[6]) + int(dump[7]) == 16700

    md = k2_report(home, "--start", "2024-01-01", "--end", "2024-01-01", "--format", "md")
    assert "| binance_trades_history | no_unexplained_gaps | WARN | 1 | 0 | 1 | 2024-01-01 |" in md.stdout
    assert (
        "## Vendor files" in md.stdout and "| 2024-01-01 | binance_trades_history | BTCUSDT-trades-2024-01-01.csv |" in md.stdout
    )

    ledger = subprocess.run(
        [
            sys.executable,
            "-m",
            "k2_assets.cli",
            "report",
            "files",
            "--start",
            "2014-03-10",
            "--end",
            "2014-03-14",
            "--format",
            "csv",
        ],
        env={**os.environ, "DAGSTER_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ledger.returncode == 0, ledger.stderr
    files_csv = list(csv.DictReader(io.StringIO(ledger.stdout)))
    assert len(files_csv) == 4 * len(SESSIONS)
    assert sum(int(f["lines_read"]) for f in files_csv if f["file"].startswith("trades/")) == sum(
        len(vendor_rows(p)) for p in (asx_dir / "trades").glob("*.csv")
    )

    bad = k2_report(home, "--start", "2014-03-14", "--end", "2014-03-10")
    assert bad.returncode == 2 and "reversed" in bad.stderr
