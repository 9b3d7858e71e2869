"""Write ``helm/sinkstream/values.schema.json``.

The ``config`` part is derived from the worker's settings class. So every settings field
has exactly one value in the chart, with the worker's own types, enums and bounds. The rest
of the chart's values are described below. Run ``python helm/build_schema.py`` after
changing either; a test checks that the committed schema matches this output.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from worker.stage.settings import WorkerSettings

SCHEMA_PATH = Path(__file__).resolve().parent / "sinkstream" / "values.schema.json"

# Fields that carry secrets: passwords only come from an existing Secret; the others may
# also be a plain string.
SECRET_ONLY = {("kafka", "sasl_password"), ("redis", "password")}
SECRET_ALLOWED = {("kafka", "sasl_username"), ("redis", "url")}

SECRET_REF = {
    "type": "object",
    "additionalProperties": False,
    "required": ["secretKeyRef"],
    "properties": {
        "secretKeyRef": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "key"],
            "properties": {"name": {"type": "string", "minLength": 1}, "key": {"type": "string", "minLength": 1}},
        }
    },
}

KEPT_KEYWORDS = {
    "type", "enum", "anyOf", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minLength", "maxLength", "pattern", "items",
}


def _clean(schema: dict[str, Any]) -> dict[str, Any]:
    """Keep the validation keywords of a pydantic field schema (no titles, defaults, formats)."""
    cleaned = {k: v for k, v in schema.items() if k in KEPT_KEYWORDS}
    if "anyOf" in cleaned:
        cleaned["anyOf"] = [_clean(option) for option in cleaned["anyOf"]]
    return cleaned


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    options = schema["anyOf"] if "anyOf" in schema else [schema]
    if not any(option.get("type") == "null" for option in options):
        options = [*options, {"type": "null"}]
    return {"anyOf": options}


def field_schema(section: str, name: str, pydantic_schema: dict[str, Any], description: str) -> dict[str, Any]:
    if (section, name) in SECRET_ONLY:
        schema: dict[str, Any] = {"anyOf": [copy.deepcopy(SECRET_REF), {"type": "null"}]}
    else:
        schema = _nullable(_clean(pydantic_schema))
        if (section, name) in SECRET_ALLOWED:
            schema["anyOf"].insert(0, copy.deepcopy(SECRET_REF))
    env_name = f"SINKSTREAM_{section.upper()}__{name.upper()}"
    prefix = f"{description}; " if description else ""
    schema["description"] = f"{prefix}env {env_name}; null keeps the worker's default"
    return schema


def config_schema() -> dict[str, Any]:
    sections: dict[str, Any] = {}
    for section, section_field in WorkerSettings.model_fields.items():
        model = section_field.annotation
        properties = model.model_json_schema()["properties"]
        fields = {
            name: field_schema(section, name, properties[name], field.description or "")
            for name, field in model.model_fields.items()
        }
        sections[section] = {"type": "object", "additionalProperties": False, "properties": fields}
    return {
        "type": "object",
        "additionalProperties": False,
        "description": "Worker settings, config.<section>.<field> -> SINKSTREAM_<SECTION>__<FIELD>",
        "properties": sections,
    }


def obj(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    schema = {"type": "object", "additionalProperties": False, "properties": properties, **extra}
    if required:
        schema["required"] = required
    return schema


STRING = {"type": "string"}
BOOLEAN = {"type": "boolean"}
POSITIVE = {"type": "integer", "minimum": 1}
NON_NEGATIVE = {"type": "integer", "minimum": 0}
MAP = {"type": "object"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
QUANTITY = {"anyOf": [{"type": "string"}, {"type": "number"}]}
PROBE = obj({"periodSeconds": POSITIVE, "failureThreshold": POSITIVE, "timeoutSeconds": POSITIVE})


def chart_schema() -> dict[str, Any]:
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "sinkstream chart values",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "global": MAP,  # Helm passes parent charts' globals to every chart
            "image": obj({"repository": {"type": "string", "minLength": 1}, "tag": STRING,
                          "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}}),
            "imagePullSecrets": {"type": "array", "items": obj({"name": STRING}, ["name"])},
            "nameOverride": STRING,
            "fullnameOverride": STRING,
            "replicaCount": NON_NEGATIVE,
            "args": {"type": "array", "items": STRING, "minItems": 1},
            "config": config_schema(),
            "terminationGraceMarginSeconds": NON_NEGATIVE,
            "kafkaTls": obj({"existingSecret": STRING, "mountPath": STRING}),
            "redisTls": obj({"existingSecret": STRING, "mountPath": STRING}),
            "model": obj({
                "source": {"enum": ["pvc", "image", "none"]},
                "mountPath": STRING,
                "pvc": obj({"claimName": STRING, "subPath": STRING}),
                "image": obj({"repository": STRING, "tag": STRING,
                              "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                              "path": STRING, "sizeLimit": QUANTITY}),
            }),
            "gpu": obj({"enabled": BOOLEAN, "count": POSITIVE, "resourceName": STRING}),
            "resources": obj({"requests": {"type": "object", "additionalProperties": QUANTITY},
                              "limits": {"type": "object", "additionalProperties": QUANTITY}}),
            "nodeSelector": STRING_MAP,
            "tolerations": {"type": "array", "items": MAP},
            "affinity": MAP,
            "topologySpreadConstraints": {"type": "array", "items": MAP},
            "priorityClassName": STRING,
            "podAnnotations": STRING_MAP,
            "podLabels": STRING_MAP,
            "podSecurityContext": MAP,
            "securityContext": MAP,
            "serviceAccount": obj({"create": BOOLEAN, "name": STRING, "annotations": STRING_MAP,
                                   "automountServiceAccountToken": BOOLEAN}),
            "tmpSizeLimit": QUANTITY,
            "probes": obj({"startup": PROBE, "liveness": PROBE, "readiness": PROBE}),
            "extraEnv": {"type": "array", "items": MAP},
            "extraVolumes": {"type": "array", "items": MAP},
            "extraVolumeMounts": {"type": "array", "items": MAP},
            "service": obj({"annotations": STRING_MAP}),
            "serviceMonitor": obj({"enabled": BOOLEAN, "interval": STRING, "scrapeTimeout": STRING,
                                   "labels": STRING_MAP}),
            "prometheusRule": obj({"enabled": BOOLEAN, "labels": STRING_MAP}),
            "podDisruptionBudget": obj({"enabled": BOOLEAN,
                                        "maxUnavailable": {"anyOf": [NON_NEGATIVE, STRING]}}),
            "keda": obj({"enabled": BOOLEAN, "minReplicaCount": NON_NEGATIVE, "maxReplicaCount": POSITIVE,
                         "lagThreshold": POSITIVE, "pollingInterval": POSITIVE, "cooldownPeriod": NON_NEGATIVE,
                         "authenticationRef": STRING}),
            "grafanaDashboard": obj({"enabled": BOOLEAN, "labelKey": {"type": "string", "minLength": 1},
                                     "labelValue": STRING, "folder": STRING, "annotations": STRING_MAP}),
            "topics": obj({"create": BOOLEAN, "partitions": POSITIVE, "replicationFactor": POSITIVE,
                           "args": {"type": "array", "items": STRING, "minItems": 1},
                           "backoffLimit": NON_NEGATIVE}),
        },
    }


def render() -> str:
    return json.dumps(chart_schema(), indent=2) + "\n"


if __name__ == "__main__":
    SCHEMA_PATH.write_text(render())
    print(f"wrote {SCHEMA_PATH}")
