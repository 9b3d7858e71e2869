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
already contains it and its output was sent.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from aiokafka.structs import TopicPartition

if TYPE_CHECKING:
    from worker.engine import StreamSnapshot


class StageHandle(Protocol):
    """The part of the running stage that hooks may call."""

    async def export_stream(self, stream_id: str) -> StreamSnapshot | None:
        """Export a stream from the engine thread; None when the engine does not hold it."""

    async def import_stream(self, snapshot: StreamSnapshot) -> None:
        """Import a snapshot into the engine thread, replacing the stream if present."""


@runtime_checkable
class StreamStateHooks(Protocol):
    """Snapshot and restore points of the stage; every method runs on the asyncio loop."""

    #: When False the stage skips step 2 (quiescing) because nothing is snapshotted.
    snapshots_enabled: bool

    def bind(self, stage: StageHandle) -> None:
        """Receive the stage handle before the consumer starts."""

    async def on_assign(self, tps: Collection[TopicPartition]) -> None:
        """Prepare for newly assigned partitions (for example, prefetch snapshot indexes)."""

    async def restore(self, stream_id: str, tp: TopicPartition) -> int | None:
        """Restore a stream into the engine before its first event on ``tp`` is applied.

        Returns the offset of the last event the restored snapshot contains, or None when
        no snapshot was restored and the stream starts empty.
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

    async def restore(self, stream_id: str, tp: TopicPartition) -> int | None:
        return None

    async def checkpoint(
        self, tp: TopicPartition, stream_offsets: Mapping[str, int], next_offset: int
    ) -> bool:
        return True

    async def committed(self, tp: TopicPartition, next_offset: int) -> None:
        pass

    async def on_revoke(self, tps: Collection[TopicPartition], stream_ids: Collection[str]) -> None:
        pass
