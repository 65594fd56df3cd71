"""What the writer records in a snapshot's summary beside its rows: the lineage that restarts, replays and fences read back.

Every commit also carries a token (offsets.BATCH_KEY) that finds it again after an error of unknown outcome.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from k2_assets.core.live_dedup import KEYS_KEY, keys_property
from k2_assets.core.sequence import SequenceTracker

SOURCE = "binance_trades"
MAX_TRACKER_STATE = 64 * 1024  # every snapshot kept carries its summary in each metadata.json: bounded


def offsets_value(offsets: dict[int, int]) -> str:
    """Partition -> offset as one property's value (what offsets.recorded_offsets reads)."""
    return json.dumps({str(p): o for p, o in offsets.items()})


def trades_properties(
    offsets_key: str, next_offsets: dict[int, int], day_symbols: Iterable, tracker_key: str, tracker_state: str
) -> dict[str, str]:
    """A market.trades commit's: where each partition resumes, the source, the (day, symbol)s written, the tracker's state."""
    return {
        offsets_key: offsets_value(next_offsets),
        "k2.source": SOURCE,
        KEYS_KEY: keys_property(set(day_symbols)),
        tracker_key: tracker_state,
    }


def tracker_state(tracker: SequenceTracker) -> tuple[str, str]:
    """The tracker's state for a commit, within MAX_TRACKER_STATE, and how much of it that is ("whole", "no gaps", "none").

    Every commit records one, so a restart never resumes from an older commit's state: its high-water marks are
    behind the trades written since, and each would open a false gap. Too large whole (a gap storm), the state
    drops its open gaps; they stay in market.sequence_gaps for repair, and a late fill of one counts as a
    duplicate. Too large even so (thousands of symbols), it records no streams: a restart sees each symbol
    afresh, and a gap across the restart is left to the day's sequence check."""
    whole = tracker.dumps()
    if len(whole) <= MAX_TRACKER_STATE:
        return whole, "whole"
    marks = tracker.dumps(gaps=False)
    if len(marks) <= MAX_TRACKER_STATE:
        return marks, "no gaps"
    return json.dumps({"exchange": tracker.exchange, "streams": {}}), "none"


def rejects_properties(rejects_key: str, marks: dict[int, int], dead_key: str, dead_marks: dict[int, int]) -> dict[str, str]:
    """A market.rejected commit's: how far rejects were written, and dead letters when there are any."""
    properties = {rejects_key: offsets_value(marks)}
    if dead_marks:
        properties[dead_key] = offsets_value(dead_marks)
    return properties
