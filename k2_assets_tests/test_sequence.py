"""The sequence tracker on its own: every event type, isolation, splitting, resets, persistence, threads."""

from __future__ import annotations

import json
import threading
from datetime import date

import numpy as np
import pytest

from k2_assets.core.live_properties import MAX_TRACKER_STATE, tracker_state
from k2_assets.core.sequence import (
    DUPLICATE,
    EVENT_NAMES,
    FIRST,
    GAP,
    IN_ORDER,
    LATE_ARRIVAL,
    OUT_OF_ORDER,
    SESSION_RESET,
    TOO_OLD,
    SequenceTracker,
)

MON, TUE = date(2014, 3, 10), date(2014, 3, 11)


def names(result):
    return [EVENT_NAMES[e] for e in result.events]


def gaps(tracker, symbol=None):
    return [(g.first, g.last) for g in tracker.open_gaps(symbol)]


def binance():
    return SequenceTracker("BINANCE", resets_each_session=False)


def test_every_event_type():
    t = binance()
    r = t.check(["BTC"] * 9, [100, 101, 104, 105, 102, 102, 101, 50, 106])
    assert names(r) == ["first", "in_order", "gap", "in_order", "out_of_order", "duplicate", "duplicate", "too_old", "in_order"]
    assert [(g.first, g.last) for g in r.opened] == [(102, 103)]
    assert [(g.first, g.last, g.closed_how) for g in r.closed] == [(102, 102, LATE_ARRIVAL)]
    assert gaps(t) == [(103, 103)]


def test_a_late_arrival_inside_a_gap_splits_it_in_two():
    t = binance()
    t.check(["X"] * 2, [1, 20])
    assert gaps(t) == [(2, 19)]
    r = t.check(["X"], [10])
    assert names(r) == ["out_of_order"]
    assert gaps(t) == [(2, 9), (11, 19)]
    t.check(["X"] * 2, [2, 19])
    assert gaps(t) == [(3, 9), (11, 18)]
    assert names(t.check(["X"], [10])) == ["duplicate"]  # filled once, so now a duplicate


def test_duplicates_are_not_reported_as_out_of_order():
    """The earlier K2 called every repeat 'out of order'."""
    t = binance()
    t.check(["X"] * 3, [7, 8, 9])
    assert names(t.check(["X"] * 3, [8, 9, 7])) == ["duplicate"] * 3
    assert names(t.check(["X"] * 2, [10, 10])) == ["in_order", "duplicate"]  # dedup inside one batch


def test_asx_sessions_reset_and_binance_ids_never_do():
    """The earlier K2's reset detection could never fire."""
    asx = SequenceTracker("ASX", resets_each_session=True)
    assert names(asx.check(["BHP"] * 3, [1, 2, 3], [MON] * 3)) == ["session_reset", "in_order", "in_order"]
    r = asx.check(["BHP"] * 3, [1, 2, 4], [TUE] * 3)
    assert names(r) == ["session_reset", "in_order", "gap"]
    assert [(g.session, g.first, g.last) for g in r.opened] == [(np.datetime64(TUE, "D").astype(int), 3, 3)]
    assert names(asx.check(["BHP"], [3], [MON])) == ["too_old"]  # the previous session is over
    with pytest.raises(ValueError, match="sessions"):
        asx.check(["BHP"], [1])
    b = binance()
    b.check(["BTC"] * 2, [5_000_000, 5_000_001])
    assert names(b.check(["BTC"], [1])) == ["too_old"]  # a small id is never a reset on Binance


def test_a_session_that_starts_late_opens_a_gap_from_one():
    asx = SequenceTracker("ASX", resets_each_session=True)
    r = asx.check(["RIO"] * 2, [4, 5], [MON] * 2)
    assert names(r) == ["session_reset", "in_order"] and [(g.first, g.last) for g in r.opened] == [(1, 3)]


def test_symbols_and_exchanges_are_isolated():
    t = binance()
    r = t.check(["A", "B", "A", "B", "A"], [1, 1, 2, 3, 4])
    assert names(r) == ["in_order", "in_order", "in_order", "gap", "gap"]
    assert gaps(t, "A") == [(3, 3)] and gaps(t, "B") == [(2, 2)]
    other = SequenceTracker("ASX", resets_each_session=True)
    other.check(["A"], [1], [MON])
    assert gaps(other) == [] and gaps(t, "A") == [(3, 3)]


