from worker.state.slots import changed_slots, filled_slots, slot_of_token


def brute_force(prev: int, new: int, sinks: int, window: int) -> list[int]:
    return sorted({slot_of_token(i, sinks, window) for i in range(prev, new)})


def test_slot_of_token_sinks_then_ring():
    assert [slot_of_token(i, 2, 3) for i in range(8)] == [0, 1, 2, 3, 4, 2, 3, 4]


def test_changed_slots_matches_brute_force():
    for sinks in (0, 1, 4):
        for window in (1, 3, 8):
            for prev in range(0, 20):
                for new in range(prev, 40):
                    assert changed_slots(prev, new, sinks, window) == brute_force(prev, new, sinks, window), (
                        sinks, window, prev, new,
                    )


def test_changed_slots_after_reset_returns_none():
    assert changed_slots(100, 5, 4, 28) is None


def test_changed_slots_long_gap_covers_ring_only():
    assert changed_slots(10, 10_000, 4, 28) == list(range(4, 32))


def test_changed_slots_nothing_written_is_empty():
    assert changed_slots(50, 50, 4, 28) == []


def test_filled_slots_caps_at_capacity():
    assert filled_slots(3, 4, 28) == 3
    assert filled_slots(1000, 4, 28) == 32


def test_changed_slots_match_engine_layout():
    # The slots a delta stores must be exactly those the engine writes.
    from worker.engine.layout import StreamLayout, plan_append

    layout = StreamLayout(sink_tokens=4, window_tokens=28)
    for num_tokens in [3, 1, 9, 20, 28, 5, 17, 28, 2]:
        plan = plan_append(layout, num_tokens)
        expected = sorted(set(plan.write_slots))
        assert changed_slots(layout.tokens_cached_total, plan.after.tokens_cached_total, 4, 28) == expected
        layout = plan.after
