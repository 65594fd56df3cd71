"""ASX vendor files -> v2 trades and quotes for one session date.

Layout of a data directory (the vendor's, as delivered):
    reference-data/company_info.csv   company_id,symbol,company_name,ISIN,start_date,end_date (header)
    trades/<company_id>.csv           Date,Time,Price,Volume,Qualifiers,Venue,BuyerID (no header, CRLF)
    quotes/<company_id>.csv           Date,Time,Bid,Ask,BidVol,AskVol (no header, CRLF)
Dates are MM/DD/YYYY and times are Sydney local; the session date is the vendor's Date column.

Decisions (docs/asx.md explains them with the evidence):
- ASX publishes no sequence number. source_sequence is the 1-based position of the row among the
  file's rows for that session date, in vendor order, counting rejected rows too, so ids never shift
  when a rejection rule changes and a rejected row shows as an explained hole.
- Rows that repeat an earlier row exactly are separate fills (one order matched against several
  resting orders of the same size in the same millisecond), not vendor duplicates: they are kept,
  each with its own sequence and message_id.
- The BuyerID column never holds a buyer id in the sample; in some rows it holds a price. K2 keeps
  the trade and preserves that value uninterpreted as vendor_data["buyer_id_price"].
- A quote side printed as price 0 with size 0 is an empty side (null), not a zero price.
- A line dated on no session (a weekend, before the first session) is rejected by the session that owns
  it, the one of the line before it in the file (see _owner_sessions), so no line is ever in no partition.
- Every trade gets a trade_class (OFF_MARKET, or the session phase of an on-market trade) and
  price_forming: only the auctions and continuous trading form prices (see classify).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import date, datetime, time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from k2_assets.core import decode, schemas, vendor_scan
from k2_assets.core.decode import DECIMAL, Batch, Rows
from k2_assets.core.source_files import SourceFile, describe, file_rejects
from k2_assets.core.text import one_line

EXCHANGE = "ASX"
TIMEZONE = "Australia/Sydney"
CURRENCY = "AUD"
TRADE_FIELDS = ("date", "time", "price", "volume", "qualifiers", "venue", "buyer_id")
QUOTE_FIELDS = ("date", "time", "bid", "ask", "bid_volume", "ask_volume")
LAYOUTS = {"trades": (schemas.TRADE, TRADE_FIELDS), "quotes": (schemas.QUOTE, QUOTE_FIELDS)}  # kind -> contract, fields
# What the compiled scanner reads each field as, for files in the strict vendor shape (vendor_scan.c).
SCANNED = {
    "trades": ("date", "clock", "positive_decimal", "positive_decimal", "text", "text", "text"),
    "quotes": ("date", "clock", "decimal", "decimal", "decimal", "decimal"),
}
MAX_PATCHES = 256  # beyond this many trades with a BuyerID, vendor_data is built per distinct value instead
EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
FIRST_SESSION = date(2014, 1, 1)  # the first session partition (asx_sessions: every weekday from here)
WEEKDAYS = pa.array(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"])

# Off-market trades (crossings, late reports): in the sample, venue X always and only carries these
# qualifiers, at every hour from 07:05 to 17:33, at prices away from the book's.
OFF_MARKET = "OFF_MARKET"
OFF_MARKET_VENUE = "X"
OFF_MARKET_QUALIFIERS = ("1", "3", "9")
# Session phases of on-market trades, by Sydney time; each runs until the next one starts.
# The opening auctions are staggered by symbol group (A-B 10:00:00 ... S-Z 10:09:00), each at a random
# moment within 15 s either side: the sample's first on-market trades are at 09:59:48 (BHP) and 10:06:41 (RIO).
OPENING_STARTS = time(9, 59, 45)
CONTINUOUS_STARTS = time(10, 9, 15)
# Continuous trading ends at 16:00:00; the sample has matches stamped up to 16:00:00.144: 1 s of tolerance.
PRE_CLOSE_STARTS = time(16, 0, 1)
# The closing single price auction runs at 16:10:00 plus a random 0-60 s; again 1 s of tolerance.
CLOSING_AUCTION_STARTS = time(16, 10)
AFTER_CLOSE_STARTS = time(16, 11, 1)
PHASES = (  # (trade_class, starts, price-forming)
    ("PRE_OPEN", time(0), False),
    ("OPENING", OPENING_STARTS, True),
    ("CONTINUOUS", CONTINUOUS_STARTS, True),
    ("PRE_CLOSE", PRE_CLOSE_STARTS, False),
    ("CLOSING_AUCTION", CLOSING_AUCTION_STARTS, True),
    ("AFTER_CLOSE", AFTER_CLOSE_STARTS, False),
)
TRADE_CLASSES = pa.array([name for name, _, _ in PHASES] + [OFF_MARKET])
PRICE_FORMING = pa.array([forming for _, _, forming in PHASES] + [False])
PHASE_STARTS_MICROS = np.array([((t.hour * 60 + t.minute) * 60 + t.second) * 1_000_000 for _, t, _ in PHASES])


@dataclass(frozen=True)
class Company:
    company_id: str
    symbol: str
    isin: str
    name: str


def read_companies(data_dir: Path) -> dict[str, Company]:
    """The vendor's company list; a list that cannot be read stops the load with one line (nothing is written)."""
    path = data_dir / "reference-data" / "company_info.csv"
    try:
        return _companies(path, path.stat().st_mtime_ns)
    except (OSError, pa.ArrowException, KeyError, AttributeError, TypeError) as exc:
        raise ValueError(f"{path} cannot be read as the company list: {one_line(exc)}") from None


