"""The hand tools (topics create, produce, tail, dev up) against a real broker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest_services import consume_records, run_coroutine
from topology.partitioner import partition_for_stream
from topology.schemas import EventLimits, OutputRecord, parse_event
from worker.commands import tools


def run_tool(capsys, *argv: str) -> tuple[int, str]:
    exit_code = tools.main(list(argv))
    return exit_code, capsys.readouterr().out


async def _read_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 30) -> list:
    records = await consume_records(bootstrap, [topic], expected, timeout_s)
    return sorted(records, key=lambda record: (record.partition, record.offset))


async def _send(bootstrap: str, topic: str, messages) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for message in messages:
            await producer.send_and_wait(topic, message.value, key=message.key, headers=list(message.headers))
    finally:
        await producer.stop()


def make_output(stream_id: str, offset: int, text: str) -> OutputRecord:
    return OutputRecord(
        stream_id=stream_id, event_id=f"e-{offset}", topic="events", partition=0, offset=offset, text=text,
        finish_reason="length", prompt_tokens=3, generated_tokens=4, cached_tokens=7, evicted_tokens=0,
        queued_s=0.001, time_to_first_token_s=0.05, total_s=0.1, worker_id="w-test", model_fingerprint="fp",
    )


def test_topics_create_twice_reports_existing(broker, capsys, monkeypatch):
    prefix = f"t-cli-{uuid.uuid4().hex[:8]}"
    for role in ("EVENTS", "OUTPUTS", "DLQ"):
        monkeypatch.setenv(f"SINKSTREAM_KAFKA__{role}_TOPIC", f"{prefix}.{role.lower()}")
    monkeypatch.setenv("SINKSTREAM_ROUTER__INGRESS_TOPIC", f"{prefix}.ingress")

    first_code, first = run_tool(capsys, "topics", "create", "--bootstrap-servers", broker.bootstrap_servers,
                                 "--partitions", "2")
    second_code, second = run_tool(capsys, "topics", "create", "--bootstrap-servers", broker.bootstrap_servers,
                                   "--partitions", "2")

    assert first_code == 0
    assert f"{prefix}.events: created, 2 partitions" in first
    assert f"{prefix}.dlq: created, 1 partition" in first
    assert second_code == 0
    assert f"{prefix}.events: exists, 2 partitions" in second


def test_topics_create_more_partitions_exits_nonzero(broker, capsys, monkeypatch):
    prefix = f"t-cli-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("SINKSTREAM_KAFKA__EVENTS_TOPIC", f"{prefix}.events")
    monkeypatch.setenv("SINKSTREAM_ROUTER__INGRESS_TOPIC", f"{prefix}.ingress")
    run_tool(capsys, "topics", "create", "--bootstrap-servers", broker.bootstrap_servers, "--partitions", "1")

    exit_code, out = run_tool(capsys, "topics", "create", "--bootstrap-servers", broker.bootstrap_servers,
                              "--partitions", "3")

    assert exit_code == 1
    assert f"{prefix}.events: exists, 1 partition (fewer than the 3 configured)" in out


def test_produce_raw_texts_keyed_by_stream(broker, new_topics, capsys):
    (topic,) = new_topics("events", partitions=4)

    exit_code, out = run_tool(capsys, "produce", "--bootstrap-servers", broker.bootstrap_servers, "--topic", topic,
                              "--stream", "stream-7", "first", "second")
    records = run_coroutine(_read_all(broker.bootstrap_servers, topic, 2))

    assert exit_code == 0
    expected_partition = partition_for_stream("stream-7", 4)
    assert out.split() == [f"{topic}[{expected_partition}]@0", f"{topic}[{expected_partition}]@1"]
    assert [(record.key, record.value) for record in records] == [(b"stream-7", b"first"), (b"stream-7", b"second")]
    assert records[0].partition == expected_partition
    assert dict(records[0].headers)["content-type"] == b"text/plain; charset=utf-8"


def test_produce_json_looking_text_stays_raw(broker, new_topics, capsys):
    (topic,) = new_topics("events", partitions=1)
    text = '{"text": "not an event", "action": "end"}'

    run_tool(capsys, "produce", "--bootstrap-servers", broker.bootstrap_servers, "--topic", topic, "--stream", "s",
             text)
    (record,) = run_coroutine(_read_all(broker.bootstrap_servers, topic, 1))
    event = parse_event(record.key, record.value, record.headers, topic, 0, record.offset, EventLimits())

    assert event.format == "raw"
    assert event.text == text


def test_produce_json_generate_parses(broker, new_topics, capsys):
    (topic,) = new_topics("events", partitions=2)

    run_tool(capsys, "produce", "--bootstrap-servers", broker.bootstrap_servers, "--topic", topic, "--stream", "s",
             "--generate", "--role", "user", "--max-new-tokens", "12", "--seed", "5", "Hi there")
    (record,) = run_coroutine(_read_all(broker.bootstrap_servers, topic, 1))
    event = parse_event(record.key, record.value, record.headers, topic, record.partition, record.offset,
                        EventLimits())

    assert event.format == "json"
    assert event.action == "generate"
    assert event.role == "user"
    assert event.text == "Hi there"
    assert event.generate.max_new_tokens == 12
    assert event.generate.seed == 5


def test_produce_via_router_has_null_key(broker, new_topics, capsys, monkeypatch):
    (ingress,) = new_topics("ingress", partitions=1)
    monkeypatch.setenv("SINKSTREAM_ROUTER__INGRESS_TOPIC", ingress)

    run_tool(capsys, "produce", "--bootstrap-servers", broker.bootstrap_servers, "--stream", "s-r", "--via-router",
             "hello")
    (record,) = run_coroutine(_read_all(broker.bootstrap_servers, ingress, 1))

    assert record.key is None
    assert json.loads(record.value)["stream_id"] == "s-r"


def test_produce_reads_stdin_lines(broker, new_topics):
    (topic,) = new_topics("events", partitions=1)
    result = subprocess.run(
        [sys.executable, "-m", "worker.commands.tools", "produce", "--bootstrap-servers", broker.bootstrap_servers,
         "--topic", topic, "--stream", "s-in"],
        input="line one\n\nline two\n", capture_output=True, text=True, timeout=60,
    )
    records = run_coroutine(_read_all(broker.bootstrap_servers, topic, 2))

    assert result.returncode == 0, result.stderr
    assert [record.value for record in records] == [b"line one\n", b"line two\n"]


def test_produce_without_text_fails(broker, new_topics):
    (topic,) = new_topics("events", create=False)
    result = subprocess.run(
        [sys.executable, "-m", "worker.commands.tools", "produce", "--bootstrap-servers", broker.bootstrap_servers,
         "--topic", topic, "--stream", "s"],
        input="", capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "no events to send" in result.stderr


def run_sinkstream(capsys, *argv: str) -> tuple[int, str]:
    from worker import cli

    exit_code = cli.main(list(argv))
    return exit_code, capsys.readouterr().err


def test_produce_empty_text_rejected_sends_nothing(broker, new_topics, capsys):
    (topic,) = new_topics("events", partitions=1)
    connection = ("produce", "--bootstrap-servers", broker.bootstrap_servers, "--topic", topic, "--stream", "s")

    exit_code, err = run_sinkstream(capsys, *connection, "first", "")
    after_code, _ = run_sinkstream(capsys, *connection, "after")
    records = run_coroutine(_read_all(broker.bootstrap_servers, topic, 1))

    assert exit_code == 2
    assert "TEXT argument 2 is empty" in err
    assert "pass non-empty text" in err
    assert after_code == 0
    assert [(record.offset, record.value) for record in records] == [(0, b"after")]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--json", ""), "TEXT argument 1 is empty"),
        (("--action", "reset", "text"), "--action reset takes no text"),
        (("--action", "end", "--role", "user", "--file", os.devnull), "--action end takes no --role"),
        (("--generate", "hi", "--temperature", "-1"), "reason invalid_temperature"),
        (("--generate", "hi", "--seed", "-5"), "reason invalid_seed"),
        (("--generate", "hi", "--max-new-tokens", "0"), "reason invalid_max_new_tokens"),
        (("x" * 40_000,), "reason text_too_large"),
        (("a\udcffb",), "TEXT contains bytes that are not valid UTF-8"),
        (("--action", "append", "--generate", "hi"), "--generate conflicts with --action append"),
        (("--action", "reset", "--max-new-tokens", "5"), "need --generate"),
    ],
)
def test_produce_dead_letter_input_rejected(broker, new_topics, capsys, extra, message):
    (topic,) = new_topics("events", create=False)

    exit_code, err = run_sinkstream(capsys, "produce", "--bootstrap-servers", broker.bootstrap_servers, "--topic",
                                    topic, "--stream", "s", *extra)

    assert exit_code == 2
    assert message in err


@pytest.mark.parametrize(
    ("stream_id", "message"),
    [("", "--stream is empty"), ("bad\x01id", "reason invalid_stream_id")],
)
def test_produce_bad_stream_rejected(broker, new_topics, capsys, stream_id, message):
    (topic,) = new_topics("events", create=False)

    exit_code, err = run_sinkstream(capsys, "produce", "--bootstrap-servers", broker.bootstrap_servers, "--topic",
                                    topic, "--stream", stream_id, "text")

    assert exit_code == 2
    assert message in err


def test_produce_file_not_utf8_names_line(broker, new_topics, capsys, tmp_path):
    (topic,) = new_topics("events", create=False)
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"first line\nsecond \xe9t\xe9\n")

    exit_code, err = run_sinkstream(capsys, "produce", "--bootstrap-servers", broker.bootstrap_servers, "--topic",
                                    topic, "--stream", "s", "--file", str(path))

    assert exit_code == 2
    assert f"--file {path}: line 2 is not valid UTF-8" in err


def test_produce_no_check_sends_invalid_event(broker, new_topics, capsys):
    (topic,) = new_topics("events", partitions=1)

    exit_code, _ = run_sinkstream(capsys, "produce", "--bootstrap-servers", broker.bootstrap_servers, "--topic",
                                  topic, "--stream", "s", "--no-check", "--generate", "hi", "--temperature", "-1")
    (record,) = run_coroutine(_read_all(broker.bootstrap_servers, topic, 1))

    assert exit_code == 0
    assert json.loads(record.value)["generate"]["temperature"] == -1


def test_produce_generate_empty_text_requests_reply(broker, new_topics, capsys):
    (topic,) = new_topics("events", partitions=1)

    exit_code, _ = run_sinkstream(capsys, "produce", "--bootstrap-servers", broker.bootstrap_servers, "--topic",
                                  topic, "--stream", "s", "--generate", "")
    (record,) = run_coroutine(_read_all(broker.bootstrap_servers, topic, 1))
    event = parse_event(record.key, record.value, record.headers, topic, 0, record.offset, EventLimits())

    assert exit_code == 0
    assert event.action == "generate"
    assert event.text is None


def test_tail_pretty_prints_outputs(broker, new_topics, capsys):
    (outputs,) = new_topics("outputs", partitions=2)
    messages = [make_output("alpha", 1, "one").to_message(), make_output("beta", 2, "two").to_message()]
    run_coroutine(_send(broker.bootstrap_servers, outputs, messages))

    exit_code, out = run_tool(capsys, "tail", "--bootstrap-servers", broker.bootstrap_servers, "--topic", outputs,
                              "--from-beginning", "--max-messages", "2", "--idle-timeout", "10")

    assert exit_code == 0
    assert "[alpha] one" in out
    assert "[beta] two" in out
    assert "finish=length tokens: prompt=3 generated=4 cached=7 evicted=0" in out


def test_tail_json_lines_filters_stream(broker, new_topics, capsys):
    (outputs,) = new_topics("outputs", partitions=2)
    messages = [make_output("alpha", offset, f"a{offset}").to_message() for offset in range(3)]
    messages.append(make_output("beta", 9, "b").to_message())
    run_coroutine(_send(broker.bootstrap_servers, outputs, messages))

    exit_code, out = run_tool(capsys, "tail", "--bootstrap-servers", broker.bootstrap_servers, "--topic", outputs,
                              "--from-beginning", "--json-lines", "--stream", "alpha", "--idle-timeout", "3")
    lines = [json.loads(line) for line in out.splitlines()]

    assert exit_code == 0
    assert [line["output"]["text"] for line in lines] == ["a0", "a1", "a2"]
    assert {line["key"] for line in lines} == {"alpha"}
    assert lines[0]["output"]["idempotency_key"] == "alpha@events[0]:0"


def test_tail_shows_dead_letter_reason(broker, new_topics, capsys):
    from topology.schemas import build_dead_letter
    from worker.exceptions import InvalidEventError

    (dlq,) = new_topics("dlq", partitions=1)
    error = InvalidEventError("invalid_json", "the value is not valid JSON")
    run_coroutine(_send(broker.bootstrap_servers, dlq, [build_dead_letter(b"k", b"{oops", None, "events", 1, 5, error)]))

    exit_code, out = run_tool(capsys, "tail", "--bootstrap-servers", broker.bootstrap_servers, "--topic", dlq,
                              "--from-beginning", "--max-messages", "1", "--idle-timeout", "10")

    assert exit_code == 0
    assert "DEAD LETTER invalid_json: the value is not valid JSON" in out
    assert "from events[1]@5" in out

    exit_code, out = run_tool(capsys, "tail", "--bootstrap-servers", broker.bootstrap_servers, "--topic", dlq,
                              "--from-beginning", "--max-messages", "1", "--idle-timeout", "10", "--json-lines")
    line = json.loads(out)
    assert line["dead_letter"]["reason"] == "invalid_json"
    assert line["dead_letter"]["source"] == {"topic": "events", "partition": 1, "offset": 5}


def _read_until(process: subprocess.Popen, marker: str, timeout_s: float) -> str:
    lines = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if marker in line:
            return "".join(lines)
    raise AssertionError(f"{marker!r} not printed within {timeout_s} s; output so far:\n{''.join(lines)}")


def _port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_dev_up_starts_services_and_stops_on_signal(stop_signal):
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.commands.tools", "dev", "up", "--kafka-port", "0", "--redis-port", "0",
         "--partitions", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        out = _read_until(process, "Press Ctrl-C", 90)
        exports = dict(
            line.removeprefix("export ").split("=", 1) for line in out.splitlines() if line.startswith("export ")
        )
        bootstrap = exports["SINKSTREAM_KAFKA__BOOTSTRAP_SERVERS"]
        redis_url = exports["SINKSTREAM_REDIS__URL"]
        redis_address = redis_url.removeprefix("redis://").split("/")[0]
        assert exports["SINKSTREAM_CHECKPOINT__STORE"] == "redis"

        assert "topic sinkstream.events: 2 partitions" in out
        assert "topic sinkstream.dlq: 1 partition\n" in out
        assert _port_open(bootstrap)
        assert _port_open(redis_address)

        process.send_signal(stop_signal)
        assert process.wait(60) == 0
        assert not _port_open(bootstrap)
        assert not _port_open(redis_address)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def test_dev_up_busy_port_fails_with_hint():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "worker.commands.tools", "dev", "up", "--kafka-port", str(port), "--no-redis"],
            capture_output=True, text=True, timeout=60,
        )
    assert result.returncode != 0
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr


def test_produce_no_check_sends_empty_text(broker, new_topics, capsys):
    (topic,) = new_topics("events", partitions=1)

    exit_code, _ = run_sinkstream(capsys, "produce", "--bootstrap-servers", broker.bootstrap_servers, "--topic",
                                  topic, "--stream", "s", "--no-check", "")
    (record,) = run_coroutine(_read_all(broker.bootstrap_servers, topic, 1))

    assert exit_code == 0
    assert record.value == b""


def test_produce_event_json_sent_unchanged(broker, new_topics, capsys, tmp_path):
    (topic,) = new_topics("events", partitions=1)
    events = ['{"action": "generate", "text": "Hi", "generate": {"max_new_tokens": 3, "seed": 9}}',
              '{"action": "reset"}']
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(events) + "\n\n")

    exit_code, _ = run_sinkstream(capsys, "produce", "--bootstrap-servers", broker.bootstrap_servers, "--topic",
                                  topic, "--stream", "s", "--event-json", "--file", str(path))
    records = run_coroutine(_read_all(broker.bootstrap_servers, topic, 2))
    parsed = [parse_event(record.key, record.value, record.headers, topic, 0, record.offset, EventLimits())
              for record in records]

    assert exit_code == 0
    assert [record.value.decode() for record in records] == events
    assert [record.key for record in records] == [b"s", b"s"]
    assert [event.action for event in parsed] == ["generate", "reset"]
    assert parsed[0].generate.seed == 9


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (('{"action": "explode", "text": "x"}',), "reason unknown_action"),
        (("not json",), "would go to the dead-letter topic"),
        (("--generate", '{"text": "x"}'), "--event-json conflicts with --generate"),
    ],
)
def test_produce_event_json_rejected(broker, new_topics, capsys, extra, message):
    (topic,) = new_topics("events", create=False)

    exit_code, err = run_sinkstream(capsys, "produce", "--bootstrap-servers", broker.bootstrap_servers, "--topic",
                                    topic, "--stream", "s", "--event-json", *extra)

    assert exit_code == 2
    assert message in err


def test_produce_unreachable_broker_names_broker(capsys):
    exit_code, err = run_sinkstream(capsys, "produce", "--bootstrap-servers", "127.0.0.1:1", "--stream", "s", "hi")

    assert exit_code == 2
    assert "check the broker address" in err
    assert "REDIS" not in err


def test_produce_event_json_via_router_checked_as_router(broker, new_topics, capsys):
    (topic,) = new_topics("ingress", create=False)

    exit_code, err = run_sinkstream(capsys, "produce", "--bootstrap-servers", broker.bootstrap_servers, "--topic",
                                    topic, "--stream", "s", "--event-json", "--via-router", '{"text": "hi"}')

    assert exit_code == 2
    assert "reason missing_stream_id" in err
