import pytest

from worker.stage.offsets import OffsetTracker


def test_tracker_empty_has_no_committable_offset():
    assert OffsetTracker().committable_offset() is None


def test_tracker_all_done_commits_past_last():
    tracker = OffsetTracker()
    for offset in (10, 11, 12):
        tracker.add(offset)
    for offset in (10, 11, 12):
        tracker.mark_done(offset)
    assert tracker.committable_offset() == 13
    assert tracker.num_pending == 0


def test_tracker_slow_head_holds_commit_back():
    tracker = OffsetTracker()
    for offset in range(5):
        tracker.add(offset)
    for offset in (1, 2, 3, 4):
        tracker.mark_done(offset)
    assert tracker.committable_offset() == 0
    assert tracker.num_not_done == 1
    assert tracker.num_pending == 5
    tracker.mark_done(0)
    assert tracker.committable_offset() == 5
    assert tracker.num_pending == 0


def test_tracker_gap_in_offsets_commits_first_not_done():
    tracker = OffsetTracker()
    for offset in (3, 7, 9):
        tracker.add(offset)
    tracker.mark_done(3)
    assert tracker.committable_offset() == 7
    tracker.mark_done(9)
    assert tracker.committable_offset() == 7
    tracker.mark_done(7)
    assert tracker.committable_offset() == 10


def test_tracker_decreasing_offset_raises():
    tracker = OffsetTracker()
    tracker.add(5)
    with pytest.raises(ValueError, match="offsets must increase"):
        tracker.add(5)


def test_tracker_unknown_offset_mark_returns_false():
    tracker = OffsetTracker()
    tracker.add(1)
    assert tracker.mark_done(0) is False
    assert tracker.mark_done(1) is True
    assert tracker.mark_done(1) is False  # released with the head


def test_tracker_double_mark_counts_once():
    tracker = OffsetTracker()
    tracker.add(0)
    tracker.add(1)
    tracker.mark_done(1)
    tracker.mark_done(1)
    assert tracker.num_not_done == 1


def test_tracker_needs_commit_after_set_committed_false():
    tracker = OffsetTracker()
    tracker.add(0)
    tracker.mark_done(0)
    assert tracker.needs_commit()
    tracker.set_committed(tracker.committable_offset())
    assert not tracker.needs_commit()
    tracker.add(1)
    assert not tracker.needs_commit()  # offset 1 is not done, the committable offset is still 1
    tracker.mark_done(1)
    assert tracker.needs_commit()
