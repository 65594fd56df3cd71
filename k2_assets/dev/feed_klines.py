"""The local feed's klines: Binance's bars of the trades the feed has served, as `GET /api/v3/klines` (spot)
and `/fapi/v1/klines` (USD-M futures) answer them.

Binance's conventions, kept here:
- a bar covers [open_time, open_time + interval), and its close_time is the interval's last millisecond;
- futures klines are made of MARKET trades only: an INSURANCE_FUND, ADL or NA trade moves neither the
  prices nor the volume nor the count;
- a bar with no such trade, from the symbol's first bar on, is a zero-volume bar at the previous close, count 0;
- the current bar, still open, is included (a client keeps the closed ones).
Sums are exact: integer units of 1e-8 (quote volumes of 1e-16, rounded half up to 8 decimals once, at the end).
"""

from __future__ import annotations

import bisect

MINUTE_MS = 60_000
UNIT = 10**8  # 1e-8: prices and quantities; a price times a quantity is in 1e-16
INTERVALS = {
    name: minutes * MINUTE_MS
    for name, minutes in (
        ("1m", 1),
        ("3m", 3),
        ("5m", 5),
        ("15m", 15),
        ("30m", 30),
        ("1h", 60),
        ("2h", 120),
        ("4h", 240),
        ("6h", 360),
        ("8h", 480),
        ("12h", 720),
        ("1d", 1440),
    )
}
OPEN, HIGH, LOW, CLOSE, VOLUME, QUOTE, COUNT, TAKER_VOLUME, TAKER_QUOTE = range(9)


def units(text: str) -> int:
    """A decimal string as an exact count of 1e-8."""
    whole, _, fraction = text.partition(".")
    if len(fraction) > 8:
        raise ValueError(f"{text!r} has more than 8 decimal places")
    return int(whole + fraction.ljust(8, "0"))


def _text(amount: int, scale: int = UNIT) -> str:
    """An amount in units of 1/scale as Binance prints it: 8 decimals, rounded half up."""
    eights = (amount * UNIT + scale // 2) // scale
    return f"{eights // UNIT}.{eights % UNIT:08d}"


class Klines:
    """Minute bars of the served trades per symbol, kept for the feed's lifetime (1,440 a day per symbol);
    `price_forming_only`: futures, where only MARKET trades make bars."""

    def __init__(self, price_forming_only: bool):
        self.price_forming_only = price_forming_only
        self.minutes: dict[str, dict[int, list[int]]] = {}  # symbol -> minute open time -> bar (OPEN..TAKER_QUOTE)
        self.starts: dict[str, list[int]] = {}  # symbol -> its minutes with a bar, ascending
        self.now_ms: int | None = None  # the newest trade served, of any symbol: the market's clock

    def add(self, trade: dict) -> None:
        at = trade["time_ms"]
        if self.now_ms is None or at > self.now_ms:
            self.now_ms = at
        if self.price_forming_only and trade.get("trade_class", "MARKET") != "MARKET":
            return
        price, qty = units(trade["price"]), units(trade["qty"])
        quote = price * qty
        taker_buys = not trade["is_buyer_maker"]  # the maker sold: the taker bought
        minute = at - at % MINUTE_MS
        bars = self.minutes.setdefault(trade["symbol"], {})
        bar = bars.get(minute)
        if bar is None:
            bars[minute] = [price, price, price, price, qty, quote, 1, qty * taker_buys, quote * taker_buys]
            bisect.insort(self.starts.setdefault(trade["symbol"], []), minute)
            return
        bar[HIGH] = max(bar[HIGH], price)
        bar[LOW] = min(bar[LOW], price)
        bar[CLOSE] = price
        bar[VOLUME] += qty
        bar[QUOTE] += quote
        bar[COUNT] += 1
        if taker_buys:
            bar[TAKER_VOLUME] += qty
            bar[TAKER_QUOTE] += quote

    def select(self, symbol: str, width: int, start: int | None, end: int | None, limit: int) -> list[list]:
        """Bars of `width` ms, ascending: from `start` on (open time >= start) if given, else the last `limit`
        up to `end` (open time <= end) or up to now."""
        starts = self.starts.get(symbol)
        if not starts or self.now_ms is None:
            return []
        first, last = starts[0] - starts[0] % width, self.now_ms - self.now_ms % width
        if end is not None:
            last = min(last, end - end % width)
        if start is not None:
            first = max(first, start + (-start) % width)
            opens = range(first, min(last, first + (limit - 1) * width) + 1, width)
        else:
            opens = range(max(first, last - (limit - 1) * width), last + 1, width)
        return [self._bar(symbol, starts, opened, width) for opened in opens]

    def _bar(self, symbol: str, starts: list[int], opened: int, width: int) -> list:
        within = starts[bisect.bisect_left(starts, opened) : bisect.bisect_left(starts, opened + width)]
        if within:
            bars = [self.minutes[symbol][m] for m in within]
            o, c = bars[0][OPEN], bars[-1][CLOSE]
            h, low = max(b[HIGH] for b in bars), min(b[LOW] for b in bars)
            v, q, n, tv, tq = (sum(b[i] for b in bars) for i in (VOLUME, QUOTE, COUNT, TAKER_VOLUME, TAKER_QUOTE))
        else:  # no trade: a zero-volume bar at the previous close
            o = h = low = c = self.minutes[symbol][starts[bisect.bisect_left(starts, opened) - 1]][CLOSE]
            v = q = n = tv = tq = 0
        square = UNIT * UNIT
        return [
            opened,
            _text(o),
            _text(h),
            _text(low),
            _text(c),
            _text(v),
            opened + width - 1,
            _text(q, square),
            n,
            _text(tv),
            _text(tq, square),
            "0",
        ]
