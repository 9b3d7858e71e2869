"""Input parsing, outputs and dead letters of topology.schemas (pure, no broker)."""

from __future__ import annotations

import json

import pytest

from topology import schemas
from topology.schemas import (
    DEAD_LETTER_REASONS,
    EventLimits,
    INPUT_REASONS,
    GenerationOptions,
    OutputRecord,
    build_dead_letter,
    parse_event,
    read_dead_letter,
)
from worker.exceptions import InvalidEventError, SinkstreamError

LIMITS = EventLimits(max_event_bytes=64, max_new_tokens=100, default_max_new_tokens=16, max_stream_id_bytes=16)
JSON_HEADERS = [("content-type", b"application/json")]


def parse(key, value, headers=None, **options):
    return parse_event(key, value, headers, "events", 2, 41, LIMITS, **options)


def as_json(**fields) -> bytes:
    return json.dumps(fields).encode()


BAD_INPUTS = [
    # (case id, key, value, headers, reason)
    ("null value", b"s", None, None, "empty_value"),
    ("empty value", b"s", b"", None, "empty_value"),
    ("raw not utf8", b"s", b"caf\xe9", None, "invalid_utf8"),
    ("json not utf8", b"s", b'{"text": "caf\xe9"}', JSON_HEADERS, "invalid_utf8"),
    ("json syntax", b"s", b'{"text": ', JSON_HEADERS, "invalid_json"),
    ("json NaN", b"s", b'{"text": "a", "generate": {"temperature": NaN}}', JSON_HEADERS, "invalid_json"),
    ("json array", b"s", b'["text"]', JSON_HEADERS, "invalid_json"),
    ("json string", b"s", b'"hello"', JSON_HEADERS, "invalid_json"),
    ("content type", b"s", b"hi", [("content-type", b"application/xml")], "unsupported_content_type"),
    ("schema 2", b"s", as_json(schema=2, text="a"), None, "unsupported_schema"),
    ("schema string", b"s", as_json(schema="1", text="a"), None, "wrong_type"),
    ("unknown field", b"s", as_json(text="a", colour="red"), None, "unknown_field"),
    ("unknown generate field", b"s", as_json(text="a", generate={"max_tokens": 3}), None, "unknown_field"),
    ("text number", b"s", as_json(text=5), None, "wrong_type"),
    ("action number", b"s", as_json(text="a", action=1), None, "wrong_type"),
    ("stream id number", b"s", as_json(text="a", stream_id=7), JSON_HEADERS, "wrong_type"),
    ("generate list", b"s", as_json(text="a", action="generate", generate=[1]), None, "wrong_type"),
    ("max_new_tokens string", b"s", as_json(text="a", generate={"max_new_tokens": "5"}), None, "wrong_type"),
    ("max_new_tokens float", b"s", as_json(text="a", generate={"max_new_tokens": 5.0}), None, "wrong_type"),
    ("max_new_tokens bool", b"s", as_json(text="a", generate={"max_new_tokens": True}), None, "wrong_type"),
    ("temperature string", b"s", as_json(text="a", generate={"temperature": "hot"}), None, "wrong_type"),
    ("stop number", b"s", as_json(text="a", generate={"stop": 5}), None, "wrong_type"),
    ("stop list of numbers", b"s", as_json(text="a", generate={"stop": [5]}), None, "wrong_type"),
    ("seed float", b"s", as_json(text="a", generate={"seed": 1.5}), None, "wrong_type"),
    ("role number", b"s", as_json(text="a", role=3), None, "wrong_type"),
    ("event id number", b"s", as_json(text="a", event_id=3), None, "wrong_type"),
    ("unknown action", b"s", as_json(text="a", action="summarize"), None, "unknown_action"),
    ("unknown role", b"s", as_json(text="a", role="tool"), None, "unknown_role"),
    ("append no text", b"s", as_json(action="append"), None, "missing_text"),
    ("append empty text", b"s", as_json(action="append", text=""), None, "missing_text"),
    ("append null text", b"s", as_json(action="append", text=None), None, "missing_text"),
    ("reset with text", b"s", as_json(action="reset", text="a"), None, "conflicting_fields"),
    ("end with role", b"s", as_json(action="end", role="user"), None, "conflicting_fields"),
    ("append with generate", b"s", as_json(action="append", text="a", generate={}), None, "conflicting_fields"),
    ("raw text too large", b"s", b"x" * 65, None, "text_too_large"),
    ("json text too large", b"s", as_json(text="\u00e9" * 33), None, "text_too_large"),
    ("json value too large", b"s", as_json(text="a", event_id=" " * 70_000), JSON_HEADERS, "value_too_large"),
    ("max_new_tokens zero", b"s", as_json(action="generate", generate={"max_new_tokens": 0}), None,
     "invalid_max_new_tokens"),
    ("max_new_tokens negative", b"s", as_json(action="generate", generate={"max_new_tokens": -3}), None,
     "invalid_max_new_tokens"),
    ("max_new_tokens above limit", b"s", as_json(action="generate", generate={"max_new_tokens": 101}), None,
     "invalid_max_new_tokens"),
    ("temperature negative", b"s", as_json(action="generate", generate={"temperature": -0.1}), None,
     "invalid_temperature"),
    ("temperature above limit", b"s", as_json(action="generate", generate={"temperature": 5.5}), None,
     "invalid_temperature"),
    ("temperature infinite", b"s", b'{"action": "generate", "generate": {"temperature": 1e400}}', None,
     "invalid_temperature"),
    ("top_p zero", b"s", as_json(action="generate", generate={"top_p": 0}), None, "invalid_top_p"),
    ("top_p above one", b"s", as_json(action="generate", generate={"top_p": 1.01}), None, "invalid_top_p"),
    ("top_k negative", b"s", as_json(action="generate", generate={"top_k": -1}), None, "invalid_top_k"),
    ("stop empty string", b"s", as_json(action="generate", generate={"stop": [""]}), None, "invalid_stop"),
    ("stop too many", b"s", as_json(action="generate", generate={"stop": ["a"] * 9}), None, "invalid_stop"),
    ("seed negative", b"s", as_json(action="generate", generate={"seed": -1}), None, "invalid_seed"),
    ("raw null key", None, b"hello", None, "missing_stream_id"),
    ("json null key no stream id", None, as_json(text="a"), None, "missing_stream_id"),
    ("empty key", b"", b"hello", None, "invalid_stream_id"),
    ("key not utf8", b"\xff\xfe", b"hello", None, "invalid_stream_id"),
    ("key too long", b"k" * 17, b"hello", None, "invalid_stream_id"),
    ("key control char", b"a\nb", b"hello", None, "invalid_stream_id"),
    ("json stream id empty", b"s", as_json(text="a", stream_id=""), None, "invalid_stream_id"),
    ("json stream id too long", b"s", as_json(text="a", stream_id="\u00e9" * 9), None, "invalid_stream_id"),
    ("stream id differs from key", b"s", as_json(text="a", stream_id="t"), None, "stream_id_mismatch"),
    ("stream id with null key", None, as_json(text="a", stream_id="s"), None, "stream_id_mismatch"),
    ("event id empty", b"s", as_json(text="a", event_id=""), None, "invalid_event_id"),
    ("event id too long", b"s", as_json(text="a", event_id="e" * 257), None, "invalid_event_id"),
]


