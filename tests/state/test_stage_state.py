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
