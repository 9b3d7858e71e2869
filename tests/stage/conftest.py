"""Fixtures of the stage tests: a worker on the real broker with a tiny random-weight model."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from dataclasses import dataclass

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from worker.stage.settings import load_settings

# Small windows and short replies keep each test to seconds on two CPU cores.
ENGINE_CONFIG = dict(sink_tokens=4, window_tokens=124, prefill_chunk_tokens=64, max_resident_streams=8,
                     max_host_streams=64, max_batch_tokens=512)


@pytest.fixture
def make_engine(tiny_loaded):
    """Return a factory of fresh engines over the session's tiny model."""
    from worker.engine import EngineConfig, StreamEngine

    def make():
        return StreamEngine(tiny_loaded, EngineConfig(**ENGINE_CONFIG))

    return make


@dataclass
class StageTopics:
    events: str
    outputs: str
    dlq: str


@pytest.fixture
def stage_topics(new_topics) -> StageTopics:
    events, outputs, dlq = new_topics("events", "outputs", "dlq", partitions=4)
    return StageTopics(events, outputs, dlq)


@pytest.fixture
def make_settings(broker, stage_topics):
    """Return ``make(**sections)``: worker settings bound to this test's topics and group."""
    group_id = f"g-{uuid.uuid4().hex[:8]}"

    def make(**sections):
        values = {
            "kafka": {
                "bootstrap_servers": broker.bootstrap_servers,
                "group_id": group_id,
                "events_topic": stage_topics.events,
                "outputs_topic": stage_topics.outputs,
                "dlq_topic": stage_topics.dlq,
                "session_timeout_ms": 6000,
            },
            "stage": {"shutdown_grace_s": 10, "max_new_tokens_limit": 4096, "default_max_new_tokens": 8},
            "checkpoint": {"interval_s": 0.2},
            "metrics": {"port": 0},
            "engine": dict(ENGINE_CONFIG),
        }
        for section, fields in sections.items():
            values.setdefault(section, {}).update(fields)
        return load_settings(values=values)

    return make


async def produce(bootstrap_servers: str, topic: str, records, partition_of=None) -> None:
    """Produce ``(key, value, headers)`` triples in order, waiting for every acknowledgement."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, enable_idempotence=False, acks="all")
    await producer.start()
    try:
        for key, value, headers in records:
            partition = partition_of(key) if partition_of else None
            await producer.send_and_wait(topic, value=value, key=key, headers=headers or [], partition=partition)
    finally:
        await producer.stop()


async def consume(bootstrap_servers: str, topic: str, count: int, timeout_s: float = 60.0, idle_s: float = 0.0):
    """Read ``topic`` from the start until ``count`` records arrived (then ``idle_s`` more)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap_servers, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    records = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(records) < count and loop.time() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for batch in batches.values():
                records.extend(batch)
        idle_deadline = loop.time() + idle_s
        while loop.time() < idle_deadline:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


def output_json(record) -> dict:
    return json.loads(record.value)


@contextlib.asynccontextmanager
async def running_worker(settings, engine, hooks=None):
    """Run a StageWorker in a task of the test's loop; stop it gracefully on exit."""
    from worker.stage.worker import StageWorker

    worker = StageWorker(settings, engine, hooks=hooks)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 60)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """The tiny model saved as a Hugging Face directory, for workers run as subprocesses."""
    from tests.models import tiny_model

    directory = tmp_path_factory.mktemp("tiny-model")
    tiny_model("llama").save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def settings_env(settings) -> dict[str, str]:
    """Return SINKSTREAM_* variables that reproduce ``settings`` in a subprocess."""
    env = {}
    for section, model in settings:
        for name, value in model.model_dump(mode="json").items():
            if value is None:
                continue
            if name.endswith("password"):
                value = getattr(model, name).get_secret_value()
            env[f"SINKSTREAM_{section.upper()}__{name.upper()}"] = str(value)
    return env


async def committed_offsets(bootstrap_servers: str, group_id: str, topic: str, partitions: int) -> dict[int, int | None]:
    """Return the group's committed offset of each partition (None where nothing was committed)."""
    from aiokafka.structs import TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=group_id, enable_auto_commit=False)
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await consumer.stop()
