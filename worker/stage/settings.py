"""Settings of the worker: one validated object read from flags, environment and YAML.

Every field has three spellings that map one to one. For ``kafka.bootstrap_servers``:

- YAML file (``--config FILE`` or ``$SINKSTREAM_CONFIG``): ``kafka: {bootstrap_servers: ...}``
- environment variable: ``SINKSTREAM_KAFKA__BOOTSTRAP_SERVERS``
- command-line flag: ``--kafka.bootstrap-servers``

Precedence, highest first: flags, environment variables, the YAML file, defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from topology.schemas import EventLimits
from topology.settings import KafkaSettings
from worker.exceptions import ConfigError
from worker.paths import default_model_dir

ENV_PREFIX = "SINKSTREAM_"
CONFIG_FILE_ENV = "SINKSTREAM_CONFIG"

# SINKSTREAM_ variables that are not settings fields, so the unknown-variable check keeps them.
OTHER_ENV_NAMES = {
    CONFIG_FILE_ENV: "the YAML settings file",
    "SINKSTREAM_HOME": "the model and data cache root (worker/paths.py)",
    "SINKSTREAM_MODELS_DIR": "the model directory mounted by deploy/compose.yaml",
}
OTHER_ENV_PREFIXES = {
    "SINKSTREAM_STATE_": "StateConfig fields (worker/state/config.py)",
    "SINKSTREAM_TEST_": "services of the test suite (tests/conftest_services.py)",
}

REDIS_URL_SCHEMES = ("redis", "rediss", "unix")
DEVICE_PATTERN = re.compile(r"cpu|cuda(:[0-9]+)?")


class WorkerKafkaSettings(KafkaSettings):
    """Broker connection and security (shared with the router) plus the worker's topics and group."""

    group_id: str = Field("sinkstream-worker", min_length=1, description="consumer group of the workers")
    events_topic: str = Field("sinkstream.events", min_length=1, description="input topic, keyed by stream id")
    outputs_topic: str = Field("sinkstream.outputs", min_length=1, description="output topic")
    dlq_topic: str = Field("sinkstream.dlq", min_length=1, description="dead-letter topic")
    session_timeout_ms: int = Field(30_000, ge=1_000, le=3_600_000, description="consumer group session timeout")
    max_poll_interval_ms: int = Field(
        300_000, ge=1_000, le=86_400_000, description="maximum gap between fetches before the group evicts the worker"
    )
    producer_idempotence: bool = Field(
        False, description="idempotent producer; the Tansu broker rejects it, Kafka proper accepts it"
    )


