"""The rate limit on repeated aiokafka log messages, alone and against a stopped broker."""

from __future__ import annotations

import asyncio
import io
import logging
import subprocess
import sys
import time
import uuid

import pytest

from worker.devservices import start_broker
from worker.logconfig import RepeatFilter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_record(name: str, msg: str, *args, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_repeat_filter_passes_first_then_one_per_interval():
    clock = FakeClock()
    repeat_filter = RepeatFilter(interval_s=60, clock=clock)
    template = "Unable connect to node with id %s: %s"

    first = make_record("aiokafka", template, 1, "refused")
    repeats = [make_record("aiokafka", template, node_id, "refused") for node_id in (1, 2, 1)]
    passed_first = repeat_filter.filter(first)
    clock.now += 59.5
    passed_repeats = [repeat_filter.filter(record) for record in repeats]
    clock.now += 1.0
    after_interval = make_record("aiokafka", template, 1, "refused")
    passed_after_interval = repeat_filter.filter(after_interval)

    assert passed_first
    assert first.getMessage() == "Unable connect to node with id 1: refused"
    assert passed_repeats == [False, False, False]
    assert passed_after_interval
    assert after_interval.getMessage() == (
        "Unable connect to node with id 1: refused [3 more like this suppressed in the last 60 s]"
    )


def test_repeat_filter_no_count_without_suppressed():
    clock = FakeClock()
    repeat_filter = RepeatFilter(interval_s=10, clock=clock)
    repeat_filter.filter(make_record("aiokafka.client", "Unable to update metadata from %s", [0]))
    clock.now += 11
    record = make_record("aiokafka.client", "Unable to update metadata from %s", [0])

    assert repeat_filter.filter(record)
    assert record.getMessage() == "Unable to update metadata from [0]"


def test_repeat_filter_kinds_counted_apart():
    repeat_filter = RepeatFilter(interval_s=60, clock=FakeClock())
    records = [
        make_record("aiokafka.consumer.fetcher", "Failed fetch messages from %s: %s", 0, "err"),
        make_record("aiokafka.consumer.group_coordinator", "Failed fetch messages from %s: %s", 0, "err"),
        make_record("aiokafka.consumer.fetcher", "Failed fetch offsets from %s: %s", 0, "err"),
        make_record("aiokafka.consumer.fetcher", "Failed fetch messages from %s: %s", 0, "err",
                    level=logging.WARNING),
    ]

    assert [repeat_filter.filter(record) for record in records] == [True, True, True, True]
    assert [repeat_filter.filter(record) for record in records] == [False, False, False, False]


@pytest.mark.parametrize(
    "record",
    [
        make_record("worker.stage.worker", "produce failed for %s", "s1"),
        make_record("aiokafkax", "not the aiokafka package"),
        make_record("aiokafka.consumer.group_coordinator", "Discovered coordinator %s", 1, level=logging.INFO),
    ],
    ids=["other-logger", "name-prefix-only", "below-min-level"],
)
def test_repeat_filter_unlimited_records_pass(record):
    repeat_filter = RepeatFilter(interval_s=60, clock=FakeClock())

    assert [repeat_filter.filter(record) for _ in range(5)] == [True] * 5


@pytest.mark.parametrize("interval_s", [0, -1.0, float("nan")])
def test_repeat_filter_invalid_interval_raises(interval_s):
    with pytest.raises(ValueError, match="interval_s must be positive"):
        RepeatFilter(interval_s=interval_s)


_LOG_FIVE_ERRORS = """
import logging, sys
from worker.logconfig import configure_logging
configure_logging(sys.argv[1])
for node_id in range(5):
    logging.getLogger("aiokafka").error("Unable connect to node with id %s: %s", node_id, "refused")
logging.getLogger("worker.stage.worker").error("produce failed")
logging.getLogger("worker.stage.worker").error("produce failed")
"""


@pytest.mark.parametrize(("level", "expected_aiokafka_lines"), [("INFO", 1), ("debug", 5)])
def test_configure_logging_limits_above_debug(level, expected_aiokafka_lines):
    result = subprocess.run(
        [sys.executable, "-c", _LOG_FIVE_ERRORS, level], capture_output=True, text=True, timeout=60
    )
    lines = result.stderr.splitlines()

    assert result.returncode == 0, result.stderr
    assert sum(" ERROR aiokafka: " in line for line in lines) == expected_aiokafka_lines
    assert sum(" ERROR worker.stage.worker: " in line for line in lines) == 2


def _count_errors(stream: io.StringIO) -> int:
    return sum(line.startswith("ERROR ") for line in stream.getvalue().splitlines())


async def _run_clients_past_broker_stop(broker, outage_s: float) -> None:
    """Connect a consumer in a group and a producer, kill ``broker``, and keep both busy for ``outage_s``."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.errors import KafkaError

    topic = f"t-logconfig-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, request_timeout_ms=1000)
    await producer.start()
    await producer.send_and_wait(topic, b"before the outage")
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=broker.bootstrap_servers, group_id=topic, enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()

    async def keep_sending() -> None:
        while True:
            try:
                await producer.send_and_wait(topic, b"during the outage")
            except KafkaError:
                pass  # the broker is down, so keep retrying as the worker does

    sender = None
    try:
        assert await consumer.getmany(timeout_ms=10_000), "the consumer read nothing before the broker stopped"
        # SIGKILL, because Tansu took about 5 s to exit on SIGTERM and stop() blocks the event loop meanwhile.
        broker.kill()
        sender = asyncio.create_task(keep_sending())
        deadline = time.monotonic() + outage_s
        while time.monotonic() < deadline:
            await consumer.getmany(timeout_ms=200)
    finally:
        if sender is not None:
            sender.cancel()
        # With the broker gone the clients may fail to stop or hang, so their outcome is not checked.
        stops = [asyncio.create_task(client.stop()) for client in (consumer, producer)]
        _, pending = await asyncio.wait(stops, timeout=2)
        for task in pending:
            task.cancel()
        await asyncio.gather(*stops, *([sender] if sender else []), return_exceptions=True)


async def test_stopped_broker_error_lines_bounded():
    raw_lines, limited_lines = io.StringIO(), io.StringIO()
    raw_handler = logging.StreamHandler(raw_lines)
    limited_handler = logging.StreamHandler(limited_lines)
    limited_handler.addFilter(RepeatFilter(interval_s=60))
    kinds: set[tuple[str, str]] = set()
    kinds_handler = logging.Handler()
    kinds_handler.emit = lambda record: kinds.add((record.name, str(record.msg)))
    for handler in (raw_handler, limited_handler, kinds_handler):
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.ERROR)
    aiokafka_logger = logging.getLogger("aiokafka")
    previous_level = aiokafka_logger.level
    aiokafka_logger.setLevel(logging.WARNING)
    for handler in (raw_handler, limited_handler, kinds_handler):
        aiokafka_logger.addHandler(handler)
    broker = start_broker()

    try:
        await _run_clients_past_broker_stop(broker, outage_s=5.0)
    finally:
        broker.stop()
        for handler in (raw_handler, limited_handler, kinds_handler):
            aiokafka_logger.removeHandler(handler)
        aiokafka_logger.setLevel(previous_level)

    # Without the filter aiokafka logged about 90 ERROR lines a second here.
    assert _count_errors(raw_lines) >= 50, raw_lines.getvalue()[-2000:]
    assert _count_errors(limited_lines) == len(kinds), limited_lines.getvalue()
    assert 1 <= len(kinds) <= 10, sorted(kinds)
