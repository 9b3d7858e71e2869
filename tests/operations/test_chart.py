"""The Helm chart: lint, render, schema, and the mapping of values onto worker settings.

Uses Helm's own Go library through helm-python-sdk (lint, offline render, schema
validation), so what passes here is what `helm lint` and `helm template` do.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import yaml

from tests.operations.conftest import CHART, REPO

ALL_ON = yaml.safe_load((CHART / "ci" / "all-on-values.yaml").read_text())
CPU = yaml.safe_load((CHART / "ci" / "cpu-values.yaml").read_text())
DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())
EXAMPLES = {"defaults": {}, "all-on": ALL_ON, "cpu": CPU}


class UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that rejects duplicate keys, which Kubernetes would silently merge."""


def _construct_mapping(loader, node, deep=False):
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    duplicates = {k for k in keys if keys.count(k) > 1}
    if duplicates:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {duplicates}", node.start_mark)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def render(helm, values: dict) -> dict[str, list[dict]]:
    manifests = helm.Chart.load(CHART).render(values, name="rel", namespace="ns")
    documents: dict[str, list[dict]] = {}
    for path, text in manifests.items():
        if path.endswith(".txt"):
            continue
        documents[path] = [d for d in yaml.load_all(text, Loader=UniqueKeyLoader) if d]
    return documents


def by_kind(documents: dict[str, list[dict]]) -> dict[str, dict]:
    return {doc["kind"]: doc for docs in documents.values() for doc in docs}


