"""Message schemas: input events, outputs and dead letters (version 1).

``docs/messages.md`` describes the formats for producers and consumers; this module is
the one place that reads and writes them. Parsing never logs or echoes event text,
because the text is user content.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from worker.exceptions import InvalidEventError

SCHEMA_VERSION = 1

ACTIONS = ("append", "generate", "reset", "end")
ROLES = ("system", "user", "assistant")
Action = Literal["append", "generate", "reset", "end"]
RawAction = Literal["append", "generate"]

HEADER_CONTENT_TYPE = "content-type"
HEADER_IDEMPOTENCY_KEY = "idempotency-key"
HEADER_SCHEMA = "x-sinkstream-schema"
# Output headers that differ between two copies of one output (timings, producing worker),
# kept out of the value so that a duplicate's value is byte-identical to the first copy.
HEADER_TIMINGS = "x-sinkstream-timings"
HEADER_WORKER_ID = "x-sinkstream-worker-id"
HEADER_DLQ_REASON = "x-sinkstream-dlq-reason"
HEADER_DLQ_MESSAGE = "x-sinkstream-dlq-message"
HEADER_DLQ_TOPIC = "x-sinkstream-source-topic"
HEADER_DLQ_PARTITION = "x-sinkstream-source-partition"
HEADER_DLQ_OFFSET = "x-sinkstream-source-offset"
HEADER_DLQ_DROPPED = "x-sinkstream-dropped"
_DLQ_HEADERS = (
    HEADER_DLQ_REASON, HEADER_DLQ_MESSAGE, HEADER_DLQ_TOPIC, HEADER_DLQ_PARTITION, HEADER_DLQ_OFFSET,
    HEADER_DLQ_DROPPED,
)
_MAX_DLQ_MESSAGE_BYTES = 1024
# A dead letter above this size loses its value (then its original headers, then its key),
# so that it fits the producers' default request size: 1,048,576 bytes in aiokafka 0.14 and
# 1,000,000 in faust-streaming 0.15. A broker may accept larger records than a producer sends.
MAX_DEAD_LETTER_BYTES = 900_000

JSON_CONTENT_TYPE = "application/json"
TEXT_CONTENT_TYPE = "text/plain"

# Dead-letter reason codes. Each InvalidEventError carries exactly one of them.
EMPTY_VALUE = "empty_value"
INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
UNSUPPORTED_CONTENT_TYPE = "unsupported_content_type"
UNSUPPORTED_SCHEMA = "unsupported_schema"
UNKNOWN_FIELD = "unknown_field"
WRONG_TYPE = "wrong_type"
UNKNOWN_ACTION = "unknown_action"
UNKNOWN_ROLE = "unknown_role"
MISSING_TEXT = "missing_text"
CONFLICTING_FIELDS = "conflicting_fields"
VALUE_TOO_LARGE = "value_too_large"
TEXT_TOO_LARGE = "text_too_large"
MISSING_STREAM_ID = "missing_stream_id"
INVALID_STREAM_ID = "invalid_stream_id"
STREAM_ID_MISMATCH = "stream_id_mismatch"
INVALID_EVENT_ID = "invalid_event_id"
INVALID_MAX_NEW_TOKENS = "invalid_max_new_tokens"
INVALID_TEMPERATURE = "invalid_temperature"
INVALID_TOP_P = "invalid_top_p"
INVALID_TOP_K = "invalid_top_k"
INVALID_STOP = "invalid_stop"
INVALID_SEED = "invalid_seed"
# Set by the worker, not by parse_event: the engine failed on a valid event (for example, in the tokenizer).
ENGINE_ERROR = "engine_error"
# Set by the worker and the router when validation itself raised an unexpected error (a bug).
PARSE_ERROR = "parse_error"

# Reasons parse_event raises, one per kind of invalid input.
INPUT_REASONS = (
    EMPTY_VALUE,
    INVALID_UTF8,
    INVALID_JSON,
    UNSUPPORTED_CONTENT_TYPE,
    UNSUPPORTED_SCHEMA,
    UNKNOWN_FIELD,
    WRONG_TYPE,
    UNKNOWN_ACTION,
    UNKNOWN_ROLE,
    MISSING_TEXT,
    CONFLICTING_FIELDS,
    VALUE_TOO_LARGE,
    TEXT_TOO_LARGE,
    MISSING_STREAM_ID,
    INVALID_STREAM_ID,
    STREAM_ID_MISMATCH,
    INVALID_EVENT_ID,
    INVALID_MAX_NEW_TOKENS,
    INVALID_TEMPERATURE,
    INVALID_TOP_P,
    INVALID_TOP_K,
    INVALID_STOP,
    INVALID_SEED,
)
DEAD_LETTER_REASONS = INPUT_REASONS + (ENGINE_ERROR, PARSE_ERROR)

_EVENT_FIELDS = frozenset({"schema", "stream_id", "event_id", "action", "text", "role", "generate"})
_GENERATE_FIELDS = frozenset({"max_new_tokens", "temperature", "top_p", "top_k", "stop", "seed"})
_MAX_SEED = 2**63 - 1

Headers = Mapping[str, bytes | str | None] | Iterable[tuple[str, bytes | str | None]] | None


class EventLimits(BaseModel):
    """Bounds that every input event must respect, and defaults for what it leaves out."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_event_bytes: int = Field(
        32_768, ge=1, le=16 * 1024 * 1024, description="maximum UTF-8 size of one event's text, in bytes"
    )
    max_stream_id_bytes: int = Field(256, ge=1, le=4096, description="maximum UTF-8 size of a stream id")
    max_event_id_bytes: int = Field(256, ge=1, le=4096, description="maximum UTF-8 size of an event id")
    max_new_tokens: int = Field(1024, ge=1, description="largest max_new_tokens a request may ask for")
    default_max_new_tokens: int = Field(128, ge=1, description="max_new_tokens when a request gives none")
    max_temperature: float = Field(5.0, gt=0, description="largest sampling temperature accepted")
    max_stop_sequences: int = Field(8, ge=0, description="most stop strings one request may give")
    max_stop_bytes: int = Field(256, ge=1, description="maximum UTF-8 size of one stop string")

    @model_validator(mode="after")
    def _check_defaults(self) -> EventLimits:
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"default_max_new_tokens {self.default_max_new_tokens} is above max_new_tokens "
                f"{self.max_new_tokens}; lower it or raise max_new_tokens"
            )
        return self

    @property
    def max_value_bytes(self) -> int:
        """Maximum size of a JSON value: text escaped as ``\\uXXXX`` takes up to 6 bytes per byte."""
        return 6 * self.max_event_bytes + 65_536


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling settings of one generate request; the fields of ``worker.engine.GenerationParams``."""

    max_new_tokens: int
    temperature: float = 0.0  # 0 is greedy decoding
    top_k: int = 0  # 0 disables top-k filtering
    top_p: float = 1.0  # 1.0 disables nucleus filtering
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def as_kwargs(self) -> dict[str, Any]:
        """Return the fields as keyword arguments: ``GenerationParams(**options.as_kwargs())``."""
        return {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}

    def to_engine(self):
        """Return the engine's ``GenerationParams`` with the same values."""
        from worker.engine import GenerationParams

        return GenerationParams(**self.as_kwargs())

    def to_json(self) -> dict[str, Any]:
        data = self.as_kwargs()
        data["stop"] = list(self.stop)
        return data


