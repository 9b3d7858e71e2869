"""Kafka connection settings shared by the worker, the router and the command-line tools.

Every field maps to one environment variable with the ``SINKSTREAM_`` prefix and ``__``
between nesting levels: ``KafkaSettings.bootstrap_servers`` is read from
``SINKSTREAM_KAFKA__BOOTSTRAP_SERVERS`` when the settings object nests it under ``kafka``.
The worker's settings extend this class with its topics and consumer group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from worker.exceptions import ConfigError

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class KafkaSettings(BaseModel):
    """How to reach the Kafka cluster: addresses, TLS and SASL."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    bootstrap_servers: str = Field(
        "127.0.0.1:9092", description="comma-separated host:port list of brokers to bootstrap from"
    )
    client_id: str = Field("sinkstream", min_length=1, description="client id sent to the brokers")
    security_protocol: SecurityProtocol = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
    )
    sasl_mechanism: SaslMechanism | None = Field(
        None, description="SASL mechanism; required when security_protocol is SASL_PLAINTEXT or SASL_SSL"
    )
    sasl_username: str | None = Field(None, description="SASL user name")
    sasl_password: SecretStr | None = Field(None, description="SASL password; prefer the environment variable to a flag")
    ssl_cafile: Path | None = Field(None, description="CA bundle that verifies the brokers' certificates")
    ssl_certfile: Path | None = Field(None, description="client certificate for mutual TLS")
    ssl_keyfile: Path | None = Field(None, description="private key of ssl_certfile")

    @field_validator("bootstrap_servers")
    @classmethod
    def _check_bootstrap_servers(cls, value: str) -> str:
        servers = [server.strip() for server in value.split(",") if server.strip()]
        if not servers:
            raise ValueError("bootstrap_servers is empty; set it to host:port, for example 127.0.0.1:9092")
        for server in servers:
            host, _, port = server.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"bootstrap server {server!r} is not host:port; write it as 127.0.0.1:9092")
        return ",".join(servers)

    @model_validator(mode="after")
    def _check_security(self) -> KafkaSettings:
        if self.uses_sasl:
            missing = [
                name
                for name in ("sasl_mechanism", "sasl_username", "sasl_password")
                if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(
                    f"security_protocol {self.security_protocol} needs {', '.join(missing)}; "
                    "set them or use security_protocol PLAINTEXT or SSL"
                )
        elif self.sasl_mechanism is not None:
            raise ValueError(
                f"sasl_mechanism {self.sasl_mechanism} is set but security_protocol is "
                f"{self.security_protocol}; use SASL_PLAINTEXT or SASL_SSL"
            )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile must be set together for mutual TLS")
        return self

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def servers(self) -> list[str]:
        return self.bootstrap_servers.split(",")

    def missing_files(self) -> list[tuple[str, Path]]:
        """Return ``(setting, path)`` for each TLS file setting whose path is not an existing file."""
        missing = []
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                missing.append((f"kafka.{name}", Path(path)))
        return missing

    def aiokafka_kwargs(self) -> dict[str, Any]:
        """Build the connection keyword arguments shared by aiokafka's producer, consumer and admin client."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.uses_tls:
            kwargs["ssl_context"] = self.ssl_context()
        if self.uses_sasl:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password.get_secret_value()
        return kwargs

    def ssl_context(self):
        """Build the TLS context for SSL and SASL_SSL from the CA, certificate and key files."""
        from aiokafka.helpers import create_ssl_context

        missing = self.missing_files()
        if missing:
            listed = "; ".join(f"{name} {str(path)!r}" for name, path in missing)
            raise ConfigError(f"file not found: {listed}; point each setting at an existing PEM file")
        return create_ssl_context(
            cafile=str(self.ssl_cafile) if self.ssl_cafile else None,
            certfile=str(self.ssl_certfile) if self.ssl_certfile else None,
            keyfile=str(self.ssl_keyfile) if self.ssl_keyfile else None,
        )

    def faust_broker_url(self) -> str:
        """Return the broker list as faust writes it: ``kafka://host:port;kafka://host:port``."""
        return ";".join(f"kafka://{server}" for server in self.servers)

    def faust_credentials(self):
        """Return faust's ``broker_credentials`` for these security settings, or None for PLAINTEXT."""
        import faust

        ssl_context = self.ssl_context() if self.uses_tls else None
        if self.uses_sasl:
            return faust.SASLCredentials(
                username=self.sasl_username,
                password=self.sasl_password.get_secret_value(),
                mechanism=self.sasl_mechanism,
                ssl_context=ssl_context,
            )
        if ssl_context is not None:
            return faust.SSLCredentials(ssl_context)
        return None

    def librdkafka_config(self) -> dict[str, str]:
        """Build the configuration of librdkafka clients (confluent-kafka, or kcat ``-X key=value``)."""
        config = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "security.protocol": self.security_protocol.lower(),
        }
        if self.uses_sasl:
            config["sasl.mechanism"] = self.sasl_mechanism
            config["sasl.username"] = self.sasl_username
            config["sasl.password"] = self.sasl_password.get_secret_value()
        for name, key in (
            ("ssl_cafile", "ssl.ca.location"),
            ("ssl_certfile", "ssl.certificate.location"),
            ("ssl_keyfile", "ssl.key.location"),
        ):
            path = getattr(self, name)
            if path is not None:
                config[key] = str(path)
        return config
