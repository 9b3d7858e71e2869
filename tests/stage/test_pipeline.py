"""End to end through the real broker: ordering, one output per event, engine-equal outputs."""

from __future__ import annotations

import json

from tests.stage.conftest import consume, output_json, produce, running_worker
from topology.partitioner import partition_for_stream
from topology.schemas import HEADER_IDEMPOTENCY_KEY


def mixed_events(num_streams: int, events_per_stream: int):
    """Interleaved raw and JSON events; every third event of a stream requests a reply."""
    records = []
    for index in range(events_per_stream):
        for stream in range(num_streams):
            stream_id = f"stream-{stream:02d}"
            text = f"Event {index} of {stream_id}: the tide turns at {stream * 7 + index} o'clock."
            if index % 3 == 2:
                value = {"stream_id": stream_id, "action": "generate", "text": text, "role": "user",
                         "generate": {"max_new_tokens": 6}}
                records.append((stream_id.encode(), json.dumps(value).encode(), None))
            elif index % 2 == 0:
                records.append((stream_id.encode(), text.encode(), None))
            else:
                value = {"stream_id": stream_id, "action": "append", "text": text}
                records.append((stream_id.encode(), json.dumps(value).encode(), None))
    return records


def engine_alone_results(make_engine, settings, records, topic, partition=0, request_id=None):
    """Run the same events through a fresh engine without Kafka; return its results per stream.

    ``records`` is a list of ``(key, value, headers)`` at offsets 0, 1, ... or a mapping
    from offset to such a triple. ``request_id(offset)`` names each request (default
    ``e<offset>``); seeded sampling draws from it, so pass the stage's ids to compare
    sampled replies.
    """
    from worker.stage import messages

    engine = make_engine()
    limits = settings.stage.event_limits()
    by_offset = sorted(records.items()) if isinstance(records, dict) else enumerate(records)
    for offset, (key, value, headers) in by_offset:
        event = messages.parse_event(key, value, headers, topic, partition, offset, limits,
                                     raw_action=settings.stage.raw_action)
        engine.submit(messages.to_request(event, request_id(offset) if request_id else f"e{offset}"))
    results: dict[str, list] = {}
    for result in engine.run_until_idle():
        results.setdefault(result.stream_id, []).append(result)
    return results


def engine_alone_outputs(make_engine, settings, records, topic, partition=0, request_id=None):
    """As ``engine_alone_results``, but only the texts."""
    results = engine_alone_results(make_engine, settings, records, topic, partition, request_id)
    return {stream_id: [result.text for result in stream] for stream_id, stream in results.items()}


async def test_pipeline_twenty_streams_outputs_match_engine(broker, stage_topics, make_settings, make_engine):
    settings = make_settings()
    records = mixed_events(num_streams=20, events_per_stream=6)
    await produce(broker.bootstrap_servers, stage_topics.events, records,
                  partition_of=lambda key: partition_for_stream(key.decode(), 4))
    async with running_worker(settings, make_engine()) as worker:
        outputs = await consume(broker.bootstrap_servers, stage_topics.outputs, len(records), timeout_s=120)
    assert len(outputs) == len(records)
    assert worker.stats.dead_letters == 0

    by_stream: dict[str, list[dict]] = {}
    for record in outputs:
        body = output_json(record)
        by_stream.setdefault(body["stream_id"], []).append(body)
        assert record.key == body["stream_id"].encode()
        assert dict(record.headers)[HEADER_IDEMPOTENCY_KEY] == body["idempotency_key"].encode()
    assert len(by_stream) == 20
    keys = [output_json(record)["idempotency_key"] for record in outputs]
    assert len(set(keys)) == len(records)  # exactly one output per event

    expected = engine_alone_outputs(make_engine, settings, records, stage_topics.events)
    for stream_id, bodies in by_stream.items():
        offsets = [body["source"]["offset"] for body in bodies]
        assert offsets == sorted(offsets), f"{stream_id} outputs out of offset order"
        assert [body["text"] for body in bodies] == expected[stream_id]
        generated = [body for body in bodies if body["action"] == "generate"]
        assert len(generated) == 2
        assert all(body["tokens"]["generated"] > 0 for body in generated)
