"""Locations of the local cache of models and data sets."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Return the cache root: ``$SINKSTREAM_HOME``, else ``~/.cache/sinkstream``."""
    root = os.environ.get("SINKSTREAM_HOME")
    if root:
        return Path(root).expanduser()
    return Path.home() / ".cache" / "sinkstream"


def models_dir() -> Path:
    return cache_dir() / "models"


def data_dir() -> Path:
    return cache_dir() / "data"


def default_model_dir() -> Path:
    """Return the converted safetensors directory of the default model."""
    return models_dir() / DEFAULT_MODEL_NAME
