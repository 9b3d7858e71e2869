"""Glue between Kafka records, the message schemas of :mod:`topology.schemas` and the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiokafka.structs import ConsumerRecord

from topology.schemas import Event, EventLimits, OutputRecord, build_dead_letter, parse_event
from worker.exceptions import InvalidEventError

__all__ = ["ControlResult", "InvalidEventError", "parse_record"]

CONTROL_ACTIONS = ("reset", "end")


@dataclass(frozen=True)
class ControlResult:
    """The outcome of a reset or end event, shaped like the engine's ``Result``."""

    stream_id: str
    event_id: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0
    evicted_tokens: int = 0


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


def is_control(event: Event) -> bool:
    return event.action in CONTROL_ACTIONS


def to_request(event: Event, request_id: str) -> Any:
    """Build the engine ``Request`` of an append or generate event."""
    from worker.engine import Request

    generate = event.generate.to_engine() if event.generate is not None else None
    return Request(
        stream_id=event.stream_id,
        event_id=request_id,
        text=event.text,
        role=event.role,
        generate=generate,
    )


def apply_control(engine: Any, event: Event, request_id: str) -> ControlResult:
    """Run a reset or end event in the engine thread: reset clears the stream, end frees it."""
    if event.action == "reset":
        engine.reset_stream(event.stream_id)
    else:
        engine.drop_stream(event.stream_id)
    return ControlResult(stream_id=event.stream_id, event_id=request_id)


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


def dead_letter_message(record: ConsumerRecord, error: InvalidEventError) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Return the value and headers of the dead letter of ``record``: original bytes plus the reason."""
    message = build_dead_letter(
        record.key, record.value, record.headers, record.topic, record.partition, record.offset, error,
        timestamp_ms=record.timestamp,
    )
    return message.value, list(message.headers)


def _time_to_first_token(result: Any) -> float | None:
    value = getattr(result, "time_to_first_token_s", None)
    return round(value, 6) if value is not None else None
