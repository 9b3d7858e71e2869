"""Pipeline throughput: broker + worker against the engine alone, on the same workload in one run.

Workload: ``--streams`` streams, each with ``--events`` events. Every event appends one
Moby-Dick paragraph group (about ``--event-tokens`` tokens); every ``--generate-every``-th
event also requests a greedy reply of ``--new-tokens`` tokens.

1. Engine alone: submit every request to a fresh engine and step until idle.
2. Pipeline: produce the same events to a local Tansu broker, run a worker with a fresh
   engine over the same loaded model, and wait until every output is acknowledged.
   The clock runs from the first fetched record to the last acknowledged output, so the
   consumer group join is not counted.

Prints events/s, generated tokens/s, the pipeline/engine ratio and the event-to-output
latency percentiles, and writes them as JSON with ``--json``.

    python benchmarks/pipeline_throughput.py                 # SmolLM2-135M-Instruct
    python benchmarks/pipeline_throughput.py --tiny          # tiny random model (smoke test)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.threads import configure_openmp_waiting  # noqa: E402

configure_openmp_waiting()  # the worker's OpenMP setting; libgomp reads it when torch loads


def build_workload(args) -> list[tuple[bytes, bytes]]:
    """Return (key, value) records, interleaved across streams."""
    from worker.data import fetch_datasets

    book = fetch_datasets(["moby-dick"])["moby-dick"].read_text()
    paragraphs = [p.strip() for p in book.split("\n\n") if len(p.strip()) > 200]
    chars = args.event_tokens * 4  # about 4 characters per token for English text
    records = []
    cursor = 0
    for index in range(args.events):
        for stream in range(args.streams):
            text = ""
            while len(text) < chars:
                text += paragraphs[cursor % len(paragraphs)] + "\n\n"
                cursor += 1
            text = text[:chars]
            stream_id = f"bench-{stream:03d}"
            body = {"stream_id": stream_id, "action": "append", "text": text}
            if (index + 1) % args.generate_every == 0:
                body.update(action="generate", generate={"max_new_tokens": args.new_tokens})
            records.append((stream_id.encode(), json.dumps(body).encode()))
    return records


def make_engine(args, loaded):
    from worker.engine import EngineConfig, StreamEngine

    return StreamEngine(loaded, EngineConfig(**engine_config(args)))


def engine_config(args) -> dict:
    return dict(sink_tokens=4, window_tokens=args.window_tokens, prefill_chunk_tokens=args.chunk_tokens,
                max_resident_streams=args.streams, max_host_streams=args.streams, max_batch_tokens=args.batch_tokens)


def load(args):
    from worker.engine import load_from_model, load_model

    if args.tiny:
        from tests.models import load_tokenizer, tiny_model

        return load_from_model(tiny_model("llama", max_position_embeddings=4096), load_tokenizer())
    from worker.paths import default_model_dir

    return load_model(args.model or default_model_dir(), dtype="float32")


def run_engine_alone(args, loaded, records) -> dict:
    """Run the workload on a fresh engine in a dedicated thread, as the worker runs its engine.

    In one measurement on two busy shared cores (torch 2.13 CPU), the same steps ran ten
    times slower in the main thread than in a fresh thread. The cause is not known, so both
    sides of the comparison use the same kind of thread.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as executor:
        return executor.submit(_engine_alone, args, loaded, records).result()


def _engine_alone(args, loaded, records) -> dict:
    from topology.schemas import EventLimits, parse_event
    from worker.stage import messages

    engine = make_engine(args, loaded)
    limits = EventLimits(max_event_bytes=1_000_000, max_new_tokens=args.new_tokens,
                         default_max_new_tokens=args.new_tokens)
    started = time.monotonic()
    for offset, (key, value) in enumerate(records):
        event = parse_event(key, value, None, "bench", 0, offset, limits)
        engine.submit(messages.to_request(event, f"e{offset}"))
    results = engine.run_until_idle()
    elapsed = time.monotonic() - started
    generated = sum(result.generated_tokens for result in results)
    return {"events": len(results), "seconds": elapsed, "events_per_s": len(results) / elapsed,
            "generated_tokens": generated, "generated_tokens_per_s": generated / elapsed}


