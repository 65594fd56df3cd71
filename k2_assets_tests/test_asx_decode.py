"""ASX vendor files decoded without Dagster: counts, times, sequences and rejects on the real sample."""

from __future__ import annotations

import collections
import multiprocessing
import re
import shutil
from datetime import UTC, date, datetime
from decimal import Decimal

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2_assets.core import asx, decode
from k2_assets_tests.conftest import vendor_rows

SESSIONS = [date(2014, 3, d) for d in range(10, 15)]
SYMBOLS = {"3153": "MWR", "7078": "BHP", "7181": "DVN", "7458": "RIO"}


def expected_counts(asx_dir, kind):
    counts = collections.Counter()
    for company, symbol in SYMBOLS.items():
        for row in vendor_rows(asx_dir / kind / f"{company}.csv"):
            month, day, year = row[0].split("/")
            counts[(symbol, date(int(year), int(month), int(day)))] += 1
    return counts


@pytest.mark.parametrize("kind", ["trades", "quotes"])
def test_every_source_row_is_decoded_per_symbol_and_session(asx_dir, kind):
    expected = expected_counts(asx_dir, kind)
    got = collections.Counter()
    for session in SESSIONS:
        batch = asx.load_session(asx_dir, session, kind, source=f"asx_{kind}")
        assert batch.read == batch.rows.num_rows + batch.rejected.num_rows
        for symbol, n in collections.Counter(batch.rows.column("symbol").to_pylist()).items():
            got[(symbol, session)] += n
        assert batch.rejected.num_rows == 0  # the real sample has no malformed rows
    assert got == expected
    assert sum(got.values()) == {"trades": 200_545, "quotes": 169_629}[kind]


def test_sydney_local_time_becomes_utc_and_session_date_is_sydney_date(asx_dir):
    batch = asx.load_session(asx_dir, date(2014, 3, 10), "trades", source="asx_trades")
    bhp = batch.rows.filter(pc.equal(batch.rows.column("symbol"), "BHP"))
    first = bhp.slice(0, 1).to_pylist()[0]
    # 03/10/2014,07:57:14.754 in Sydney (AEDT, UTC+11) is the evening before in UTC.
    assert first["exchange_timestamp"] == datetime(2014, 3, 9, 20, 57, 14, 754000, tzinfo=UTC)
    assert first["trade_date"] == date(2014, 3, 10)
    assert first["price"] == Decimal("36.667") and first["quantity"] == Decimal("20000")
    assert first["trade_conditions"] == ["3"] and first["venue"] == "X"
    assert first["source_file"] == "trades/7078.csv" and first["source_row"] == 1
    assert first["message_id"] == "ASX:BHP:20140310:1" and first["source_sequence"] == 1
    assert dict(first["vendor_data"]) == {"company_id": "7078", "isin": "AU000000BHP4"}
    assert set(batch.rows.column("currency").to_pylist()) == {"AUD"}
    assert set(batch.rows.column("side").to_pylist()) == {"UNKNOWN"}


def test_sequences_restart_each_session_and_follow_vendor_order(asx_dir):
    for session in SESSIONS[:2]:
        batch = asx.load_session(asx_dir, session, "trades", source="asx_trades")
        for symbol in ("BHP", "RIO"):
            rows = batch.rows.filter(pc.equal(batch.rows.column("symbol"), symbol))
            seq = rows.column("source_sequence").to_pylist()
            lines = rows.column("source_row").to_pylist()
            assert sorted(seq) == list(range(1, len(seq) + 1))
            by_seq = [line for _, line in sorted(zip(seq, lines))]
            assert by_seq == sorted(lines)  # sequence order is file order


def test_exact_repeats_are_separate_fills_with_their_own_ids(asx_dir):
    """DVN has 232 rows of which 3 repeat an earlier row exactly: all 232 are kept (see docs/asx.md)."""
    rows = []
    for session in SESSIONS:
        batch = asx.load_session(asx_dir, session, "trades", source="asx_trades")
        rows += batch.rows.filter(pc.equal(batch.rows.column("symbol"), "DVN")).to_pylist()
    assert len(rows) == 232
    assert len({r["message_id"] for r in rows}) == 232
    key = collections.Counter((r["exchange_timestamp"], r["price"], r["quantity"], tuple(r["trade_conditions"])) for r in rows)
    assert sum(n - 1 for n in key.values() if n > 1) == 3


