"""Snapshot records and chain pointers in Redis (redis.asyncio).

Write path, for one stream:

1. Each record is split into chunks of at most ``chunk_max_bytes`` and written under a
   fresh record id with SET ... EX ``orphan_ttl_s``, in pipelines of at most
   ``pipeline_max_bytes``. Nothing points at these keys yet, so a reader never sees
   them, and the chunks of a writer that crashes here expire on their own.
2. One MULTI/EXEC sets the stream's ``latest`` chain and PERSISTs the new chunks.
3. Records of the previous chain that neither ``latest`` nor ``committed`` references
   are deleted.

A head key that is not a valid head hash (the wrong Redis type, a chain field with
invalid JSON or an invalid chain) raises :class:`DamagedHeadError`, never
:class:`StoreUnavailableError`, because retrying cannot repair it. ``publish`` with
``replace_damaged=True`` deletes such a key and writes the new chain in its place.

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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from worker.state import keys
from worker.state.chain import Chain, InvalidChainError, RecordRef, obsolete_records
from worker.state.config import StateConfig
from worker.state.exceptions import (
    ChainConflictError,
    DamagedHeadError,
    SnapshotRejectedError,
    StoreUnavailableError,
)
from worker.state.format import split_chunks

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Chunks written but not yet referenced by a chain expire after this many seconds.
ORPHAN_TTL_S = 24 * 3600
# Key names per UNLINK or SCAN round trip when deleting chunks.
DELETE_BATCH_KEYS = 1000


@dataclass
class Head:
    """The two chain pointers of one stream."""

    latest: Chain | None
    committed: Chain | None


@dataclass
class HeadEntry:
    """One key that SCAN found under the head pattern, for listings.

    ``stream_id`` is None when no stream id maps to the key name. ``problem`` is the reason
    the key is damaged, and then ``head`` is None.
    """

    key: bytes
    stream_id: str | None
    head: Head | None
    problem: str | None = None


def _head_not_a_hash(stream_id: str, head: str, exc: ResponseError) -> DamagedHeadError:
    return DamagedHeadError(stream_id, head, f"the key is not a hash ({exc})")


def is_wrong_type(exc: BaseException) -> bool:
    """Return True for Redis's WRONGTYPE reply: a command met a key of another type."""
    return isinstance(exc, ResponseError) and "WRONGTYPE" in str(exc)


