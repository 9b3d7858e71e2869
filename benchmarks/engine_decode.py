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
import os
import platform
import time
from dataclasses import replace

from worker.threads import configure_openmp_waiting

configure_openmp_waiting()  # the worker's OpenMP setting; libgomp reads it when torch loads

import torch  # noqa: E402

from worker.engine import EngineConfig, StreamEngine, load_model
from worker.engine.forward import ForwardItem
from worker.engine.layout import StreamLayout, plan_append
from worker.paths import default_model_dir


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_bandwidth(device: str, num_bytes: int = 2 << 30, repeats: int = 3) -> float:
    """Return the best read bandwidth in bytes/s of summing a large float32 tensor."""
    data = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        data.sum()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return num_bytes / best


def engine_stepper(loaded, num_streams: int, capacity: int):
    """Return a function that runs one decode step of ``num_streams`` full streams in the engine."""
    config = EngineConfig(sink_tokens=4, window_tokens=capacity - 4, prefill_chunk_tokens=64,
                          max_resident_streams=num_streams, max_batch_tokens=max(64, num_streams),
                          dtype=str(loaded.dtype).removeprefix("torch."), device=str(loaded.device))
    engine = StreamEngine(loaded, config)
    engine.pool.keys.normal_(0, 1)
    engine.pool.values.normal_(0, 1)
    layouts = [replace(StreamLayout(4, capacity - 4), sink_filled=4, window_count=capacity - 4,
                       tokens_cached_total=capacity) for _ in range(num_streams)]

    def one_step():
        items, plans = [], []
        for slot, layout in enumerate(layouts):
            plan = plan_append(layout, 1)
            items.append(ForwardItem.from_plan(slot, [42], plan))
            plans.append(plan)
        engine.forward(items)
        for slot, plan in enumerate(plans):
            layouts[slot] = plan.after

    return one_step, num_streams * engine.slot_bytes


def transformers_stepper(loaded, num_streams: int, capacity: int):
    """Return a function that runs one decode step of transformers with a DynamicCache of ``capacity`` tokens."""
    from transformers import DynamicCache

    model, spec = loaded.model, loaded.spec
    cache = DynamicCache(config=model.config)
    shape = (num_streams, spec.num_kv_heads, capacity, spec.head_dim)
    for layer in range(spec.num_layers):
        cache.update(torch.randn(shape, dtype=loaded.dtype, device=loaded.device),
                     torch.randn(shape, dtype=loaded.dtype, device=loaded.device), layer)
    input_ids = torch.full((num_streams, 1), 42, dtype=torch.long, device=loaded.device)
    position = [capacity]

    @torch.inference_mode()
    def one_step():
        positions = torch.full((num_streams, 1), position[0], dtype=torch.long, device=loaded.device)
        mask = torch.ones((num_streams, position[0] + 1), dtype=torch.long, device=loaded.device)
        model(input_ids=input_ids, past_key_values=cache, position_ids=positions, attention_mask=mask,
              use_cache=True)
        position[0] += 1

    return one_step


def timed(step, count: int, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(count):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / count


def compare(loaded, num_streams: int, capacity: int, steps: int, rounds: int) -> dict:
    """Time both sides in alternating rounds so that background load hits them alike; keep the best round."""
    ours, cache_bytes = engine_stepper(loaded, num_streams, capacity)
    theirs = transformers_stepper(loaded, num_streams, capacity)
    device = str(loaded.device)
    ours()
    theirs()
    ours_s, theirs_s = [], []
    for _ in range(rounds):
        ours_s.append(timed(ours, steps, device))
        theirs_s.append(timed(theirs, steps, device))
    best_ours, best_theirs = min(ours_s), min(theirs_s)
    return {"ours_step_s": best_ours, "theirs_step_s": best_theirs, "cache_bytes": cache_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--capacity", type=int, default=2048, help="cached tokens per stream (default 2048)")
    parser.add_argument("--steps", type=int, default=4, help="timed decode steps per round (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds per case (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--model", default=str(default_model_dir()))
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()

    bandwidth = measure_bandwidth(args.device)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, read bandwidth {bandwidth / 1e9:.1f} GB/s (sum of a 2 GiB tensor), "
          f"load average {os.getloadavg()[0]:.1f}")
    rows = []
    for dtype in args.dtype:
        loaded = load_model(args.model, dtype=dtype, device=args.device)
        for num_streams in args.streams:
            result = compare(loaded, num_streams, args.capacity, args.steps, args.rounds)
            cache_rate = result["cache_bytes"] / result["ours_step_s"]
            row = {
                "dtype": dtype, "streams": num_streams,
                "sinkstream_tokens_per_s": round(num_streams / result["ours_step_s"], 2),
                "transformers_tokens_per_s": round(num_streams / result["theirs_step_s"], 2),
                "ratio": round(result["theirs_step_s"] / result["ours_step_s"], 2),
                "cache_gb": round(result["cache_bytes"] / 1e9, 3),
                "cache_gb_per_s": round(cache_rate / 1e9, 2),
                "bandwidth_fraction": round(cache_rate / bandwidth, 2),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            summary = {"device": args.device, "load_average": os.getloadavg()[0],
                       "bandwidth_gb_per_s": bandwidth / 1e9, "rows": rows}
            json.dump(summary, handle, indent=2)


if __name__ == "__main__":
    main()
