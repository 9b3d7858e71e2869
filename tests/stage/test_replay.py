"""Which part of a stream's history a replay needs, and when that history is complete."""

from __future__ import annotations

from dataclasses import dataclass

from worker.stage.replay import ReplayOutcome, StreamHistory


@dataclass
class Event:
    offset: int
    action: str
    stream_id: str = "s"


def history_of(beginning_offset: int, actions: list[str]) -> StreamHistory:
    history = StreamHistory("s", beginning_offset, end_offset=100)
    for index, action in enumerate(actions):
        history.add(Event(beginning_offset + index * 3, action))
    return history


def test_history_whole_partition_kept_complete():
    history = history_of(0, ["append", "reset", "generate", "append"])
    assert history.complete
    assert [event.action for event in history.events] == ["append", "reset", "generate", "append"]
    assert (history.first_offset, history.last_offset) == (0, 9)


def test_history_retention_without_reset_incomplete():
    history = history_of(40, ["append", "generate"])
    assert not history.complete
    assert ReplayOutcome(history).complete is False


def test_history_retention_keeps_from_last_restart():
    history = history_of(40, ["append", "end", "append", "reset", "generate"])
    assert history.complete
    assert [event.action for event in history.events] == ["reset", "generate"]
    assert history.first_offset == 49


def test_history_retention_no_events_incomplete():
    assert not history_of(40, []).complete


def test_history_empty_partition_complete():
    history = history_of(0, [])
    assert history.complete
    assert history.first_offset is None
