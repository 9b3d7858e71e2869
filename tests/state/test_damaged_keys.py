"""Damaged or foreign keys under the snapshot prefix, against a real redis-server.

A fault run left head keys of the wrong Redis type, heads with invalid JSON, extra fields
or a forged ``num_chunks``, key names that are not UTF-8 and stream ids with terminal
escapes. Each must cost one stream its snapshot at most: never the partition's commits,
never Redis availability, never the listing of other streams.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time

import pytest
import redis
from aiokafka.structs import TopicPartition

from tests.state.conftest import cache_state
from tests.state.test_hooks import grow, make_hooks, same_cache
from tests.state.test_snapshots_command import run_cli, write_snapshots
from worker.state import keys
from worker.state.chain import Chain, InvalidChainError
from worker.state.exceptions import DamagedHeadError, SnapshotRejectedError
from worker.state.snapshots import StreamSnapshotter

TP = TopicPartition("events", 2)

HUGE_CHUNKS = json.dumps(
    {"records": [{"record_id": "x", "kind": "base", "num_chunks": 100_000_000, "num_bytes": 5}], "stream_id": "{id}"}
)
EXTRA_FIELD = json.dumps(
    {"records": [{"record_id": "x", "kind": "base", "num_chunks": 1, "num_bytes": 5}], "stream_id": "{id}", "color": 1}
)
# Damage kinds: a hash whose "latest" field contains this text, or a plain string at the head key.
DAMAGES = {
    "huge_num_chunks": HUGE_CHUNKS,
    "invalid_json": "{not json",
    "extra_field": EXTRA_FIELD,
    "wrong_type": None,
}


def damage_head(client: redis.Redis, prefix: str, stream_id: str, damage: str) -> str:
    """Replace the stream's head key with the damage named ``damage``; return the key name."""
    name = keys.head_key(prefix, stream_id)
    client.delete(name)
    text = DAMAGES[damage]
    if text is None:
        client.set(name, "a plain string")
    else:
        client.hset(name, "latest", text.replace("{id}", stream_id))
    return name


@pytest.fixture
def client(state_config):
    sync_client = redis.Redis.from_url(state_config.redis_url)
    yield sync_client
    sync_client.close()


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- chain validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, fragment",
    [
        (HUGE_CHUNKS.replace("{id}", "s"), "num_chunks 100000000 cannot hold num_bytes 5"),
        ("{not json", "invalid JSON"),
        (EXTRA_FIELD.replace("{id}", "s"), "unknown field 'color'"),
        ('{"records": [], "stream_id": "s"}', "non-empty list"),
        ('["a list"]', "expected a JSON object"),
        ('{"records": [{"record_id": "x", "kind": "base", "num_chunks": 1}], "stream_id": "s"}', "is missing field"),
        ('{"records": [{"record_id": "x", "kind": "base", "num_chunks": true, "num_bytes": 5}], "stream_id": "s"}',
         "num_chunks True is not a non-negative integer"),
        ('{"records": [{"record_id": "a:b", "kind": "base", "num_chunks": 1, "num_bytes": 5}], "stream_id": "s"}',
         "record_id"),
        ('{"records": [{"record_id": "x", "kind": "base", "num_chunks": 1, "num_bytes": 5}], "stream_id": 7}',
         "field 'stream_id' must be str"),
        (b"\xff\xfe", "invalid JSON"),
    ],
)
def test_chain_invalid_json_rejected(text, fragment):
    with pytest.raises(InvalidChainError) as info:
        Chain.from_json(text)
    assert fragment in str(info.value)


async def test_chain_written_chains_validate(store, state_config):
    # A multi-chunk base as the snapshotter writes it must pass validation.
    snapshotter = StreamSnapshotter(store, state_config)
    state = cache_state(tokens_written=500, capacity=512, head_dim=64)
    chain, _ = await snapshotter.save(state, None, None)
    assert Chain.from_json(chain.to_json()) == chain
    assert (await store.read_head("s1")).latest == chain


# -- store ------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", sorted(DAMAGES))
async def test_store_damaged_head_raises_damaged(store, state_config, client, damage):
    name = damage_head(client, state_config.key_prefix, "s", damage)
    started = time.monotonic()
    with pytest.raises(DamagedHeadError) as info:
        await store.read_head("s")
    assert time.monotonic() - started < 5
    assert info.value.reason == "head"
    assert info.value.key == name
    assert await store.ping(), "a damaged key must not count as Redis unavailable"


