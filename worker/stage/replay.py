"""Reading a partition's earlier events back from Kafka, to rebuild a stream's cache.

A short-lived consumer without a group (manual assignment, nothing committed) reads one
partition from its beginning offset up to an end offset. The stage uses it for two jobs:

- :func:`read_stream_history` keeps the events of one stream, which the stage then runs
  through the engine again without publishing anything;
- :func:`read_stream_ids` collects the stream ids (record keys) that occur in the range,
  so that the state hooks can tell a stream whose snapshot was lost from a new one.

Whether a history is complete is decided by :class:`StreamHistory`, which does no I/O.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition

from worker.exceptions import SinkstreamError

READ_IDLE_TIMEOUT_S = 30.0  # give up when a partition read makes no progress for this long
FETCH_TIMEOUT_MS = 500

# Actions after which a stream's cache no longer depends on its earlier events.
RESTART_ACTIONS = ("reset", "end")


class ReplayError(SinkstreamError):
    """Reading a partition's earlier events failed or stopped making progress."""

    retriable = True


@dataclass
class StreamHistory:
    """The events of one stream read back from a partition, oldest first.

    The history is complete when it contains every event that shaped the stream's cache.
    That is the case when the partition still contains its first event ever
    (``beginning_offset == 0``), or when the history starts with a ``reset`` or ``end``
    event, because such an event makes the cache independent of the events before it. With ``beginning_offset > 0`` only the events
    from the last ``reset`` or ``end`` on are kept, because earlier ones cannot matter.
    """

    stream_id: str
    beginning_offset: int
    end_offset: int
    events: list[Any] = field(default_factory=list)  # topology.schemas.Event, in offset order
    num_records: int = 0  # records of the stream read, valid or not

    def add(self, event: Any) -> None:
        """Append ``event``; drop what it makes irrelevant when older events are gone anyway."""
        if self.beginning_offset > 0 and event.action in RESTART_ACTIONS:
            self.events.clear()
        self.events.append(event)

    @property
    def complete(self) -> bool:
        if self.beginning_offset == 0:
            return True
        return bool(self.events) and self.events[0].action in RESTART_ACTIONS

    @property
    def first_offset(self) -> int | None:
        return self.events[0].offset if self.events else None

    @property
    def last_offset(self) -> int | None:
        return self.events[-1].offset if self.events else None


@dataclass
class ReplayOutcome:
    """Result of replaying one stream; the engine ran the events only when ``complete``."""

    history: StreamHistory
    num_events: int = 0  # events run through the engine
    num_failed: int = 0  # of those, events the engine returned an error for
    abandoned: bool = False  # the partition was revoked during the replay

    @property
    def stream_id(self) -> str:
        return self.history.stream_id

    @property
    def beginning_offset(self) -> int:
        """Beginning offset of the partition when it was read."""
        return self.history.beginning_offset

    @property
    def complete(self) -> bool:
        return self.history.complete

    @property
    def first_offset(self) -> int | None:
        return self.history.first_offset

    @property
    def last_offset(self) -> int | None:
        return self.history.last_offset


class PartitionReader:
    """Reads one partition from its beginning offset up to ``end_offset``, without a group.

    Use as ``async with PartitionReader(...) as reader``; ``reader.beginning_offset`` is
    set on entry and ``reader.records()`` yields the records below ``end_offset``.
    """

    def __init__(self, kafka_kwargs: dict[str, Any], tp: TopicPartition, end_offset: int) -> None:
        self.tp = tp
        self.end_offset = end_offset
        self.beginning_offset = 0
        self._consumer = AIOKafkaConsumer(**kafka_kwargs, group_id=None, enable_auto_commit=False)

    async def __aenter__(self) -> PartitionReader:
        tp = self.tp
        try:
            await self._consumer.start()
            self._consumer.assign([tp])
            self.beginning_offset = (await self._consumer.beginning_offsets([tp]))[tp]
            # Stop at the end offset, because records above it do not exist yet.
            self.end_offset = min(self.end_offset, (await self._consumer.end_offsets([tp]))[tp])
            self._consumer.seek(tp, self.beginning_offset)
        except Exception as exc:
            await self._consumer.stop()
            raise ReplayError(f"reading {_tp_name(tp)} back from Kafka failed: {exc}") from exc
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._consumer.stop()

    async def records(self) -> AsyncIterator[ConsumerRecord]:
        """Yield every record of the partition from the beginning offset up to ``end_offset``.

        Raises :class:`ReplayError` when the broker fails, or when no record arrives for
        ``READ_IDLE_TIMEOUT_S`` while records below ``end_offset`` remain.
        """
        tp, consumer = self.tp, self._consumer
        loop = asyncio.get_running_loop()
        last_progress = loop.time()
        try:
            while await consumer.position(tp) < self.end_offset:
                records = (await consumer.getmany(tp, timeout_ms=FETCH_TIMEOUT_MS)).get(tp, [])
                if records:
                    last_progress = loop.time()
                elif loop.time() - last_progress > READ_IDLE_TIMEOUT_S:
                    raise ReplayError(
                        f"reading {_tp_name(tp)} back stalled at offset {await consumer.position(tp)}, "
                        f"below {self.end_offset}, for {READ_IDLE_TIMEOUT_S:.0f} s; check the broker"
                    )
                for record in records:
                    if record.offset >= self.end_offset:
                        return
                    yield record
        except KafkaError as exc:
            raise ReplayError(f"reading {_tp_name(tp)} back from Kafka failed: {exc}") from exc


async def read_stream_history(
    kafka_kwargs: dict[str, Any],
    tp: TopicPartition,
    stream_id: str,
    end_offset: int,
    parse: Callable[[ConsumerRecord], Any],
) -> StreamHistory:
    """Read the valid events of ``stream_id`` on ``tp`` below ``end_offset``.

    ``parse`` turns a record into an event and raises :class:`SinkstreamError` for an
    invalid one. Invalid records are skipped, because they were dead-lettered and never
    reached the cache.
    """
    key = stream_id.encode()
    async with PartitionReader(kafka_kwargs, tp, end_offset) as reader:
        history = StreamHistory(stream_id, reader.beginning_offset, end_offset)
        async for record in reader.records():
            if record.key != key:
                continue
            history.num_records += 1
            try:
                event = parse(record)
            except SinkstreamError:
                continue
            history.add(event)
    return history


async def read_stream_ids(kafka_kwargs: dict[str, Any], tp: TopicPartition, end_offset: int) -> tuple[set[str], int]:
    """Return the record keys (stream ids) found on ``tp`` below ``end_offset``, and its beginning offset."""
    stream_ids: set[str] = set()
    async with PartitionReader(kafka_kwargs, tp, end_offset) as reader:
        async for record in reader.records():
            if record.key is not None:
                stream_ids.add(record.key.decode("utf-8", "replace"))
    return stream_ids, reader.beginning_offset


def _tp_name(tp: TopicPartition) -> str:
    return f"{tp.topic}[{tp.partition}]"
