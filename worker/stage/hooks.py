"""Hooks through which the stage hands stream state to a snapshot store.

The stage calls these hooks at fixed points of a partition's life. The default,
:class:`NoStateHooks`, keeps nothing: a revoked partition's streams are dropped from
the engine and rebuilt from the input after the next assignment, from the committed
offset on.

Checkpoint protocol, for one partition ``tp`` whose committable offset moved to
``next_offset``:

1. The stage quiesces the streams that changed since the last checkpoint of ``tp``: it
   holds back their queued events until none of them has work inside the engine. It
   flushes the producer and waits until every output and dead letter of those streams
   is acknowledged by the broker, including events at or above ``next_offset``.
2. The stage calls :meth:`StreamStateHooks.checkpoint`. The hook snapshots each stream
   (for example through :meth:`StageHandle.export_stream`) and stores it, recording the
   stream's ``last_offset``. Outputs of all events up to ``last_offset`` are acknowledged.
3. Only when ``checkpoint`` returned True does the stage commit ``next_offset`` for
   ``tp``. On False (or an exception) it commits nothing and tries again at the next
   interval.
4. After the commit succeeded, the stage calls :meth:`StreamStateHooks.committed`, so the
   store can mark those snapshots committed and delete older ones.

After a restart or rebalance, the first event of a stream on a newly assigned partition
triggers :meth:`StreamStateHooks.restore`. A restored stream skips every redelivered
event whose offset is at or below the restored ``last_offset``, because the snapshot
already contains it and its output was sent. A hook that cannot load a snapshot may
instead rebuild the stream with :meth:`StageHandle.replay_stream`, which runs the
stream's earlier events through the engine again and publishes nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from aiokafka.structs import TopicPartition

if TYPE_CHECKING:
    from worker.engine import StreamSnapshot
    from worker.stage.replay import ReplayOutcome


class StageHandle(Protocol):
    """The part of the running stage that hooks may call.

    :class:`~worker.stage.worker.StageWorker` has every method. A harness without Kafka
    (a test or benchmark) may leave out ``committed_offset``, ``find_stream_ids`` and
    ``replay_stream``; hooks then neither detect lost snapshots nor replay.
    """

    async def export_stream(self, stream_id: str) -> StreamSnapshot | None:
        """Export a stream from the engine thread; None when the engine does not hold it."""

    async def import_stream(self, snapshot: StreamSnapshot) -> None:
        """Import a snapshot into the engine thread, replacing the stream if present."""

    async def committed_offset(self, tp: TopicPartition) -> int | None:
        """Return the group's committed offset of ``tp`` from the broker; None when nothing was committed."""

    async def find_stream_ids(self, tp: TopicPartition, end_offset: int) -> tuple[set[str], int]:
        """Return the stream ids with a record on ``tp`` below ``end_offset``, and the beginning offset of ``tp``."""

    async def replay_stream(self, stream_id: str, tp: TopicPartition, end_offset: int) -> ReplayOutcome:
        """Rebuild ``stream_id`` from its events on ``tp`` below ``end_offset``, publishing nothing.

        The engine runs the events only when the partition still contains the complete
        history (see :class:`worker.stage.replay.StreamHistory`). Otherwise the stream is
        left untouched and the outcome's ``complete`` is False.
        """


@runtime_checkable
class StreamStateHooks(Protocol):
    """Snapshot and restore points of the stage; every method runs on the asyncio loop."""

    #: When False the stage skips step 2 (quiescing) because nothing is snapshotted.
    snapshots_enabled: bool

    def bind(self, stage: StageHandle) -> None:
        """Receive the stage handle before the consumer starts."""

    async def on_assign(self, tps: Collection[TopicPartition]) -> None:
        """Prepare for newly assigned partitions (for example, prefetch snapshot indexes)."""

    async def restore(self, stream_id: str, tp: TopicPartition, next_offset: int | None = None) -> int | None:
        """Restore a stream into the engine before its event at ``next_offset`` on ``tp`` is applied.

        Every earlier event of the stream is done, so a replay covers the offsets below
        ``next_offset``. Returns the offset of the last event the restored snapshot
        contains, or None when the stage has nothing to skip (the stream starts empty or
        was rebuilt by replay).
        """

    async def checkpoint(
        self, tp: TopicPartition, stream_offsets: Mapping[str, int], next_offset: int
    ) -> bool:
        """Snapshot the quiesced streams of ``tp`` before ``next_offset`` is committed.

        ``stream_offsets`` maps each stream changed since the last checkpoint to the offset
        of its last applied event. Returns True when every snapshot is stored.
        """

    async def committed(self, tp: TopicPartition, next_offset: int) -> None:
        """Mark the snapshots stored for ``next_offset`` as committed."""

    async def on_revoke(self, tps: Collection[TopicPartition], stream_ids: Collection[str]) -> None:
        """Release the streams of revoked partitions, after their final commit."""


class NoStateHooks:
    """Hooks that keep no state: streams are rebuilt from the input after a rebalance."""

    snapshots_enabled = False

    def bind(self, stage: StageHandle) -> None:
        pass

    async def on_assign(self, tps: Collection[TopicPartition]) -> None:
        pass

    async def restore(self, stream_id: str, tp: TopicPartition, next_offset: int | None = None) -> int | None:
        return None

    async def checkpoint(
        self, tp: TopicPartition, stream_offsets: Mapping[str, int], next_offset: int
    ) -> bool:
        return True

    async def committed(self, tp: TopicPartition, next_offset: int) -> None:
        pass

    async def on_revoke(self, tps: Collection[TopicPartition], stream_ids: Collection[str]) -> None:
        pass
