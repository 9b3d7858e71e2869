"""The evaluator on the real SmolLM2-135M-Instruct (slow: run with ``-m slow``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from worker.evaluate import PplConfig, run_modes, tokenize_documents
from worker.paths import default_model_dir

pytestmark = pytest.mark.slow

# The opening of Moby-Dick (Herman Melville, 1851, public domain).
TEXT = (
    "Call me Ishmael. Some years ago\u2014never mind how long precisely\u2014having little or no money in "
    "my purse, and nothing particular to interest me on shore, I thought I would sail about a little and "
    "see the watery part of the world. It is a way I have of driving off the spleen and regulating the "
    "circulation. Whenever I find myself growing grim about the mouth; whenever it is a damp, drizzly "
    "November in my soul; whenever I find myself involuntarily pausing before coffin warehouses, and "
    "bringing up the rear of every funeral I meet; and especially whenever my hypos get such an upper "
    "hand of me, that it requires a strong moral principle to prevent me from deliberately stepping into "
    "the street, and methodically knocking people\u2019s hats off\u2014then, I account it high time to get "
    "to sea as soon as I can."
)


@pytest.fixture(scope="module")
def smollm2():
    from worker.engine import load_model

    path = default_model_dir()
    if not path.exists():
        pytest.fail(f"SmolLM2 not found at {path}; run `sinkstream models fetch` first")
    return load_model(path)


def test_smollm2_cache_larger_than_text_streaming_equals_dense(smollm2):
    documents, _ = tokenize_documents([("moby-dick-opening", TEXT)], smollm2.tokenizer, max_tokens=None)
    config = PplConfig(
        modes=("dense", "streaming", "recompute"), cache_tokens=512, sink_tokens=4, sample_stride=1, event_tokens=8
    )
    run = run_modes(smollm2, documents, config, progress_bar=False)
    dense = run.modes["dense"].nll[0]

    np.testing.assert_allclose(run.modes["streaming"].nll[0][1:], dense[1:], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(run.modes["recompute"].nll[0][1:], dense[1:], rtol=1e-3, atol=1e-3)
    assert math.exp(float(np.nanmean(dense))) < 100


def test_smollm2_window_worse_than_streaming_after_slide(smollm2):
    documents, _ = tokenize_documents([("moby-dick-opening", TEXT)], smollm2.tokenizer, max_tokens=None)
    config = PplConfig(modes=("window", "streaming"), cache_tokens=32, sink_tokens=4, event_tokens=4)
    run = run_modes(smollm2, documents, config, progress_bar=False)
    window = float(np.nanmean(run.modes["window"].nll[0][64:]))
    streaming = float(np.nanmean(run.modes["streaming"].nll[0][64:]))

    assert window > streaming