@dataclass(frozen=True)
class KafkaMessage:
    """A record to produce: key, value, headers and an optional timestamp."""

    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int | None = None

    def header(self, name: str) -> bytes | None:
        return _header_map(self.headers).get(name.lower())


@dataclass(frozen=True)
class Event:
    """One validated input event.

    ``topic``, ``partition`` and ``offset`` locate the record it was parsed from;
    ``event_id`` defaults to ``"{topic}:{partition}:{offset}"`` of that record.
    """

    stream_id: str
    event_id: str
    action: Action
    text: str | None
    role: str | None
    generate: GenerationOptions | None  # set exactly when action is "generate"
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = None
    format: Literal["raw", "json"] = "json"
    headers: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)

    @property
    def source(self) -> str:
        """The source record as ``topic[partition]@offset``, the form logs use."""
        return f"{self.topic}[{self.partition}]@{self.offset}"

    @property
    def idempotency_key(self) -> str:
        return idempotency_key(self.stream_id, self.topic, self.partition, self.offset)

    def to_json(self) -> dict[str, Any]:
        """Return the event in the JSON input schema, with every field explicit."""
        data: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "stream_id": self.stream_id,
            "event_id": self.event_id,
            "action": self.action,
        }
        if self.text is not None:
            data["text"] = self.text
        if self.role is not None:
            data["role"] = self.role
        if self.generate is not None:
            data["generate"] = self.generate.to_json()
        return data

    def to_message(self) -> KafkaMessage:
        """Return the event as a JSON record keyed by its stream id, keeping the original headers."""
        headers = [(name, value) for name, value in self.headers if name.lower() != HEADER_CONTENT_TYPE]
        headers.append((HEADER_CONTENT_TYPE, JSON_CONTENT_TYPE.encode()))
        return KafkaMessage(
            key=self.stream_id.encode("utf-8"),
            value=_dump_json(self.to_json()),
            headers=tuple(headers),
            timestamp_ms=self.timestamp_ms,
        )


