"""Run the real `sinkstream worker` command and scrape its endpoints.

The worker runs as a subprocess on the test broker and Redis with a tiny random-weight
model saved to disk, so the probes, the metric names and the shutdown path are the ones a
pod would see.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest_services import run_coroutine
from tests.operations.test_deploy import alert_exprs, dashboard_exprs, metric_names_in
from tests.stage.conftest import produce
from worker.devservices import free_port
from worker.metrics import METRIC_NAMES


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def samples(text: str) -> dict[str, float]:
    """Sum every sample of each name over its labels."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def wait_until(check, timeout_s: float, what: str, process: subprocess.Popen):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the worker exited with {process.returncode} while waiting for {what}"
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


async def create_topics(bootstrap_servers: str, names: list[str], partitions: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1) for name in names])
    finally:
        await admin.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    from tests.models import tiny_model

    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def worker_env(broker, redis_server, model_dir) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:8]
    events, outputs, dlq = (f"t-ops-{suffix}-{role}" for role in ("events", "outputs", "dlq"))
    run_coroutine(create_topics(broker.bootstrap_servers, [events, outputs, dlq], partitions=2))
    return {
        **os.environ,
        "SINKSTREAM_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "SINKSTREAM_KAFKA__GROUP_ID": f"ops-{suffix}",
        "SINKSTREAM_KAFKA__EVENTS_TOPIC": events,
        "SINKSTREAM_KAFKA__OUTPUTS_TOPIC": outputs,
        "SINKSTREAM_KAFKA__DLQ_TOPIC": dlq,
        "SINKSTREAM_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "SINKSTREAM_REDIS__URL": redis_server.url,
        "SINKSTREAM_REDIS__KEY_PREFIX": f"ops-{suffix}:",
        "SINKSTREAM_CHECKPOINT__STORE": "redis",
        "SINKSTREAM_CHECKPOINT__INTERVAL_S": "0.5",
        "SINKSTREAM_ENGINE__MODEL_PATH": str(model_dir),
        "SINKSTREAM_ENGINE__DTYPE": "float32",
        "SINKSTREAM_ENGINE__DEVICE": "cpu",
        "SINKSTREAM_ENGINE__WINDOW_TOKENS": "124",
        "SINKSTREAM_ENGINE__PREFILL_CHUNK_TOKENS": "64",
        "SINKSTREAM_ENGINE__MAX_RESIDENT_STREAMS": "4",
        "SINKSTREAM_ENGINE__MAX_BATCH_TOKENS": "256",
        "SINKSTREAM_STAGE__SHUTDOWN_GRACE_S": "10",
        "SINKSTREAM_METRICS__HOST": "127.0.0.1",
        "SINKSTREAM_METRICS__PORT": str(free_port()),
        "SINKSTREAM_METRICS__STUCK_AFTER_S": str(STUCK_AFTER_S),
        "HF_HUB_OFFLINE": "1",
    }


@dataclass
class WorkerRun:
    """What one run of the worker served, and how it ended."""

    scrape: str
    values: dict[str, float]
    idle_readyz: tuple[int, str]
    exit_code: int
    log: str

    def labelled(self, name: str, labels: dict[str, str]) -> float:
        for family in text_string_to_metric_families(self.scrape):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        raise AssertionError(f"{name}{labels} not served")


@pytest.fixture(scope="module")
def worker_run(worker_env, tmp_path_factory) -> WorkerRun:
    """Start `sinkstream worker`, wait for readiness, send three events, scrape, then SIGTERM."""
    url = f"http://127.0.0.1:{worker_env['SINKSTREAM_METRICS__PORT']}"
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker"], env=worker_env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_until(lambda: get(url + "/healthz")[0] == 200, 60, "/healthz", process)
        wait_until(lambda: get(url + "/startupz")[0] == 200, 120, "/startupz (model loaded)", process)
        wait_until(lambda: get(url + "/readyz")[0] == 200, 60, "/readyz (partitions assigned)", process)

        run_coroutine(produce(worker_env["SINKSTREAM_KAFKA__BOOTSTRAP_SERVERS"],
                              worker_env["SINKSTREAM_KAFKA__EVENTS_TOPIC"], EVENTS))

        def all_events_done() -> str | None:
            status, text = get(url + "/metrics")
            values = samples(text) if status == 200 else {}
            done = values.get("sinkstream_events_processed_total", 0) + values.get(
                "sinkstream_events_failed_total", 0)
            return text if done >= len(EVENTS) else None

        wait_until(all_events_done, 120, "three events processed", process)
        # A caught-up worker with nothing to do must stay ready past the stuck timeout. The
        # wait also spans several checkpoint intervals, so the scrape below includes snapshots.
        time.sleep(STUCK_AFTER_S + 2)
        idle_readyz = get(url + "/readyz")
        status, scrape = get(url + "/metrics")
        assert status == 200, scrape
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=30)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nworker log:\n{log_path.read_text()[-5000:]}") from exc
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    return WorkerRun(scrape, samples(scrape), idle_readyz, exit_code, log_path.read_text())