async def test_store_head_of_other_stream_rejected(store, state_config, client):
    snapshotter = StreamSnapshotter(store, state_config)
    chain, _ = await snapshotter.save(cache_state("a"), None, None)
    client.hset(keys.head_key(state_config.key_prefix, "b"), "latest", chain.to_json())
    with pytest.raises(DamagedHeadError) as info:
        await store.read_head("b")
    assert "holds the chain of stream 'a'" in str(info.value)


async def test_store_forged_record_size_read_stops_early(store, state_config):
    # num_chunks fits num_bytes for 64 KiB chunks, but no such chunks exist.
    snapshotter = StreamSnapshotter(store, state_config)
    chain, _ = await snapshotter.save(cache_state(), None, None)
    real = chain.records[0]
    forged = type(real)(real.record_id, real.kind, num_chunks=10**10, num_bytes=10**10 * 64 * 1024)
    started = time.monotonic()
    with pytest.raises(SnapshotRejectedError) as info:
        await store.read_record("s1", forged)
    assert info.value.reason == "truncated"
    assert time.monotonic() - started < 5


async def test_store_chunk_of_wrong_type_rejected(store, state_config, client):
    snapshotter = StreamSnapshotter(store, state_config)
    chain, _ = await snapshotter.save(cache_state(), None, None)
    name = keys.chunk_key(state_config.key_prefix, "s1", chain.records[0].record_id, 0)
    client.delete(name)
    client.hset(name, "field", "value")
    with pytest.raises(SnapshotRejectedError) as info:
        await store.read_record("s1", chain.records[0])
    assert info.value.reason == "format"


async def test_store_delete_forged_record_size_stops_early(store, state_config):
    snapshotter = StreamSnapshotter(store, state_config)
    chain, _ = await snapshotter.save(cache_state(), None, None)
    real = chain.records[0]
    forged = type(real)(real.record_id, real.kind, num_chunks=10**10, num_bytes=10**10 * 64 * 1024)
    started = time.monotonic()
    assert await store._delete_records("s1", [forged]) == 1
    assert time.monotonic() - started < 5


# -- hooks: restore and the next checkpoints ----------------------------------------------


@pytest.mark.parametrize("damage", sorted(DAMAGES))
async def test_hooks_damaged_head_rejected_then_replaced(state_config, client, damage, caplog):
    writer, writer_stage = make_hooks(state_config)
    writer_stage.streams["s"] = cache_state("s", 10, seed=1)
    writer_stage.streams["other"] = cache_state("other", 12, seed=2)
    assert await writer.checkpoint(TP, {"s": 1, "other": 2}, 3)
    await writer.committed(TP, 3)
    head_before = await writer.store.read_head("s")
    old_record = head_before.latest.records[0].record_id
    name = damage_head(client, state_config.key_prefix, "s", damage)

    reader, reader_stage = make_hooks(state_config)
    await reader.on_assign([TP])
    rss_before = max_rss_mib()
    assert await asyncio.wait_for(reader.restore("s", TP), 10) is None
    assert max_rss_mib() - rss_before < 200, "a damaged head must not build a giant key list"
    assert reader.stats.rejected == {"head": 1}
    assert reader.stats.resets == 1, "a stage that cannot replay resets the stream"
    assert "s" not in reader_stage.streams
    assert await reader.restore("other", TP) == 2, "other streams restore as usual"

    # The stream starts empty; its next checkpoint replaces the damaged key with a base.
    reader_stage.streams["s"] = cache_state("s", 5, seed=3)
    caplog.set_level(logging.WARNING, logger="worker.state.snapshots")
    assert await asyncio.wait_for(reader.checkpoint(TP, {"s": 4}, 5), 10)
    await reader.committed(TP, 5)
    assert reader.stats.checkpoints_refused == 0
    assert reader._redis_down_since is None
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert any(name in message and "replacing the key" in message for message in warnings), warnings

    head = await reader.store.read_head("s")
    assert head.latest.last_offset == 4
    assert head.committed == head.latest, "commits continue after the replacement"
    chunk_names = client.keys(keys.stream_pattern(state_config.key_prefix, "s"))
    assert not [chunk for chunk in chunk_names if old_record.encode() in chunk], "old chunks must be deleted"

    # Later checkpoints write deltas on the new base, and a third worker restores them.
    reader_stage.streams["s"] = grow(reader_stage.streams["s"], 8, seed=4)
    assert await reader.checkpoint(TP, {"s": 6}, 7)
    third, third_stage = make_hooks(state_config)
    assert await third.restore("s", TP) == 6
    assert same_cache(third_stage.streams["s"], reader_stage.streams["s"])
    for hooks in (writer, reader, third):
        await hooks.close()


