"""Snapshot records and chain pointers in Redis (redis.asyncio).

Write path, for one stream:

1. Each record is split into chunks of at most ``chunk_max_bytes`` and written under a
   fresh record id with SET ... EX ``orphan_ttl_s``, in pipelines of at most
   ``pipeline_max_bytes``. Nothing points at these keys yet, so a reader never sees
   them, and the chunks of a writer that crashes here expire on their own.
2. One MULTI/EXEC sets the stream's ``latest`` chain and PERSISTs the new chunks.
3. Records of the previous chain that neither ``latest`` nor ``committed`` references
   are deleted.

Every I/O call runs shielded from cancellation. A caller that is cancelled (a timeout, a
revoked partition) leaves the command to finish, so a pooled connection is not returned
with an unread reply, which the next command would read as its own (seen in redis-py
4.5.1 to 4.5.3, redis-py issues #2624 and #2665).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from worker.state import keys
from worker.state.chain import Chain, RecordRef, obsolete_records
from worker.state.config import StateConfig
from worker.state.exceptions import ChainConflictError, SnapshotRejectedError, StoreUnavailableError
from worker.state.format import split_chunks

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Chunks written but not yet referenced by a chain expire after this many seconds.
ORPHAN_TTL_S = 24 * 3600


@dataclass
class Head:
    """The two chain pointers of one stream."""

    latest: Chain | None
    committed: Chain | None


def make_client(config: StateConfig, **connection_kwargs: Any) -> aioredis.Redis:
    """Return a redis.asyncio client with the timeouts and retries of ``config``.

    ``connection_kwargs`` (password, ssl_ca_certs, ...) go to ``Redis.from_url``.
    """
    return aioredis.Redis.from_url(
        config.redis_url,
        socket_timeout=config.socket_timeout_s,
        socket_connect_timeout=config.connect_timeout_s,
        retry=Retry(ExponentialBackoff(cap=config.retry_backoff_cap_s, base=0.05), config.retries),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=30,
        **connection_kwargs,
    )


def new_record_id() -> str:
    """Return a record id that sorts by creation time and never repeats."""
    return f"{time.time_ns():x}-{uuid.uuid4().hex[:8]}"


class SnapshotStore:
    """Reads and writes snapshot records and chain pointers in one Redis database."""

    def __init__(self, config: StateConfig, client: aioredis.Redis | None = None) -> None:
        self.config = config
        self.prefix = config.key_prefix
        self._client = client or make_client(config)

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    async def close(self) -> None:
        await self._client.aclose()

    async def _run(self, operation: Callable[[], Awaitable[T]], what: str) -> T:
        """Run ``operation`` shielded from cancellation; map Redis errors to StoreUnavailableError."""
        task = asyncio.ensure_future(operation())
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_log_orphaned_failure)
            raise
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailableError(f"Redis at {self.config.redis_url} failed during {what}: {exc}") from exc
        except WatchError:
            raise
        except RedisError as exc:
            raise StoreUnavailableError(f"Redis command failed during {what}: {exc}") from exc

    async def ping(self) -> bool:
        """Return True when Redis replies to PING."""
        try:
            return bool(await self._run(self._client.ping, "PING"))
        except StoreUnavailableError:
            return False

    async def write_record(self, stream_id: str, data: bytes, kind: str) -> RecordRef:
        """Write one encoded record as unreferenced, expiring chunks (step 1 of the write path)."""
        record_id = new_record_id()
        chunks = split_chunks(data, self.config.chunk_max_bytes)

        async def write() -> None:
            pipe = self._client.pipeline(transaction=False)
            batch_bytes = 0
            for index, chunk in enumerate(chunks):
                pipe.set(keys.chunk_key(self.prefix, stream_id, record_id, index), bytes(chunk), ex=ORPHAN_TTL_S)
                batch_bytes += len(chunk)
                if batch_bytes >= self.config.pipeline_max_bytes:
                    await pipe.execute()
                    pipe = self._client.pipeline(transaction=False)
                    batch_bytes = 0
            if len(pipe):
                await pipe.execute()

        await self._run(write, f"the write of record {record_id} of stream {stream_id}")
        return RecordRef(record_id=record_id, kind=kind, num_chunks=len(chunks), num_bytes=len(data))

    async def publish(
        self, chain: Chain, new_records: list[RecordRef], previous: Chain | None, committed: Chain | None
    ) -> None:
        """Make ``chain`` the stream's latest chain in one MULTI/EXEC, then delete what it replaced.

        The switch happens only while the stored latest chain is still ``previous`` (checked
        under WATCH); otherwise :class:`ChainConflictError` is raised and nothing changes.
        """
        stream_id = chain.stream_id
        head = keys.head_key(self.prefix, stream_id)

        async def switch() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                await pipe.watch(head)
                stored = await pipe.hget(head, "latest")
                current = Chain.from_json(stored) if stored else None
                if current != previous:
                    await pipe.unwatch()
                    raise ChainConflictError(stream_id, current)
                pipe.multi()
                pipe.hset(head, "latest", chain.to_json())
                for ref in new_records:
                    for index in range(ref.num_chunks):
                        pipe.persist(keys.chunk_key(self.prefix, stream_id, ref.record_id, index))
                await pipe.execute()

        try:
            await self._run(switch, f"the pointer switch of stream {stream_id}")
        except WatchError as exc:
            raise ChainConflictError(stream_id, "changed while this worker switched it") from exc
        await self._delete_records(stream_id, obsolete_records(previous, chain, committed))

    async def mark_committed(self, chain: Chain, previous_committed: Chain | None, latest: Chain | None) -> None:
        """Set ``chain`` as the stream's committed chain, then delete records nothing references."""
        stream_id = chain.stream_id
        await self._run(
            lambda: self._client.hset(keys.head_key(self.prefix, stream_id), "committed", chain.to_json()),
            f"the commit mark of stream {stream_id}",
        )
        await self._delete_records(stream_id, obsolete_records(previous_committed, chain, latest))

    async def _delete_records(self, stream_id: str, refs: list[RecordRef]) -> None:
        if not refs:
            return
        names = [
            keys.chunk_key(self.prefix, stream_id, ref.record_id, index)
            for ref in refs
            for index in range(ref.num_chunks)
        ]
        await self._run(lambda: self._client.unlink(*names), f"the cleanup of stream {stream_id}")

    async def read_head(self, stream_id: str) -> Head:
        fields = await self._run(
            lambda: self._client.hgetall(keys.head_key(self.prefix, stream_id)), f"the head read of stream {stream_id}"
        )
        latest = fields.get(b"latest")
        committed = fields.get(b"committed")
        return Head(
            latest=Chain.from_json(latest) if latest else None,
            committed=Chain.from_json(committed) if committed else None,
        )

    async def read_partition_marker(self, topic: str, partition: int) -> int | None:
        """Return the ``covered_from`` offset of the partition's checkpoint marker, or None when it is missing."""
        value = await self._run(
            lambda: self._client.hget(keys.partition_marker_key(self.prefix, topic, partition), "covered_from"),
            f"the marker read of {topic}[{partition}]",
        )
        return int(value) if value is not None else None

    async def create_partition_marker(self, topic: str, partition: int, covered_from: int) -> bool:
        """Create the partition's checkpoint marker unless it exists; return True when this call created it."""
        created = await self._run(
            lambda: self._client.hsetnx(
                keys.partition_marker_key(self.prefix, topic, partition), "covered_from", str(covered_from)
            ),
            f"the marker write of {topic}[{partition}]",
        )
        return bool(created)

    async def read_record(self, stream_id: str, ref: RecordRef) -> bytes:
        """Read and join the chunks of one record; a missing chunk rejects the record as truncated."""
        names = [keys.chunk_key(self.prefix, stream_id, ref.record_id, index) for index in range(ref.num_chunks)]
        per_pipeline = max(1, self.config.pipeline_max_bytes // self.config.chunk_max_bytes)

        async def read() -> list[bytes | None]:
            values: list[bytes | None] = []
            for start in range(0, len(names), per_pipeline):
                pipe = self._client.pipeline(transaction=False)
                for name in names[start : start + per_pipeline]:
                    pipe.get(name)
                values.extend(await pipe.execute())
            return values

        values = await self._run(read, f"the read of record {ref.record_id} of stream {stream_id}")
        missing = [index for index, value in enumerate(values) if value is None]
        if missing:
            raise SnapshotRejectedError(
                "truncated", f"record {ref.record_id} of stream {stream_id} lacks chunks {missing[:8]}"
            )
        data = b"".join(values)  # type: ignore[arg-type]
        if len(data) != ref.num_bytes:
            raise SnapshotRejectedError(
                "truncated", f"record {ref.record_id} of stream {stream_id} has {len(data)} bytes, expected {ref.num_bytes}"
            )
        return data

    async def list_streams(self, count: int = 1000) -> AsyncIterator[str]:
        """Yield the id of every stream that has a head key under this prefix."""
        pattern = keys.head_pattern(self.prefix)
        cursor: Any = 0
        while True:
            cursor, names = await self._run(
                lambda: self._client.scan(cursor=cursor, match=pattern, count=count), "SCAN"
            )
            for name in names:
                stream_id = keys.stream_id_from_head_key(self.prefix, name.decode())
                if stream_id is not None:
                    yield stream_id
            if not cursor:
                return

    async def delete_stream(self, stream_id: str) -> int:
        """Delete a stream's head and every record it references; returns the number of keys deleted."""
        head = await self.read_head(stream_id)
        names = [keys.head_key(self.prefix, stream_id)]
        seen: set[str] = set()
        for chain in (head.latest, head.committed):
            for ref in chain.records if chain else []:
                if ref.record_id in seen:
                    continue
                seen.add(ref.record_id)
                names.extend(keys.chunk_key(self.prefix, stream_id, ref.record_id, i) for i in range(ref.num_chunks))
        return int(await self._run(lambda: self._client.unlink(*names), f"the deletion of stream {stream_id}"))


def _log_orphaned_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("a Redis operation whose caller was cancelled failed: %s", task.exception())
