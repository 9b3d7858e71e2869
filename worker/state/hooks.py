"""Redis-backed stream state hooks: the stage's checkpoint protocol with snapshots in Redis.

The stage (:mod:`worker.stage.hooks`) drives the protocol for a partition ``tp``:

1. The stage quiesces the changed streams of ``tp``, flushes the producer and waits
   until every output of those streams is acknowledged, up to each stream's last
   applied event (which may lie above ``next_offset``).
2. :meth:`RedisStateHooks.checkpoint` exports each stream that changed since its last
   checkpoint and writes a delta (or a new base) of it, each made visible by one
   MULTI/EXEC that sets the stream's ``latest`` chain. It returns False, and the stage
   keeps the commit back, when Redis is unavailable.
3. The stage commits ``next_offset`` for ``tp``.
4. :meth:`RedisStateHooks.committed` marks those chains as the ``committed`` ones and
   deletes records that no chain references any more.

On assignment, :meth:`RedisStateHooks.restore` loads a stream's ``latest`` chain and
returns the offset of the last event it contains; the stage skips redelivered events up
to that offset. The latest chain is never older than the committed offset, because it
was written before the commit, and its outputs were acknowledged in step 1, so skipping
those events publishes nothing twice and loses nothing. A chain that is newer than the
committed offset (a crash between steps 2 and 3) only saves replay work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka.structs import TopicPartition

from worker.state.chain import Chain
from worker.state.config import StateConfig
from worker.state.exceptions import ChainConflictError, SnapshotRejectedError, StoreUnavailableError
from worker.state.snapshots import CacheState, StreamSnapshotter
from worker.state.store import SnapshotStore, make_client

logger = logging.getLogger(__name__)

RESTORE_RETRY_MAX_S = 5.0  # maximum wait between two restore attempts while Redis is down


@dataclass
class StateStats:
    """Counts of one worker's snapshot activity, for tests, the benchmark and logs."""

    snapshots_written: int = 0
    bases_written: int = 0
    bytes_written: int = 0
    restores: int = 0
    bytes_read: int = 0
    checkpoints_refused: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


@dataclass
class _PartitionCheckpoints:
    """Chains stored for one partition and not yet marked committed, by checkpoint offset."""

    uncommitted: dict[int, list[str]] = field(default_factory=dict)
    last_success: float = field(default_factory=time.monotonic)


