"""A stream restored from Redis into a fresh engine continues exactly like one never evicted."""

import pytest
import torch
from aiokafka.structs import TopicPartition

from worker.engine import EngineConfig, GenerationParams, Request, StreamEngine
from worker.state.engine_adapter import build_state_hooks

TP = TopicPartition("events", 0)
ENGINE_SETTINGS = dict(sink_tokens=4, window_tokens=60, prefill_chunk_tokens=32, max_batch_tokens=64,
                       max_resident_streams=2, max_host_streams=2)


class EngineStage:
    """The stage handle of the hooks, calling the engine directly (no Kafka in this test)."""

    def __init__(self, engine: StreamEngine) -> None:
        self.engine = engine

    async def export_stream(self, stream_id):
        if stream_id not in self.engine.known_streams():
            return None
        return self.engine.export_stream(stream_id)

    async def import_stream(self, snapshot):
        self.engine.import_stream(snapshot)


def feed(engine: StreamEngine, stream_id: str, token_ids: list[int], event_id: str) -> None:
    engine.submit(Request(stream_id, event_id, token_ids=token_ids))
    results = engine.run_until_idle()
    assert all(not result.error for result in results), results


def token_block(start: int, length: int) -> list[int]:
    return [(start + 37 * index) % 40000 + 100 for index in range(length)]


async def test_engine_restore_equals_never_evicted(tiny_loaded, state_config):
    resident = StreamEngine(tiny_loaded, EngineConfig(**ENGINE_SETTINGS))
    writer = build_state_hooks(state_config, resident)
    writer.bind(EngineStage(resident))
    await writer.on_assign([TP])

    # Three events, 100 tokens in all: the 60-token ring wraps during the second,
    # so the second and third snapshots are deltas over a wrapped ring.
    for offset, (start, length) in enumerate([(0, 40), (40, 30), (70, 30)]):
        feed(resident, "s", token_block(start, length), f"e{offset}")
        assert await writer.checkpoint(TP, {"s": offset}, offset + 1)
        await writer.committed(TP, offset + 1)
    assert writer.stats.bases_written == 1
    assert writer.stats.snapshots_written == 3

    restored = StreamEngine(tiny_loaded, EngineConfig(**ENGINE_SETTINGS))
    reader = build_state_hooks(state_config, restored)
    reader.bind(EngineStage(restored))
    await reader.on_assign([TP])
    assert await reader.restore("s", TP) == 2

    exported = resident.export_stream("s")
    loaded = restored.export_stream("s")
    assert loaded.layout == exported.layout
    assert loaded.pending_token_ids == exported.pending_token_ids
    assert torch.equal(loaded.keys, exported.keys)
    assert torch.equal(loaded.values, exported.values)

    probe = token_block(999, 24)
    expected_scores = resident.score({"s": probe})["s"]
    restored_scores = restored.score({"s": probe})["s"]
    # The first score depends on logits carried from the previous event, which a snapshot
    # does not hold; every later one depends only on the cache.
    torch.testing.assert_close(restored_scores[1:], expected_scores[1:], rtol=0, atol=0)

    params = GenerationParams(max_new_tokens=8, temperature=0.0)
    resident.submit(Request("s", "g", token_ids=token_block(5000, 5), generate=params))
    restored.submit(Request("s", "g", token_ids=token_block(5000, 5), generate=params))
    expected = resident.run_until_idle()[-1]
    actual = restored.run_until_idle()[-1]
    assert actual.token_ids == expected.token_ids
    await writer.close()
    await reader.close()


