"""Synthetic demo market data written in the real ASX and Binance vendor file formats.

`generate_demo_data` writes a small, deterministic data set (with a few deliberately bad rows)
so the demo runs without the real sample files. Plain Python + numpy; never imports Dagster.

    k2 demo-data --out .k2/data
"""

from __future__ import annotations

import itertools
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np

ASX_BAD_KINDS = ("price_decimals", "price_non_numeric", "volume_nonpositive", "missing_column", "bad_time")
BINANCE_BAD_KINDS = ("price_non_numeric", "qty_decimals", "bad_is_buyer_maker")

SECOND = 1_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
PRE_OPEN_START = 7 * HOUR
OPEN = 10 * HOUR
CLOSE = 16 * HOUR
CLOSING_AUCTION = 16 * HOUR + 10 * MINUTE
LATE_END = 17 * HOUR + 30 * MINUTE

# Event kinds of the ASX simulation.
PRE, OPEN_AUCTION, CONT, CLOSE_AUCTION, LATE, QUOTE, PRE_QUOTE = range(7)

# As in the real files: qualifiers 3 and 9 are crossings reported during continuous trading (1 is
# only seen in the 07:05 pre-open), and venue X is printed on exactly the off-market qualifiers 1, 3, 9.
QUALIFIER_OTHER = np.array([2, 25, 27, 5, 8, 26, 9, 3])
OFF_MARKET_QUALIFIERS = np.array([1, 3, 9])


@dataclass(frozen=True)
class Company:
    company_id: int
    symbol: str
    name: str
    price: float  # starting price in dollars
    trades_per_day: int
    daily_vol: float
    spread_ticks: tuple[float, float]  # half-spread range, in ticks
    listed_days_before: int

    @property
    def heavy(self) -> bool:
        return self.trades_per_day >= 10_000

    @property
    def open_offset(self) -> int:
        """ASX opens alphabetically in five groups, 2m15s apart."""
        groups = ("AB", "CDEF", "GHIJKLM", "NOPQR", "STUVWXYZ")
        group = next(i for i, letters in enumerate(groups) if self.symbol[0] in letters)
        return group * (2 * MINUTE + 15 * SECOND)


COMPANIES = (
    Company(2451, "KGM", "KOOKABURRA GOLD MINES LTD", 36.76, 17_500, 0.015, (0.3, 1.2), 2_130),
    Company(3907, "SXB", "SOUTHERN CROSS BANKING CORP LTD", 24.15, 15_500, 0.012, (0.3, 1.2), 5_480),
    Company(5126, "WTL", "WATTLE TELECOMMUNICATIONS LTD", 1.235, 3_000, 0.02, (0.4, 1.5), 1_215),
    Company(6603, "OPX", "OPALEX RESOURCES NL", 0.064, 35, 0.04, (0.6, 3.0), 870),
    Company(8814, "BLH", "BLUEHAVEN PROPERTY GROUP", 3.42, 20, 0.015, (0.6, 3.0), 3_310),
)


@dataclass(frozen=True)
class BinanceSymbol:
    symbol: str
    price: float
    qty_decimals: int  # lot step is 10**-qty_decimals
    median_qty: float
    daily_vol: float
    first_id: int


BINANCE_SYMBOLS = (
    BinanceSymbol("BTCUSDT", 42_000.0, 5, 0.002, 0.025, 3_345_206_428),
    BinanceSymbol("ETHUSDT", 2_300.0, 4, 0.05, 0.03, 1_266_328_741),
)
AGG_SYMBOL = "XRPETH"
AGG_FIRST_ID, AGG_FIRST_TRADE_ID = 40_112_587, 52_718_034
BINANCE_US_FROM = date(2025, 1, 1)  # Binance spot dumps switched from ms to us timestamps


def isin(symbol: str, country: str = "AU") -> str:
    """ISIN with its Luhn check digit (letters count as 10..35)."""
    body = f"{country}000000{symbol}"
    digits = "".join(str(int(c, 36)) for c in body)
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d // 10 + d % 10
    return f"{body}{(10 - total % 10) % 10}"