def idempotency_key(stream_id: str, topic: str, partition: int, offset: int) -> str:
    """Return the id of the output of one source record: ``{stream_id}@{topic}[{partition}]:{offset}``."""
    return f"{stream_id}@{topic}[{partition}]:{offset}"


# --------------------------------------------------------------------------------------
# Parsing input events


def parse_event(
    key: bytes | None,
    value: bytes | None,
    headers: Headers,
    topic: str,
    partition: int,
    offset: int,
    limits: EventLimits,
    *,
    raw_action: RawAction = "append",
    accept_raw: bool = True,
    require_key_match: bool = True,
    timestamp_ms: int | None = None,
) -> Event:
    """Validate one input record and return its ``Event``.

    A record is JSON when its ``content-type`` header is ``application/json``, or, with no
    ``content-type`` header, when its value starts with ``{`` (after whitespace) and parses
    as a JSON object with at least one field of the event schema. Any other record is raw
    text keyed by stream id, and ``raw_action`` sets what it does. ``accept_raw=False``
    rejects raw records as ``invalid_json`` (the router's ingress topic takes JSON only).

    ``require_key_match`` rejects a JSON event whose ``stream_id`` differs from the record
    key, null keys included: a stream's events must share one key, so that they share one
    partition and one worker. The router turns it off because it re-keys events.

    Raises ``InvalidEventError`` whose ``reason`` is one of ``INPUT_REASONS``.
    """
    if not value:
        raise InvalidEventError(EMPTY_VALUE, "the record value is empty; send the text or a JSON event as the value")
    header_map = _header_map(headers)
    header_tuple = _header_tuple(headers)
    if not accept_raw and HEADER_CONTENT_TYPE not in header_map:
        # Only JSON is accepted here, so report why the value is not a JSON event (too large,
        # not UTF-8, not JSON) instead of reading it as raw text.
        document = _load_json_object(value, limits)
    else:
        document = _detect_json(value, header_map, limits)
    if document is None:
        if not accept_raw:
            raise InvalidEventError(
                INVALID_JSON,
                "the record is not a JSON event; this topic accepts JSON objects only "
                f"(set header {HEADER_CONTENT_TYPE}: {JSON_CONTENT_TYPE})",
            )
        return _parse_raw(key, value, header_tuple, topic, partition, offset, limits, raw_action, timestamp_ms)
    return _parse_json(
        key, document, header_tuple, topic, partition, offset, limits, require_key_match, timestamp_ms
    )


def _detect_json(value: bytes, header_map: dict[str, bytes], limits: EventLimits) -> dict | None:
    """Return the JSON object of a JSON record, or None for raw text (see ``parse_event``)."""
    content_type = header_map.get(HEADER_CONTENT_TYPE)
    if content_type is not None:
        media_type = content_type.decode("latin-1").split(";")[0].strip().lower()
        if media_type == TEXT_CONTENT_TYPE:
            return None
        if media_type != JSON_CONTENT_TYPE:
            raise InvalidEventError(
                UNSUPPORTED_CONTENT_TYPE,
                f"content-type {media_type!r} is not supported; use {JSON_CONTENT_TYPE} or {TEXT_CONTENT_TYPE}",
            )
        return _load_json_object(value, limits)
    if not value.lstrip()[:1] == b"{":
        return None
    try:
        document = _load_json_object(value, limits)
    except InvalidEventError:
        return None  # raw text that happens to start with "{"
    if _EVENT_FIELDS.isdisjoint(document):
        return None
    return document


