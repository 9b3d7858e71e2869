"""Validated configuration of the streaming engine."""

from __future__ import annotations

from dataclasses import dataclass

from worker.exceptions import ConfigError


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one ``StreamEngine``.

    The cache of each stream holds at most ``capacity = sink_tokens + window_tokens``
    tokens: the stream's first ``sink_tokens`` tokens for ever, then the most recent
    ``window_tokens`` tokens.
    """

    sink_tokens: int = 4
    """Tokens at the start of each stream that are never evicted (attention sinks)."""
    window_tokens: int = 2044
    """Most recent tokens kept after the sinks; older ones are evicted first."""
    prefill_chunk_tokens: int = 512
    """Maximum tokens of one stream fed in one forward; longer events run in chunks."""
    max_resident_streams: int = 8
    """Per-stream cache slots preallocated on the compute device."""
    max_host_streams: int = 64
    """Idle streams kept in host memory once the device slots are all in use."""
    max_batch_tokens: int = 2048
    """Maximum tokens of all streams together in one forward."""
    dtype: str = "float32"
    """Cache and compute dtype: float32, bfloat16 or float16."""
    device: str = "cpu"
    """Compute device: cpu or cuda[:N]."""
    prepack_weights: bool = True
    """On CPU, keep the linear weights fused and prepacked for oneDNN: faster decode, at the
    cost of a second copy of those weights in memory."""

    def __post_init__(self) -> None:
        checks = [
            (self.sink_tokens >= 0, "sink_tokens", self.sink_tokens, "use 0 or more (4 is the usual choice)"),
            (self.window_tokens >= 1, "window_tokens", self.window_tokens, "use 1 or more"),
            (self.prefill_chunk_tokens >= 1, "prefill_chunk_tokens", self.prefill_chunk_tokens, "use 1 or more"),
            (self.max_resident_streams >= 1, "max_resident_streams", self.max_resident_streams, "use 1 or more"),
            (self.max_host_streams >= 0, "max_host_streams", self.max_host_streams, "use 0 or more"),
            (self.max_batch_tokens >= 1, "max_batch_tokens", self.max_batch_tokens, "use 1 or more"),
        ]
        for valid, name, value, fix in checks:
            if not valid:
                raise ConfigError(f"invalid {name}={value}: {fix}")
        if self.prefill_chunk_tokens > self.window_tokens:
            raise ConfigError(
                f"prefill_chunk_tokens={self.prefill_chunk_tokens} exceeds window_tokens={self.window_tokens}: "
                f"a chunk must fit in the window after eviction; set prefill_chunk_tokens <= {self.window_tokens}"
            )
        if self.prefill_chunk_tokens > self.max_batch_tokens:
            raise ConfigError(
                f"prefill_chunk_tokens={self.prefill_chunk_tokens} exceeds max_batch_tokens={self.max_batch_tokens}: "
                f"no step could hold one chunk; raise max_batch_tokens or lower prefill_chunk_tokens"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"invalid dtype {self.dtype!r}: use float32, bfloat16 or float16")

    @property
    def capacity(self) -> int:
        """Maximum tokens in one stream's cache."""
        return self.sink_tokens + self.window_tokens

    def check_model(self, max_positions: int) -> None:
        """Reject a cache larger than the positions the model was trained on."""
        if self.capacity > max_positions:
            raise ConfigError(
                f"sink_tokens + window_tokens = {self.capacity} exceeds the model's {max_positions} trained "
                f"positions; lower window_tokens to at most {max_positions - self.sink_tokens}"
            )
