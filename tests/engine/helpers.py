"""Helpers for engine tests: run the engine and the naive reference on the same chunks."""

from __future__ import annotations

import torch

from tests.engine.reference import NaiveSinkCache
from worker.engine import EngineConfig, Request, StreamEngine


def make_engine(loaded, sink_tokens=4, window_tokens=28, chunk=8, slots=4, batch_tokens=64):
    config = EngineConfig(
        sink_tokens=sink_tokens,
        window_tokens=window_tokens,
        prefill_chunk_tokens=chunk,
        max_resident_streams=slots,
        max_batch_tokens=batch_tokens,
        dtype=str(loaded.dtype).removeprefix("torch."),
    )
    return StreamEngine(loaded, config)


def engine_chunk_logits(engine: StreamEngine, stream_id: str, chunk: list[int], last_only: bool = False) -> torch.Tensor:
    """Feed one chunk (no larger than prefill_chunk_tokens) and return logits for each token (or the last)."""
    from worker.engine.forward import ForwardItem
    from worker.engine.layout import plan_append

    engine.submit(Request(stream_id, "probe", token_ids=[]))
    engine.run_until_idle()  # creates the stream
    stream = engine.streams[stream_id]
    if stream.slot is None:
        stream.slot = engine.free_slots.pop()
        engine.resident_lru[stream_id] = None
    plan = plan_append(stream.layout, len(chunk))
    item = ForwardItem.from_plan(stream.slot, list(chunk), plan, all_logits=not last_only)
    logits = engine.forward([item])[0]
    stream.layout = plan.after
    return logits


def compare_chunks(loaded, engine, chunks, sink_tokens, window_tokens, stream_id="s"):
    """Return the max abs logit difference between engine and reference over all chunks."""
    reference = NaiveSinkCache(loaded.model, sink_tokens, window_tokens)
    worst = 0.0
    for chunk in chunks:
        ours = engine_chunk_logits(engine, stream_id, chunk)
        theirs = reference.feed(chunk)
        worst = max(worst, (ours - theirs).abs().max().item())
    return worst


def random_tokens(count: int, seed: int = 0, vocab: int = 49152) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count,), generator=generator).tolist()


def split(tokens: list[int], size: int) -> list[list[int]]:
    return [tokens[i:i + size] for i in range(0, len(tokens), size)]
