"""Checks the demo generator by reading back the files it writes, independently of its internals."""

from __future__ import annotations

import itertools
import json
import re
import zipfile
from collections import Counter
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from k2_assets.cli import main as cli_main
from k2_assets.dev.demo import generate_demo_data, isin

ASX_DAYS = ["03/10/2014", "03/11/2014", "03/12/2014", "03/13/2014", "03/14/2014"]  # Mon..Fri
BINANCE_DATES = [date(2024, 1, 1), date(2024, 1, 2), date(2025, 1, 2)]
TIME_RE = re.compile(r"^(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d\.\d{3}$")
QUALIFIERS = {"0", "2", "25", "27", "5", "8", "3", "26", "9", "1"}
DEC8 = re.compile(r"^\d+\.\d{8}$")


def ms(hms: str) -> int:
    h, m, s = hms.split(":")
    return (int(h) * 3600 + int(m) * 60) * 1000 + round(float(s) * 1000)


def on_asx_grid(price: str) -> bool:
    milli = Decimal(price) * 1000
    if milli != milli.to_integral_value() or milli <= 0:
        return False
    tick = 1 if milli < 100 else 5 if milli < 2000 else 10
    return int(milli) % tick == 0


def asx_lines(path: Path) -> list[str]:
    data = path.read_bytes()
    assert data.endswith(b"\r\n")
    assert data.count(b"\n") == data.count(b"\r\n")
    return data.decode().split("\r\n")[:-1]


def classify_asx_trade(fields: list[str]) -> str | None:
    """The kind of deliberate defect in a trade row, or None for a good row."""
    if len(fields) == 6:
        return "missing_column"
    assert len(fields) == 7, fields
    if not TIME_RE.match(fields[1]):
        return "bad_time"
    if not re.fullmatch(r"\d+\.\d+", fields[2]):
        return "price_non_numeric"
    if len(fields[2].split(".")[1]) >= 9:
        return "price_decimals"
    if int(fields[3]) <= 0:
        return "volume_nonpositive"
    return None


def classify_binance(price: str, qty: str, maker: str) -> str | None:
    if not re.fullmatch(r"\d+(\.\d+)?", price):
        return "price_non_numeric"
    if re.fullmatch(r"\d+\.\d{9}", qty):
        return "qty_decimals"
    if maker not in ("True", "False"):
        return "bad_is_buyer_maker"
    return None


def nonzero(counts: dict) -> dict:
    return {k: v for k, v in counts.items() if v}


def binance_text(out: Path, name: str) -> str:
    csv_path = out / "binance" / f"{name}.csv"
    if csv_path.exists():
        return csv_path.read_text()
    with zipfile.ZipFile(csv_path.with_suffix(".zip")) as zf:
        assert zf.namelist() == [csv_path.name]
        return zf.read(csv_path.name).decode()


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, generate_demo_data(out)


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    """Small run with many bad rows, so every kind of defect shows up."""
    out = tmp_path_factory.mktemp("noisy")
    summary = generate_demo_data(out, asx_days=2, binance_rows_per_day=4_000, bad_row_rate=0.02, seed=11)
    return out, summary


def test_summary_lists_exactly_the_files_written(default_run):
    out, summary = default_run
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert written == set(summary["files"])
    assert "binance/ETHUSDT-trades-2024-01-02.zip" in written
    assert "binance/ETHUSDT-trades-2024-01-02.csv" not in written
    assert "binance/XRPETH-aggTrades-2024-01-01.csv" in written
    assert summary["total_rows"] == sum(f["rows"] for f in summary["files"].values())


def test_company_info(default_run):
    out, _ = default_run
    data = (out / "asx/reference-data/company_info.csv").read_bytes()
    assert b"\r" not in data and data.endswith(b"\n")
    header, *rows = data.decode().splitlines()
    assert header == "company_id,symbol,company_name,ISIN,start_date,end_date"
    assert 4 <= len(rows) <= 6
    assert isin("BHP") == "AU000000BHP4"
    for row in rows:
        cid, symbol, name, code, start, end = row.split(",")
        assert re.fullmatch(r"\d{4}", cid) and re.fullmatch(r"[A-Z]{3}", symbol) and name
        assert code == isin(symbol) and code.startswith(f"AU000000{symbol}")
        assert datetime.strptime(start, "%m/%d/%Y").date() < date(2014, 3, 10)
        assert datetime.strptime(end, "%m/%d/%Y").date() > date(2014, 3, 14)
        assert (out / f"asx/trades/{cid}.csv").exists() and (out / f"asx/quotes/{cid}.csv").exists()


