"""Pure cache arithmetic for one stream: eviction, physical slots and positions.

Physical layout of one stream's slot (``S`` = sink_tokens, ``W`` = window_tokens)::

    physical index:  0 ........ S-1 | S ................................ S+W-1
    content:         sink tokens     | ring buffer of window tokens
                                     |   oldest token at S + ring_head,
                                     |   the i-th oldest at S + (ring_head + i) % W

Positions are assigned by cache order, not by physical index: sink ``j`` sits at
position ``j``, the ``i``-th oldest window token at ``sink_filled + i``.

Keys are stored rotated once, when written, by a *rotation index*: a sink by its
position, a window token by its position plus the stream's ``rotation_base``. Every
eviction moves the retained window tokens one position down and raises
``rotation_base`` by one, so the rotation index of a stored key stays what it was while
the key's position changes. Attention rotates each query twice: by its position for the
sinks, and by its position plus ``rotation_base`` for the window. Every key then gets the
score it would have at its current position, and no step rotates stored keys again.

``rotation_base`` is bounded: once the evictions since the last rebase would push it
above ``max_rotation_base(window)``, the step first re-rotates the stored window keys
by ``-rotation_base`` (a *rebase*) and restarts the count at zero. A window token lives
for ``window`` evictions and a rebase happens at most once per ``REBASE_LAPS * window``
evictions, so each stored key is rounded at most twice in its life, however long the
stream runs. Rotation indices stay below ``capacity + max_rotation_base(window)``; the
relative distance between any query and key in an attention score stays below ``capacity``.

The used physical region is always the prefix ``[0, sink_filled + window_count)``: the
ring only wraps once it is full, and from then on it stays full.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

REBASE_LAPS = 4
"""Window lengths of evictions between two rebases of a stream's stored window keys."""


def max_rotation_base(window_tokens: int) -> int:
    """Return the largest ``rotation_base`` a stream may reach before its keys are rebased."""
    return REBASE_LAPS * window_tokens


@dataclass(frozen=True)
class StreamLayout:
    """Cache bookkeeping of one stream; everything needed to locate its tokens."""

    sink_tokens: int
    window_tokens: int
    sink_filled: int = 0
    window_count: int = 0
    ring_head: int = 0
    tokens_cached_total: int = 0
    """Tokens ever written into the cache (evicted ones included)."""
    tokens_evicted_total: int = 0
    rotation_base: int = 0
    """Evictions since the last rebase: a window key's rotation index minus its position."""
    rebases_total: int = 0
    """Rebases so far; each one rewrote every stored window key."""
    epoch: int = 0
    """Identity of this incarnation of the stream's cache, chosen by the engine when the
    stream starts, is reset or starts again after an end. Snapshot deltas are valid only
    on top of a snapshot of the same epoch."""

    @property
    def capacity(self) -> int:
        return self.sink_tokens + self.window_tokens

    @property
    def num_cached(self) -> int:
        """Tokens in the cache now."""
        return self.sink_filled + self.window_count

    @property
    def used_slots(self) -> int:
        """Length of the used physical prefix."""
        return self.sink_filled + self.window_count

    def reset(self, epoch: int = 0) -> StreamLayout:
        """Return an empty layout of the same shape, with ``epoch`` as its identity."""
        return StreamLayout(self.sink_tokens, self.window_tokens, epoch=epoch)


@dataclass(frozen=True)
class AppendPlan:
    """Placement of ``num_tokens`` new tokens and the evictions that make room for them."""

    num_tokens: int
    num_evicted: int
    start_position: int
    """Position of the first new token; the new tokens take consecutive positions."""
    write_slots: tuple[int, ...]
    """Physical index of each new token, in order."""
    write_rotations: tuple[int, ...]
    """Rotation index of each new token's key, in order."""
    rebase_by: int
    """Before writing, rotate the stored window keys by ``-rebase_by`` (0: no rebase)."""
    after: StreamLayout
    """The layout once the tokens are written."""


def plan_append(layout: StreamLayout, num_tokens: int) -> AppendPlan:
    """Plan writing ``num_tokens`` tokens into a stream's cache, evicting the oldest window tokens."""
    sinks, window = layout.sink_tokens, layout.window_tokens
    assert num_tokens >= 1, f"plan_append needs at least one token, got {num_tokens}"
    to_sinks = min(num_tokens, sinks - layout.sink_filled)
    to_window = num_tokens - to_sinks
    assert to_window <= window, f"{to_window} tokens cannot fit a window of {window}; chunk the event"
    num_evicted = max(0, layout.window_count + to_window - window)
    ring_head = (layout.ring_head + num_evicted) % window
    num_retained = layout.window_count - num_evicted

    rebase_by = 0
    rotation_base = layout.rotation_base + num_evicted
    if rotation_base > max_rotation_base(window):
        rebase_by = layout.rotation_base
        rotation_base = num_evicted

    start_position = layout.sink_filled + num_retained
    write_slots = list(range(layout.sink_filled, layout.sink_filled + to_sinks))
    write_rotations = list(range(start_position, start_position + to_sinks))
    for offset in range(to_window):
        write_slots.append(sinks + (ring_head + num_retained + offset) % window)
        write_rotations.append(start_position + to_sinks + offset + rotation_base)

    after = replace(
        layout,
        sink_filled=layout.sink_filled + to_sinks,
        window_count=num_retained + to_window,
        ring_head=ring_head,
        tokens_cached_total=layout.tokens_cached_total + num_tokens,
        tokens_evicted_total=layout.tokens_evicted_total + num_evicted,
        rotation_base=rotation_base,
        rebases_total=layout.rebases_total + (1 if rebase_by else 0),
    )
    return AppendPlan(
        num_tokens=num_tokens,
        num_evicted=num_evicted,
        start_position=start_position,
        write_slots=tuple(write_slots),
        write_rotations=tuple(write_rotations),
        rebase_by=rebase_by,
        after=after,
    )


def slot_positions(layout: StreamLayout) -> list[int]:
    """Return the position of every used physical slot ``[0, used_slots)``, in physical order."""
    positions = list(range(layout.sink_filled))
    window = layout.window_tokens
    for physical in range(layout.window_count):
        positions.append(layout.sink_filled + (physical - layout.ring_head) % window)
    return positions


def logical_order(layout: StreamLayout) -> list[int]:
    """Return the physical indices of the cached tokens in cache (oldest first) order."""
    order = list(range(layout.sink_filled))
    for logical in range(layout.window_count):
        order.append(layout.sink_tokens + (layout.ring_head + logical) % layout.window_tokens)
    return order


def max_chunk(layout: StreamLayout, prefill_chunk_tokens: int) -> int:
    """Return the most tokens one forward may append to this stream."""
    return min(prefill_chunk_tokens, layout.window_tokens + (layout.sink_tokens - layout.sink_filled))
