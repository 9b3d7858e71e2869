"""The validated settings of one perplexity run."""

from __future__ import annotations

from dataclasses import dataclass

from worker.exceptions import ConfigError

MODES = ("dense", "window", "recompute", "streaming")


@dataclass(frozen=True)
class PplConfig:
    """Settings of one perplexity run over a set of documents.

    Every mode scores the same tokens. Position ``t`` of a document is the prediction of
    token ``t`` from the tokens before it, so position 0 is never scored.
    """

    modes: tuple[str, ...] = MODES
    cache_tokens: int = 1024
    """Total KV cache per stream (sinks plus window) for window, recompute and streaming."""
    sink_tokens: int = 4
    """Attention sinks kept by streaming mode. Window mode always keeps 0."""
    sample_stride: int = 64
    """Recompute scores every ``sample_stride``-th position, and the other modes also
    report their figures on those positions. 1 scores every position."""
    max_tokens: int | None = None
    """Truncate each document to this many tokens; None keeps all."""
    dense_max_tokens: int | None = None
    """Dense mode scores at most this many leading tokens; None means twice the model's
    trained positions, enough to show what happens past them."""
    event_tokens: int = 1
    """Tokens appended per engine call in window and streaming mode; 1 is token by token."""
    segment_tokens: int = 1000
    """Width of the per-segment perplexity bins in the summary and the plot."""
    recompute_batch: int = 4
    """Scored positions per recompute forward."""
    dense_chunk_tokens: int = 512
    """Tokens per dense forward; the KV cache carries the context between chunks."""
    compare_tokens: int | None = None
    """When set, also compare the perplexity of the first ``compare_tokens`` positions
    after ``warmup_tokens`` with that of the last ``compare_tokens`` positions."""
    warmup_tokens: int = 0
    """Positions skipped before the first comparison span."""

    def __post_init__(self) -> None:
        unknown = [mode for mode in self.modes if mode not in MODES]
        if unknown or not self.modes:
            raise ConfigError(f"invalid modes {list(self.modes)}; choose from {', '.join(MODES)}")
        _require_positive("cache_tokens", self.cache_tokens)
        _require_positive("sample_stride", self.sample_stride)
        _require_positive("event_tokens", self.event_tokens)
        _require_positive("segment_tokens", self.segment_tokens)
        _require_positive("recompute_batch", self.recompute_batch)
        _require_positive("dense_chunk_tokens", self.dense_chunk_tokens)
        if not 0 <= self.sink_tokens < self.cache_tokens:
            raise ConfigError(
                f"invalid sink_tokens={self.sink_tokens}; it must be at least 0 and below "
                f"cache_tokens={self.cache_tokens} so the window keeps at least one token"
            )
        if self.event_tokens > self.window_tokens:
            raise ConfigError(
                f"invalid event_tokens={self.event_tokens}; an event must fit in the window of "
                f"{self.window_tokens} tokens, so use at most that many"
            )
        for name in ("max_tokens", "dense_max_tokens", "compare_tokens"):
            value = getattr(self, name)
            if value is not None:
                _require_positive(name, value)
        if self.warmup_tokens < 0:
            raise ConfigError(f"invalid warmup_tokens={self.warmup_tokens}; use 0 or more")

    @property
    def window_tokens(self) -> int:
        """Recent tokens kept by streaming mode besides its sinks."""
        return self.cache_tokens - self.sink_tokens


def _require_positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"invalid {name}={value}; it must be a positive integer")
