"""Model loading: a local Hugging Face directory or a GGUF file, fully offline.

Only architectures whose cached keys are plain rotary-embedded keys can have their
positions reassigned inside the cache. ``check_architecture`` accepts those and rejects
everything else with the reason, before any weight is read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from worker.exceptions import ConfigError, ModelNotFoundError, UnsupportedModelError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# model_type -> family. The forward in worker/engine/forward.py handles these layouts.
SUPPORTED_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "qwen3",
    "phi3": "phi3",
}

# Known architectures whose cache cannot be position-reassigned, with the reason.
REJECTED_MODEL_TYPES = {
    "bloom": "uses ALiBi position biases, not rotary keys",
    "mpt": "uses ALiBi position biases, not rotary keys",
    "falcon": "may use ALiBi and parallel attention blocks; not supported",
    "baichuan": "the 13B variants use ALiBi position biases",
    "deepseek_v2": "uses multi-head latent attention (MLA): cached latents are not plain rotary keys",
    "deepseek_v3": "uses multi-head latent attention (MLA): cached latents are not plain rotary keys",
    "qwen2_vl": "uses multimodal rotary embeddings (M-RoPE) with 3-D positions",
    "qwen2_5_vl": "uses multimodal rotary embeddings (M-RoPE) with 3-D positions",
    "mamba": "is a recurrent state-space model with no KV cache",
    "mamba2": "is a recurrent state-space model with no KV cache",
    "rwkv": "is a recurrent model with no KV cache",
    "jamba": "is a hybrid of attention and recurrent (Mamba) layers",
    "zamba": "is a hybrid of attention and recurrent (Mamba) layers",
    "recurrent_gemma": "is a hybrid of attention and recurrent layers",
    "gemma2": "mixes sliding-window and global attention layers",
    "gemma3": "mixes sliding-window and global attention layers",
    "gemma3_text": "mixes sliding-window and global attention layers",
    "cohere2": "mixes sliding-window and global attention layers",
    "gpt2": "uses learned absolute position embeddings, not rotary keys",
    "opt": "uses learned absolute position embeddings, not rotary keys",
}

# RoPE variants whose angles depend only on the position, so a precomputed table is exact.
STATIC_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}


@dataclass(frozen=True)
class ModelSpec:
    """The shape facts of a model that the cache and the forward need."""

    model_type: str
    family: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    eos_token_ids: tuple[int, ...]

    @property
    def kv_bytes_per_token_per_dtype_byte(self) -> int:
        """Elements of K plus V stored per token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


@dataclass
class LoadedModel:
    """A model ready for the engine: weights, tokenizer, shape facts and fingerprint."""

    model: Any
    tokenizer: Any
    spec: ModelSpec
    dtype: torch.dtype
    device: torch.device
    fingerprint: str
    source: str
    extra: dict = field(default_factory=dict)


def _config_get(config: Any, name: str, default: Any = None) -> Any:
    return getattr(config, name, default)


def rope_parameters(config: Any) -> dict:
    """Return the RoPE settings of a transformers config, for v4 and v5 layouts."""
    params = _config_get(config, "rope_parameters") or _config_get(config, "rope_scaling") or {}
    params = dict(params)
    if "rope_type" not in params:
        params["rope_type"] = params.get("type", "default")
    return params


def check_architecture(config: Any, capacity: int | None = None) -> str:
    """Return the forward family for ``config``, or raise ``UnsupportedModelError`` saying why.

    ``capacity`` (sinks + window) is checked against sliding-window attention: a model
    whose every layer attends within a window of at least ``capacity`` tokens behaves as
    full attention inside the cache.
    """
    model_type = _config_get(config, "model_type", "unknown")
    if model_type in REJECTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model architecture {model_type!r} is not supported: it {REJECTED_MODEL_TYPES[model_type]}. "
            f"sinkstream reassigns rotary positions inside the cache, which needs plain rotary keys; "
            f"supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model architecture {model_type!r} is not supported; supported architectures "
            f"(plain rotary keys): {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    rope = rope_parameters(config)
    rope_type = rope["rope_type"]
    if rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedModelError(
            f"model architecture {model_type!r} with RoPE scaling {rope_type!r} is not supported: its "
            f"rotary angles depend on the sequence length ({rope_type} scaling), so keys cannot be "
            f"re-positioned exactly; supported RoPE types: {', '.join(sorted(STATIC_ROPE_TYPES))}"
        )
    partial = _config_get(config, "partial_rotary_factor", 1.0)
    if partial not in (None, 1.0):
        raise UnsupportedModelError(
            f"model architecture {model_type!r} with partial_rotary_factor={partial} is not supported"
        )
    layer_types = _config_get(config, "layer_types")
    if layer_types and any(kind != "full_attention" for kind in layer_types):
        raise UnsupportedModelError(
            f"model architecture {model_type!r} mixes attention layer types {sorted(set(layer_types))}: "
            f"hybrid sliding-window layers are not supported"
        )
    sliding_window = _config_get(config, "sliding_window")
    use_sliding = _config_get(config, "use_sliding_window", model_type == "mistral")
    if sliding_window and use_sliding and capacity is not None and capacity > sliding_window:
        raise UnsupportedModelError(
            f"model architecture {model_type!r} uses sliding-window attention of {sliding_window} tokens, "
            f"smaller than the cache capacity {capacity}; set sink_tokens + window_tokens <= {sliding_window}"
        )
    return SUPPORTED_MODEL_TYPES[model_type]