def _load_json_object(value: bytes, limits: EventLimits) -> dict:
    if len(value) > limits.max_value_bytes:
        raise InvalidEventError(
            VALUE_TOO_LARGE,
            f"the JSON value has {len(value)} bytes, above the limit of {limits.max_value_bytes} "
            f"(6 x max_event_bytes + 64 KiB); split the text into several events",
        )
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEventError(INVALID_UTF8, f"the JSON value is not valid UTF-8 at byte {exc.start}") from exc
    try:
        document = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidEventError(INVALID_JSON, f"the value is not valid JSON: {_short(str(exc))}") from exc
    if not isinstance(document, dict):
        raise InvalidEventError(
            INVALID_JSON, f"the JSON value is a {_json_type(document)}; an event must be a JSON object"
        )
    return document


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _parse_raw(
    key: bytes | None,
    value: bytes,
    headers: tuple[tuple[str, bytes], ...],
    topic: str,
    partition: int,
    offset: int,
    limits: EventLimits,
    raw_action: RawAction,
    timestamp_ms: int | None,
) -> Event:
    if raw_action not in ("append", "generate"):
        raise ValueError(f"raw_action must be 'append' or 'generate', got {raw_action!r}")
    if key is None:
        raise InvalidEventError(
            MISSING_STREAM_ID, "the raw text record has no key; produce it with the stream id as the key"
        )
    stream_id = _stream_id_from_key(key, limits)
    if len(value) > limits.max_event_bytes:
        raise InvalidEventError(
            TEXT_TOO_LARGE,
            f"the text has {len(value)} bytes, above max_event_bytes {limits.max_event_bytes}; "
            "split it into several events",
        )
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEventError(INVALID_UTF8, f"the raw text is not valid UTF-8 at byte {exc.start}") from exc
    generate = GenerationOptions(max_new_tokens=limits.default_max_new_tokens) if raw_action == "generate" else None
    return Event(
        stream_id=stream_id,
        event_id=_default_event_id(topic, partition, offset),
        action=raw_action,
        text=text,
        role=None,
        generate=generate,
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp_ms=timestamp_ms,
        format="raw",
        headers=headers,
    )


def _parse_json(
    key: bytes | None,
    document: dict,
    headers: tuple[tuple[str, bytes], ...],
    topic: str,
    partition: int,
    offset: int,
    limits: EventLimits,
    require_key_match: bool,
    timestamp_ms: int | None,
) -> Event:
    unknown = sorted(set(document) - _EVENT_FIELDS)
    if unknown:
        raise InvalidEventError(
            UNKNOWN_FIELD, f"unknown field {_short(unknown[0])!r}; an event has only {sorted(_EVENT_FIELDS)}"
        )
    _check_schema(document.get("schema"))
    action = _parse_action(document)
    stream_id = _parse_stream_id(key, document.get("stream_id"), limits, require_key_match)
    text = _parse_text(document.get("text"), action, limits)
    role = _parse_role(document.get("role"), action)
    generate = _parse_generate(document.get("generate"), action, limits)
    event_id = _parse_event_id(document.get("event_id"), limits) or _default_event_id(topic, partition, offset)
    return Event(
        stream_id=stream_id,
        event_id=event_id,
        action=action,
        text=text,
        role=role,
        generate=generate,
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp_ms=timestamp_ms,
        format="json",
        headers=headers,
    )


def _check_schema(schema: Any) -> None:
    if schema is None:
        return
    if not _is_int(schema):
        raise InvalidEventError(WRONG_TYPE, f"schema must be an integer, got a {_json_type(schema)}")
    if schema != SCHEMA_VERSION:
        raise InvalidEventError(
            UNSUPPORTED_SCHEMA, f"schema {schema} is not supported; this worker reads schema {SCHEMA_VERSION}"
        )


def _parse_action(document: dict) -> Action:
    action = document.get("action")
    if action is None:
        return "generate" if document.get("generate") is not None else "append"
    if not isinstance(action, str):
        raise InvalidEventError(WRONG_TYPE, f"action must be a string, got a {_json_type(action)}")
    if action not in ACTIONS:
        raise InvalidEventError(UNKNOWN_ACTION, f"action {_short(action)!r} is unknown; use one of {list(ACTIONS)}")
    return action


def _parse_stream_id(key: bytes | None, stream_id: Any, limits: EventLimits, require_key_match: bool) -> str:
    key_stream_id = _stream_id_from_key(key, limits) if key is not None else None
    if stream_id is None:
        if key_stream_id is None:
            raise InvalidEventError(
                MISSING_STREAM_ID, "the record has no key and the event no stream_id; set one of them"
            )
        return key_stream_id
    if not isinstance(stream_id, str):
        raise InvalidEventError(WRONG_TYPE, f"stream_id must be a string, got a {_json_type(stream_id)}")
    _check_stream_id(stream_id, limits)
    if require_key_match and stream_id != key_stream_id:
        shown_key = "null" if key_stream_id is None else repr(_short(key_stream_id))
        raise InvalidEventError(
            STREAM_ID_MISMATCH,
            f"stream_id {_short(stream_id)!r} differs from the record key {shown_key}; key the record by "
            "its stream id, or send it to the ingress topic, which the router re-keys",
        )
    return stream_id


