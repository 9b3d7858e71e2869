"""Saving and loading one stream's cache as a chain of base and delta records."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.state.chain import Chain
from worker.state.config import StateConfig
from worker.state.exceptions import ChainConflictError, DamagedHeadError, SnapshotRejectedError
from worker.state.format import SnapshotRecord, apply_chain, decode_record, encode_record
from worker.state.slots import changed_slots
from worker.state.store import SnapshotStore

logger = logging.getLogger(__name__)


@dataclass
class CacheState:
    """A stream's cache as the engine stores it, in the terms of the snapshot format.

    ``keys`` and ``values`` are ``[num_layers, num_kv_heads, slots, head_dim]`` in the
    cache dtype, keys as the engine stores them. ``slots`` is the used physical prefix
    when exported from the engine and up to the capacity when rebuilt from deltas. ``metadata`` is JSON-serialisable and
    must contain ``tokens_written`` (tokens written into the cache since the stream
    started or was reset) and may contain ``cache_epoch``, a string that changes whenever
    the engine rewrote the cache in a way token counts do not show (a reset, a restart
    after an end, a rebase of the window keys); ``engine_config`` must contain
    ``sink_tokens`` and ``window_tokens``.
    """

    stream_id: str
    fingerprint: str
    engine_config: dict[str, Any]
    metadata: dict[str, Any]
    keys: torch.Tensor
    values: torch.Tensor

    @property
    def tokens_written(self) -> int:
        return int(self.metadata["tokens_written"])

    @property
    def cache_epoch(self) -> str:
        return str(self.metadata.get("cache_epoch", ""))

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[2])


@dataclass
class SaveStats:
    """Sizes and durations of one save."""

    kind: str
    num_slots: int
    raw_bytes: int
    stored_bytes: int
    encode_s: float
    write_s: float
    codecs: dict[str, str] = field(default_factory=dict)


def plan_delta(previous: Chain | None, state: CacheState, max_deltas: int) -> list[int] | None:
    """Return the slots a delta on top of ``previous`` must hold, or None when a new base is due.

    A base is due when there is no previous chain, when the stream was reset, when its
    ``cache_epoch`` differs from the chain's (a reset, a restart after an end or a rebase
    of the window keys rewrote slots that token counts do not show), or when the chain
    already has ``max_deltas`` deltas. It is also due when the deltas would
    together rewrite at least as many slots as the cache has, because then a base is
    smaller than the deltas.
    """
    if previous is None or not previous.records or max_deltas == 0:
        return None
    if len(previous.records) - 1 >= max_deltas:
        return None
    if str(previous.extra.get("cache_epoch", "")) != state.cache_epoch:
        return None
    slots = changed_slots(
        previous.tokens_written,
        state.tokens_written,
        int(state.engine_config["sink_tokens"]),
        int(state.engine_config["window_tokens"]),
    )
    if slots is None:
        return None
    delta_slots_so_far = int(previous.extra.get("delta_slots", 0))
    if delta_slots_so_far + len(slots) >= state.capacity:
        return None
    return slots


class StreamSnapshotter:
    """Encodes cache states into records, stores them and loads them back."""

    def __init__(self, store: SnapshotStore, config: StateConfig) -> None:
        self.store = store
        self.config = config

    async def save(
        self,
        state: CacheState,
        previous: Chain | None,
        committed: Chain | None,
        topic: str | None = None,
        partition: int | None = None,
        last_offset: int | None = None,
        base: bool = False,
    ) -> tuple[Chain, SaveStats]:
        """Write a delta or a new base for ``state`` and make it the stream's latest chain.

        ``previous`` is the chain this worker last wrote or loaded for the stream. When
        Redis no longer holds it (a restart without persistence), a new base is written in
        its place; when another worker replaced it, :class:`ChainConflictError` is raised.
        ``base=True`` writes a new base that replaces ``previous`` (for a chain that was
        rejected on load, so no delta may build on it). When the stream's head key is
        damaged (see :class:`DamagedHeadError`), a new base replaces the key.
        """
        try:
            return await self._save(state, previous, committed, topic, partition, last_offset, base)
        except DamagedHeadError as exc:
            logger.warning(
                "%s; replacing the key with a new base of stream %s from the cache in memory",
                exc, state.stream_id,
            )
            return await self._save(state, None, None, topic, partition, last_offset, True, replace_damaged=True)
        except ChainConflictError as exc:
            if exc.current is not None or previous is None:
                raise
            logger.warning(
                "the snapshot chain of stream %s is missing from Redis (deleted by 'sinkstream snapshots rm', or lost "
                "when Redis restarted without persistence); writing a new base from the cache in memory",
                state.stream_id,
            )
            return await self._save(state, None, None, topic, partition, last_offset, True)

    async def _save(
        self,
        state: CacheState,
        previous: Chain | None,
        committed: Chain | None,
        topic: str | None,
        partition: int | None,
        last_offset: int | None,
        base: bool,
        replace_damaged: bool = False,
    ) -> tuple[Chain, SaveStats]:
        started = time.perf_counter()
        slots = None if base else plan_delta(previous, state, self.config.max_deltas)
        metadata = dict(state.metadata, topic=topic, partition=partition, last_offset=last_offset)
        if slots is None:
            record = SnapshotRecord("base", state.fingerprint, state.engine_config, metadata, state.keys, state.values)
        else:
            index = torch.tensor(slots, dtype=torch.long, device=state.keys.device)
            record = SnapshotRecord(
                "delta",
                state.fingerprint,
                state.engine_config,
                metadata,
                state.keys.index_select(2, index),
                state.values.index_select(2, index),
                slots=slots,
            )
        data, encode_stats = encode_record(
            record, self.config.compression, self.config.compression_level, self.config.min_compression_gain
        )
        encoded = time.perf_counter()

        ref = await self.store.write_record(state.stream_id, data, record.kind)
        if slots is None:
            records, delta_slots = [ref], 0
        else:
            assert previous is not None
            records = [*previous.records, ref]
            delta_slots = int(previous.extra.get("delta_slots", 0)) + len(slots)
        chain = Chain(
            records=records,
            stream_id=state.stream_id,
            topic=topic,
            partition=partition,
            last_offset=last_offset,
            tokens_written=state.tokens_written,
            created_at=time.time(),
            extra={"delta_slots": delta_slots, "cache_epoch": state.cache_epoch},
        )
        await self.store.publish(chain, [ref], previous, committed, replace_damaged=replace_damaged)
        stats = SaveStats(
            kind=record.kind,
            num_slots=state.capacity if slots is None else len(slots),
            raw_bytes=encode_stats.raw_bytes,
            stored_bytes=encode_stats.stored_bytes,
            encode_s=encoded - started,
            write_s=time.perf_counter() - encoded,
            codecs=encode_stats.codecs,
        )
        logger.debug(
            "stored %s of stream %s (%d slots, %d bytes, last offset %s)",
            record.kind, state.stream_id, stats.num_slots, stats.stored_bytes, last_offset,
        )
        return chain, stats

    async def load_chain(
        self, chain: Chain, fingerprint: str | None, engine_config: dict[str, Any] | None
    ) -> CacheState:
        """Read, validate and fold every record of ``chain``; raises SnapshotRejectedError."""
        records = []
        for ref in chain.records:
            data = await self.store.read_record(chain.stream_id, ref)
            records.append(decode_record(data, fingerprint, engine_config))
        folded = apply_chain(records)
        if folded.metadata.get("stream_id", chain.stream_id) != chain.stream_id:
            raise SnapshotRejectedError(
                "chain", f"snapshot of stream {folded.metadata.get('stream_id')!r} is stored under {chain.stream_id!r}"
            )
        return CacheState(
            stream_id=chain.stream_id,
            fingerprint=folded.fingerprint,
            engine_config=folded.engine_config,
            metadata=folded.metadata,
            keys=folded.keys,
            values=folded.values,
        )
