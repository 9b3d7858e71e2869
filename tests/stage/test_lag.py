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


async def create_topics(bootstrap_servers: str, names: list[str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 1, 1) for name in names])
    finally:
        await admin.close()


async def wait_connected(health: HealthState, expected: bool, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while health.snapshot().kafka_connected != expected:
        assert time.monotonic() < deadline, f"kafka_connected stayed {not expected} for {timeout_s} s"
        await asyncio.sleep(0.2)


async def test_lag_probe_reports_broker_outage(make_settings, make_engine):
    """A broker that stops responding turns kafka_connected off, and one that responds again turns it on."""
    from worker.devservices import start_broker

    broker = start_broker()
    port = broker.port
    names = ["probe-events", "probe-outputs", "probe-dlq"]
    try:
        await create_topics(broker.bootstrap_servers, names)
        settings = make_settings(kafka={"bootstrap_servers": broker.bootstrap_servers, "events_topic": names[0],
                                        "outputs_topic": names[1], "dlq_topic": names[2]})
        metrics = WorkerMetrics(CollectorRegistry())
        health = HealthState(stuck_after_s=60)
        worker = StageWorker(settings, make_engine(), metrics=metrics, health=health)
        task = asyncio.create_task(worker.run())
        try:
            await wait_connected(health, True, 60)
            broker.stop()
            await wait_connected(health, False, 30)
            metrics.update_health(health.snapshot())  # the metrics server does this per scrape
            assert metrics.registry.get_sample_value("sinkstream_kafka_connected") == 0
            assert not health.snapshot().ready

            broker = start_broker(port=port)  # in-memory storage: the topics must be made again
            await create_topics(broker.bootstrap_servers, names)
            await wait_connected(health, True, 60)
            metrics.update_health(health.snapshot())
            assert metrics.registry.get_sample_value("sinkstream_kafka_connected") == 1
        finally:
            worker.request_stop()
            await asyncio.wait_for(task, 60)
    finally:
        broker.stop()