class RedisSettings(BaseModel):
    """Redis connection used by the snapshot store."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    url: str = Field("redis://127.0.0.1:6379/0", description="redis://, rediss:// or unix:// URL")
    password: SecretStr | None = Field(None, description="Redis AUTH password, when the URL carries none")
    tls: bool = Field(False, description="connect with TLS (also implied by a rediss:// URL)")
    ssl_ca_certs: Path | None = Field(
        None, description="CA bundle that verifies the Redis server's certificate; needs tls or a rediss:// URL"
    )
    key_prefix: str = Field(
        "sinkstream:", description="prefix of every key this worker writes; not empty, without '{' or '}'"
    )
    socket_timeout_s: float = Field(
        5.0, gt=0, le=300, description="seconds a Redis command may take, a whole multi-chunk reply included"
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in REDIS_URL_SCHEMES:
            raise ValueError(
                "the URL scheme must be redis://, rediss:// (TLS) or unix://; "
                "write it as redis://127.0.0.1:6379/0"
            )
        try:
            parts.port  # noqa: B018, parses the port and raises ValueError when it is not a number
        except ValueError as exc:
            raise ValueError(f"the URL port is invalid ({exc}); write it as redis://127.0.0.1:6379/0") from None
        return value

    @field_validator("key_prefix")
    @classmethod
    def _check_key_prefix(cls, value: str) -> str:
        # The snapshot store strips trailing colons and adds its own separator.
        if not value.rstrip(":"):
            raise ValueError("the key prefix is empty; set a name such as 'sinkstream:' to keep the keys apart")
        if "{" in value or "}" in value:
            raise ValueError(
                "the key prefix contains a brace; braces are reserved for Redis Cluster hash tags, "
                "so choose a prefix without them"
            )
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> RedisSettings:
        scheme = urlsplit(self.url).scheme
        if self.tls and scheme == "unix":
            raise ValueError("redis.tls is true but a unix:// socket has no TLS; set redis.tls false")
        if self.ssl_ca_certs is not None and not self.uses_tls:
            raise ValueError(
                "redis.ssl_ca_certs is set but the connection does not use TLS; "
                "set redis.tls true or use a rediss:// URL"
            )
        return self

    @property
    def uses_tls(self) -> bool:
        return self.tls or urlsplit(self.url).scheme == "rediss"


class EngineSettings(BaseModel):
    """Model and cache geometry of the engine."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model_path: Path = Field(
        default_factory=default_model_dir,
        description="local Hugging Face model directory or .gguf file; unset means the fetched SmolLM2",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="weights and cache dtype: float32, bfloat16 or float16"
    )
    device: str = Field("cpu", description="torch device: cpu, cuda or cuda:N")
    sink_tokens: int = Field(4, ge=0, le=1024, description="first tokens of a stream kept for ever (attention sinks)")
    window_tokens: int = Field(2044, ge=16, le=1_048_576, description="most recent tokens kept after the sinks")
    prefill_chunk_tokens: int = Field(
        256, ge=1, le=65_536, description="maximum tokens of one event in one forward"
    )
    max_resident_streams: int = Field(64, ge=1, le=65_536, description="cache slots on the device")
    max_host_streams: int = Field(1024, ge=0, le=1_048_576, description="streams parked in host memory")
    max_batch_tokens: int = Field(2048, ge=1, le=1_048_576, description="tokens per engine step")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not DEVICE_PATTERN.fullmatch(value):
            raise ValueError("the device must be cpu, cuda or cuda:N (N the GPU index, for example cuda:0)")
        return value


class StageSettings(BaseModel):
    """Input handling, backpressure and shutdown of the consumer loop."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    raw_action: Literal["append", "generate"] = Field(
        "append", description="what a non-JSON event does: append its text, or append and generate"
    )
    max_event_bytes: int = Field(
        32_768, ge=1, le=16 * 1024 * 1024, description="largest UTF-8 text of one event, in bytes"
    )
    max_new_tokens_limit: int = Field(1024, ge=1, le=1_000_000, description="largest max_new_tokens accepted")
    default_max_new_tokens: int = Field(128, ge=1, le=1_000_000, description="max_new_tokens when an event gives none")
    queue_max_events: int = Field(
        256, ge=1, le=1_000_000, description="events fetched and not yet done before fetching pauses"
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, le=3600, description="seconds to finish in-flight events on revoke or shutdown"
    )
    worker_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}", description="name in outputs and logs"
    )

    @model_validator(mode="after")
    def _check_limits(self) -> StageSettings:
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(
                f"stage.default_max_new_tokens={self.default_max_new_tokens} is above "
                f"stage.max_new_tokens_limit={self.max_new_tokens_limit}; lower it or raise the limit"
            )
        return self

    def event_limits(self) -> EventLimits:
        """Return the input limits in the form :func:`topology.schemas.parse_event` takes."""
        return EventLimits(
            max_event_bytes=self.max_event_bytes,
            max_new_tokens=self.max_new_tokens_limit,
            default_max_new_tokens=self.default_max_new_tokens,
        )


class CheckpointSettings(BaseModel):
    """How often offsets are committed (and, with a snapshot store, streams snapshotted)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    store: Literal["none", "redis"] = Field(
        "none", description="where stream snapshots go: none (rebuild from the input) or redis"
    )
    interval_events: int = Field(1000, ge=1, description="commit after this many done events")
    interval_s: float = Field(5.0, gt=0, le=3600, description="commit at least this often, seconds")
    max_unsafe_s: float = Field(
        300.0, gt=0, description="seconds without a successful checkpoint before readiness fails"
    )
    on_rejected: Literal["replay", "reset"] = Field(
        "replay",
        description=(
            "with store redis, what happens to a stream whose snapshot is rejected or was lost: replay "
            "rebuilds its cache from its earlier events on the topic, reset starts it from an empty cache"
        ),
    )


