"""Fixtures of the snapshot tests: a private redis-server and random cache states."""

from __future__ import annotations

import uuid

import pytest
import torch

from worker.devservices import start_redis
from worker.state.config import StateConfig
from worker.state.snapshots import CacheState
from worker.state.store import SnapshotStore

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM = 2, 2, 8
SINKS, WINDOW = 4, 28
ENGINE_CONFIG = {"sink_tokens": SINKS, "window_tokens": WINDOW, "dtype": "bfloat16", "capacity": SINKS + WINDOW}
FINGERPRINT = "tiny-llama-test-0001"


@pytest.fixture(scope="module")
def redis_process():
    process = start_redis()
    yield process
    process.stop()


@pytest.fixture
def state_config(redis_process) -> StateConfig:
    # A fresh prefix per test keeps tests apart inside the module's server.
    return StateConfig(
        redis_url=redis_process.url,
        key_prefix=f"test-{uuid.uuid4().hex[:8]}",
        chunk_max_bytes=64 * 1024,
        pipeline_max_bytes=256 * 1024,
        retries=1,
        socket_timeout_s=5.0,
    )


@pytest.fixture
async def store(state_config):
    snapshot_store = SnapshotStore(state_config)
    yield snapshot_store
    await snapshot_store.close()


def cache_state(
    stream_id: str = "s1",
    tokens_written: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    capacity: int = SINKS + WINDOW,
    head_dim: int = HEAD_DIM,
) -> CacheState:
    """Build a cache state whose filled slots hold random values and the rest zeros."""
    generator = torch.Generator().manual_seed(seed)
    shape = (NUM_LAYERS, NUM_KV_HEADS, capacity, head_dim)
    keys = torch.zeros(shape, dtype=dtype)
    values = torch.zeros(shape, dtype=dtype)
    filled = min(tokens_written, capacity)
    keys[:, :, :filled] = torch.randn((*shape[:2], filled, head_dim), generator=generator).to(dtype)
    values[:, :, :filled] = torch.randn((*shape[:2], filled, head_dim), generator=generator).to(dtype)
    return CacheState(
        stream_id=stream_id,
        fingerprint=FINGERPRINT,
        engine_config=dict(ENGINE_CONFIG, capacity=capacity),
        metadata={"stream_id": stream_id, "tokens_written": tokens_written, "tokens_seen": tokens_written},
        keys=keys,
        values=values,
    )
