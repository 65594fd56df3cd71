"""What an Iceberg scan reads (its Scope, also its cache key) and the byte-bounded LRU of scanned Arrow data."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pyarrow as pa
from pyiceberg.expressions import AlwaysTrue, And, BooleanExpression, EqualTo, GreaterThanOrEqual, LessThanOrEqual

from k2_assets.core.checks import EXCHANGES


@dataclass(frozen=True)
class Scope:
    """What the Iceberg scan reads: the partition filter pushed down to pyiceberg (and the cache key)."""

    exchange: str | None = None
    date_lo: date | None = None
    date_hi: date | None = None
    symbol: str | None = None

    def expression(self) -> BooleanExpression:
        """The scope as a pyiceberg row filter."""
        parts: list[BooleanExpression] = []
        if self.exchange is not None:
            parts.append(EqualTo("exchange", self.exchange))
        if self.date_lo is not None and self.date_lo == self.date_hi:
            parts.append(EqualTo("trade_date", self.date_lo.isoformat()))
        else:
            if self.date_lo is not None:
                parts.append(GreaterThanOrEqual("trade_date", self.date_lo.isoformat()))
            if self.date_hi is not None:
                parts.append(LessThanOrEqual("trade_date", self.date_hi.isoformat()))
        if self.symbol is not None:
            parts.append(EqualTo("symbol", self.symbol))
        if not parts:
            return AlwaysTrue()
        expr = parts[0]
        for part in parts[1:]:
            expr = And(expr, part)
        return expr


def session_dates(exchange: str | None, start: datetime | None, end: datetime | None) -> tuple[date | None, date | None]:
    """The trade_date partitions that can hold exchange times in [start, end): each exchange's session
    date is its local date (ASX: Sydney, BINANCE: UTC), so the bounds are exact, not padded."""
    zones = [ZoneInfo(EXCHANGES[exchange])] if exchange else [ZoneInfo(z) for z in EXCHANGES.values()]
    lo = min(start.astimezone(z).date() for z in zones) if start is not None else None
    hi = max((end - timedelta(microseconds=1)).astimezone(z).date() for z in zones) if end is not None else None
    return lo, hi


def row_scope(
    exchange: str | None, symbol: str | None, start: datetime | None, end: datetime | None, session: date | None
) -> Scope:
    """The scope of a row query: its exchange and symbol, and the session dates its time range (and trade_date) allow."""
    lo, hi = session_dates(exchange, start, end)
    if session is not None:
        lo = session if lo is None else max(lo, session)
        hi = session if hi is None else min(hi, session)
    return Scope(exchange, lo, hi, symbol)


class ArrowCache:
    """An LRU of Arrow tables bounded by their total size in bytes; thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Any, tuple[pa.Table, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key) -> pa.Table | None:
        """The table cached under `key`, now the most recently used; None on a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key, table: pa.Table) -> None:
        """Cache `table` under `key`, evicting the least recently used entries beyond max_bytes."""
        size = table.get_total_buffer_size()
        if size > self.max_bytes:
            return  # larger than the whole cache: used once, not kept
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (table, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def info(self) -> dict:
        """Hits, misses, entries and bytes held."""
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "entries": len(self._entries),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
            }
