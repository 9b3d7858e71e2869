"""Decode throughput of the engine against transformers' DynamicCache, same run.

Each stream starts with a full cache of ``capacity`` tokens (4 sinks + 2044 window by
default), so every decode step evicts one token per stream. Cache contents are random:
decode cost does not depend on them, and filling 32 x 2048 tokens through the model
would take minutes on a CPU. The baseline is transformers' own forward with a
``DynamicCache`` holding the same number of tokens per stream, batch = number of streams.

    python benchmarks/engine_decode.py --streams 1 8 32 --dtype float32 bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace

import torch

from worker.engine import EngineConfig, StreamEngine, load_model
from worker.engine.forward import ForwardItem
from worker.engine.layout import StreamLayout, plan_append, slot_positions
from worker.paths import default_model_dir


def measure_bandwidth(num_bytes: int = 2 << 30, repeats: int = 3) -> float:
    """Return the best read bandwidth in bytes/s of summing a large float32 tensor."""
    data = torch.ones(num_bytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return num_bytes / best


def engine_decode(loaded, num_streams: int, capacity: int, steps: int) -> dict:
    config = EngineConfig(sink_tokens=4, window_tokens=capacity - 4, prefill_chunk_tokens=64,
                          max_resident_streams=num_streams, max_batch_tokens=max(64, num_streams),
                          dtype=str(loaded.dtype).removeprefix("torch."))
    engine = StreamEngine(loaded, config)
    engine.pool.keys.normal_(0, 1)
    engine.pool.values.normal_(0, 1)
    layouts = [replace(StreamLayout(4, capacity - 4), sink_filled=4, window_count=capacity - 4,
                       tokens_cached_total=capacity) for _ in range(num_streams)]
    token = 42

    def one_step():
        items, plans = [], []
        for slot, layout in enumerate(layouts):
            plan = plan_append(layout, 1)
            items.append(ForwardItem(slot, [token], list(plan.write_slots), plan.start_position,
                                     slot_positions(plan.after)))
            plans.append(plan)
        logits = engine.forward(items)
        for slot, plan in enumerate(plans):
            layouts[slot] = plan.after
        return logits

    one_step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    elapsed = time.perf_counter() - start
    cache_bytes = num_streams * engine.slot_bytes
    return {"tokens_per_s": num_streams * steps / elapsed, "step_s": elapsed / steps,
            "cache_bytes": cache_bytes, "cache_bytes_per_s": cache_bytes * steps / elapsed}


@torch.inference_mode()
def transformers_decode(loaded, num_streams: int, capacity: int, steps: int) -> dict:
    from transformers import DynamicCache

    model, spec = loaded.model, loaded.spec
    cache = DynamicCache(config=model.config)
    shape = (num_streams, spec.num_kv_heads, capacity, spec.head_dim)
    for layer in range(spec.num_layers):
        cache.update(torch.randn(shape, dtype=loaded.dtype), torch.randn(shape, dtype=loaded.dtype), layer)
    input_ids = torch.full((num_streams, 1), 42, dtype=torch.long)

    def one_step(position: int):
        positions = torch.full((num_streams, 1), position, dtype=torch.long)
        mask = torch.ones((num_streams, position + 1), dtype=torch.long)
        return model(input_ids=input_ids, past_key_values=cache, position_ids=positions,
                     attention_mask=mask, use_cache=True).logits

    one_step(capacity)
    start = time.perf_counter()
    for step in range(steps):
        one_step(capacity + 1 + step)
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": num_streams * steps / elapsed, "step_s": elapsed / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--capacity", type=int, default=2048, help="cached tokens per stream (default 2048)")
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per case (default 8)")
    parser.add_argument("--model", default=str(default_model_dir()))
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()

    bandwidth = measure_bandwidth()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, read bandwidth {bandwidth / 1e9:.1f} GB/s (sum of a 2 GiB tensor)")
    rows = []
    for dtype in args.dtype:
        loaded = load_model(args.model, dtype=dtype)
        for num_streams in args.streams:
            ours = engine_decode(loaded, num_streams, args.capacity, args.steps)
            theirs = transformers_decode(loaded, num_streams, args.capacity, args.steps)
            row = {
                "dtype": dtype, "streams": num_streams,
                "sinkstream_tokens_per_s": round(ours["tokens_per_s"], 2),
                "transformers_tokens_per_s": round(theirs["tokens_per_s"], 2),
                "ratio": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2),
                "cache_gb": round(ours["cache_bytes"] / 1e9, 3),
                "cache_gb_per_s": round(ours["cache_bytes_per_s"] / 1e9, 2),
                "bandwidth_fraction": round(ours["cache_bytes_per_s"] / bandwidth, 2),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"bandwidth_gb_per_s": bandwidth / 1e9, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
