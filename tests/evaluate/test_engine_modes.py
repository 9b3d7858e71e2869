"""Window and streaming modes through the sinkstream engine, checked against dense."""

from __future__ import annotations

import numpy as np
import torch

from worker.evaluate import Document, PplConfig, run_modes
from worker.evaluate.scorers import score_dense, score_engine


def _document(length: int, seed: int) -> Document:
    generator = torch.Generator().manual_seed(seed)
    return Document(f"doc-{seed}", torch.randint(1, 256, (length,), generator=generator).tolist())


def _no_progress(count: int) -> None:
    return None


def test_streaming_cache_larger_than_text_equals_dense(loaded):
    document = _document(40, seed=4)
    config = PplConfig(modes=("streaming",), cache_tokens=64, sink_tokens=4)
    dense = score_dense(loaded.model, document, 40, 512, _no_progress)
    (streaming,) = score_engine(loaded, [document], config, config.sink_tokens, _no_progress)

    assert np.isnan(streaming[0])
    np.testing.assert_allclose(streaming[1:], dense[1:], rtol=1e-4, atol=1e-5)


def test_streaming_long_events_match_single_tokens(loaded):
    document = _document(120, seed=5)
    token_by_token = PplConfig(modes=("streaming",), cache_tokens=32, sink_tokens=4, event_tokens=1)
    chunked = PplConfig(modes=("streaming",), cache_tokens=32, sink_tokens=4, event_tokens=8)
    (single,) = score_engine(loaded, [document], token_by_token, 4, _no_progress)
    (events,) = score_engine(loaded, [document], chunked, 4, _no_progress)

    assert np.isfinite(single[1:]).all()
    assert np.isfinite(events[1:]).all()
    # Before the first eviction both see the same context.
    np.testing.assert_allclose(events[1:28], single[1:28], rtol=1e-4, atol=1e-5)


def test_window_differs_from_streaming_after_slide(loaded):
    document = _document(80, seed=6)
    config = PplConfig(modes=("window", "streaming"), cache_tokens=16, sink_tokens=4)
    (window,) = score_engine(loaded, [document], config, 0, _no_progress)
    (streaming,) = score_engine(loaded, [document], config, 4, _no_progress)

    np.testing.assert_allclose(window[1:16], streaming[1:16], rtol=1e-4, atol=1e-5)
    assert not np.allclose(window[40:], streaming[40:], rtol=1e-3)


def test_concurrent_streams_match_separate_runs(loaded):
    documents = [_document(70, seed=7), _document(25, seed=8)]
    config = PplConfig(modes=("streaming",), cache_tokens=16, sink_tokens=4)
    together = score_engine(loaded, documents, config, 4, _no_progress)
    apart = [score_engine(loaded, [document], config, 4, _no_progress)[0] for document in documents]

    for joint, alone in zip(together, apart):
        np.testing.assert_allclose(joint, alone, rtol=1e-4, atol=1e-5)


def test_run_modes_all_modes_share_positions(loaded):
    documents = [_document(90, seed=9), _document(50, seed=10)]
    config = PplConfig(cache_tokens=16, sink_tokens=4, sample_stride=10, segment_tokens=30)
    run = run_modes(loaded, documents, config, progress_bar=False)

    assert list(run.modes) == ["dense", "window", "recompute", "streaming"]
    for doc_index, document in enumerate(documents):
        recompute = run.modes["recompute"].nll[doc_index]
        assert np.flatnonzero(np.isfinite(recompute)).tolist() == list(range(10, len(document.token_ids), 10))
        for mode in ("dense", "window", "streaming"):
            assert np.isfinite(run.modes[mode].nll[doc_index][1:]).all(), mode
    assert run.modes["streaming"].memory_trace
