"""The compiled vendor-file scanner: built at install, taken by the real sample, and decoding every file exactly as
the Arrow path does: the same rows, the same rejected lines with the same reasons, the same ledger."""

from __future__ import annotations

import shutil
from datetime import UTC, date, datetime
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2_assets.core import asx, decode, vendor_scan

SESSIONS = [date(2014, 3, d) for d in range(10, 15)]
NOW = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
COMPANY = "7181"


def loads(data: Path, kind: str, sessions, monkeypatch, scanner: bool) -> list:
    """Every session's load of `kind`, decoded with or without the scanner (a cold cache either way)."""
    with monkeypatch.context() as patch:
        if not scanner:
            patch.setattr(vendor_scan, "lib", None)
        asx._decode_file.cache_clear()
        try:
            return [asx.load_session(data, day, kind, source=f"asx_{kind}", now=NOW) for day in sessions]
        finally:
            asx._decode_file.cache_clear()


def assert_same(fast: list, slow: list) -> None:
    for one, other in zip(fast, slow, strict=True):
        assert one.rows.equals(other.rows)
        assert one.rejected.equals(other.rejected)
        assert one.files == other.files


def test_the_scanner_is_built_and_takes_every_file_of_the_real_sample(asx_dir):
    assert vendor_scan.available(), "k2_assets/core/_vendor_scan was not built: run `make install`"
    for kind in ("trades", "quotes"):
        for path in asx.vendor_files(asx_dir, kind):
            assert asx._scanned(path.read_bytes(), kind) is not None, path


@pytest.mark.parametrize("kind", ["trades", "quotes"])
def test_loads_with_the_scanner_equal_loads_without_it_on_the_real_sample(asx_dir, kind, monkeypatch):
    fast = loads(asx_dir, kind, SESSIONS, monkeypatch, scanner=True)
    assert sum(batch.rows.num_rows for batch in fast) > 100_000
    assert_same(fast, loads(asx_dir, kind, SESSIONS, monkeypatch, scanner=False))


def test_message_ids_are_the_prefix_and_the_sequence():
    numbers = pa.array([1, 9, 10, 99, 100, 12345, 2**62], pa.int64())
    assert vendor_scan.prefixed_numbers("ASX:RIO:20140310:", numbers).to_pylist() == [
        f"ASX:RIO:20140310:{n}" for n in numbers.to_pylist()
    ]
    assert vendor_scan.prefixed_numbers("x", pa.array([], pa.int64())).to_pylist() == []


# Valid lines, and fields one step off the strict shape: a file of valid lines with one such field in it goes down
# the Arrow path, so both paths are drawn.
number = st.text("0123456789", min_size=1, max_size=10)
valid = {
    "date": st.dates(date(2014, 1, 1), date(2014, 3, 20)).filter(lambda d: d.weekday() < 5).map(lambda d: d.strftime("%m/%d/%Y")),
    "clock": st.builds(
        lambda h, m, s, f: f"{h:02d}:{m:02d}:{s:02d}" + (f".{f}" if f else ""),
        st.integers(0, 23),
        st.integers(0, 59),
        st.integers(0, 59),
        st.text("0123456789", max_size=6),
    ),
    "decimal": st.builds(
        lambda whole, point, fraction, zeros: whole + (f".{fraction}{zeros}" if point else ""),
        number,
        st.booleans(),
        st.text("0123456789", max_size=8),
        st.text("0", max_size=3),
    ),
    "text": st.text(st.characters(min_codepoint=32, max_codepoint=126, exclude_characters=","), max_size=4),
}
off = {
    "date": st.sampled_from(["02/30/2014", "13/01/2014", "3/10/2014", "03/10/14", "01/01/0000", "", "03/08/2014", "12/31/2013"]),
    "clock": st.sampled_from(["10:00", "1:00:00", "10:00:00.", "24:00:00", "10:60:00", "10:00:00.1234567", "", "10:00:00 "]),
    "decimal": st.sampled_from(["0", "0.000", "-1", "+1", "1e5", ".5", "12345678901", "1.000000001", "", "1,5", "１"]),
    "text": st.sampled_from(["é", "\t", "\r", "a,b", "\x00", "\x7f"]),
}
KINDS = {"trades": ["date", "clock", "decimal", "decimal", "text", "text", "text"], "quotes": ["date", "clock"] + ["decimal"] * 4}


@st.composite
def vendor_file(draw, kind: str) -> bytes:
    fields = KINDS[kind]
    lines = [list(draw(st.tuples(*(valid[f] for f in fields)))) for _ in range(draw(st.integers(1, 30)))]
    if kind == "quotes":  # a side is whole (price and size) or empty (both zero)
        for line in lines:
            for price, size in ((2, 4), (3, 5)):
                if draw(st.booleans()):
                    line[price] = line[size] = "0"
                elif float(line[price]) == 0 or float(line[size]) == 0:
                    line[price] = line[size] = "1"
    elif any(float(value) == 0 for line in lines for value in line[2:4]):
        lines = [line[:2] + ["1", "1"] + line[4:] for line in lines]
    if draw(st.booleans()):
        line = draw(st.sampled_from(lines))
        at = draw(st.integers(0, len(fields) - 1))
        line[at] = draw(off[fields[at]])
    ending = draw(st.sampled_from(["\r\n", "\n"]))
    return (ending.join(",".join(line) for line in lines) + draw(st.sampled_from([ending, ""]))).encode()


@settings(max_examples=300, deadline=None)
@given(
    qualifiers=st.lists(st.one_of(st.none(), st.sampled_from(["", "0", "25", "1 3", " 9", "9 ", "\u00a02", "\t"]), st.text())),
    start=st.integers(0, 3),
)
def test_trade_conditions_of_any_qualifiers_are_those_of_the_general_split(qualifiers, start):
    """The one-code fast path gives what trimming and splitting each distinct qualifier gives, sliced arrays too."""
    column = pa.array(qualifiers, pa.string()).slice(min(start, len(qualifiers)))
    assert asx.trade_conditions(column).equals(decode.by_unique(column, asx._conditions))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["trades", "quotes"]), data=st.data())
def test_any_file_decodes_the_same_with_the_scanner_as_without_it(asx_dir, tmp_path_factory, monkeypatch, kind, data):
    body = data.draw(vendor_file(kind))
    folder = tmp_path_factory.mktemp("asx")
    shutil.copytree(asx_dir / "reference-data", folder / "reference-data")
    (folder / kind).mkdir()
    (folder / kind / f"{COMPANY}.csv").write_bytes(body)
    scanned = asx._scanned(body, kind)
    ledger, decoded = asx._open(
        folder / kind / f"{COMPANY}.csv", f"{kind}/{COMPANY}.csv", kind, asx.read_companies(folder)[COMPANY]
    )
    sessions = sorted(set(decoded.session.to_pylist()))
    fast = loads(folder, kind, sessions, monkeypatch, scanner=True)
    slow = loads(folder, kind, sessions, monkeypatch, scanner=False)
    assert_same(fast, slow)
    if scanned is not None:  # the scanner takes a file only if no line of it is rejected
        assert sum(batch.rejected.num_rows for batch in slow) == 0
