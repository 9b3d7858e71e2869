"""The dashboard, alert rules, local stack and image files in deploy/."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.operations.conftest import CHART, DEPLOY, REPO
from worker.metrics import METRIC_NAMES

METRIC_RE = re.compile(r"\bsinkstream_[a-z0-9_]+\b")
DASHBOARD = DEPLOY / "grafana" / "sinkstream.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
COMPOSE = DEPLOY / "compose.yaml"


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return exprs


def alert_exprs() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def metric_names_in(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in METRIC_RE.findall(expr)}


def test_dashboard_metrics_all_exported():
    used = metric_names_in(dashboard_exprs())
    assert len(used) >= 20, sorted(used)
    unknown = used - set(METRIC_NAMES)
    assert not unknown, f"dashboard queries metrics the worker does not export: {sorted(unknown)}"


def test_alert_metrics_all_exported():
    used = metric_names_in(alert_exprs())
    assert used, "no metric found in the alert expressions"
    unknown = used - set(METRIC_NAMES)
    assert not unknown, f"alert rules query metrics the worker does not export: {sorted(unknown)}"


def test_dashboard_has_datasource_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_covers_required_panels():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in dashboard["panels"]}
    required = {
        "Events per second", "Tokens per second", "Time to first token", "Event latency",
        "Consumer lag by partition", "Batch size", "Streams", "Slot utilization", "Evictions",
        "Snapshot traffic", "Snapshot and restore latency", "Restores and replays",
        "Dead letters by reason", "Errors",
    }
    assert required <= titles, sorted(required - titles)


def test_dashboard_panels_do_not_overlap():
    dashboard = json.loads(DASHBOARD.read_text())
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps at {(x, y)}"
                cells.add((x, y))


def test_dashboard_matches_generator():
    result = subprocess.run(
        [sys.executable, "-c", "import build_dashboard as b; print(b.render(), end='')"],
        cwd=DEPLOY / "grafana", capture_output=True, text=True, check=True,
    )
    assert DASHBOARD.read_text() == result.stdout, "run python deploy/grafana/build_dashboard.py"


def test_chart_copies_match_deploy_files():
    assert (CHART / "files" / "sinkstream-dashboard.json").read_text() == DASHBOARD.read_text()
    assert (CHART / "files" / "alerts.yaml").read_text() == ALERTS.read_text()


def test_alert_rules_cover_required_alerts():
    rules = yaml.safe_load(ALERTS.read_text())
    names = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert names == {
        "SinkstreamConsumerLagGrowing", "SinkstreamConsumerStuck", "SinkstreamDeadLetterRate",
        "SinkstreamSnapshotFailures", "SinkstreamNoReadyWorkers",
    }


def test_alert_rules_pass_promtool_check(promtool):
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_promtool_unit_tests(promtool):
    result = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yaml"], cwd=ALERTS.parent, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def bind_mounts(service: dict) -> list[tuple[Path, str]]:
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts.append(((DEPLOY / source).resolve(), target))
    return mounts


def test_compose_has_the_stack():
    services = compose()["services"]
    assert {"kafka", "redis", "worker", "prometheus", "grafana"} <= services.keys()
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"


def test_compose_referenced_files_exist():
    for name, service in compose()["services"].items():
        for source, _ in bind_mounts(service):
            assert source.exists(), f"{name} mounts missing {source}"
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name


def test_compose_ports_bound_to_loopback():
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_compose_worker_env_are_settings():
    from worker.stage.settings import WorkerSettings

    known = {
        f"SINKSTREAM_{section.upper()}__{name.upper()}"
        for section, field in WorkerSettings.model_fields.items()
        for name in field.annotation.model_fields
    }
    env = compose()["services"]["worker"]["environment"]
    unknown = {k for k in env if k.startswith("SINKSTREAM_")} - known
    assert not unknown, sorted(unknown)


@pytest.mark.parametrize("service", ["topics", "worker"])
def test_compose_commands_parse(service):
    from worker.cli import build_parser

    args = build_parser().parse_args(compose()["services"][service]["command"])
    assert callable(args.func)


def test_compose_prometheus_config_valid(promtool, tmp_path):
    prometheus = compose()["services"]["prometheus"]
    host_path = {target: source for source, target in bind_mounts(prometheus)}
    config = yaml.safe_load(host_path["/etc/prometheus/prometheus.yml"].read_text())
    config["rule_files"] = [str(host_path[path]) for path in config["rule_files"]]
    targets = [t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    worker_port = str(compose()["services"]["worker"]["environment"]["SINKSTREAM_METRICS__PORT"])
    assert f"worker:{worker_port}" in targets
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    result = subprocess.run([promtool, "check", "config", str(checked)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_grafana_provisioning_valid():
    grafana = compose()["services"]["grafana"]
    host_path = {target: source for source, target in bind_mounts(grafana)}
    provisioning = host_path["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    assert datasources["datasources"][0]["type"] == "prometheus"
    providers = yaml.safe_load((provisioning / "dashboards" / "sinkstream.yaml").read_text())
    dashboard_dir = providers["providers"][0]["options"]["path"]
    assert f"{dashboard_dir}/sinkstream.json" in host_path


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_runs_as_non_root():
    instructions = dockerfile_instructions()
    users = [args for op, args in instructions if op == "USER"]
    assert users, "no USER instruction"
    assert users[-1].split(":")[0] not in ("0", "root")


def test_dockerfile_copy_sources_exist():
    for op, args in dockerfile_instructions():
        if op == "COPY" and "--from" not in args:
            for source in args.split()[:-1]:
                assert (REPO / source).exists(), f"COPY source {source} is missing"


def test_dockerfile_has_gpu_and_cpu_variants():
    instructions = dockerfile_instructions()
    stages = [args for op, args in instructions if op == "FROM"]
    assert any("base-gpu" in s for s in stages)
    assert any("base-cpu" in s for s in stages)
    assert any(s.startswith("${CUDA_IMAGE}") for s in stages)
    assert ("ARG", "VARIANT=gpu") in instructions


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.y*ml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_files_parse(path):
    assert yaml.safe_load(path.read_text()) is not None
