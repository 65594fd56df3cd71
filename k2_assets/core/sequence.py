"""Sequence tracking per (exchange, symbol): gaps, duplicates, late arrivals, resets. No Dagster.

Every sequence number at or below a stream's high-water mark has either been seen or lies in an
open gap, so the open gaps are the whole state needed to tell a duplicate from a late arrival: no
cache of seen ids, and memory bounded by the number of open gaps.

Events, one per input record, in arrival order:
  IN_ORDER       the next number
  GAP            ahead of the next number; the numbers skipped become an open gap
  DUPLICATE      already seen (at or below the high-water mark, in no open gap)
  OUT_OF_ORDER   a late arrival: it fills (part of) an open gap, splitting it if inside
  TOO_OLD        below the look-back window: too old to judge; its gaps were already accepted
  SESSION_RESET  the first record of a new session (ASX numbers restart at 1 each session;
                 Binance trade ids never restart, so Binance streams never reset)
  FIRST          the first record ever seen of a stream that does not start at 1 (no gap implied)

Hot path: the high-water marks and gap openings are computed with numpy over the whole batch,
segmented by stream; Python touches only the anomalies (records behind the mark), whose count is
what the data makes it, not the batch size.
"""

from __future__ import annotations

import bisect
import json
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

IN_ORDER, GAP, DUPLICATE, OUT_OF_ORDER, TOO_OLD, SESSION_RESET, FIRST = range(7)
EVENT_NAMES = ("in_order", "gap", "duplicate", "out_of_order", "too_old", "session_reset", "first")
LATE_ARRIVAL, REPAIR, ACCEPTED = "late_arrival", "repair", "accepted"
NO_SESSION = -(2**31)


@dataclass
class Gap:
    exchange: str
    symbol: str
    session: int  # days since epoch of the session date; NO_SESSION where streams never reset
    first: int
    last: int
    detected_at: datetime
    closed_at: datetime | None = None
    closed_how: str | None = None

    def as_row(self) -> dict:
        return {
            "exchange": self.exchange,
            "symbol": self.symbol,
            "session": self.session,
            "first": self.first,
            "last": self.last,
            "detected_at": self.detected_at,
            "closed_at": self.closed_at,
            "closed_how": self.closed_how,
        }


@dataclass
class _Stream:
    session: int
    high: int  # highest number seen (0 = none yet in this session)
    low: int = 1  # lowest number the tracker can judge (a stream first seen mid-way starts there)
    gaps: list[list[int]] = field(default_factory=list)  # sorted, disjoint [first, last]
    detected: list[datetime] = field(default_factory=list)  # parallel to gaps


@dataclass
class CheckResult:
    events: np.ndarray  # int8 per input record, arrival order
    opened: list[Gap]
    closed: list[Gap]  # whole or partial ranges that closed (late arrival or accepted as too old)

    def counts(self) -> dict[str, int]:
        values = np.bincount(self.events, minlength=len(EVENT_NAMES))
        return {name: int(n) for name, n in zip(EVENT_NAMES, values)}


