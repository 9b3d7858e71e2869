"""Topic settings and idempotent topic creation on a real broker."""

from __future__ import annotations

import logging
import uuid

import pytest
from pydantic import ValidationError

from tests.conftest_services import run_coroutine
from topology.config import TopologySettings
from topology.topics import TopicLayout, TopicSpec, TopicsConfig, create_topics


def unique_topics(partitions: int = 2) -> TopicsConfig:
    prefix = f"t-create-{uuid.uuid4().hex[:8]}"
    layout = TopicLayout(**{role: {"partitions": partitions} for role in ("ingress", "events", "outputs", "dlq")})
    return TopicsConfig.from_names(
        ingress=f"{prefix}.ingress", events=f"{prefix}.events", outputs=f"{prefix}.outputs", dlq=f"{prefix}.dlq",
        layout=layout,
    )


def test_topics_config_defaults_named_and_sized():
    topics = TopicsConfig()
    names = [spec.name for spec in topics.all()]

    assert names == ["sinkstream.ingress", "sinkstream.events", "sinkstream.outputs", "sinkstream.dlq"]
    assert topics.events.partitions == 8
    assert topics.dlq.partitions == 1
    assert topics.events.topic_configs() == {"retention.ms": str(7 * 24 * 3600 * 1000)}


@pytest.mark.parametrize("name", ["", "..", "has space", "slash/name", "x" * 250])
def test_topic_spec_invalid_name_rejected(name):
    with pytest.raises(ValidationError):
        TopicSpec(name=name, partitions=1)


def test_topic_spec_zero_partitions_rejected():
    with pytest.raises(ValidationError):
        TopicSpec(name="ok", partitions=0)


def test_topology_settings_read_environment(monkeypatch):
    monkeypatch.setenv("SINKSTREAM_KAFKA__BOOTSTRAP_SERVERS", "10.0.0.1:9093")
    monkeypatch.setenv("SINKSTREAM_KAFKA__EVENTS_TOPIC", "my.events")
    monkeypatch.setenv("SINKSTREAM_TOPICS__EVENTS__PARTITIONS", "3")
    monkeypatch.setenv("SINKSTREAM_ROUTER__INGRESS_TOPIC", "my.ingress")
    monkeypatch.setenv("SINKSTREAM_STAGE__MAX_EVENT_BYTES", "1000")

    settings = TopologySettings()
    topics = settings.topic_specs()

    assert settings.kafka.bootstrap_servers == "10.0.0.1:9093"
    assert (topics.events.name, topics.events.partitions) == ("my.events", 3)
    assert topics.ingress.name == "my.ingress"
    assert topics.outputs.name == "sinkstream.outputs"
    assert settings.event_limits().max_event_bytes == 1000


def test_topology_settings_arguments_override_environment(monkeypatch):
    monkeypatch.setenv("SINKSTREAM_KAFKA__BOOTSTRAP_SERVERS", "10.0.0.1:9093")
    monkeypatch.setenv("SINKSTREAM_KAFKA__EVENTS_TOPIC", "my.events")

    settings = TopologySettings(kafka={"bootstrap_servers": "127.0.0.1:1"})

    assert settings.kafka.bootstrap_servers == "127.0.0.1:1"
    assert settings.kafka.events_topic == "my.events"


def test_create_topics_creates_then_is_idempotent(broker):
    topics = unique_topics()

    first = run_coroutine(create_topics(broker.bootstrap_servers, topics))
    second = run_coroutine(create_topics(broker.bootstrap_servers, topics))

    assert [result.created for result in first] == [True] * 4
    assert [result.partitions for result in first] == [2] * 4
    assert [result.created for result in second] == [False] * 4
    assert not any(result.has_fewer_partitions for result in second)


def test_create_topics_fewer_partitions_warns(broker, caplog):
    small = unique_topics(partitions=1)
    run_coroutine(create_topics(broker.bootstrap_servers, small))
    larger = TopicsConfig(**{role: getattr(small, role).model_copy(update={"partitions": 4})
                             for role in ("ingress", "events", "outputs", "dlq")})

    with caplog.at_level(logging.WARNING, logger="topology.topics"):
        results = run_coroutine(create_topics(broker.bootstrap_servers, larger))

    assert [result.partitions for result in results] == [1] * 4
    assert all(result.has_fewer_partitions for result in results)
    warned = " ".join(record.getMessage() for record in caplog.records)
    assert small.events.name in warned
    assert "1 partitions but 4 are configured" in warned
