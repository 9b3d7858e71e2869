"""Tiny random-weight models for tests, one per supported architecture family.

The real SmolLM2 tokenizer is used when `sinkstream models fetch` has run; the tiny
models share its vocabulary size so that token ids and chat templates are real.
"""

from __future__ import annotations

from pathlib import Path

import torch

from worker.paths import default_model_dir

VOCAB_SIZE = 49152


def real_model_dir() -> Path:
    return default_model_dir()


def load_tokenizer():
    from transformers import AutoTokenizer

    directory = real_model_dir()
    if not (directory / "tokenizer.json").exists():
        raise RuntimeError(
            f"the SmolLM2 tokenizer is missing at {directory}: run 'sinkstream models fetch' first "
            f"(.ci/run does this)"
        )
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def tiny_config(model_type: str = "llama", **overrides):
    """Return a transformers config of a 2-layer model with grouped-query attention."""
    from transformers import AutoConfig

    base = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if model_type == "llama":
        base["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 128}
    if model_type == "qwen2":
        base["use_sliding_window"] = False
    if model_type == "phi3":
        base.pop("head_dim")
        base["pad_token_id"] = 0
    base.update(overrides)
    return AutoConfig.for_model(model_type, **base)


def tiny_model(model_type: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    # Random init at std 0.02 gives nearly flat logits; larger weights make the tests sharper.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.08)
    return model.to(dtype).eval()
