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

Before its first snapshot of ``tp`` in an assignment, step 2 creates the partition's
marker key with ``covered_from``: the offset below which streams of ``tp`` may lack a
snapshot. It is 0 when nothing was lost, so a stream without a snapshot is new.

A stream whose snapshot is rejected or lost follows ``StateConfig.on_rejected``:

1. ``restore`` finds the stream's snapshot rejected (a checksum, model, engine
   configuration or format mismatch, or a damaged head key), or finds no snapshot on a partition whose
   snapshots were lost (see :meth:`RedisStateHooks._lost_below`) while the partition
   contains records of the stream below the lost offset.
2. Under ``replay``, the stage reads the partition from its beginning offset up to the
   stream's waiting event and runs the stream's events through the engine without
   publishing (:meth:`StageHandle.replay_stream`). The restore counts as ``replay``.
3. Under ``reset``, or when the partition no longer holds the stream's complete history
   (retention deleted its first events), or when reading it fails, the stream starts
   from an empty cache with an ERROR and a ``restore_error`` count.
4. A rejected chain stays the compare-and-set target of the next checkpoint, which
   writes a new base in its place. A damaged head key (the wrong Redis type, invalid
   JSON, an invalid chain) is deleted by the next checkpoint and replaced by a new base.
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
from worker.exceptions import SinkstreamError
from worker.state.exceptions import (
    ChainConflictError,
    DamagedHeadError,
    SnapshotRejectedError,
    StoreUnavailableError,
)
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
    lost: int = 0  # streams found without a snapshot on a partition whose snapshots were lost
    replayed_streams: int = 0
    replayed_events: int = 0
    resets: int = 0  # rejected or lost streams started from an empty cache


