"""The live writer's dedup index, for every order in which ids can arrive: ids kept as runs."""

from __future__ import annotations

from datetime import date

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from k2_assets.core.id_runs import IdRuns
from k2_assets.core.live_dedup import SeenIndex

KEY = (date(2024, 1, 1), "BTCUSDT")
ids = st.lists(st.integers(0, 3_000), max_size=400)


def canonical(runs: IdRuns) -> bool:
    """Sorted, each run non-empty, no two runs overlapping or touching."""
    starts, ends = runs.starts, runs.ends
    return bool((starts <= ends).all() and (starts[1:] > ends[:-1] + 1).all())


@settings(max_examples=300, deadline=None)
@given(loaded=ids, batches=st.lists(ids, max_size=12), step=st.integers(1, 1_500), start_at=st.integers(-5, 200))
def test_the_index_holds_exactly_the_ids_added_and_their_holes(loaded, batches, step, start_at):
    """Loaded ids, then batches: runs that carry on from the last id (the usual case), repeats, and ids below the
    last. After each add the index holds exactly the distinct union, in canonical runs; membership, the last id and
    the holes agree with that set, and runs read earlier still hold what they held."""
    index = SeenIndex("BINANCE")
    index.ids[KEY] = IdRuns.of(loaded)
    expected = set(loaded)
    earlier = []
    for i, batch in enumerate(batches):
        batch = np.array(batch, dtype=np.int64) + (i * step if i % 3 else 0)  # most batches run ahead of the last
        index.add(*KEY, batch)
        expected |= set(batch.tolist())
        runs = index.ids[KEY]
        assert canonical(runs) and runs.count() == len(expected)
        probe = np.arange(-2, max(expected, default=0) + 3, dtype=np.int64)
        assert runs.contains(probe).tolist() == [int(v) in expected for v in probe]
        assert runs.last == max(expected, default=None)
        earlier.append((runs, sorted(expected)))
    for runs, held in earlier:
        assert [v for s, e in zip(runs.starts, runs.ends) for v in range(s, e + 1)] == held
    if expected:
        present = sorted(expected)
        first = present[0] if start_at >= present[0] else start_at
        missing = sorted(set(range(first, present[-1] + 1)) - expected)
        holes = index.ids[KEY].holes(start_at)
        assert [v for a, b in holes for v in range(a, b + 1)] == missing
        assert all(a <= b for a, b in holes) and len(holes) == len(index.ids[KEY].starts) - 1 + (start_at < present[0])


def test_a_day_of_contiguous_ids_is_one_run():
    """Millions of ids a day in a handful of numbers: the writer's memory does not grow with the day."""
    runs = IdRuns.of(np.arange(1_000_000, dtype=np.int64))
    for start in range(1_000_000, 5_000_000, 250_000):
        runs = runs.union(np.arange(start, start + 250_000, dtype=np.int64))
    assert (runs.starts.tolist(), runs.ends.tolist()) == ([0], [4_999_999]) and runs.count() == 5_000_000