async def test_engine_restore_across_a_rebase(tiny_loaded, state_config):
    """A rebase rewrites every stored window key, so the snapshot after it is a new base."""
    settings = dict(ENGINE_SETTINGS, window_tokens=12, prefill_chunk_tokens=8, max_batch_tokens=16)
    resident = StreamEngine(tiny_loaded, EngineConfig(**settings))
    writer = build_state_hooks(state_config, resident)
    writer.bind(EngineStage(resident))
    await writer.on_assign([TP])
    restored = StreamEngine(tiny_loaded, EngineConfig(**settings))
    reader = build_state_hooks(state_config, restored)
    reader.bind(EngineStage(restored))

    rebase_checked = False
    for offset in range(40):  # 3-token events: the 48 evictions before a rebase come at event 21
        epoch = resident.streams["r"].layout.rebases_total if "r" in resident.streams else 0
        bases = writer.stats.bases_written
        feed(resident, "r", token_block(3 * offset, 3), f"e{offset}")
        assert await writer.checkpoint(TP, {"r": offset}, offset + 1)
        await writer.committed(TP, offset + 1)
        if resident.streams["r"].layout.rebases_total == epoch:
            continue

        assert writer.stats.bases_written == bases + 1, "the snapshot after a rebase must be a base"
        await reader.on_assign([TP])
        assert await reader.restore("r", TP) == offset
        exported, loaded = resident.export_stream("r"), restored.export_stream("r")
        assert loaded.layout == exported.layout
        assert torch.equal(loaded.keys, exported.keys)
        rebase_checked = True

        # The next snapshot is a delta on top of the post-rebase base again.
        feed(resident, "r", token_block(999, 2), "probe")
        bases = writer.stats.bases_written
        assert await writer.checkpoint(TP, {"r": offset}, offset + 1)
        assert writer.stats.bases_written == bases
        break
    assert rebase_checked
    await writer.close()
    await reader.close()


@pytest.mark.parametrize("action", ["reset", "end"])
async def test_engine_restore_after_restart_in_place(tiny_loaded, state_config, action):
    """After a reset or an end, the next snapshot is a base even when the new cache has more tokens."""
    resident = StreamEngine(tiny_loaded, EngineConfig(**ENGINE_SETTINGS))
    writer = build_state_hooks(state_config, resident)
    writer.bind(EngineStage(resident))
    await writer.on_assign([TP])
    feed(resident, "x", token_block(0, 20), "e0")
    assert await writer.checkpoint(TP, {"x": 0}, 1)
    await writer.committed(TP, 1)

    # Restart the stream and write more tokens than it held, all before the next checkpoint.
    resident.submit(Request("x", "e1", action=action))
    feed(resident, "x", token_block(500, 30), "e2")
    bases = writer.stats.bases_written
    assert await writer.checkpoint(TP, {"x": 2}, 3)
    await writer.committed(TP, 3)
    assert writer.stats.bases_written == bases + 1

    restored = StreamEngine(tiny_loaded, EngineConfig(**ENGINE_SETTINGS))
    reader = build_state_hooks(state_config, restored)
    reader.bind(EngineStage(restored))
    await reader.on_assign([TP])
    assert await reader.restore("x", TP) == 2
    exported, loaded = resident.export_stream("x"), restored.export_stream("x")
    assert loaded.layout == exported.layout
    assert torch.equal(loaded.keys, exported.keys)
    assert torch.equal(loaded.values, exported.values)
    await writer.close()
    await reader.close()


async def test_engine_restore_other_window_rejected(tiny_loaded, state_config):
    writer_engine = StreamEngine(tiny_loaded, EngineConfig(**ENGINE_SETTINGS))
    writer = build_state_hooks(state_config, writer_engine)
    writer.bind(EngineStage(writer_engine))
    feed(writer_engine, "s", token_block(0, 30), "e0")
    assert await writer.checkpoint(TP, {"s": 0}, 1)

    other = StreamEngine(tiny_loaded, EngineConfig(**dict(ENGINE_SETTINGS, window_tokens=44)))
    reader = build_state_hooks(state_config, other)
    reader.bind(EngineStage(other))
    assert await reader.restore("s", TP) is None
    assert reader.stats.rejected == {"engine_config": 1}
    assert "s" not in other.known_streams()
    await writer.close()
    await reader.close()


class RawEngineStage(EngineStage):
    """A stage handle that passes the engine's KeyError for unknown streams through."""

    async def export_stream(self, stream_id):
        return self.engine.export_stream(stream_id)


async def test_engine_dropped_stream_snapshot_deleted(tiny_loaded, state_config):
    engine = StreamEngine(tiny_loaded, EngineConfig(**ENGINE_SETTINGS))
    hooks = build_state_hooks(state_config, engine)
    hooks.bind(RawEngineStage(engine))
    feed(engine, "s", token_block(0, 30), "e0")
    assert await hooks.checkpoint(TP, {"s": 0}, 1)

    engine.drop_stream("s")
    assert await hooks.checkpoint(TP, {"s": 1}, 2)
    assert (await hooks.store.read_head("s")).latest is None
    await hooks.close()
