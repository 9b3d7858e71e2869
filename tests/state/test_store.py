"""Snapshot store and snapshotter against a real redis-server."""

import asyncio

import pytest
import torch

from tests.state.conftest import ENGINE_CONFIG, FINGERPRINT, cache_state
from worker.state import keys
from worker.state.exceptions import SnapshotRejectedError, StoreUnavailableError
from worker.state.snapshots import StreamSnapshotter
from worker.state.config import StateConfig
from worker.state.store import SnapshotStore


def assert_same_cache(loaded, expected):
    assert torch.equal(loaded.keys.view(torch.uint8), expected.keys.view(torch.uint8))
    assert torch.equal(loaded.values.view(torch.uint8), expected.values.view(torch.uint8))


async def test_snapshotter_base_round_trip(store, state_config):
    snapshotter = StreamSnapshotter(store, state_config)
    state = cache_state(tokens_written=20)
    chain, stats = await snapshotter.save(state, None, None, topic="in", partition=3, last_offset=41)
    assert stats.kind == "base"
    assert chain.records[0].num_chunks >= 1

    head = await store.read_head("s1")
    assert head.latest == chain
    assert head.committed is None
    loaded = await snapshotter.load_chain(head.latest, FINGERPRINT, ENGINE_CONFIG)
    assert_same_cache(loaded, state)
    assert loaded.metadata["last_offset"] == 41
    assert loaded.metadata["partition"] == 3


async def test_snapshotter_large_record_is_chunked(store, state_config):
    snapshotter = StreamSnapshotter(store, state_config)
    state = cache_state(tokens_written=500, capacity=512, head_dim=64, dtype=torch.float32)
    chain, _ = await snapshotter.save(state, None, None)
    assert chain.records[0].num_chunks > 4, "64 KiB chunks must split a ~1 MiB record"
    loaded = await snapshotter.load_chain(chain, FINGERPRINT, None)
    assert_same_cache(loaded, state)


async def test_snapshotter_deltas_equal_full_state(store, state_config):
    snapshotter = StreamSnapshotter(store, state_config)
    previous = None
    sizes = []
    for step, written in enumerate([10, 13, 40, 41, 75]):
        # Each state differs from the last one exactly in the slots of the new tokens.
        state = cache_state(tokens_written=written, seed=step)
        if previous is not None:
            prior = await snapshotter.load_chain(previous, FINGERPRINT, None)
            from worker.state.slots import changed_slots

            slots = changed_slots(previous.tokens_written, written, 4, 28)
            unchanged = [slot for slot in range(32) if slot not in slots]
            state.keys[:, :, unchanged] = prior.keys[:, :, unchanged]
            state.values[:, :, unchanged] = prior.values[:, :, unchanged]
        previous, stats = await snapshotter.save(state, previous, None, last_offset=step)
        sizes.append((stats.kind, stats.num_slots))
        loaded = await snapshotter.load_chain(previous, FINGERPRINT, ENGINE_CONFIG)
        assert_same_cache(loaded, state)
    assert sizes[0] == ("base", 32)
    assert sizes[1] == ("delta", 3)


async def test_snapshotter_compacts_after_max_deltas(store, state_config):
    config = state_config.model_copy(update={"max_deltas": 2})
    snapshotter = StreamSnapshotter(store, config)
    chain = None
    kinds = []
    for step in range(6):
        chain, stats = await snapshotter.save(cache_state(tokens_written=10 + step), chain, None)
        kinds.append(stats.kind)
    assert kinds == ["base", "delta", "delta", "base", "delta", "delta"]
    assert len(chain.records) == 3


async def test_snapshotter_reset_stream_writes_base(store, state_config):
    snapshotter = StreamSnapshotter(store, state_config)
    chain, _ = await snapshotter.save(cache_state(tokens_written=30), None, None)
    chain, stats = await snapshotter.save(cache_state(tokens_written=5), chain, None)
    assert stats.kind == "base"


async def test_store_publish_deletes_replaced_records(store, state_config):
    snapshotter = StreamSnapshotter(store, state_config)
    config = state_config.model_copy(update={"max_deltas": 0})
    snapshotter = StreamSnapshotter(store, config)
    first, _ = await snapshotter.save(cache_state(tokens_written=10), None, None)
    second, _ = await snapshotter.save(cache_state(tokens_written=11), first, None)
    names = await store.client.keys(f"{state_config.key_prefix}:*")
    record_ids = {name.decode().split(":r:")[1].split(":")[0] for name in names if b":r:" in name}
    assert record_ids == {second.records[0].record_id}


