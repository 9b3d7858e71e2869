"""Streams whose snapshot is rejected or lost: rebuilt by replay, or reset, as on_rejected selects.

Real broker, real redis-server, the tiny random-weight model. Each test runs one worker
over a first round of events, damages Redis, then runs a second worker over a second
round and compares its outputs with an engine that saw every event in order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from prometheus_client import CollectorRegistry

from tests.stage.conftest import consume, make_engine, make_settings, produce, stage_topics  # noqa: F401
from tests.stage.test_pipeline import engine_alone_results
from worker.devservices import start_redis
from worker.metrics import WorkerMetrics
from worker.stage.worker import StageWorker
from worker.state.config import StateConfig
from worker.state.hooks import from_worker_settings
from worker.state import keys
from worker.state.store import SnapshotStore

PARTITION = 0


def event(stream_id: str, text: str, generate: bool = False) -> tuple[bytes, bytes, None]:
    """An append, or a generate with seeded sampling (so a replay must reproduce its seed)."""
    value = {"stream_id": stream_id, "action": "generate" if generate else "append", "text": text}
    if generate:
        value["generate"] = {"max_new_tokens": 6, "temperature": 0.9, "seed": 11}
    return stream_id.encode(), json.dumps(value).encode(), None


FIRST_ROUND = [
    event("s", "The harbour was quiet before dawn."),
    event("other", "A second stream shares the partition."),
    event("s", "Then the gulls came.", generate=True),
    event("s", "The boats went out one by one."),
    event("other", "It asks a question.", generate=True),
]
SECOND_ROUND = [
    event("s", "What happened next?", generate=True),
    event("other", "And then?", generate=True),
]


def redis_worker_settings(make_settings, redis_url: str, on_rejected: str = "replay"):
    return make_settings(
        checkpoint={"store": "redis", "interval_s": 0.2, "on_rejected": on_rejected},
        redis={"url": redis_url, "key_prefix": f"replay-{uuid.uuid4().hex[:8]}"},
    )


def reference_results(make_engine, settings, records_by_offset: dict[int, tuple], topic: str) -> dict[str, list]:
    """Run records of the test partition, keyed by offset, through a fresh engine; return results per stream.

    Request ids are the stage's, so seeded sampling draws what the stage draws.
    """
    return engine_alone_results(make_engine, settings, records_by_offset, topic, partition=PARTITION,
                                request_id=lambda offset: f"{topic}/{PARTITION}/{offset}")


def reference_texts(make_engine, settings, records_by_offset: dict[int, tuple], topic: str) -> dict[str, list[str]]:
    results = reference_results(make_engine, settings, records_by_offset, topic)
    return {stream_id: [result.text for result in stream] for stream_id, stream in results.items()}


async def run_round(broker, settings, engine, records, expected_outputs: int, metrics=None):
    """Produce ``records`` to partition 0, run one worker until it produced ``expected_outputs``, stop it."""
    hooks = from_worker_settings(settings, engine, metrics)
    worker = StageWorker(settings, engine, hooks=hooks, metrics=metrics)
    await produce(broker.bootstrap_servers, settings.kafka.events_topic, records, partition_of=lambda key: PARTITION)
    task = asyncio.create_task(worker.run())
    try:
        deadline = time.monotonic() + 120
        while worker.stats.outputs + worker.stats.dead_letters < expected_outputs:
            assert time.monotonic() < deadline, f"only {worker.stats.outputs} of {expected_outputs} outputs"
            assert not task.done(), "the worker stopped early"
            await asyncio.sleep(0.05)
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 60)
        await hooks.close()
    return worker, hooks


async def corrupt_latest_chain(redis_url: str, prefix: str, stream_id: str) -> None:
    """Flip one byte inside the first chunk of the stream's latest base record."""
    store = SnapshotStore(StateConfig(redis_url=redis_url, key_prefix=prefix))
    try:
        head = await store.read_head(stream_id)
        assert head.latest is not None, f"no snapshot of stream {stream_id} was written"
        name = keys.chunk_key(prefix, stream_id, head.latest.records[0].record_id, 0)
        data = bytearray(await store.client.get(name))
        data[len(data) // 2] ^= 0xFF
        await store.client.set(name, bytes(data))
    finally:
        await store.close()


async def second_round_outputs(broker, topics, expected: int) -> list[dict]:
    """Every output on the topic (waiting a moment for extras), as JSON, in offset order."""
    records = await consume(broker.bootstrap_servers, topics.outputs, expected, timeout_s=30, idle_s=1.0)
    return [json.loads(record.value) for record in sorted(records, key=lambda r: r.offset)]


def texts_by_stream(outputs: list[dict]) -> dict[str, list[str]]:
    texts: dict[str, list[str]] = {}
    for body in sorted(outputs, key=lambda body: body["source"]["offset"]):
        texts.setdefault(body["stream_id"], []).append(body["text"])
    return texts


async def test_replay_rejected_snapshot_matches_uncorrupted(broker, redis_server, stage_topics, make_settings,
                                                                   make_engine, caplog):
    settings = redis_worker_settings(make_settings, redis_server.url)
    await run_round(broker, settings, make_engine(), FIRST_ROUND, expected_outputs=len(FIRST_ROUND))
    await corrupt_latest_chain(redis_server.url, settings.redis.key_prefix, "s")

    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    caplog.set_level(logging.WARNING, logger="worker.state.hooks")
    _, hooks = await run_round(broker, settings, make_engine(), SECOND_ROUND,
                               expected_outputs=len(SECOND_ROUND), metrics=metrics)

    records = FIRST_ROUND + SECOND_ROUND
    outputs = await second_round_outputs(broker, stage_topics, len(records))
    assert len(outputs) == len(records), "replayed events must publish nothing"
    dead_letters = await consume(broker.bootstrap_servers, stage_topics.dlq, 0, timeout_s=1, idle_s=1.0)
    assert dead_letters == []
    expected = reference_texts(make_engine, settings, dict(enumerate(records)), stage_topics.events)
    assert texts_by_stream(outputs) == expected

    assert hooks.stats.rejected == {"checksum": 1}
    assert hooks.stats.replayed_streams == 1
    assert hooks.stats.replayed_events == 3, "stream s had three events before its generate"
    assert hooks.stats.resets == 0
    assert registry.get_sample_value("sinkstream_replayed_events_total") == 3
    assert registry.get_sample_value("sinkstream_restores_total", {"source": "replay"}) == 1
    assert registry.get_sample_value("sinkstream_restores_total", {"source": "redis"}) == 1
    rebuilt = [r.getMessage() for r in caplog.records
               if r.levelname == "WARNING" and r.getMessage().startswith("rebuilt stream s ")]
    assert len(rebuilt) == 1, rebuilt
    assert f"{stage_topics.events}[{PARTITION}]" in rebuilt[0]
    assert "offsets 0 to 3" in rebuilt[0]


async def test_reset_rejected_snapshot_counted(broker, redis_server, stage_topics, make_settings,
                                                                make_engine, caplog):
    settings = redis_worker_settings(make_settings, redis_server.url, on_rejected="reset")
    await run_round(broker, settings, make_engine(), FIRST_ROUND, expected_outputs=len(FIRST_ROUND))
    await corrupt_latest_chain(redis_server.url, settings.redis.key_prefix, "s")

    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    _, hooks = await run_round(broker, settings, make_engine(), SECOND_ROUND,
                               expected_outputs=len(SECOND_ROUND), metrics=metrics)

    records = FIRST_ROUND + SECOND_ROUND
    outputs = await second_round_outputs(broker, stage_topics, len(records))
    assert len(outputs) == len(records)
    # Stream s lost its history, so its generate runs on an empty cache. Its offset stays 5, so the
    # seeded draw is the one the full run makes.
    full_history = reference_results(make_engine, settings, dict(enumerate(records)), stage_topics.events)
    only_last = reference_results(make_engine, settings, {len(FIRST_ROUND): SECOND_ROUND[0]}, stage_topics.events)
    last = [body for body in outputs if body["stream_id"] == "s"][-1]
    # The tiny random model may sample the same text with and without history, so the cache
    # size is what tells the two apart.
    assert last["text"] == only_last["s"][0].text
    assert last["tokens"]["cached"] == only_last["s"][0].cached_tokens
    assert last["tokens"]["cached"] < full_history["s"][-1].cached_tokens
    assert texts_by_stream(outputs)["other"] == [result.text for result in full_history["other"]]

    assert hooks.stats.rejected == {"checksum": 1}
    assert hooks.stats.resets == 1
    assert hooks.stats.replayed_streams == 0
    assert registry.get_sample_value("sinkstream_events_failed_total", {"reason": "restore_error"}) == 1
    assert registry.get_sample_value("sinkstream_replayed_events_total") == 0
    errors = [r.getMessage() for r in caplog.records
              if r.levelname == "ERROR" and r.getMessage().startswith("stream s on ")]
    assert len(errors) == 1, errors
    assert "on_rejected=reset" in errors[0]


async def test_replay_after_redis_restart(broker, stage_topics, make_settings, make_engine,
                                                             caplog):
    redis = start_redis()
    restarted = None
    try:
        settings = redis_worker_settings(make_settings, redis.url)
        await run_round(broker, settings, make_engine(), FIRST_ROUND, expected_outputs=len(FIRST_ROUND))
        port = redis.port
        redis.kill()
        restarted = start_redis(port=port)  # no persistence: every snapshot and the marker are gone

        caplog.set_level(logging.WARNING, logger="worker.state.hooks")
        _, hooks = await run_round(broker, settings, make_engine(), SECOND_ROUND,
                                   expected_outputs=len(SECOND_ROUND))
    finally:
        redis.stop()
        if restarted is not None:
            restarted.stop()

    records = FIRST_ROUND + SECOND_ROUND
    outputs = await second_round_outputs(broker, stage_topics, len(records))
    assert len(outputs) == len(records), "replayed events must publish nothing"
    expected = reference_texts(make_engine, settings, dict(enumerate(records)), stage_topics.events)
    assert texts_by_stream(outputs) == expected
    assert hooks.stats.lost == 2
    assert hooks.stats.replayed_streams == 2
    assert hooks.stats.replayed_events == len(FIRST_ROUND)
    assert hooks.stats.resets == 0
    detected = [r.getMessage() for r in caplog.records
                if "checkpoint marker of" in r.getMessage() and "not found in Redis" in r.getMessage()]
    assert len(detected) == 1, detected


async def test_ended_streams_release_admission(broker, redis_server, stage_topics, make_settings, tiny_loaded):
    """Streams that end give back their admission place, so later streams still run.

    With one slot and two host places the worker admits two streams at a time. Two
    streams that end must not keep the third one waiting for ever.
    """
    from tests.stage.conftest import ENGINE_CONFIG
    from worker.engine import EngineConfig, StreamEngine

    limits = {"max_resident_streams": 1, "max_host_streams": 2}
    settings = redis_worker_settings(make_settings, redis_server.url)
    settings = settings.model_copy(update={"engine": settings.engine.model_copy(update=limits)})
    engine = StreamEngine(tiny_loaded, EngineConfig(**{**ENGINE_CONFIG, **limits}))
    end = {"action": "end"}
    records = []
    for stream_id in ("a", "b"):
        records.append(event(stream_id, "A stream that ends soon."))
        records.append((stream_id.encode(), json.dumps({"stream_id": stream_id, **end}).encode(), None))
    records += [event("c", "A third stream."), event("c", "It asks for a reply.", generate=True)]

    worker, _hooks = await run_round(broker, settings, engine, records, expected_outputs=len(records))

    assert worker.stats.outputs == len(records)
    assert worker.stats.dead_letters == 0
    assert "a" not in worker._engine_streams
    assert "b" not in worker._engine_streams


async def test_slotless_and_resident_streams_make_room(broker, redis_server, stage_topics, make_settings,
                                                       tiny_loaded):
    """Streams that hold no cache (only reset) or sit idle in the only slot give way to waiting ones.

    With one slot and one host place the worker admits one stream at a time, so every
    later stream needs the earlier ones dropped to Redis once they are checkpointed.
    """
    from tests.stage.conftest import ENGINE_CONFIG
    from worker.engine import EngineConfig, StreamEngine

    limits = {"max_resident_streams": 1, "max_host_streams": 1}
    settings = redis_worker_settings(make_settings, redis_server.url)
    settings = settings.model_copy(update={"engine": settings.engine.model_copy(update=limits)})
    engine = StreamEngine(tiny_loaded, EngineConfig(**{**ENGINE_CONFIG, **limits}))
    records = [(stream_id.encode(), json.dumps({"stream_id": stream_id, "action": "reset"}).encode(), None)
               for stream_id in ("a", "b")]
    records += [event("c", "A stream with a cache."), event("d", "Another one."),
                event("d", "It asks for a reply.", generate=True)]

    worker, _hooks = await run_round(broker, settings, engine, records, expected_outputs=len(records))

    assert worker.stats.outputs == len(records)
    assert worker.stats.dead_letters == 0