def asx_trading_days(start: date, n: int) -> list[date]:
    """The first `n` weekdays on or after `start`."""
    days, d = [], start
    while len(days) < n:
        if d.weekday() < 5:
            days.append(d)
        d += timedelta(days=1)
    return days


# --- ASX price grid, in integer thousandths of a dollar -------------------------------------


def tick_of(milli: np.ndarray) -> np.ndarray:
    return np.where(milli < 100, 1, np.where(milli < 2_000, 5, 10))


def snap(milli: np.ndarray, how: str) -> np.ndarray:
    """Snap to the ASX tick grid; boundaries (0.10, 2.00) lie on both grids so this stays valid."""
    t = tick_of(milli)
    return (getattr(np, how)(milli / t) * t).astype(np.int64)


def asx_price(milli: int) -> str:
    whole, frac = divmod(milli, 1000)
    s = f"{whole}.{frac:03d}".rstrip("0")
    return s + "0" if s.endswith(".") else s


def _strings(values: np.ndarray, fmt) -> list[str]:
    """Format each distinct value once."""
    uniq, inverse = np.unique(values, return_inverse=True)
    return np.array([fmt(v) for v in uniq.tolist()], dtype=object)[inverse.ravel()].tolist()


def _clock(ms: np.ndarray) -> list[str]:
    h, rem = np.divmod(ms, HOUR)
    m, rem = np.divmod(rem, MINUTE)
    s, f = np.divmod(rem, SECOND)
    return [f"{a:02d}:{b:02d}:{c:02d}.{d:03d}" for a, b, c, d in zip(h.tolist(), m.tolist(), s.tolist(), f.tolist())]


def _day_events(rng: np.random.Generator, co: Company) -> tuple[np.ndarray, np.ndarray]:
    """Local times (ms after midnight) and kinds of one day's trades and quotes."""
    n = int(rng.poisson(co.trades_per_day))
    n_pre = int(rng.poisson(max(n / 4_000, 0.1)))
    n_open = int(rng.poisson(n * 0.015))
    n_close = int(rng.poisson(n * 0.02))
    n_late = int(rng.poisson(max(n / 2_000, 0.05)))
    n_cont = max(n - n_pre - n_open - n_close - n_late, 0)
    open_ms = OPEN + co.open_offset + int(rng.integers(0, 15 * SECOND))
    close_ms = CLOSING_AUCTION + int(rng.integers(0, MINUTE))

    def session(k: int) -> np.ndarray:
        # U-shaped intraday activity
        t = open_ms + (rng.beta(0.8, 0.8, k) * (CLOSE - open_ms)).astype(np.int64)
        return np.minimum(t, CLOSE - 1)

    nq = int(rng.poisson(co.trades_per_day))
    nq_pre = int(rng.poisson(nq * 0.03 + 1))
    times = np.concatenate(
        [
            rng.integers(PRE_OPEN_START, OPEN, n_pre),
            np.full(n_open, open_ms),
            session(n_cont),
            np.full(n_close, close_ms),
            rng.integers(close_ms + MINUTE, LATE_END + 1, n_late),
            session(max(nq - nq_pre, 0)),
            rng.integers(PRE_OPEN_START, open_ms, nq_pre),
        ]
    )
    kinds = np.repeat(
        [PRE, OPEN_AUCTION, CONT, CLOSE_AUCTION, LATE, QUOTE, PRE_QUOTE],
        [n_pre, n_open, n_cont, n_close, n_late, max(nq - nq_pre, 0), nq_pre],
    )
    return times.astype(np.int64), kinds


