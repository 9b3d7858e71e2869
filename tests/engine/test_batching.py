"""Many streams in one forward: each stream's logits equal its logits when run alone."""

import torch

from tests.engine.helpers import make_engine, random_tokens
from worker.engine import GenerationParams, Request, StreamEngine
from worker.engine.forward import ForwardItem
from worker.engine.layout import plan_append

NUM_STREAMS = 8


def prepare_streams(engine: StreamEngine, fills: list[int]) -> None:
    for index, fill in enumerate(fills):
        engine.submit(Request(f"s{index}", "fill", token_ids=random_tokens(fill, seed=index) + [5]))
    engine.run_until_idle()


def next_items(engine: StreamEngine, chunks: dict[str, list[int]]) -> tuple[list[ForwardItem], list]:
    items, plans = [], []
    for stream_id, chunk in chunks.items():
        stream = engine.streams[stream_id]
        plan = plan_append(stream.layout, len(chunk))
        items.append(ForwardItem.from_plan(stream.slot, chunk, plan, all_logits=True))
        plans.append(plan)
    return items, plans


def test_batching_mixed_batch_equals_alone(tiny_loaded):
    fills = [1, 3, 9, 15, 20, 31, 40, 57]
    chunks = {f"s{i}": random_tokens(1 if i % 2 else 1 + i, seed=100 + i) for i in range(NUM_STREAMS)}

    batched = make_engine(tiny_loaded, sink_tokens=4, window_tokens=28, chunk=8, slots=NUM_STREAMS, batch_tokens=256)
    prepare_streams(batched, fills)
    items, _ = next_items(batched, chunks)
    together = batched.forward(items)

    for index, stream_id in enumerate(chunks):
        alone_engine = make_engine(tiny_loaded, sink_tokens=4, window_tokens=28, chunk=8, slots=NUM_STREAMS,
                                   batch_tokens=256)
        prepare_streams(alone_engine, fills)
        (item,), _ = next_items(alone_engine, {stream_id: chunks[stream_id]})
        (alone,) = alone_engine.forward([item])
        assert (together[index] - alone).abs().max().item() <= 1e-5, stream_id


def test_batching_one_step_runs_all_streams(tiny_loaded):
    engine = make_engine(tiny_loaded, sink_tokens=4, window_tokens=28, chunk=8, slots=NUM_STREAMS, batch_tokens=256)
    for index in range(NUM_STREAMS):
        engine.submit(Request(f"s{index}", "e", token_ids=random_tokens(5 + index, seed=index),
                              generate=GenerationParams(max_new_tokens=3)))
    engine.step()
    stats = engine.last_step_stats
    assert stats.num_streams == NUM_STREAMS
    assert stats.tokens_prefilled == sum(min(8, 5 + i) for i in range(NUM_STREAMS))


def test_batching_generation_equals_alone(tiny_loaded):
    """Greedy replies of 8 streams generated together equal each stream generated alone."""
    prompts = {f"s{i}": random_tokens(3 + 4 * i, seed=200 + i) for i in range(NUM_STREAMS)}
    together = make_engine(tiny_loaded, sink_tokens=4, window_tokens=20, chunk=8, slots=NUM_STREAMS,
                           batch_tokens=256)
    for stream_id, prompt in prompts.items():
        together.submit(Request(stream_id, "e", token_ids=prompt, generate=GenerationParams(max_new_tokens=30)))
    replies = {r.stream_id: r.token_ids for r in together.run_until_idle()}
    for stream_id, prompt in prompts.items():
        alone = make_engine(tiny_loaded, sink_tokens=4, window_tokens=20, chunk=8, slots=1)
        alone.submit(Request(stream_id, "e", token_ids=prompt, generate=GenerationParams(max_new_tokens=30)))
        (result,) = alone.run_until_idle()
        assert result.token_ids == replies[stream_id], stream_id


def test_batching_reset_leaves_other_streams(tiny_loaded):
    engine = make_engine(tiny_loaded, sink_tokens=4, window_tokens=28, chunk=8, slots=3, batch_tokens=64)
    prepare_streams(engine, [20, 20, 20])
    before = {sid: engine.export_stream(sid) for sid in ("s0", "s2")}
    engine.submit(Request("s1", "r", action="reset"))
    engine.submit(Request("s1", "again", token_ids=random_tokens(40, seed=9)))
    engine.run_until_idle()
    assert engine.streams["s1"].layout.tokens_evicted_total > 0
    for stream_id, snapshot in before.items():
        after = engine.export_stream(stream_id)
        assert torch.equal(after.keys, snapshot.keys)
        assert torch.equal(after.values, snapshot.values)
        assert after.layout == snapshot.layout


def test_batching_more_streams_than_slots(tiny_loaded):
    """Idle streams move to the host tier and come back with the same state."""
    prompts = {f"s{i}": random_tokens(6, seed=300 + i) for i in range(6)}
    small = make_engine(tiny_loaded, sink_tokens=4, window_tokens=20, chunk=8, slots=2)
    large = make_engine(tiny_loaded, sink_tokens=4, window_tokens=20, chunk=8, slots=6)
    for engine in (small, large):
        for turn in range(2):
            for stream_id, prompt in prompts.items():
                engine.submit(Request(stream_id, f"t{turn}", token_ids=prompt,
                                      generate=GenerationParams(max_new_tokens=4)))
    small_replies = {(r.stream_id, r.event_id): r.token_ids for r in small.run_until_idle()}
    large_replies = {(r.stream_id, r.event_id): r.token_ids for r in large.run_until_idle()}
    assert small_replies == large_replies
    assert len(small.resident_lru) == 2
    assert len(small.host_lru) == 4


def test_batching_full_tiers_fail_with_reason(tiny_loaded):
    """With every slot idle-occupied and the host tier full, a new stream's request fails, not hangs."""
    from worker.engine import EngineConfig, StreamEngine

    config = EngineConfig(sink_tokens=4, window_tokens=20, prefill_chunk_tokens=8, max_resident_streams=1,
                          max_host_streams=1, max_batch_tokens=64)
    engine = StreamEngine(tiny_loaded, config)
    for index in range(2):
        engine.submit(Request(f"s{index}", "fill", token_ids=random_tokens(6, seed=index),
                              generate=GenerationParams(max_new_tokens=2)))
    engine.run_until_idle()
    engine.submit(Request("late", "e", token_ids=random_tokens(6, seed=9), generate=GenerationParams(max_new_tokens=2)))
    (result,) = engine.run_until_idle()
    assert result.error is not None
    assert "raise max_host_streams" in result.error
    assert engine.host_stream_ids() == ["s0"]
    assert engine.resident_stream_ids() == ["s1"]
