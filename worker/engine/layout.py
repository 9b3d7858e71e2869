"""Pure cache arithmetic for one stream: eviction, physical slots and positions.

Physical layout of one stream's slot (``S`` = sink_tokens, ``W`` = window_tokens)::

    physical index:  0 ........ S-1 | S ................................ S+W-1
    content:         sink tokens     | ring buffer of window tokens
                                     |   oldest token at S + ring_head,
                                     |   the i-th oldest at S + (ring_head + i) % W

Positions fed to the rotary embedding are assigned by cache order, not by physical
index: sink ``j`` sits at position ``j``, the ``i``-th oldest window token at
``sink_filled + i``. A key is rotated once, by its physical index, when it is written.
Attention rotates the query instead (see ``forward.key_segments``), so a token's stored
key never changes while its position shifts as older tokens are evicted.

The used physical region is always the prefix ``[0, sink_filled + window_count)``: the
ring only wraps once it is full, and from then on it stays full.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


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

    def reset(self) -> StreamLayout:
        return StreamLayout(self.sink_tokens, self.window_tokens)


@dataclass(frozen=True)
class AppendPlan:
    """Placement of ``num_tokens`` new tokens and the evictions that make room for them."""

    num_tokens: int
    num_evicted: int
    start_position: int
    """Position of the first new token; the new tokens take consecutive positions."""
    write_slots: tuple[int, ...]
    """Physical index of each new token, in order."""
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

    write_slots = list(range(layout.sink_filled, layout.sink_filled + to_sinks))
    for offset in range(to_window):
        write_slots.append(sinks + (ring_head + num_retained + offset) % window)

    after = replace(
        layout,
        sink_filled=layout.sink_filled + to_sinks,
        window_count=num_retained + to_window,
        ring_head=ring_head,
        tokens_cached_total=layout.tokens_cached_total + num_tokens,
        tokens_evicted_total=layout.tokens_evicted_total + num_evicted,
    )
    return AppendPlan(
        num_tokens=num_tokens,
        num_evicted=num_evicted,
        start_position=layout.sink_filled + num_retained,
        write_slots=tuple(write_slots),
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
