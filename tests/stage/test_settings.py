import argparse

import pytest

from worker.exceptions import ConfigError
from worker.stage.settings import WorkerSettings, add_settings_arguments, load_settings, settings_from_args


@pytest.fixture
def parser():
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    return parser


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("SINKSTREAM_"):
            monkeypatch.delenv(name)


def test_settings_defaults_validate():
    settings = load_settings()
    assert settings.kafka.events_topic == "sinkstream.events"
    assert settings.stage.raw_action == "append"
    assert settings.kafka.producer_idempotence is False


def test_settings_flag_env_yaml_precedence(parser, tmp_path, monkeypatch):
    config = tmp_path / "worker.yaml"
    config.write_text(
        "kafka:\n  group_id: from-yaml\n  events_topic: from-yaml\n  dlq_topic: from-yaml\n"
        "engine:\n  window_tokens: 100\n"
    )
    monkeypatch.setenv("SINKSTREAM_KAFKA__EVENTS_TOPIC", "from-env")
    monkeypatch.setenv("SINKSTREAM_KAFKA__DLQ_TOPIC", "from-env")
    args = parser.parse_args(["--config", str(config), "--kafka.dlq-topic", "from-flag"])
    settings = settings_from_args(args)
    assert settings.kafka.group_id == "from-yaml"
    assert settings.kafka.events_topic == "from-env"
    assert settings.kafka.dlq_topic == "from-flag"
    assert settings.engine.window_tokens == 100


def test_settings_every_field_has_a_flag(parser):
    flags = {option for action in parser._actions for option in action.option_strings}
    for section, section_field in WorkerSettings.model_fields.items():
        for name in section_field.annotation.model_fields:
            assert f"--{section}.{name.replace('_', '-')}" in flags


def test_settings_env_maps_nested_field(monkeypatch):
    monkeypatch.setenv("SINKSTREAM_ENGINE__SINK_TOKENS", "8")
    monkeypatch.setenv("SINKSTREAM_REDIS__TLS", "true")
    settings = load_settings()
    assert settings.engine.sink_tokens == 8
    assert settings.redis.tls is True


def test_settings_flag_value_is_typed(parser):
    args = parser.parse_args(["--stage.queue-max-events", "17", "--stage.shutdown-grace-s", "2.5"])
    settings = settings_from_args(args)
    assert settings.stage.queue_max_events == 17
    assert settings.stage.shutdown_grace_s == 2.5


def test_settings_invalid_value_names_field():
    with pytest.raises(ConfigError, match=r"stage.queue_max_events=0"):
        load_settings(values={"stage": {"queue_max_events": 0}})


def test_settings_unknown_field_raises():
    with pytest.raises(ConfigError, match="engine.window"):
        load_settings(values={"engine": {"window": 10}})


def test_settings_sasl_without_password_raises():
    with pytest.raises(ConfigError, match="sasl_password"):
        load_settings(values={"kafka": {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                                        "sasl_username": "worker"}})


def test_settings_secret_never_in_error_or_dump():
    secret = "hunter2-secret"
    with pytest.raises(ConfigError) as info:
        load_settings(values={"kafka": {"security_protocol": "SASL_SSL", "sasl_password": secret}})
    assert secret not in str(info.value)
    settings = load_settings(values={"kafka": {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_username": "worker", "sasl_password": secret,
    }, "redis": {"password": secret}})
    assert secret not in repr(settings)
    assert secret not in str(settings.redacted())
    assert settings.kafka.aiokafka_kwargs()["sasl_plain_password"] == secret


def test_settings_default_tokens_above_limit_raises():
    with pytest.raises(ConfigError, match="default_max_new_tokens"):
        load_settings(values={"stage": {"default_max_new_tokens": 50, "max_new_tokens_limit": 10}})


def test_settings_yaml_not_mapping_raises(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(config)


def test_settings_event_limits_follow_stage():
    settings = load_settings(values={"stage": {"max_event_bytes": 1000, "max_new_tokens_limit": 64,
                                               "default_max_new_tokens": 16}})
    limits = settings.stage.event_limits()
    assert (limits.max_event_bytes, limits.max_new_tokens, limits.default_max_new_tokens) == (1000, 64, 16)