def make_client(config: StateConfig, **connection_kwargs: Any) -> aioredis.Redis:
    """Return a redis.asyncio client with the timeouts, retries and connection bound of ``config``.

    ``connection_kwargs`` (password, ssl_ca_certs, ...) go to the connections. The pool
    blocks when all ``max_connections`` are busy: redis-py's default pool raises "Too many
    connections" instead, which a worker restoring more than 100 streams at once can reach.
    """
    # NOTE: with Redis maxclients below max_connections, restores have stalled
    # (refused connections were retried while others sat idle); the cause is not yet known.
    pool = aioredis.BlockingConnectionPool.from_url(
        config.redis_url,
        max_connections=config.max_connections,
        timeout=config.pool_wait_s,
        socket_timeout=config.socket_timeout_s,
        socket_connect_timeout=config.connect_timeout_s,
        retry=Retry(ExponentialBackoff(cap=config.retry_backoff_cap_s, base=0.05), config.retries),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=30,
        **connection_kwargs,
    )
    return aioredis.Redis.from_pool(pool)


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

    async def _run(
        self,
        operation: Callable[[], Awaitable[T]],
        what: str,
        on_wrong_type: Callable[[ResponseError], Exception] | None = None,
    ) -> T:
        """Run ``operation`` shielded from cancellation; map Redis errors to StoreUnavailableError.

        A WRONGTYPE reply is raised as ``on_wrong_type(exc)`` when that is given, because
        a key of the wrong type stays wrong however often the command is retried.
        """
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
        except ResponseError as exc:
            if on_wrong_type is not None and is_wrong_type(exc):
                raise on_wrong_type(exc) from exc
            raise StoreUnavailableError(f"Redis command failed during {what}: {exc}") from exc
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
        self,
        chain: Chain,
        new_records: list[RecordRef],
        previous: Chain | None,
        committed: Chain | None,
        replace_damaged: bool = False,
    ) -> None:
        """Make ``chain`` the stream's latest chain in one MULTI/EXEC, then delete what it replaced.

        The switch happens only while the stored latest chain is still ``previous`` (checked
        under WATCH); otherwise :class:`ChainConflictError` is raised and nothing changes.
        A damaged head key raises :class:`DamagedHeadError`, unless ``replace_damaged``
        is set: then the key is deleted and replaced by a head with only ``chain``, and
        every other chunk key of the stream is deleted, because the damaged key no
        longer lists the records it referenced.
        """
        stream_id = chain.stream_id
        head = keys.head_key(self.prefix, stream_id)
        damaged: DamagedHeadError | None = None

        async def switch() -> None:
            nonlocal damaged
            async with self._client.pipeline(transaction=True) as pipe:
                await pipe.watch(head)
                try:
                    current = self._parse_head(stream_id, await pipe.hgetall(head)).latest
                except ResponseError as exc:
                    if not is_wrong_type(exc):
                        raise
                    damaged = _head_not_a_hash(stream_id, head, exc)
                except DamagedHeadError as exc:
                    damaged = exc
                if damaged is not None and not replace_damaged:
                    await pipe.unwatch()
                    raise damaged
                if damaged is None and current != previous:
                    await pipe.unwatch()
                    raise ChainConflictError(stream_id, current)
                pipe.multi()
                if damaged is not None:
                    pipe.delete(head)
                pipe.hset(head, "latest", chain.to_json())
                for ref in new_records:
                    for index in range(ref.num_chunks):
                        pipe.persist(keys.chunk_key(self.prefix, stream_id, ref.record_id, index))
                await pipe.execute()

        try:
            await self._run(switch, f"the pointer switch of stream {stream_id}")
        except WatchError as exc:
            raise ChainConflictError(stream_id, "changed while this worker switched it") from exc
        if damaged is not None:
            await self._delete_chunks_except(stream_id, chain.record_ids())
            return
        await self._delete_records(stream_id, obsolete_records(previous, chain, committed))

    async def mark_committed(self, chain: Chain, previous_committed: Chain | None, latest: Chain | None) -> None:
        """Set ``chain`` as the stream's committed chain, then delete records nothing references."""
        stream_id = chain.stream_id
        head = keys.head_key(self.prefix, stream_id)
        await self._run(
            lambda: self._client.hset(head, "committed", chain.to_json()),
            f"the commit mark of stream {stream_id}",
            on_wrong_type=lambda exc: _head_not_a_hash(stream_id, head, exc),
        )
        await self._delete_records(stream_id, obsolete_records(previous_committed, chain, latest))

    async def _delete_records(self, stream_id: str, refs: list[RecordRef]) -> int:
        """Delete the chunks of ``refs`` in batches; returns the number of keys deleted.

        The chunks of one record are deleted in index order, and a record's chunks are
        contiguous from 0, so a batch that deletes nothing ends that record. That bounds
        the work for a record whose ``num_chunks`` is damaged but plausible.
        """
        deleted = 0
        for ref in refs:
            names = (keys.chunk_key(self.prefix, stream_id, ref.record_id, index) for index in range(ref.num_chunks))
            for batch in _batches(names, DELETE_BATCH_KEYS):
                count = int(
                    await self._run(lambda: self._client.unlink(*batch), f"the cleanup of stream {stream_id}")
                )
                deleted += count
                if count == 0:
                    break
        return deleted

    async def _delete_chunks_except(self, stream_id: str, keep_record_ids: set[str]) -> int:
        """Delete every chunk key of the stream whose record id is not in ``keep_record_ids`` (SCAN)."""
        # Chunk keys are "<stream keys>r:<record id>:<n>", next to "<stream keys>head".
        chunk_start = (keys.head_key(self.prefix, stream_id).removesuffix("head") + "r:").encode()
        kept_prefixes = tuple(chunk_start + f"{record_id}:".encode() for record_id in keep_record_ids)
        deleted = 0
        async for names in self._scan(keys.stream_pattern(self.prefix, stream_id)):
            doomed = [name for name in names if name.startswith(chunk_start) and not name.startswith(kept_prefixes)]
            if doomed:
                deleted += int(
                    await self._run(lambda: self._client.unlink(*doomed), f"the cleanup of stream {stream_id}")
                )
        return deleted

    async def _scan(self, pattern: str, count: int = DELETE_BATCH_KEYS) -> AsyncIterator[list[bytes]]:
        """Yield the key names matching ``pattern``, one SCAN page at a time."""
        cursor: Any = 0
        while True:
            cursor, names = await self._run(
                lambda: self._client.scan(cursor=cursor, match=pattern, count=count), f"SCAN {pattern}"
            )
            if names:
                yield names
            if not cursor:
                return

    async def read_head(self, stream_id: str) -> Head:
        """Read and validate a stream's head; raises DamagedHeadError when it is damaged."""
        head = keys.head_key(self.prefix, stream_id)
        fields = await self._run(
            lambda: self._client.hgetall(head),
            f"the head read of stream {stream_id}",
            on_wrong_type=lambda exc: _head_not_a_hash(stream_id, head, exc),
        )
        return self._parse_head(stream_id, fields)

    def _parse_head(self, stream_id: str, fields: dict[bytes, bytes]) -> Head:
        """Parse the fields of a head hash; raises DamagedHeadError naming the field and the problem."""
        chains: dict[str, Chain | None] = {}
        for name in ("latest", "committed"):
            value = fields.get(name.encode())
            if not value:
                chains[name] = None
                continue
            try:
                chain = Chain.from_json(value)
            except InvalidChainError as exc:
                raise DamagedHeadError(
                    stream_id, keys.head_key(self.prefix, stream_id), f"field {name!r}: {exc}"
                ) from exc
            if chain.stream_id != stream_id:
                raise DamagedHeadError(
                    stream_id,
                    keys.head_key(self.prefix, stream_id),
                    f"field {name!r} holds the chain of stream {chain.stream_id!r}",
                )
            chains[name] = chain
        return Head(latest=chains["latest"], committed=chains["committed"])

    async def read_partition_marker(self, topic: str, partition: int) -> int | None:
        """Return the ``covered_from`` offset of the partition's checkpoint marker, or None when it is missing.

        A damaged marker (a key of another type, or a value that is not an offset) is
        deleted and read as missing, so the caller applies its rule for a lost marker,
        the cautious choice when the offset is unknown.
        """
        name = keys.partition_marker_key(self.prefix, topic, partition)
        damage = None
        try:
            value = await self._run(
                lambda: self._client.hget(name, "covered_from"),
                f"the marker read of {topic}[{partition}]",
                on_wrong_type=lambda exc: ValueError(f"the key is not a hash ({exc})"),
            )
        except ValueError as exc:
            damage = str(exc)
        else:
            if value is None:
                return None
            try:
                covered_from = int(value)
            except ValueError:
                damage = f"covered_from is {value[:40]!r}, not an offset"
            else:
                if covered_from >= 0:
                    return covered_from
                damage = f"covered_from is {covered_from}, a negative offset"
        logger.warning("the checkpoint marker %s of %s[%d] is damaged (%s); deleting it and reading it as missing",
                       ascii(name), topic, partition, damage)
        await self._run(lambda: self._client.unlink(name), f"the marker delete of {topic}[{partition}]")
        return None

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
        """Read and join the chunks of one record; a missing chunk rejects the record as truncated.

        Chunks are read one pipeline at a time, and reading stops at the first pipeline
        that misses a chunk or returns more than ``num_bytes``, so a damaged ``num_chunks``
        costs one round trip.
        """
        per_pipeline = max(1, self.config.pipeline_max_bytes // self.config.chunk_max_bytes)

        async def read() -> list[bytes | None]:
            values: list[bytes | None] = []
            total = 0
            names = (keys.chunk_key(self.prefix, stream_id, ref.record_id, index) for index in range(ref.num_chunks))
            for batch in _batches(names, per_pipeline):
                pipe = self._client.pipeline(transaction=False)
                for name in batch:
                    pipe.get(name)
                replies = await pipe.execute()
                values.extend(replies)
                total += sum(len(value) for value in replies if value is not None)
                if None in replies or total > ref.num_bytes:
                    break
            return values

        values = await self._run(
            read,
            f"the read of record {ref.record_id} of stream {stream_id}",
            on_wrong_type=lambda exc: SnapshotRejectedError(
                "format", f"record {ref.record_id} of stream {stream_id} has a chunk key that is not a string: {exc}"
            ),
        )
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
        """Yield the id of every stream that has a head key under this prefix.

        A key name that is not UTF-8 names no stream id and is skipped with a WARNING;
        :meth:`list_heads` reports it.
        """
        async for names in self._scan(keys.head_pattern(self.prefix), count):
            for name in names:
                try:
                    text = name.decode()
                except UnicodeDecodeError:
                    logger.warning("skipped head key %s under prefix %r: its name is not UTF-8", ascii(name), self.prefix)
                    continue
                stream_id = keys.stream_id_from_head_key(self.prefix, text)
                if stream_id is not None:
                    yield stream_id

    async def list_heads(self, count: int = 1000) -> AsyncIterator[HeadEntry]:
        """Yield every key under the head pattern with its parsed head, or the reason it is damaged."""
        async for names in self._scan(keys.head_pattern(self.prefix), count):
            for name in names:
                try:
                    text = name.decode()
                except UnicodeDecodeError:
                    yield HeadEntry(name, None, None, "the key name is not UTF-8, so no stream id maps to it")
                    continue
                stream_id = keys.stream_id_from_head_key(self.prefix, text)
                if stream_id is None:
                    continue
                if keys.head_key(self.prefix, stream_id) != text:
                    # A tag with an unescaped '{', '}' or '%' sequence that the encoding never writes.
                    yield HeadEntry(name, None, None, "the key name is not the head key of any stream id")
                    continue
                try:
                    head = await self.read_head(stream_id)
                except DamagedHeadError as exc:
                    yield HeadEntry(name, stream_id, None, exc.problem)
                    continue
                yield HeadEntry(name, stream_id, head)

    async def delete_stream(self, stream_id: str, every_key: bool = False) -> int:
        """Delete a stream's head and its records; returns the number of keys deleted.

        By default the records the head references are deleted. With ``every_key``, or
        when the head is damaged, every key of the stream is found with SCAN and deleted,
        unreferenced chunks included.
        """
        head_name = keys.head_key(self.prefix, stream_id)
        if not every_key:
            try:
                head = await self.read_head(stream_id)
            except DamagedHeadError as exc:
                logger.warning("deleting every key of stream %s with SCAN: %s", stream_id, exc)
            else:
                refs: dict[str, RecordRef] = {}
                for chain in (head.latest, head.committed):
                    refs.update((ref.record_id, ref) for ref in (chain.records if chain else []))
                deleted = await self._delete_records(stream_id, list(refs.values()))
                return deleted + int(
                    await self._run(lambda: self._client.unlink(head_name), f"the deletion of stream {stream_id}")
                )
        deleted = 0
        async for names in self._scan(keys.stream_pattern(self.prefix, stream_id)):
            deleted += int(
                await self._run(lambda: self._client.unlink(*names), f"the deletion of stream {stream_id}")
            )
        return deleted


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _log_orphaned_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("a Redis operation whose caller was cancelled failed: %s", task.exception())
