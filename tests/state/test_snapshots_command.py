"""``sinkstream snapshots ls|show|rm`` against a real redis-server."""

import asyncio

from tests.state.conftest import cache_state
from worker.cli import main
from worker.state import keys
from worker.state.snapshots import StreamSnapshotter
from worker.state.store import SnapshotStore


def write_snapshots(config, stream_ids):
    async def write():
        store = SnapshotStore(config)
        snapshotter = StreamSnapshotter(store, config)
        chains = {}
        for index, stream_id in enumerate(stream_ids):
            chains[stream_id], _ = await snapshotter.save(
                cache_state(stream_id, 10 + index), None, None, topic="events", partition=1, last_offset=index
            )
        await store.close()
        return chains

    return asyncio.run(write())


def run_cli(config, *args):
    return main(["snapshots", "--redis-url", config.redis_url, "--key-prefix", config.key_prefix, *args])


def test_snapshots_ls_show_rm(state_config, capsys):
    chains = write_snapshots(state_config, ["alpha", "beta"])

    assert run_cli(state_config, "ls") == 0
    listing = capsys.readouterr().out
    assert "alpha" in listing
    assert "beta" in listing
    assert "events[1]" in listing
    assert "2 streams" in listing

    assert run_cli(state_config, "show", "beta") == 0
    shown = capsys.readouterr().out
    assert "checksum ok" in shown
    assert "tiny-llama-test-0001" in shown
    assert '"window_tokens": 28' in shown

    assert run_cli(state_config, "rm", "alpha") == 0
    assert "deleted" in capsys.readouterr().out
    assert run_cli(state_config, "show", "alpha") == 1
    assert run_cli(state_config, "ls") == 0
    assert "1 streams" in capsys.readouterr().out
    assert chains["beta"].records


def test_snapshots_show_corrupted_reports_rejection(state_config, capsys):
    import redis

    chains = write_snapshots(state_config, ["gamma"])
    client = redis.Redis.from_url(state_config.redis_url)
    name = keys.chunk_key(state_config.key_prefix, "gamma", chains["gamma"].records[0].record_id, 0)
    value = bytearray(client.get(name))
    value[-20] ^= 0xFF
    client.set(name, bytes(value))
    client.close()

    assert run_cli(state_config, "show", "gamma") == 2
    assert "REJECTED (checksum)" in capsys.readouterr().out