async def test_store_committed_chain_survives_newer_latest(store, state_config):
    config = state_config.model_copy(update={"max_deltas": 0})
    snapshotter = StreamSnapshotter(store, config)
    first, _ = await snapshotter.save(cache_state(tokens_written=10, seed=1), None, None)
    await store.mark_committed(first, None, first)
    second, _ = await snapshotter.save(cache_state(tokens_written=11, seed=2), first, first)

    head = await store.read_head("s1")
    assert head.committed == first
    assert head.latest == second
    committed = await snapshotter.load_chain(head.committed, FINGERPRINT, None)
    assert_same_cache(committed, cache_state(tokens_written=10, seed=1))

    await store.mark_committed(second, first, second)
    with pytest.raises(SnapshotRejectedError) as info:
        await store.read_record("s1", first.records[0])
    assert info.value.reason == "truncated"


async def test_store_unpublished_chunks_expire_and_stay_invisible(store, state_config):
    ref = await store.write_record("s2", b"x" * 200_000, "base")
    head = await store.read_head("s2")
    assert head.latest is None
    ttl = await store.client.ttl(keys.chunk_key(state_config.key_prefix, "s2", ref.record_id, 0))
    assert ttl > 0


async def test_store_missing_chunk_rejected_as_truncated(store, state_config):
    snapshotter = StreamSnapshotter(store, state_config)
    chain, _ = await snapshotter.save(cache_state(tokens_written=500, capacity=512, head_dim=64), None, None)
    await store.client.delete(keys.chunk_key(state_config.key_prefix, "s1", chain.records[0].record_id, 1))
    with pytest.raises(SnapshotRejectedError) as info:
        await snapshotter.load_chain(chain, FINGERPRINT, None)
    assert info.value.reason == "truncated"


async def test_store_flipped_byte_in_redis_rejected(store, state_config):
    snapshotter = StreamSnapshotter(store, state_config)
    chain, _ = await snapshotter.save(cache_state(tokens_written=20), None, None)
    name = keys.chunk_key(state_config.key_prefix, "s1", chain.records[0].record_id, 0)
    value = bytearray(await store.client.get(name))
    value[len(value) // 2] ^= 0x40
    await store.client.set(name, bytes(value))
    with pytest.raises(SnapshotRejectedError) as info:
        await snapshotter.load_chain(chain, FINGERPRINT, None)
    assert info.value.reason == "checksum"


async def test_store_wrong_model_and_window_rejected(store, state_config):
    snapshotter = StreamSnapshotter(store, state_config)
    chain, _ = await snapshotter.save(cache_state(tokens_written=20), None, None)
    with pytest.raises(SnapshotRejectedError) as info:
        await snapshotter.load_chain(chain, "other-model", ENGINE_CONFIG)
    assert info.value.reason == "fingerprint"
    with pytest.raises(SnapshotRejectedError) as info:
        await snapshotter.load_chain(chain, FINGERPRINT, dict(ENGINE_CONFIG, window_tokens=1020))
    assert info.value.reason == "engine_config"


async def test_store_list_and_delete_streams(store, state_config):
    snapshotter = StreamSnapshotter(store, state_config)
    stream_ids = ["a", "b{tag}", "c:d%"]
    for stream_id in stream_ids:
        await snapshotter.save(cache_state(stream_id=stream_id), None, None)
    listed = [stream_id async for stream_id in store.list_streams()]
    assert sorted(listed) == sorted(stream_ids)

    deleted = await store.delete_stream("b{tag}")
    assert deleted >= 2
    listed = [stream_id async for stream_id in store.list_streams()]
    assert sorted(listed) == ["a", "c:d%"]
    assert await store.client.keys(f"{state_config.key_prefix}:snap:{{b%7Btag%7D}}:*") == []


async def test_store_unreachable_raises_unavailable(state_config):
    from worker.devservices import free_port

    config = state_config.model_copy(
        update={"redis_url": f"redis://127.0.0.1:{free_port()}/0", "retries": 1, "connect_timeout_s": 0.5}
    )
    unreachable = SnapshotStore(config)
    try:
        assert await unreachable.ping() is False
        with pytest.raises(StoreUnavailableError):
            await unreachable.write_record("s1", b"data", "base")
    finally:
        await unreachable.close()


async def test_store_cancelled_write_leaves_connection_usable(store, state_config):
    # Cancel a large pipelined write halfway; the next command must read its own reply.
    payload = b"z" * (4 * 1024 * 1024)
    task = asyncio.ensure_future(store.write_record("s3", payload, "base"))
    await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for attempt in range(20):
        await store.client.set(f"{state_config.key_prefix}:probe", str(attempt))
        assert await store.client.get(f"{state_config.key_prefix}:probe") == str(attempt).encode()


async def test_store_more_commands_than_connections_wait(redis_server):
    """Commands beyond max_connections wait for a free connection instead of failing."""
    store = SnapshotStore(StateConfig(redis_url=redis_server.url, key_prefix="pool", max_connections=2))
    try:
        # Each BLPOP keeps its connection busy for 0.1 s, so six of them must wait for one.
        replies = await asyncio.gather(*(store.client.blpop(["pool:nothing"], timeout=0.1) for _ in range(8)))
        assert replies == [None] * 8
        assert store.client.connection_pool.max_connections == 2
    finally:
        await store.close()
