"""Kafka connection settings: validation and the option sets handed to each client library."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from topology.settings import KafkaSettings


def test_kafka_settings_defaults_plaintext():
    kafka = KafkaSettings()

    assert kafka.aiokafka_kwargs() == {
        "bootstrap_servers": ["127.0.0.1:9092"],
        "client_id": "sinkstream",
        "security_protocol": "PLAINTEXT",
    }
    assert kafka.faust_credentials() is None


def test_kafka_settings_server_list_normalized():
    kafka = KafkaSettings(bootstrap_servers=" a:1, b:2 ,")

    assert kafka.bootstrap_servers == "a:1,b:2"
    assert kafka.faust_broker_url() == "kafka://a:1;kafka://b:2"
    assert kafka.librdkafka_config()["bootstrap.servers"] == "a:1,b:2"


@pytest.mark.parametrize("servers", ["", "localhost", "host:port", ":9092"])
def test_kafka_settings_bad_server_rejected(servers):
    with pytest.raises(ValidationError, match="host:port|empty"):
        KafkaSettings(bootstrap_servers=servers)


def test_kafka_settings_sasl_needs_credentials():
    with pytest.raises(ValidationError, match="sasl_username, sasl_password"):
        KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN")


def test_kafka_settings_sasl_mechanism_without_sasl_rejected():
    with pytest.raises(ValidationError, match="SASL_PLAINTEXT or SASL_SSL"):
        KafkaSettings(sasl_mechanism="PLAIN")


def test_kafka_settings_certificate_without_key_rejected(tmp_path):
    with pytest.raises(ValidationError, match="set together"):
        KafkaSettings(security_protocol="SSL", ssl_certfile=tmp_path / "client.pem")


def test_kafka_settings_sasl_options_for_each_client():
    kafka = KafkaSettings(
        security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512", sasl_username="u", sasl_password="s3cret-pw"
    )
    aiokafka_kwargs = kafka.aiokafka_kwargs()
    librdkafka = kafka.librdkafka_config()

    assert aiokafka_kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert aiokafka_kwargs["sasl_plain_username"] == "u"
    assert aiokafka_kwargs["sasl_plain_password"] == "s3cret-pw"
    assert "ssl_context" not in aiokafka_kwargs
    assert librdkafka["security.protocol"] == "sasl_plaintext"
    assert librdkafka["sasl.password"] == "s3cret-pw"
    assert kafka.faust_credentials().mechanism.value == "SCRAM-SHA-512"
    assert "s3cret-pw" not in repr(kafka)


def test_kafka_settings_missing_ca_file_names_it(tmp_path):
    from worker.exceptions import ConfigError

    kafka = KafkaSettings(security_protocol="SSL", ssl_cafile=tmp_path / "missing-ca.pem")

    with pytest.raises(ConfigError, match="missing-ca.pem"):
        kafka.aiokafka_kwargs()