def _asx_company(rng: np.random.Generator, co: Company, days: list[date], bad_row_rate: float):
    """Trade lines, bad-row counts, duplicate count and quote lines for one company."""
    per_day = [_day_events(rng, co) for _ in days]
    day = np.concatenate([np.full(len(t), i) for i, (t, _) in enumerate(per_day)])
    times = np.concatenate([t for t, _ in per_day])
    kinds = np.concatenate([k for _, k in per_day])
    order = np.lexsort((times, day))
    day, times, kinds = day[order], times[order], kinds[order]
    n = len(times)

    # mid-price random walk over all events, with an overnight gap
    events_per_day = max(n / len(days), 1)
    steps = rng.normal(0, co.daily_vol / np.sqrt(events_per_day), n)
    new_day = np.r_[False, day[1:] != day[:-1]]
    steps[new_day] += rng.normal(0, co.daily_vol / 2, int(new_day.sum()))
    mid = np.exp(np.log(co.price * 1000) + np.cumsum(steps))
    half = tick_of(mid) * rng.uniform(*co.spread_ticks, n)
    bid = np.maximum(snap(mid - half, "floor"), 1)
    ask = np.maximum(snap(mid + half, "ceil"), bid + tick_of(bid))

    # trades hit the bid or lift the ask; auctions print one price for the whole group
    is_trade = kinds < QUOTE
    price = np.where(rng.random(n) < 0.5, ask, bid)
    auction = (kinds == OPEN_AUCTION) | (kinds == CLOSE_AUCTION)
    if auction.any():
        _, first, inverse = np.unique(day[auction] * 10 + kinds[auction], return_index=True, return_inverse=True)
        price[auction] = snap(mid[auction][first], "round")[inverse.ravel()]
    notional = rng.lognormal(np.log(6_000), 1.1, n)
    volume = np.maximum(np.rint(notional / (price / 1000)), 1).astype(np.int64)

    qualifier = np.where(rng.random(n) < 0.93, 0, rng.choice(QUALIFIER_OTHER, n))
    # the real files trade before the open and after the close only off-market (qualifier 3, venue X)
    qualifier[(kinds == PRE) | (kinds == LATE)] = 3
    venue = np.isin(qualifier, OFF_MARKET_QUALIFIERS)

    # heavy names print multiple fills of one order as identical rows
    reps = np.ones(n, dtype=np.int64)
    if co.heavy:
        dup = (kinds == CONT) & (rng.random(n) < 0.015)
        reps += dup + (dup & (rng.random(n) < 0.2))
    t_idx = np.repeat(np.flatnonzero(is_trade), reps[is_trade])
    trades, bad = _asx_trade_lines(
        rng, days, day[t_idx], times[t_idx], price[t_idx], volume[t_idx], qualifier[t_idx], venue[t_idx], bad_row_rate
    )
    duplicates = sum(a == b for a, b in itertools.pairwise(trades))

    q = ~is_trade
    bid_q, ask_q = bid[q].copy(), ask[q].copy()
    bid_vol = np.maximum(np.rint(rng.lognormal(np.log(20_000), 1.0, int(q.sum())) / (bid_q / 1000)), 1).astype(np.int64)
    ask_vol = np.maximum(np.rint(rng.lognormal(np.log(20_000), 1.0, int(q.sum())) / (ask_q / 1000)), 1).astype(np.int64)
    # pre-open books are often one-sided: the empty side prints as 0.0 with volume 0
    side = rng.random(int(q.sum()))
    pre = kinds[q] == PRE_QUOTE
    no_bid, no_ask = pre & (side < 0.15), pre & (side >= 0.15) & (side < 0.3)
    bid_q[no_bid], bid_vol[no_bid] = 0, 0
    ask_q[no_ask], ask_vol[no_ask] = 0, 0
    dates = _dates(days, day[q])
    quotes = [
        f"{d},{t},{b},{a},{bv},{av}"
        for d, t, b, a, bv, av in zip(
            dates, _clock(times[q]), _strings(bid_q, asx_price), _strings(ask_q, asx_price), bid_vol.tolist(), ask_vol.tolist()
        )
    ]
    return trades, bad, duplicates, quotes