@lru_cache(maxsize=8)
def _companies(path: Path, mtime_ns: int) -> dict[str, Company]:
    table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(column_types={"company_id": pa.string()}))
    return {
        row["company_id"]: Company(row["company_id"], row["symbol"].strip().upper(), row["ISIN"], row["company_name"])
        for row in table.to_pylist()
    }


def vendor_files(data_dir: Path, kind: str) -> list[Path]:
    """Every <company_id>.csv of `kind`, whatever the case of its extension: a vendor's 7078.CSV is not skipped."""
    folder = data_dir / kind
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".csv" and p.is_file()) if folder.is_dir() else []


def load_session(data_dir: Path, session_date: date, kind: str, *, source: str, now: datetime | None = None) -> Batch:
    """Decode every company's `kind` ("trades" or "quotes") file for one session date; a file that cannot be
    read is reported (one rejected record, its error in the ledger) and the others load."""
    if kind not in LAYOUTS:
        raise ValueError(f"kind must be trades or quotes, not {kind!r}")
    now = now or decode.utc_now()
    companies = read_companies(data_dir)
    paths = vendor_files(data_dir, kind)
    # Arrow's kernels release the GIL: each company's file is decoded and cut side by side, the largest
    # first, so that no thread is left with a large file after the others have finished.
    futures = {
        path: _pool().submit(_session_part, path, kind, companies.get(path.stem), session_date, source, now)
        for path in sorted(paths, key=_size, reverse=True)
    }
    wait(futures.values())  # all of them, even if one failed: none is left running after the load returns
    parts = [futures[path].result() for path in paths]
    files = [ledger for ledger, _, _ in parts]
    tables = [table for _, table, _ in parts if table is not None]
    rejects = [rejected for _, _, rejected in parts if rejected is not None]
    symbols = {f"{kind}/{p.name}": (companies[p.stem].symbol if p.stem in companies else None) for p in paths}
    rejects.append(file_rejects(files, source=source, partition_date=session_date, exchange=EXCHANGE, now=now, symbols=symbols))
    schema = schemas.arrow_schema(LAYOUTS[kind][0])
    rows_table = pa.concat_tables(tables) if tables else schema.empty_table()
    return Batch(rows_table, pa.concat_tables(rejects), files)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _pool() -> ThreadPoolExecutor:
    """One pool for the process's loads: starting threads for each session costs more than cutting a warm one."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="asx-decode")
        return _executor


def _forget_pool() -> None:
    """In a forked child: none of the parent's threads exist there, and a lock a parent's thread held stays held."""
    global _executor, _executor_lock
    _executor, _executor_lock = None, threading.Lock()


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()
os.register_at_fork(after_in_child=_forget_pool)


def _session_part(
    path: Path, kind: str, company: Company | None, session_date: date, source: str, now: datetime
) -> tuple[SourceFile, pa.Table | None, pa.Table | None]:
    """One file's share of a session: its ledger entry, its rows and its rejected lines (None where there are none)."""
    rel = f"{kind}/{path.name}"
    ledger, decoded = _open(path, rel, kind, company)
    if decoded is None:
        return ledger, None, None
    indices = decoded.lines_of(session_date)
    if len(indices) == 0:
        return ledger, None, None
    if decoded.rows.reasons.null_count == len(decoded.rows):  # no line of the file rejected: skip the split
        accepted, rejected = indices, pa.array([], pa.int64())
        sequence, rejected_sequence = pa.array(np.arange(1, len(indices) + 1, dtype=np.int64)), rejected
    else:
        ok = pc.take(decoded.rows.ok, indices)
        accepted, rejected = pc.filter(indices, ok), pc.filter(indices, pc.invert(ok))
        # Sequence = position among the session's rows in vendor order, rejected rows included.
        sequence = pc.cast(pc.add(pc.indices_nonzero(ok), 1), pa.int64())
        rejected_sequence = pc.cast(pc.add(pc.indices_nonzero(pc.invert(ok)), 1), pa.int64())
    ledger.read, ledger.written, ledger.rejected = len(indices), len(accepted), len(rejected)
    table = rejects = None
    n = len(accepted)
    if n:
        columns = {name: decode.pick(col, accepted) for name, col in decoded.columns.items()}
        ymd = session_date.strftime("%Y%m%d")
        columns.update(
            message_id=vendor_scan.prefixed_numbers(f"{EXCHANGE}:{company.symbol}:{ymd}:", sequence),
            source_sequence=sequence,
            ingest_timestamp=pa.repeat(pa.scalar(now, pa.timestamp("us", tz="UTC")), n),
            source_row=decode.pick(decoded.rows.line_numbers, accepted),
            # Constant per session: built as bytes, for the session's rows only (a file's decode stays cached).
            exchange=decode.repeated(EXCHANGE, n),
            symbol=decode.repeated(company.symbol, n),
            asset_class=decode.repeated("EQUITY", n),
            currency=decode.repeated(CURRENCY, n),
            source_file=decode.repeated(rel, n),
        )
        if kind == "trades":
            columns["side"] = decode.repeated("UNKNOWN", n)
        table = schemas.build_table(LAYOUTS[kind][0], columns, n)
    if len(rejected):
        rejects = decode.rejected_table(
            decoded.rows,
            rejected,
            source=source,
            partition_date=session_date,
            exchange=EXCHANGE,
            symbol=company.symbol if company else None,
            source_file=rel,
            rejected_at=now,
            sequences=rejected_sequence,
        )
    return ledger, table, rejects


