"""The ingress router: a faust app that re-keys JSON events by stream id.

Producers that cannot key their records by stream id write JSON events carrying a
``stream_id`` field to the ingress topic, with any key. The router validates each record
with ``parse_event`` and

1. writes a valid one to the events topic, keyed by its stream id, as the explicit JSON
   form of the event (its ``event_id`` defaults to the ingress record's coordinates), or
2. writes an invalid one to the dead-letter topic, unchanged, with the reason in headers.

Only then does it move on, and faust commits an ingress offset only after the record
has been handled, so every record is routed at least once (a crash may route a record
twice, and the copy carries the same ``event_id``). The agent runs with concurrency 1,
because faust-streaming can commit offsets past records that a concurrent agent instance
has not finished (a known faust-streaming bug), which would lose them on a crash.

Records keep their order per ingress partition. Events of one stream sent to different
ingress partitions have no defined order.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from dataclasses import dataclass
from typing import Any, Literal

from topology.config import TopologySettings
from topology.schemas import (
    PARSE_ERROR,
    EventLimits,
    Headers,
    KafkaMessage,
    build_dead_letter,
    parse_event,
)
from worker.exceptions import InvalidEventError

logger = logging.getLogger(__name__)

RESEND_DELAY_S = 5.0


@dataclass(frozen=True)
class RouteDecision:
    """Routing outcome of one ingress record: the target topic role and the record to write there."""

    target: Literal["events", "dlq"]
    message: KafkaMessage
    stream_id: str | None = None
    reason: str | None = None  # dead-letter reason code when target is "dlq"


def decide_route(
    key: bytes | None,
    value: bytes | None,
    headers: Headers,
    topic: str,
    partition: int,
    offset: int,
    limits: EventLimits,
    timestamp_ms: int | None = None,
) -> RouteDecision:
    """Validate one ingress record and return where it goes; does no I/O."""
    try:
        event = parse_event(
            key, value, headers, topic, partition, offset, limits,
            accept_raw=False, require_key_match=False, timestamp_ms=timestamp_ms,
        )
    except InvalidEventError as exc:
        error = exc
    except Exception as exc:
        # A validation bug must not stop the router on one record. The dead-letter topic
        # keeps the record for a rerun once the bug is fixed.
        logger.exception("validating %s[%d]@%d failed unexpectedly; dead-lettering it", topic, partition, offset)
        error = InvalidEventError(PARSE_ERROR, f"validation failed: {type(exc).__name__}")
    else:
        return RouteDecision("events", event.to_message(), stream_id=event.stream_id)
    message = build_dead_letter(key, value, headers, topic, partition, offset, error, timestamp_ms=timestamp_ms)
    return RouteDecision("dlq", message, reason=error.reason)


def build_router(settings: TopologySettings):
    """Build the faust app of the router; run it with ``run_router``."""
    import faust

    router = settings.router
    topics = settings.topic_specs()
    limits = settings.event_limits()
    app = faust.App(
        router.app_id,
        broker=settings.kafka.faust_broker_url(),
        broker_credentials=settings.kafka.faust_credentials(),
        broker_client_id=settings.kafka.client_id,
        store="memory://",
        datadir=router.data_dir or tempfile.mkdtemp(prefix="sinkstream-router-"),
        autodiscover=False,
        web_enabled=router.web_port != 0,
        web_port=router.web_port or 6066,
        web_bind="127.0.0.1",
        web_host="127.0.0.1",
        consumer_auto_offset_reset=router.auto_offset_reset,
        processing_guarantee="at_least_once",
        producer_acks=-1,
        # The leader topic is only needed by apps with tables; it would be one more topic to create.
        topic_disable_leader=True,
    )
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    ingress_topic = app.topic(topics.ingress.name, **raw)
    outgoing = {
        "events": app.topic(topics.events.name, **raw),
        "dlq": app.topic(topics.dlq.name, **raw),
    }

    @app.agent(ingress_topic, name="sinkstream-route", concurrency=1)
    async def route(stream) -> None:
        async for event in stream.events():
            record = event.message
            await _forward(record, outgoing, limits)

    logger.info(
        "router %s reads %s and writes %s and %s",
        router.app_id, topics.ingress.name, topics.events.name, topics.dlq.name,
    )
    return app


async def _forward(record: Any, outgoing: dict[str, Any], limits: EventLimits) -> None:
    timestamp_ms = int(record.timestamp * 1000) if record.timestamp else None
    decision = decide_route(
        record.key, record.value, record.headers, record.topic, record.partition, record.offset,
        limits, timestamp_ms,
    )
    message = decision.message
    attempt = 0
    while True:
        try:
            sent = await outgoing[decision.target].send(
                key=message.key,
                value=message.value,
                headers=list(message.headers),
                timestamp=message.timestamp_ms / 1000 if message.timestamp_ms is not None else None,
            )
            await sent  # wait for the broker's acknowledgement before faust may commit the ingress offset
            break
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # faust acknowledges the record of an agent that raises, so giving up here would
            # lose it; retry until the send succeeds or the router stops.
            attempt += 1
            logger.error(
                "writing %s[%d]@%d to the %s topic failed (attempt %d: %s); retrying in %.0f s",
                record.topic, record.partition, record.offset, decision.target, attempt, exc, RESEND_DELAY_S,
            )
            await asyncio.sleep(RESEND_DELAY_S)
    if decision.target == "dlq":
        logger.warning(
            "dead-lettered %s[%d]@%d: %s",
            record.topic, record.partition, record.offset, decision.reason,
        )
    else:
        logger.debug(
            "routed %s[%d]@%d to stream %s", record.topic, record.partition, record.offset, decision.stream_id
        )


def run_router(settings: TopologySettings, loglevel: str = "INFO") -> None:
    """Run the router until SIGINT or SIGTERM; faust's worker handles both signals."""
    import faust

    app = build_router(settings)
    worker = faust.Worker(app, loglevel=loglevel, override_logging=False, quiet=True)
    worker.execute_from_commandline()
