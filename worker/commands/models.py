"""``sinkstream models``: fetch and inspect models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    models = subparsers.add_parser("models", help="fetch and inspect models")
    commands = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    fetch = commands.add_parser("fetch", help="download SmolLM2-135M-Instruct and convert it to safetensors")
    fetch.add_argument("--target", type=Path, default=None,
                       help="output directory (default: ~/.cache/sinkstream/models/smollm2-135m-instruct, "
                            "or under $SINKSTREAM_HOME)")
    fetch.add_argument("--force", action="store_true", help="download and convert again even if present")
    fetch.set_defaults(func=run_fetch)

    info = commands.add_parser("info", help="load a model and print its shape, fingerprint and cache size")
    info.add_argument("path", nargs="?", type=Path, default=None, help="model directory or .gguf file")
    info.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    info.set_defaults(func=run_info)


def run_fetch(args: argparse.Namespace) -> int:
    from worker.engine.fetch import fetch_default_model

    path = fetch_default_model(args.target, force=args.force)
    print(path)
    return 0


def run_info(args: argparse.Namespace) -> int:
    from worker.engine.models import load_model
    from worker.paths import default_model_dir

    loaded = load_model(args.path or default_model_dir(), dtype=args.dtype)
    spec = loaded.spec
    print(json.dumps({
        "source": loaded.source,
        "fingerprint": loaded.fingerprint,
        "model_type": spec.model_type,
        "num_layers": spec.num_layers,
        "num_heads": spec.num_heads,
        "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "max_positions": spec.max_positions,
        "kv_bytes_per_token": spec.kv_bytes_per_token_per_dtype_byte * loaded.dtype.itemsize,
    }, indent=2))
    return 0