def model_spec(config: Any, tokenizer: Any, family: str) -> ModelSpec:
    num_heads = config.num_attention_heads
    head_dim = _config_get(config, "head_dim") or config.hidden_size // num_heads
    eos = _config_get(config, "eos_token_id")
    if eos is None:
        eos_ids = set()
    elif isinstance(eos, (list, tuple)):
        eos_ids = set(eos)
    else:
        eos_ids = {eos}
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    return ModelSpec(
        model_type=config.model_type,
        family=family,
        num_layers=config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=_config_get(config, "num_key_value_heads") or num_heads,
        head_dim=head_dim,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        max_positions=config.max_position_embeddings,
        eos_token_ids=tuple(sorted(eos_ids)),
    )


def _weights_identity(path: Path) -> str:
    """Hash the weight files of a model directory (cached beside them by size and mtime)."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) + sorted(path.glob("*.gguf"))
    if not files:
        return "no-weight-files"
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        marker = file.with_name(f".{file.name}.sha256")
        cached = None
        if marker.exists():
            recorded = marker.read_text().split()
            if len(recorded) == 3 and recorded[1:] == [str(stat.st_size), str(stat.st_mtime_ns)]:
                cached = recorded[0]
        if cached is None:
            file_digest = hashlib.sha256()
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    file_digest.update(block)
            cached = file_digest.hexdigest()
            try:
                marker.write_text(f"{cached} {stat.st_size} {stat.st_mtime_ns}\n")
            except OSError:
                pass  # read-only model volume: hash again next time
        digest.update(file.name.encode() + b"\0" + cached.encode())
    return digest.hexdigest()


def fingerprint(config: Any, weights_identity: str, dtype: torch.dtype) -> str:
    """Return a short stable id of (architecture, config, weights, dtype) for snapshots."""
    config_dict = config.to_dict()
    for volatile in ("_name_or_path", "_model_name_or_path", "transformers_version", "quantization_config",
                     "dtype", "torch_dtype", "_commit_hash", "architectures"):
        config_dict.pop(volatile, None)
    payload = json.dumps(
        {"config": config_dict, "weights": weights_identity, "dtype": str(dtype)}, sort_keys=True, default=str
    )
    return f"{config.model_type}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"invalid dtype {name!r}: use one of {', '.join(DTYPES)}") from None


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"invalid device {name!r}: use cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"invalid device {name!r}: use cpu or cuda[:N]")
    return device


def _quiet_bpe_cleanup(tokenizer) -> None:
    """Turn off the space clean-up that transformers skips for BPE tokenizers anyway.

    transformers does not apply it to BPE (it would drop spaces before punctuation) but
    warns on the first decode of every process while it is on. Decoded text is unchanged.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "BPE":
        tokenizer.clean_up_tokenization_spaces = False


def load_model(
    path: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    capacity: int | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a local directory or ``.gguf`` file.

    Nothing is fetched from a model hub: ``HF_HUB_OFFLINE`` is forced on while loading.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype)
    torch_device = device if isinstance(device, torch.device) else parse_device(str(device))
    source = Path(path).expanduser()
    if not source.exists():
        raise ModelNotFoundError(
            f"no model at {source}: run 'sinkstream models fetch' for the default model, "
            f"or pass a local Hugging Face directory or .gguf file"
        )
    gguf_kwargs: dict[str, Any] = {}
    if source.is_file():
        if source.suffix != ".gguf":
            raise ModelNotFoundError(f"{source} is a file but not a .gguf file; pass a model directory or a .gguf file")
        gguf_kwargs = {"gguf_file": source.name}
        directory = source.parent
    else:
        directory = source
        if not (directory / "config.json").exists():
            ggufs = sorted(directory.glob("*.gguf"))
            if not ggufs:
                raise ModelNotFoundError(f"{directory} has neither config.json nor a .gguf file")
            gguf_kwargs = {"gguf_file": ggufs[0].name}

    config = AutoConfig.from_pretrained(directory, local_files_only=True, **gguf_kwargs)
    family = check_architecture(config, capacity)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **gguf_kwargs)
    _quiet_bpe_cleanup(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(
        directory, local_files_only=True, dtype=torch_dtype, **gguf_kwargs
    )
    model.to(torch_device)
    model.eval()
    model.requires_grad_(False)
    spec = model_spec(model.config, tokenizer, family)
    identity = _weights_identity(source) if gguf_kwargs and source.is_file() else _weights_identity(directory)
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        dtype=torch_dtype,
        device=torch_device,
        fingerprint=fingerprint(model.config, identity, torch_dtype),
        source=str(source),
    )
    logger.info(
        "loaded %s from %s: %d layers, %d kv heads x %d, dtype %s, device %s, fingerprint %s",
        spec.model_type, source, spec.num_layers, spec.num_kv_heads, spec.head_dim,
        torch_dtype, torch_device, loaded.fingerprint,
    )
    return loaded


def load_from_model(model: Any, tokenizer: Any, capacity: int | None = None) -> LoadedModel:
    """Wrap an in-memory transformers model (tests build tiny random ones)."""
    family = check_architecture(model.config, capacity)
    _quiet_bpe_cleanup(tokenizer)
    model.eval()
    model.requires_grad_(False)
    parameter = next(model.parameters())
    spec = model_spec(model.config, tokenizer, family)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes()[:4096])
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        dtype=parameter.dtype,
        device=parameter.device,
        fingerprint=fingerprint(model.config, digest.hexdigest(), parameter.dtype),
        source="<in-memory>",
    )