@pytest.mark.parametrize("run", ["default_run", "noisy_run"])
def test_asx_trades(run, request):
    out, summary = request.getfixturevalue(run)
    days = ASX_DAYS if run == "default_run" else ASX_DAYS[:2]
    per_day = []
    for path in sorted((out / "asx/trades").glob("*.csv")):
        stats = summary["files"][f"asx/trades/{path.name}"]
        lines = asx_lines(path)
        assert len(lines) == stats["rows"]
        assert re.match(r"\d\d/\d\d/\d{4},", lines[0])  # no header
        bad = Counter()
        last = ("", -1)
        for line in lines:
            fields = line.split(",")
            kind = classify_asx_trade(fields)
            assert fields[0] in days
            if kind:
                bad[kind] += 1
                continue
            _, hms, price, _, qualifier, venue, buyer = fields
            t = ms(hms)
            assert on_asx_grid(price), line
            assert qualifier in QUALIFIERS and venue in ("", "X") and buyer == ""
            assert 7 * 3600_000 <= t <= 17 * 3600_000 + 30 * 60_000, line
            if t < 10 * 3600_000:
                assert qualifier == "3", line  # pre-open: off-market crossings only
            assert not 16 * 3600_000 <= t < 16 * 3600_000 + 10 * 60_000, line
            assert (fields[0], t) >= last  # days ascending, time order within a day
            last = (fields[0], t)
        assert dict(bad) == nonzero(stats["bad_rows"]), path.name
        assert sum(a == b for a, b in itertools.pairwise(lines)) == stats["duplicate_rows"]
        per_day.append(len(lines) / len(days))
    assert max(per_day) >= 15_000 and min(per_day) < 50
    if run == "noisy_run":
        kinds = Counter()
        for name, stats in summary["files"].items():
            if name.startswith("asx/trades/"):
                kinds.update(stats["bad_rows"])
        assert all(
            kinds[k] > 0 for k in ("price_decimals", "price_non_numeric", "volume_nonpositive", "missing_column", "bad_time")
        )


def test_asx_volume_and_duplicates(default_run):
    _, summary = default_run
    trade_files = {k: v for k, v in summary["files"].items() if k.startswith("asx/trades/")}
    assert 150_000 <= sum(v["rows"] for v in trade_files.values()) <= 250_000
    assert 0 < summary["total_bad_rows"]
    heavy = [v for v in trade_files.values() if v["rows"] > 15_000 * 5]
    assert heavy and all(v["duplicate_rows"] > 0 for v in heavy)


def test_asx_quotes(default_run):
    out, summary = default_run
    for path in sorted((out / "asx/quotes").glob("*.csv")):
        lines = asx_lines(path)
        trades = summary["files"][f"asx/trades/{path.name}"]["rows"]
        assert 0.7 <= len(lines) / trades <= 1.4
        one_sided = 0
        for line in lines:
            day, hms, bid, ask, bid_vol, ask_vol = line.split(",")
            assert day in ASX_DAYS and TIME_RE.match(hms)
            if bid == "0.0" or ask == "0.0":
                one_sided += 1
                assert ms(hms) < 10 * 3600_000 + 10 * 60_000  # pre-open only
                assert (bid == "0.0") == (bid_vol == "0") and (ask == "0.0") == (ask_vol == "0")
                assert (bid, ask) != ("0.0", "0.0")
                continue
            assert on_asx_grid(bid) and on_asx_grid(ask) and Decimal(bid) < Decimal(ask), line
            assert int(bid_vol) > 0 and int(ask_vol) > 0
        if len(lines) > 10_000:
            assert one_sided > 0