@pytest.mark.parametrize(
    ("key", "value", "headers", "reason"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_parse_event_bad_input_raises_reason(key, value, headers, reason):
    with pytest.raises(InvalidEventError) as caught:
        parse(key, value, headers)
    assert caught.value.reason == reason
    assert isinstance(caught.value, SinkstreamError)


def test_reason_table_covers_every_input_reason():
    covered = {case[-1] for case in BAD_INPUTS}
    assert covered == set(INPUT_REASONS)
    assert set(DEAD_LETTER_REASONS) == set(INPUT_REASONS) | {"engine_error", "parse_error"}


def test_reason_codes_are_unique_constants():
    assert len(DEAD_LETTER_REASONS) == len(set(DEAD_LETTER_REASONS))
    for reason in DEAD_LETTER_REASONS:
        assert getattr(schemas, reason.upper()) == reason


def test_parse_event_messages_never_echo_text():
    secret = "my-secret-prompt"
    cases = [
        as_json(text=secret, stream_id="t"),
        as_json(text=secret, action="summarize"),
        as_json(text=secret + "x" * 64),
        as_json(text=secret, generate={"max_new_tokens": 0}),
    ]
    for value in cases:
        with pytest.raises(InvalidEventError) as caught:
            parse(b"s", value)
        assert secret not in str(caught.value)


def test_parse_event_raw_append_defaults():
    event = parse(b"stream-1", "héllo wörld\n".encode(), timestamp_ms=1234)

    assert event.stream_id == "stream-1"
    assert event.text == "héllo wörld\n"
    assert event.action == "append"
    assert event.generate is None
    assert event.role is None
    assert event.format == "raw"
    assert event.event_id == "events:2:41"
    assert (event.topic, event.partition, event.offset) == ("events", 2, 41)
    assert event.timestamp_ms == 1234


def test_parse_event_raw_generate_uses_default_options():
    event = parse(b"s", b"question?", raw_action="generate")

    assert event.action == "generate"
    assert event.generate == GenerationOptions(max_new_tokens=16)


def test_parse_event_raw_at_size_limit_accepted():
    event = parse(b"s", b"x" * 64)
    assert len(event.text) == 64


def test_parse_event_full_json_generate():
    value = as_json(
        schema=1,
        stream_id="s",
        event_id="e-7",
        action="generate",
        role="user",
        text="What is 2+2?",
        generate={"max_new_tokens": 100, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "stop": ["\n\n", "END"],
                  "seed": 7},
    )
    event = parse(b"s", value, JSON_HEADERS)

    assert event.format == "json"
    assert event.event_id == "e-7"
    assert event.role == "user"
    assert event.text == "What is 2+2?"
    assert event.generate == GenerationOptions(
        max_new_tokens=100, temperature=0.7, top_k=40, top_p=0.9, stop=("\n\n", "END"), seed=7
    )


def test_parse_event_generate_without_action_means_generate():
    event = parse(b"s", as_json(text="hi", generate={"max_new_tokens": 3}))
    assert event.action == "generate"
    assert event.generate.max_new_tokens == 3


def test_parse_event_generate_without_text_continues():
    event = parse(b"s", as_json(action="generate"))
    assert event.text is None
    assert event.generate == GenerationOptions(max_new_tokens=16)


def test_parse_event_stop_string_becomes_tuple():
    event = parse(b"s", as_json(action="generate", generate={"stop": "###"}))
    assert event.generate.stop == ("###",)


def test_parse_event_reset_and_end_need_no_text():
    assert parse(b"s", as_json(action="reset")).action == "reset"
    assert parse(b"s", as_json(action="end")).text is None


def test_parse_event_stream_id_from_key():
    event = parse(b"from-key", as_json(text="a"))
    assert event.stream_id == "from-key"


def test_parse_event_null_key_accepted_without_key_match():
    event = parse(None, as_json(text="a", stream_id="body"), require_key_match=False)
    assert event.stream_id == "body"


def test_parse_event_sniffs_json_without_header():
    event = parse(b"s", b'  {"text": "a", "action": "append"}')
    assert event.format == "json"
    assert event.text == "a"


def test_parse_event_brace_text_without_known_field_is_raw():
    for value in (b"{not json at all", b'{"x": 1}', b"{}"):
        event = parse(b"s", value)
        assert event.format == "raw"
        assert event.text == value.decode()


def test_parse_event_text_plain_header_forces_raw():
    value = as_json(text="a")
    event = parse(b"s", value, [("Content-Type", b"text/plain; charset=utf-8")])
    assert event.format == "raw"
    assert event.text == value.decode()


def test_parse_event_content_type_parameters_ignored():
    event = parse(b"s", as_json(text="a"), [("Content-Type", b"application/json; charset=utf-8")])
    assert event.format == "json"


def test_parse_event_reject_raw_when_not_accepted():
    with pytest.raises(InvalidEventError) as caught:
        parse(b"s", b"plain text", accept_raw=False)
    assert caught.value.reason == "invalid_json"


def test_parse_event_headers_mapping_or_pairs():
    pairs = parse(b"s", b"x", [("trace", b"1"), ("other", "2")])
    mapping = parse(b"s", b"x", {"trace": b"1", "other": "2"})
    assert pairs.headers == mapping.headers == (("trace", b"1"), ("other", b"2"))


def test_event_to_message_round_trips():
    original = parse(
        None,
        as_json(stream_id="s", role="user", text="hi", generate={"max_new_tokens": 5, "stop": ["x"]}),
        [("trace", b"abc"), ("content-type", b"application/json")],
        require_key_match=False,
    )
    message = original.to_message()
    again = parse_event(message.key, message.value, message.headers, "events", 0, 9, LIMITS)

    assert message.key == b"s"
    assert message.header("content-type") == b"application/json"
    assert message.header("trace") == b"abc"
    assert again.event_id == original.event_id == "events:2:41"
    for name in ("stream_id", "action", "text", "role", "generate"):
        assert getattr(again, name) == getattr(original, name), name


def test_generation_options_as_kwargs_match_engine_fields():
    options = GenerationOptions(max_new_tokens=4, temperature=0.5, top_k=3, top_p=0.8, stop=("a",), seed=1)
    assert options.as_kwargs() == {
        "max_new_tokens": 4, "temperature": 0.5, "top_k": 3, "top_p": 0.8, "stop": ("a",), "seed": 1,
    }


def test_generation_options_to_engine():
    pytest.importorskip("torch")
    engine_params = GenerationOptions(max_new_tokens=4, temperature=0.5, stop=("a",), seed=3).to_engine()
    assert engine_params.max_new_tokens == 4
    assert engine_params.temperature == 0.5
    assert tuple(engine_params.stop) == ("a",)
    assert engine_params.seed == 3


def test_event_limits_default_above_max_rejected():
    with pytest.raises(ValueError, match="default_max_new_tokens"):
        EventLimits(max_new_tokens=10, default_max_new_tokens=11)


def make_output(**overrides) -> OutputRecord:
    event = parse(b"s1", b"hello", raw_action="generate")
    fields = dict(
        text="world",
        finish_reason="eos",
        prompt_tokens=5,
        generated_tokens=2,
        cached_tokens=40,
        evicted_tokens=3,
        queued_s=0.01,
        time_to_first_token_s=0.2,
        total_s=0.5,
        worker_id="w-1",
        model_fingerprint="abc123",
    )
    fields.update(overrides)
    return OutputRecord.for_event(event, **fields)


def test_output_record_message_fields():
    message = make_output().to_message()
    data = json.loads(message.value)

    assert message.key == b"s1"
    assert message.header("idempotency-key") == b"s1@events[2]:41"
    assert data["idempotency_key"] == "s1@events[2]:41"
    assert data["schema"] == 1
    assert data["stream_id"] == "s1"
    assert data["event_id"] == "events:2:41"
    assert data["source"] == {"topic": "events", "partition": 2, "offset": 41}
    assert data["text"] == "world"
    assert data["finish_reason"] == "eos"
    assert data["tokens"] == {"prompt": 5, "generated": 2, "cached": 40, "evicted": 3}
    assert "timings" not in data
    assert "worker_id" not in data
    assert data["model_fingerprint"] == "abc123"
    assert message.header("x-sinkstream-timings") == b'{"queued_s":0.01,"time_to_first_token_s":0.2,"total_s":0.5}'
    assert message.header("x-sinkstream-worker-id") == b"w-1"


def test_output_record_value_same_across_workers():
    first = make_output().to_message()
    second = make_output(queued_s=3.0, time_to_first_token_s=1.5, total_s=9.0, worker_id="w-2").to_message()
    assert first.value == second.value
    assert first.header("x-sinkstream-worker-id") != second.header("x-sinkstream-worker-id")


def test_output_record_from_json_round_trips():
    output = make_output(time_to_first_token_s=None, finish_reason=None, action="append")
    message = output.to_message()
    restored = OutputRecord.from_json(message.value, message.headers)
    assert restored == output
    assert restored.timings() == output.timings()
    assert restored.worker_id == output.worker_id


def test_output_record_from_json_rejects_other_json():
    with pytest.raises(ValueError, match="not a sinkstream output"):
        OutputRecord.from_json(b'{"text": "a"}')


def test_dead_letter_keeps_record_and_adds_headers():
    value = b'{"text": 5}'
    headers = [("trace", b"t-1"), ("content-type", b"application/json")]
    with pytest.raises(InvalidEventError) as caught:
        parse(b"k", value, headers)
    message = build_dead_letter(b"k", value, headers, "events", 2, 41, caught.value, timestamp_ms=99)

    assert message.key == b"k"
    assert message.value == value
    assert message.timestamp_ms == 99
    assert message.headers[:2] == tuple(headers)
    assert message.header("x-sinkstream-dlq-reason") == b"wrong_type"
    assert message.header("x-sinkstream-dlq-message") == b"text must be a string, got a number"
    assert message.header("x-sinkstream-source-topic") == b"events"
    assert message.header("x-sinkstream-source-partition") == b"2"
    assert message.header("x-sinkstream-source-offset") == b"41"


def test_dead_letter_twice_keeps_only_latest_reason():
    first = build_dead_letter(b"k", b"", None, "events", 0, 1, InvalidEventError("empty_value", "empty"))
    second = build_dead_letter(
        b"k", b"", first.headers, "replay", 0, 7, InvalidEventError("invalid_json", "bad")
    )
    names = [name for name, _ in second.headers]

    assert names.count("x-sinkstream-dlq-reason") == 1
    info = read_dead_letter(second.headers)
    assert (info.reason, info.topic, info.offset) == ("invalid_json", "replay", 7)


def test_dead_letter_engine_error_accepted():
    error = InvalidEventError("engine_error", "the tokenizer failed")
    message = build_dead_letter(b"k", b"v", None, "events", 0, 1, error)
    assert read_dead_letter(message.headers).reason == "engine_error"


def test_dead_letter_unknown_reason_rejected():
    with pytest.raises(ValueError, match="DEAD_LETTER_REASONS"):
        build_dead_letter(b"k", b"v", None, "events", 0, 1, InvalidEventError("whatever", "x"))


def test_dead_letter_message_truncated():
    error = InvalidEventError("invalid_json", "x" * 5000)
    message = build_dead_letter(b"k", b"v", None, "events", 0, 1, error)
    assert len(message.header("x-sinkstream-dlq-message")) == 1024


@pytest.mark.parametrize(
    ("key", "value", "headers", "dropped"),
    [
        (b"k", b"v" * 100, [("trace", b"t")], "value 100 bytes"),
        (b"k", b"v" * 100, [("trace", b"t" * 100)], "value 100 bytes, headers 105 bytes"),
        (b"k" * 100, b"v", [("trace", b"t" * 100)], "value 1 bytes, headers 105 bytes, key 100 bytes"),
    ],
)
def test_dead_letter_above_max_bytes_drops_parts(key, value, headers, dropped):
    error = InvalidEventError("value_too_large", "too large")
    message = build_dead_letter(key, value, headers, "events", 0, 1, error, max_bytes=50)

    assert message.header("x-sinkstream-dropped") == dropped.encode()
    assert message.header("x-sinkstream-dlq-reason") == b"value_too_large"
    assert message.value == b""
    assert (message.header("trace") is None) == ("headers" in dropped)
    assert (message.key is None) == ("key" in dropped)


def test_dead_letter_within_max_bytes_keeps_all():
    message = build_dead_letter(b"k", b"v" * 40, [("trace", b"t")], "events", 0, 1,
                                InvalidEventError("value_too_large", "x"), max_bytes=50)

    assert message.value == b"v" * 40
    assert message.header("x-sinkstream-dropped") is None


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b'{"stream_id": "\\udc80", "text": "a"}', "invalid_stream_id"),
        (b'{"text": "a", "action": "generate", "generate": {"stop": ["\\ud800"]}}', "invalid_stop"),
    ],
)
def test_lone_surrogate_fields_rejected(value, reason):
    with pytest.raises(InvalidEventError) as caught:
        parse(b"k", value, [("content-type", b"application/json")], require_key_match=False)
    assert caught.value.reason == reason
    assert "lone surrogate" in str(caught.value)