def test_price_in_the_buyer_id_column_is_kept_uninterpreted(asx_dir):
    found = 0
    for session in SESSIONS:
        batch = asx.load_session(asx_dir, session, "trades", source="asx_trades")
        bhp = batch.rows.filter(pc.equal(batch.rows.column("symbol"), "BHP"))
        values = pc.map_lookup(bhp.column("vendor_data"), "buyer_id_price", "first")
        found += pc.sum(pc.is_valid(values)).as_py()
        assert pc.sum(pc.is_valid(pc.map_lookup(bhp.column("vendor_data"), "buyer_id", "first"))).as_py() == 0
    assert found == 71


def test_one_sided_quotes_have_a_null_side(asx_dir):
    batch = asx.load_session(asx_dir, date(2014, 3, 10), "quotes", source="asx_quotes")
    first_bhp = batch.rows.filter(pc.equal(batch.rows.column("symbol"), "BHP")).slice(0, 1).to_pylist()[0]
    # 03/10/2014,05:43:45.676,37.7,0.0,300,0: a bid of 300 at 37.70 and no ask.
    assert first_bhp["bid_price"] == Decimal("37.7") and first_bhp["bid_quantity"] == Decimal("300")
    assert first_bhp["ask_price"] is None and first_bhp["ask_quantity"] is None


BAD_LINES = {
    "03/10/2014,10:30:00.000,36.123456789,100,0,,": "price 36.123456789 does not fit decimal(18,8) without rounding",
    "03/10/2014,10:30:00.000,abc,100,0,,": "price 'abc' is not a number",
    "03/10/2014,10:30:00.000,36.50,0,0,,": "volume 0 must be greater than zero",
    "03/10/2014,10:30:00.000,-36.50,10,0,,": "price -36.50 is negative",
    "03/10/2014,10:30:00.000,36.50,10,0,": "expected 7 comma-separated fields, found 6",
    "03/10/2014,25:61:00.000,36.50,10,0,,": "time '25:61:00.000' is not a HH:MM:SS.mmm time",
    "02/30/2014,10:30:00.000,36.50,10,0,,": "date '02/30/2014' is not a MM/DD/YYYY date",
    "": "expected 7 comma-separated fields, found 1",
}


def bad_copy(asx_dir, tmp_path):
    """The real BHP file with one bad line of each kind inserted after line 100."""
    data = tmp_path / "asx"
    shutil.copytree(asx_dir / "reference-data", data / "reference-data")
    (data / "trades").mkdir()
    lines = (asx_dir / "trades" / "7078.csv").read_bytes().decode().split("\r\n")
    lines[100:100] = list(BAD_LINES)
    (data / "trades" / "7078.csv").write_bytes("\r\n".join(lines).encode())
    return data


def test_bad_rows_are_rejected_with_reasons_and_counts_reconcile(asx_dir, tmp_path):
    data = bad_copy(asx_dir, tmp_path)
    batch = asx.load_session(data, date(2014, 3, 10), "trades", source="asx_trades")
    expected_good = sum(1 for r in vendor_rows(asx_dir / "trades" / "7078.csv") if r[0] == "03/10/2014")
    assert batch.rows.num_rows == expected_good
    assert batch.read == expected_good + len(BAD_LINES)
    rejected = batch.rejected.to_pylist()
    assert {r["reason"] for r in rejected} == set(BAD_LINES.values())
    for r in rejected:
        assert BAD_LINES[r["raw"].decode()] == r["reason"]
        assert 101 <= r["source_row"] <= 100 + len(BAD_LINES)
        assert r["source_file"] == "trades/7078.csv" and r["symbol"] == "BHP" and r["source"] == "asx_trades"
    # Rejected rows keep their place in the sequence: the row after them is numbered as in the file.
    after = batch.rows.filter(pc.equal(batch.rows.column("source_row"), 101 + len(BAD_LINES))).to_pylist()[0]
    assert after["source_sequence"] == 101 + len(BAD_LINES)
    # No other session sees them.
    other = asx.load_session(data, date(2014, 3, 11), "trades", source="asx_trades")
    assert other.rejected.num_rows == 0


