"""Pure cache arithmetic: eviction boundaries, positions and counters."""

import pytest

from worker.engine.config import EngineConfig
from worker.engine.layout import (
    REBASE_LAPS,
    StreamLayout,
    logical_order,
    max_chunk,
    max_rotation_base,
    plan_append,
    slot_positions,
)
from worker.exceptions import ConfigError


def fill(layout: StreamLayout, num_tokens: int, chunk: int = 1) -> StreamLayout:
    while num_tokens:
        take = min(chunk, num_tokens)
        layout = plan_append(layout, take).after
        num_tokens -= take
    return layout


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_layout_capacity_boundaries(chunk):
    sinks, window = 4, 8
    capacity = sinks + window
    below = fill(StreamLayout(sinks, window), capacity - 1, chunk)
    assert below.num_cached == capacity - 1
    assert below.tokens_evicted_total == 0
    full = fill(StreamLayout(sinks, window), capacity, chunk)
    assert full.num_cached == capacity
    assert full.tokens_evicted_total == 0
    plan = plan_append(full, 1)
    assert plan.num_evicted == 1
    assert plan.after.num_cached == capacity
    assert plan.after.tokens_evicted_total == 1


def test_layout_sinks_never_evicted():
    layout = fill(StreamLayout(4, 8), 1000, chunk=5)
    order = logical_order(layout)
    assert order[:4] == [0, 1, 2, 3]
    assert layout.sink_filled == 4
    assert layout.tokens_evicted_total == 1000 - 12


def test_layout_positions_stay_below_capacity():
    layout = StreamLayout(4, 8)
    for step in range(500):
        plan = plan_append(layout, 1 + step % 8)
        positions = slot_positions(plan.after)
        assert max(positions) < layout.capacity
        assert sorted(positions) == list(range(plan.after.num_cached))
        new_positions = range(plan.start_position, plan.start_position + plan.num_tokens)
        assert max(new_positions) == plan.after.num_cached - 1
        layout = plan.after


def test_layout_write_slots_hold_newest_tokens():
    """Token ids written through the plans reproduce sinks + most recent window."""
    sinks, window = 3, 5
    layout = StreamLayout(sinks, window)
    physical = [None] * (sinks + window)
    history = []
    for token in range(40):
        plan = plan_append(layout, 1)
        physical[plan.write_slots[0]] = token
        history.append(token)
        layout = plan.after
        cached = [physical[i] for i in logical_order(layout)]
        expected = history[:sinks] + history[sinks:][-window:]
        assert cached == expected


def test_layout_event_longer_than_cache_needs_chunks():
    layout = StreamLayout(4, 8)
    assert max_chunk(layout, 100) == 12
    full = fill(layout, 12)
    assert max_chunk(full, 100) == 8
    with pytest.raises(AssertionError):
        plan_append(full, 9)


def test_layout_window_only():
    layout = fill(StreamLayout(0, 6), 20, chunk=4)
    assert layout.sink_filled == 0
    assert layout.num_cached == 6
    assert sorted(slot_positions(layout)) == list(range(6))


def test_layout_large_counters_do_not_move_positions():
    layout = fill(StreamLayout(4, 8), 30, chunk=3)
    huge = StreamLayout(4, 8, layout.sink_filled, layout.window_count, layout.ring_head,
                        tokens_cached_total=2**31 + 30, tokens_evicted_total=2**31 + 18)
    plan_small, plan_huge = plan_append(layout, 2), plan_append(huge, 2)
    assert plan_small.write_slots == plan_huge.write_slots
    assert plan_small.start_position == plan_huge.start_position
    assert slot_positions(plan_small.after) == slot_positions(plan_huge.after)


def test_layout_rotation_index_is_position_plus_base():
    """Sinks are rotated by their position, window tokens by position + rotation_base."""
    layout = StreamLayout(2, 5)
    for step in range(60):
        plan = plan_append(layout, 1 + step % 3)
        for offset, rotation in enumerate(plan.write_rotations):
            position = plan.start_position + offset
            in_sinks = plan.write_slots[offset] < 2
            assert rotation == (position if in_sinks else position + plan.after.rotation_base)
        assert plan.after.rotation_base <= max_rotation_base(5)
        assert max(plan.write_rotations) < layout.capacity + max_rotation_base(5)
        layout = plan.after


def test_layout_rebase_once_per_key_lifetime():
    """A rebase restarts rotation_base; it comes at most once per REBASE_LAPS windows of evictions."""
    window = 6
    layout = fill(StreamLayout(2, window), 2 + window, chunk=4)
    rebase_steps = []
    for step in range(200):
        plan = plan_append(layout, 1)
        if plan.rebase_by:
            assert plan.rebase_by == layout.rotation_base
            assert plan.after.rotation_base == plan.num_evicted
            rebase_steps.append(step)
        layout = plan.after
    assert layout.rebases_total == len(rebase_steps) >= 2
    gaps = [b - a for a, b in zip(rebase_steps, rebase_steps[1:])]
    assert all(gap >= REBASE_LAPS * window for gap in gaps)  # a key lives `window` evictions


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"sink_tokens": -1}, "sink_tokens=-1"),
        ({"window_tokens": 0}, "window_tokens=0"),
        ({"window_tokens": 16, "prefill_chunk_tokens": 32}, "prefill_chunk_tokens=32 exceeds window_tokens=16"),
        ({"prefill_chunk_tokens": 512, "max_batch_tokens": 64}, "exceeds max_batch_tokens=64"),
        ({"dtype": "int8"}, "invalid dtype 'int8'"),
    ],
)
def test_config_invalid_rejected(settings, fragment):
    with pytest.raises(ConfigError, match=fragment):
        EngineConfig(**settings)


def test_config_beyond_trained_positions_rejected():
    config = EngineConfig(sink_tokens=4, window_tokens=8190, prefill_chunk_tokens=512)
    with pytest.raises(ConfigError, match="8194 exceeds the model's 8192 trained positions"):
        config.check_model(8192)
