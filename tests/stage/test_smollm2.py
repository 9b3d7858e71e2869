"""The real SmolLM2-135M-Instruct through the broker and the worker (slow)."""

from __future__ import annotations

import json

import pytest

from tests.stage.conftest import consume, output_json, produce, running_worker

QUESTIONS = {
    "chat-1": "What is the capital of France? Answer in one word.",
    "chat-2": "Name three colors of the rainbow.",
}


@pytest.mark.slow
async def test_smollm2_pipeline_matches_engine(broker, stage_topics, make_settings, smollm2_loaded):
    from worker.engine import EngineConfig, StreamEngine
    from worker.stage import messages

    config = dict(sink_tokens=4, window_tokens=508, prefill_chunk_tokens=128, max_resident_streams=4,
                  max_host_streams=4, max_batch_tokens=512)
    settings = make_settings(engine=config)
    records = []
    for stream_id, question in QUESTIONS.items():
        records.append((stream_id.encode(), b"A conversation about general knowledge.", None))
        body = {"stream_id": stream_id, "action": "generate", "role": "user", "text": question,
                "generate": {"max_new_tokens": 16}}
        records.append((stream_id.encode(), json.dumps(body).encode(), None))
    await produce(broker.bootstrap_servers, stage_topics.events, records)

    async with running_worker(settings, StreamEngine(smollm2_loaded, EngineConfig(**config))):
        outputs = [output_json(r) for r in await consume(broker.bootstrap_servers, stage_topics.outputs,
                                                         len(records), timeout_s=300)]
    assert len(outputs) == len(records)

    engine = StreamEngine(smollm2_loaded, EngineConfig(**config))
    limits = settings.stage.event_limits()
    for offset, (key, value, headers) in enumerate(records):
        engine.submit(messages.to_request(messages.parse_event(key, value, headers, "t", 0, offset, limits),
                                          f"e{offset}"))
    expected = {(r.stream_id, r.text) for r in engine.run_until_idle() if r.generated_tokens}
    replies = {(body["stream_id"], body["text"]) for body in outputs if body["action"] == "generate"}
    assert replies == expected
    paris = [text for stream_id, text in replies if stream_id == "chat-1"][0]
    assert "paris" in paris.lower()