def one_trades_file(asx_dir, tmp_path, source: str, name: str):
    """A vendor directory holding one trades file: the sample's `source`, saved as `name`; its 2014-03-10 load."""
    data = tmp_path / "asx"
    shutil.copytree(asx_dir / "reference-data", data / "reference-data")
    (data / "trades").mkdir()
    shutil.copy(asx_dir / "trades" / source, data / "trades" / name)
    return asx.load_session(data, date(2014, 3, 10), "trades", source="asx_trades")


def test_unknown_company_rejects_its_rows(asx_dir, tmp_path):
    batch = one_trades_file(asx_dir, tmp_path, "7181.csv", "9999.csv")
    assert batch.rows.num_rows == 0 and batch.rejected.num_rows == 19
    assert set(batch.rejected.column("reason").to_pylist()) == {"company id 9999 is not in reference-data/company_info.csv"}


def test_an_upper_case_extension_is_loaded_like_any_other(asx_dir, tmp_path):
    batch = one_trades_file(asx_dir, tmp_path, "7078.csv", "7078.CSV")
    expected = sum(1 for r in vendor_rows(asx_dir / "trades" / "7078.csv") if r[0] == "03/10/2014")
    assert batch.rows.num_rows == expected > 0 and [f.path for f in batch.files] == ["trades/7078.CSV"]


DAY_MICROS = 86_400_000_000
EPOCH = date(1970, 1, 1)
# Days on which these zones change offset: at 02:00/03:00 (Sydney), by 30 minutes (Lord Howe), at midnight
# (Havana, Sao Paulo's last DST), and the day Apia skipped whole.
CHANGE_DAYS = [
    date(2014, 4, 6),
    date(2014, 10, 5),
    date(2014, 3, 9),
    date(2014, 11, 2),
    date(2018, 11, 4),
    date(2019, 2, 17),
    date(2011, 12, 30),
    date(2011, 12, 29),
    date(2011, 12, 31),
]
ZONES = ["Australia/Sydney", "Australia/Lord_Howe", "America/Havana", "America/Sao_Paulo", "Pacific/Apia", "Asia/Kolkata", "UTC"]
day = st.one_of(
    st.integers((date(1900, 1, 1) - EPOCH).days, (date(2100, 1, 1) - EPOCH).days),
    st.sampled_from([(d - EPOCH).days + shift for d in CHANGE_DAYS for shift in (-1, 0, 1)]),
)
clock = st.one_of(st.integers(0, DAY_MICROS - 1), st.sampled_from([0, 1, 3_600_000_000, 7_200_000_000, DAY_MICROS - 1]))


@settings(max_examples=400, deadline=None)
@given(rows=st.lists(st.tuples(day, clock), min_size=1, max_size=50), tz=st.sampled_from(ZONES))
def test_local_times_convert_exactly_as_the_time_zone_database_says(rows, tz):
    """The per-day offset shortcut gives, row for row, what Arrow's assume_timezone gives: across DST changes at
    night, at midnight, by half an hour, a skipped day, and dates from 1900 to 2100."""
    days = pa.array([d for d, _ in rows], pa.int32()).cast(pa.date32())
    clocks = pa.array([c for _, c in rows], pa.int64())
    local = pc.cast(pc.add(pc.multiply(pc.cast(pc.cast(days, pa.int32()), pa.int64()), DAY_MICROS), clocks), pa.timestamp("us"))
    expected = pc.assume_timezone(local, timezone=tz, ambiguous="earliest", nonexistent="earliest")
    assert decode.local_to_utc(days, clocks, tz).equals(expected)


def python_us_date(text: str) -> date | None:
    if re.fullmatch(r"\d{2}/\d{2}/\d{4}", text) is None:
        return None
    try:
        return date(int(text[6:]), int(text[:2]), int(text[3:5]))
    except ValueError:
        return None


def python_clock_micros(text: str) -> int | None:
    match = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d):([0-5]\d)(?:\.(\d{1,6}))?", text)
    if match is None:
        return None
    hh, mm, ss, fraction = match.groups()
    return ((int(hh) * 60 + int(mm)) * 60 + int(ss)) * 1_000_000 + int((fraction or "0").ljust(6, "0"))