def test_binance_trade_ids_reveal_gaps_on_real_data(btcusdt_dir):
    """The earlier K2 ignored Binance trade ids, so no gap was ever seen on real data."""
    import csv

    with open(btcusdt_dir / "BTCUSDT-trades-2024-01-01_1200-1230.derived.csv") as f:
        ids = [int(r[0]) for r in list(csv.reader(f))[1:]]
    removed = {ids[500], *ids[1000:1010], ids[-2]}
    kept = [i for i in ids if i not in removed]
    t = binance()
    result = t.check(np.array(["BTCUSDT"] * len(kept), dtype=object), np.array(kept))
    assert gaps(t) == [(ids[500], ids[500]), (ids[1000], ids[1009]), (ids[-2], ids[-2])]
    counts = result.counts()
    assert (counts["first"], counts["gap"], counts["in_order"]) == (1, 3, len(kept) - 4)


def test_old_gaps_are_accepted_outside_the_look_back_window():
    t = SequenceTracker("BINANCE", resets_each_session=False, max_lookback=100)
    t.check(["X"] * 2, [1, 10])
    r = t.check(["X"], [200])
    assert [(g.first, g.last, g.closed_how) for g in r.closed] == [(2, 9, "accepted")]
    assert gaps(t) == [(11, 199)]
    assert names(t.check(["X"], [5])) == ["too_old"]


def test_close_for_repair_closes_exactly_the_range():
    t = binance()
    t.check(["X"] * 2, [1, 30])
    closed = t.close("X", 10, 12, "repair")
    assert [(g.first, g.last, g.closed_how) for g in closed] == [(10, 12, "repair")]
    assert gaps(t) == [(2, 9), (13, 29)]


def test_state_survives_a_restart():
    t = binance()
    t.check(["A", "A", "B"], [1, 5, 9])
    restored = binance()
    restored.restore(t.state())
    assert gaps(restored) == gaps(t) == [(2, 4)]
    assert names(restored.check(["A", "A", "B"], [3, 6, 9])) == ["out_of_order", "in_order", "duplicate"]
    with pytest.raises(ValueError):
        SequenceTracker("ASX", resets_each_session=True).restore(t.state())


def test_vectorized_batch_equals_one_by_one():
    rng = np.random.default_rng(5)
    symbols = rng.choice(["A", "B", "C"], 3000)
    sequences = np.concatenate([np.arange(1000) for _ in range(3)])[rng.permutation(3000)] // 2 + rng.integers(0, 3, 3000)
    batch, single = binance(), binance()
    together = batch.check(symbols, sequences).events
    one_by_one = np.concatenate([single.check([s], [q]).events for s, q in zip(symbols, sequences)])
    assert together.tolist() == one_by_one.tolist()
    assert gaps(batch) == gaps(single)


def test_threads_feeding_one_tracker_lose_nothing():
    t = binance()
    results = {}

    def feed(symbol):
        events = [t.check([symbol] * 100, np.arange(k * 100 + 1, k * 100 + 101)).events for k in range(50)]
        results[symbol] = np.concatenate(events)

    threads = [threading.Thread(target=feed, args=(f"S{i}",)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all((r == IN_ORDER).all() for r in results.values())
    assert t.streams == 8 and gaps(t) == []


def test_event_codes_are_stable():
    assert (IN_ORDER, GAP, DUPLICATE, OUT_OF_ORDER, TOO_OLD, SESSION_RESET, FIRST) == tuple(range(7))


def test_a_state_too_large_to_record_keeps_the_marks_then_nothing():
    """What a commit records stays under its bound: whole, then without open gaps, then no streams at all, never a
    state whose marks a restart would trust while they are behind."""
    storm = SequenceTracker("BINANCE", resets_each_session=False)
    storm.check(np.full(2000, "BTCUSDT"), np.arange(1, 4001, 2))  # 1,999 open gaps
    state, kept = tracker_state(storm)
    assert kept == "no gaps" and len(state) <= MAX_TRACKER_STATE < len(storm.dumps())
    restored = SequenceTracker("BINANCE", resets_each_session=False)
    restored.restore(json.loads(state))
    assert restored.check(["BTCUSDT"], [4000]).counts()["in_order"] == 1 and gaps(restored) == []

    many = SequenceTracker("BINANCE", resets_each_session=False)
    many.check([f"SYM{i:05d}USDT" for i in range(5000)], np.arange(5000) * 1000 + 10**12)
    state, kept = tracker_state(many)
    assert kept == "none" and json.loads(state) == {"exchange": "BINANCE", "streams": {}}
    restored = SequenceTracker("BINANCE", resets_each_session=False)
    restored.restore(json.loads(state))
    assert restored.check(["SYM00001USDT"], [10**12 + 5000]).counts()["first"] == 1  # afresh: no false gap

    small = SequenceTracker("BINANCE", resets_each_session=False)
    small.check(["BTCUSDT", "BTCUSDT"], [1, 5])
    assert tracker_state(small) == (small.dumps(), "whole")
