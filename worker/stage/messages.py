"""Glue between Kafka records, the message schemas of :mod:`topology.schemas` and the engine."""

from __future__ import annotations

from typing import Any

from aiokafka.structs import ConsumerRecord

from topology import schemas
from topology.schemas import (
    Event,
    EventLimits,
    OutputRecord,
    build_dead_letter,
    parse_event,
)
from worker.exceptions import InvalidEventError

__all__ = ["ENGINE_ERROR", "PARSE_ERROR", "InvalidEventError", "parse_record"]

# Dead-letter reason of an event the engine could not process (for example, no cache slot).
ENGINE_ERROR = schemas.ENGINE_ERROR
# Dead-letter reason of a record on which validation raised an unexpected error.
PARSE_ERROR = schemas.PARSE_ERROR


def parse_record(record: ConsumerRecord, limits: EventLimits, raw_action: str) -> Event:
    """Validate one consumed record; raises InvalidEventError with a dead-letter reason."""
    return parse_event(
        record.key,
        record.value,
        record.headers,
        record.topic,
        record.partition,
        record.offset,
        limits,
        raw_action=raw_action,
        timestamp_ms=record.timestamp,
    )


def to_request(event: Event, request_id: str) -> Any:
    """Build the engine ``Request`` of an event; ``generate`` is an append followed by a reply."""
    from worker.engine import Request

    action = "append" if event.action == "generate" else event.action
    generate = event.generate.to_engine() if event.generate is not None else None
    return Request(
        stream_id=event.stream_id,
        event_id=request_id,
        text=event.text,
        role=event.role,
        generate=generate,
        action=action,
    )


def drop_streams(engine: Any, stream_ids: set[str]) -> None:
    """Free the caches of streams whose partition was revoked."""
    for stream_id in stream_ids:
        engine.drop_stream(stream_id)


def output_message(
    event: Event, result: Any, worker_id: str, model_fingerprint: str, queued_s: float, total_s: float
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Return the value and headers of the output record of ``event``."""
    output = OutputRecord.for_event(
        event,
        text=result.text or "",
        finish_reason=result.finish_reason,
        prompt_tokens=result.prompt_tokens,
        generated_tokens=result.generated_tokens,
        cached_tokens=result.cached_tokens,
        evicted_tokens=result.evicted_tokens,
        queued_s=round(queued_s, 6),
        time_to_first_token_s=_time_to_first_token(result),
        total_s=round(total_s, 6),
        worker_id=worker_id,
        model_fingerprint=model_fingerprint,
    )
    message = output.to_message()
    return message.value, list(message.headers)


def dead_letter_message(
    record: ConsumerRecord, error: InvalidEventError
) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    """Return the key, value and headers of the dead letter of ``record``: original bytes plus the reason.

    The key is None when the record was too large to copy whole (see ``build_dead_letter``).
    """
    message = build_dead_letter(
        record.key, record.value, record.headers, record.topic, record.partition, record.offset, error,
        timestamp_ms=record.timestamp,
    )
    return message.key, message.value, list(message.headers)


def _time_to_first_token(result: Any) -> float | None:
    value = getattr(result, "time_to_first_token_s", None)
    return round(value, 6) if value is not None else None