class MetricsSettings(BaseModel):
    """The /metrics, /healthz and /readyz server."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    host: str = Field("0.0.0.0", description="interface the server listens on; 0.0.0.0 means all")
    port: int = Field(9400, ge=0, le=65_535, description="0 disables the server")
    stuck_after_s: float = Field(
        120.0, gt=0,
        description="seconds a partition may have lag without progress before it counts as stuck and /readyz fails",
    )


class WorkerSettings(BaseSettings):
    """All settings of ``sinkstream worker``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", validate_default=True, allow_inf_nan=False
    )

    kafka: WorkerKafkaSettings = Field(default_factory=WorkerKafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    stage: StageSettings = Field(default_factory=StageSettings)
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))

    def redacted(self) -> dict[str, Any]:
        """Return the settings as plain data, with secrets shown as '**********'."""
        return self.model_dump(mode="json")


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by ``SINKSTREAM_CONFIG`` (``--config`` sets it)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused, because __call__ returns the whole file

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get(CONFIG_FILE_ENV)
        if not path:
            return {}
        return load_yaml(Path(path))


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"the config file {path} is not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at offset {exc.start} "
            "is invalid; save the file as UTF-8"
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"the config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"the config file {path} must contain a mapping of sections, got {type(data).__name__}")
    return data


def flag_name(section: str, field_name: str) -> str:
    """Return the flag of a field: ``--kafka.bootstrap-servers`` for kafka.bootstrap_servers."""
    return f"--{section}.{field_name.replace('_', '-')}"


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per settings field to ``parser``."""
    parser.add_argument("--config", metavar="FILE", help=f"YAML settings file (also ${CONFIG_FILE_ENV})")
    for section, section_field in WorkerSettings.model_fields.items():
        group = parser.add_argument_group(f"{section} settings")
        for name, field in section_field.annotation.model_fields.items():
            env_name = f"{ENV_PREFIX}{section.upper()}__{name.upper()}"
            shown_default = "" if field.default in (None, PydanticUndefined) else f"default {field.default}, "
            help_text = f"{field.description or ''} ({shown_default}env {env_name})".strip()
            group.add_argument(
                flag_name(section, name),
                dest=f"settings:{section}:{name}",
                metavar=name.upper(),
                default=argparse.SUPPRESS,
                help=help_text,
            )


def settings_from_args(args: argparse.Namespace, **overrides: dict[str, Any]) -> WorkerSettings:
    """Build the settings from parsed flags (see :func:`add_settings_arguments`)."""
    values: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        if dest.startswith("settings:"):
            _, section, name = dest.split(":")
            values.setdefault(section, {})[name] = value
    for section, fields in overrides.items():
        values.setdefault(section, {}).update(fields)
    return load_settings(getattr(args, "config", None), values)


def load_settings(config_file: str | Path | None = None, values: dict[str, Any] | None = None) -> WorkerSettings:
    """Validate settings from ``values`` (flags), the environment and ``config_file``.

    Raises ConfigError naming each invalid field and its value, an unknown ``SINKSTREAM_``
    variable, or a whole-section variable that is not valid JSON.
    """
    check_environment_names()
    previous = os.environ.get(CONFIG_FILE_ENV)
    if config_file is not None:
        os.environ[CONFIG_FILE_ENV] = str(config_file)
    try:
        # Sections given as flags merge with the same section from env and YAML: pydantic-settings
        # deep-merges nested dicts from all sources, so a flag replaces only its own field.
        return WorkerSettings(**(values or {}))
    except ValidationError as exc:
        raise ConfigError("invalid worker settings:\n  " + "\n  ".join(validation_problems(exc))) from exc
    except SettingsError as exc:
        raise environment_json_error(exc, WorkerSettings.model_fields) from exc
    finally:
        if config_file is not None:
            if previous is None:
                os.environ.pop(CONFIG_FILE_ENV, None)
            else:
                os.environ[CONFIG_FILE_ENV] = previous


def validation_problems(exc: ValidationError) -> list[str]:
    """Return one ``section.field=value: message`` line per error of ``exc``.

    Values of password fields and whole sections are left out, and a URL is shown with
    its password replaced by ``***``.
    """
    problems = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"])
        value = error.get("input")
        message = error["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
        if "password" in location or isinstance(value, dict):
            problems.append(f"{location}: {message}")  # never echo secrets or whole sections
        else:
            if isinstance(value, str) and location.endswith("url"):
                value = _redact_url(value)
            problems.append(f"{location}={value!r}: {message}")
    return problems


def _redact_url(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<not shown: the URL cannot be parsed>"
    if parts.password is None:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{hostinfo}").geturl()


def settings_sections() -> list[str]:
    """Return the sections of the worker's and the tools' settings (``kafka``, ``engine``, ``router``...)."""
    from topology.config import TopologySettings  # imports this module, so not at the top

    return sorted(set(WorkerSettings.model_fields) | set(TopologySettings.model_fields))


def check_environment_names(environ: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError for a ``SINKSTREAM_`` variable that names no settings section.

    pydantic-settings only reads variables of known sections, so without this check a
    misspelled section (``SINKSTREAM_ENGIN__WINDOW_TOKENS``) would be ignored without a
    message. Misspelled fields of a known section are rejected by the settings models.
    Both the worker and the tools accept the sections of both, because one environment
    usually configures all of them. Names are compared in upper case, as pydantic-settings
    matches them.
    """
    environ = os.environ if environ is None else environ
    sections = settings_sections()
    unknown = []
    for name in environ:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in OTHER_ENV_NAMES or upper.startswith(tuple(OTHER_ENV_PREFIXES)):
            continue
        section = upper.removeprefix(ENV_PREFIX).split("__", 1)[0].lower()
        if section not in sections:
            unknown.append(name)
    if unknown:
        names = ", ".join(sorted(unknown))
        noun = "variables" if len(unknown) > 1 else "variable"
        valid = ", ".join(f"{ENV_PREFIX}{section.upper()}__<FIELD>" for section in sections)
        others = ", ".join([*OTHER_ENV_NAMES, *(f"{prefix}*" for prefix in OTHER_ENV_PREFIXES)])
        raise ConfigError(
            f"unknown environment {noun} {names}: settings variables are {valid}; other variables are "
            f"{others}; correct the name or unset it"
        )


