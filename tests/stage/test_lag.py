"""Consumer lag from the broker's end offsets, on the real broker."""

from __future__ import annotations

import asyncio
import time

from aiokafka.structs import TopicPartition
from prometheus_client import CollectorRegistry

from tests.stage.conftest import produce
from worker.health import HealthState
from worker.metrics import WorkerMetrics
from worker.stage.worker import StageWorker


async def test_lag_stopped_consumer_counts_new_records(broker, stage_topics, make_settings, make_engine):
    settings = make_settings()
    metrics = WorkerMetrics(CollectorRegistry())
    health = HealthState(stuck_after_s=60)
    worker = StageWorker(settings, make_engine(), metrics=metrics, health=health)
    task = asyncio.create_task(worker.run())
    tp = TopicPartition(stage_topics.events, 1)
    labels = {"topic": tp.topic, "partition": "1"}
    try:
        deadline = time.monotonic() + 60
        while tp not in worker.assigned_partitions:
            assert time.monotonic() < deadline, "partition 1 was never assigned"
            await asyncio.sleep(0.1)
        # A consumer that stopped fetching (the stage's own pause bookkeeping is left alone):
        # highwater() no longer moves, the end offset does.
        worker.consumer.pause(tp)
        await produce(broker.bootstrap_servers, stage_topics.events,
                      [(b"k", f"event {n}".encode(), None) for n in range(5)], partition_of=lambda key: 1)
        deadline = time.monotonic() + 30
        while metrics.registry.get_sample_value("sinkstream_consumer_lag_records", labels) != 5:
            assert time.monotonic() < deadline, (
                f"lag of {tp} is {metrics.registry.get_sample_value('sinkstream_consumer_lag_records', labels)}, "
                "expected 5"
            )
            await asyncio.sleep(0.2)
        assert health.snapshot().partitions[(tp.topic, tp.partition)].lag == 5
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 60)