def _dates(days: list[date], day_idx: np.ndarray) -> list[str]:
    labels = np.array([d.strftime("%m/%d/%Y") for d in days], dtype=object)
    return labels[day_idx].tolist()


def _asx_trade_lines(rng, days, day, times, price, volume, qualifier, venue, bad_row_rate):
    n = len(times)
    dates = _dates(days, day)
    clock = _clock(times)
    prices = _strings(price, asx_price)
    volumes = [str(v) for v in volume.tolist()]
    venues = ["X" if v else "" for v in venue.tolist()]
    bad_at = np.flatnonzero(rng.random(n) < bad_row_rate)
    bad_kind = rng.integers(0, len(ASX_BAD_KINDS), len(bad_at))
    extra = rng.integers(1, 100_000, len(bad_at)) * 10 + rng.integers(1, 10, len(bad_at))
    counts = dict.fromkeys(ASX_BAD_KINDS, 0)
    missing = set()
    for i, k, x in zip(bad_at.tolist(), bad_kind.tolist(), extra.tolist()):
        kind = ASX_BAD_KINDS[k]
        counts[kind] += 1
        if kind == "price_decimals":
            whole, frac = divmod(int(price[i]), 1000)
            prices[i] = f"{whole}.{frac:03d}{x:06d}"
        elif kind == "price_non_numeric":
            prices[i] = "abc"
        elif kind == "volume_nonpositive":
            volumes[i] = "0" if x % 2 else f"-{volumes[i]}"
        elif kind == "missing_column":
            missing.add(i)
        else:
            clock[i] = "25:61:00.000"
    lines = [
        f"{d},{t},{p},{v},{q},{ven}," for d, t, p, v, q, ven in zip(dates, clock, prices, volumes, qualifier.tolist(), venues)
    ]
    for i in missing:
        lines[i] = lines[i][:-1]  # drop the (empty) BuyerID column
    return lines, counts


