"""Pure step planning: which streams run in the next forward and with how many tokens.

The planner reads only counts and ids, never tensors, so it is tested without a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    """A stream with work waiting."""

    stream_id: str
    pending_tokens: int
    """Tokens waiting to be fed: a prompt's remainder, or 1 while decoding."""
    decoding: bool
    submitted_order: int
    """Submission sequence number of the stream's active request (lower runs first)."""
    resident: bool
    max_chunk: int
    """Most tokens this stream may take in one forward (chunk size and window room)."""


@dataclass(frozen=True)
class StepPlan:
    """Work of the next forward: (stream id, number of tokens) pairs, and slot moves."""

    items: tuple[tuple[str, int], ...]
    admit: tuple[str, ...] = ()
    """Streams to bring into a device slot before the forward."""
    offload: tuple[str, ...] = ()
    """Idle resident streams to move out of their slots to make room."""
    waiting: tuple[str, ...] = field(default=())
    """Streams with work that did not fit this step."""


def plan_step(
    candidates: list[Candidate],
    free_slots: int,
    idle_resident_lru: list[str],
    max_batch_tokens: int,
    max_offloads: int | None = None,
) -> StepPlan:
    """Choose the next step's work.

    Decoding streams go first (one token each keeps replies flowing), then prompt chunks
    in submission order. A stream outside the device needs a free slot, or an idle
    resident stream to offload, least recently used first, while the host tier has room
    for ``max_offloads`` more streams (None: no limit).
    """
    ordered = sorted(candidates, key=lambda c: (not c.decoding, c.submitted_order))
    budget = max_batch_tokens
    offloadable = list(idle_resident_lru)
    if max_offloads is not None:
        offloadable = offloadable[:max(0, max_offloads)]
    items, admit, offload, waiting = [], [], [], []
    for candidate in ordered:
        take = min(candidate.pending_tokens, candidate.max_chunk, budget)
        if take <= 0:
            waiting.append(candidate.stream_id)
            continue
        if not candidate.resident:
            if free_slots > 0:
                free_slots -= 1
            elif offloadable:
                offload.append(offloadable.pop(0))
            else:
                waiting.append(candidate.stream_id)
                continue
            admit.append(candidate.stream_id)
        items.append((candidate.stream_id, take))
        budget -= take
    return StepPlan(tuple(items), tuple(admit), tuple(offload), tuple(waiting))
