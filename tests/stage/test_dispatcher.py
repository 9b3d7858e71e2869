from dataclasses import dataclass

import pytest

from worker.stage.dispatcher import StreamDispatcher


@dataclass
class Item:
    stream_id: str
    seq: int
    exclusive: bool = False


def drain_in_order(dispatcher, completions):
    """Take everything, completing items as they come; returns the order handed out."""
    order = []
    while True:
        taken = dispatcher.take()
        if not taken:
            return order
        for item in taken:
            order.append((item.stream_id, item.seq))
            if completions:
                dispatcher.complete(item.stream_id)


def test_dispatcher_keeps_per_stream_fifo():
    dispatcher = StreamDispatcher(max_in_flight=3)
    for seq in range(5):
        for stream_id in ("a", "b", "c"):
            dispatcher.admit(Item(stream_id, seq))
    order = drain_in_order(dispatcher, completions=True)
    assert len(order) == 15
    for stream_id in ("a", "b", "c"):
        assert [seq for sid, seq in order if sid == stream_id] == [0, 1, 2, 3, 4]


def test_dispatcher_alternates_between_streams():
    dispatcher = StreamDispatcher(max_in_flight=4, max_in_flight_per_stream=4)
    for seq in range(4):
        dispatcher.admit(Item("busy", seq))
    dispatcher.admit(Item("quiet", 0))
    taken = dispatcher.take()
    assert [item.stream_id for item in taken] == ["busy", "quiet", "busy", "busy"]


def test_dispatcher_in_flight_limit_blocks_until_complete():
    dispatcher = StreamDispatcher(max_in_flight=2)
    for stream_id in ("a", "b", "c"):
        dispatcher.admit(Item(stream_id, 0))
    assert len(dispatcher.take()) == 2
    assert dispatcher.take() == []
    dispatcher.complete("a")
    assert [item.stream_id for item in dispatcher.take()] == ["c"]


def test_dispatcher_per_stream_limit_caps_one_stream():
    dispatcher = StreamDispatcher(max_in_flight=10, max_in_flight_per_stream=2)
    for seq in range(5):
        dispatcher.admit(Item("a", seq))
    assert [item.seq for item in dispatcher.take()] == [0, 1]
    dispatcher.complete("a")
    assert [item.seq for item in dispatcher.take()] == [2]


def test_dispatcher_held_stream_waits_for_release():
    dispatcher = StreamDispatcher(max_in_flight=10)
    dispatcher.hold("a")
    dispatcher.admit(Item("a", 0))
    dispatcher.admit(Item("b", 0))
    assert [item.stream_id for item in dispatcher.take()] == ["b"]
    dispatcher.release("a")
    assert [item.stream_id for item in dispatcher.take()] == ["a"]


def test_dispatcher_exclusive_waits_and_blocks_stream():
    dispatcher = StreamDispatcher(max_in_flight=10, max_in_flight_per_stream=4)
    dispatcher.admit(Item("a", 0))
    dispatcher.admit(Item("a", 1, exclusive=True))
    dispatcher.admit(Item("a", 2))
    assert [item.seq for item in dispatcher.take()] == [0]
    dispatcher.complete("a")
    assert [item.seq for item in dispatcher.take()] == [1]
    assert dispatcher.take() == []  # seq 2 waits for the reset to complete
    dispatcher.complete("a")
    assert [item.seq for item in dispatcher.take()] == [2]


def test_dispatcher_discard_removes_queued_only():
    dispatcher = StreamDispatcher(max_in_flight=1)
    dispatcher.admit(Item("a", 0))
    dispatcher.admit(Item("a", 1))
    dispatcher.admit(Item("b", 0))
    dispatcher.take()
    removed = dispatcher.discard(lambda item: item.stream_id == "a")
    assert [(item.stream_id, item.seq) for item in removed] == [("a", 1)]
    assert dispatcher.num_queued == 1
    dispatcher.forget(["a"])
    assert dispatcher.num_in_flight == 0
    assert [item.stream_id for item in dispatcher.take()] == ["b"]


def test_dispatcher_complete_unknown_stream_asserts():
    dispatcher = StreamDispatcher(max_in_flight=1)
    with pytest.raises(AssertionError, match="did not have in flight"):
        dispatcher.complete("nope")


def test_dispatcher_zero_limit_raises():
    with pytest.raises(ValueError, match="must be >= 1"):
        StreamDispatcher(max_in_flight=0)
