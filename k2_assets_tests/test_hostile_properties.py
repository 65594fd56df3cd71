"""Property tests: hostile bytes mixed into the real vendor files never lose a line.

Hypothesis inserts arbitrary lines (bytes that are not UTF-8, NUL, quotes, separators, huge fields, CR
without LF) into real ASX trade and quote files and a real Binance trade dump, and corrupts some of the
real lines in place. For every generated file, whatever it holds:
- every line of the file is read by exactly one partition's load;
- per file, lines read = written + rejected + duplicates, and the load's counts reconcile;
- every rejected line carries a reason and its bytes exactly as the file had them;
- every real line left untouched is written.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from datetime import date
from pathlib import Path

import pyarrow.compute as pc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2_assets.core import asx, binance_history
from k2_assets.core.decode import split_lines

ASX_COMPANY = "7181"  # DVN: 232 trades over the five sessions, and its quotes
BINANCE_FILE = "BTCUSDT-trades-2024-01-01_1200-1230.derived.csv"
BINANCE_LINES = 1500  # of the real dump's 16,702, to keep each example quick
DAY = date(2024, 1, 1)

NASTY = [
    b"\xff",
    b"\xc3\x28",
    b"\xed\xa0\x80",
    b"\x00",
    b'"',
    b'""',
    b",",
    b",,,,,,,,",
    b"\r",
    b"\r\r",
    b"\t",
    b"\xef\xbb\xbf",
    b"\\",
    b"NaN",
    b"-0",
    b"1e308",
    b"9" * 40,
    b"03/15/2014",
    b"10/05/2014,02:30:00.000",
    b"True",
    b"\x1f",
]
fragment = st.one_of(st.binary(max_size=40), st.sampled_from(NASTY), st.integers(10_000, 200_000).map(lambda n: b"7" * n))
hostile_line = st.lists(fragment, min_size=0, max_size=6).map(lambda parts: b"".join(parts).replace(b"\n", b""))


@st.composite
def mutated(draw, lines: list[bytes]):
    """The file's lines with hostile lines inserted and some real lines corrupted; which real lines stayed intact."""
    out = [(line, True) for line in lines]
    for _ in range(draw(st.integers(0, 8))):
        index = draw(st.integers(0, len(out) - 1))
        line, _ = out[index]
        at = draw(st.integers(0, len(line)))
        out[index] = (line[:at] + draw(hostile_line) + line[at:], False)
    for _ in range(draw(st.integers(1, 8))):
        out.insert(draw(st.integers(0, len(out))), (draw(hostile_line), False))
    ending = draw(st.sampled_from([b"\r\n", b"\n"]))
    body = ending.join(line for line, _ in out) + draw(st.sampled_from([ending, b""]))
    intact = [position + 1 for position, (_, kept) in enumerate(out) if kept]  # 1-based line numbers
    return body, intact


def original_lines(path: Path, skip: int = 0, limit: int | None = None) -> list[bytes]:
    lines = split_lines(path.read_bytes()).to_pylist()[skip:]
    return lines[:limit] if limit else lines


def assert_rejects_keep_the_bytes(rejected, body: bytes) -> None:
    lines = split_lines(body).to_pylist()
    for row in rejected.to_pylist():
        assert row["reason"]
        if row["source_row"] is not None:
            assert row["raw"] == lines[row["source_row"] - 1], row


def assert_session_columns(rows, session, source_file: str) -> None:
    """The columns each written row takes from its session and its file, not from its line."""
    expected = {"trade_date": session, "source_file": source_file, "exchange": "ASX", "symbol": "DVN", "currency": "AUD"}
    for column, value in expected.items():
        assert set(rows.column(column).to_pylist()) <= {value}, column
    ids = rows.column("message_id").to_pylist()
    assert ids == [f"ASX:DVN:{session:%Y%m%d}:{n}" for n in rows.column("source_sequence").to_pylist()]


def asx_case(kind: str):
    def run(asx_dir: Path, case) -> None:
        body, intact = case
        with tempfile.TemporaryDirectory() as scratch:
            data = Path(scratch)
            shutil.copytree(asx_dir / "reference-data", data / "reference-data")
            (data / kind).mkdir()
            (data / kind / f"{ASX_COMPANY}.csv").write_bytes(body)
            # Every line's owner session (what the loader itself decides), then each of those sessions loaded.
            ledger, decoded = asx._open(
                data / kind / f"{ASX_COMPANY}.csv", f"{kind}/{ASX_COMPANY}.csv", kind, asx.read_companies(data)[ASX_COMPANY]
            )
            assert ledger.error is None and decoded is not None
            sessions = sorted(set(decoded.session.to_pylist()))
            read, written_lines = 0, set()
            for session in sessions:
                batch = asx.load_session(data, session, kind, source=f"asx_{kind}")  # its own invariants hold, or it raises
                (file,) = batch.files
                assert file.balanced and file.error is None and file.duplicates == 0
                read += file.read
                written_lines |= set(batch.rows.column("source_row").to_pylist())
                assert_session_columns(batch.rows, session, f"{kind}/{ASX_COMPANY}.csv")
                assert_rejects_keep_the_bytes(batch.rejected, body)
            assert read == len(split_lines(body))  # each line in exactly one partition
            assert set(intact) <= written_lines, sorted(set(intact) - written_lines)[:5]

    return run


SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@given(data=st.data())
@SETTINGS
def test_asx_trades_files_with_hostile_bytes_lose_no_line(asx_dir, data):
    case = data.draw(mutated(original_lines(asx_dir / "trades" / f"{ASX_COMPANY}.csv")))
    asx_case("trades")(asx_dir, case)


@given(data=st.data())
@SETTINGS
def test_asx_quotes_files_with_hostile_bytes_lose_no_line(asx_dir, data):
    case = data.draw(mutated(original_lines(asx_dir / "quotes" / f"{ASX_COMPANY}.csv", limit=400)))
    asx_case("quotes")(asx_dir, case)


@given(data=st.data())
@SETTINGS
def test_binance_dumps_with_hostile_bytes_lose_no_line(btcusdt_dir, data):
    source = btcusdt_dir / BINANCE_FILE
    header, *_ = original_lines(source, limit=1)
    body, intact = data.draw(mutated(original_lines(source, skip=1, limit=BINANCE_LINES)))
    body = header + b"\n" + body
    intact = [n + 1 for n in intact]  # the header is line 1
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        (folder / "BTCUSDT-trades-2024-01-01.csv").write_bytes(body)
        batch, _ = binance_history.load_day(folder, DAY, source="binance_trades_history")
    (file,) = batch.files
    lines = split_lines(body).to_pylist()
    assert file.error is None and file.balanced
    assert file.read == len(lines) - 1  # every line but the header
    assert_rejects_keep_the_bytes(batch.rejected, body)
    assert pc.count_distinct(batch.rows.column("message_id")).as_py() == batch.rows.num_rows
    # A real line whose trade id no other line of the file starts with is written.
    ids = [m.group(1) if (m := re.match(rb"^(\d+),", line)) else None for line in lines]
    unique = {i for i in ids if i is not None and ids.count(i) == 1}
    expected = {n for n in intact if ids[n - 1] in unique}
    assert expected <= set(batch.rows.column("source_row").to_pylist())