class RedisStateHooks:
    """Implements :class:`worker.stage.hooks.StreamStateHooks` with snapshots in Redis.

    ``to_state`` turns what the stage exports into a :class:`CacheState` and
    ``from_state`` turns a loaded :class:`CacheState` into what the stage imports.
    ``fingerprint`` and ``engine_config`` describe this worker's model and engine: a
    snapshot whose header differs is rejected.
    """

    snapshots_enabled = True

    def __init__(
        self,
        config: StateConfig,
        fingerprint: str,
        engine_config: dict[str, Any],
        to_state: Callable[[Any], CacheState],
        from_state: Callable[[CacheState], Any],
        store: SnapshotStore | None = None,
        metrics: Any | None = None,
    ) -> None:
        self.config = config
        self.fingerprint = fingerprint
        self.engine_config = engine_config
        self._to_state = to_state
        self._from_state = from_state
        self.store = store or SnapshotStore(config)
        self.snapshotter = StreamSnapshotter(self.store, config)
        self.metrics = metrics
        self.stats = StateStats()
        self._stage: Any = None
        self._latest: dict[str, Chain] = {}
        self._committed: dict[str, Chain] = {}
        self._partitions: dict[TopicPartition, _PartitionCheckpoints] = {}
        self._redis_down_since: float | None = None

    # -- stage hooks ----------------------------------------------------------------------

    def bind(self, stage: Any) -> None:
        self._stage = stage

    async def on_assign(self, tps: Collection[TopicPartition]) -> None:
        for tp in tps:
            self._partitions.setdefault(tp, _PartitionCheckpoints())

    async def restore(self, stream_id: str, tp: TopicPartition) -> int | None:
        """Load the stream's latest chain into the engine; return the offset of its last event."""
        started = time.perf_counter()
        head = await self._retry_until_available(lambda: self.store.read_head(stream_id), stream_id, tp)
        chain = head.latest or head.committed
        if chain is None:
            # NOTE: a stream whose snapshots Redis lost (a restart without persistence) also
            # lands here and starts empty although its earlier events are committed; run Redis
            # with persistence (appendonly yes) where stream history matters.
            self._count_restore("new", started)
            return None
        try:
            state = await self._retry_until_available(
                lambda: self.snapshotter.load_chain(chain, self.fingerprint, self.engine_config), stream_id, tp
            )
        except SnapshotRejectedError as exc:
            return self._handle_rejected(stream_id, tp, exc)
        await self._stage.import_stream(self._from_state(state))
        self._latest[stream_id] = chain
        if head.committed is not None:
            self._committed[stream_id] = head.committed
        self.stats.restores += 1
        self.stats.bytes_read += chain.num_bytes
        self._count_restore("redis", started, chain.num_bytes)
        logger.info(
            "restored stream %s on %s[%d] from Redis: %d records, %d bytes, through offset %s",
            stream_id, tp.topic, tp.partition, len(chain.records), chain.num_bytes, chain.last_offset,
        )
        return chain.last_offset

    async def checkpoint(self, tp: TopicPartition, stream_offsets: Mapping[str, int], next_offset: int) -> bool:
        """Store a snapshot of every changed stream of ``tp``; False when Redis is unavailable."""
        partition = self._partitions.setdefault(tp, _PartitionCheckpoints())
        stored: list[str] = []
        try:
            for stream_id, last_offset in stream_offsets.items():
                if await self._snapshot_stream(stream_id, tp, last_offset):
                    stored.append(stream_id)
        except StoreUnavailableError as exc:
            self._note_redis_down(tp, next_offset, exc)
            return False
        except ChainConflictError as exc:
            # Another worker owns the stream now (this one lost the partition without
            # noticing); committing would claim events this worker no longer owns.
            logger.error(
                "checkpoint of %s[%d] at offset %d rejected: %s; not committing",
                tp.topic, tp.partition, next_offset, exc,
            )
            self.stats.checkpoints_refused += 1
            return False
        self._note_redis_up()
        partition.uncommitted.setdefault(next_offset, []).extend(stored)
        partition.last_success = time.monotonic()
        return True

    async def committed(self, tp: TopicPartition, next_offset: int) -> None:
        """Mark the chains stored for checkpoints up to ``next_offset`` of ``tp`` as committed."""
        partition = self._partitions.get(tp)
        if partition is None:
            return
        for offset in sorted(partition.uncommitted):
            if offset > next_offset:
                break
            for stream_id in partition.uncommitted[offset]:
                chain = self._latest.get(stream_id)
                if chain is None or self._committed.get(stream_id) == chain:
                    continue
                try:
                    await self.store.mark_committed(chain, self._committed.get(stream_id), chain)
                except StoreUnavailableError as exc:
                    # The latest chain already covers the commit, so restores stay correct;
                    # the mark is retried after the next commit of this partition.
                    logger.warning(
                        "marking the snapshot of stream %s committed at %s[%d] offset %d failed: %s; "
                        "retrying after the next commit",
                        stream_id, tp.topic, tp.partition, next_offset, exc,
                    )
                    return
                self._committed[stream_id] = chain
            del partition.uncommitted[offset]

    async def on_revoke(self, tps: Collection[TopicPartition], stream_ids: Collection[str]) -> None:
        for tp in tps:
            self._partitions.pop(tp, None)
        for stream_id in stream_ids:
            self._latest.pop(stream_id, None)
            self._committed.pop(stream_id, None)

    # -- checkpoint health --------------------------------------------------------------

    def unsafe_for_s(self, tp: TopicPartition, now: float | None = None) -> float:
        """Return seconds since ``tp`` last checkpointed successfully (0 while checkpoints succeed)."""
        partition = self._partitions.get(tp)
        if partition is None or self._redis_down_since is None:
            return 0.0
        return (now if now is not None else time.monotonic()) - partition.last_success

    def should_pause(self, tp: TopicPartition) -> bool:
        """Return True while ``tp`` has gone longer than ``max_unsafe_s`` without a checkpoint."""
        return self.unsafe_for_s(tp) > self.config.max_unsafe_s

    async def close(self) -> None:
        await self.store.close()

    # -- internals ------------------------------------------------------------------------

    async def _snapshot_stream(self, stream_id: str, tp: TopicPartition, last_offset: int) -> bool:
        try:
            exported = await self._stage.export_stream(stream_id)
        except KeyError:
            # StreamEngine.export_stream raises KeyError for a stream it does not know,
            # where the stage handle's contract returns None.
            exported = None
        if exported is None:
            # The engine no longer contains the stream (a drop event). Its snapshot is
            # deleted too, so a later restore does not bring back the dropped cache.
            await self.store.delete_stream(stream_id)
            self._latest.pop(stream_id, None)
            self._committed.pop(stream_id, None)
            logger.info("stream %s on %s[%d] was dropped; deleted its snapshot", stream_id, tp.topic, tp.partition)
            return False
        state = self._to_state(exported)
        chain, save = await self.snapshotter.save(
            state,
            self._latest.get(stream_id),
            self._committed.get(stream_id),
            topic=tp.topic,
            partition=tp.partition,
            last_offset=last_offset,
        )
        self._latest[stream_id] = chain
        self.stats.snapshots_written += 1
        self.stats.bases_written += save.kind == "base"
        self.stats.bytes_written += save.stored_bytes
        if self.metrics is not None:
            self.metrics.snapshot_written(save.stored_bytes, save.encode_s + save.write_s)
        return True

    def _handle_rejected(self, stream_id: str, tp: TopicPartition, exc: SnapshotRejectedError) -> None:
        self.stats.rejected[exc.reason] = self.stats.rejected.get(exc.reason, 0) + 1
        if self.metrics is not None:
            self.metrics.event_failed("restore_error")
        # NOTE: on_rejected="replay" needs the stage to seek the partition back to the
        # earliest offset it still holds and re-run the stream's events without
        # publishing; the stage has no such mode yet, so both policies start the stream
        # from an empty cache at the committed offset.
        logger.error(
            "rejected the snapshot of stream %s on %s[%d] (%s): %s; the stream starts from an empty cache "
            "(policy %s)",
            stream_id, tp.topic, tp.partition, exc.reason, exc, self.config.on_rejected,
        )
        self._count_restore("new", time.perf_counter())
        return None

    async def _retry_until_available(self, operation: Callable[[], Any], stream_id: str, tp: TopicPartition) -> Any:
        """Run ``operation`` until Redis replies, because a Redis outage must not start a stream empty."""
        delay = 0.1
        while True:
            try:
                result = await operation()
            except StoreUnavailableError as exc:
                if self._redis_down_since is None:
                    self._redis_down_since = time.monotonic()
                    logger.warning(
                        "Redis is unavailable while restoring stream %s on %s[%d]: %s; retrying until it returns",
                        stream_id, tp.topic, tp.partition, exc,
                    )
                self._set_redis_connected(False)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTORE_RETRY_MAX_S)
                continue
            self._note_redis_up()
            return result

    def _note_redis_down(self, tp: TopicPartition, next_offset: int, exc: Exception) -> None:
        self.stats.checkpoints_refused += 1
        if self.metrics is not None:
            self.metrics.snapshot_failures.inc()
        self._set_redis_connected(False)
        if self._redis_down_since is None:
            self._redis_down_since = time.monotonic()
            logger.warning(
                "checkpoint of %s[%d] at offset %d failed because Redis is unavailable: %s; "
                "processing continues and commits wait until Redis returns",
                tp.topic, tp.partition, next_offset, exc,
            )

    def _note_redis_up(self) -> None:
        if self._redis_down_since is not None:
            logger.warning(
                "Redis is available again after %.1f s; checkpoints resume", time.monotonic() - self._redis_down_since
            )
            self._redis_down_since = None
        self._set_redis_connected(True)

    def _set_redis_connected(self, connected: bool) -> None:
        if self.metrics is not None:
            self.metrics.redis_connected.set(1 if connected else 0)

    def _count_restore(self, source: str, started: float, num_bytes: int = 0) -> None:
        if self.metrics is not None:
            self.metrics.restored(source, time.perf_counter() - started, num_bytes)