def environment_json_error(exc: SettingsError, sections: Iterable[str]) -> ConfigError:
    """Turn pydantic-settings' JSON parse error into a ConfigError naming the variable.

    pydantic-settings parses a variable that sets a whole section (``SINKSTREAM_ENGINE``)
    or a nested model (``SINKSTREAM_TOPICS__EVENTS``) as JSON, and its error names only
    the top-level field. ``sections`` are the sections of the settings class that failed.
    The value is not shown because it may contain a password.
    """
    sections = set(sections)
    for name, value in sorted(os.environ.items()):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX):
            continue
        path = upper.removeprefix(ENV_PREFIX).split("__")
        if path[0].lower() not in sections or (len(path) > 1 and not value.lstrip().startswith(("{", "["))):
            continue
        try:
            json.loads(value)
        except json.JSONDecodeError as decode_error:
            example = f"{name}__<FIELD>=<value>"
            return ConfigError(
                f"environment variable {name} is not valid JSON ({decode_error}); give it a JSON object "
                f"such as '{{\"<field>\": <value>}}', or set one field per variable with {example}"
            )
    return ConfigError(
        f"invalid settings in the environment: {exc}: {exc.__cause__}; check the {ENV_PREFIX} variables of that field"
    )


def check_files_exist(settings: WorkerSettings) -> None:
    """Raise ConfigError naming each TLS file setting whose path is not an existing file.

    The clients read these files only when they connect, which is after the model has
    loaded, so the worker checks them at start. The settings models do not read the file
    system, so settings that name files of another machine (a Helm release) still load.
    """
    missing = list(settings.kafka.missing_files())
    ca_certs = settings.redis.ssl_ca_certs
    if ca_certs is not None and not ca_certs.is_file():
        missing.append(("redis.ssl_ca_certs", ca_certs))
    if missing:
        listed = "; ".join(f"{name} {str(path)!r}" for name, path in missing)
        raise ConfigError(f"file not found: {listed}; point each setting at an existing PEM file")