def _open(path: Path, rel: str, kind: str, company: Company | None) -> tuple[SourceFile, _Decoded | None]:
    """The file's ledger entry, and its decode unless it cannot be read at all (then the entry says why)."""
    ledger = describe(path, rel)
    if ledger.error is None and ledger.size == 0:
        ledger.error = "the file is empty"
    if ledger.error is not None:
        return ledger, None
    try:
        return ledger, _decode_file(path, ledger.sha256, kind, company)
    except Exception as exc:  # noqa: BLE001 - one file that cannot be decoded must not stop the others
        ledger.error = one_line(exc)
        return ledger, None


@dataclass
class _Decoded:
    rows: Rows
    session: pa.Array
    columns: dict[str, pa.Array]
    # Built on first use; two threads building it at once build equal dicts, and either may be kept.
    _by_session: dict[date, pa.Array] | None = field(default=None, init=False, repr=False, compare=False)

    def lines_of(self, session_date: date) -> pa.Array:
        """Positions of the lines a session owns, in file order (found for every session in one pass)."""
        if self._by_session is None:
            days = self.session.cast(pa.int32()).to_numpy()
            order = np.argsort(days, kind="stable")  # stable: each session's lines stay in file order
            ordered = days[order]
            bounds = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1], True]) if len(days) else np.array([0])
            self._by_session = {
                date.fromordinal(EPOCH_ORDINAL + int(ordered[lo])): pa.array(order[lo:hi].astype(np.int64))
                for lo, hi in zip(bounds[:-1], bounds[1:])
            }
        return self._by_session.get(session_date, pa.array([], pa.int64()))