async def test_hooks_head_damaged_between_checkpoints(state_config, client):
    hooks, stage = make_hooks(state_config)
    stage.streams["s"] = cache_state("s", 10, seed=1)
    assert await hooks.checkpoint(TP, {"s": 1}, 2)
    await hooks.committed(TP, 2)
    damage_head(client, state_config.key_prefix, "s", "invalid_json")

    stage.streams["s"] = grow(stage.streams["s"], 12, seed=2)
    assert await hooks.checkpoint(TP, {"s": 2}, 3)
    await hooks.committed(TP, 3)
    stage.streams["s"] = grow(stage.streams["s"], 13, seed=3)
    assert await hooks.checkpoint(TP, {"s": 3}, 4)
    assert hooks.stats.checkpoints_refused == 0

    reader, reader_stage = make_hooks(state_config)
    assert await reader.restore("s", TP) == 3
    assert same_cache(reader_stage.streams["s"], stage.streams["s"])
    await hooks.close()
    await reader.close()


async def test_hooks_commit_mark_on_wrong_type_head(state_config, client):
    hooks, stage = make_hooks(state_config)
    stage.streams["s"] = cache_state("s", 10, seed=1)
    stage.streams["other"] = cache_state("other", 10, seed=2)
    assert await hooks.checkpoint(TP, {"s": 1, "other": 1}, 2)
    damage_head(client, state_config.key_prefix, "s", "wrong_type")

    await asyncio.wait_for(hooks.committed(TP, 2), 10)
    head = await hooks.store.read_head("other")
    assert head.committed == head.latest, "the other stream's commit mark must still be written"
    await hooks.close()


async def test_hooks_rejected_forged_chain_replaced(state_config, client):
    # A plausible but forged record passes validation; the restore rejects it as truncated and
    # the next checkpoint, which deletes that chain's records, finishes quickly.
    hooks, stage = make_hooks(state_config)
    stage.streams["s"] = cache_state("s", 10, seed=1)
    assert await hooks.checkpoint(TP, {"s": 1}, 2)
    chain = (await hooks.store.read_head("s")).latest
    forged = json.loads(chain.to_json())
    forged["records"][0].update(num_chunks=10**10, num_bytes=10**10 * 64 * 1024)
    client.hset(keys.head_key(state_config.key_prefix, "s"), "latest", json.dumps(forged))

    reader, reader_stage = make_hooks(state_config)
    assert await asyncio.wait_for(reader.restore("s", TP), 10) is None
    assert reader.stats.rejected == {"truncated": 1}
    reader_stage.streams["s"] = cache_state("s", 5, seed=2)
    assert await asyncio.wait_for(reader.checkpoint(TP, {"s": 3}, 4), 10)
    assert (await reader.store.read_head("s")).latest.last_offset == 3
    await hooks.close()
    await reader.close()


async def test_hooks_dropped_stream_with_damaged_head(state_config, client):
    hooks, stage = make_hooks(state_config)
    stage.streams["s"] = cache_state("s", 10)
    assert await hooks.checkpoint(TP, {"s": 1}, 2)
    damage_head(client, state_config.key_prefix, "s", "invalid_json")
    del stage.streams["s"]
    assert await hooks.checkpoint(TP, {"s": 2}, 3)
    assert client.keys(keys.stream_pattern(state_config.key_prefix, "s")) == []
    await hooks.close()


# -- sinkstream snapshots ----------------------------------------------------------------