def _write(path: Path, lines: list[str], newline: str, header: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = newline.join(([header] if header else []) + lines) + newline
    path.write_bytes(body.encode())


def _generate_asx(rng, out: Path, start: date, n_days: int, bad_row_rate: float) -> dict:
    days = asx_trading_days(start, n_days)
    files = {}
    info = [
        f"{co.company_id},{co.symbol},{co.name},{isin(co.symbol)},"
        f"{(days[0] - timedelta(days=co.listed_days_before)):%m/%d/%Y},"
        f"{(days[-1] + timedelta(days=17 + co.company_id % 40)):%m/%d/%Y}"
        for co in COMPANIES
    ]
    path = out / "reference-data" / "company_info.csv"
    _write(path, info, "\n", "company_id,symbol,company_name,ISIN,start_date,end_date")
    files[path] = {"rows": len(info), "bad_rows": {}}
    for co in COMPANIES:
        trades, bad, duplicates, quotes = _asx_company(rng, co, days, bad_row_rate)
        path = out / "trades" / f"{co.company_id}.csv"
        _write(path, trades, "\r\n")
        files[path] = {"rows": len(trades), "bad_rows": bad, "duplicate_rows": duplicates}
        path = out / "quotes" / f"{co.company_id}.csv"
        _write(path, quotes, "\r\n")
        files[path] = {"rows": len(quotes), "bad_rows": {}}
    return files


# --- Binance ----------------------------------------------------------------------------------


def _binance_times(rng, day: date, n: int, micros: bool) -> np.ndarray:
    """Non-decreasing epoch times inside the UTC day, in ms or us."""
    per_day = 86_400_000_000 if micros else 86_400_000
    t = np.sort(rng.integers(0, per_day, n))
    # a taker order sweeping several makers prints several trades at one timestamp
    leader = np.maximum.accumulate(np.where(rng.random(n) < 0.35, 0, np.arange(n)))
    return (day - date(1970, 1, 1)).days * per_day + t[leader], leader


def _sweep(ticks: np.ndarray, leader: np.ndarray, maker: np.ndarray) -> np.ndarray:
    """Trades sharing a timestamp walk the book one tick at a time, up for taker buys, down for sells."""
    step = np.arange(len(ticks)) - leader
    return np.maximum(ticks[leader] + np.where(maker, -step, step), 1)


def _decimal(units: np.ndarray, decimals: int, pad_to: int = 8) -> list[str]:
    scale = 10**decimals
    return [f"{u // scale}.{u % scale:0{decimals}d}{'0' * (pad_to - decimals)}" for u in units.tolist()]


def _binance_bad(rng, n: int, rate: float):
    at = np.flatnonzero(rng.random(n) < rate)
    kinds = rng.integers(0, len(BINANCE_BAD_KINDS), len(at))
    digits = rng.integers(1, 10, len(at))
    return list(zip(at.tolist(), [BINANCE_BAD_KINDS[k] for k in kinds.tolist()], digits.tolist()))


def _apply_binance_bad(bad, prices, qtys, makers) -> dict:
    counts = dict.fromkeys(BINANCE_BAD_KINDS, 0)
    for i, kind, digit in bad:
        counts[kind] += 1
        if kind == "price_non_numeric":
            prices[i] = "abc"
        elif kind == "qty_decimals":
            qtys[i] = f"{qtys[i]}{digit}"
        else:
            makers[i] = "maybe"
    return counts


def _walk(rng, sym: BinanceSymbol, day: date, log_price: float, n: int, micros: bool):
    """A day of one symbol's trades: times, prices in cents, quantities in lots (1e-qty_decimals), buyer-is-maker
    flags, and the last log price (the next day starts there)."""
    times, leader = _binance_times(rng, day, n, micros)
    log_prices = log_price + np.cumsum(rng.normal(0, sym.daily_vol / np.sqrt(n), n))
    maker = (rng.random(n) < 0.5)[leader]
    cents = _sweep(np.rint(np.exp(log_prices) * 100).astype(np.int64), leader, maker)
    qty = np.maximum(np.rint(rng.lognormal(np.log(sym.median_qty * 10**sym.qty_decimals), 1.4, n)), 1).astype(np.int64)
    qty = np.minimum(qty, 50 * 10**sym.qty_decimals)
    return times, cents, qty, maker, float(log_prices[-1])


def _binance_trades(
    rng, sym: BinanceSymbol, day: date, first_id: int, log_price: float, n: int, bad_row_rate: float, legacy_header: bool
):
    times, cents, qty, maker, last_log_price = _walk(rng, sym, day, log_price, n, day >= BINANCE_US_FROM)
    # exact price * qty in units of 1e-8: cents (1e-2) * lots (1e-qty_decimals)
    quote_units = cents * qty * 10 ** (8 - 2 - sym.qty_decimals)

    prices = _strings(cents, lambda c: f"{c // 100}.{c % 100:02d}000000")
    qtys = _decimal(qty, sym.qty_decimals)
    quotes = _decimal(quote_units, 8)
    makers = ["True" if m else "False" for m in maker.tolist()]
    bad = _binance_bad(rng, n, bad_row_rate)
    klines = _kline_lines(sym.symbol, day, times, prices, qtys, maker, skip={i for i, _, _ in bad})
    counts = _apply_binance_bad(bad, prices, qtys, makers)
    rows = zip(range(first_id, first_id + n), prices, qtys, quotes, times.tolist(), makers)
    best_match = "" if legacy_header else ",True"  # the redistributed 6-column files drop is_best_match
    lines = [f"{i},{p},{q},{qq},{t},{m}{best_match}" for i, p, q, qq, t, m in rows]
    return lines, counts, last_log_price, klines


def _kline_lines(symbol, day, times, prices, qtys, maker, *, skip=(), counts=None, classes=None) -> list[str]:
    """The exchange's own 1m bars of the day's trades, as its kline dump prints them (headerless, 12 columns; µs
    times from 2025), by the rules the local feed serves them with (feed_klines). The demo's deliberately bad rows
    (`skip`) stand for lines the vendor file corrupted; the exchange's bars count the trades as they were.
    `counts`: underlying trades per row (aggTrades); `classes`: futures X, only MARKET makes bars."""
    from k2_assets.dev.feed_klines import Klines

    micros = day >= BINANCE_US_FROM
    bars = Klines(price_forming_only=classes is not None)
    per_minute: dict[int, int] = {}
    for i, (t, p, q, m) in enumerate(zip(times.tolist(), prices, qtys, maker.tolist())):
        if i in skip:
            continue
        ms = t // 1000 if micros else t
        bars.add({"symbol": symbol, "time_ms": ms, "price": p, "qty": q, "is_buyer_maker": m,
                  "trade_class": "MARKET" if classes is None else classes[i]})  # fmt: skip
        if counts is not None:
            per_minute[ms - ms % 60_000] = per_minute.get(ms - ms % 60_000, 0) + counts[i]
    start = (day - date(1970, 1, 1)).days * 86_400_000
    lines = []
    for bar in bars.select(symbol, 60_000, start, start + 86_399_999, 1440):
        if counts is not None:
            bar[8] = per_minute.get(bar[0], 0)
        opened, closed = (bar[0] * 1000, bar[6] * 1000 + 999) if micros else (bar[0], bar[6])
        lines.append(",".join(map(str, [opened, *bar[1:6], closed, *bar[7:]])))
    return lines


def _binance_agg_trades(rng, day: date, n: int, bad_row_rate: float):
    times, leader = _binance_times(rng, day, n, day >= BINANCE_US_FROM)
    maker = (rng.random(n) < 0.5)[leader]
    units = np.rint(0.0014e8 * np.exp(np.cumsum(rng.normal(0, 0.03 / np.sqrt(n), n)))).astype(np.int64)
    units = _sweep(units, leader, maker)
    qty = np.maximum(np.rint(rng.lognormal(np.log(300), 1.3, n)), 1).astype(np.int64)
    fills = rng.geometric(0.6, n)
    last = AGG_FIRST_TRADE_ID + np.cumsum(fills) - 1
    first = last - fills + 1
    prices = _decimal(units, 8)
    qtys = [f"{q}.00000000" for q in qty.tolist()]
    makers = ["True" if m else "False" for m in maker.tolist()]
    bad = _binance_bad(rng, n, bad_row_rate)
    klines = _kline_lines(AGG_SYMBOL, day, times, prices, qtys, maker, skip={i for i, _, _ in bad}, counts=fills.tolist())
    counts = _apply_binance_bad(bad, prices, qtys, makers)
    lines = [
        f"{i},{p},{q},{first_id},{last_id},{t},{m},True"
        for i, p, q, first_id, last_id, t, m in zip(
            range(AGG_FIRST_ID, AGG_FIRST_ID + n), prices, qtys, first.tolist(), last.tolist(), times.tolist(), makers
        )
    ]
    return lines, counts, klines


def _generate_binance(rng, out: Path, dates: Sequence[date], rows_per_day: int, bad_row_rate: float) -> dict:
    files = {}
    next_id = {s.symbol: s.first_id for s in BINANCE_SYMBOLS}
    log_price = {s.symbol: float(np.log(s.price)) for s in BINANCE_SYMBOLS}
    for d_i, day in enumerate(dates):
        for sym in BINANCE_SYMBOLS:
            legacy = d_i == 0 and sym.symbol == "BTCUSDT"
            first = next_id[sym.symbol]
            lines, bad, log_price[sym.symbol], klines = _binance_trades(
                rng, sym, day, first, log_price[sym.symbol], rows_per_day, bad_row_rate, legacy
            )
            files |= _write_klines(out, sym.symbol, day, klines)
            next_id[sym.symbol] = first + len(lines)
            name = f"{sym.symbol}-trades-{day:%Y-%m-%d}.csv"
            header = "id,price,qty,quote_qty,time,is_buyer_maker" if legacy else None
            path = out / name
            if d_i == 1 and sym.symbol == "ETHUSDT":
                path = _write_zip(out / name, lines, header)
            else:
                _write(path, lines, "\n", header)
            files[path] = {"rows": len(lines), "bad_rows": bad, "first_id": first, "last_id": first + len(lines) - 1}
    if dates:
        lines, bad, klines = _binance_agg_trades(rng, dates[0], max(rows_per_day // 10, 1), bad_row_rate)
        files |= _write_klines(out, AGG_SYMBOL, dates[0], klines)
        path = out / f"{AGG_SYMBOL}-aggTrades-{dates[0]:%Y-%m-%d}.csv"
        _write(path, lines, "\n")
        files[path] = {"rows": len(lines), "bad_rows": bad, "first_id": AGG_FIRST_ID, "last_id": AGG_FIRST_ID + len(lines) - 1}
    return files


def read_dump_lines(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return archive.read(archive.namelist()[0]).decode().splitlines()


def _write_klines(folder: Path, symbol: str, day: date, lines: list[str]) -> dict:
    """The exchange's kline dump of a symbol-day beside its trades: SYMBOL-1m-YYYY-MM-DD.zip."""
    path = _write_zip(folder / f"{symbol}-1m-{day:%Y-%m-%d}.csv", lines, None)
    return {path: {"rows": len(lines), "bad_rows": {}, "klines": True}}


def _write_zip(csv_path: Path, lines: list[str], header: str | None) -> Path:
    """Zip with the single csv member; fixed metadata so equal data gives equal bytes."""
    body = "\n".join(([header] if header else []) + lines) + "\n"
    zip_path = csv_path.with_suffix(".zip")
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    info = zipfile.ZipInfo(csv_path.name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr(info, body)
    csv_path.unlink(missing_ok=True)
    return zip_path


FUTURES_HEADER = "id,price,qty,quote_qty,time,is_buyer_maker"
FUTURES_DEMO_ROWS = 5_000  # trades of BTCUSDT futures on the demo's first Binance day


def futures_klines_dir(out_dir: Path, symbol: str) -> Path:
    """Where data.binance.vision keeps a futures symbol's 1m kline dumps."""
    return out_dir / "futures" / "um" / "daily" / "klines" / symbol / "1m"


def write_futures_trades(
    out_dir: Path,
    day: date,
    *,
    symbols: Sequence[str] = ("BTCUSDT",),
    rows: int = 2_000,
    seed: int = 7,
    non_market_ratio: float = 0.01,
    class_column: bool = True,
) -> dict[Path, dict]:
    """USD-M futures trade dumps of `day`, as data.binance.vision publishes them: a zip per symbol under
    out_dir/futures/um/daily/trades/SYMBOL/, a header line, times in ms, true/false, decimals unpadded.

    About `non_market_ratio` of the trades are INSURANCE_FUND trades (priced 2% off the market, as a liquidation's
    bankruptcy price is) or ADL trades. Binance's own dumps say nothing of the class: with `class_column` the
    file has an X column, which K2 reads; without it the file is exactly Binance's and every trade reads as
    MARKET. Ids start at the demo's spot ids, so spot and futures share trade ids as the real markets can.
    Beside them, the exchange's own kline dump of the day (futures/um/daily/klines/SYMBOL/1m/), MARKET trades only.
    Returns, per trades file written, {"rows", "first_id", "last_id", "classes": {class: trades}}."""
    by_name = {s.symbol: s for s in BINANCE_SYMBOLS}
    rng = np.random.default_rng(seed)
    files = {}
    for symbol in symbols:
        sym = by_name[symbol]
        times, cents, qty, maker, _ = _walk(rng, sym, day, float(np.log(sym.price)), rows, micros=False)
        price_units = cents * 1_000_000  # 1e-8
        classes = np.full(rows, "MARKET", dtype=object)
        chosen = rng.random(rows) < non_market_ratio
        insurance = chosen & (rng.random(rows) < 0.5)
        classes[chosen] = "ADL"
        classes[insurance] = "INSURANCE_FUND"
        off = np.where(rng.random(rows) < 0.5, 980_000, 1_020_000)  # x 0.98 or x 1.02, in 1e-8 per cent
        price_units = np.where(insurance, cents * off, price_units)
        lots = 10**sym.qty_decimals
        quote_units = (price_units * qty + lots // 2) // lots  # rounded half up to 1e-8
        prices = [p.rstrip("0").removesuffix(".") if i else p[:-6] for p, i in zip(_decimal(price_units, 8), insurance)]
        quotes = [q.rstrip("0").removesuffix(".") for q in _decimal(quote_units, 8)]
        fields = zip(range(sym.first_id, sym.first_id + rows), prices, _decimal(qty, sym.qty_decimals, sym.qty_decimals))
        lines = [
            f"{i},{p},{q},{qq},{t},{'true' if m else 'false'}" + (f",{x}" if class_column else "")
            for (i, p, q), qq, t, m, x in zip(fields, quotes, times.tolist(), maker.tolist(), classes.tolist())
        ]
        name = f"{symbol}-trades-{day:%Y-%m-%d}.csv"
        header = FUTURES_HEADER + (",X" if class_column else "")
        path = _write_zip(out_dir / "futures" / "um" / "daily" / "trades" / symbol / name, lines, header)
        qtys = _decimal(qty, sym.qty_decimals, sym.qty_decimals)
        klines = _kline_lines(symbol, day, times, prices, qtys, maker, classes=classes.tolist())
        _write_klines(futures_klines_dir(out_dir, symbol), symbol, day, klines)
        counts = dict(zip(*np.unique(classes.astype(str), return_counts=True)))
        files[path] = {
            "rows": rows,
            "first_id": sym.first_id,
            "last_id": sym.first_id + rows - 1,
            "classes": {str(k): int(v) for k, v in counts.items()},
        }
    return files


def generate_demo_data(
    out_dir: Path,
    *,
    asx_start: date = date(2014, 3, 10),
    asx_days: int = 5,
    binance_dates: Sequence[date] = (date(2024, 1, 1), date(2024, 1, 2), date(2025, 1, 2)),
    binance_rows_per_day: int = 20_000,
    seed: int = 7,
    bad_row_rate: float = 0.001,
) -> dict:
    """Write demo ASX files to `out_dir/asx` and Binance dumps to `out_dir/binance`.

    Returns {"out_dir", "files": {relative path: {"rows", "bad_rows": {kind: n}, ...}},
    "total_rows", "total_bad_rows"}.
    """
    if asx_days < 1 or binance_rows_per_day < 1:
        raise ValueError("asx_days and binance_rows_per_day must be at least 1")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    files = _generate_asx(rng, out_dir / "asx", asx_start, asx_days, bad_row_rate)
    files |= _generate_binance(rng, out_dir / "binance", list(binance_dates), binance_rows_per_day, bad_row_rate)
    if binance_dates:  # USD-M futures: one day of BTCUSDT, a few non-MARKET trades among them, and its klines
        day = sorted(binance_dates)[0]
        futures = write_futures_trades(out_dir / "binance", day, rows=FUTURES_DEMO_ROWS, seed=seed)
        files |= {path: {**stats, "bad_rows": {}} for path, stats in futures.items()}
        klines = futures_klines_dir(out_dir / "binance", "BTCUSDT") / f"BTCUSDT-1m-{day:%Y-%m-%d}.zip"
        files[klines] = {"rows": len(read_dump_lines(klines)), "bad_rows": {}, "klines": True}
    by_name = {p.relative_to(out_dir).as_posix(): stats for p, stats in files.items()}
    return {
        "out_dir": str(out_dir),
        "files": by_name,
        "total_rows": sum(s["rows"] for s in by_name.values()),
        "total_bad_rows": sum(sum(s["bad_rows"].values()) for s in by_name.values()),
    }
