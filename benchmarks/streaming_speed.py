"""Per-token cost of streaming against stream length, and of streaming against recompute.

Two measurements on SmolLM2-135M-Instruct, one token appended per timed call:

1. ``length``: a stream is fed up to each length in ``--lengths`` (fast-forwarded with
   events of ``--fill-event-tokens``), then ``--timed-tokens`` single-token appends are
   timed. The same is done for dense transformers decoding with a full KV cache for the
   lengths in ``--dense-lengths`` (dense stops at the first that fails, for example out
   of memory).
2. ``recompute``: for each cache size, the time to score one token by re-encoding the
   previous ``cache`` tokens, against one single-token streaming append with a full cache.

Results are printed as Markdown and written to ``<out>/streaming_speed.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import time
from pathlib import Path

from worker.threads import configure_openmp_waiting

configure_openmp_waiting()  # the worker's OpenMP setting; libgomp reads it when torch loads

import torch  # noqa: E402

from worker.data import dataset_path, fetch_datasets
from worker.engine import EngineConfig, StreamEngine
from worker.engine.models import load_model
from worker.evaluate.documents import read_text
from worker.paths import default_model_dir

logger = logging.getLogger("streaming_speed")


def token_source(tokenizer, max_chars: int) -> list[int]:
    fetch_datasets(["moby-dick"])
    return tokenizer.encode(read_text(dataset_path("moby-dick"))[:max_chars], add_special_tokens=False)


def cycled(token_ids: list[int], count: int, start: int = 0) -> list[int]:
    return list(itertools.islice(itertools.cycle(token_ids), start, start + count))


def time_streaming_at(loaded, token_ids, cache: int, length: int, fill_event: int, timed: int) -> dict:
    """Fill one stream to ``length`` tokens, then time ``timed`` single-token appends."""
    config = EngineConfig(sink_tokens=4, window_tokens=cache - 4, prefill_chunk_tokens=min(fill_event, cache - 4),
                          max_resident_streams=1, dtype=str(loaded.dtype).removeprefix("torch."),
                          device=str(loaded.device))
    engine = StreamEngine(loaded, config)
    fed, fill_started = 0, time.perf_counter()
    while fed < length:
        step = min(4096, length - fed)
        engine.score({"s": cycled(token_ids, step, fed)})
        fed += step
    fill_s = time.perf_counter() - fill_started
    durations = []
    for index in range(timed):
        started = time.perf_counter()
        engine.score({"s": cycled(token_ids, 1, fed + index)})
        durations.append(time.perf_counter() - started)
    return {"cache": cache, "length": length, "fill_s": round(fill_s, 1),
            "median_ms": round(1000 * statistics.median(durations), 2)}


@torch.inference_mode()
def time_dense_at(model, token_ids, length: int, timed: int, chunk: int = 512) -> dict:
    """Prefill ``length`` tokens into a transformers KV cache, then time single-token decoding."""
    past = None
    for start in range(0, length, chunk):
        piece = torch.tensor([cycled(token_ids, min(chunk, length - start), start)], device=model.device)
        past = model(input_ids=piece, past_key_values=past, use_cache=True).past_key_values
    durations = []
    for index in range(timed):
        piece = torch.tensor([cycled(token_ids, 1, length + index)], device=model.device)
        started = time.perf_counter()
        past = model(input_ids=piece, past_key_values=past, use_cache=True).past_key_values
        durations.append(time.perf_counter() - started)
    return {"length": length, "median_ms": round(1000 * statistics.median(durations), 2)}


@torch.inference_mode()
def time_recompute(model, token_ids, cache: int, timed: int) -> dict:
    durations = []
    for index in range(timed):
        context = torch.tensor([cycled(token_ids, cache, index)], device=model.device)
        started = time.perf_counter()
        model(input_ids=context, use_cache=False, logits_to_keep=1)
        durations.append(time.perf_counter() - started)
    return {"cache": cache, "median_ms": round(1000 * statistics.median(durations), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--parts", default="length,recompute", help="length, recompute or both")
    parser.add_argument("--lengths", default="4096,1048576", help="stream lengths for the streaming cost")
    parser.add_argument("--dense-lengths", default="4096,8192,16384", help="lengths for dense decoding")
    parser.add_argument("--caches", default="256,1024,2048", help="cache sizes for streaming against recompute")
    parser.add_argument("--fill-event-tokens", type=int, default=512, help="event size used to reach a length")
    parser.add_argument("--timed-tokens", type=int, default=20, help="single-token appends timed per point")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    loaded = load_model(args.model or default_model_dir(), device=args.device)
    token_ids = token_source(loaded.tokenizer, 400_000)
    results: dict = {"device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__}
    parts = set(args.parts.split(","))
    if "length" in parts:
        results["streaming_by_length"] = [
            time_streaming_at(loaded, token_ids, 1024, int(length), args.fill_event_tokens, args.timed_tokens)
            for length in args.lengths.split(",")
        ]
        results["dense_by_length"] = []
        for length in args.dense_lengths.split(","):
            try:
                results["dense_by_length"].append(time_dense_at(loaded.model, token_ids, int(length), args.timed_tokens))
            except (RuntimeError, MemoryError) as exc:  # out of memory ends the dense series
                results["dense_by_length"].append({"length": int(length), "error": str(exc)[:200]})
                break
    if "recompute" in parts:
        results["streaming_vs_recompute"] = []
        for cache in (int(value) for value in args.caches.split(",")):
            streaming = time_streaming_at(loaded, token_ids, cache, cache + 64, args.fill_event_tokens, args.timed_tokens)
            recompute = time_recompute(loaded.model, token_ids, cache, max(3, args.timed_tokens // 4))
            results["streaming_vs_recompute"].append({
                "cache": cache, "streaming_ms": streaming["median_ms"], "recompute_ms": recompute["median_ms"],
                "speedup": round(recompute["median_ms"] / streaming["median_ms"], 2),
            })
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "streaming_speed.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
