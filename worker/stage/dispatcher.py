"""Per-stream FIFO dispatch of events to the engine.

Events of one stream leave the dispatcher strictly in the order they were admitted, which
is offset order because a stream lives in one partition. Streams take turns, so one busy
stream cannot fill the engine's queue while others wait. A stream can be held (while it is
restored or snapshotted); its events then wait until it is released. An item whose
``exclusive`` attribute is true (a reset or drop) leaves only when none of its stream's
events is in flight, and no later event of the stream leaves before it completes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Generic, Protocol, TypeVar


class HasStreamId(Protocol):
    stream_id: str


ItemT = TypeVar("ItemT", bound=HasStreamId)


class StreamDispatcher(Generic[ItemT]):
    """Queues events per stream and hands them out round-robin under an in-flight limit.

    ``max_in_flight`` bounds the events handed out and not yet completed, over all streams.
    ``max_in_flight_per_stream`` bounds them per stream: the engine runs one request of a
    stream at a time, so two (one running, one waiting) keep a stream busy.
    """

    def __init__(self, max_in_flight: int, max_in_flight_per_stream: int = 2) -> None:
        if max_in_flight < 1 or max_in_flight_per_stream < 1:
            raise ValueError(
                f"max_in_flight={max_in_flight} and max_in_flight_per_stream={max_in_flight_per_stream} must be >= 1"
            )
        self.max_in_flight = max_in_flight
        self.max_in_flight_per_stream = max_in_flight_per_stream
        self._queues: dict[str, deque[ItemT]] = {}
        self._ready: deque[str] = deque()  # streams that may hand out an event, each at most once
        self._in_ready: set[str] = set()
        self._in_flight: dict[str, int] = {}
        self._held: set[str] = set()
        self._exclusive: set[str] = set()  # streams whose in-flight event must run alone
        self.num_in_flight = 0
        self.num_queued = 0

    def admit(self, item: ItemT) -> None:
        """Queue ``item`` behind the earlier events of its stream."""
        self._queues.setdefault(item.stream_id, deque()).append(item)
        self.num_queued += 1
        self._mark_ready(item.stream_id)

    def take(self, limit: int | None = None) -> list[ItemT]:
        """Hand out events to submit now, in per-stream order, alternating between streams."""
        taken: list[ItemT] = []
        free = self.max_in_flight - self.num_in_flight
        if limit is not None:
            free = min(free, limit)
        while free > 0 and self._ready:
            stream_id = self._ready.popleft()
            self._in_ready.discard(stream_id)
            queue = self._queues.get(stream_id)
            if not queue or not self._may_take(stream_id, queue[0]):
                continue
            item = queue.popleft()
            if getattr(item, "exclusive", False):
                self._exclusive.add(stream_id)
            taken.append(item)
            self.num_queued -= 1
            self.num_in_flight += 1
            self._in_flight[stream_id] = self._in_flight.get(stream_id, 0) + 1
            free -= 1
            if not queue:
                del self._queues[stream_id]
            else:
                self._mark_ready(stream_id)
        return taken

    def _may_take(self, stream_id: str, item: ItemT) -> bool:
        if stream_id in self._held or stream_id in self._exclusive:
            return False
        num_in_flight = self._in_flight.get(stream_id, 0)
        if getattr(item, "exclusive", False):
            return num_in_flight == 0
        return num_in_flight < self.max_in_flight_per_stream

    def complete(self, stream_id: str) -> None:
        """Record that one handed-out event of ``stream_id`` finished in the engine."""
        count = self._in_flight.get(stream_id, 0)
        assert count > 0, f"stream {stream_id!r} completed an event it did not have in flight"
        if count == 1:
            del self._in_flight[stream_id]
            self._exclusive.discard(stream_id)
        else:
            self._in_flight[stream_id] = count - 1
        self.num_in_flight -= 1
        self._mark_ready(stream_id)

    def hold(self, stream_id: str) -> None:
        """Stop handing out events of ``stream_id`` until :meth:`release`."""
        self._held.add(stream_id)

    def release(self, stream_id: str) -> None:
        self._held.discard(stream_id)
        self._mark_ready(stream_id)

    def is_held(self, stream_id: str) -> bool:
        return stream_id in self._held

    def in_flight(self, stream_id: str) -> int:
        return self._in_flight.get(stream_id, 0)

    def queued(self, stream_id: str) -> int:
        return len(self._queues.get(stream_id, ()))

    def discard(self, predicate: Callable[[ItemT], bool]) -> list[ItemT]:
        """Remove and return the queued (not handed out) events matching ``predicate``."""
        removed: list[ItemT] = []
        for stream_id in list(self._queues):
            queue = self._queues[stream_id]
            kept = deque(item for item in queue if not predicate(item))
            removed.extend(item for item in queue if predicate(item))
            if kept:
                self._queues[stream_id] = kept
            else:
                del self._queues[stream_id]
        self.num_queued -= len(removed)
        return removed

    def forget(self, stream_ids: Iterable[str]) -> None:
        """Drop in-flight counts of streams whose engine work was abandoned."""
        for stream_id in stream_ids:
            self.num_in_flight -= self._in_flight.pop(stream_id, 0)
            self._held.discard(stream_id)
            self._exclusive.discard(stream_id)

    def _mark_ready(self, stream_id: str) -> None:
        if stream_id in self._queues and stream_id not in self._in_ready:
            self._ready.append(stream_id)
            self._in_ready.add(stream_id)
