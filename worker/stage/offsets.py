"""Per-partition offset bookkeeping: which fetched events are done, and what may be committed.

An event is done when its output (or dead letter) was acknowledged by the broker. The
committable offset of a partition is the offset of its first event that is not done, or one
past the last fetched event when all are done. A slow event at the head therefore holds the
commit back even when later events finished, so a crash makes the slow event run again
instead of skipping it.
"""

from __future__ import annotations

from collections import OrderedDict


class OffsetTracker:
    """Events of one partition in offset order, with done marks.

    Offsets must be added in increasing order (gaps are allowed, for compacted topics and
    transaction markers). Memory is proportional to the number of events not yet committed.
    """

    def __init__(self, start_offset: int | None = None) -> None:
        # offset -> done; ordered by offset because add() enforces increasing offsets.
        self._events: OrderedDict[int, bool] = OrderedDict()
        self._next_offset = start_offset  # one past the last added offset
        self._committed: int | None = None
        self._num_not_done = 0

    def add(self, offset: int) -> None:
        """Record a fetched event at ``offset``."""
        if self._next_offset is not None and offset < self._next_offset:
            raise ValueError(f"offset {offset} added after offset {self._next_offset - 1}; offsets must increase")
        self._events[offset] = False
        self._next_offset = offset + 1
        self._num_not_done += 1

    def mark_done(self, offset: int) -> bool:
        """Mark the event at ``offset`` done; returns False when it is not tracked (already released)."""
        done = self._events.get(offset)
        if done is None:
            return False
        if not done:
            self._events[offset] = True
            self._num_not_done -= 1
        self._release_done_head()
        return True

    def _release_done_head(self) -> None:
        while self._events:
            offset, done = next(iter(self._events.items()))
            if not done:
                return
            del self._events[offset]

    def committable_offset(self) -> int | None:
        """Return the offset to commit (the next one to consume), or None before any event."""
        if self._events:
            return next(iter(self._events))
        return self._next_offset

    def needs_commit(self) -> bool:
        offset = self.committable_offset()
        return offset is not None and offset != self._committed

    def set_committed(self, offset: int) -> None:
        self._committed = offset

    @property
    def committed(self) -> int | None:
        return self._committed

    @property
    def num_pending(self) -> int:
        """Number of fetched events not yet committable (not done, or behind one not done)."""
        return len(self._events)

    @property
    def num_not_done(self) -> int:
        return self._num_not_done