def test_snapshots_ls_lists_past_damaged_keys(state_config, client, capsys):
    prefix = state_config.key_prefix
    write_snapshots(state_config, ["alpha", "omega", "red\x1b[31m\nline"])
    for stream_id, damage in [("bad-type", "wrong_type"), ("bad-json", "invalid_json"),
                              ("bad-field", "extra_field"), ("bad-chunks", "huge_num_chunks")]:
        damage_head(client, prefix, stream_id, damage)
    client.hset(f"{prefix}:snap:{{bad\xff}}:head".encode("latin-1"), "latest", "{}")
    client.hset(f"{prefix}:snap:{{raw}}:r:{{x}}:head", "latest", "{}")

    assert run_cli(state_config, "ls") == 2
    output = capsys.readouterr()
    lines = output.out.splitlines()
    assert "Traceback" not in output.err
    assert any(line.startswith("alpha ") for line in lines)
    assert any(line.startswith("omega ") for line in lines)
    assert any(line.startswith("'red\\x1b[31m\\nline' ") for line in lines), lines
    assert "\x1b" not in output.out
    damaged = {line.split()[0]: line for line in lines if "DAMAGED" in line}
    assert "is not a hash" in damaged["bad-type"]
    assert "invalid JSON" in damaged["bad-json"]
    assert "unknown field 'color'" in damaged["bad-field"]
    assert "num_chunks 100000000 cannot hold num_bytes 5" in damaged["bad-chunks"]
    foreign = [line for line in lines if line.startswith("key ")]
    assert len(foreign) == 2, lines
    assert any("not UTF-8" in line and "\\xff" in line for line in foreign), foreign
    assert any("not the head key of any stream id" in line for line in foreign), foreign
    assert lines[-1].startswith("3 streams, 6 damaged head keys"), lines[-1]


def test_snapshots_show_damaged_head(state_config, client, capsys):
    damage_head(client, state_config.key_prefix, "s", "invalid_json")
    assert run_cli(state_config, "show", "s") == 2
    output = capsys.readouterr()
    assert "DAMAGED head key" in output.out
    assert "invalid JSON" in output.out
    assert "Traceback" not in output.err


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_snapshots_rm_damaged_head(state_config, client, damage, capsys):
    prefix = state_config.key_prefix
    write_snapshots(state_config, ["s", "kept"])
    damage_head(client, prefix, "s", damage)
    # An unreferenced chunk, as a writer that crashed before its pointer switch leaves.
    client.set(keys.chunk_key(prefix, "s", "orphan", 0), b"x")

    started = time.monotonic()
    assert run_cli(state_config, "rm", "s") == 0
    assert time.monotonic() - started < 10
    assert "deleted the snapshot of stream 's'" in capsys.readouterr().out
    assert client.keys(keys.stream_pattern(prefix, "s")) == []
    assert client.keys(keys.stream_pattern(prefix, "kept")) != [], "rm must leave other streams alone"


def test_snapshots_rm_stream_with_glob_characters(state_config, client, capsys):
    prefix = state_config.key_prefix
    write_snapshots(state_config, ["a*", "ab", "a[b]"])
    assert run_cli(state_config, "rm", "a*") == 0
    assert client.keys(keys.stream_pattern(prefix, "a*")) == []
    assert client.keys(keys.stream_pattern(prefix, "ab")) != []
    assert client.keys(keys.stream_pattern(prefix, "a[b]")) != []


@pytest.mark.parametrize(
    "damage",
    [
        lambda client, name: client.set(name, "not a hash"),
        lambda client, name: client.hset(name, "covered_from", "twelve"),
        lambda client, name: client.hset(name, "covered_from", "-3"),
    ],
    ids=["wrong_type", "not_an_offset", "negative"],
)
async def test_store_damaged_marker_deleted_read_missing(store, state_config, client, damage, caplog):
    name = keys.partition_marker_key(state_config.key_prefix, "events", 2)
    damage(client, name)

    with caplog.at_level(logging.WARNING, logger="worker.state.store"):
        covered_from = await store.read_partition_marker("events", 2)

    assert covered_from is None
    assert client.exists(name) == 0
    warnings = [record.getMessage() for record in caplog.records if "checkpoint marker" in record.getMessage()]
    assert len(warnings) == 1, warnings
    assert "is damaged" in warnings[0]
    assert await store.create_partition_marker("events", 2, 7)
    assert await store.read_partition_marker("events", 2) == 7
