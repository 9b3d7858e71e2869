"""Settings of the snapshot store, the checkpoint policy and tiered residency."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.state.chain import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES

MIB = 1024 * 1024


class StateConfig(BaseSettings):
    """Validated settings of ``worker.state``; each field maps to ``SINKSTREAM_STATE_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix="SINKSTREAM_STATE_", frozen=True, extra="forbid", allow_inf_nan=False
    )

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis server URL")
    key_prefix: str = Field(
        "sinkstream", min_length=1, description="namespace of every key; must not contain '{' or '}'"
    )
    chunk_max_bytes: int = Field(
        8 * MIB,
        ge=MIN_CHUNK_BYTES,
        le=MAX_CHUNK_BYTES,
        description="maximum size of one Redis value in bytes; larger records are split into chunks",
    )
    pipeline_max_bytes: int = Field(
        64 * MIB, ge=64 * 1024, description="maximum bytes sent or requested in one pipeline round trip"
    )
    compression: Literal["zstd", "none"] = Field("zstd", description="codec of the K/V bytes")
    compression_level: int = Field(1, ge=1, le=22, description="zstd level")
    min_compression_gain: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="store a tensor compressed only when this fraction of its bytes is saved",
    )
    max_deltas: int = Field(
        16, ge=0, description="deltas after a base before the next snapshot is written as a new base"
    )
    socket_timeout_s: float = Field(
        30.0,
        gt=0,
        description=(
            "Redis socket timeout in seconds; redis.asyncio applies it to the whole reply of a "
            "command, so it must cover reading one pipeline of pipeline_max_bytes"
        ),
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="Redis connect timeout in seconds")
    max_connections: int = Field(
        64, ge=1, le=10_000, description="Redis connections of one worker; further commands wait for a free one"
    )
    pool_wait_s: float = Field(
        60.0, gt=0, description="seconds a command waits for a free connection before it fails"
    )
    retries: int = Field(3, ge=0, description="retries of a Redis command after a connection error or timeout")
    retry_backoff_cap_s: float = Field(2.0, gt=0, description="maximum backoff between retries in seconds")
    checkpoint_interval_events: int = Field(
        1000, ge=1, description="events of a partition after which a checkpoint is due"
    )
    checkpoint_interval_s: float = Field(
        5.0, gt=0, description="seconds after the previous checkpoint of a partition when the next is due"
    )
    max_unsafe_s: float = Field(
        120.0,
        gt=0,
        description="seconds a partition may go without a successful checkpoint before consuming pauses",
    )
    on_rejected: Literal["replay", "reset"] = Field(
        "replay",
        description=(
            "what to do with a stream whose snapshot is rejected: replay its events from the "
            "earliest offset the topic still holds, or start it from an empty cache"
        ),
    )
    max_resident_streams: int = Field(64, ge=1, description="streams held in device cache slots")
    max_host_streams: int = Field(
        256, ge=0, description="idle streams held in host memory once moved off the device"
    )

    @model_validator(mode="after")
    def _check(self) -> "StateConfig":
        if "{" in self.key_prefix or "}" in self.key_prefix:
            raise ValueError(
                f"key_prefix {self.key_prefix!r} contains a brace; braces are reserved for "
                "Redis Cluster hash tags, so choose a prefix without them"
            )
        if self.pipeline_max_bytes < self.chunk_max_bytes:
            raise ValueError(
                f"pipeline_max_bytes ({self.pipeline_max_bytes}) is below chunk_max_bytes "
                f"({self.chunk_max_bytes}); raise pipeline_max_bytes to at least one chunk"
            )
        return self