@lru_cache(maxsize=64)
def _decode_file(path: Path, sha256: str, kind: str, company: Company | None) -> _Decoded:
    """Parse and validate one whole vendor file (cached by content: a backfill meets the same multi-day file per session).
    A file in the strict vendor shape is decoded by the compiled scanner, any other by Arrow, line by line where it must,
    which gives each rejected line its reason; both give the same result for any file (test_vendor_scan.py)."""
    data = path.read_bytes()
    scanned = _scanned(data, kind) if company is not None else None
    if scanned is not None:
        rows, session, clock, values = scanned
        return _Decoded(rows, session, _columns(kind, company, rows, session, clock, values))
    rows = Rows.parse(data, len(LAYOUTS[kind][1]))
    dates = decode.parse_us_date(rows.first_field)
    rows.reject(pc.is_null(dates), "date '", rows.first_field, "' is not a MM/DD/YYYY date")
    session = _owner_sessions(rows, dates)
    if company is None:
        rows.reject(pa.repeat(True, len(rows)), f"company id {path.stem} is not in reference-data/company_info.csv")
        return _Decoded(rows, session, {})
    clock = decode.parse_clock_micros(rows.fields[1])
    rows.reject(pc.is_null(clock), "time '", rows.fields[1], "' is not a HH:MM:SS.mmm time")
    if kind == "trades":
        _, _, price, volume, qualifiers, venue, buyer = rows.fields
        values = [rows.decimal(price, "price"), rows.decimal(volume, "volume"), qualifiers, venue, buyer]
    else:
        _, _, bid, ask, bid_volume, ask_volume = rows.fields
        decimals = {
            name: rows.decimal(text, name, positive=False)
            for name, text in (("bid", bid), ("bid volume", bid_volume), ("ask", ask), ("ask volume", ask_volume))
        }
        values = [decimals["bid"], decimals["ask"], decimals["bid volume"], decimals["ask volume"]]
    return _Decoded(rows, session, _columns(kind, company, rows, session, clock, values))


def _scanned(data: bytes, kind: str) -> tuple[Rows, pa.Array, pa.Array, list[pa.Array]] | None:
    """The compiled scanner's decode (rows, sessions, clock, the other fields in file order), for a file every line
    of which it takes and no rule here rejects; None sends the file down the Arrow path, which gives the reasons."""
    fields = vendor_scan.scan(data, SCANNED[kind])
    if fields is None:
        return None
    dates, clock, *values = fields
    if not _all_on_sessions(dates):
        return None
    if kind == "quotes":
        units = [np.frombuffer(v.buffers()[1], dtype=np.int64)[::2] == 0 for v in values]  # decimal128's low words
        bid, ask, bid_volume, ask_volume = units
        if (bid != bid_volume).any() or (ask != ask_volume).any():  # a side half empty: rejected, with its reason
            return None
    return Rows.clean(len(dates)), dates, clock, values


