"""What the writer records in a snapshot's summary beside its rows: the lineage that restarts, replays and fences read back.

Every commit also carries a token (offsets.BATCH_KEY) that finds it again after an error of unknown outcome.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from k2_assets.core.live_dedup import KEYS_KEY, keys_property

SOURCE = "binance_trades"
MAX_TRACKER_STATE = 64 * 1024


def offsets_value(offsets: dict[int, int]) -> str:
    """Partition -> offset as one property's value (what offsets.recorded_offsets reads)."""
    return json.dumps({str(p): o for p, o in offsets.items()})


def trades_properties(
    offsets_key: str, next_offsets: dict[int, int], day_symbols: Iterable, tracker_key: str, tracker_state: str
) -> dict[str, str]:
    """A market.trades commit's: where each partition resumes, the source, the (day, symbol)s written, the tracker's state."""
    properties = {offsets_key: offsets_value(next_offsets), "k2.source": SOURCE, KEYS_KEY: keys_property(set(day_symbols))}
    if len(tracker_state) <= MAX_TRACKER_STATE:  # kept with the offsets it belongs to; a large state is rebuilt instead
        properties[tracker_key] = tracker_state
    return properties


def rejects_properties(rejects_key: str, marks: dict[int, int], dead_key: str, dead_marks: dict[int, int]) -> dict[str, str]:
    """A market.rejected commit's: how far rejects were written, and dead letters when there are any."""
    properties = {rejects_key: offsets_value(marks)}
    if dead_marks:
        properties[dead_key] = offsets_value(dead_marks)
    return properties