@pytest.mark.parametrize("run", ["default_run", "noisy_run"])
def test_binance_trades(run, request):
    out, summary = request.getfixturevalue(run)
    kinds = Counter()
    for symbol in ("BTCUSDT", "ETHUSDT"):
        next_id = None
        for i, day in enumerate(BINANCE_DATES):
            name = f"{symbol}-trades-{day:%Y-%m-%d}"
            text = binance_text(out, name)
            stats = summary["files"][next(k for k in summary["files"] if k.startswith(f"binance/{name}."))]
            assert "\r" not in text and text.endswith("\n")
            lines = text.splitlines()
            legacy = symbol == "BTCUSDT" and i == 0
            if legacy:
                assert lines.pop(0) == "id,price,qty,quote_qty,time,is_buyer_maker"
            assert len(lines) == stats["rows"]
            per_day = 86_400_000 if day < date(2025, 1, 1) else 86_400_000_000
            start = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) * (per_day // 86_400)
            bad = Counter()
            prev_time = start
            for line in lines:
                fields = line.split(",")
                assert len(fields) == (6 if legacy else 7)
                trade_id, price, qty, quote_qty, ts, maker = fields[:6]
                if not legacy:
                    assert fields[6] == "True"
                if next_id is not None:
                    assert int(trade_id) == next_id
                next_id = int(trade_id) + 1
                assert len(ts) == (13 if per_day == 86_400_000 else 16)
                assert prev_time <= int(ts) < start + per_day
                prev_time = int(ts)
                kind = classify_binance(price, qty, maker)
                if kind:
                    bad[kind] += 1
                    continue
                assert DEC8.match(price) and DEC8.match(qty) and DEC8.match(quote_qty)
                assert Decimal(price) * Decimal(qty) == Decimal(quote_qty)
            assert dict(bad) == nonzero(stats["bad_rows"]), name
            kinds.update(bad)
    assert summary["files"]["binance/BTCUSDT-trades-2024-01-01.csv"]["first_id"] == 3345206428
    if run == "noisy_run":
        assert set(kinds) == {"price_non_numeric", "qty_decimals", "bad_is_buyer_maker"}


def test_binance_agg_trades(noisy_run):
    out, summary = noisy_run
    text = (out / "binance/XRPETH-aggTrades-2024-01-01.csv").read_text()
    lines = text.splitlines()
    stats = summary["files"]["binance/XRPETH-aggTrades-2024-01-01.csv"]
    assert len(lines) == stats["rows"]
    bad = Counter()
    prev = None
    for line in lines:
        agg_id, price, qty, first, last, ts, maker, best = line.split(",")
        assert len(ts) == 13 and best == "True"
        assert int(first) <= int(last)
        if prev:
            assert int(agg_id) == int(prev[0]) + 1
            assert int(first) == int(prev[4]) + 1
        prev = line.split(",")
        kind = classify_binance(price, qty, maker)
        if kind:
            bad[kind] += 1
            continue
        assert DEC8.match(price) and DEC8.match(qty)
        assert Decimal("0.001") < Decimal(price) < Decimal("0.002")
    assert dict(bad) == nonzero(stats["bad_rows"])


def _small(out: Path, seed: int) -> dict[str, bytes]:
    generate_demo_data(out, asx_days=2, binance_rows_per_day=1_000, seed=seed, bad_row_rate=0.01)
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_deterministic_per_seed(tmp_path):
    first = _small(tmp_path / "a", 3)
    again = _small(tmp_path / "b", 3)
    other = _small(tmp_path / "c", 4)
    assert first == again
    assert first.keys() == other.keys()
    data = [name for name in first if "reference-data" not in name]
    assert all(first[name] != other[name] for name in data)


def test_k2_demo_data_prints_summary(tmp_path, capsys):
    assert (
        cli_main(
            [
                "demo-data",
                "--out",
                str(tmp_path),
                "--asx-days",
                "1",
                "--binance-rows-per-day",
                "50",
                "--binance-dates",
                "2025-01-02",
                "--seed",
                "1",
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert "binance/BTCUSDT-trades-2025-01-02.csv" in summary["files"]
    assert not [p for p in tmp_path.rglob("*-trades-*.zip") if "futures" not in p.parts]  # one day: no zipped spot dump
    assert "binance/BTCUSDT-1m-2025-01-02.zip" in summary["files"]  # the exchange's own bars of the day
    assert (tmp_path / "asx/trades").is_dir()