def worker_container(documents) -> dict:
    pod = by_kind(documents)["Deployment"]["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "worker")


def settings_env_names() -> dict[str, tuple[str, str]]:
    from worker.stage.settings import WorkerSettings

    return {
        f"SINKSTREAM_{section.upper()}__{name.upper()}": (section, name)
        for section, field in WorkerSettings.model_fields.items()
        for name in field.annotation.model_fields
    }


@pytest.mark.parametrize("example", EXAMPLES)
def test_chart_lints_clean(helm, example):
    report = helm.lint(CHART, EXAMPLES[example], strict=True)
    errors = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not errors, errors


@pytest.mark.parametrize("example", EXAMPLES)
def test_chart_renders_valid_manifests(helm, example):
    documents = render(helm, EXAMPLES[example])
    for path, docs in documents.items():
        for doc in docs:
            assert doc.get("apiVersion"), path
            assert doc.get("kind"), path
            assert doc["metadata"]["name"], path


def test_all_on_renders_every_template(helm):
    documents = render(helm, ALL_ON)
    templates = {p.name for p in (CHART / "templates").glob("*.yaml")}
    rendered = {path.rsplit("/", 1)[-1] for path, docs in documents.items() if docs}
    assert rendered == templates, f"templates that render nothing: {sorted(templates - rendered)}"


def test_defaults_render_only_core_objects(helm):
    kinds = sorted(doc["kind"] for docs in render(helm, {}).values() for doc in docs)
    assert kinds == ["Deployment", "Service", "ServiceAccount"]


def test_values_cover_every_setting():
    expected = set(settings_env_names().values())
    in_values = {(s, f) for s, fields in DEFAULTS["config"].items() for f in fields}
    assert in_values == expected, (
        f"missing from values.yaml: {sorted(expected - in_values)}; "
        f"not settings: {sorted(in_values - expected)}"
    )


def test_all_on_sets_every_setting():
    expected = set(settings_env_names().values())
    set_fields = {(s, f) for s, fields in ALL_ON["config"].items() for f, v in fields.items() if v is not None}
    assert set_fields == expected, sorted(expected - set_fields)


def test_all_on_env_maps_one_to_one(helm):
    env = {e["name"]: e for e in worker_container(render(helm, ALL_ON))["env"]}
    for env_name, (section, name) in settings_env_names().items():
        assert env_name in env, f"config.{section}.{name} does not reach {env_name}"
        value = ALL_ON["config"][section][name]
        if isinstance(value, dict):
            assert env[env_name]["valueFrom"]["secretKeyRef"] == value["secretKeyRef"]
        elif isinstance(value, bool):
            assert env[env_name]["value"] == str(value).lower()
        elif isinstance(value, (int, float)):
            assert "e+" not in env[env_name]["value"], env[env_name]
            assert float(env[env_name]["value"]) == value
        else:
            assert env[env_name]["value"] == str(value)
    unknown = {n for n in env if n.startswith("SINKSTREAM_")} - settings_env_names().keys()
    assert not unknown, sorted(unknown)


def test_all_on_env_loads_into_settings(helm, monkeypatch):
    from worker.stage.settings import load_settings

    env = worker_container(render(helm, ALL_ON))["env"]
    for item in env:
        if item["name"].startswith("SINKSTREAM_"):
            value = item.get("value", "secret-from-" + json.dumps(item.get("valueFrom")))
            monkeypatch.setenv(item["name"], value)
    monkeypatch.setenv("SINKSTREAM_REDIS__URL", "rediss://redis.example:6380/0")
    settings = load_settings()
    assert settings.engine.window_tokens == ALL_ON["config"]["engine"]["window_tokens"]
    assert settings.stage.shutdown_grace_s == ALL_ON["config"]["stage"]["shutdown_grace_s"]
    assert settings.metrics.port == ALL_ON["config"]["metrics"]["port"]
    assert settings.kafka.max_poll_interval_ms == ALL_ON["config"]["kafka"]["max_poll_interval_ms"]
    assert settings.checkpoint.interval_s == ALL_ON["config"]["checkpoint"]["interval_s"]


def test_null_settings_not_in_env(helm):
    env = {e["name"] for e in worker_container(render(helm, {}))["env"]}
    assert "SINKSTREAM_ENGINE__WINDOW_TOKENS" not in env
    assert "SINKSTREAM_KAFKA__BOOTSTRAP_SERVERS" in env


def test_gpu_limit_and_scheduling(helm):
    documents = render(helm, ALL_ON)
    container = worker_container(documents)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod = by_kind(documents)["Deployment"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == ALL_ON["nodeSelector"]
    assert pod["tolerations"] == ALL_ON["tolerations"]


def test_cpu_values_request_no_gpu(helm):
    container = worker_container(render(helm, CPU))
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert not any(m["name"] == "models" for m in container["volumeMounts"])


def test_pod_security_hardened(helm):
    documents = render(helm, {})
    pod = by_kind(documents)["Deployment"]["spec"]["template"]["spec"]
    container = worker_container(documents)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])


@pytest.mark.parametrize("example", EXAMPLES)
def test_termination_grace_covers_shutdown(helm, example):
    values = EXAMPLES[example]
    pod = by_kind(render(helm, values))["Deployment"]["spec"]["template"]["spec"]
    merged = helm.Chart.load(CHART).merge_values(values)
    grace = merged["config"]["stage"]["shutdown_grace_s"]
    margin = merged["terminationGraceMarginSeconds"]
    assert pod["terminationGracePeriodSeconds"] == math.ceil(grace) + margin


def test_probes_use_health_endpoints(helm):
    documents = render(helm, ALL_ON)
    container = worker_container(documents)
    assert container["startupProbe"]["httpGet"]["path"] == "/startupz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "too short for model loading"
    assert container["ports"][0]["containerPort"] == ALL_ON["config"]["metrics"]["port"]


def test_keda_capped_at_partitions(helm):
    objects = by_kind(render(helm, ALL_ON))
    scaled = objects["ScaledObject"]
    assert scaled["spec"]["maxReplicaCount"] == ALL_ON["topics"]["partitions"]
    assert scaled["spec"]["triggers"][0]["metadata"]["consumerGroup"] == ALL_ON["config"]["kafka"]["group_id"]
    assert "replicas" not in objects["Deployment"]["spec"]