async def run_pipeline(args, loaded, records, broker) -> dict:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from topology.topics import TopicSpec, create_topics
    from worker.stage.settings import load_settings
    from worker.stage.worker import StageWorker

    run_id = uuid.uuid4().hex[:6]
    topics = {role: f"bench-{run_id}.{role}" for role in ("events", "outputs", "dlq")}
    await create_topics(broker.bootstrap_servers, [TopicSpec(name=topics["events"], partitions=4),
                                                   TopicSpec(name=topics["outputs"], partitions=4),
                                                   TopicSpec(name=topics["dlq"], partitions=1)])
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, enable_idempotence=False,
                                acks="all", linger_ms=5)
    await producer.start()
    for key, value in records:
        await producer.send(topics["events"], key=key, value=value)
    await producer.stop()
    settings = load_settings(values={
        "kafka": {"bootstrap_servers": broker.bootstrap_servers, "group_id": f"bench-{run_id}",
                  "events_topic": topics["events"], "outputs_topic": topics["outputs"],
                  "dlq_topic": topics["dlq"]},
        "stage": {"max_event_bytes": 1_000_000, "max_new_tokens_limit": args.new_tokens,
                  "default_max_new_tokens": args.new_tokens, "queue_max_events": args.queue_events},
        "metrics": {"port": 0},
    })
    worker = StageWorker(settings, make_engine(args, loaded))
    task = asyncio.create_task(worker.run())
    consumer = AIOKafkaConsumer(topics["outputs"], bootstrap_servers=broker.bootstrap_servers,
                                auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    generated = outputs = 0
    while outputs < len(records):
        for batch in (await consumer.getmany(timeout_ms=200)).values():
            for record in batch:
                outputs += 1
                generated += json.loads(record.value)["tokens"]["generated"]
        if task.done():
            task.result()
            break
    await consumer.stop()
    worker.request_stop()
    await task
    stats = worker.stats
    elapsed = stats.last_output_at - stats.first_fetch_at
    latencies = sorted(stats.latencies_s)
    return {"events": outputs, "seconds": elapsed, "events_per_s": outputs / elapsed,
            "generated_tokens": generated, "generated_tokens_per_s": generated / elapsed,
            "latency_p50_s": statistics.median(latencies),
            "latency_p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--events", type=int, default=6, help="events per stream")
    parser.add_argument("--event-tokens", type=int, default=128, help="approximate tokens appended per event")
    parser.add_argument("--generate-every", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--window-tokens", type=int, default=508)
    parser.add_argument("--chunk-tokens", type=int, default=128)
    parser.add_argument("--batch-tokens", type=int, default=512)
    parser.add_argument("--queue-events", type=int, default=256)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="use a tiny random-weight model")
    parser.add_argument("--repeats", type=int, default=2, help="engine-alone + pipeline pairs to run")
    parser.add_argument("--json", type=Path, default=None, help="write the results to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    records = build_workload(args)
    loaded = load(args)
    print(f"workload: {args.streams} streams x {args.events} events ({len(records)} events), "
          f"~{args.event_tokens} tokens each, a {args.new_tokens}-token reply every {args.generate_every}; "
          f"torch threads {torch.get_num_threads()}", flush=True)
    from worker.devservices import start_broker

    # Warm up: the first forward passes of a process are slower (allocator, kernels).
    run_engine_alone(args, loaded, records[: args.streams])
    broker = start_broker()
    runs = []
    try:
        for repeat in range(args.repeats):
            engine = run_engine_alone(args, loaded, records)
            pipeline = asyncio.run(run_pipeline(args, loaded, records, broker))
            ratio = pipeline["events_per_s"] / engine["events_per_s"]
            runs.append({"engine": engine, "pipeline": pipeline, "ratio": ratio})
            print(f"run {repeat + 1}: engine alone {engine['events_per_s']:.2f} events/s, "
                  f"{engine['generated_tokens_per_s']:.1f} generated tokens/s ({engine['seconds']:.1f} s); "
                  f"pipeline {pipeline['events_per_s']:.2f} events/s, {pipeline['generated_tokens_per_s']:.1f} "
                  f"generated tokens/s ({pipeline['seconds']:.1f} s); ratio {ratio:.3f}; latency p50 "
                  f"{pipeline['latency_p50_s']:.2f} s, p99 {pipeline['latency_p99_s']:.2f} s", flush=True)
    finally:
        broker.stop()
    ratio = statistics.median(run["ratio"] for run in runs)
    print(f"median ratio pipeline/engine: {ratio:.3f} over {len(runs)} runs "
          "(latency counts from fetch; every event was waiting in the topic at start)")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "median_ratio": ratio,
                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))
    return 0 if ratio >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