def from_worker_settings(settings: Any, engine: Any, metrics: Any | None = None) -> RedisStateHooks:
    """Return hooks for a worker: Redis from ``settings.redis``, intervals from ``settings.checkpoint``."""
    from worker.state.engine_adapter import to_cache_state, to_engine_snapshot

    redis_settings = settings.redis
    url = redis_settings.url
    if redis_settings.tls and url.startswith("redis://"):
        url = "rediss://" + url.removeprefix("redis://")
    config = StateConfig(
        redis_url=url,
        key_prefix=redis_settings.key_prefix.rstrip(":") or "sinkstream",
        socket_timeout_s=max(redis_settings.socket_timeout_s, 1.0),
        checkpoint_interval_events=settings.checkpoint.interval_events,
        checkpoint_interval_s=settings.checkpoint.interval_s,
        max_unsafe_s=settings.checkpoint.max_unsafe_s,
        max_resident_streams=settings.engine.max_resident_streams,
        max_host_streams=settings.engine.max_host_streams,
    )
    connection_kwargs: dict[str, Any] = {}
    if redis_settings.password is not None:
        connection_kwargs["password"] = redis_settings.password.get_secret_value()
    if redis_settings.ssl_ca_certs is not None:
        connection_kwargs["ssl_ca_certs"] = str(redis_settings.ssl_ca_certs)
    store = SnapshotStore(config, make_client(config, **connection_kwargs))
    return RedisStateHooks(
        config,
        fingerprint=engine.loaded.fingerprint,
        engine_config=engine.snapshot_config(),
        to_state=to_cache_state,
        from_state=to_engine_snapshot,
        store=store,
        metrics=metrics,
    )