def _columns(
    kind: str, company: Company, rows: Rows, session: pa.Array, clock: pa.Array, values: list[pa.Array]
) -> dict[str, pa.Array]:
    """The contract's columns from one file's decoded fields (after the date and time, in file order)."""
    local = decode.local_to_utc(pc.fill_null(session, 0), pc.fill_null(clock, 0), TIMEZONE)
    columns = {"exchange_timestamp": local.cast(pa.timestamp("us", tz="UTC")), "trade_date": session}
    if kind == "trades":
        price, volume, qualifiers, venue, buyer = values
        conditions = trade_conditions(qualifiers)
        trade_class, price_forming = classify(clock, conditions, venue)
        columns.update(
            price=price,
            quantity=volume,
            trade_conditions=conditions,
            venue=pc.if_else(pc.equal(venue, ""), pa.scalar(None, pa.string()), venue),
            vendor_data=_vendor_data(company, buyer),
            trade_class=trade_class,
            price_forming=price_forming,
        )
    else:
        zero, null = pa.scalar(0, DECIMAL), pa.scalar(None, DECIMAL)
        bid, ask, bid_volume, ask_volume = values
        for name, (price, size) in {"bid": (bid, bid_volume), "ask": (ask, ask_volume)}.items():
            empty = pc.equal(price, zero)
            rows.reject(pc.xor(empty, pc.equal(size, zero)), f"{name} side has a zero price or a zero size but not both")
            columns[f"{name}_price"] = pc.if_else(empty, null, price)
            columns[f"{name}_quantity"] = pc.if_else(empty, null, size)
        columns["vendor_data"] = decode.constant_map({"company_id": company.company_id, "isin": company.isin}, len(session))
    return columns


def _all_on_sessions(dates: pa.Array) -> bool:
    """Whether every line is dated on a session (a weekday from FIRST_SESSION): the usual file."""
    if dates.null_count or not len(dates):
        return False
    days = np.frombuffer(dates.buffers()[1], dtype=np.int32, count=len(dates), offset=4 * dates.offset)
    return bool(((days + 3) % 7 < 5).all() and days.min() >= (FIRST_SESSION - date(1970, 1, 1)).days)  # 1970-01-01: a Thursday


def _owner_sessions(rows: Rows, dates: pa.Array) -> pa.Array:
    """The session partition that owns each line, so exactly one partition's load reports every line.

    A line dated on a session is that session's. Any other line (an unreadable date, a weekend, a date
    before the first session) is rejected, and belongs to the session of the line before it in the file
    (else the one after it): vendor files run in date order. A file with no session line at all gives
    each line the next session on or after its date, and an unreadable date the first session."""
    if _all_on_sessions(dates):  # the usual file: nothing to do
        return dates
    raw_date = rows.first_field
    weekday = pc.day_of_week(dates)  # Monday = 0
    early = pc.less(dates, pa.scalar(FIRST_SESSION, pa.date32()))
    rows.reject(early, "date '", raw_date, f"' is before {FIRST_SESSION}, the first ASX session K2 loads")
    weekend = pc.greater_equal(weekday, 5)
    rows.reject(weekend, "date '", raw_date, "' is not an ASX session date (a ", pc.take(WEEKDAYS, pc.fill_null(weekday, 0)), ")")
    on_session = pc.and_kleene(pc.invert(early), pc.invert(weekend))
    session = pc.if_else(pc.fill_null(on_session, False), dates, pa.scalar(None, pa.date32()))
    session = pc.fill_null_backward(pc.fill_null_forward(session))
    if session.null_count == 0:
        return session
    days = dates.to_numpy(zero_copy_only=False).astype("datetime64[D]")
    first = np.datetime64(FIRST_SESSION, "D")
    parsed = ~np.isnat(days)
    nxt = np.where(parsed, np.busday_offset(np.where(parsed, days, first), 0, roll="forward"), first)
    return pa.array(np.maximum(nxt, first).astype("datetime64[D]"), pa.date32())


