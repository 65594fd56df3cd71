"""trade_class and price_forming of ASX trades: the counts docs/asx.md states, its BHP example, and the rule."""

from __future__ import annotations

import collections
import shutil
import tempfile
from datetime import date, time
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2_assets.core import asx
from k2_assets_tests.conftest import REPO, vendor_rows

SESSIONS = [date(2014, 3, d) for d in range(10, 15)]
CLASSES = ("OFF_MARKET", "PRE_OPEN", "OPENING", "CONTINUOUS", "PRE_CLOSE", "CLOSING_AUCTION", "AFTER_CLOSE")
PRICE_FORMING = {"OPENING", "CONTINUOUS", "CLOSING_AUCTION"}
NEVER_PRICE_FORMING = {"OFF_MARKET", "PRE_OPEN", "AFTER_CLOSE"}
# The rule as docs/asx.md states it, written out again here so the decoder's constants are checked too.
PHASES = (
    (time(9, 59, 45), "OPENING"),
    (time(10, 9, 15), "CONTINUOUS"),
    (time(16, 0, 1), "PRE_CLOSE"),
    (time(16, 10), "CLOSING_AUCTION"),
    (time(16, 11, 1), "AFTER_CLOSE"),
)
DAY_MICROS = 86_400 * 1_000_000
CODES = ("0", "1", "2", "3", "5", "8", "9", "10", "25", "26", "27")  # every qualifier the sample has


def micros(t: time) -> int:
    return ((t.hour * 60 + t.minute) * 60 + t.second) * 1_000_000 + t.microsecond


def expected_class(clock: int, codes: list[str], venue: str) -> str:
    if venue == "X" or {"1", "3", "9"} & set(codes):
        return "OFF_MARKET"
    found = "PRE_OPEN"
    for start, name in PHASES:
        if clock >= micros(start):
            found = name
    return found


def doc_counts() -> dict[str, dict[str, int]]:
    """docs/asx.md's table of trades per class, per file (and "total"), from its "Price-forming trades" section."""
    section = (REPO / "docs" / "asx.md").read_text().split("\n## Price-forming trades\n", 1)[1].split("\n## ", 1)[0]
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")] for line in section.splitlines() if line.startswith("|")
    ]
    header = next(row for row in rows if row[0] == "file")
    table = {}
    for row in rows:
        if row[0].startswith("trades/") or row[0] == "total":
            table[row[0]] = {name: int(value.replace(",", "")) for name, value in zip(header[2:], row[2:])}
    return table


@pytest.fixture(scope="module")
def trades(asx_dir) -> pa.Table:
    return pa.concat_tables(asx.load_session(asx_dir, day, "trades", source="asx_trades").rows for day in SESSIONS)


def counts_by_file(trades: pa.Table) -> dict[str, dict[str, int]]:
    counts = collections.defaultdict(lambda: dict.fromkeys((*CLASSES, "price-forming", "all"), 0))
    columns = (trades.column(name).to_pylist() for name in ("source_file", "trade_class", "price_forming"))
    for source_file, trade_class, forming in zip(*columns):
        for key in (source_file, "total"):
            counts[key][trade_class] += 1
            counts[key]["price-forming"] += forming
            counts[key]["all"] += 1
    return dict(counts)


def test_class_counts_are_those_docs_asx_md_states(trades):
    documented = doc_counts()
    assert set(documented) == {"trades/3153.csv", "trades/7078.csv", "trades/7181.csv", "trades/7458.csv", "total"}
    assert counts_by_file(trades) == documented
    assert documented["total"]["all"] == 200_545  # every row of the sample, as test_asx_decode counts them


def test_every_real_trade_has_one_class_and_price_forming_follows_it(trades):
    classes = trades.column("trade_class").to_pylist()
    forming = trades.column("price_forming").to_pylist()
    assert set(classes) <= set(CLASSES) and None not in forming
    assert all(f == (c in PRICE_FORMING) for c, f in zip(classes, forming))


def test_venue_x_and_qualifiers_1_3_9_are_off_market(trades):
    off = trades.column("trade_class").to_pylist()
    venue_x = trades.column("venue").to_pylist()
    codes = trades.column("trade_conditions").to_pylist()
    # In the sample, venue X and qualifiers 1, 3, 9 always go together.
    assert [c == "OFF_MARKET" for c in off] == [v == "X" for v in venue_x] == [bool({"1", "3", "9"} & set(q)) for q in codes]


