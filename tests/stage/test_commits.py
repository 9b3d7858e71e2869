"""Commit discipline: a slow head event holds the commit back and runs again after kill -9."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

from tests.stage.conftest import committed_offsets, consume, output_json, produce, running_worker, settings_env
from topology.schemas import HEADER_WORKER_ID

SLOW_TOKENS = 4000  # about 8 s of decoding with the tiny model on two cores (2 ms a token)


def start_worker_process(settings, log_path):
    env = dict(os.environ, **settings_env(settings))
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)


async def test_commit_slow_head_kill9_reprocessed(broker, stage_topics, make_settings, make_engine, tiny_model_dir,
                                                   tmp_path):
    settings = make_settings(engine={"model_path": str(tiny_model_dir)},
                             stage={"worker_id": "first", "max_new_tokens_limit": SLOW_TOKENS})
    slow = {"stream_id": "slow", "action": "generate", "text": "Tell me a long story.", "role": "user",
            "generate": {"max_new_tokens": SLOW_TOKENS}}
    records = [(b"slow", json.dumps(slow).encode(), None)]
    records += [(f"fast-{i}".encode(), f"short event {i}".encode(), None) for i in range(10)]
    await produce(broker.bootstrap_servers, stage_topics.events, records, partition_of=lambda key: 0)

    process = start_worker_process(settings, tmp_path / "worker.log")
    try:
        finished = await consume(broker.bootstrap_servers, stage_topics.outputs, 10, timeout_s=120)
        assert sorted(output_json(r)["source"]["offset"] for r in finished) == list(range(1, 11))
        await asyncio.sleep(1.0)  # five commit intervals pass while the head is still running
        committed = await committed_offsets(broker.bootstrap_servers, settings.kafka.group_id,
                                            stage_topics.events, 4)
        assert committed[0] in (None, 0), f"committed past the unfinished head: {committed}"
        assert process.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

    outputs_before = await consume(broker.bootstrap_servers, stage_topics.outputs, 10, timeout_s=5, idle_s=0.5)
    assert 0 not in [output_json(r)["source"]["offset"] for r in outputs_before], "the head finished before kill -9"

    settings = make_settings(stage={"worker_id": "second", "max_new_tokens_limit": SLOW_TOKENS})
    async with running_worker(settings, make_engine()):
        outputs = await consume(broker.bootstrap_servers, stage_topics.outputs, len(outputs_before) + 11,
                                timeout_s=180)
    second = [output_json(r) for r in outputs if dict(r.headers)[HEADER_WORKER_ID] == b"second"]
    assert [body["source"]["offset"] for body in second if body["stream_id"] == "slow"] == [0]
    assert second[[b["stream_id"] for b in second].index("slow")]["tokens"]["generated"] == SLOW_TOKENS
    # The later events were not committed either, so they ran again too (at-least-once).
    assert sorted(body["source"]["offset"] for body in second) == list(range(11))
    committed = await committed_offsets(broker.bootstrap_servers, settings.kafka.group_id, stage_topics.events, 4)
    assert committed[0] == 11


async def test_worker_sigterm_commits_and_exits_zero(broker, stage_topics, make_settings, tiny_model_dir, tmp_path):
    settings = make_settings(engine={"model_path": str(tiny_model_dir)}, checkpoint={"interval_s": 60})
    records = [(f"s{i % 3}".encode(), f"event {i}".encode(), None) for i in range(12)]
    await produce(broker.bootstrap_servers, stage_topics.events, records, partition_of=lambda key: 0)
    process = start_worker_process(settings, tmp_path / "worker.log")
    try:
        await consume(broker.bootstrap_servers, stage_topics.outputs, len(records), timeout_s=120)
        process.send_signal(signal.SIGTERM)
        return_code = await asyncio.to_thread(process.wait, 60)
    finally:
        if process.poll() is None:
            process.kill()
    log = (tmp_path / "worker.log").read_text()
    assert return_code == 0, log[-3000:]
    assert "stopped" in log
    # The commit interval is 60 s, so only the shutdown commit can have stored this offset.
    committed = await committed_offsets(broker.bootstrap_servers, settings.kafka.group_id, stage_topics.events, 4)
    assert committed[0] == len(records)


async def test_worker_full_queue_pauses_and_finishes(broker, stage_topics, make_settings, make_engine):
    settings = make_settings(stage={"queue_max_events": 4})
    records = [(f"s{i % 5}".encode(), f"event {i}".encode(), None) for i in range(60)]
    await produce(broker.bootstrap_servers, stage_topics.events, records)
    async with running_worker(settings, make_engine()) as worker:
        outputs = await consume(broker.bootstrap_servers, stage_topics.outputs, len(records), timeout_s=120)
    assert len(outputs) == len(records)
    assert worker.stats.max_not_done <= 4
    assert worker.stats.pauses > 0
