"""Topic definitions and their idempotent creation.

sinkstream uses four topics:

- ``ingress``: raw JSON events with any key; the router validates them and re-keys them.
- ``events``: events keyed by stream id; the workers consume it.
- ``outputs``: generated text, keyed by stream id.
- ``dlq``: events that failed validation, with the reason in headers.

The number of partitions of ``events`` bounds how many workers can share the load,
and a key's partition depends on that number: adding partitions later moves streams
to other partitions, so size it once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker.exceptions import SinkstreamError

logger = logging.getLogger(__name__)

DAY_MS = 24 * 3600 * 1000
DEFAULT_INGRESS_TOPIC = "sinkstream.ingress"
DEFAULT_EVENTS_TOPIC = "sinkstream.events"
DEFAULT_OUTPUTS_TOPIC = "sinkstream.outputs"
DEFAULT_DLQ_TOPIC = "sinkstream.dlq"
_TOPIC_ALREADY_EXISTS = 36  # Kafka error code TOPIC_ALREADY_EXISTS

# Kafka's rule for topic names: at most 249 characters of [a-zA-Z0-9._-].
_TOPIC_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
_MAX_TOPIC_NAME_LENGTH = 249


class TopicSpec(BaseModel):
    """One topic: its name, partition count, replication factor and retention."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    partitions: int = Field(ge=1, le=10_000, description="number of partitions")
    replication_factor: int = Field(1, ge=1, le=32, description="copies of each partition")
    retention_ms: int | None = Field(
        None, ge=-1, description="retention.ms of the topic; -1 keeps records forever, None uses the broker default"
    )
    configs: dict[str, str] = Field(default_factory=dict, description="further topic configs, as strings")

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not name or name in (".", ".."):
            raise ValueError(f"topic name {name!r} is invalid; use letters, digits, '.', '_' or '-'")
        if len(name) > _MAX_TOPIC_NAME_LENGTH:
            raise ValueError(f"topic name {name[:40]!r}... has {len(name)} characters; Kafka allows at most 249")
        bad = sorted(set(name) - _TOPIC_NAME_CHARS)
        if bad:
            raise ValueError(f"topic name {name!r} contains {''.join(bad)!r}; use only letters, digits, '.', '_' or '-'")
        return name

    def topic_configs(self) -> dict[str, str]:
        """Return the topic configs sent at creation: ``configs`` plus ``retention.ms`` when set."""
        configs = dict(self.configs)
        if self.retention_ms is not None:
            configs["retention.ms"] = str(self.retention_ms)
        return configs


class TopicSizing(BaseModel):
    """Partition count, replication factor and retention of one topic whose name is set elsewhere."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    partitions: int = Field(8, ge=1, le=10_000, description="number of partitions")
    replication_factor: int = Field(1, ge=1, le=32, description="copies of each partition")
    retention_ms: int | None = Field(
        7 * DAY_MS, ge=-1, description="retention.ms; -1 keeps records forever, None uses the broker default"
    )

    def spec(self, name: str) -> TopicSpec:
        return TopicSpec(name=name, **self.model_dump())


class TopicLayout(BaseModel):
    """Sizing of the four topics. The names come from the Kafka and router settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ingress: TopicSizing = TopicSizing(retention_ms=1 * DAY_MS)
    events: TopicSizing = TopicSizing()
    outputs: TopicSizing = TopicSizing()
    dlq: TopicSizing = TopicSizing(partitions=1, retention_ms=30 * DAY_MS)