def test_bhp_2014_03_11_bar_comes_from_on_market_trades_only(asx_dir, trades):
    bhp = trades.filter(
        pc.and_(pc.equal(trades.column("symbol"), "BHP"), pc.equal(trades.column("trade_date"), date(2014, 3, 11)))
    )
    bhp = bhp.sort_by([("exchange_timestamp", "ascending"), ("source_sequence", "ascending")])
    forming = bhp.filter(bhp.column("price_forming"))
    # The on-market range, read from the vendor file without K2's decoder: blank venue, 10:00:00 to
    # 16:00:00 with the opening auction's 15 s before and 1 s of reporting after.
    on_market = [
        Decimal(row[2])
        for row in vendor_rows(asx_dir / "trades" / "7078.csv")
        if row[0] == "03/11/2014" and row[5] == "" and "09:59:45" <= row[1] < "16:00:01"
    ]
    prices = forming.column("price").to_pylist()
    assert (min(prices), max(prices)) == (min(on_market), max(on_market)) == (Decimal("35.84"), Decimal("36.45"))
    assert (prices[0], prices[-1]) == (Decimal("35.95"), Decimal("35.95"))  # docs/asx.md: open and close
    every_price = bhp.column("price").to_pylist()  # the bar before K2 classified trades
    assert (every_price[0], max(every_price), min(every_price)) == (Decimal("40"), Decimal("42"), Decimal("35.772"))
    assert bhp.num_rows - forming.num_rows == 28


def test_off_market_pre_open_and_after_close_trades_never_form_prices(trades):
    for trade_class, forming in zip(trades.column("trade_class").to_pylist(), trades.column("price_forming").to_pylist()):
        assert not (trade_class in NEVER_PRICE_FORMING and forming)


# Times of day near every boundary, where an off-by-one would show.
EDGES = [micros(start) + delta for start, _ in PHASES for delta in (-1_000, -1, 0, 1, 1_000)] + [0, DAY_MICROS - 1]
clock = st.one_of(st.integers(0, DAY_MICROS - 1), st.sampled_from(EDGES))
codes = st.lists(st.one_of(st.sampled_from(CODES), st.text("0123456789", min_size=1, max_size=3)), max_size=3)
venue = st.one_of(st.sampled_from(["", "X"]), st.text(max_size=2))


@given(st.lists(st.tuples(clock, codes, venue), min_size=1, max_size=60))
@settings(max_examples=300, deadline=None)
def test_classify_gives_each_trade_one_class_and_forms_prices_only_in_the_auctions_and_continuous_trading(rows):
    clocks, conditions, venues = zip(*rows)
    classes, forming = asx.classify(
        pa.array(clocks, pa.int64()), pa.array(conditions, pa.list_(pa.string())), pa.array(venues, pa.string())
    )
    assert len(classes) == len(forming) == len(rows)
    for (t, c, v), trade_class, price_forming in zip(rows, classes.to_pylist(), forming.to_pylist()):
        assert trade_class in CLASSES
        assert price_forming is (trade_class in PRICE_FORMING)
        assert trade_class == expected_class(t, c, v)


def vendor_line(clock_micros: int, codes: list[str], venue: str) -> str:
    seconds, fraction = divmod(clock_micros // 1_000, 1_000)
    minutes, second = divmod(seconds, 60)
    hour, minute = divmod(minutes, 60)
    return f"03/11/2014,{hour:02d}:{minute:02d}:{second:02d}.{fraction:03d},36.5,100,{' '.join(codes)},{venue},"


@given(st.lists(st.tuples(clock, codes, st.sampled_from(["", "X"])), min_size=1, max_size=40))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_the_decoder_classifies_every_trade_of_a_vendor_file(asx_dir, rows):
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch)
        shutil.copytree(asx_dir / "reference-data", data / "reference-data")
        (data / "trades").mkdir()
        body = "\r\n".join(vendor_line(*row) for row in rows) + "\r\n"
        (data / "trades" / "7078.csv").write_bytes(body.encode())
        batch = asx.load_session(data, date(2014, 3, 11), "trades", source="asx_trades")
    assert batch.rows.num_rows == len(rows) and batch.rejected.num_rows == 0
    got = zip(batch.rows.column("trade_class").to_pylist(), batch.rows.column("price_forming").to_pylist())
    for (t, c, v), (trade_class, price_forming) in zip(rows, got):
        assert trade_class == expected_class(t // 1_000 * 1_000, c, v)  # the vendor prints milliseconds
        assert price_forming is (trade_class in PRICE_FORMING)
