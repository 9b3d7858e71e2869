"""Clients other than aiokafka write events and read outputs: confluent-kafka and kcat."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest

from tests.conftest_services import consume_records, run_coroutine
from topology.partitioner import partition_for_stream
from topology.schemas import EventLimits, OutputRecord, parse_event
from worker.commands import tools

STREAM_IDS = ["alpha", "beta", "gamma", "delta", "stream-42", "ümlaut", "user:1234"]


async def _read_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 30) -> list:
    return await consume_records(bootstrap, [topic], expected, timeout_s)


async def _send(bootstrap: str, topic: str, messages) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for message in messages:
            await producer.send_and_wait(topic, message.value, key=message.key, headers=list(message.headers))
    finally:
        await producer.stop()


def sinkstream_partitions(capsys, bootstrap: str, topic: str) -> dict[str, int]:
    """Produce one raw event per stream with ``sinkstream produce``; return each stream's partition."""
    partitions = {}
    for stream_id in STREAM_IDS:
        assert tools.main(["produce", "--bootstrap-servers", bootstrap, "--topic", topic, "--stream", stream_id,
                           "from sinkstream"]) == 0
        printed = capsys.readouterr().out.strip()  # topic[partition]@offset
        partitions[stream_id] = int(printed.rsplit("[", 1)[1].split("]")[0])
    return partitions


def make_output(stream_id: str) -> OutputRecord:
    return OutputRecord(
        stream_id=stream_id, event_id="e-1", topic="events", partition=3, offset=11, text="réponse",
        finish_reason="eos", prompt_tokens=2, generated_tokens=5, cached_tokens=9, evicted_tokens=1,
        queued_s=0.0, time_to_first_token_s=0.01, total_s=0.02, worker_id="w", model_fingerprint="fp",
    )


def test_confluent_producer_events_land_with_sinkstream_produce(broker, new_topics, capsys):
    from confluent_kafka import Producer

    (topic,) = new_topics("events", partitions=5)
    producer = Producer(
        {"bootstrap.servers": broker.bootstrap_servers, "partitioner": "murmur2_random", "enable.idempotence": False}
    )
    for stream_id in STREAM_IDS:
        producer.produce(topic, key=stream_id.encode(), value=f"text of {stream_id}".encode())
    assert producer.flush(30) == 0
    expected = sinkstream_partitions(capsys, broker.bootstrap_servers, topic)

    records = run_coroutine(_read_all(broker.bootstrap_servers, topic, 2 * len(STREAM_IDS)))
    from_confluent = [record for record in records if record.value.startswith(b"text of ")]

    assert len(from_confluent) == len(STREAM_IDS)
    for record in from_confluent:
        event = parse_event(record.key, record.value, record.headers, record.topic, record.partition,
                            record.offset, EventLimits())
        assert event.text == f"text of {event.stream_id}"
        assert record.partition == expected[event.stream_id] == partition_for_stream(event.stream_id, 5)


def test_confluent_consumer_reads_outputs(broker, new_topics):
    from confluent_kafka import Consumer

    (outputs,) = new_topics("outputs", partitions=2)
    run_coroutine(_send(broker.bootstrap_servers, outputs, [make_output("alpha").to_message()]))
    consumer = Consumer({
        "bootstrap.servers": broker.bootstrap_servers,
        "group.id": f"{outputs}-reader",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    consumer.subscribe([outputs])
    message = None
    deadline = time.monotonic() + 30
    try:
        while message is None and time.monotonic() < deadline:
            polled = consumer.poll(1.0)
            if polled is not None and polled.error() is None:
                message = polled
    finally:
        consumer.close()

    assert message is not None, "no output read within 30 s"
    assert message.key() == b"alpha"
    assert dict(message.headers())["idempotency-key"] == b"alpha@events[3]:11"
    assert OutputRecord.from_json(message.value()) == make_output("alpha")


@pytest.fixture
def kcat(broker):
    """The kcat binary, when it is installed and can read the broker's metadata."""
    binary = shutil.which("kcat") or shutil.which("kafkacat")
    if binary is None:
        pytest.skip("kcat is not installed (apt-get install kafkacat)")
    probe = subprocess.run([binary, "-b", broker.bootstrap_servers, "-L", "-m", "5"], capture_output=True,
                           text=True, timeout=30)
    if probe.returncode != 0:
        # NOTE: Debian bookworm's kcat 1.7.1 links librdkafka 2.0.2, which fails to parse the
        # ApiVersions v3 response of Tansu 0.6.0 ("Read underflow"); newer librdkafka works.
        pytest.skip(f"kcat cannot read this broker's metadata: {probe.stderr.strip().splitlines()[-1]}")
    return binary


def test_kcat_keyed_events_land_with_sinkstream_produce(broker, new_topics, capsys, kcat):
    (topic,) = new_topics("events", partitions=5)
    lines = "".join(f"{stream_id}:text of {stream_id}\n" for stream_id in STREAM_IDS)
    produced = subprocess.run(
        [kcat, "-b", broker.bootstrap_servers, "-P", "-t", topic, "-K:", "-X", "topic.partitioner=murmur2_random"],
        input=lines.encode(), capture_output=True, timeout=60,
    )
    assert produced.returncode == 0, produced.stderr
    expected = sinkstream_partitions(capsys, broker.bootstrap_servers, topic)

    records = run_coroutine(_read_all(broker.bootstrap_servers, topic, 2 * len(STREAM_IDS)))
    from_kcat = [record for record in records if record.value.startswith(b"text of ")]

    assert len(from_kcat) == len(STREAM_IDS)
    for record in from_kcat:
        stream_id = record.key.decode()
        assert record.partition == expected[stream_id], stream_id


def test_kcat_reads_outputs(broker, new_topics, kcat):
    (outputs,) = new_topics("outputs", partitions=1)
    run_coroutine(_send(broker.bootstrap_servers, outputs, [make_output("beta").to_message()]))

    consumed = subprocess.run(
        [kcat, "-b", broker.bootstrap_servers, "-C", "-t", outputs, "-o", "beginning", "-e", "-c", "1", "-J"],
        capture_output=True, text=True, timeout=60,
    )
    envelope = json.loads(consumed.stdout.splitlines()[0])

    assert consumed.returncode == 0, consumed.stderr
    assert envelope["key"] == "beta"
    assert "idempotency-key" in envelope["headers"]
    assert OutputRecord.from_json(envelope["payload"]) == make_output("beta")