def test_dashboard_configmap_labelled_for_sidecar(helm):
    configmap = by_kind(render(helm, ALL_ON))["ConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(configmap["data"]["sinkstream-dashboard.json"])
    assert dashboard["uid"] == "sinkstream-worker"


def test_prometheus_rule_has_alerts(helm):
    rule = by_kind(render(helm, ALL_ON))["PrometheusRule"]
    names = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert "SinkstreamConsumerStuck" in names


def test_topics_job_is_pre_install_hook(helm):
    job = by_kind(render(helm, ALL_ON))["Job"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install"
    env = {e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "SINKSTREAM_KAFKA__BOOTSTRAP_SERVERS" in env
    assert not any(n.startswith("SINKSTREAM_ENGINE__") for n in env)


def test_topics_job_command_parses(helm, monkeypatch):
    from topology.config import TopologySettings
    from worker.cli import build_parser

    container = by_kind(render(helm, ALL_ON))["Job"]["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(container["args"])
    assert args.func.__name__ == "run_topics_create"
    assert args.partitions == ALL_ON["topics"]["partitions"]
    for item in container["env"]:
        monkeypatch.setenv(item["name"], item.get("value", "from-secret"))
    settings = TopologySettings()
    assert settings.kafka.events_topic == ALL_ON["config"]["kafka"]["events_topic"]
    assert settings.topics.events.replication_factor == ALL_ON["topics"]["replicationFactor"]
    assert settings.topics.dlq.replication_factor == ALL_ON["topics"]["replicationFactor"]


@pytest.mark.parametrize("example", EXAMPLES)
def test_worker_args_parse(helm, example):
    from worker.cli import build_parser

    args = build_parser().parse_args(worker_container(render(helm, EXAMPLES[example]))["args"])
    assert args.func.__name__ == "run_worker_command"


@pytest.mark.parametrize("example", EXAMPLES)
def test_schema_accepts_examples(helm, example):
    helm.Chart.load(CHART).validate_schema(EXAMPLES[example])


def with_change(path: str, value) -> dict:
    values = copy.deepcopy(DEFAULTS)
    *parents, last = path.split(".")
    node = values
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return values


BROKEN = {
    "unknown top-level key": ("replicas", 3),
    "unknown settings section": ("config.engin", {"window_tokens": 10}),
    "unknown settings field": ("config.engine.windw_tokens", 10),
    "string for an integer": ("config.engine.window_tokens", "2044"),
    "setting below its bound": ("config.engine.window_tokens", 1),
    "value outside an enum": ("config.engine.dtype", "float8"),
    "plain-text password": ("config.kafka.sasl_password", "hunter2"),
    "secret ref without key": ("config.redis.password", {"secretKeyRef": {"name": "redis"}}),
    "boolean as a string": ("gpu.enabled", "yes"),
    "unknown model source": ("model.source", "s3"),
    "negative replicas": ("replicaCount", -1),
    "list for a map": ("nodeSelector", ["gpu"]),
    "typo in a probe": ("probes.startup.failureThreshhold", 5),
}


@pytest.mark.parametrize("case", BROKEN)
def test_schema_rejects_broken_values(helm, case):
    path, value = BROKEN[case]
    with pytest.raises(helm.HelmValuesError):
        helm.Chart.load(CHART).validate_schema(with_change(path, value))


def test_schema_rejection_fails_render(helm):
    with pytest.raises(helm.HelmError):
        helm.Chart.load(CHART).render(with_change("config.engine.window_tokens", "big"), name="rel")


def test_schema_matches_generator():
    result = subprocess.run(
        [sys.executable, "-c", "import build_schema as b; print(b.render(), end='')"],
        cwd=REPO / "helm", capture_output=True, text=True, check=True,
        env={"PYTHONPATH": str(REPO), "PATH": ""},
    )
    committed = (CHART / "values.schema.json").read_text()
    assert committed == result.stdout, "run python helm/build_schema.py"
