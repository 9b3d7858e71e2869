"""The stage with Redis state hooks: checkpoint ordering, pausing, and the Redis tier.

Real broker, real redis-server, the tiny random-weight model.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest

from tests.stage.conftest import consume, make_engine, make_settings, produce, stage_topics  # noqa: F401
from topology.partitioner import partition_for_stream
from worker.stage.worker import StageWorker
from worker.state.config import StateConfig
from worker.state.hooks import from_worker_settings
from worker.state.store import SnapshotStore


class SlowOutputWorker(StageWorker):
    """Holds the first output of ``slow_stream`` back for ``delay_s`` before producing it.

    This stands for a broker that is slow to acknowledge: the event's result is back
    from the engine, its output is not yet acknowledged.
    """

    slow_stream = "slow"
    delay_s = 3.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.released_at: float | None = None

    def _send(self, tp, generation, offset, topic, key, value, headers, on_done):
        if topic != self.settings.kafka.outputs_topic or key != self.slow_stream.encode() or self.released_at:
            return super()._send(tp, generation, offset, topic, key, value, headers, on_done)

        async def later() -> None:
            await asyncio.sleep(self.delay_s)
            self.released_at = time.monotonic()
            super(SlowOutputWorker, self)._send(tp, generation, offset, topic, key, value, headers, on_done)

        self._spawn(later())


def redis_settings(make_settings, redis_server, **sections):
    prefix = f"stage-{uuid.uuid4().hex[:8]}"
    values = {"checkpoint": {"store": "redis", "interval_s": 0.2},
              "redis": {"url": redis_server.url, "key_prefix": prefix}}
    for section, fields in sections.items():
        values.setdefault(section, {}).update(fields)
    return make_settings(**values)


def append_event(stream_id: str, text: str, generate: bool = False) -> tuple[bytes, bytes, None]:
    value = {"stream_id": stream_id, "action": "generate" if generate else "append", "text": text}
    if generate:
        value["generate"] = {"max_new_tokens": 4}
    return stream_id.encode(), json.dumps(value).encode(), None


async def test_checkpoint_output_in_flight_snapshot_waits(broker, redis_server, stage_topics, make_settings,
                                                          make_engine):
    settings = redis_settings(make_settings, redis_server)
    engine = make_engine()
    hooks = from_worker_settings(settings, engine)
    store = SnapshotStore(StateConfig(redis_url=redis_server.url, key_prefix=settings.redis.key_prefix))
    worker = SlowOutputWorker(settings, engine, hooks=hooks)
    task = asyncio.create_task(worker.run())
    try:
        # One partition: the fast stream's acknowledged outputs move the committable offset,
        # so checkpoints run while the slow stream's output is in flight.
        records = [append_event("fast", "The fast stream begins."),
                   append_event("slow", "The first event of the slow stream."),
                   append_event("fast", "The fast stream goes on.")]
        await produce(broker.bootstrap_servers, stage_topics.events, records, partition_of=lambda key: 0)
        deadline = time.monotonic() + 60
        snapshot_at = None
        while time.monotonic() < deadline and snapshot_at is None:
            head = await store.read_head("slow")
            if head.latest is not None:
                snapshot_at = time.monotonic()
            await asyncio.sleep(0.05)
        assert snapshot_at is not None, "no snapshot of the stream was written"
        # The snapshot covers the event, so it may exist only once the output is acknowledged.
        assert worker.released_at is not None and worker.released_at < snapshot_at, (
            "the snapshot was written while the output of the event it covers was in flight"
        )
        outputs = await consume(broker.bootstrap_servers, stage_topics.outputs, 3, timeout_s=30)
        assert len(outputs) == 3
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 60)
        await hooks.close()
        await store.close()


def stream_events(stream_ids, round_index: int) -> list[tuple[bytes, bytes, None]]:
    return [append_event(stream_id, f"Round {round_index} of {stream_id}: the tide turns.") for stream_id in stream_ids]


async def wait_for(condition, timeout_s: float, message: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, message
        await asyncio.sleep(0.05)


async def test_checkpoint_redis_down_pauses_then_resumes(broker, stage_topics, make_settings, make_engine, caplog):
    from aiokafka.structs import TopicPartition

    from worker.devservices import start_redis
    from worker.health import HealthState

    redis = start_redis()
    port = redis.port
    restarted = None
    settings = redis_settings(make_settings, redis, checkpoint={"max_unsafe_s": 1.0})
    engine = make_engine()
    hooks = from_worker_settings(settings, engine)
    health = HealthState(stuck_after_s=60, max_unsafe_s=settings.checkpoint.max_unsafe_s)
    health.set_model_loaded(True)
    worker = StageWorker(settings, engine, hooks=hooks, health=health)
    task = asyncio.create_task(worker.run())
    tp = TopicPartition(stage_topics.events, 0)
    streams = ["a", "b"]
    try:
        await produce(broker.bootstrap_servers, stage_topics.events, stream_events(streams, 0),
                      partition_of=lambda key: 0)
        await wait_for(lambda: worker.stats.outputs == 2, 60, "the first round produced no outputs")
        await wait_for(lambda: health.ready()[0], 30, "the worker never became ready")

        redis.kill()
        await produce(broker.bootstrap_servers, stage_topics.events, stream_events(streams, 1),
                      partition_of=lambda key: 0)
        await wait_for(lambda: tp in worker.consumer.paused(), 60,
                       "the partition was not paused while checkpoints failed")
        await wait_for(lambda: not health.ready()[0], 10, "/readyz must fail while checkpoints fail")
        consumed = worker.stats.consumed
        await produce(broker.bootstrap_servers, stage_topics.events, stream_events(streams, 2),
                      partition_of=lambda key: 0)
        await asyncio.sleep(1.5)
        assert worker.stats.consumed == consumed, "a paused partition must not be fetched"

        restarted = start_redis(port=port)
        await wait_for(lambda: tp not in worker.consumer.paused(), 60,
                       "the partition was not resumed after checkpoints succeeded")
        await wait_for(lambda: worker.stats.outputs == 6, 60, "events after the pause were not processed")
        await wait_for(lambda: health.ready()[0], 30, "/readyz did not recover after a checkpoint")
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 60)
        await hooks.close()
        redis.stop()
        if restarted is not None:
            restarted.stop()
    # One warning per partition and episode (partitions without checkpoints pause too).
    pausing = [r.getMessage() for r in caplog.records
               if r.levelname == "WARNING" and r.getMessage().startswith(f"pausing {stage_topics.events}[0]")]
    assert len(pausing) == 1, pausing
    resuming = [r.getMessage() for r in caplog.records
                if r.getMessage().startswith(f"resuming {stage_topics.events}[0]")]
    assert len(resuming) == 1, resuming


def two_round_events(num_streams: int) -> list[tuple[bytes, bytes, None]]:
    """An append then a generate per stream, round by round, so every stream is idle in between."""
    records = []
    for round_index in range(2):
        for stream in range(num_streams):
            stream_id = f"stream-{stream:02d}"
            text = f"Round {round_index} of {stream_id}: the tide turns at {stream * 7 + round_index} o'clock."
            records.append(append_event(stream_id, text, generate=round_index == 1))
    return records


async def test_tiering_redis_tier_outputs_match_all_resident(broker, redis_server, stage_topics, make_settings,
                                                             make_engine):
    from tests.stage.conftest import ENGINE_CONFIG
    from tests.stage.test_pipeline import engine_alone_outputs
    from worker.engine import EngineConfig, StreamEngine

    num_streams = 20
    settings = redis_settings(make_settings, redis_server, engine={"max_resident_streams": 2, "max_host_streams": 2})
    reference_engine = make_engine()
    engine = StreamEngine(reference_engine.loaded,
                          EngineConfig(**dict(ENGINE_CONFIG, max_resident_streams=2, max_host_streams=2)))
    hooks = from_worker_settings(settings, engine)
    records = two_round_events(num_streams)
    worker = StageWorker(settings, engine, hooks=hooks)
    task = asyncio.create_task(worker.run())
    try:
        # The second round starts after the first is done, so most streams are in Redis only.
        for round_records in (records[:num_streams], records[num_streams:]):
            await produce(broker.bootstrap_servers, stage_topics.events, round_records,
                          partition_of=lambda key: partition_for_stream(key.decode(), 4))
            await wait_for(lambda: worker.stats.outputs + worker.stats.dead_letters >= len(round_records) * (
                1 + (round_records is records[num_streams:])), 240, "a round of events did not finish")
        outputs = await consume(broker.bootstrap_servers, stage_topics.outputs, len(records), timeout_s=60)
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 60)
        await hooks.close()
    assert worker.stats.dead_letters == 0, worker.stats.dead_letter_reasons
    assert len(outputs) == len(records)
    assert hooks.stats.restores > 0, "no stream came back from the Redis tier"
    by_stream: dict[str, list[str]] = {}
    for record in sorted(outputs, key=lambda r: json.loads(r.value)["source"]["offset"]):
        body = json.loads(record.value)
        by_stream.setdefault(body["stream_id"], []).append(body["text"])
    expected = engine_alone_outputs(make_engine, settings, records, stage_topics.events)
    assert by_stream == expected
