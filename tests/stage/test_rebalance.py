"""Rebalance: a second worker joins mid-run; nothing is lost and duplicates repeat the same output."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict

from tests.stage.conftest import consume, output_json, produce, running_worker
from topology.partitioner import partition_for_stream
from topology.schemas import HEADER_IDEMPOTENCY_KEY

NUM_STREAMS = 20


def wave(first_index: int, num_events: int):
    records = []
    for index in range(first_index, first_index + num_events):
        for stream in range(NUM_STREAMS):
            stream_id = f"stream-{stream:02d}"
            body = {"stream_id": stream_id, "action": "append", "text": f"Line {index} of {stream_id}."}
            if index % 3 == 2:
                body.update(action="generate", role="user", generate={"max_new_tokens": 4})
            records.append((stream_id.encode(), json.dumps(body).encode(), None))
    return records


async def test_rebalance_second_worker_joins_no_loss(broker, redis_server, stage_topics, make_settings, make_engine):
    from worker.state.hooks import from_worker_settings

    redis = {"url": redis_server.url, "key_prefix": f"rebalance-{uuid.uuid4().hex[:8]}"}
    settings_a = make_settings(stage={"worker_id": "a"}, checkpoint={"store": "redis"}, redis=redis)
    settings_b = make_settings(stage={"worker_id": "b"}, checkpoint={"store": "redis"}, redis=redis)
    first, second = wave(0, 6), wave(6, 6)
    records = first + second
    partition_of = lambda key: partition_for_stream(key.decode(), 4)  # noqa: E731
    await produce(broker.bootstrap_servers, stage_topics.events, first, partition_of=partition_of)

    engine_a, engine_b = make_engine(), make_engine()
    hooks_a = from_worker_settings(settings_a, engine_a)
    hooks_b = from_worker_settings(settings_b, engine_b)
    async with running_worker(settings_a, engine_a, hooks_a) as worker_a:
        await consume(broker.bootstrap_servers, stage_topics.outputs, len(first) // 2, timeout_s=120)
        async with running_worker(settings_b, engine_b, hooks_b) as worker_b:
            # Produce the second wave only once the group has given the second worker partitions.
            loop = asyncio.get_running_loop()
            joined_by = loop.time() + 60
            while not worker_b.assigned_partitions and loop.time() < joined_by:
                await asyncio.sleep(0.1)
            assert worker_b.assigned_partitions, "the second worker was never assigned a partition"
            await produce(broker.bootstrap_servers, stage_topics.events, second, partition_of=partition_of)
            outputs = await consume(broker.bootstrap_servers, stage_topics.outputs, len(records), timeout_s=180)
            deadline = asyncio.get_running_loop().time() + 120
            keys = {output_json(r)["idempotency_key"] for r in outputs}
            while len(keys) < len(records) and asyncio.get_running_loop().time() < deadline:
                outputs = await consume(broker.bootstrap_servers, stage_topics.outputs, len(outputs) + 1,
                                        timeout_s=5)
                keys = {output_json(r)["idempotency_key"] for r in outputs}
            assert worker_b.stats.outputs > 0, "the second worker never received a partition"
    await hooks_a.close()
    await hooks_b.close()
    assert worker_a.stats.outputs > 0

    by_key: dict[str, list] = defaultdict(list)
    values_by_key: dict[str, set[bytes]] = defaultdict(set)
    for record in outputs:
        body = output_json(record)
        assert dict(record.headers)[HEADER_IDEMPOTENCY_KEY] == body["idempotency_key"].encode()
        by_key[body["idempotency_key"]].append(body)
        values_by_key[body["idempotency_key"]].add(record.value)
    assert len(by_key) == len(records), "events without an output"
    for key, bodies in by_key.items():
        assert len({body["text"] for body in bodies}) == 1, f"duplicates of {key} differ"
        assert len(values_by_key[key]) == 1, f"duplicates of {key} are not byte-identical"
        assert len({(body["stream_id"], body["source"]["offset"]) for body in bodies}) == 1

    # Each stream's texts equal those of one engine that saw all its events in order.
    engine = make_engine()
    from worker.stage import messages

    limits = make_settings().stage.event_limits()
    for offset, (key, value, headers) in enumerate(records):
        event = messages.parse_event(key, value, headers, stage_topics.events, 0, offset, limits)
        engine.submit(messages.to_request(event, f"e{offset}"))
    expected = defaultdict(list)
    for result in engine.run_until_idle():
        expected[result.stream_id].append(result.text)
    actual = defaultdict(list)
    for bodies in sorted(by_key.values(), key=lambda b: (b[0]["stream_id"], b[0]["source"]["offset"])):
        actual[bodies[0]["stream_id"]].append(bodies[0]["text"])
    assert dict(actual) == dict(expected)
