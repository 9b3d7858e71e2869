"""``sinkstream demo``: a local end-to-end run on real input, from a fresh machine.

Steps:

1. Fetch SmolLM2-135M-Instruct and the MT-Bench and Moby-Dick data sets if missing.
2. Start a Tansu broker and a redis-server on 127.0.0.1 (``worker.devservices``).
3. Create the events, outputs and dead-letter topics.
4. Start a worker in this process (engine in its own thread, as in ``sinkstream worker``).
5. Stream MT-Bench conversations as concurrent streams (a second turn is sent only after
   the first reply arrived) and Moby-Dick as one long document, chapter by chapter, with
   a generation request every few chapters. Print each output as it arrives.
6. Stop the worker and the services, and print a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

BOOK_STREAM_ID = "moby-dick"
BOOK_PROMPT = "In two sentences, what has happened in the story so far?"
MAX_PIECE_BYTES = 8_000  # a chapter is sent as paragraphs grouped into events of at most this size
NUM_PARTITIONS = 4
# A default run must finish in a few minutes on two CPU cores: all 80 MT-Bench
# conversations with 48-token replies and 4 chapters took 164 s on two idle cores.
DEFAULT_CONVERSATIONS = 80


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--conversations", type=int, default=DEFAULT_CONVERSATIONS,
                        help=f"MT-Bench conversations to stream, 1 to 80 (default {DEFAULT_CONVERSATIONS}, "
                        "the first ones by question id; 80 streams all of them)")
    parser.add_argument("--chapters", type=int, default=4,
                        help="Moby-Dick chapters to stream (default 4; 0 skips the book)")
    parser.add_argument("--whole-book", action="store_true", help="stream all 135 chapters of Moby-Dick")
    parser.add_argument("--generate-every", type=int, default=2,
                        help="ask about the book after every this many chapters (default 2)")
    parser.add_argument("--max-new-tokens", type=int, default=48,
                        help="tokens per reply (default 48)")
    parser.add_argument("--window-tokens", type=int, default=1020,
                        help="cache window per stream after the 4 sink tokens (default 1020)")
    parser.add_argument("--resident-streams", type=int, default=48,
                        help="cache slots in memory; other idle streams are parked on the host (default 48)")
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the fetched SmolLM2)")
    parser.add_argument("--checkpoint-store", choices=("redis", "none"), default="redis",
                        help="snapshot stream caches to the demo's Redis at each checkpoint (redis, the "
                        "default), or commit offsets without snapshots (none)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    parser.add_argument("--timeout-s", type=float, default=1800, help="give up after this many seconds")


@dataclass
class DemoProgress:
    """What the demo sent and received."""

    started: float = field(default_factory=time.monotonic)
    events_sent: int = 0
    expected_outputs: int = 0
    outputs: int = 0
    replies: int = 0
    dead_letters: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    evicted_by_stream: dict[str, int] = field(default_factory=dict)
    sent_at: dict[str, float] = field(default_factory=dict)  # idempotency key prefix -> send time
    reply_latencies_s: list[float] = field(default_factory=list)


def run_demo(args: argparse.Namespace) -> int:
    if not 1 <= args.conversations <= 80:
        print(f"--conversations {args.conversations} is out of range; use 1 to 80", file=sys.stderr)
        return 2
    model_dir, questions, book = _prepare(args)
    from worker.devservices import start_broker, start_redis

    broker = start_broker()
    redis = start_redis()
    try:
        return asyncio.run(_run(args, model_dir, questions, book, broker.bootstrap_servers, redis.url))
    except KeyboardInterrupt:
        print("interrupted; stopping the broker and Redis", file=sys.stderr)
        return 130
    finally:
        broker.stop()
        redis.stop()


def _prepare(args: argparse.Namespace) -> tuple[Path, list[dict], str]:
    """Step 1: make sure the model and the data sets are on disk."""
    from worker.data import fetch_datasets
    from worker.paths import default_model_dir

    model_dir = args.model or default_model_dir()
    if not (model_dir / "config.json").exists():
        from worker.engine.fetch import fetch_default_model

        print(f"fetching SmolLM2-135M-Instruct into {model_dir} ...", flush=True)
        fetch_default_model(model_dir)
    paths = fetch_datasets(["mt-bench", "moby-dick"])
    questions = [json.loads(line) for line in paths["mt-bench"].read_text().splitlines() if line.strip()]
    return model_dir, questions[: args.conversations], paths["moby-dick"].read_text()


def split_chapters(book: str) -> list[str]:
    """Split the book at its ``CHAPTER n.`` headings (the text before chapter 1 is dropped)."""
    parts = re.split(r"(?m)^(?=CHAPTER \d+\.)", book)
    return [part for part in parts if part.startswith("CHAPTER")]


def chapter_pieces(chapter: str) -> list[str]:
    """Group a chapter's paragraphs into pieces of at most MAX_PIECE_BYTES bytes."""
    pieces, current = [], ""
    for paragraph in re.split(r"\n\s*\n", chapter):
        candidate = f"{current}\n\n{paragraph}" if current else paragraph
        if current and len(candidate.encode()) > MAX_PIECE_BYTES:
            pieces.append(current + "\n\n")
            current = paragraph
        else:
            current = candidate
    if current:
        pieces.append(current + "\n\n")
    return pieces


