"""The checkpoint protocol of RedisStateHooks against a real redis-server.

The stage handle here keeps cache states in a dict in place of the engine, so these tests
cover the protocol and Redis behaviour; engine round trips are in test_engine_restore.py.
"""

import asyncio
import time

import pytest
import torch
from aiokafka.structs import TopicPartition

from tests.state.conftest import ENGINE_CONFIG, FINGERPRINT, cache_state
from worker.devservices import start_redis
from worker.state.hooks import RedisStateHooks
from worker.state.snapshots import CacheState

TP = TopicPartition("events", 2)


class DictStage:
    """A stage handle whose "engine" is a dict of cache states."""

    def __init__(self) -> None:
        self.streams: dict[str, CacheState] = {}

    async def export_stream(self, stream_id):
        return self.streams.get(stream_id)

    async def import_stream(self, snapshot):
        self.streams[snapshot.stream_id] = snapshot


def make_hooks(config, fingerprint=FINGERPRINT, engine_config=ENGINE_CONFIG) -> tuple[RedisStateHooks, DictStage]:
    hooks = RedisStateHooks(config, fingerprint, engine_config, to_state=lambda s: s, from_state=lambda s: s)
    stage = DictStage()
    hooks.bind(stage)
    return hooks, stage


def same_cache(left: CacheState, right: CacheState) -> bool:
    return torch.equal(left.keys.view(torch.uint8), right.keys.view(torch.uint8)) and torch.equal(
        left.values.view(torch.uint8), right.values.view(torch.uint8)
    )


def grow(state: CacheState, tokens_written: int, seed: int) -> CacheState:
    """Return ``state`` after more tokens: only the slots of the new tokens change."""
    from worker.state.slots import changed_slots

    slots = changed_slots(state.tokens_written, tokens_written, 4, 28)
    fresh = cache_state(state.stream_id, tokens_written, seed)
    keys, values = state.keys.clone(), state.values.clone()
    keys[:, :, slots] = fresh.keys[:, :, slots]
    values[:, :, slots] = fresh.values[:, :, slots]
    return CacheState(state.stream_id, state.fingerprint, state.engine_config, fresh.metadata, keys, values)


async def test_hooks_checkpoint_then_restore_on_new_worker(state_config):
    first, first_stage = make_hooks(state_config)
    await first.on_assign([TP])
    for index in range(3):
        first_stage.streams[f"s{index}"] = cache_state(f"s{index}", 10 + index, seed=index)
    assert await first.checkpoint(TP, {"s0": 5, "s1": 7, "s2": 9}, 10)
    await first.committed(TP, 10)

    # More events, a second checkpoint written as deltas, then a crash before the commit.
    first_stage.streams["s1"] = grow(first_stage.streams["s1"], 50, seed=11)
    assert await first.checkpoint(TP, {"s1": 12}, 13)
    assert first.stats.bases_written == 3
    assert first.stats.snapshots_written == 4

    second, second_stage = make_hooks(state_config)
    await second.on_assign([TP])
    assert await second.restore("s0", TP) == 5
    assert await second.restore("s1", TP) == 12
    assert await second.restore("missing", TP) is None
    assert same_cache(second_stage.streams["s0"], first_stage.streams["s0"])
    assert same_cache(second_stage.streams["s1"], first_stage.streams["s1"])
    assert "missing" not in second_stage.streams
    await first.close()
    await second.close()


async def test_hooks_restored_stream_continues_with_deltas(state_config):
    first, first_stage = make_hooks(state_config)
    first_stage.streams["s"] = cache_state("s", 20, seed=1)
    assert await first.checkpoint(TP, {"s": 1}, 2)

    second, second_stage = make_hooks(state_config)
    assert await second.restore("s", TP) == 1
    second_stage.streams["s"] = grow(second_stage.streams["s"], 23, seed=2)
    assert await second.checkpoint(TP, {"s": 3}, 4)
    assert second.stats.bases_written == 0, "a restored stream must continue its chain with a delta"

    third, third_stage = make_hooks(state_config)
    assert await third.restore("s", TP) == 3
    assert same_cache(third_stage.streams["s"], second_stage.streams["s"])
    for hooks in (first, second, third):
        await hooks.close()


async def test_hooks_committed_keeps_only_referenced_records(state_config):
    config = state_config.model_copy(update={"max_deltas": 0})
    hooks, stage = make_hooks(config)
    stage.streams["s"] = cache_state("s", 10)
    for step in range(4):
        stage.streams["s"] = grow(stage.streams["s"], 10 + step, seed=step)
        assert await hooks.checkpoint(TP, {"s": step}, step + 1)
        await hooks.committed(TP, step + 1)
    names = await hooks.store.client.keys(f"{config.key_prefix}:*:r:*")
    assert len(names) == 1, names
    head = await hooks.store.read_head("s")
    assert head.committed == head.latest
    await hooks.close()


@pytest.mark.parametrize(
    "fingerprint, engine_config, reason",
    [
        ("another-model", ENGINE_CONFIG, "fingerprint"),
        (FINGERPRINT, dict(ENGINE_CONFIG, window_tokens=60), "engine_config"),
    ],
)
async def test_hooks_foreign_snapshot_rejected_and_counted(state_config, fingerprint, engine_config, reason):
    writer, writer_stage = make_hooks(state_config)
    writer_stage.streams["s"] = cache_state("s", 10)
    assert await writer.checkpoint(TP, {"s": 4}, 5)

    reader, reader_stage = make_hooks(state_config, fingerprint, engine_config)
    assert await reader.restore("s", TP) is None
    assert "s" not in reader_stage.streams
    assert reader.stats.rejected == {reason: 1}
    await writer.close()
    await reader.close()