def _stream_id_from_key(key: bytes, limits: EventLimits) -> str:
    try:
        stream_id = key.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEventError(
            INVALID_STREAM_ID, f"the record key is not valid UTF-8 at byte {exc.start}; stream ids are UTF-8 text"
        ) from exc
    _check_stream_id(stream_id, limits)
    return stream_id


def _check_stream_id(stream_id: str, limits: EventLimits) -> None:
    if not stream_id:
        raise InvalidEventError(INVALID_STREAM_ID, "the stream id is empty; use a non-empty key or stream_id")
    if not _encodes_as_utf8(stream_id):
        raise InvalidEventError(
            INVALID_STREAM_ID,
            f"stream id {_short(stream_id)!r} contains a lone surrogate escape, which is not valid UTF-8",
        )
    size = len(stream_id.encode("utf-8"))
    if size > limits.max_stream_id_bytes:
        raise InvalidEventError(
            INVALID_STREAM_ID,
            f"stream id {_short(stream_id)!r} has {size} bytes, above max_stream_id_bytes "
            f"{limits.max_stream_id_bytes}; use a shorter id",
        )
    if not stream_id.isprintable():
        raise InvalidEventError(
            INVALID_STREAM_ID, f"stream id {stream_id[:40]!r} contains control characters; use printable text"
        )


def _parse_text(text: Any, action: Action, limits: EventLimits) -> str | None:
    if text is not None and not isinstance(text, str):
        raise InvalidEventError(WRONG_TYPE, f"text must be a string, got a {_json_type(text)}")
    if action in ("reset", "end"):
        if text:
            raise InvalidEventError(
                CONFLICTING_FIELDS, f"action {action!r} takes no text; send the text in a separate append event"
            )
        return None
    if action == "append" and not text:
        raise InvalidEventError(MISSING_TEXT, "action 'append' needs a non-empty text field")
    if not text:
        return None  # a generate request without text continues the stream as it is
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > limits.max_event_bytes:
        raise InvalidEventError(
            TEXT_TOO_LARGE,
            f"the text has {size} bytes, above max_event_bytes {limits.max_event_bytes}; "
            "split it into several events",
        )
    if not _encodes_as_utf8(text):
        raise InvalidEventError(INVALID_UTF8, "the text contains a lone surrogate escape, which is not valid UTF-8")
    return text


def _parse_role(role: Any, action: Action) -> str | None:
    if role is None:
        return None
    if not isinstance(role, str):
        raise InvalidEventError(WRONG_TYPE, f"role must be a string, got a {_json_type(role)}")
    if role not in ROLES:
        raise InvalidEventError(UNKNOWN_ROLE, f"role {_short(role)!r} is unknown; use one of {list(ROLES)}")
    if action in ("reset", "end"):
        raise InvalidEventError(CONFLICTING_FIELDS, f"action {action!r} takes no role")
    return role


def _parse_event_id(event_id: Any, limits: EventLimits) -> str | None:
    if event_id is None:
        return None
    if not isinstance(event_id, str):
        raise InvalidEventError(WRONG_TYPE, f"event_id must be a string, got a {_json_type(event_id)}")
    size = len(event_id.encode("utf-8", errors="surrogatepass"))
    if not event_id or size > limits.max_event_id_bytes or not event_id.isprintable():
        raise InvalidEventError(
            INVALID_EVENT_ID,
            f"event_id {_short(event_id)!r} is invalid; use 1 to {limits.max_event_id_bytes} bytes of printable text",
        )
    return event_id


