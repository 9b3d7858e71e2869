"""Settings errors of the command line: exit status 2 and one ``error:`` line naming the value and the fix.

Every worker command here also points the model path at a missing directory, the broker
at a closed port and turns the metrics server off. So a check that is missing fails the
test quickly with another message, instead of loading the model or serving.
"""

from __future__ import annotations

import argparse
import math
import os

import pytest

from worker.cli import build_parser, main
from worker.exceptions import ConfigError
from worker.logconfig import configure_logging
from worker.stage.settings import (
    WorkerSettings,
    check_environment_names,
    check_files_exist,
    load_settings,
)
from worker.state.config import StateConfig

SAFE_WORKER_FLAGS = (
    "--engine.model-path", "/nonexistent/sinkstream-model",
    "--kafka.bootstrap-servers", "127.0.0.1:1",
    "--metrics.port", "0",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.upper().startswith("SINKSTREAM_"):
            monkeypatch.delenv(name)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    exit_code = main(list(argv))
    return exit_code, capsys.readouterr().err


def run_worker(capsys, *flags: str) -> tuple[int, str]:
    return run_cli(capsys, "worker", *flags, *SAFE_WORKER_FLAGS)


def assert_one_error(stderr: str) -> None:
    assert stderr.startswith("error: "), stderr
    assert "Traceback" not in stderr


# --- values the worker used to accept until after the model had loaded


def test_worker_device_tpu_rejected(capsys):
    exit_code, stderr = run_worker(capsys, "--engine.device", "tpu:7")

    assert exit_code == 2
    assert_one_error(stderr)
    assert "engine.device='tpu:7'" in stderr
    assert "cpu, cuda or cuda:N" in stderr


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CPU", "cpu:0:1"])
def test_worker_device_pattern_rejected(device):
    with pytest.raises(ConfigError, match="cpu, cuda or cuda:N"):
        load_settings(values={"engine": {"device": device}})


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:12"])
def test_worker_device_pattern_accepted(device):
    assert load_settings(values={"engine": {"device": device}}).engine.device == device


def test_worker_cuda_without_gpu_rejected(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    exit_code, stderr = run_worker(capsys, "--engine.device", "cuda:0")

    assert exit_code == 2
    assert_one_error(stderr)
    assert "engine.device='cuda:0': CUDA is not available" in stderr


def test_check_device_index_beyond_count(monkeypatch):
    import torch

    from worker.commands.stage import check_device

    # Report one GPU, so that the index check runs on a machine without one.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    with pytest.raises(ConfigError, match=r"engine.device='cuda:3': this machine has 1 CUDA device\(s\)"):
        check_device("cuda:3")
    check_device("cuda:0")
    check_device("cuda")
    check_device("cpu")


def test_worker_redis_http_url_rejected(capsys):
    exit_code, stderr = run_worker(capsys, "--redis.url", "http://x")

    assert exit_code == 2
    assert_one_error(stderr)
    assert "redis.url='http://x'" in stderr
    assert "redis://" in stderr


def test_worker_redis_url_password_hidden(capsys):
    exit_code, stderr = run_worker(capsys, "--redis.url", "http://user:hunter2-secret@redis.example:abc/0")

    assert exit_code == 2
    assert "hunter2-secret" not in stderr
    assert "redis.url='http://user:***@redis.example:abc/0'" in stderr


def test_worker_redis_bad_port_rejected():
    with pytest.raises(ConfigError, match="port is invalid"):
        load_settings(values={"redis": {"url": "redis://127.0.0.1:port/0"}})


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://redis.example:6380/1", "unix:///tmp/r.sock"])
def test_worker_redis_url_schemes_accepted(url):
    assert load_settings(values={"redis": {"url": url}}).redis.url == url


def test_worker_key_prefix_brace_rejected(capsys):
    exit_code, stderr = run_worker(capsys, "--redis.key-prefix", "a{b}")

    assert exit_code == 2
    assert_one_error(stderr)
    assert "redis.key_prefix='a{b}'" in stderr
    assert "without them" in stderr


@pytest.mark.parametrize("prefix", ["", ":", "::"])
def test_worker_key_prefix_empty_rejected(capsys, prefix):
    exit_code, stderr = run_worker(capsys, "--redis.key-prefix", prefix)

    assert exit_code == 2
    assert_one_error(stderr)
    assert f"redis.key_prefix={prefix!r}" in stderr
    assert "prefix is empty" in stderr


def test_worker_key_prefix_passes_state_config():
    # The snapshot store receives the prefix without its trailing colons.
    settings = load_settings(values={"redis": {"key_prefix": "prod:sinkstream:"}})
    state = StateConfig(key_prefix=settings.redis.key_prefix.rstrip(":"))

    assert state.key_prefix == "prod:sinkstream"


def test_worker_ca_without_tls_rejected():
    with pytest.raises(ConfigError, match="redis.tls true or use a rediss:// URL"):
        load_settings(values={"redis": {"ssl_ca_certs": "/etc/ca.pem"}})


def test_worker_tls_on_unix_socket_rejected():
    with pytest.raises(ConfigError, match="unix:// socket has no TLS"):
        load_settings(values={"redis": {"url": "unix:///tmp/r.sock", "tls": True}})


# --- files named by TLS settings


def test_worker_missing_redis_ca_rejected(capsys, tmp_path):
    missing = tmp_path / "nonexistent.pem"
    exit_code, stderr = run_worker(capsys, "--redis.tls", "true", "--redis.ssl-ca-certs", str(missing))

    assert exit_code == 2
    assert_one_error(stderr)
    assert f"redis.ssl_ca_certs '{missing}'" in stderr


def test_worker_missing_kafka_files_rejected(capsys, tmp_path, monkeypatch):
    ca = tmp_path / "ca.pem"
    ca.write_text("placeholder, only its existence is checked\n")
    monkeypatch.setenv("SINKSTREAM_KAFKA__SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("SINKSTREAM_KAFKA__SSL_CAFILE", str(ca))
    monkeypatch.setenv("SINKSTREAM_KAFKA__SSL_CERTFILE", str(tmp_path / "client.pem"))
    monkeypatch.setenv("SINKSTREAM_KAFKA__SSL_KEYFILE", str(tmp_path / "client.key"))
    exit_code, stderr = run_worker(capsys)

    assert exit_code == 2
    assert_one_error(stderr)
    assert "kafka.ssl_certfile" in stderr
    assert "client.pem" in stderr
    assert "kafka.ssl_keyfile" in stderr
    assert "client.key" in stderr
    assert "kafka.ssl_cafile" not in stderr


def test_worker_existing_files_accepted(tmp_path):
    for name in ("ca.pem", "client.pem", "client.key", "redis-ca.pem"):
        (tmp_path / name).write_text("placeholder\n")
    settings = load_settings(values={
        "kafka": {"security_protocol": "SSL", "ssl_cafile": tmp_path / "ca.pem",
                  "ssl_certfile": tmp_path / "client.pem", "ssl_keyfile": tmp_path / "client.key"},
        "redis": {"tls": True, "ssl_ca_certs": tmp_path / "redis-ca.pem"},
    })

    check_files_exist(settings)


# --- the environment


def test_worker_section_json_invalid(capsys, monkeypatch):
    monkeypatch.setenv("SINKSTREAM_ENGINE", "{bad hunter2-secret")
    exit_code, stderr = run_worker(capsys)

    assert exit_code == 2
    assert_one_error(stderr)
    assert "SINKSTREAM_ENGINE is not valid JSON" in stderr
    assert "SINKSTREAM_ENGINE__<FIELD>" in stderr
    assert "hunter2-secret" not in stderr


def test_worker_section_json_accepted(monkeypatch):
    monkeypatch.setenv("SINKSTREAM_ENGINE", '{"window_tokens": 100}')

    assert load_settings().engine.window_tokens == 100


def test_route_section_json_invalid(capsys, monkeypatch):
    monkeypatch.setenv("SINKSTREAM_ROUTER", "{x")
    monkeypatch.setenv("SINKSTREAM_ENGINE", "{a worker section, which the router does not read")
    exit_code, stderr = run_cli(capsys, "route", "--bootstrap-servers", "127.0.0.1:1")

    assert exit_code == 2
    assert_one_error(stderr)
    assert "SINKSTREAM_ROUTER is not valid JSON" in stderr
    assert "SINKSTREAM_ENGINE" not in stderr


def test_topics_nested_json_invalid(capsys, monkeypatch):
    monkeypatch.setenv("SINKSTREAM_TOPICS__EVENTS", "{x")
    exit_code, stderr = run_cli(capsys, "topics", "create", "--bootstrap-servers", "127.0.0.1:1")

    assert exit_code == 2
    assert_one_error(stderr)
    assert "SINKSTREAM_TOPICS__EVENTS is not valid JSON" in stderr
    assert "SINKSTREAM_TOPICS__EVENTS__<FIELD>" in stderr


def test_worker_unknown_section_rejected(capsys, monkeypatch):
    monkeypatch.setenv("SINKSTREAM_ENGIN__WINDOW_TOKENS", "10")
    exit_code, stderr = run_worker(capsys)

    assert exit_code == 2
    assert_one_error(stderr)
    assert "unknown environment variable SINKSTREAM_ENGIN__WINDOW_TOKENS" in stderr
    assert "SINKSTREAM_ENGINE__<FIELD>" in stderr
    assert "SINKSTREAM_ROUTER__<FIELD>" in stderr


def test_route_unknown_section_rejected(capsys, monkeypatch):
    monkeypatch.setenv("SINKSTREAM_ROUTR__WEB_PORT", "8080")
    exit_code, stderr = run_cli(capsys, "route", "--bootstrap-servers", "127.0.0.1:1")

    assert exit_code == 2
    assert_one_error(stderr)
    assert "SINKSTREAM_ROUTR__WEB_PORT" in stderr


@pytest.mark.parametrize("name", [
    "SINKSTREAM_HOME", "SINKSTREAM_CONFIG", "SINKSTREAM_MODELS_DIR", "SINKSTREAM_STATE_COMPRESSION",
    "SINKSTREAM_TEST_BOOTSTRAP", "SINKSTREAM_TEST_REDIS_URL", "SINKSTREAM_ENGINE", "SINKSTREAM_REDIS__URL",
    "SINKSTREAM_ROUTER__WEB_PORT", "SINKSTREAM_TOPICS__EVENTS__PARTITIONS", "sinkstream_engine__device",
    "OTHER_SINKSTREAM_THING",
])
def test_environment_known_names_accepted(name):
    check_environment_names({name: "x"})


@pytest.mark.parametrize("name", ["SINKSTREAM_", "SINKSTREAM_ENGINE_WINDOW_TOKENS", "SINKSTREAM_LOG_LEVEL"])
def test_environment_unknown_names_rejected(name):
    with pytest.raises(ConfigError, match=f"unknown environment variable {name}:"):
        check_environment_names({name: "x"})


def test_tools_accept_worker_sections(monkeypatch):
    from worker.commands.tools import load_tool_settings

    # The variables that `sinkstream dev up` prints for the worker.
    monkeypatch.setenv("SINKSTREAM_REDIS__URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("SINKSTREAM_CHECKPOINT__STORE", "redis")
    settings = load_tool_settings(argparse.Namespace())

    assert settings.kafka.events_topic == "sinkstream.events"


# --- the config file and --log-level


def test_worker_config_not_utf8_names_file(capsys, tmp_path):
    config = tmp_path / "worker.yaml"
    config.write_bytes(b"engine:\n  device: cpu # \xff\xfe\n")
    exit_code, stderr = run_worker(capsys, "--config", str(config))

    assert exit_code == 2
    assert_one_error(stderr)
    assert str(config) in stderr
    assert "not UTF-8" in stderr
    assert "0xff" in stderr


def test_log_level_unknown_rejected(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--log-level", "LOUD", "worker"])

    assert info.value.code == 2
    stderr = capsys.readouterr().err
    assert "--log-level: invalid choice: 'LOUD'" in stderr
    assert "DEBUG" in stderr


def test_log_level_any_case_accepted():
    assert build_parser().parse_args(["--log-level", "warning", "worker"]).log_level == "WARNING"


def test_configure_logging_unknown_level_raises():
    with pytest.raises(ValueError, match="unknown log level 'LOUD'; use one of DEBUG"):
        configure_logging("LOUD")


# --- numbers


def test_worker_interval_nan_rejected(capsys):
    exit_code, stderr = run_worker(capsys, "--checkpoint.interval-s", "nan")

    assert exit_code == 2
    assert_one_error(stderr)
    assert "checkpoint.interval_s='nan': Input should be a finite number" in stderr


def float_fields() -> list[tuple[str, str]]:
    return [
        (section, name)
        for section, section_field in WorkerSettings.model_fields.items()
        for name, field in section_field.annotation.model_fields.items()
        if field.annotation is float
    ]


def test_float_fields_found():
    assert ("checkpoint", "interval_s") in float_fields()
    assert ("redis", "socket_timeout_s") in float_fields()


@pytest.mark.parametrize(("section", "name"), float_fields())
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_worker_float_not_finite_rejected(section, name, value):
    with pytest.raises(ConfigError, match=f"{section}.{name}='{value}': Input should be a finite number"):
        load_settings(values={section: {name: value}})


@pytest.mark.parametrize("name", ["checkpoint_interval_s", "max_unsafe_s", "socket_timeout_s", "min_compression_gain"])
def test_state_config_nan_rejected(name):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="finite number"):
        StateConfig(**{name: math.nan})


# --- tools name the value as the worker does


def test_route_web_port_shows_value(capsys, monkeypatch):
    monkeypatch.setenv("SINKSTREAM_ROUTER__WEB_PORT", "-1")
    exit_code, stderr = run_cli(capsys, "route", "--bootstrap-servers", "127.0.0.1:1")

    assert exit_code == 2
    assert_one_error(stderr)
    assert "router.web_port='-1': Input should be greater than or equal to 0" in stderr


def test_topics_create_partitions_shows_value(capsys):
    exit_code, stderr = run_cli(capsys, "topics", "create", "--partitions", "0", "--bootstrap-servers", "127.0.0.1:1")

    assert exit_code == 2
    assert_one_error(stderr)
    assert "topics.ingress.partitions=0" in stderr


def test_produce_setting_shows_value(capsys, monkeypatch):
    monkeypatch.setenv("SINKSTREAM_STAGE__MAX_EVENT_BYTES", "0")
    exit_code, stderr = run_cli(capsys, "produce", "--stream", "s", "--bootstrap-servers", "127.0.0.1:1", "text")

    assert exit_code == 2
    assert_one_error(stderr)
    assert "stage.max_event_bytes='0'" in stderr


def test_route_bad_bootstrap_shows_value(capsys):
    exit_code, stderr = run_cli(capsys, "route", "--bootstrap-servers", "localhost")

    assert exit_code == 2
    assert "kafka.bootstrap_servers='localhost'" in stderr


def test_worker_state_variable_invalid_rejected(capsys, monkeypatch):
    monkeypatch.setenv("SINKSTREAM_STATE_MAX_CONNECTIONS", "abc")

    exit_code, stderr = run_worker(capsys, "--checkpoint.store", "redis")

    assert exit_code == 2
    assert_one_error(stderr)
    assert "max_connections='abc'" in stderr
    assert "SINKSTREAM_STATE_" in stderr
