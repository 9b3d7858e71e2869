"""Residency beyond the host tier: streams dropped to Redis come back with identical outputs."""

from aiokafka.structs import TopicPartition

from tests.state.test_engine_restore import EngineStage, token_block
from worker.engine import EngineConfig, GenerationParams, Request, StreamEngine
from worker.state.engine_adapter import build_state_hooks
from worker.state.tiering import offload_clean_streams, plan_redis_offload

TP = TopicPartition("events", 0)
SMALL = dict(sink_tokens=4, window_tokens=44, prefill_chunk_tokens=32, max_batch_tokens=128)


def test_plan_redis_offload_lru_first():
    assert plan_redis_offload(["a", "b", "c", "d"], changed=set(), busy=set(), max_host_streams=4,
                              low_watermark=0.5) == ["a", "b"]


def test_plan_redis_offload_skips_changed_and_busy():
    chosen = plan_redis_offload(["a", "b", "c", "d", "e"], changed={"a"}, busy={"b"}, max_host_streams=4,
                                low_watermark=0.5)
    assert chosen == ["c", "d", "e"]


def test_plan_redis_offload_below_watermark_empty():
    assert plan_redis_offload(["a", "b"], changed=set(), busy=set(), max_host_streams=4) == []


def run_events(engine: StreamEngine, events: list[tuple[str, list[int], bool]], hooks=None):
    """Run events one at a time, as a stage would; with ``hooks``, checkpoint and offload after each."""
    outputs: dict[str, list[list[int]]] = {}
    offloaded: set[str] = set()
    changed: dict[str, int] = {}
    for offset, (stream_id, token_ids, generate) in enumerate(events):
        if hooks is not None and stream_id in offloaded:
            assert hooks.restore_sync(stream_id) is not None
            offloaded.discard(stream_id)
        params = GenerationParams(max_new_tokens=4, temperature=0.0) if generate else None
        engine.submit(Request(stream_id, f"e{offset}", token_ids=token_ids, generate=params))
        for result in engine.run_until_idle():
            assert not result.error, result.error
            outputs.setdefault(result.stream_id, []).append(list(result.token_ids or []))
        changed[stream_id] = offset
        if hooks is not None:
            assert hooks.checkpoint_sync(changed, offset + 1)
            changed.clear()
            offloaded.update(offload_clean_streams(engine, changed, engine.config.max_host_streams, 0.5))
    return outputs, offloaded


class SyncHooks:
    """Runs the async hooks from the synchronous driver above."""

    def __init__(self, hooks, loop) -> None:
        self.hooks = hooks
        self.loop = loop

    def restore_sync(self, stream_id):
        return self.loop.run_until_complete(self.hooks.restore(stream_id, TP))

    def checkpoint_sync(self, changed, next_offset):
        async def checkpoint():
            ok = await self.hooks.checkpoint(TP, dict(changed), next_offset)
            await self.hooks.committed(TP, next_offset)
            return ok

        return self.loop.run_until_complete(checkpoint())


def test_tiering_ten_times_resident_matches_all_resident(tiny_loaded, state_config):
    import asyncio

    num_streams = 20
    events = []
    for round_index in range(3):
        for stream in range(num_streams):
            events.append((f"s{stream:02d}", token_block(100 * stream + 10 * round_index, 9), round_index == 2))

    all_resident = StreamEngine(tiny_loaded, EngineConfig(**SMALL, max_resident_streams=num_streams,
                                                          max_host_streams=0))
    expected, _ = run_events(all_resident, events)

    tiered = StreamEngine(tiny_loaded, EngineConfig(**SMALL, max_resident_streams=2, max_host_streams=4))
    loop = asyncio.new_event_loop()
    try:
        hooks = build_state_hooks(state_config, tiered)
        hooks.bind(EngineStage(tiered))
        loop.run_until_complete(hooks.on_assign([TP]))
        actual, offloaded = run_events(tiered, events, SyncHooks(hooks, loop))
        assert hooks.stats.restores >= num_streams, "streams must have come back from Redis"
        assert len(tiered.known_streams()) <= 2 + 4
        loop.run_until_complete(hooks.close())
    finally:
        loop.close()
    assert actual == expected
