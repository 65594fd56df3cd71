"""The live writer's dedup index, for every order in which ids can arrive."""

from __future__ import annotations

from datetime import date

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from k2_assets.core.live_dedup import SeenIndex

KEY = (date(2024, 1, 1), "BTCUSDT")
ids = st.lists(st.integers(0, 300_000), max_size=400)


@settings(max_examples=300, deadline=None)
@given(loaded=ids, batches=st.lists(ids, max_size=12), step=st.integers(1, 150_000))
def test_the_index_is_the_sorted_distinct_ids_of_everything_added(loaded, batches, step):
    """Loaded ids, then batches: growing runs (the usual case, appended in place), repeats, and ids below the
    last (merged). After each add the index is exactly the sorted distinct union, and an array read earlier
    still holds what it held (a later add must not write under it)."""
    index = SeenIndex("BINANCE")
    index.ids[KEY] = np.unique(np.array(loaded, dtype=np.int64))
    expected = set(loaded)
    earlier = []
    for i, batch in enumerate(batches):
        batch = np.array(batch, dtype=np.int64) + (i * step if i % 3 else 0)  # most batches run ahead of the last
        index.add(*KEY, batch)
        expected |= set(batch.tolist())
        now = index.ids[KEY]
        assert now.tolist() == sorted(expected)
        assert SeenIndex.contains(now, np.array(sorted(expected), dtype=np.int64)).all()
        earlier.append((now, now.tolist()))
    assert all(array.tolist() == held for array, held in earlier)
