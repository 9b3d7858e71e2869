"""Settings of the router and the command-line tools.

They reuse the worker's ``kafka`` and ``stage`` sections, so one set of ``SINKSTREAM_*``
variables configures the worker, the router and the tools: ``SINKSTREAM_KAFKA__BOOTSTRAP_SERVERS``,
``SINKSTREAM_KAFKA__EVENTS_TOPIC``, ``SINKSTREAM_STAGE__MAX_EVENT_BYTES`` and so on. Two
sections are added: ``topics`` (partitions, replication and retention for
``sinkstream topics create``) and ``router`` (the faust router).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from topology.schemas import EventLimits
from topology.topics import DEFAULT_INGRESS_TOPIC, TopicLayout, TopicsConfig
from worker.stage.settings import StageSettings, WorkerKafkaSettings


class RouterSettings(BaseModel):
    """The faust app that re-keys ingress events by stream id."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    ingress_topic: str = Field(DEFAULT_INGRESS_TOPIC, min_length=1, description="topic of JSON events with any key")
    app_id: str = Field("sinkstream-router", min_length=1, description="faust app id, also its consumer group id")
    web_port: int = Field(
        0, ge=0, le=65_535, description="port of faust's web server on 127.0.0.1; 0 turns the server off"
    )
    data_dir: str | None = Field(None, description="faust data directory; default: a new temporary directory")
    auto_offset_reset: str = Field(
        "earliest", pattern="^(earliest|latest)$", description="where a new consumer group starts reading"
    )


class TopologySettings(BaseSettings):
    """Settings of ``sinkstream route`` and the tools, from ``SINKSTREAM_*`` variables and arguments."""

    model_config = SettingsConfigDict(
        env_prefix="SINKSTREAM_", env_nested_delimiter="__", extra="ignore", frozen=True, allow_inf_nan=False
    )

    kafka: WorkerKafkaSettings = Field(default_factory=WorkerKafkaSettings)
    stage: StageSettings = Field(default_factory=StageSettings)
    topics: TopicLayout = Field(default_factory=TopicLayout)
    router: RouterSettings = Field(default_factory=RouterSettings)

    def topic_specs(self) -> TopicsConfig:
        """Return the four topics: names from ``kafka`` and ``router``, sizes from ``topics``."""
        return TopicsConfig.from_names(
            ingress=self.router.ingress_topic,
            events=self.kafka.events_topic,
            outputs=self.kafka.outputs_topic,
            dlq=self.kafka.dlq_topic,
            layout=self.topics,
        )

    def event_limits(self) -> EventLimits:
        return self.stage.event_limits()