def _parse_generate(generate: Any, action: Action, limits: EventLimits) -> GenerationOptions | None:
    if generate is not None and not isinstance(generate, dict):
        raise InvalidEventError(WRONG_TYPE, f"generate must be an object, got a {_json_type(generate)}")
    if action != "generate":
        if generate is not None:
            raise InvalidEventError(
                CONFLICTING_FIELDS, f"action {action!r} takes no generate object; use action 'generate'"
            )
        return None
    generate = generate or {}
    unknown = sorted(set(generate) - _GENERATE_FIELDS)
    if unknown:
        raise InvalidEventError(
            UNKNOWN_FIELD,
            f"unknown field generate.{_short(unknown[0])}; generate has only {sorted(_GENERATE_FIELDS)}",
        )
    return GenerationOptions(
        max_new_tokens=_parse_max_new_tokens(generate.get("max_new_tokens"), limits),
        temperature=_parse_temperature(generate.get("temperature"), limits),
        top_k=_parse_top_k(generate.get("top_k")),
        top_p=_parse_top_p(generate.get("top_p")),
        stop=_parse_stop(generate.get("stop"), limits),
        seed=_parse_seed(generate.get("seed")),
    )


def _parse_max_new_tokens(value: Any, limits: EventLimits) -> int:
    if value is None:
        return limits.default_max_new_tokens
    if not _is_int(value):
        raise InvalidEventError(WRONG_TYPE, f"generate.max_new_tokens must be an integer, got a {_json_type(value)}")
    if not 1 <= value <= limits.max_new_tokens:
        raise InvalidEventError(
            INVALID_MAX_NEW_TOKENS,
            f"generate.max_new_tokens {value} is out of range; use 1 to {limits.max_new_tokens}",
        )
    return value


def _parse_temperature(value: Any, limits: EventLimits) -> float:
    if value is None:
        return 0.0
    if not _is_number(value):
        raise InvalidEventError(WRONG_TYPE, f"generate.temperature must be a number, got a {_json_type(value)}")
    if not 0.0 <= value <= limits.max_temperature:
        raise InvalidEventError(
            INVALID_TEMPERATURE,
            f"generate.temperature {value} is out of range; use 0 (greedy) to {limits.max_temperature}",
        )
    return float(value)


def _parse_top_p(value: Any) -> float:
    if value is None:
        return 1.0
    if not _is_number(value):
        raise InvalidEventError(WRONG_TYPE, f"generate.top_p must be a number, got a {_json_type(value)}")
    if not 0.0 < value <= 1.0:
        raise InvalidEventError(INVALID_TOP_P, f"generate.top_p {value} is out of range; use a value in (0, 1]")
    return float(value)


def _parse_top_k(value: Any) -> int:
    if value is None:
        return 0
    if not _is_int(value):
        raise InvalidEventError(WRONG_TYPE, f"generate.top_k must be an integer, got a {_json_type(value)}")
    if value < 0:
        raise InvalidEventError(INVALID_TOP_K, f"generate.top_k {value} is negative; use 0 (off) or more")
    return value


def _parse_stop(value: Any, limits: EventLimits) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(stop, str) for stop in stops):
        raise InvalidEventError(WRONG_TYPE, "generate.stop must be a string or a list of strings")
    if len(stops) > limits.max_stop_sequences:
        raise InvalidEventError(
            INVALID_STOP,
            f"generate.stop has {len(stops)} strings, above max_stop_sequences {limits.max_stop_sequences}",
        )
    for stop in stops:
        if not stop or len(stop.encode("utf-8", errors="surrogatepass")) > limits.max_stop_bytes:
            raise InvalidEventError(
                INVALID_STOP, f"each generate.stop string must have 1 to {limits.max_stop_bytes} bytes"
            )
        if not _encodes_as_utf8(stop):
            raise InvalidEventError(
                INVALID_STOP, "a generate.stop string contains a lone surrogate escape, which is not valid UTF-8"
            )
    return tuple(stops)


def _parse_seed(value: Any) -> int | None:
    if value is None:
        return None
    if not _is_int(value):
        raise InvalidEventError(WRONG_TYPE, f"generate.seed must be an integer, got a {_json_type(value)}")
    if not 0 <= value <= _MAX_SEED:
        raise InvalidEventError(INVALID_SEED, f"generate.seed {value} is out of range; use 0 to 2**63 - 1")
    return value


def _default_event_id(topic: str, partition: int, offset: int) -> str:
    return f"{topic}:{partition}:{offset}"


# --------------------------------------------------------------------------------------
# Outputs


