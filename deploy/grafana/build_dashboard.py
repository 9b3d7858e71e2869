"""Write the sinkstream Grafana dashboard, ``sinkstream.json``, from the panel list below.

Run ``python deploy/grafana/build_dashboard.py`` after changing a panel; a test checks that
the committed JSON matches this script's output and that every metric it queries exists.
The chart ships a copy at ``helm/sinkstream/files/sinkstream-dashboard.json``; the script
writes both.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUTS = (
    HERE / "sinkstream.json",
    HERE.parents[1] / "helm" / "sinkstream" / "files" / "sinkstream-dashboard.json",
)

SEL = '{job=~"$job"}'  # every query filters on the job variable
RATE = "$__rate_interval"


def quantiles(metric: str, by: str = "le") -> list[tuple[str, str]]:
    return [
        (f"p{int(q * 100)}", f"histogram_quantile({q}, sum by ({by}) (rate({metric}_bucket{SEL}[{RATE}])))")
        for q in (0.5, 0.95, 0.99)
    ]


# (title, description, unit, [(legend, expr)], kind). kind "stat" for single numbers.
ROWS: list[tuple[str, list[tuple[str, str, str, list[tuple[str, str]], str]]]] = [
    ("Overview", [
        ("Ready workers", "Workers whose /readyz passes (model loaded, partitions assigned, no stuck "
         "consumer).", "none", [("ready", f"sum(sinkstream_ready{SEL})")], "stat"),
        ("Stuck consumers", "Workers with a partition that has lag and made no progress for "
         "metrics.stuck_after_s.", "none", [("stuck", f"sum(sinkstream_consumer_stuck{SEL})")], "stat"),
        ("Total consumer lag", "Records waiting in the events topic, all partitions.", "none",
         [("lag", f"sum(sinkstream_consumer_lag_records{SEL})")], "stat"),
        ("Connections", "1 when every worker reaches Kafka (or Redis); lower means some do not.",
         "percentunit", [("kafka", f"avg(sinkstream_kafka_connected{SEL})"),
                         ("redis", f"avg(sinkstream_redis_connected{SEL})")], "stat"),
    ]),
    ("Throughput", [
        ("Events per second", "Records consumed, events processed to the end, and events that failed.",
         "ops", [("consumed", f"sum(rate(sinkstream_events_consumed_total{SEL}[{RATE}]))"),
                 ("processed", f"sum(rate(sinkstream_events_processed_total{SEL}[{RATE}]))"),
                 ("failed", f"sum(rate(sinkstream_events_failed_total{SEL}[{RATE}]))")], "timeseries"),
        ("Tokens per second", "Tokens run through prefill and tokens generated, all workers.", "ops",
         [("prefilled", f"sum(rate(sinkstream_tokens_prefilled_total{SEL}[{RATE}]))"),
          ("generated", f"sum(rate(sinkstream_tokens_generated_total{SEL}[{RATE}]))")], "timeseries"),
    ]),
    ("Latency", [
        ("Time to first token", "From the engine taking an event to its first generated token.", "s",
         quantiles("sinkstream_time_to_first_token_seconds"), "timeseries"),
        ("Event latency", "From the Kafka record timestamp of an event to its output being produced.",
         "s", quantiles("sinkstream_event_latency_seconds"), "timeseries"),
        ("Inter-token latency and queue wait", "Time between generated tokens (p50, p99) and time an "
         "event waits before the engine takes it (p95).", "s",
         [("inter-token p50", quantiles("sinkstream_inter_token_latency_seconds")[0][1]),
          ("inter-token p99", quantiles("sinkstream_inter_token_latency_seconds")[2][1]),
          ("queue wait p95", quantiles("sinkstream_queue_wait_seconds")[1][1])], "timeseries"),
    ]),
    ("Consumer", [
        ("Consumer lag by partition", "End offset minus consumer position for each partition of the "
         "events topic.", "none",
         [("{{topic}}[{{partition}}]", f"sum by (topic, partition) (sinkstream_consumer_lag_records{SEL})")],
         "timeseries"),
        ("Rebalances", "Consumer group rebalances seen per minute, all workers.", "none",
         [("rebalances/min", f"sum(rate(sinkstream_consumer_rebalances_total{SEL}[{RATE}])) * 60")],
         "timeseries"),
    ]),
    ("Engine", [
        ("Batch size", "Streams in one engine step (mean and p95) and tokens in one step (mean).",
         "none",
         [("streams mean", f"sum(rate(sinkstream_engine_batch_size_sum{SEL}[{RATE}])) / "
                           f"sum(rate(sinkstream_engine_batch_size_count{SEL}[{RATE}]))"),
          ("streams p95", quantiles("sinkstream_engine_batch_size")[1][1]),
          ("tokens mean", f"sum(rate(sinkstream_engine_batch_tokens_sum{SEL}[{RATE}])) / "
                          f"sum(rate(sinkstream_engine_batch_tokens_count{SEL}[{RATE}]))")], "timeseries"),
        ("Engine step duration", "Duration of one batched forward.", "s",
         quantiles("sinkstream_engine_step_duration_seconds"), "timeseries"),
        ("Streams", "Streams with a device cache slot, streams offloaded to host memory, and all "
         "streams the workers hold state for.", "none",
         [("resident", f"sum(sinkstream_streams_resident{SEL})"),
          ("host", f"sum(sinkstream_streams_host{SEL})"),
          ("known", f"sum(sinkstream_streams_known{SEL})")], "timeseries"),
        ("Slot utilization", "Resident streams over the slot pool size, per worker.", "percentunit",
         [("{{instance}}", f"max by (instance) (sinkstream_slot_utilization_ratio{SEL})")], "timeseries"),
        ("Evictions", "Tokens evicted from stream windows per second (sinks are kept).", "ops",
         [("evicted", f"sum(rate(sinkstream_tokens_evicted_total{SEL}[{RATE}]))")], "timeseries"),
    ]),
    ("Snapshots and restores", [
        ("Snapshot traffic", "Snapshot bytes written to and read from Redis per second.", "Bps",
         [("{{direction}}", f"sum by (direction) (rate(sinkstream_snapshot_bytes_total{SEL}[{RATE}]))")],
         "timeseries"),
        ("Snapshot and restore latency", "p95 duration of one snapshot write and one restore.", "s",
         [("snapshot p95", quantiles("sinkstream_snapshot_duration_seconds")[1][1]),
          ("restore p95", quantiles("sinkstream_restore_duration_seconds")[1][1])], "timeseries"),
        ("Restores and replays", "Stream caches restored per second by source, and events replayed "
         "from Kafka to rebuild caches.", "ops",
         [("restore {{source}}", f"sum by (source) (rate(sinkstream_restores_total{SEL}[{RATE}]))"),
          ("replayed events", f"sum(rate(sinkstream_replayed_events_total{SEL}[{RATE}]))")], "timeseries"),
    ]),
    ("Errors", [
        ("Dead letters by reason", "Records sent to the dead-letter topic per second, by reason.", "ops",
         [("{{reason}}", f"sum by (reason) (rate(sinkstream_dead_letters_total{SEL}[{RATE}]))")],
         "timeseries"),
        ("Errors", "Failed events by reason, and snapshot writes that failed, per second.", "ops",
         [("failed {{reason}}", f"sum by (reason) (rate(sinkstream_events_failed_total{SEL}[{RATE}]))"),
          ("snapshot failures", f"sum(rate(sinkstream_snapshot_failures_total{SEL}[{RATE}]))")],
         "timeseries"),
    ]),
]


def panel(panel_id: int, x: int, y: int, spec) -> dict:
    title, description, unit, queries, kind = spec
    width, height = (6, 4) if kind == "stat" else (12, 8)
    result = {
        "id": panel_id,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": width, "h": height},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "expr": expr,
                "legendFormat": legend,
            }
            for i, (legend, expr) in enumerate(queries)
        ],
    }
    if kind == "timeseries":
        result["options"] = {"legend": {"displayMode": "list", "placement": "bottom"},
                             "tooltip": {"mode": "multi"}}
    return result


def build() -> dict:
    panels: list[dict] = []
    y = 0
    next_id = 1
    for row_title, specs in ROWS:
        panels.append({"id": next_id, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})
        next_id += 1
        y += 1
        x = 0
        row_height = 0
        for spec in specs:
            item = panel(next_id, x, y, spec)
            next_id += 1
            panels.append(item)
            width, height = item["gridPos"]["w"], item["gridPos"]["h"]
            row_height = max(row_height, height)
            x += width
            if x >= 24:
                x, y, row_height = 0, y + row_height, 0
        y += row_height
    return {
        "uid": "sinkstream-worker",
        "title": "sinkstream workers",
        "description": "Throughput, latency, consumer lag, cache use, snapshots and errors of sinkstream workers.",
        "tags": ["sinkstream", "kafka", "llm"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "timezone": "browser",
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            {"name": "job", "label": "Job", "type": "query",
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": {"query": "label_values(sinkstream_ready, job)", "refId": "job"},
             "definition": "label_values(sinkstream_ready, job)",
             "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "refresh": 2, "hide": 0},
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    text = render()
    for path in OUTPUTS:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