class SequenceTracker:
    """Tracks many streams of one exchange. Thread-safe; state can be saved and restored."""

    def __init__(self, exchange: str, *, resets_each_session: bool, max_lookback: int = 10_000_000, max_open_gaps: int = 10_000):
        self.exchange = exchange
        self.resets_each_session = resets_each_session
        self.max_lookback = max_lookback
        self.max_open_gaps = max_open_gaps
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()

    # -- checking -------------------------------------------------------------------------------

    def check(self, symbols, sequences, sessions=None, *, now: datetime | None = None) -> CheckResult:
        """Judge a batch of records (parallel arrays, arrival order)."""
        now = now or datetime.now(UTC)
        seq = np.asarray(sequences, dtype=np.int64)
        n = len(seq)
        if self.resets_each_session and sessions is None:
            raise ValueError(f"{self.exchange} numbers restart each session: pass sessions")
        session = np.full(n, NO_SESSION, np.int64) if sessions is None else _days(sessions)
        codes, names = _encode(symbols, n)
        events = np.full(n, IN_ORDER, np.int8)
        opened: list[Gap] = []
        closed: list[Gap] = []
        if n == 0:
            return CheckResult(events, opened, closed)
        with self._lock:
            # Segment by stream and session, keeping arrival order inside each segment.
            if (session == session[0]).all():
                # Small integer codes make the stable sort a radix sort.
                small = codes.astype(np.int16 if len(names) < 2**15 else np.int32)
                order = np.argsort(small, kind="stable")
            else:
                order = np.lexsort((np.arange(n), session, codes))
            c, s, q = codes[order], session[order], seq[order]
            starts = np.flatnonzero(np.r_[True, (c[1:] != c[:-1]) | (s[1:] != s[:-1])])
            ends = np.r_[starts[1:], n]
            seg_of = np.repeat(np.arange(len(starts)), ends - starts)
            # Where each segment starts from: the stream's high-water mark, or a reset, or nothing yet.
            base = np.zeros(len(starts), np.int64)
            kind = np.zeros(len(starts), np.int8)  # 0 continue, 1 reset, 2 first ever, 3 older session
            for i, st in enumerate(starts):
                stream = self._streams.get(names[c[st]])
                if stream is None:
                    kind[i] = 1 if self.resets_each_session else 2
                elif s[st] == stream.session:
                    base[i] = stream.high
                elif s[st] > stream.session:
                    kind[i] = 1
                else:
                    kind[i] = 3
            # Exclusive running maximum inside each segment (numbers < 2**40, segments < 2**22).
            shift = seg_of.astype(np.int64) << 40
            running = np.maximum.accumulate(q + shift) - shift
            prev = np.empty(n, np.int64)
            prev[1:] = running[:-1]
            prev[starts] = -1
            prev = np.maximum(prev, base[seg_of])
            prev[starts[kind == 2]] = q[starts[kind == 2]] - 1  # a stream first seen mid-way: no gap before it
            ahead = q > prev
            ev = np.where(q == prev + 1, IN_ORDER, np.where(ahead, GAP, DUPLICATE)).astype(np.int8)
            ev[starts[kind == 1]] = SESSION_RESET
            ev[starts[kind == 2]] = np.where(q[starts[kind == 2]] == 1, IN_ORDER, FIRST)
            ev[kind[seg_of] == 3] = TOO_OLD
            # Python only for the anomalies: gap openings and records behind the mark, segment by segment.
            anomalies = np.flatnonzero((q > prev + 1) | ~ahead)
            bounds = np.searchsorted(anomalies, np.r_[starts, n])
            for i, st in enumerate(starts):
                if kind[i] == 3:
                    continue
                name = names[c[st]]
                if kind[i] in (1, 2):  # a new session (or a new stream) starts from nothing
                    self._streams[name] = _Stream(int(s[st]), 0, int(q[st]) if kind[i] == 2 else 1)
                stream = self._streams[name]
                for j in anomalies[bounds[i] : bounds[i + 1]]:
                    if q[j] > prev[j]:
                        self._open(stream, name, int(prev[j]) + 1, int(q[j]) - 1, now, opened)
                    else:
                        ev[j] = self._behind(stream, name, int(q[j]), now, closed)
                stream.high = max(stream.high, int(running[ends[i] - 1]))
                closed += self._expire(stream, name, now)
            events[order] = ev
        return CheckResult(events, opened, closed)

    def _open(self, stream: _Stream, name: str, first: int, last: int, now: datetime, opened: list[Gap]) -> None:
        at = bisect.bisect_left(stream.gaps, [first, last])
        stream.gaps.insert(at, [first, last])
        stream.detected.insert(at, now)
        opened.append(Gap(self.exchange, name, stream.session, first, last, now))
        if len(stream.gaps) > self.max_open_gaps:  # bounded memory: the oldest gap is accepted as lost
            stream.gaps.pop(0)
            stream.detected.pop(0)

    def _behind(self, stream: _Stream, name: str, number: int, now: datetime, closed: list[Gap]) -> int:
        if number < stream.low or number <= stream.high - self.max_lookback:
            return TOO_OLD
        at = bisect.bisect_right(stream.gaps, [number, float("inf")]) - 1
        if at < 0 or not stream.gaps[at][0] <= number <= stream.gaps[at][1]:
            return DUPLICATE
        first, last = stream.gaps[at]
        detected = stream.detected[at]
        pieces = [p for p in ([first, number - 1], [number + 1, last]) if p[0] <= p[1]]
        stream.gaps[at : at + 1] = pieces
        stream.detected[at : at + 1] = [detected] * len(pieces)
        closed.append(Gap(self.exchange, name, stream.session, number, number, detected, now, LATE_ARRIVAL))
        return OUT_OF_ORDER

    def _expire(self, stream: _Stream, name: str, now: datetime) -> list[Gap]:
        floor = stream.high - self.max_lookback
        closed = []
        while stream.gaps and stream.gaps[0][1] <= floor:
            first, last = stream.gaps.pop(0)
            detected = stream.detected.pop(0)
            closed.append(Gap(self.exchange, name, stream.session, first, last, detected, now, ACCEPTED))
        return closed

    # -- repair and inspection ------------------------------------------------------------------------

    def open_gaps(self, symbol: str | None = None) -> list[Gap]:
        with self._lock:
            return [
                Gap(self.exchange, name, stream.session, first, last, detected)
                for name, stream in sorted(self._streams.items())
                if symbol is None or name == symbol
                for (first, last), detected in zip(stream.gaps, stream.detected)
            ]

    def close(self, symbol: str, first: int, last: int, how: str, now: datetime | None = None) -> list[Gap]:
        """Close [first, last] of a symbol's open gaps (repaired, or accepted as lost)."""
        now = now or datetime.now(UTC)
        closed = []
        with self._lock:
            stream = self._streams.get(symbol)
            if stream is None:
                return []
            kept, kept_detected = [], []
            for (lo, hi), detected in zip(stream.gaps, stream.detected):
                if hi < first or lo > last:
                    kept.append([lo, hi])
                    kept_detected.append(detected)
                    continue
                closed.append(Gap(self.exchange, symbol, stream.session, max(lo, first), min(hi, last), detected, now, how))
                for piece in ([lo, first - 1], [last + 1, hi]):
                    if piece[0] <= piece[1]:
                        kept.append(piece)
                        kept_detected.append(detected)
            stream.gaps, stream.detected = kept, kept_detected
        return closed

    # -- persistence ------------------------------------------------------------------------------------

    def state(self, *, gaps: bool = True) -> dict:
        """Everything needed to carry on after a restart (JSON-serializable); without `gaps`, only each stream's marks."""
        with self._lock:
            return {
                "exchange": self.exchange,
                "streams": {
                    name: {
                        "session": st.session,
                        "high": st.high,
                        "low": st.low,
                        "gaps": st.gaps if gaps else [],
                        "detected": [d.isoformat() for d in st.detected] if gaps else [],
                    }
                    for name, st in self._streams.items()
                },
            }

    def restore(self, state: dict) -> None:
        if state.get("exchange") != self.exchange:
            raise ValueError(f"state is for {state.get('exchange')}, not {self.exchange}")
        with self._lock:
            self._streams = {
                name: _Stream(
                    v["session"],
                    v["high"],
                    v["low"],
                    [list(g) for g in v["gaps"]],
                    [datetime.fromisoformat(d) for d in v["detected"]],
                )
                for name, v in state["streams"].items()
            }

    def dumps(self, *, gaps: bool = True) -> str:
        return json.dumps(self.state(gaps=gaps))

    @property
    def streams(self) -> int:
        return len(self._streams)


def _encode(symbols, n: int) -> tuple[np.ndarray, list[str]]:
    """Symbols (strings, Arrow or numpy) -> int codes and the names they stand for."""
    if isinstance(symbols, str):
        return np.zeros(n, np.int64), [symbols]
    array = symbols if isinstance(symbols, (pa.Array, pa.ChunkedArray)) else pa.array(np.asarray(symbols, dtype=object))
    encoded = pc.dictionary_encode(array)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), encoded.dictionary.to_pylist()


def _days(sessions) -> np.ndarray:
    if isinstance(sessions, (pa.Array, pa.ChunkedArray)):
        sessions = sessions.cast(pa.int32()).to_numpy(zero_copy_only=False)
    array = np.asarray(sessions)
    if array.dtype == object:
        array = array.astype("datetime64[D]")
    if np.issubdtype(array.dtype, np.datetime64):
        return array.astype("datetime64[D]").astype(np.int64)
    return array.astype(np.int64)