@dataclass
class _PartitionCheckpoints:
    """Checkpoint bookkeeping of one assigned partition.

    ``uncommitted`` maps checkpoint offsets to the streams whose chains were stored for
    them and are not yet marked committed.
    """

    uncommitted: dict[int, list[str]] = field(default_factory=dict)
    last_success: float = field(default_factory=time.monotonic)
    # Streams of the partition with records below this offset may have lost their
    # snapshots (0: none lost); None until checked in this assignment.
    lost_below: int | None = None
    marker_seen: bool = False  # the marker key existed in Redis during this assignment
    max_covered_offset: int = -1  # highest offset a snapshot stored by this worker contains
    lost_stream_ids: set[str] | None = None  # stream ids with records below lost_below
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


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
        self._rebase: set[str] = set()  # streams whose next snapshot replaces a rejected chain
        self._redis_down_since: float | None = None

    # -- stage hooks ----------------------------------------------------------------------

    def bind(self, stage: Any) -> None:
        self._stage = stage

    @property
    def _stage_reads_kafka(self) -> bool:
        """True when the stage handle can read offsets and replay (a StageWorker, not a test harness)."""
        return all(
            hasattr(self._stage, name) for name in ("committed_offset", "find_stream_ids", "replay_stream")
        )

    async def on_assign(self, tps: Collection[TopicPartition]) -> None:
        for tp in tps:
            self._partitions.setdefault(tp, _PartitionCheckpoints())

    async def restore(self, stream_id: str, tp: TopicPartition, next_offset: int | None = None) -> int | None:
        """Load the stream's latest chain into the engine; return the offset of its last event.

        A stream whose chain is rejected, or whose snapshot was lost, is rebuilt or reset
        as ``config.on_rejected`` selects (see the module docstring) and None is returned.
        """
        started = time.perf_counter()
        try:
            head = await self._retry_until_available(lambda: self.store.read_head(stream_id), stream_id, tp)
        except DamagedHeadError as exc:
            self.stats.rejected[exc.reason] = self.stats.rejected.get(exc.reason, 0) + 1
            # No stored chain can be the compare-and-set target, so the next checkpoint
            # finds the damaged key and replaces it with a new base.
            self._latest.pop(stream_id, None)
            self._committed.pop(stream_id, None)
            self._rebase.add(stream_id)
            return await self._rebuild(
                stream_id, tp, next_offset, started, f"its snapshot was rejected ({exc.reason}: {exc})"
            )
        chain = head.latest or head.committed
        if chain is None:
            if not await self._snapshot_lost(stream_id, tp):
                self._count_restore("new", started)
                return None
            self.stats.lost += 1
            lost_below = self._partitions[tp].lost_below
            return await self._rebuild(
                stream_id, tp, next_offset, started,
                f"its snapshot is missing although Redis lost the snapshots of the partition below offset {lost_below}",
            )
        try:
            state = await self._retry_until_available(
                lambda: self.snapshotter.load_chain(chain, self.fingerprint, self.engine_config), stream_id, tp
            )
        except SnapshotRejectedError as exc:
            self.stats.rejected[exc.reason] = self.stats.rejected.get(exc.reason, 0) + 1
            # The next checkpoint replaces the rejected chain: it must compare against the
            # stored pointers and write a base, because no delta may build on that chain.
            if head.latest is not None:
                self._latest[stream_id] = head.latest
            if head.committed is not None:
                self._committed[stream_id] = head.committed
            self._rebase.add(stream_id)
            return await self._rebuild(
                stream_id, tp, next_offset, started, f"its snapshot was rejected ({exc.reason}: {exc})"
            )
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
            if self._stage_reads_kafka:
                await self._lost_below(tp, create_marker=True)
            for stream_id, last_offset in stream_offsets.items():
                partition.max_covered_offset = max(partition.max_covered_offset, last_offset)
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
                except DamagedHeadError as exc:
                    # Only this stream is affected: its next checkpoint replaces the key.
                    logger.warning(
                        "marking the snapshot of stream %s committed at %s[%d] offset %d failed: %s; "
                        "its next checkpoint replaces the key",
                        stream_id, tp.topic, tp.partition, next_offset, exc,
                    )
                    continue
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
            self._rebase.discard(stream_id)

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
            base=stream_id in self._rebase,
        )
        self._latest[stream_id] = chain
        self._rebase.discard(stream_id)
        self.stats.snapshots_written += 1
        self.stats.bases_written += save.kind == "base"
        self.stats.bytes_written += save.stored_bytes
        if self.metrics is not None:
            self.metrics.snapshot_written(save.stored_bytes, save.encode_s + save.write_s)
        return True

    async def _snapshot_lost(self, stream_id: str, tp: TopicPartition) -> bool:
        """Return True when ``stream_id`` has no snapshot because Redis lost it, not because it is new.

        That is the case when the partition's snapshots were lost below some offset
        (:meth:`_lost_below`) and the partition contains a record of the stream below it.
        The records are read once per partition and lost offset.
        """
        if not self._stage_reads_kafka:
            return False
        lost_below = await self._retry_until_available(lambda: self._lost_below(tp), stream_id, tp)
        if lost_below == 0:
            return False
        partition = self._partitions[tp]
        async with partition.lock:
            if partition.lost_stream_ids is None:
                stream_ids, beginning = await self._stage.find_stream_ids(tp, lost_below)
                partition.lost_stream_ids = stream_ids
                logger.info(
                    "found %d streams with records at offsets %d to %d of %s[%d], where snapshots were lost",
                    len(stream_ids), beginning, lost_below - 1, tp.topic, tp.partition,
                )
        return stream_id in partition.lost_stream_ids

    async def _lost_below(self, tp: TopicPartition, create_marker: bool = False) -> int:
        """Return the offset below which streams of ``tp`` may have lost their snapshots (0: none).

        The rule, checked against the partition's marker key in Redis:

        - The marker exists: its ``covered_from`` offset.
        - The marker was seen earlier in this assignment and is gone: Redis lost its data
          since. The offset is the group's committed offset, or one past the highest
          offset a snapshot stored by this worker contained, whichever is higher.
        - Neither: the group's committed offset (0 when nothing was committed). Events
          below it were processed, so their streams had snapshots, unless Redis lost them
          or snapshots were not stored in this Redis before (another key prefix, or
          ``checkpoint.store`` newly set to ``redis``).

        ``create_marker`` writes the marker with that offset when it is missing, which
        the first checkpoint of each assignment does before storing snapshots.
        """
        partition = self._partitions.setdefault(tp, _PartitionCheckpoints())
        async with partition.lock:  # one check at a time, so a loss is logged once
            covered_from = await self.store.read_partition_marker(tp.topic, tp.partition)
            if covered_from is not None:
                lost_below = covered_from
                partition.marker_seen = True
            elif partition.marker_seen:
                committed = await self._stage.committed_offset(tp) or 0
                lost_below = max(partition.lost_below or 0, partition.max_covered_offset + 1, committed)
                logger.warning(
                    "the checkpoint marker of %s[%d] is missing from Redis although it existed earlier in this "
                    "assignment: Redis lost its data; streams with records below offset %d and no snapshot follow "
                    "on_rejected=%s",
                    tp.topic, tp.partition, lost_below, self.config.on_rejected,
                )
                partition.marker_seen = False
            elif partition.lost_below is not None:
                lost_below = partition.lost_below  # checked earlier in this assignment, marker not yet written
            else:
                lost_below = await self._stage.committed_offset(tp) or 0
                if lost_below > 0:
                    logger.warning(
                        "checkpoint marker of %s[%d] not found in Redis although the group committed offset %d, "
                        "so its snapshots were lost or never stored under prefix %r. Streams with records below "
                        "that offset and no snapshot follow on_rejected=%s",
                        tp.topic, tp.partition, lost_below, self.store.prefix, self.config.on_rejected,
                    )
            if lost_below != partition.lost_below:
                partition.lost_stream_ids = None
            partition.lost_below = lost_below
            if create_marker and covered_from is None:
                await self.store.create_partition_marker(tp.topic, tp.partition, lost_below)
                partition.marker_seen = True
            return lost_below

    async def _rebuild(
        self, stream_id: str, tp: TopicPartition, next_offset: int | None, started: float, cause: str
    ) -> None:
        """Replay or reset a stream whose snapshot cannot be used, as ``config.on_rejected`` selects."""
        if self.config.on_rejected == "reset":
            self._reset(stream_id, tp, started, f"{cause}; policy on_rejected=reset")
            return None
        if next_offset is None or not self._stage_reads_kafka:
            self._reset(stream_id, tp, started, f"{cause}; this stage cannot replay events")
            return None
        # NOTE: each rebuilt stream reads the partition from its beginning offset, so after
        # a Redis loss the read cost grows with the number of streams times the retained size.
        try:
            outcome = await self._stage.replay_stream(stream_id, tp, next_offset)
        except SinkstreamError as exc:
            self._reset(stream_id, tp, started, f"{cause}; replaying it failed: {exc}")
            return None
        if outcome.abandoned:
            logger.info("replay of stream %s on %s[%d] stopped: the partition was revoked", stream_id, tp.topic,
                        tp.partition)
            return None
        if not outcome.complete:
            self._reset(
                stream_id, tp, started,
                f"{cause}; the topic no longer holds its first events (the partition begins at offset "
                f"{outcome.beginning_offset}) and no reset or end event of it follows",
            )
            return None
        if outcome.num_events == 0:
            logger.warning(
                "stream %s on %s[%d]: %s; no event of it below offset %d remains to replay, so it starts empty",
                stream_id, tp.topic, tp.partition, cause, next_offset,
            )
            self._count_restore("new", started)
            return None
        self.stats.replayed_streams += 1
        self.stats.replayed_events += outcome.num_events
        if self.metrics is not None:
            self.metrics.replayed_events.inc(outcome.num_events)
        self._count_restore("replay", started)
        logger.warning(
            "rebuilt stream %s on %s[%d] by replaying %d events at offsets %d to %d in %.1f s "
            "(%d returned an engine error): %s",
            stream_id, tp.topic, tp.partition, outcome.num_events, outcome.first_offset, outcome.last_offset,
            time.perf_counter() - started, outcome.num_failed, cause,
        )
        return None

    def _reset(self, stream_id: str, tp: TopicPartition, started: float, cause: str) -> None:
        self.stats.resets += 1
        if self.metrics is not None:
            self.metrics.event_failed("restore_error")
        logger.error("stream %s on %s[%d] starts from an empty cache: %s", stream_id, tp.topic, tp.partition, cause)
        self._count_restore("new", started)

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


