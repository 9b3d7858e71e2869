"""Bad input goes to the dead-letter topic with its original bytes; the partition moves on."""

from __future__ import annotations

import json

from aiokafka import AIOKafkaProducer

from tests.stage.conftest import consume, output_json, produce, running_worker
from topology.schemas import read_dead_letter

MAX_EVENT_BYTES = 200
MAX_NEW_TOKENS = 16

# (description, key, value, headers, expected reason)
BAD_INPUTS = [
    ("invalid json", b"s1", b'{"stream_id": "s1", "action": ', [("content-type", b"application/json")],
     "invalid_json"),
    ("invalid utf-8 raw", b"s1", b"caf\xc3(", None, "invalid_utf8"),
    ("invalid utf-8 json", b"s1", b'{"stream_id": "s1", "text": "\xff"}', [("content-type", b"application/json")],
     "invalid_utf8"),
    ("wrong type", b"s1", json.dumps({"stream_id": "s1", "action": "append", "text": 42}).encode(), None,
     "wrong_type"),
    ("unknown action", b"s1", json.dumps({"stream_id": "s1", "action": "explode", "text": "x"}).encode(), None,
     "unknown_action"),
    ("missing text", b"s1", json.dumps({"stream_id": "s1", "action": "append"}).encode(), None, "missing_text"),
    ("text too large", b"s1", b"x" * (MAX_EVENT_BYTES + 1), None, "text_too_large"),
    ("max_new_tokens zero", b"s1", json.dumps({"stream_id": "s1", "action": "generate", "text": "hi",
                                               "generate": {"max_new_tokens": 0}}).encode(), None,
     "invalid_max_new_tokens"),
    ("max_new_tokens above limit", b"s1", json.dumps({"stream_id": "s1", "action": "generate", "text": "hi",
                                                      "generate": {"max_new_tokens": MAX_NEW_TOKENS + 1}}).encode(),
     None, "invalid_max_new_tokens"),
    ("empty value", b"s1", b"", None, "empty_value"),
    ("null key without stream id", None, b"plain text with no key", None, "missing_stream_id"),
    ("lone surrogate stream id", b"s1", b'{"stream_id": "\\udc80", "text": "a"}', [("content-type", b"application/json")],
     "invalid_stream_id"),
]


async def test_dead_letters_bad_inputs_partition_continues(broker, stage_topics, make_settings, make_engine):
    settings = make_settings(stage={"max_event_bytes": MAX_EVENT_BYTES, "max_new_tokens_limit": MAX_NEW_TOKENS,
                                    "default_max_new_tokens": 4})
    records = []
    for index, (_, key, value, headers, _) in enumerate(BAD_INPUTS):
        records.append((key, value, (headers or []) + [("trace", f"bad-{index}".encode())]))
        records.append((b"s1", f"good event {index}".encode(), None))  # a good event after each bad one
    # Everything goes to partition 0, so each bad record sits between good ones of one partition.
    await produce(broker.bootstrap_servers, stage_topics.events, records, partition_of=lambda key: 0)

    async with running_worker(settings, make_engine()) as worker:
        dead = await consume(broker.bootstrap_servers, stage_topics.dlq, len(BAD_INPUTS), timeout_s=60)
        outputs = await consume(broker.bootstrap_servers, stage_topics.outputs, len(BAD_INPUTS), timeout_s=60)
        assert not worker.runner.error
    assert worker.stats.dead_letters == len(BAD_INPUTS)
    assert len(dead) == len(BAD_INPUTS)
    assert len(outputs) == len(BAD_INPUTS)  # every good event after a bad one was processed
    assert [output_json(record)["source"]["offset"] for record in outputs] == list(range(1, 2 * len(BAD_INPUTS), 2))

    # The dead-letter topic has 4 partitions and keeps each record's key, so order by source offset.
    dead.sort(key=lambda record: read_dead_letter(record.headers).offset)
    for index, (record, (description, key, value, headers, reason)) in enumerate(zip(dead, BAD_INPUTS)):
        info = read_dead_letter(record.headers)
        assert info.reason == reason, description
        assert record.key == key, description
        assert record.value == value, description
        assert (info.topic, info.partition, info.offset) == (stage_topics.events, 0, 2 * index), description
        assert ("trace", f"bad-{index}".encode()) in list(record.headers), description
    expected_counts: dict[str, int] = {}
    for *_, reason in BAD_INPUTS:
        expected_counts[reason] = expected_counts.get(reason, 0) + 1
    assert worker.stats.dead_letter_reasons == expected_counts


async def test_dead_letters_oversized_record_drops_value(broker, stage_topics, make_settings, make_engine):
    settings = make_settings()
    oversized = b"x" * 1_200_000  # above aiokafka's default request size of 1,048,576 bytes
    huge_key = b"k" * 1_000_000
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, max_request_size=4 * 1024 * 1024)
    await producer.start()
    try:
        await producer.send_and_wait(stage_topics.events, oversized, key=b"s1", partition=0)
        await producer.send_and_wait(stage_topics.events, b"{not json", key=huge_key, partition=0,
                                     headers=[("content-type", b"application/json")])
        await producer.send_and_wait(stage_topics.events, b"good event", key=b"s1", partition=0)
    finally:
        await producer.stop()

    async with running_worker(settings, make_engine()) as worker:
        dead = await consume(broker.bootstrap_servers, stage_topics.dlq, 2, timeout_s=60)
        (output,) = await consume(broker.bootstrap_servers, stage_topics.outputs, 1, timeout_s=60)
        assert not worker.runner.error

    by_offset = {read_dead_letter(record.headers).offset: record for record in dead}
    assert read_dead_letter(by_offset[0].headers).reason == "text_too_large"
    assert by_offset[0].value == b""
    assert dict(by_offset[0].headers)["x-sinkstream-dropped"] == b"value 1200000 bytes"
    assert by_offset[0].key == b"s1"
    assert read_dead_letter(by_offset[1].headers).reason == "invalid_json"
    assert dict(by_offset[1].headers)["x-sinkstream-dropped"] == b"value 9 bytes, headers 28 bytes, key 1000000 bytes"
    assert by_offset[1].key is None, "a key above the producer's request size is left out"
    assert output_json(output)["source"]["offset"] == 2


async def test_dead_letters_validation_bug_partition_continues(broker, stage_topics, make_settings, make_engine,
                                                               monkeypatch):
    from worker.stage import messages

    parse_record = messages.parse_record

    def failing_parse(record, limits, raw_action):
        if record.value == b"trigger a validation bug":
            raise KeyError("a bug in validation")
        return parse_record(record, limits, raw_action)

    monkeypatch.setattr(messages, "parse_record", failing_parse)
    records = [(b"s1", b"trigger a validation bug", None), (b"s1", b"good event", None)]
    await produce(broker.bootstrap_servers, stage_topics.events, records, partition_of=lambda key: 0)

    async with running_worker(make_settings(), make_engine()) as worker:
        (dead,) = await consume(broker.bootstrap_servers, stage_topics.dlq, 1, timeout_s=60)
        (output,) = await consume(broker.bootstrap_servers, stage_topics.outputs, 1, timeout_s=60)
        assert not worker.runner.error

    info = read_dead_letter(dead.headers)
    assert info.reason == "parse_error"
    assert info.message == "validation failed: KeyError"
    assert dead.value == b"trigger a validation bug"
    assert output_json(output)["source"]["offset"] == 1
