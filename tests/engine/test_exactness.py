"""The engine against the naive reference and the plain transformers forward."""

import pytest
import torch

from tests.engine.helpers import compare_chunks, engine_chunk_logits, make_engine, random_tokens, split
from tests.engine.reference import NaiveSinkCache
from tests.models import tiny_model
from worker.engine import GenerationParams, Request, load_from_model

TOLERANCE = 1e-4


def test_exactness_no_eviction_matches_transformers(tiny_loaded):
    engine = make_engine(tiny_loaded, sink_tokens=4, window_tokens=60, chunk=16)
    tokens = random_tokens(50)
    scores = engine.score({"s": tokens})["s"]
    with torch.no_grad():
        logits = tiny_loaded.model(torch.tensor([tokens])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(tokens[1:]).unsqueeze(1)).squeeze(1)
    assert torch.isnan(scores[0])
    assert (scores[1:] - expected).abs().max().item() <= TOLERANCE


def test_exactness_no_eviction_matches_reference(tiny_loaded):
    engine = make_engine(tiny_loaded, sink_tokens=4, window_tokens=60, chunk=16)
    worst = compare_chunks(tiny_loaded, engine, split(random_tokens(50), 16), 4, 60)
    assert worst <= TOLERANCE


def test_exactness_token_by_token_past_several_windows(tiny_loaded):
    engine = make_engine(tiny_loaded, sink_tokens=4, window_tokens=12, chunk=4)
    tokens = random_tokens(16 * 5, seed=1)
    worst = compare_chunks(tiny_loaded, engine, split(tokens, 1), 4, 12)
    assert engine.streams["s"].layout.tokens_evicted_total == len(tokens) - 16
    assert engine.streams["s"].layout.rebases_total >= 1  # the stored window keys were rebased
    assert worst <= TOLERANCE


def test_exactness_chunked_events(tiny_loaded):
    engine = make_engine(tiny_loaded, sink_tokens=4, window_tokens=20, chunk=7)
    tokens = random_tokens(200, seed=2)
    sizes = [7, 3, 1, 7, 5, 2, 7, 7, 6, 1]
    chunks, start = [], 0
    while start < len(tokens):
        size = sizes[len(chunks) % len(sizes)]
        chunks.append(tokens[start:start + size])
        start += size
    worst = compare_chunks(tiny_loaded, engine, chunks, 4, 20)
    assert engine.streams["s"].layout.rebases_total >= 2
    assert worst <= TOLERANCE


def test_exactness_window_only(tiny_loaded):
    engine = make_engine(tiny_loaded, sink_tokens=0, window_tokens=16, chunk=5)
    worst = compare_chunks(tiny_loaded, engine, split(random_tokens(90, seed=3), 5), 0, 16)
    assert worst <= TOLERANCE


def test_exactness_event_longer_than_cache(tiny_loaded):
    """One request far longer than the cache runs in chunks; each chunk matches the reference."""
    engine = make_engine(tiny_loaded, sink_tokens=4, window_tokens=12, chunk=6, batch_tokens=64)
    tokens = random_tokens(100, seed=4)
    scores = engine.score({"s": tokens})["s"]
    reference = NaiveSinkCache(tiny_loaded.model, 4, 12)
    expected = []
    for chunk in split(tokens, 6):
        expected.append(torch.log_softmax(reference.feed(chunk), -1))
    logprobs = torch.cat(expected)
    wanted = logprobs[:-1].gather(1, torch.tensor(tokens[1:]).unsqueeze(1)).squeeze(1)
    assert engine.streams["s"].layout.num_cached == 16
    assert (scores[1:] - wanted).abs().max().item() <= TOLERANCE


def test_exactness_generation_longer_than_window(tiny_loaded):
    engine = make_engine(tiny_loaded, sink_tokens=4, window_tokens=12, chunk=8)
    prompt = random_tokens(10, seed=5)
    engine.submit(Request("g", "e1", token_ids=prompt, generate=GenerationParams(max_new_tokens=40)))
    (result,) = engine.run_until_idle()
    assert result.generated_tokens == 40
    assert result.finish_reason == "length"
    assert engine.streams["g"].layout.num_cached == 16

    # Replaying prompt + generated tokens through the reference gives the same greedy choices.
    reference = NaiveSinkCache(tiny_loaded.model, 4, 12)
    logits = reference.feed(prompt)
    chosen = []
    for _ in range(40):
        token = int(torch.argmax(logits[-1]))
        chosen.append(token)
        logits = reference.feed([token])
    assert chosen == result.token_ids


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3", "phi3"])
def test_exactness_other_rope_families(model_type, tokenizer):
    loaded = load_from_model(tiny_model(model_type, seed=7), tokenizer)
    assert loaded.spec.model_type == model_type
    engine = make_engine(loaded, sink_tokens=4, window_tokens=60, chunk=16)
    tokens = random_tokens(40, seed=8)
    scores = engine.score({"s": tokens})["s"]
    with torch.no_grad():
        logits = loaded.model(torch.tensor([tokens])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(tokens[1:]).unsqueeze(1)).squeeze(1)
    assert (scores[1:] - expected).abs().max().item() <= TOLERANCE

    evicting = make_engine(loaded, sink_tokens=2, window_tokens=10, chunk=3)
    worst = compare_chunks(loaded, evicting, split(random_tokens(60, seed=9), 3), 2, 10)
    assert worst <= TOLERANCE


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exactness_half_precision_near_float32(tokenizer, dtype):
    """Half-precision engines (prepacked or plain linear layers) stay near the float32 reference."""
    tokens = random_tokens(60, seed=4)
    chunks = split(tokens[:40], 8) + split(tokens[40:], 1)
    reference_loaded = load_from_model(tiny_model("llama", seed=5), tokenizer)
    reference = NaiveSinkCache(reference_loaded.model, 4, 20)
    half_loaded = load_from_model(tiny_model("llama", seed=5, dtype=dtype), tokenizer)
    engine = make_engine(half_loaded, sink_tokens=4, window_tokens=20, chunk=8)
    worst = 0.0
    for chunk in chunks:
        ours = engine_chunk_logits(engine, "s", chunk)
        worst = max(worst, (ours - reference.feed(chunk)).abs().max().item())
    assert engine.streams["s"].layout.tokens_evicted_total > 0
    assert worst <= 0.1, worst