class TopicsConfig(BaseModel):
    """The four sinkstream topics, named and sized."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ingress: TopicSpec = TopicLayout().ingress.spec(DEFAULT_INGRESS_TOPIC)
    events: TopicSpec = TopicLayout().events.spec(DEFAULT_EVENTS_TOPIC)
    outputs: TopicSpec = TopicLayout().outputs.spec(DEFAULT_OUTPUTS_TOPIC)
    dlq: TopicSpec = TopicLayout().dlq.spec(DEFAULT_DLQ_TOPIC)

    @classmethod
    def from_names(
        cls,
        *,
        ingress: str = DEFAULT_INGRESS_TOPIC,
        events: str = DEFAULT_EVENTS_TOPIC,
        outputs: str = DEFAULT_OUTPUTS_TOPIC,
        dlq: str = DEFAULT_DLQ_TOPIC,
        layout: TopicLayout | None = None,
    ) -> TopicsConfig:
        layout = layout or TopicLayout()
        return cls(
            ingress=layout.ingress.spec(ingress),
            events=layout.events.spec(events),
            outputs=layout.outputs.spec(outputs),
            dlq=layout.dlq.spec(dlq),
        )

    def all(self) -> list[TopicSpec]:
        return [self.ingress, self.events, self.outputs, self.dlq]


class TopicCreationError(SinkstreamError):
    """The broker rejected a topic creation for a reason other than the topic existing."""

    retriable = True


@dataclass(frozen=True)
class TopicCreation:
    """Outcome of ``create_topics`` for one topic."""

    name: str
    created: bool
    partitions: int  # partitions the topic has now
    expected_partitions: int

    @property
    def has_fewer_partitions(self) -> bool:
        return self.partitions < self.expected_partitions


async def create_topics(
    kafka: Any,
    topics: list[TopicSpec] | TopicsConfig,
    *,
    timeout_ms: int = 30_000,
) -> list[TopicCreation]:
    """Create the topics that do not exist yet, and check the partition counts of the others.

    ``kafka`` is a ``KafkaSettings`` (or a bootstrap address string for PLAINTEXT). Safe to
    run again: a topic that exists is left as it is. One that exists with fewer partitions
    than configured is logged as a warning and reported with ``has_fewer_partitions``,
    because sinkstream never adds partitions itself (that would move streams between
    partitions). Raises ``TopicCreationError`` for any other broker error.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from topology.settings import KafkaSettings

    if isinstance(kafka, str):
        kafka = KafkaSettings(bootstrap_servers=kafka)
    specs = topics.all() if isinstance(topics, TopicsConfig) else list(topics)
    admin = AIOKafkaAdminClient(**kafka.aiokafka_kwargs(), request_timeout_ms=timeout_ms)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [spec for spec in specs if spec.name not in existing]
        created = await _create_missing(admin, missing, timeout_ms, NewTopic)
        partition_counts = await _partition_counts(admin, [spec.name for spec in specs])
    finally:
        await admin.close()

    results = []
    for spec in specs:
        result = TopicCreation(
            name=spec.name,
            created=spec.name in created,
            partitions=partition_counts[spec.name],
            expected_partitions=spec.partitions,
        )
        if result.has_fewer_partitions:
            logger.warning(
                "topic %s has %d partitions but %d are configured; it stays as it is, so at most %d "
                "consumers share it (recreate it to change the count)",
                spec.name, result.partitions, spec.partitions, result.partitions,
            )
        elif not result.created:
            logger.info("topic %s exists, partitions: %d", spec.name, result.partitions)
        results.append(result)
    return results


async def _create_missing(admin, missing: list[TopicSpec], timeout_ms: int, new_topic_type) -> set[str]:
    """Create ``missing``; return the names created by this call (another client may win a race)."""
    if not missing:
        return set()
    new_topics = [
        new_topic_type(spec.name, spec.partitions, spec.replication_factor, topic_configs=spec.topic_configs())
        for spec in missing
    ]
    response = await admin.create_topics(new_topics, timeout_ms=timeout_ms)
    created = set()
    for topic_error in response.topic_errors:
        name, error_code, error_message = topic_error[0], topic_error[1], topic_error[-1]
        if error_code == 0:
            created.add(name)
            logger.info("created topic %s", name)
        elif error_code != _TOPIC_ALREADY_EXISTS:
            raise TopicCreationError(
                f"creating topic {name} failed with Kafka error {error_code}: {error_message}; "
                "check the broker log and the topic settings (partitions, replication factor, configs)"
            )
    return created


async def _partition_counts(admin, names: list[str]) -> dict[str, int]:
    counts = {}
    for description in await admin.describe_topics(names):
        name = description["topic"]
        if description["error_code"] != 0:
            raise TopicCreationError(
                f"describing topic {name} failed with Kafka error {description['error_code']}; "
                "check that the broker is reachable and the topic exists"
            )
        counts[name] = len(description["partitions"])
    return counts