async def _run(args, model_dir: Path, questions: list[dict], book: str, bootstrap: str, redis_url: str) -> int:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from topology.topics import TopicSpec, create_topics
    from worker.stage.app import run_worker
    from worker.stage.settings import load_settings

    run_id = uuid.uuid4().hex[:6]
    topics = {role: f"demo-{run_id}.{role}" for role in ("events", "outputs", "dlq")}
    await create_topics(bootstrap, [
        TopicSpec(name=topics["events"], partitions=NUM_PARTITIONS),
        TopicSpec(name=topics["outputs"], partitions=NUM_PARTITIONS),
        TopicSpec(name=topics["dlq"], partitions=1),
    ])
    settings = load_settings(values={
        "kafka": {"bootstrap_servers": bootstrap, "group_id": f"demo-{run_id}", "events_topic": topics["events"],
                  "outputs_topic": topics["outputs"], "dlq_topic": topics["dlq"]},
        "redis": {"url": redis_url},
        "checkpoint": {"store": args.checkpoint_store},
        "engine": {"model_path": str(model_dir), "window_tokens": args.window_tokens,
                   "max_resident_streams": args.resident_streams, "max_host_streams": 256,
                   # Small steps keep replies flowing while the book is prefilled alongside them.
                   "prefill_chunk_tokens": 128, "max_batch_tokens": 384},
        "stage": {"default_max_new_tokens": args.max_new_tokens,
                  "max_new_tokens_limit": max(1024, args.max_new_tokens), "queue_max_events": 256,
                  "shutdown_grace_s": 10},
        "metrics": {"port": 0},
    })
    print(f"broker {bootstrap}, redis {redis_url}, topics {topics['events']} -> {topics['outputs']}", flush=True)
    created: asyncio.Future = asyncio.get_running_loop().create_future()
    worker_task = asyncio.create_task(run_worker(settings, install_signal_handlers=False, created=created))

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, acks="all", linger_ms=5)
    consumer = AIOKafkaConsumer(topics["outputs"], topics["dlq"], bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", group_id=None)
    await producer.start()
    await consumer.start()
    progress = DemoProgress()
    chapters = split_chapters(book)
    chapters = chapters if args.whole_book else chapters[: args.chapters]
    try:
        await _send_first_turns(producer, topics["events"], questions, args, progress)
        book_task = asyncio.create_task(_send_book(producer, topics["events"], chapters, args, progress))
        await _read_outputs(consumer, producer, topics, questions, args, progress, worker_task, book_task)
        await book_task
    finally:
        await consumer.stop()
        await producer.stop()
        worker = await _stop_worker(worker_task, created)
    _print_summary(args, questions, chapters, progress, worker)
    if args.json is not None:
        args.json.write_text(json.dumps(_summary(args, progress, worker), indent=2) + "\n")
    return 0 if progress.outputs >= progress.expected_outputs and not progress.dead_letters else 1


async def _send(producer, topic: str, stream_id: str, body: dict, progress: DemoProgress) -> None:
    body = {"stream_id": stream_id, **body}
    await producer.send(topic, key=stream_id.encode(), value=json.dumps(body).encode())
    progress.events_sent += 1
    progress.expected_outputs += 1


async def _send_first_turns(producer, topic, questions, args, progress) -> None:
    for question in questions:
        stream_id = f"mt-bench-{question['question_id']}"
        progress.sent_at[f"{stream_id}#1"] = time.monotonic()
        await _send(producer, topic, stream_id, {"action": "generate", "role": "user", "text": question["turns"][0],
                                                 "generate": {"max_new_tokens": args.max_new_tokens}}, progress)
    await producer.flush()


async def _send_book(producer, topic, chapters: list[str], args, progress) -> None:
    for number, chapter in enumerate(chapters, start=1):
        for piece in chapter_pieces(chapter):
            await _send(producer, topic, BOOK_STREAM_ID, {"action": "append", "text": piece}, progress)
        if number % args.generate_every == 0 or number == len(chapters):
            progress.sent_at[f"{BOOK_STREAM_ID}#{number}"] = time.monotonic()
            await _send(producer, topic, BOOK_STREAM_ID, {
                "action": "generate", "role": "user", "text": BOOK_PROMPT, "event_id": f"after-chapter-{number}",
                "generate": {"max_new_tokens": args.max_new_tokens}}, progress)
        await producer.flush()
        await asyncio.sleep(0)


async def _read_outputs(consumer, producer, topics, questions, args, progress, worker_task, book_task) -> None:
    """Print outputs as they arrive and send each conversation's second turn after its first reply."""
    turns = {f"mt-bench-{question['question_id']}": question["turns"] for question in questions}
    answered: dict[str, int] = {}
    deadline = time.monotonic() + args.timeout_s
    while time.monotonic() < deadline:
        if worker_task.done():
            worker_task.result()  # re-raises the worker's failure
            return
        if book_task.done() and progress.outputs + progress.dead_letters >= progress.expected_outputs:
            return
        for tp, records in (await consumer.getmany(timeout_ms=200)).items():
            for record in records:
                if tp.topic == topics["dlq"]:
                    progress.dead_letters += 1
                    print(f"dead letter: {dict(record.headers)}", flush=True)
                    continue
                await _handle_output(json.loads(record.value), producer, topics["events"], turns, answered,
                                     args, progress)
    print(f"timed out after {args.timeout_s:.0f} s with {progress.outputs} of {progress.expected_outputs} outputs",
          file=sys.stderr)


async def _handle_output(body, producer, topic, turns, answered, args, progress) -> None:
    progress.outputs += 1
    stream_id = body["stream_id"]
    tokens = body["tokens"]
    progress.prompt_tokens += tokens["prompt"]
    progress.generated_tokens += tokens["generated"]
    progress.evicted_by_stream[stream_id] = tokens["evicted"]
    if body["action"] != "generate":
        return
    progress.replies += 1
    if stream_id == BOOK_STREAM_ID:
        chapter = body["event_id"].rsplit("-", 1)[-1]
        key = f"{stream_id}#{chapter}"
        label = f"{stream_id} after chapter {chapter} ({tokens['evicted']} tokens evicted so far)"
        question = BOOK_PROMPT
    else:
        turn = answered.get(stream_id, 0) + 1
        answered[stream_id] = turn
        key = f"{stream_id}#{turn}"
        label = f"{stream_id} turn {turn}"
        question = turns[stream_id][turn - 1] if turn <= len(turns[stream_id]) else ""
        if turn == 1:
            progress.sent_at[f"{stream_id}#2"] = time.monotonic()
            await _send(producer, topic, stream_id, {"action": "generate", "role": "user", "text": turns[stream_id][1],
                                                     "generate": {"max_new_tokens": args.max_new_tokens}}, progress)
    sent_at = progress.sent_at.pop(key, None)
    if sent_at is not None:
        progress.reply_latencies_s.append(time.monotonic() - sent_at)
    if not args.quiet:
        print(f"[{time.monotonic() - progress.started:6.1f}s] {label}\n"
              f"    asked:   {_one_line(question, 150)}\n"
              f"    replied: {_one_line(body['text'], 150)}", flush=True)


def _one_line(text: str, limit: int) -> str:
    """``text`` on one line, cut at ``limit`` characters with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


async def _stop_worker(worker_task: asyncio.Task, created: asyncio.Future):
    """Stop the in-process worker gracefully and return it (for its counters)."""
    if not worker_task.done() and created.done():
        created.result().request_stop()
    return await asyncio.wait_for(worker_task, 60)


def _summary(args, progress: DemoProgress, worker) -> dict:
    """Return the run's figures; ``worker_seconds`` runs from the first fetched event to the last output."""
    summary = {
        "checkpoint_store": args.checkpoint_store,
        "wall_seconds": time.monotonic() - progress.started,
        "events_sent": progress.events_sent,
        "outputs": progress.outputs,
        "dead_letters": progress.dead_letters,
        "prompt_tokens": progress.prompt_tokens,
        "generated_tokens": progress.generated_tokens,
    }
    stats = getattr(worker, "stats", None)
    if stats is not None and stats.first_fetch_at is not None and stats.last_output_at is not None:
        seconds = stats.last_output_at - stats.first_fetch_at
        summary["worker_seconds"] = seconds
        summary["tokens_per_s"] = (progress.prompt_tokens + progress.generated_tokens) / seconds
        summary["events_per_s"] = progress.outputs / seconds
    return summary


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _print_summary(args, questions, chapters, progress: DemoProgress, worker) -> None:
    elapsed = time.monotonic() - progress.started
    latencies = progress.reply_latencies_s
    print("\n== sinkstream demo summary ==")
    print(f"streams:         {len(questions)} MT-Bench conversations (of 80) + "
          f"{1 if chapters else 0} book stream ({len(chapters)} of 135 Moby-Dick chapters)")
    print(f"events:          {progress.events_sent} sent, {progress.outputs} outputs, "
          f"{progress.dead_letters} dead letters")
    print(f"tokens:          {progress.prompt_tokens} in, {progress.generated_tokens} generated, "
          f"{sum(progress.evicted_by_stream.values())} evicted "
          f"({progress.evicted_by_stream.get(BOOK_STREAM_ID, 0)} from the book stream)")
    print(f"throughput:      {progress.outputs / elapsed:.1f} events/s, "
          f"{progress.generated_tokens / elapsed:.1f} generated tokens/s, "
          f"{(progress.prompt_tokens + progress.generated_tokens) / elapsed:.0f} tokens/s in total")
    print(f"reply latency:   p50 {statistics.median(latencies) if latencies else float('nan'):.1f} s, "
          f"p99 {_percentile(latencies, 0.99):.1f} s over {len(latencies)} replies")
    print(f"wall time:       {elapsed:.0f} s (window {args.window_tokens} + 4 sink tokens per stream)")
    if worker is not None:
        print(f"worker:          {worker.stats.consumed} events consumed, fetching paused {worker.stats.pauses} times")
    hints = []
    if not args.whole_book:
        hints.append("--whole-book (or --chapters N)")
    if len(questions) < 80:
        hints.append("--conversations 80")
    if hints:
        print(f"enlarge with {' and '.join(hints)}")