async def test_hooks_dropped_stream_snapshot_deleted(state_config):
    hooks, stage = make_hooks(state_config)
    stage.streams["s"] = cache_state("s", 10)
    assert await hooks.checkpoint(TP, {"s": 1}, 2)
    del stage.streams["s"]
    assert await hooks.checkpoint(TP, {"s": 2}, 3)
    assert (await hooks.store.read_head("s")).latest is None
    await hooks.close()


@pytest.fixture
def private_redis():
    process = start_redis()
    yield process
    process.stop()


async def test_hooks_redis_restart_refuses_then_recovers(state_config, private_redis):
    config = state_config.model_copy(
        update={"redis_url": private_redis.url, "retries": 1, "connect_timeout_s": 0.5, "max_unsafe_s": 0.2}
    )
    hooks, stage = make_hooks(config)
    await hooks.on_assign([TP])
    stage.streams["s"] = cache_state("s", 10)
    assert await hooks.checkpoint(TP, {"s": 1}, 2)

    port = private_redis.port
    private_redis.kill()
    stage.streams["s"] = grow(stage.streams["s"], 12, seed=3)
    assert await hooks.checkpoint(TP, {"s": 2}, 3) is False
    assert hooks.stats.checkpoints_refused == 1
    await asyncio.sleep(0.3)
    assert hooks.should_pause(TP), "a partition without checkpoints past max_unsafe_s must pause"

    restarted = start_redis(port=port)
    try:
        # The restarted server is empty, so the next snapshot must be a new base.
        assert await hooks.checkpoint(TP, {"s": 2}, 3)
        assert not hooks.should_pause(TP)
        reader, reader_stage = make_hooks(config)
        assert await reader.restore("s", TP) == 2
        assert same_cache(reader_stage.streams["s"], stage.streams["s"])
        await reader.close()
    finally:
        await hooks.close()
        restarted.stop()


async def test_hooks_restore_waits_for_redis(state_config, private_redis):
    config = state_config.model_copy(update={"redis_url": private_redis.url, "retries": 0, "connect_timeout_s": 0.5})
    writer, writer_stage = make_hooks(config)
    writer_stage.streams["s"] = cache_state("s", 10)
    assert await writer.checkpoint(TP, {"s": 7}, 8)
    await writer.close()

    # Redis goes away before the restore and comes back (empty) a moment later: the
    # restore must wait for it rather than start the stream empty during the outage.
    port = private_redis.port
    private_redis.kill()
    reader, reader_stage = make_hooks(config)
    task = asyncio.ensure_future(reader.restore("s", TP))
    await asyncio.sleep(0.5)
    assert not task.done()
    restarted = start_redis(port=port)
    try:
        assert await asyncio.wait_for(task, 10) is None  # the restarted server holds nothing
    finally:
        await reader.close()
        restarted.stop()


async def test_hooks_client_kill_during_large_write(state_config):
    config = state_config.model_copy(update={"chunk_max_bytes": 64 * 1024, "pipeline_max_bytes": 128 * 1024})
    hooks, stage = make_hooks(config)
    big = cache_state("big", 2000, seed=5, capacity=2048, head_dim=64, dtype=torch.float32)
    big.engine_config.update(sink_tokens=4, window_tokens=2044)
    stage.streams["big"] = big

    killer = hooks.store.client.__class__.from_url(config.redis_url)
    checkpoint = asyncio.ensure_future(hooks.checkpoint(TP, {"big": 1}, 2))
    num_killed = 0
    # Kill the writer's connections repeatedly while the multi-chunk write runs.
    while not checkpoint.done():
        num_killed += await killer.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        await asyncio.sleep(0.002)
    await killer.aclose()
    stored = await checkpoint
    assert num_killed >= 1, "the test must kill at least one connection during the write"
    head = await hooks.store.read_head("big")
    if stored:
        assert head.latest is not None
    else:
        assert head.latest is None, "a failed write must not leave a chain visible"

    # Whatever happened, the next checkpoint succeeds and restores bit-exact.
    assert await hooks.checkpoint(TP, {"big": 1}, 2)
    reader, reader_stage = make_hooks(config, engine_config=big.engine_config)
    assert await reader.restore("big", TP) == 1
    assert same_cache(reader_stage.streams["big"], big)
    await hooks.close()
    await reader.close()


async def test_hooks_stale_owner_checkpoint_refused(state_config):
    old_owner, old_stage = make_hooks(state_config)
    old_stage.streams["s"] = cache_state("s", 10, seed=1)
    assert await old_owner.checkpoint(TP, {"s": 1}, 2)

    new_owner, new_stage = make_hooks(state_config)
    assert await new_owner.restore("s", TP) == 1
    new_stage.streams["s"] = grow(new_stage.streams["s"], 14, seed=2)
    assert await new_owner.checkpoint(TP, {"s": 3}, 4)

    # The old owner has not noticed the partition moved; its write must not win.
    old_stage.streams["s"] = grow(old_stage.streams["s"], 12, seed=3)
    assert await old_owner.checkpoint(TP, {"s": 2}, 3) is False
    head = await new_owner.store.read_head("s")
    assert head.latest.last_offset == 3
    await old_owner.close()
    await new_owner.close()