def _vendor_data(company: Company, buyer: pa.StringArray) -> pa.MapArray:
    """vendor_data of each trade. The BuyerID column is almost always empty: those rows share one map, built as
    bytes, and only the few others are built from their values."""
    filled = pc.indices_nonzero(pc.not_equal(buyer, ""))
    if len(filled) > MAX_PATCHES:
        return decode.by_unique(buyer, lambda values: _trade_vendor_data(company, values))
    common = decode.constant_map({"company_id": company.company_id, "isin": company.isin}, len(buyer))
    return decode.patched(common, filled, _trade_vendor_data(company, buyer.take(filled)))


def _trade_vendor_data(company: Company, buyer: pa.StringArray) -> pa.MapArray:
    """vendor_data for each distinct BuyerID value (a price there is kept apart, uninterpreted)."""
    n = len(buyer)
    is_price = pc.match_substring_regex(buyer, decode.DECIMAL_PATTERN)
    null = pa.scalar(None, pa.string())
    return decode.string_map(
        ["company_id", "isin", "buyer_id", "buyer_id_price"],
        [
            pa.repeat(pa.scalar(company.company_id, pa.string()), n),
            pa.repeat(pa.scalar(company.isin, pa.string()), n),
            pc.if_else(pc.or_(pc.equal(buyer, ""), is_price), null, buyer),
            pc.if_else(pc.and_(pc.not_equal(buyer, ""), is_price), buyer, null),
        ],
        n,
    )


def trade_conditions(qualifiers: pa.StringArray) -> pa.ListArray:
    """Each trade's qualifier codes. In the vendor's files a trade has one code or none: where no qualifier holds
    whitespace or a non-ASCII byte, each non-empty one is its own single code, with no splitting or hashing."""
    n = len(qualifiers)
    _, offsets_buffer, data_buffer = qualifiers.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int32, count=n + 1, offset=4 * qualifiers.offset)
    body = np.frombuffer(data_buffer, dtype=np.uint8)[offsets[0] : offsets[-1]] if data_buffer else np.empty(0, np.uint8)
    if qualifiers.null_count or ((body <= 0x20) | (body >= 0x7F)).any():
        return decode.by_unique(qualifiers, _conditions)
    filled = offsets[1:] != offsets[:-1]
    list_offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(filled, out=list_offsets[1:])
    return pa.ListArray.from_arrays(pa.array(list_offsets), qualifiers.filter(pa.array(filled)), type=decode.STRING_LIST)


def _conditions(qualifiers: pa.StringArray) -> pa.Array:
    """Qualifier text -> list of codes (space separated; empty -> [])."""
    qualifiers = pc.utf8_trim_whitespace(qualifiers)
    codes = pc.if_else(pc.equal(qualifiers, ""), pa.scalar([], pa.list_(pa.string())), pc.split_pattern(qualifiers, " "))
    return codes.cast(decode.STRING_LIST)


def classify(clock_micros: pa.Array, conditions: pa.ListArray, venue: pa.StringArray) -> tuple[pa.Array, pa.Array]:
    """trade_class and price_forming of each trade, from its Sydney time of day (microseconds since
    midnight), its qualifier codes and its venue: OFF_MARKET if the venue or a qualifier says so, else
    the session phase it was matched in."""
    phase = np.searchsorted(PHASE_STARTS_MICROS, pc.fill_null(clock_micros, 0).to_numpy(), side="right") - 1
    off_market = pc.fill_null(pc.equal(venue, OFF_MARKET_VENUE), False).to_numpy(zero_copy_only=False)
    hit = pc.is_in(pc.list_flatten(conditions), value_set=pa.array(OFF_MARKET_QUALIFIERS))
    off_market[pc.filter(pc.list_parent_indices(conditions), hit).to_numpy()] = True
    index = pa.array(np.where(off_market, len(PHASES), phase))
    return pc.take(TRADE_CLASSES, index), pc.take(PRICE_FORMING, index)
