"""HealthState readiness and stuck-consumer detection, on a controlled clock."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from worker.metrics import HealthState, WorkerMetrics

TP0 = ("events", 0)
TP1 = ("events", 1)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def health(clock):
    state = HealthState(stuck_after_s=30, clock=clock, wall_clock=clock)
    state.set_model_loaded()
    state.set_kafka_connected(True)
    state.set_assignment([TP0, TP1])
    return state


def test_ready_when_loaded_connected_assigned(health):
    assert health.ready() == (True, "ready")


def test_ready_without_model_fails(health):
    health.set_model_loaded(False)
    assert health.ready() == (False, "model not loaded")


def test_ready_without_kafka_fails(health):
    health.set_kafka_connected(False)
    assert health.ready()[0] is False


def test_ready_without_assignment_fails(health):
    health.set_assignment([])
    ready, reason = health.ready()
    assert ready is False
    assert "no partitions" in reason


def test_redis_down_keeps_ready(health):
    health.set_redis_connected(False)
    assert health.ready()[0] is True


def test_lag_without_progress_is_stuck(health, clock):
    health.update_partition(TP1, position=100, lag=50)
    clock.now += 29
    assert health.ready()[0] is True
    clock.now += 2
    ready, reason = health.ready()
    assert ready is False
    assert "events[1] lag 50" in reason
    assert health.snapshot().stuck_partitions == (TP1,)


def test_progress_resets_stuck_timer(health, clock):
    health.update_partition(TP1, position=100, lag=50)
    clock.now += 25
    health.update_partition(TP1, position=101, lag=49)
    clock.now += 25
    assert health.ready()[0] is True
    health.record_progress(TP1, offset=101)
    clock.now += 29
    assert health.ready()[0] is True


def test_caught_up_partition_never_stuck(health, clock):
    health.update_partition(TP0, position=100, lag=0)
    clock.now += 3600
    assert health.ready()[0] is True
    # Lag that appears after a long idle period gets the full grace time.
    health.update_partition(TP0, position=100, lag=5)
    assert health.ready()[0] is True
    clock.now += 31
    assert health.ready()[0] is False


def test_same_position_reported_again_is_no_progress(health, clock):
    health.update_partition(TP0, position=100, lag=3)
    clock.now += 20
    health.update_partition(TP0, position=100, lag=3)
    clock.now += 11
    assert health.ready()[0] is False


def test_new_assignment_starts_timer_and_drops_revoked(health, clock):
    health.update_partition(TP0, position=10, lag=3)
    clock.now += 31
    assert health.ready()[0] is False
    health.set_assignment([TP1, ("events", 2)])
    assert health.ready()[0] is True
    assert set(health.snapshot().partitions) == {TP1, ("events", 2)}


def test_updates_for_revoked_partition_ignored(health):
    health.set_assignment([TP0])
    health.update_partition(TP1, position=5, lag=100)
    health.record_progress(TP1, offset=5)
    assert set(health.snapshot().partitions) == {TP0}


def test_stuck_sets_gauge(health, clock):
    metrics = WorkerMetrics(CollectorRegistry())
    health.update_partition(TP0, position=10, lag=3)
    metrics.update_health(health.snapshot())
    assert metrics.registry.get_sample_value("sinkstream_consumer_stuck") == 0
    clock.now += 31
    metrics.update_health(health.snapshot())
    assert metrics.registry.get_sample_value("sinkstream_consumer_stuck") == 1
    assert metrics.registry.get_sample_value("sinkstream_ready") == 0


def test_stuck_after_must_be_positive():
    with pytest.raises(ValueError, match="stuck_after_s"):
        HealthState(stuck_after_s=0)


def test_checkpoint_overdue_fails_ready(clock):
    state = HealthState(stuck_after_s=30, max_unsafe_s=60, clock=clock, wall_clock=clock)
    state.set_model_loaded()
    state.set_kafka_connected(True)
    state.set_assignment([TP0])
    clock.now += 600  # nothing processed: nothing unsafe
    assert state.ready()[0] is True
    state.record_progress(TP0, offset=5)
    clock.now += 61
    ready, reason = state.ready()
    assert ready is False
    assert "checkpoint" in reason
    state.record_checkpoint()
    assert state.ready()[0] is True
