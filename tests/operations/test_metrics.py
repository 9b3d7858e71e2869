"""WorkerMetrics and its HTTP server, scraped over real HTTP."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from worker.engine.engine import Result, StepStats
from worker.metrics import (
    DEAD_LETTER_REASONS,
    EVENT_FAILURE_REASONS,
    METRIC_NAMES,
    HealthState,
    WorkerMetrics,
    start_metrics_server,
)

NAME_RULE = re.compile(r"^sinkstream_[a-z0-9_]+$")
UNIT_WORDS = ("ms", "milliseconds", "kb", "mb", "percent")


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or sample.labels == labels):
                return sample.value
    raise AssertionError(f"{name} {labels or ''} not in the scrape")


@pytest.fixture
def served():
    metrics = WorkerMetrics(CollectorRegistry())
    health = HealthState(stuck_after_s=60)
    server = start_metrics_server(0, metrics, health, host="127.0.0.1")
    yield metrics, health, server
    server.stop()


def test_metric_names_follow_conventions():
    for name in METRIC_NAMES:
        assert NAME_RULE.match(name), name
        parts = name.split("_")
        for unit in UNIT_WORDS:
            assert unit not in parts, f"{name} uses a non-base unit {unit!r}"


def test_counters_end_in_total():
    metrics = WorkerMetrics(CollectorRegistry())
    for family in metrics.registry.collect():
        if family.type == "counter":
            assert any(s.name == family.name + "_total" for s in family.samples), family.name


def test_labels_are_bounded():
    allowed = {"reason", "source", "direction", "topic", "partition"}
    metrics = WorkerMetrics(CollectorRegistry())
    for family in metrics.registry.collect():
        for sample in family.samples:
            extra = set(sample.labels) - allowed - {"le"}
            assert not extra or family.type == "info", f"{sample.name} has labels {extra}"


def test_failure_reason_unknown_counts_as_other():
    metrics = WorkerMetrics(CollectorRegistry())
    metrics.event_failed("stream-1234 exploded")
    metrics.dead_lettered("invalid_json")
    with pytest.raises(ValueError, match="publish_error"):
        metrics.dead_lettered("publish_error")  # not a dead-letter reason
    registry = metrics.registry
    assert registry.get_sample_value("sinkstream_events_failed_total", {"reason": "other"}) == 1
    assert registry.get_sample_value("sinkstream_dead_letters_total", {"reason": "invalid_json"}) == 1
    assert registry.get_sample_value("sinkstream_dead_letters_total", {"reason": "other"}) is None
    for reason in DEAD_LETTER_REASONS:
        assert registry.get_sample_value("sinkstream_dead_letters_total", {"reason": reason}) == (reason == "invalid_json")
    for reason in EVENT_FAILURE_REASONS:
        assert registry.get_sample_value("sinkstream_events_failed_total", {"reason": reason}) is not None


def test_observe_step_updates_counters_and_histograms():
    metrics = WorkerMetrics(CollectorRegistry())
    metrics.observe_step(StepStats(num_streams=3, batch_size=103, tokens_prefilled=100, tokens_generated=3,
                                   tokens_evicted=7, duration_s=0.02, resident_streams=5, host_streams=2,
                                   known_streams=7, slots_total=10))
    metrics.observe_step(StepStats(num_streams=0, slots_total=10))  # idle step: ignored
    r = metrics.registry
    assert r.get_sample_value("sinkstream_tokens_prefilled_total") == 100
    assert r.get_sample_value("sinkstream_tokens_generated_total") == 3
    assert r.get_sample_value("sinkstream_tokens_evicted_total") == 7
    assert r.get_sample_value("sinkstream_engine_batch_size_count") == 1
    assert r.get_sample_value("sinkstream_engine_batch_size_sum") == 3
    assert r.get_sample_value("sinkstream_engine_batch_tokens_sum") == 103
    assert r.get_sample_value("sinkstream_streams_resident") == 5
    assert r.get_sample_value("sinkstream_slot_utilization_ratio") == 0.5
    assert r.get_sample_value("sinkstream_streams_host") == 2
    assert r.get_sample_value("sinkstream_streams_known") == 7


def test_observe_result_first_token_and_inter_token():
    metrics = WorkerMetrics(CollectorRegistry())
    metrics.observe_result(Result("s", "e1", "generate", generated_tokens=5, time_to_first_token_s=0.5, total_s=1.3))
    metrics.observe_result(Result("s", "e2", "append", total_s=0.1))  # nothing generated: skipped
    r = metrics.registry
    assert r.get_sample_value("sinkstream_time_to_first_token_seconds_count") == 1
    assert r.get_sample_value("sinkstream_time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert r.get_sample_value("sinkstream_inter_token_latency_seconds_count") == 1
    assert r.get_sample_value("sinkstream_inter_token_latency_seconds_sum") == pytest.approx(0.2)


def test_event_latency_from_record_timestamp():
    metrics = WorkerMetrics(CollectorRegistry())
    metrics.observe_event_latency(1_000_000, now_s=1_001.5)
    metrics.observe_event_latency(5_000_000, now_s=1_000.0)  # producer clock ahead: 0
    metrics.observe_event_latency(-1, now_s=1_000.0)  # no timestamp: skipped
    r = metrics.registry
    assert r.get_sample_value("sinkstream_event_latency_seconds_count") == 2
    assert r.get_sample_value("sinkstream_event_latency_seconds_sum") == pytest.approx(1.5)


def test_server_metrics_endpoint_serves_every_name(served):
    metrics, health, server = served
    health.set_assignment([("events", 0), ("events", 1)])
    health.update_partition(("events", 1), position=10, lag=4)
    metrics.set_engine_info({"model": "smollm2-135m-instruct", "window_tokens": 2044})
    status, text = get(server.url + "/metrics")
    assert status == 200
    exposed = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    missing = set(METRIC_NAMES) - exposed
    assert not missing, f"not served: {sorted(missing)}"
    assert sample_value(text, "sinkstream_consumer_lag_records", {"topic": "events", "partition": "1"}) == 4
    assert sample_value(text, "sinkstream_consumer_assigned_partitions") == 2
    assert 'window_tokens="2044"' in text


def test_server_revoked_partition_series_removed(served):
    metrics, health, server = served
    health.set_assignment([("events", 0), ("events", 1)])
    get(server.url + "/metrics")
    health.set_assignment([("events", 1)])
    _, text = get(server.url + "/metrics")
    assert 'partition="0"' not in text
    assert 'partition="1"' in text


def test_healthz_ok_while_not_ready(served):
    _, _, server = served
    assert get(server.url + "/healthz")[0] == 200
    status, body = get(server.url + "/readyz")
    assert status == 503
    assert "model not loaded" in body


def test_readyz_passes_when_loaded_and_assigned(served):
    metrics, health, server = served
    health.set_model_loaded()
    health.set_kafka_connected(True)
    health.set_assignment([("events", 0)])
    status, body = get(server.url + "/readyz")
    assert status == 200, body
    _, text = get(server.url + "/metrics")
    assert sample_value(text, "sinkstream_ready") == 1
    assert sample_value(text, "sinkstream_model_loaded") == 1


def test_unknown_path_returns_404(served):
    _, _, server = served
    assert get(server.url + "/nope")[0] == 404


def test_server_port_in_use_raises_config_error(served):
    from worker.exceptions import ConfigError

    _, _, server = served
    with pytest.raises(ConfigError, match="SINKSTREAM_METRICS__PORT"):
        start_metrics_server(server.port, WorkerMetrics(CollectorRegistry()), HealthState())


def test_startupz_follows_model_loading(served):
    _, health, server = served
    assert get(server.url + "/startupz")[0] == 503
    health.set_model_loaded()
    assert get(server.url + "/startupz")[0] == 200


def test_unreported_redis_state_keeps_gauge(served):
    metrics, health, server = served
    metrics.redis_connected.set(1)  # set directly, as the snapshot store does
    _, text = get(server.url + "/metrics")
    assert sample_value(text, "sinkstream_redis_connected") == 1
    health.set_redis_connected(False)
    _, text = get(server.url + "/metrics")
    assert sample_value(text, "sinkstream_redis_connected") == 0