STUCK_AFTER_S = 3
GENERATE = {"stream_id": "s1", "action": "generate", "text": "Hello there", "role": "user",
            "generate": {"max_new_tokens": 3}}
WRONG_TYPE = {"stream_id": "s2", "action": "append", "text": 42}
EVENTS = [
    (b"s1", b"The first line of a stream.", None),
    (b"s1", json.dumps(GENERATE).encode(), None),
    (b"s2", json.dumps(WRONG_TYPE).encode(), None),  # dead-lettered
]


def test_worker_serves_dashboard_and_alert_metrics(worker_run):
    exposed = {s.name for f in text_string_to_metric_families(worker_run.scrape) for s in f.samples}
    for source, exprs in (("dashboard", dashboard_exprs()), ("alert rules", alert_exprs())):
        missing = metric_names_in(exprs) - exposed
        assert not missing, f"the {source} query metrics the worker does not serve: {sorted(missing)}"
    assert not set(METRIC_NAMES) - exposed, sorted(set(METRIC_NAMES) - exposed)


def test_worker_counts_events_and_steps(worker_run):
    values = worker_run.values
    assert values["sinkstream_events_consumed_total"] == len(EVENTS)
    assert values["sinkstream_events_processed_total"] == 2
    assert values["sinkstream_dead_letters_total"] == 1
    wrong_type = {"reason": "wrong_type"}
    assert worker_run.labelled("sinkstream_dead_letters_total", wrong_type) == 1
    assert worker_run.labelled("sinkstream_events_failed_total", wrong_type) == 1
    assert values["sinkstream_tokens_prefilled_total"] >= 1
    assert values["sinkstream_tokens_generated_total"] >= 1
    assert values["sinkstream_event_latency_seconds_count"] >= 1
    assert values["sinkstream_queue_wait_seconds_count"] >= 1
    assert values["sinkstream_engine_step_duration_seconds_count"] >= 1
    assert values["sinkstream_engine_batch_size_count"] >= 1


def test_worker_reports_health(worker_run):
    values = worker_run.values
    assert values["sinkstream_consumer_assigned_partitions"] == 2
    assert values["sinkstream_model_loaded"] == 1
    assert values["sinkstream_kafka_connected"] == 1
    assert values["sinkstream_ready"] == 1
    assert values["sinkstream_consumer_stuck"] == 0
    assert 'model_fingerprint="' in worker_run.scrape


def test_worker_idle_stays_ready(worker_run):
    status, reason = worker_run.idle_readyz
    assert status == 200, f"idle worker unready after {STUCK_AFTER_S + 2}s: {reason}"


def test_worker_exits_cleanly_on_sigterm(worker_run):
    assert worker_run.exit_code == 0, worker_run.log[-3000:]


def test_worker_snapshots_to_redis(worker_run):
    values = worker_run.values
    assert values["sinkstream_redis_connected"] == 1
    assert values["sinkstream_checkpoints_total"] >= 1
    assert values["sinkstream_snapshot_bytes_total"] > 0
    assert values["sinkstream_snapshot_duration_seconds_count"] >= 1


def test_worker_observes_generation_and_cache_metrics(worker_run):
    values = worker_run.values
    assert values["sinkstream_time_to_first_token_seconds_count"] >= 1
    assert values["sinkstream_inter_token_latency_seconds_count"] >= 1
    assert values["sinkstream_slot_utilization_ratio"] > 0
    assert values["sinkstream_streams_known"] >= 1
