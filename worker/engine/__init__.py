"""The streaming engine: per-stream attention-sink + window KV caches, batched across streams."""

from worker.engine.config import EngineConfig
from worker.engine.engine import (
    Request,
    Result,
    SnapshotMismatchError,
    StepStats,
    StreamBusyError,
    StreamEngine,
    StreamSnapshot,
)
from worker.engine.models import LoadedModel, load_from_model, load_model
from worker.engine.sampling import GenerationParams

__all__ = [
    "EngineConfig",
    "GenerationParams",
    "LoadedModel",
    "Request",
    "Result",
    "SnapshotMismatchError",
    "StepStats",
    "StreamBusyError",
    "StreamEngine",
    "StreamSnapshot",
    "load_from_model",
    "load_model",
]
