"""A worker whose stream has a damaged head key: the stream is replayed, commits go on.

Real broker, real redis-server, the tiny random-weight model.
"""

from __future__ import annotations

import redis

import pytest

from tests.stage.conftest import consume, make_engine, make_settings, produce, stage_topics  # noqa: F401
from tests.state.test_damaged_keys import damage_head
from tests.state.test_replay import (
    FIRST_ROUND,
    SECOND_ROUND,
    redis_worker_settings,
    reference_texts,
    run_round,
    second_round_outputs,
    texts_by_stream,
)
from worker.state.config import StateConfig
from worker.state.store import SnapshotStore


@pytest.mark.parametrize("damage", ["invalid_json", "wrong_type"])
async def test_worker_damaged_head_replayed_and_replaced(broker, redis_server, stage_topics, make_settings,
                                                         make_engine, damage):
    settings = redis_worker_settings(make_settings, redis_server.url)
    prefix = settings.redis.key_prefix
    await run_round(broker, settings, make_engine(), FIRST_ROUND, expected_outputs=len(FIRST_ROUND))
    client = redis.Redis.from_url(redis_server.url)
    try:
        damage_head(client, prefix, "s", damage)
    finally:
        client.close()

    _, hooks = await run_round(broker, settings, make_engine(), SECOND_ROUND, expected_outputs=len(SECOND_ROUND))

    records = FIRST_ROUND + SECOND_ROUND
    outputs = await second_round_outputs(broker, stage_topics, len(records))
    assert len(outputs) == len(records), "replayed events must publish nothing"
    expected = reference_texts(make_engine, settings, dict(enumerate(records)), stage_topics.events)
    assert texts_by_stream(outputs) == expected
    assert hooks.stats.rejected == {"head": 1}
    assert hooks.stats.replayed_streams == 1
    assert hooks.stats.checkpoints_refused == 0

    store = SnapshotStore(StateConfig(redis_url=redis_server.url, key_prefix=prefix))
    try:
        head = await store.read_head("s")
    finally:
        await store.close()
    assert head.latest.last_offset == len(FIRST_ROUND), "the second round's checkpoint replaced the damaged key"
    assert head.committed == head.latest, "the partition committed after the replacement"
