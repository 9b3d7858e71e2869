"""Measure snapshot sizes and times with the real model against a local redis-server.

Usage: python benchmarks/snapshot_bench.py [--dtype bfloat16] [--window 2044] [--events 24]

Fills one stream of SmolLM2-135M-Instruct with Moby-Dick text up to a full cache, then:

- measures raw Redis SET and GET throughput with values of ``chunk_max_bytes``;
- writes and reads a full base snapshot (bytes, encode, write, read, decode);
- appends ``--events`` events of ``--event-tokens`` tokens, checkpointing after each
  one, and reports the delta bytes and time per event;
- runs the same events on a second stream without snapshots and compares throughput
  (engine work plus snapshot work, without Kafka).

Prints one JSON object. Numbers depend on the machine; the script states the host's CPU
count and the torch thread count in its output.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import time
import uuid

import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", help="cache and compute dtype (default bfloat16)")
    parser.add_argument("--sinks", type=int, default=4, help="sink tokens (default 4)")
    parser.add_argument("--window", type=int, default=2044, help="window tokens (default 2044)")
    parser.add_argument("--events", type=int, default=24, help="events after the cache is full (default 24)")
    parser.add_argument("--event-tokens", type=int, default=48, help="tokens per event (default 48)")
    parser.add_argument("--chunk-mib", type=int, default=8, help="chunk_max_bytes in MiB (default 8)")
    parser.add_argument("--redis-mib", type=int, default=256, help="MiB moved by the raw Redis throughput test")
    return parser.parse_args()


async def redis_throughput(client, chunk_bytes: int, total_bytes: int) -> dict:
    payload = os.urandom(chunk_bytes)
    count = max(1, total_bytes // chunk_bytes)
    names = [f"bench:{uuid.uuid4().hex}:{index}" for index in range(count)]
    started = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.set(name, payload)
    await pipe.execute()
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.get(name)
    await pipe.execute()
    read_s = time.perf_counter() - started
    await client.delete(*names)
    return {
        "set_mb_per_s": round(count * chunk_bytes / write_s / 1e6, 1),
        "get_mb_per_s": round(count * chunk_bytes / read_s / 1e6, 1),
    }


def feed(engine, stream_id: str, token_ids: list[int], event_id: str) -> None:
    from worker.engine import Request

    chunk = engine.config.prefill_chunk_tokens
    for start in range(0, len(token_ids), chunk):
        engine.submit(Request(stream_id, f"{event_id}-{start}", token_ids=token_ids[start : start + chunk]))
    engine.run_until_idle()


class DirectStage:
    def __init__(self, engine) -> None:
        self.engine = engine

    async def export_stream(self, stream_id):
        return self.engine.export_stream(stream_id)

    async def import_stream(self, snapshot):
        self.engine.import_stream(snapshot)


async def run(args: argparse.Namespace) -> dict:
    from aiokafka.structs import TopicPartition

    from worker.devservices import start_redis
    from worker.engine import EngineConfig, StreamEngine, load_model
    from worker.paths import data_dir, default_model_dir
    from worker.state.config import StateConfig
    from worker.state.engine_adapter import build_state_hooks
    from worker.state.snapshots import StreamSnapshotter
    from worker.state.store import SnapshotStore

    redis_process = start_redis()
    try:
        config = StateConfig(redis_url=redis_process.url, key_prefix="bench", chunk_max_bytes=args.chunk_mib << 20)
        store = SnapshotStore(config)
        result: dict = {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "dtype": args.dtype,
            "capacity": args.sinks + args.window,
            "redis": await redis_throughput(store.client, config.chunk_max_bytes, args.redis_mib << 20),
        }

        loaded = load_model(default_model_dir(), dtype=args.dtype, capacity=args.sinks + args.window)
        engine_config = EngineConfig(sink_tokens=args.sinks, window_tokens=args.window, prefill_chunk_tokens=256,
                                     max_batch_tokens=256, max_resident_streams=2, max_host_streams=2,
                                     dtype=args.dtype)
        engine = StreamEngine(loaded, engine_config)
        text = (data_dir() / "moby-dick.txt").read_text()
        token_ids = loaded.tokenizer(text[:200_000])["input_ids"]
        fill = args.sinks + args.window
        events = [token_ids[fill + index * args.event_tokens : fill + (index + 1) * args.event_tokens]
                  for index in range(args.events)]

        started = time.perf_counter()
        feed(engine, "s", token_ids[:fill], "fill")
        result["fill_s"] = round(time.perf_counter() - started, 2)

        # Full base snapshot.
        hooks = build_state_hooks(config, engine)
        hooks.bind(DirectStage(engine))
        tp = TopicPartition("bench", 0)
        snapshotter = StreamSnapshotter(store, config)
        from worker.state.engine_adapter import to_cache_state

        state = to_cache_state(engine.export_stream("s"))
        chain, save = await snapshotter.save(state, None, None, last_offset=0)
        started = time.perf_counter()
        loaded_state = await snapshotter.load_chain(chain, loaded.fingerprint, engine.snapshot_config())
        restore_s = time.perf_counter() - started
        assert torch.equal(loaded_state.keys, state.keys)
        result["base"] = {
            "raw_bytes": save.raw_bytes,
            "stored_bytes": save.stored_bytes,
            "codecs": save.codecs,
            "encode_s": round(save.encode_s, 3),
            "write_s": round(save.write_s, 3),
            "read_and_decode_s": round(restore_s, 3),
        }
        no_compression = config.model_copy(update={"compression": "none"})
        raw_state = dataclasses.replace(state, stream_id="s-uncompressed")
        _, raw_save = await StreamSnapshotter(store, no_compression).save(raw_state, None, None, last_offset=0)
        result["base_uncompressed"] = {"stored_bytes": raw_save.stored_bytes, "encode_s": round(raw_save.encode_s, 3),
                                       "write_s": round(raw_save.write_s, 3)}
        await store.delete_stream("s")
        await store.delete_stream("s-uncompressed")

        # Events with a checkpoint after each, against the same events without snapshots.
        await hooks.on_assign([tp])
        assert await hooks.checkpoint(tp, {"s": 0}, 1)
        reference = StreamEngine(loaded, engine_config)
        reference.import_stream(engine.export_stream("s"))

        with_snapshots, checkpoint_times, delta_bytes = [], [], []
        for index, event in enumerate(events, start=1):
            started = time.perf_counter()
            feed(engine, "s", event, f"e{index}")
            engine_s = time.perf_counter() - started
            before = hooks.stats.bytes_written
            started = time.perf_counter()
            assert await hooks.checkpoint(tp, {"s": index}, index + 1)
            await hooks.committed(tp, index + 1)
            checkpoint_s = time.perf_counter() - started
            with_snapshots.append(engine_s + checkpoint_s)
            checkpoint_times.append(checkpoint_s)
            delta_bytes.append(hooks.stats.bytes_written - before)
        without_snapshots = []
        for index, event in enumerate(events, start=1):
            started = time.perf_counter()
            feed(reference, "s", event, f"e{index}")
            without_snapshots.append(time.perf_counter() - started)

        result["per_event"] = {
            "event_tokens": args.event_tokens,
            "snapshot_bytes_median": int(statistics.median(delta_bytes)),
            "snapshot_bytes_max": max(delta_bytes),
            "bases_written": hooks.stats.bases_written,
            "checkpoint_s_median": round(statistics.median(checkpoint_times), 4),
            "engine_s_median": round(statistics.median(without_snapshots), 4),
            "events_per_s_without_snapshots": round(len(events) / sum(without_snapshots), 2),
            "events_per_s_checkpoint_every_event": round(len(events) / sum(with_snapshots), 2),
        }
        await hooks.close()
        await store.close()
        return result
    finally:
        redis_process.stop()


def main() -> None:
    args = parse_args()
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
