"""Dense and recompute scoring on a tiny random-weight Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.evaluate import Document, PplConfig
from worker.evaluate.scorers import sampled_positions, score_dense, score_recompute


def _document(length: int, seed: int = 1) -> Document:
    generator = torch.Generator().manual_seed(seed)
    return Document(f"doc-{seed}", torch.randint(1, 256, (length,), generator=generator).tolist())


def _reference_nll(model, context: list[int], target: int) -> float:
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([context])).logits[0, -1]
    return float(-torch.log_softmax(logits, dim=-1)[target])


def test_sampled_positions_stride_skips_position_zero():
    assert sampled_positions(10, 1).tolist() == list(range(1, 10))
    assert sampled_positions(10, 4).tolist() == [4, 8]
    assert sampled_positions(3, 4).tolist() == []


def test_dense_chunked_matches_one_forward(loaded):
    document = _document(50)
    whole = score_dense(loaded.model, document, 50, 1000, lambda count: None)
    chunked = score_dense(loaded.model, document, 50, 7, lambda count: None)

    assert np.isnan(whole[0])
    assert np.isfinite(whole[1:]).all()
    np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-5)


def test_dense_limit_leaves_tail_unscored(loaded):
    document = _document(30)
    nll = score_dense(loaded.model, document, 20, 8, lambda count: None)

    assert np.isfinite(nll[1:20]).all()
    assert np.isnan(nll[20:]).all()


def test_recompute_full_context_matches_dense(loaded):
    document = _document(40)
    config = PplConfig(modes=("recompute",), cache_tokens=64, sink_tokens=0, sample_stride=1, recompute_batch=5)
    dense = score_dense(loaded.model, document, 40, 16, lambda count: None)
    (recompute,) = score_recompute(loaded.model, [document], config, lambda count: None)

    np.testing.assert_allclose(recompute[1:], dense[1:], rtol=1e-4, atol=1e-5)


def test_recompute_context_is_previous_cache_tokens(loaded):
    document = _document(40)
    config = PplConfig(modes=("recompute",), cache_tokens=8, sink_tokens=0, sample_stride=5, recompute_batch=3)
    (nll,) = score_recompute(loaded.model, [document], config, lambda count: None)
    tokens = document.token_ids

    for position in (5, 10, 35):
        expected = _reference_nll(loaded.model, tokens[max(0, position - 8) : position], tokens[position])
        assert nll[position] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert np.isnan(nll[6])


def test_recompute_padded_batch_matches_unbatched(loaded):
    documents = [_document(30, seed=2), _document(12, seed=3)]
    batched_config = PplConfig(modes=("recompute",), cache_tokens=16, sink_tokens=0, sample_stride=1, recompute_batch=7)
    single_config = PplConfig(modes=("recompute",), cache_tokens=16, sink_tokens=0, sample_stride=1, recompute_batch=1)
    batched = score_recompute(loaded.model, documents, batched_config, lambda count: None)
    single = score_recompute(loaded.model, documents, single_config, lambda count: None)

    for batched_nll, single_nll in zip(batched, single):
        np.testing.assert_allclose(batched_nll, single_nll, rtol=1e-4, atol=1e-5)
