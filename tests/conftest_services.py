"""Fixtures for the real Kafka broker and Redis server, loaded as a pytest plugin.

- ``broker``: one broker for the session. ``SINKSTREAM_TEST_BOOTSTRAP=host:port`` uses a
  broker that is already running; otherwise a testcontainers Kafka when a Docker engine
  responds, else the Tansu binary from ``worker.devservices``.
- ``redis_server``: one Redis for the session, chosen the same way
  (``SINKSTREAM_TEST_REDIS_URL``, testcontainers, ``start_redis()``).
- ``new_topics``: a factory that creates topics with names unique to the test.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
import threading
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


@dataclass
class ExternalService:
    """A broker or Redis that the tests did not start and must not stop."""

    name: str
    address: str

    @property
    def bootstrap_servers(self) -> str:
        return self.address

    @property
    def url(self) -> str:
        return self.address

    def alive(self) -> bool:
        return True

    def stop(self, timeout_s: float = 0.0) -> None:
        pass


def docker_available() -> bool:
    """Return True when ``docker info`` reaches a Docker engine within 10 s."""
    if shutil.which("docker") is None:
        return False
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


async def consume_records(bootstrap: str, topics: list[str], expected: int, timeout_s: float = 30) -> list:
    """Read ``topics`` from the beginning until ``expected`` records arrived or ``timeout_s`` passed."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    records = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < expected and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


def run_coroutine(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to completion on a new event loop in a helper thread.

    Works from synchronous fixtures and from inside a running event loop alike.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = asyncio.run(coroutine)
        except BaseException as exc:  # re-raised in the calling thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="fixture-coroutine")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.fixture(scope="session")
def broker():
    """A Kafka-protocol broker for the whole session; it has ``.bootstrap_servers``."""
    external = os.environ.get("SINKSTREAM_TEST_BOOTSTRAP")
    if external:
        yield ExternalService("kafka", external)
        return
    if docker_available():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as container:
            yield ExternalService("kafka", container.get_bootstrap_server())
        return
    from worker.devservices import start_broker

    process = start_broker()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def redis_server():
    """A Redis server for the whole session; it has ``.url``."""
    external = os.environ.get("SINKSTREAM_TEST_REDIS_URL")
    if external:
        yield ExternalService("redis", external)
        return
    if docker_available():
        from testcontainers.redis import RedisContainer

        with RedisContainer() as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(6379)
            yield ExternalService("redis", f"redis://{host}:{port}/0")
        return
    from worker.devservices import start_redis

    process = start_redis()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def new_topics(broker, request):
    """Return ``create(*roles, partitions=3, create=True) -> list[str]``: fresh topic names.

    Each name is ``t-<test name>-<random>-<role>``. With ``create=True`` (the default) the
    topics are created on ``broker`` before the names are returned.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    test_name = re.sub(r"[^a-zA-Z0-9_-]", "-", request.node.name)[:80]

    async def create_on_broker(names: list[str], partitions: int) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
        await admin.start()
        try:
            response = await admin.create_topics([NewTopic(name, partitions, 1) for name in names])
            failed = [error for error in response.topic_errors if error[1] != 0]
            assert not failed, f"creating test topics failed: {failed}"
        finally:
            await admin.close()

    def create(*roles: str, partitions: int = 3, create: bool = True) -> list[str]:
        suffix = uuid.uuid4().hex[:8]
        names = [f"t-{test_name}-{suffix}-{role}" for role in (roles or ("topic",))]
        if create:
            run_coroutine(create_on_broker(names, partitions))
        return names

    return create
