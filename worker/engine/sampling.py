"""Token selection: greedy or seeded sampling with temperature, top-k and top-p."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from worker.exceptions import ConfigError


@dataclass(frozen=True)
class GenerationParams:
    """How to generate a reply. ``temperature == 0`` selects greedy decoding."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    """Keep only the ``top_k`` most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability adds up to ``top_p``."""
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    """Mixed into the per-event seed; the same (stream id, event id, seed) replays the same text."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"invalid max_new_tokens={self.max_new_tokens!r}: use an integer >= 1")
        if not self.temperature >= 0:
            raise ConfigError(f"invalid temperature={self.temperature!r}: use a number >= 0 (0 is greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"invalid top_k={self.top_k!r}: use an integer >= 0 (0 disables it)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"invalid top_p={self.top_p!r}: use a number in (0, 1]")
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(item, str) or not item for item in self.stop):
            raise ConfigError(f"invalid stop={self.stop!r}: use non-empty strings")


def event_seed(stream_id: str, event_id: str, seed: int | None) -> int:
    """Derive a 63-bit sampling seed from the stream id, the event id and the request's seed."""
    payload = f"{stream_id}\0{event_id}\0{seed if seed is not None else ''}".encode()
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "big") & ((1 << 63) - 1)


class Sampler:
    """Selects tokens for one request; its random state is private to that request."""

    def __init__(self, params: GenerationParams, stream_id: str, event_id: str) -> None:
        self.params = params
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(event_seed(stream_id, event_id, params.seed))

    def select(self, logits: torch.Tensor) -> int:
        """Return the next token id from float32 ``logits`` ``[vocab]``."""
        params = self.params
        if params.temperature == 0:
            return int(torch.argmax(logits))
        scores = logits.float().cpu() / params.temperature
        if params.top_k > 0 and params.top_k < scores.shape[-1]:
            threshold = torch.topk(scores, params.top_k).values[-1]
            scores = scores.masked_fill(scores < threshold, float("-inf"))
        probabilities = torch.softmax(scores, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, sorted_ids = torch.sort(probabilities, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            # Drop a token when the tokens before it already reach top_p; the first always stays.
            drop = (cumulative - sorted_probs) >= params.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probabilities = torch.zeros_like(probabilities).scatter_(0, sorted_ids, sorted_probs)
        return int(torch.multinomial(probabilities, 1, generator=self.generator))