def state_config(settings: Any) -> StateConfig:
    """Build the state settings of a worker from its settings and the SINKSTREAM_STATE_* variables.

    Raises ConfigError naming each invalid value, so the worker can check before it loads the model.
    """
    from pydantic import ValidationError

    from worker.exceptions import ConfigError
    from worker.stage.settings import validation_problems

    redis_settings = settings.redis
    url = redis_settings.url
    if redis_settings.tls and url.startswith("redis://"):
        url = "rediss://" + url.removeprefix("redis://")
    try:
        return StateConfig(
            redis_url=url,
            key_prefix=redis_settings.key_prefix.rstrip(":") or "sinkstream",
            socket_timeout_s=max(redis_settings.socket_timeout_s, 1.0),
            checkpoint_interval_events=settings.checkpoint.interval_events,
            checkpoint_interval_s=settings.checkpoint.interval_s,
            max_unsafe_s=settings.checkpoint.max_unsafe_s,
            on_rejected=settings.checkpoint.on_rejected,
            max_resident_streams=settings.engine.max_resident_streams,
            max_host_streams=settings.engine.max_host_streams,
        )
    except ValidationError as exc:
        problems = "; ".join(validation_problems(exc))
        raise ConfigError(
            f"invalid state settings: {problems}; fix the SINKSTREAM_STATE_<FIELD> variable of each field "
            "(fields are listed in docs/state.md)"
        ) from None


def from_worker_settings(settings: Any, engine: Any, metrics: Any | None = None) -> RedisStateHooks:
    """Return hooks for a worker: Redis from ``settings.redis``, intervals from ``settings.checkpoint``."""
    from worker.state.engine_adapter import to_cache_state, to_engine_snapshot

    redis_settings = settings.redis
    config = state_config(settings)
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