@dataclass(frozen=True)
class OutputRecord:
    """The result of one generate request (or append, when the worker reports those), as published."""

    stream_id: str
    event_id: str
    topic: str  # source record of the event
    partition: int
    offset: int
    text: str
    finish_reason: str | None  # "eos", "stop", "length", or None when nothing was generated
    prompt_tokens: int
    generated_tokens: int
    cached_tokens: int
    evicted_tokens: int  # stream total so far
    model_fingerprint: str
    action: str = "generate"
    schema_version: int = SCHEMA_VERSION
    # Delivery metadata, carried in headers and left out of equality: two copies of one
    # output differ here and nowhere else.
    queued_s: float = field(default=0.0, compare=False)
    time_to_first_token_s: float | None = field(default=None, compare=False)
    total_s: float = field(default=0.0, compare=False)
    worker_id: str = field(default="", compare=False)

    @classmethod
    def for_event(cls, event: Event, **fields: Any) -> OutputRecord:
        """Build the output of ``event``; ``fields`` gives text, counts, timings and worker identity."""
        fields.setdefault("action", event.action)
        return cls(
            stream_id=event.stream_id,
            event_id=event.event_id,
            topic=event.topic,
            partition=event.partition,
            offset=event.offset,
            **fields,
        )

    @property
    def idempotency_key(self) -> str:
        return idempotency_key(self.stream_id, self.topic, self.partition, self.offset)

    def to_json(self) -> dict[str, Any]:
        """Return the value's fields; timings and the worker id go in headers (see ``to_message``)."""
        return {
            "schema": self.schema_version,
            "stream_id": self.stream_id,
            "event_id": self.event_id,
            "idempotency_key": self.idempotency_key,
            "action": self.action,
            "source": {"topic": self.topic, "partition": self.partition, "offset": self.offset},
            "text": self.text,
            "finish_reason": self.finish_reason,
            "tokens": {
                "prompt": self.prompt_tokens,
                "generated": self.generated_tokens,
                "cached": self.cached_tokens,
                "evicted": self.evicted_tokens,
            },
            "model_fingerprint": self.model_fingerprint,
        }

    def timings(self) -> dict[str, float | None]:
        return {
            "queued_s": self.queued_s,
            "time_to_first_token_s": self.time_to_first_token_s,
            "total_s": self.total_s,
        }

    def to_message(self) -> KafkaMessage:
        """Return the output record, keyed by stream id, with the idempotency key as a header.

        The value depends only on the event and the model's output, so a duplicate (the same
        idempotency key, produced again after a crash) has a byte-identical value. Timings
        (compact JSON) and the worker id travel in headers.
        """
        timings = json.dumps(self.timings(), separators=(",", ":"))
        return KafkaMessage(
            key=self.stream_id.encode("utf-8"),
            value=_dump_json(self.to_json()),
            headers=(
                (HEADER_CONTENT_TYPE, JSON_CONTENT_TYPE.encode()),
                (HEADER_IDEMPOTENCY_KEY, self.idempotency_key.encode("utf-8")),
                (HEADER_SCHEMA, str(self.schema_version).encode()),
                (HEADER_TIMINGS, timings.encode()),
                (HEADER_WORKER_ID, self.worker_id.encode("utf-8")),
            ),
        )

    @classmethod
    def from_json(cls, value: bytes | str, headers: Headers = None) -> OutputRecord:
        """Read an output record back from its value and, for timings and worker id, its headers.

        Raises ``ValueError`` when the value is not an output record. Without headers the
        timings are zero and the worker id is empty.
        """
        data = json.loads(value)
        header_map = {name.lower(): raw for name, raw in _header_tuple(headers)}
        try:
            timings = json.loads(header_map[HEADER_TIMINGS]) if header_map.get(HEADER_TIMINGS) else {}
            worker_id = (header_map.get(HEADER_WORKER_ID) or b"").decode("utf-8", errors="replace")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"invalid {HEADER_TIMINGS} header: {exc}; expected compact JSON") from exc
        try:
            source, tokens = data["source"], data["tokens"]
            return cls(
                stream_id=data["stream_id"],
                event_id=data["event_id"],
                topic=source["topic"],
                partition=source["partition"],
                offset=source["offset"],
                text=data["text"],
                finish_reason=data["finish_reason"],
                prompt_tokens=tokens["prompt"],
                generated_tokens=tokens["generated"],
                cached_tokens=tokens["cached"],
                evicted_tokens=tokens["evicted"],
                queued_s=timings.get("queued_s", 0.0),
                time_to_first_token_s=timings.get("time_to_first_token_s"),
                total_s=timings.get("total_s", 0.0),
                worker_id=worker_id,
                model_fingerprint=data["model_fingerprint"],
                action=data.get("action", "generate"),
                schema_version=data["schema"],
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a sinkstream output record: missing or malformed field {exc}") from exc


# --------------------------------------------------------------------------------------
# Dead letters


@dataclass(frozen=True)
class DeadLetterInfo:
    """Dead-letter reason and source coordinates of a record, read from its headers."""

    reason: str
    message: str
    topic: str
    partition: int
    offset: int


def build_dead_letter(
    key: bytes | None,
    value: bytes | None,
    headers: Headers,
    topic: str,
    partition: int,
    offset: int,
    error: InvalidEventError,
    *,
    timestamp_ms: int | None = None,
    max_bytes: int = MAX_DEAD_LETTER_BYTES,
) -> KafkaMessage:
    """Build the dead-letter record of a rejected input record.

    The key, value bytes and headers are kept as they were, unless together they exceed
    ``max_bytes``: then the value is dropped, then the original headers, then the key, and
    ``x-sinkstream-dropped`` names each dropped part with its size. The reason, message and
    source coordinates are added as ``x-sinkstream-*`` headers, replacing any from an
    earlier dead-lettering, so a record replayed from the dead-letter topic and rejected
    again carries only its latest reason.
    """
    if error.reason not in DEAD_LETTER_REASONS:
        raise ValueError(f"dead-letter reason {error.reason!r} is not one of DEAD_LETTER_REASONS")
    kept = [(name, data) for name, data in _header_tuple(headers) if name.lower() not in _DLQ_HEADERS]
    value = value or b""
    dropped = []
    if _record_bytes(key, value, kept) > max_bytes:
        dropped.append(f"value {len(value)} bytes")
        value = b""
    if _record_bytes(key, value, kept) > max_bytes:
        dropped.append(f"headers {_record_bytes(None, b'', kept)} bytes")
        kept = []
    if _record_bytes(key, value, kept) > max_bytes:
        dropped.append(f"key {len(key or b'')} bytes")
        key = None
    message = str(error).encode("utf-8", errors="replace")[:_MAX_DLQ_MESSAGE_BYTES]
    kept += [
        (HEADER_DLQ_REASON, error.reason.encode()),
        (HEADER_DLQ_MESSAGE, message),
        (HEADER_DLQ_TOPIC, topic.encode("utf-8")),
        (HEADER_DLQ_PARTITION, str(partition).encode()),
        (HEADER_DLQ_OFFSET, str(offset).encode()),
    ]
    if dropped:
        kept.append((HEADER_DLQ_DROPPED, ", ".join(dropped).encode()))
    return KafkaMessage(key=key, value=value, headers=tuple(kept), timestamp_ms=timestamp_ms)


def _record_bytes(key: bytes | None, value: bytes, headers: list[tuple[str, bytes | None]]) -> int:
    header_bytes = sum(len(name.encode("utf-8", errors="surrogatepass")) + len(data or b"") for name, data in headers)
    return len(key or b"") + len(value) + header_bytes


def read_dead_letter(headers: Headers) -> DeadLetterInfo:
    """Read the dead-letter headers of a record from the dead-letter topic."""
    header_map = _header_map(headers)
    try:
        return DeadLetterInfo(
            reason=header_map[HEADER_DLQ_REASON].decode(),
            message=header_map[HEADER_DLQ_MESSAGE].decode("utf-8", errors="replace"),
            topic=header_map[HEADER_DLQ_TOPIC].decode("utf-8"),
            partition=int(header_map[HEADER_DLQ_PARTITION]),
            offset=int(header_map[HEADER_DLQ_OFFSET]),
        )
    except KeyError as exc:
        raise ValueError(f"not a sinkstream dead letter: header {exc} is missing") from exc


# --------------------------------------------------------------------------------------
# Helpers


def _header_tuple(headers: Headers) -> tuple[tuple[str, bytes], ...]:
    """Return headers as (name, bytes) pairs in their original order; None values become b""."""
    if not headers:
        return ()
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    result = []
    for name, data in pairs:
        if isinstance(name, bytes):
            name = name.decode("utf-8", errors="replace")
        if data is None:
            data = b""
        elif isinstance(data, str):
            data = data.encode("utf-8")
        result.append((name, bytes(data)))
    return tuple(result)


def _header_map(headers: Headers) -> dict[str, bytes]:
    """Return headers by lower-case name; a repeated name keeps its last value, as Kafka clients do."""
    return {name.lower(): data for name, data in _header_tuple(headers)}


def _dump_json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """True for JSON numbers. Infinity (from literals such as 1e400) fails every range check later."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _encodes_as_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object"


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
