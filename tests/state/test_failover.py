"""Failover with real worker processes, a real broker and Redis: kill -9, SIGTERM, scale-out.

Each test runs the same events through a clean engine without Kafka (the reference) and
through two worker processes in one consumer group, one of which dies or leaves mid-run.
After removing duplicates by idempotency key, every stream's outputs must equal the
reference, and the value of a duplicate must be byte-identical to the first copy.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from tests.stage.conftest import ENGINE_CONFIG, produce
from tests.stage.test_pipeline import engine_alone_outputs, mixed_events
from topology.partitioner import partition_for_stream
from topology.schemas import HEADER_WORKER_ID
from worker.stage.settings import load_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
NUM_STREAMS = 20
EVENTS_PER_STREAM = 6


def worker_settings(broker, redis_url: str, topics: list[str], group_id: str, prefix: str) -> dict:
    events, outputs, dlq = topics
    return {
        "kafka": {
            "bootstrap_servers": broker.bootstrap_servers,
            "group_id": group_id,
            "events_topic": events,
            "outputs_topic": outputs,
            "dlq_topic": dlq,
            "session_timeout_ms": 6000,
        },
        "stage": {"shutdown_grace_s": 20, "max_new_tokens_limit": 4096, "default_max_new_tokens": 8},
        "checkpoint": {"store": "redis", "interval_s": 0.3, "interval_events": 8},
        "redis": {"url": redis_url, "key_prefix": prefix},
        "metrics": {"port": 0},
        "engine": dict(ENGINE_CONFIG),
    }


class WorkerProcess:
    def __init__(self, settings: dict, log_path: Path, fault: dict[str, str] | None = None) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), **(fault or {}))
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.state.worker_process", json.dumps(settings)],
            cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self, timeout_s: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill()
        self._log.close()

    def log_tail(self, num_lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])


async def collect_outputs(bootstrap: str, topic: str, num_keys: int, timeout_s: float, idle_s: float = 3.0):
    """Read ``topic`` from the start until ``num_keys`` distinct idempotency keys arrived, then ``idle_s`` more."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    bodies = []
    try:
        deadline = time.monotonic() + timeout_s
        while len({body["idempotency_key"] for body in bodies}) < num_keys and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=300)).values():
                bodies.extend(output_body(record) for record in batch)
        idle_deadline = time.monotonic() + idle_s
        while time.monotonic() < idle_deadline:
            for batch in (await consumer.getmany(timeout_ms=300)).values():
                bodies.extend(output_body(record) for record in batch)
    finally:
        await consumer.stop()
    return bodies


def output_body(record) -> dict:
    """Return the output's fields plus its raw value, worker id (a header) and record timestamp."""
    headers = dict(record.headers)
    return dict(json.loads(record.value), raw_value=record.value, record_timestamp_ms=record.timestamp,
                worker_id=headers[HEADER_WORKER_ID].decode())


def takeover_seconds(bodies: list[dict], killed_at: float, survivor_id_prefix: str) -> float | None:
    """Return seconds from the kill to the survivor's first output of a stream the killed worker served."""
    moved = {body["stream_id"] for body in bodies if not body["worker_id"].startswith(survivor_id_prefix)}
    times = [
        body["record_timestamp_ms"] / 1000 - killed_at
        for body in bodies
        if body["worker_id"].startswith(survivor_id_prefix)
        and body["stream_id"] in moved
        and body["record_timestamp_ms"] / 1000 > killed_at
    ]
    return min(times) if times else None


def check_outputs(bodies: list[dict], expected: dict[str, list[str]], num_events: int) -> int:
    """Assert no loss, equal duplicates and reference-equal outputs; return the number of duplicates."""
    first_by_key: dict[str, dict] = {}
    num_duplicates = 0
    for body in bodies:
        key = body["idempotency_key"]
        if key in first_by_key:
            num_duplicates += 1
            assert body["raw_value"] == first_by_key[key]["raw_value"], f"duplicate {key} is not byte-identical"
        else:
            first_by_key[key] = body
    assert len(first_by_key) == num_events, f"{num_events - len(first_by_key)} events have no output"

    by_stream: dict[str, list[dict]] = {}
    for body in first_by_key.values():
        by_stream.setdefault(body["stream_id"], []).append(body)
    assert len(by_stream) == NUM_STREAMS
    for stream_id, stream_bodies in by_stream.items():
        stream_bodies.sort(key=lambda body: body["source"]["offset"])
        assert [body["text"] for body in stream_bodies] == expected[stream_id], f"stream {stream_id} diverged"
    return num_duplicates


@pytest.fixture
def make_engine(tiny_loaded):
    from worker.engine import EngineConfig, StreamEngine

    return lambda: StreamEngine(tiny_loaded, EngineConfig(**ENGINE_CONFIG))


