"""The engine on the real SmolLM2-135M-Instruct: reference match and mixed batches."""

import torch

from tests.engine.helpers import compare_chunks, make_engine, split
from worker.engine import GenerationParams, Request

TOLERANCE = 1e-3
TEXT = (
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
    "and nothing particular to interest me on shore, I thought I would sail about a little and see the watery "
    "part of the world. It is a way I have of driving off the spleen and regulating the circulation."
)


def test_smollm2_matches_reference_with_eviction(smollm2_loaded):
    tokens = smollm2_loaded.tokenizer.encode(TEXT)
    assert len(tokens) > 60
    engine = make_engine(smollm2_loaded, sink_tokens=4, window_tokens=28, chunk=8, slots=1)
    worst = compare_chunks(smollm2_loaded, engine, split(tokens, 8), 4, 28)
    assert engine.streams["s"].layout.tokens_evicted_total > 0
    assert worst <= TOLERANCE


def test_smollm2_no_eviction_matches_transformers(smollm2_loaded):
    tokens = smollm2_loaded.tokenizer.encode(TEXT)
    engine = make_engine(smollm2_loaded, sink_tokens=4, window_tokens=124, chunk=32, slots=1)
    scores = engine.score({"s": tokens})["s"]
    with torch.no_grad():
        logits = smollm2_loaded.model(torch.tensor([tokens])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(tokens[1:]).unsqueeze(1)).squeeze(1)
    assert (scores[1:] - expected).abs().max().item() <= TOLERANCE


def test_smollm2_mixed_batch_equals_alone(smollm2_loaded):
    tokens = smollm2_loaded.tokenizer.encode(TEXT)
    prompts = {f"s{i}": tokens[: 5 + 7 * i] for i in range(8)}
    params = GenerationParams(max_new_tokens=6)
    together = make_engine(smollm2_loaded, sink_tokens=4, window_tokens=28, chunk=8, slots=8, batch_tokens=128)
    for stream_id, prompt in prompts.items():
        together.submit(Request(stream_id, "e", token_ids=prompt, generate=params))
    replies = {r.stream_id: r.token_ids for r in together.run_until_idle()}
    for stream_id in ("s0", "s7"):
        alone = make_engine(smollm2_loaded, sink_tokens=4, window_tokens=28, chunk=8, slots=1)
        alone.submit(Request(stream_id, "e", token_ids=prompts[stream_id], generate=params))
        (result,) = alone.run_until_idle()
        assert result.token_ids == replies[stream_id], stream_id