def runs(values: st.SearchStrategy[str]) -> st.SearchStrategy[list[str]]:
    """Runs of equal values, as vendor files have them."""
    return st.lists(st.tuples(values, st.integers(1, 4)), max_size=30).map(
        lambda runs: [text for text, count in runs for _ in range(count)]
    )


# Mostly the vendor's shape with out-of-range fields (month 13, 02/30, second 60); sometimes another width or
# a wrong separator, which sends the whole column down the general path.
shaped_dates = st.builds(
    "{:02d}/{:02d}/{:04d}".format,
    st.sampled_from([0, 1, 2, 12, 13]),
    st.sampled_from([0, 1, 28, 29, 30, 31, 32]),
    st.sampled_from([0, 1999, 2014, 2016, 2100]),
)
odd_dates = st.sampled_from(["", "1/2/2014", "02-28-2014", "0a/01/2014", "02/29/2016 "])
us_dates = st.one_of(runs(shaped_dates), runs(st.one_of(shaped_dates, odd_dates)))
shaped_clocks = st.builds(
    "{:02d}:{:02d}:{:02d}.{:03d}".format, st.integers(0, 25), st.integers(0, 61), st.integers(0, 61), st.integers(0, 999)
)
odd_clocks = st.sampled_from(["", "10:00:00", "23:59:59.999999", "1:00:00.000", "10-00-00.000", "10:00:00,000", "1a:00:00.000"])
clocks = st.one_of(runs(shaped_clocks), runs(st.one_of(shaped_clocks, odd_clocks)))


@settings(max_examples=300, deadline=None)
@given(values=us_dates)
def test_us_dates_parse_as_the_calendar_says(values):
    """MM/DD/YYYY parsing (by runs of equal values when every value is 10 bytes) gives the calendar's date or null."""
    got = decode.parse_us_date(pa.array(values, pa.string())).to_pylist()
    assert got == [python_us_date(v) for v in values]


@settings(max_examples=300, deadline=None)
@given(values=clocks)
def test_clock_times_parse_to_exact_microseconds(values):
    """HH:MM:SS[.ffffff] parsing (as a byte matrix when every value is HH:MM:SS.mmm) gives exact microseconds or null."""
    got = decode.parse_clock_micros(pa.array(values, pa.string())).to_pylist()
    assert got == [python_clock_micros(v) for v in values]


@settings(deadline=None)
@given(
    entries=st.dictionaries(st.sampled_from(["company_id", "isin", "buyer_id"]), st.one_of(st.none(), st.text(max_size=5))),
    n=st.integers(0, 40),
)
def test_constant_columns_equal_arrows_own(entries, n):
    """The byte-built constant columns equal what Arrow's repeat and take give."""
    keys = list(entries)
    one = decode.string_map(keys, [pa.array([entries[k]], pa.string()) for k in keys], 1) if keys else None
    expected = one.take(pa.array([0] * n, pa.int32())) if one is not None else pa.array([[]] * n, decode.STRING_MAP)
    assert decode.constant_map(entries, n).equals(expected)
    for value in entries.values():
        if value is not None:
            assert decode.repeated(value, n).equals(pa.repeat(pa.scalar(value, pa.string()), n))


@settings(deadline=None)
@given(pattern=st.lists(st.text(max_size=6), max_size=4), n=st.integers(0, 50))
def test_tiled_text_is_the_pattern_n_times(pattern, n):
    """Columns built from bytes hold, in order, exactly the pattern's strings n times over (empty, multi-byte, any)."""
    assert decode.tiled(pattern, n).to_pylist() == pattern * n


@settings(deadline=None)
@given(data=st.data(), n=st.integers(0, 40))
def test_patched_rows_replace_exactly_the_rows_at_their_positions(data, n):
    base = [[("k", str(i))] for i in range(n)]
    positions = sorted(data.draw(st.sets(st.integers(0, n - 1), max_size=n)) if n else [])
    patches = [[("p", str(i)), ("q", "")] for i in range(len(positions))]
    got = decode.patched(pa.array(base, decode.STRING_MAP), pa.array(positions, pa.int64()), pa.array(patches, decode.STRING_MAP))
    expected = list(base)
    for position, patch in zip(positions, patches):
        expected[position] = patch
    assert got.to_pylist() == [list(row) for row in expected]


