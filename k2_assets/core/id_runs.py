"""A set of sequence numbers as runs: sorted, disjoint inclusive ranges [start, end], no two touching.

Exchange sequence numbers arrive nearly contiguous, so a day of millions of trade ids is a few runs (one more
per hole), not an array of every id: the live writer's dedup index stays small and its holes are read off directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_NONE = np.empty(0, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class IdRuns:
    starts: np.ndarray
    ends: np.ndarray

    @classmethod
    def of(cls, ids) -> IdRuns:
        """The runs of any ids, in any order, repeats included."""
        values = np.asarray(ids, dtype=np.int64)
        if values.size > 1 and not (values[1:] > values[:-1]).all():  # sort only what is not sorted already
            values = np.unique(values)
        if not values.size:
            return cls(_NONE, _NONE)
        breaks = np.flatnonzero(np.diff(values) > 1)
        return cls(values[np.r_[0, breaks + 1]], values[np.r_[breaks, values.size - 1]])

    def count(self) -> int:
        """How many ids."""
        return int((self.ends - self.starts + 1).sum())

    @property
    def last(self) -> int | None:
        return int(self.ends[-1]) if self.ends.size else None

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Membership of each id, by binary search over the runs."""
        if not self.starts.size:
            return np.zeros(len(ids), dtype=bool)
        at = np.searchsorted(self.starts, ids, side="right") - 1
        return (at >= 0) & (ids <= self.ends[np.maximum(at, 0)])

    def union(self, ids) -> IdRuns:
        """These runs and `ids`; the usual batch runs on from the last id and costs only its own runs."""
        new = IdRuns.of(ids)
        if not new.starts.size:
            return self
        if not self.starts.size:
            return new
        if new.starts[0] > self.ends[-1] + 1:
            return IdRuns(np.concatenate([self.starts, new.starts]), np.concatenate([self.ends, new.ends]))
        if new.starts[0] == self.ends[-1] + 1:  # carries on from the last id: the last run grows
            return IdRuns(np.concatenate([self.starts, new.starts[1:]]), np.concatenate([self.ends[:-1], new.ends]))
        starts, ends = np.concatenate([self.starts, new.starts]), np.concatenate([self.ends, new.ends])
        order = np.argsort(starts, kind="stable")
        starts, ends = starts[order], np.maximum.accumulate(ends[order])
        begins = np.flatnonzero(np.r_[True, starts[1:] > ends[:-1] + 1])
        return IdRuns(starts[begins], ends[np.r_[begins[1:] - 1, starts.size - 1]])

    def holes(self, start_at: int | None = None) -> list[tuple[int, int]]:
        """The missing ranges between the runs; from `start_at` when the numbering starts there."""
        if not self.starts.size:
            return []
        found = [(int(a) + 1, int(b) - 1) for a, b in zip(self.ends[:-1], self.starts[1:])]
        if start_at is not None and self.starts[0] > start_at:
            found.insert(0, (start_at, int(self.starts[0]) - 1))
        return found
