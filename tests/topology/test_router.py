"""The ingress router: routing decisions, and the faust app end to end on a real broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest_services import consume_records, run_coroutine
from topology.partitioner import partition_for_stream
from topology.router import decide_route
from topology.schemas import EventLimits, parse_event, read_dead_letter

LIMITS = EventLimits()


def test_decide_route_valid_event_rekeyed():
    value = json.dumps({"stream_id": "s-9", "text": "hello", "role": "user"}).encode()
    decision = decide_route(b"any-key", value, [("trace", b"1")], "ingress", 3, 17, LIMITS, timestamp_ms=5)

    assert decision.target == "events"
    assert decision.stream_id == "s-9"
    assert decision.message.key == b"s-9"
    assert decision.message.timestamp_ms == 5
    assert decision.message.header("trace") == b"1"
    routed = json.loads(decision.message.value)
    assert routed["event_id"] == "ingress:3:17"
    assert routed["text"] == "hello"
    assert routed["role"] == "user"


def test_decide_route_raw_text_dead_lettered():
    decision = decide_route(b"s", b"plain text", None, "ingress", 0, 4, LIMITS)

    assert decision.target == "dlq"
    assert decision.reason == "invalid_json"
    assert decision.message.value == b"plain text"
    assert decision.message.key == b"s"


def test_decide_route_missing_stream_id_dead_lettered():
    decision = decide_route(None, b'{"text": "a"}', None, "ingress", 0, 4, LIMITS)
    assert decision.target == "dlq"
    assert decision.reason == "missing_stream_id"


async def _consume_all(bootstrap: str, topics: list[str], expected: int, timeout_s: float) -> list:
    return await consume_records(bootstrap, topics, expected, timeout_s)


async def _produce(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=4 * 1024 * 1024)
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def _committed_total(bootstrap: str, group_id: str, topic: str, num_partitions: int) -> int:
    """Sum the committed offsets of ``group_id`` on ``topic``, read without joining the group."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False)
    await consumer.start()
    try:
        offsets = [await consumer.committed(TopicPartition(topic, partition)) for partition in range(num_partitions)]
    finally:
        await consumer.stop()
    return sum(offset or 0 for offset in offsets)


@pytest.fixture
def router_process(broker, new_topics):
    """Start ``python -m worker.commands.tools route`` on fresh topics; yield (topics, app id)."""
    ingress, events, outputs, dlq = new_topics("ingress", "events", "outputs", "dlq", partitions=3)
    app_id = f"router-{uuid.uuid4().hex[:8]}"
    env = dict(
        os.environ,
        SINKSTREAM_KAFKA__BOOTSTRAP_SERVERS=broker.bootstrap_servers,
        SINKSTREAM_KAFKA__EVENTS_TOPIC=events,
        SINKSTREAM_KAFKA__OUTPUTS_TOPIC=outputs,
        SINKSTREAM_KAFKA__DLQ_TOPIC=dlq,
        SINKSTREAM_ROUTER__INGRESS_TOPIC=ingress,
        SINKSTREAM_ROUTER__APP_ID=app_id,
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.commands.tools", "route"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield {"ingress": ingress, "events": events, "dlq": dlq}, app_id, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_router_routes_valid_and_invalid_records(broker, router_process):
    topics, app_id, process = router_process
    valid = [
        (None, json.dumps({"stream_id": f"stream-{index}", "text": f"text {index}"}).encode())
        for index in range(6)
    ]
    valid.append((b"other-key", json.dumps({"stream_id": "stream-0", "action": "generate"}).encode()))
    invalid = [
        (b"k1", b"not json"),
        (None, b'{"text": "no stream id"}'),
        (b"k2", json.dumps({"stream_id": "s", "text": "a", "action": "dance"}).encode()),
        (b"k3", json.dumps({"stream_id": "s", "action": "generate", "generate": {"max_new_tokens": 0}}).encode()),
        (b"k4", b'{"stream_id": "\\udc80", "text": "a"}'),  # a lone surrogate escape
        (b"k5", json.dumps({"stream_id": "s", "text": "x" * 1_200_000}).encode()),  # above the producers' limit
    ]
    run_coroutine(_produce(broker.bootstrap_servers, topics["ingress"], valid + invalid))

    records = run_coroutine(
        _consume_all(broker.bootstrap_servers, [topics["events"], topics["dlq"]], len(valid) + len(invalid), 90)
    )
    routed = [record for record in records if record.topic == topics["events"]]
    dead = [record for record in records if record.topic == topics["dlq"]]

    assert len(routed) == len(valid), process.poll()
    for record in routed:
        event = parse_event(record.key, record.value, record.headers, record.topic, record.partition,
                            record.offset, LIMITS)
        assert record.key == event.stream_id.encode()
        assert record.partition == partition_for_stream(event.stream_id, 3)
        assert event.event_id.startswith(topics["ingress"] + ":")
    assert sorted(json.loads(record.value).get("text", "") for record in routed) == sorted(
        [f"text {index}" for index in range(6)] + [""]
    )

    reasons = {record.key: read_dead_letter(record.headers).reason for record in dead}
    assert reasons == {b"k1": "invalid_json", None: "missing_stream_id", b"k2": "unknown_action",
                       b"k3": "invalid_max_new_tokens", b"k4": "invalid_stream_id", b"k5": "value_too_large"}
    too_large = next(record for record in dead if record.key == b"k5")
    assert too_large.value == b"", "a dead letter above the producer's request size drops its value"
    assert dict(too_large.headers)["x-sinkstream-dropped"] == f"value {len(invalid[-1][1])} bytes".encode()
    assert {record.value for record in dead if record.key != b"k5"} == {value for _, value in invalid[:-1]}

    # Every ingress offset gets committed once its record has been forwarded.
    deadline = time.monotonic() + 30
    committed = 0
    while time.monotonic() < deadline:
        committed = run_coroutine(_committed_total(broker.bootstrap_servers, app_id, topics["ingress"], 3))
        if committed == len(valid) + len(invalid):
            break
        time.sleep(1)
    assert committed == len(valid) + len(invalid)

    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(30) == 0


def test_decide_route_validation_bug_dead_lettered(monkeypatch):
    import topology.router

    def failing_parse(*args, **kwargs):
        raise KeyError("a bug in validation")

    monkeypatch.setattr(topology.router, "parse_event", failing_parse)
    decision = decide_route(b"k", b'{"stream_id": "s", "text": "a"}', None, "ingress", 0, 4, LIMITS)

    assert decision.target == "dlq"
    assert decision.reason == "parse_error"
    assert decision.message.value == b'{"stream_id": "s", "text": "a"}'
