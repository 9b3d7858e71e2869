"""Shared fixtures: tiny random-weight models and the real SmolLM2 model."""

from __future__ import annotations

import pytest
import torch

from tests.models import load_tokenizer, real_model_dir, tiny_model

pytest_plugins = ["tests.conftest_services"]

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_loaded(tokenizer):
    """A tiny random-weight Llama (llama3 RoPE scaling) wrapped for the engine, float32."""
    from worker.engine import load_from_model

    return load_from_model(tiny_model("llama"), tokenizer)


@pytest.fixture(scope="session")
def smollm2_loaded():
    """The real SmolLM2-135M-Instruct in float32 (slow tests only)."""
    from worker.engine import load_model

    return load_model(real_model_dir(), dtype="float32")