buyer_values = st.one_of(st.just(""), st.sampled_from(["36.5", "0.0001", "ABC123", " ", "1e5", "07"]), st.text(max_size=4))


def python_vendor_data(company: asx.Company, buyer: str) -> list[tuple[str, str]]:
    """A trade's vendor_data, as docs/asx.md states it: the company's id and ISIN, and a BuyerID kept apart as a
    price when it reads as one (the keys in that order; a missing value leaves its key out)."""
    entries = [("company_id", company.company_id)] + ([("isin", company.isin)] if company.isin is not None else [])
    if buyer:
        is_price = re.match(decode.DECIMAL_PATTERN, buyer, re.ASCII) is not None
        entries.append(("buyer_id_price" if is_price else "buyer_id", buyer))
    return entries


@settings(deadline=None, max_examples=60)
@given(
    buyers=st.one_of(
        st.lists(buyer_values, max_size=60),
        # Past MAX_PATCHES filled rows the map is built per distinct value instead.
        st.integers(asx.MAX_PATCHES - 2, asx.MAX_PATCHES + 3).map(lambda n: ["36.5", "X"] * (n // 2) + [""] * 5),
    ),
    isin=st.one_of(st.none(), st.just(""), st.just("AU000000BHP4")),
)
def test_vendor_data_holds_the_company_and_any_buyer_id(buyers, isin):
    """Both ways of building vendor_data (one shared map patched at the filled BuyerIDs, or a map per distinct value)
    give each trade exactly its company, its ISIN and its BuyerID, a price kept apart."""
    company = asx.Company("7078", "BHP", isin, "BHP GROUP")
    got = asx._vendor_data(company, pa.array(buyers, pa.string()))
    assert got.type == decode.STRING_MAP
    assert got.to_pylist() == [python_vendor_data(company, buyer) for buyer in buyers]


@settings(deadline=None)
@given(days=st.lists(st.integers(16_000, 16_010), max_size=40))
def test_a_sessions_lines_are_every_line_it_owns_in_file_order(days):
    sessions = pa.array(days, pa.int32()).cast(pa.date32())
    decoded = asx._Decoded(rows=None, session=sessions, columns={})
    for day in set(days) | {15_999}:
        session_date = date.fromordinal(date(1970, 1, 1).toordinal() + day)
        assert decoded.lines_of(session_date).to_pylist() == [i for i, d in enumerate(days) if d == day]


def _load_in_child(asx_dir, out):
    asx._decode_file.cache_clear()
    out.put(asx.load_session(asx_dir, SESSIONS[1], "trades", source="asx_trades").rows.num_rows)


def test_a_forked_process_loads_with_its_own_decode_threads(asx_dir):
    """The decode pool lives for the process; a child forked after it started (a run worker, a merge child) gets
    threads of its own rather than waiting on its parent's, which it does not have."""
    expected = asx.load_session(asx_dir, SESSIONS[1], "trades", source="asx_trades").rows.num_rows
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    child = context.Process(target=_load_in_child, args=(asx_dir, out))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0, "the forked load did not finish"
    assert out.get(timeout=5) == expected


def test_each_file_name_is_its_rows_source_file_even_for_the_same_bytes(asx_dir, tmp_path):
    """Two names for one file's bytes (a vendor's 7078.CSV beside a 7078.csv) are two files: each one's rows carry
    its own name, though the decode of the bytes is shared."""
    shutil.copytree(asx_dir / "reference-data", tmp_path / "reference-data")
    (tmp_path / "trades").mkdir()
    (tmp_path / "trades" / "7078.csv").write_bytes((asx_dir / "trades" / "7078.csv").read_bytes())
    (tmp_path / "trades" / "7078.CSV").symlink_to(tmp_path / "trades" / "7078.csv")
    batch = asx.load_session(tmp_path, SESSIONS[0], "trades", source="asx_trades")
    names = collections.Counter(batch.rows.column("source_file").to_pylist())
    assert set(names) == {"trades/7078.csv", "trades/7078.CSV"} and len(set(names.values())) == 1
    assert set(batch.rows.column("trade_date").to_pylist()) == {SESSIONS[0]}
    assert set(batch.rows.column("symbol").to_pylist()) == {"BHP"}
