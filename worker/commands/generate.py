"""``sinkstream generate``: the engine alone on real text, many streams at once.

Each MT-Bench question is one stream; a stream's second turn is submitted once its first
reply is done. Replies print as they finish.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate", help="run the engine alone on MT-Bench conversations (or a text file) as concurrent streams"
    )
    parser.add_argument("--model", type=Path, default=None, help="model directory or .gguf (default: fetched SmolLM2)")
    parser.add_argument("--conversations", type=int, default=8,
                        help="MT-Bench conversations to run, 1 to 80 (default 8); each is one stream of two turns")
    parser.add_argument("--file", type=Path, default=None,
                        help="instead of MT-Bench, append this text file to one stream and continue it")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens per reply (default 48)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default 0)")
    parser.add_argument("--sink-tokens", type=int, default=4, help="attention sink tokens per stream (default 4)")
    parser.add_argument("--window-tokens", type=int, default=1020, help="window tokens per stream (default 1020)")
    parser.add_argument("--resident-streams", type=int, default=16, help="device cache slots (default 16)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--json-lines", action="store_true", help="print one JSON object per reply")
    parser.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from worker.engine import EngineConfig, GenerationParams, Request, StreamEngine, load_model
    from worker.exceptions import SinkstreamError
    from worker.paths import default_model_dir

    if not 1 <= args.conversations <= 80:
        print(f"error: --conversations {args.conversations} is out of range: use 1 to 80", file=sys.stderr)
        return 2
    try:
        params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        config = EngineConfig(
            sink_tokens=args.sink_tokens, window_tokens=args.window_tokens,
            prefill_chunk_tokens=min(256, args.window_tokens), max_resident_streams=args.resident_streams,
            max_host_streams=max(80, args.conversations), max_batch_tokens=512,
            dtype=args.dtype, device=args.device,
        )
        model_dir = args.model or default_model_dir()
        if args.model is None and not (model_dir / "config.json").exists():
            from worker.engine.fetch import fetch_default_model

            fetch_default_model()
        loaded = load_model(model_dir, dtype=args.dtype, device=args.device, capacity=config.capacity)
        engine = StreamEngine(loaded, config)
        conversations = _conversations(args)
    except SinkstreamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    started = time.monotonic()
    turns_left = {stream_id: list(turns) for stream_id, turns in conversations.items()}
    role = None if args.file is not None else "user"  # the model continues a file as text; MT-Bench turns are chat turns
    for stream_id, turns in turns_left.items():
        engine.submit(Request(stream_id, "turn-1", text=turns.pop(0), role=role, generate=params))
    num_replies = generated = 0
    while engine.has_work():
        for result in engine.step():
            num_replies += 1
            generated += result.generated_tokens
            _print_result(result, args.json_lines)
            if turns_left[result.stream_id]:
                engine.submit(Request(result.stream_id, "turn-2", text=turns_left[result.stream_id].pop(0),
                                      role=role, generate=params))
    elapsed = time.monotonic() - started
    print(f"{len(conversations)} streams, {num_replies} replies, {generated} tokens generated in {elapsed:.1f} s "
          f"({generated / elapsed:.1f} tokens/s)", file=sys.stderr)
    return 0


def _conversations(args: argparse.Namespace) -> dict[str, list[str]]:
    from worker.data import fetch_datasets

    if args.file is not None:
        try:
            text = args.file.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            from worker.exceptions import SinkstreamError

            raise SinkstreamError(f"cannot read --file {args.file}: {exc.strerror}") from exc
        return {args.file.stem: [text]}
    path = fetch_datasets(["mt-bench"])["mt-bench"]
    questions = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {f"mt-bench-{q['question_id']}": list(q["turns"]) for q in questions[: args.conversations]}


def _print_result(result, json_lines: bool) -> None:
    if json_lines:
        print(json.dumps({"stream_id": result.stream_id, "event_id": result.event_id, "text": result.text,
                          "finish_reason": result.finish_reason, "generated_tokens": result.generated_tokens,
                          "cached_tokens": result.cached_tokens, "error": result.error}), flush=True)
        return
    if result.error:
        print(f"[{result.stream_id} {result.event_id}] error: {result.error}", flush=True)
        return
    print(f"[{result.stream_id} {result.event_id}] ({result.finish_reason}, {result.generated_tokens} tokens, "
          f"{result.cached_tokens} cached) {result.text.strip()}", flush=True)