@pytest.fixture
def failover_run(broker, redis_server, new_topics, make_engine, tmp_path, record_property):
    """Return ``run(action, fault=None)``: two workers over fresh topics; ``action`` is kill, sigterm or scale_out.

    The second half of the events is produced after the group changed.
    """
    processes: list[WorkerProcess] = []

    async def run(action: str, fault: dict[str, str] | None = None, timeout_s: float = 240):
        topics = new_topics("events", "outputs", "dlq", partitions=4)
        group_id = f"g-{uuid.uuid4().hex[:8]}"
        settings = worker_settings(broker, redis_server.url, topics, group_id, f"failover-{uuid.uuid4().hex[:8]}")
        records = mixed_events(NUM_STREAMS, EVENTS_PER_STREAM)
        expected = engine_alone_outputs(make_engine, load_settings(values=settings), records, topics[0])
        # The second half of the events is produced only after the group changed, so the
        # streams of the worker that left can only continue correctly from a snapshot.
        half = len(records) // 2

        def partition_of(key: bytes) -> int:
            return partition_for_stream(key.decode(), 4)

        await produce(broker.bootstrap_servers, topics[0], records[:half], partition_of=partition_of)

        marker = tmp_path / "fault-reached"
        first_fault = dict(fault or {}, FAULT_MARKER=str(marker))
        first = WorkerProcess(settings, tmp_path / "first.log", first_fault)
        processes.append(first)
        second = None
        if action == "kill":
            second = WorkerProcess(settings, tmp_path / "second.log")
            processes.append(second)

        deadline = time.monotonic() + 120
        if action == "kill":
            while not marker.exists():
                assert first.process.poll() is None, f"first worker exited early:\n{first.log_tail()}"
                assert time.monotonic() < deadline, f"fault point not reached:\n{first.log_tail()}"
                await asyncio.sleep(0.05)
            first.kill()
            killed_at = time.time()
        else:
            # The first worker runs alone until it has produced outputs, then a second one
            # joins and takes partitions over (scale-out); with sigterm the first then leaves.
            await collect_outputs(broker.bootstrap_servers, topics[1], NUM_STREAMS, timeout_s=120, idle_s=0)
            second = WorkerProcess(settings, tmp_path / "second.log")
            processes.append(second)
            while "worker: assigned t-" not in second.log_path.read_text(errors="replace"):
                assert time.monotonic() < deadline, f"second worker never got partitions:\n{second.log_tail()}"
                await asyncio.sleep(0.1)
            if action == "sigterm":
                assert first.terminate() == 0, first.log_tail()
        await produce(broker.bootstrap_servers, topics[0], records[half:], partition_of=partition_of)

        bodies = await collect_outputs(broker.bootstrap_servers, topics[1], len(records), timeout_s=timeout_s)
        for process in (first, second):
            if process is not None and process.process.poll() is None:
                process.terminate()
        num_duplicates = check_outputs(bodies, expected, len(records))
        if action == "kill":
            survivor_prefix = f"{socket.gethostname()}-{second.process.pid}"
            takeover_s = takeover_seconds(bodies, killed_at, survivor_prefix)
            record_property("kill_to_first_moved_output_s", takeover_s)
            print(f"kill -9 to the first output of a moved stream: {takeover_s} s")
        return num_duplicates, first, second

    yield run
    for process in processes:
        process.close()


# Each scenario takes minutes on two cores, so the default run keeps kill -9 after the
# second checkpoint (outputs produced, offsets not yet committed) and the SIGTERM
# hand-over; `make test-all` runs the others too.
# NOTE: on a heavily loaded machine the 12th forward can come before the first checkpoint;
# the survivor then has nothing to restore and the last assert of the forward case fails.
@pytest.mark.parametrize(
    "point, after",
    [
        pytest.param("forward", "12", marks=pytest.mark.slow),
        ("checkpoint", "2"),
        pytest.param("snapshot_write", "6", marks=pytest.mark.slow),
    ],
)
async def test_failover_kill9_outputs_match_clean_run(failover_run, point, after):
    num_duplicates, first, second = await failover_run(
        "kill", {"FAULT_POINT": point, "FAULT_AFTER": after}
    )
    second_log = second.log_path.read_text(errors="replace")
    assert "restored stream" in second_log, "the survivor must restore at least one stream from Redis"


async def test_failover_sigterm_no_duplicates(failover_run):
    num_duplicates, first, second = await failover_run("sigterm")
    assert num_duplicates == 0
    assert "restored stream" in second.log_path.read_text(errors="replace")


@pytest.mark.slow
async def test_failover_scale_out_no_duplicates(failover_run):
    num_duplicates, first, second = await failover_run("scale_out")
    assert num_duplicates == 0
    assert "restored stream" in second.log_path.read_text(errors="replace")
