"""Architecture checks at load time and model fingerprints."""

import pytest

from tests.models import tiny_config, tiny_model
from worker.engine import EngineConfig, StreamEngine, load_from_model, load_model
from worker.engine.models import check_architecture
from worker.exceptions import CapacityError, ModelNotFoundError, UnsupportedModelError


@pytest.mark.parametrize(
    ("model_type", "overrides", "fragment"),
    [
        ("bloom", {}, "ALiBi"),
        ("mpt", {}, "ALiBi"),
        ("deepseek_v2", {}, "multi-head latent attention"),
        ("qwen2_vl", {}, "M-RoPE"),
        ("mamba", {}, "recurrent"),
        ("gemma2", {}, "sliding-window and global"),
        ("gpt2", {}, "absolute position embeddings"),
    ],
)
def test_models_unsupported_architecture_rejected(model_type, overrides, fragment):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, **overrides)
    with pytest.raises(UnsupportedModelError, match=fragment) as error:
        check_architecture(config)
    assert repr(model_type) in str(error.value)


def test_models_dynamic_ntk_rejected():
    config = tiny_config("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(UnsupportedModelError, match="'dynamic'"):
        check_architecture(config)


def test_models_hybrid_layer_types_rejected():
    config = tiny_config("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1)
    with pytest.raises(UnsupportedModelError, match="sliding"):
        check_architecture(config, capacity=64)


def test_models_mistral_window_smaller_than_cache_rejected():
    config = tiny_config("mistral", sliding_window=32)
    check_architecture(config, capacity=32)
    with pytest.raises(UnsupportedModelError, match="sliding-window attention of 32 tokens"):
        check_architecture(config, capacity=64)


def test_models_fingerprint_tracks_weights_and_dtype(tokenizer):
    first = load_from_model(tiny_model("llama", seed=1), tokenizer)
    same = load_from_model(tiny_model("llama", seed=1), tokenizer)
    other = load_from_model(tiny_model("llama", seed=2), tokenizer)
    assert first.fingerprint == same.fingerprint
    assert first.fingerprint != other.fingerprint
    import torch

    half = load_from_model(tiny_model("llama", seed=1, dtype=torch.bfloat16), tokenizer)
    assert half.fingerprint != first.fingerprint


def test_models_missing_path_names_fetch(tmp_path):
    with pytest.raises(ModelNotFoundError, match="sinkstream models fetch"):
        load_model(tmp_path / "nothing-here")


def test_engine_pool_too_large_rejected(tiny_loaded):
    config = EngineConfig(sink_tokens=4, window_tokens=1000, max_resident_streams=10**7, prefill_chunk_tokens=64)
    with pytest.raises(CapacityError, match="lower max_resident_streams"):
        StreamEngine(tiny_loaded, config)


def test_engine_cache_beyond_sliding_window_rejected(tokenizer):
    loaded = load_from_model(tiny_model("mistral", sliding_window=32), tokenizer)
    StreamEngine(loaded, EngineConfig(sink_tokens=4, window_tokens=28, prefill_chunk_tokens=8))
    with pytest.raises(UnsupportedModelError, match="sliding-window attention of 32 tokens"):
        StreamEngine(loaded, EngineConfig(sink_tokens=4, window_tokens=60, prefill_chunk_tokens=8))


def test_models_bpe_cleanup_off_keeps_decoded_text():
    """Loading turns off the clean-up transformers skips for BPE, so decoding warns no more and reads the same."""
    from tests.models import load_tokenizer

    tokenizer = load_tokenizer()
    assert tokenizer.clean_up_tokenization_spaces, "the SmolLM2 tokenizer config turns the clean-up on"
    ids = tokenizer.encode("Call me Ishmael . Some years ago , never mind how long !")
    before = tokenizer.decode(ids)
    load_from_model(tiny_model("llama"), tokenizer)
    assert tokenizer.clean_up_tokenization_spaces is False
    assert tokenizer.decode(ids) == before == "Call me Ishmael . Some years ago , never mind how long !"


@pytest.mark.parametrize("name", ["tpu:7", "not a device", "mps"])
def test_models_invalid_device_names_fix(name):
    from worker.engine.models import parse_device
    from worker.exceptions import ConfigError

    with pytest.raises(ConfigError, match="use cpu or cuda"):
        parse_device(name)


def test_engine_available_memory_counts_page_cache():
    """The pool check reads MemAvailable: free pages alone leave out the reclaimable page cache."""
    import torch

    from worker.engine.engine import _available_memory

    meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo", encoding="ascii"))
    expected = int(meminfo["MemAvailable"].split()[0]) * 1024
    measured = _available_memory(torch.device("cpu"))
    assert abs(measured - expected) < 256 * 2**20
