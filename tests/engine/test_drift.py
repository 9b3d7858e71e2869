"""No rounding drift: bfloat16 logits after many evictions are as close as after 10."""

import pytest
import torch

from tests.engine.helpers import engine_chunk_logits, make_engine, random_tokens
from tests.engine.reference import NaiveSinkCache
from tests.models import tiny_model
from worker.engine import load_from_model

SINKS, WINDOW, CHUNK = 4, 1020, 1000


def run_drift(tokenizer, num_large_chunks: int) -> tuple[list, torch.Tensor, torch.Tensor]:
    loaded = load_from_model(tiny_model("llama", seed=11, dtype=torch.bfloat16), tokenizer)
    engine = make_engine(loaded, sink_tokens=SINKS, window_tokens=WINDOW, chunk=CHUNK, slots=1, batch_tokens=CHUNK)
    reference = NaiveSinkCache(loaded.model, SINKS, WINDOW)
    # Fill the cache exactly, evict 10, evict many more in large chunks, then compare again.
    sizes = [CHUNK, SINKS + WINDOW - CHUNK, 10] + [CHUNK] * num_large_chunks + [10]
    tokens = random_tokens(sum(sizes), seed=12)
    errors, start, first_sink_keys = [], 0, None
    for size in sizes:
        chunk = tokens[start:start + size]
        start += size
        ours = engine_chunk_logits(engine, "s", chunk, last_only=True)
        theirs = reference.feed(chunk, last_only=True)
        errors.append((engine.streams["s"].layout.tokens_evicted_total, (ours - theirs).abs().max().item()))
        if first_sink_keys is None:
            first_sink_keys = engine.pool.keys[:, 0, :, :SINKS].clone()
        for layer in range(len(reference.keys)):  # only sinks and the recent window are ever selected again
            del reference.keys[layer][SINKS:-(WINDOW + 1)]
            del reference.values[layer][SINKS:-(WINDOW + 1)]
    return errors, first_sink_keys, engine.pool.keys[:, 0, :, :SINKS].clone()


def check_drift(errors, first_sink_keys, last_sink_keys, min_evicted):
    early_evicted, early = errors[2]
    late_evicted, late = errors[-1]
    assert early_evicted == 10
    assert late_evicted >= min_evicted
    assert torch.equal(first_sink_keys, last_sink_keys)  # stored keys are never rewritten
    assert late <= 2 * early + 0.02, errors


def test_drift_bfloat16_after_2k_evictions(tokenizer):
    errors, first, last = run_drift(tokenizer, num_large_chunks=2)
    check_drift(errors, first, last, min_evicted=2_000)


@pytest.mark.slow
def test_drift_bfloat16_after_100k_evictions(tokenizer):
    errors, first, last = run_drift(tokenizer, num_large_chunks=100)
    check_drift(errors, first, last, min_evicted=100_000)
