"""Every Prometheus metric of the worker, and the names that dashboards and alerts use.

One :class:`WorkerMetrics` owns all metric objects of one worker process. The stage
updates them; core code (engine, planner) never imports prometheus-client and returns
stats objects instead, which :meth:`WorkerMetrics.observe_step` turns into metrics.

Conventions: the prefix is ``sinkstream_``, values are in base units (seconds, bytes,
ratios from 0 to 1), and counters end in ``_total``. Labels only take values from a fixed
set (a failure reason, a restore source) or from the partition count. Stream ids, event
ids and model output never become labels. Reasons outside the fixed sets are counted as
``other``.

The HTTP server and readiness bookkeeping live in :mod:`worker.health` and are
re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from topology.schemas import DEAD_LETTER_REASONS
from worker.health import HealthSnapshot, HealthState, MetricsServer, start_metrics_server

__all__ = [
    "DEAD_LETTER_REASONS",
    "EVENT_FAILURE_REASONS",
    "METRIC_NAMES",
    "RESTORE_SOURCES",
    "SNAPSHOT_DIRECTIONS",
    "HealthSnapshot",
    "HealthState",
    "MetricsServer",
    "WorkerMetrics",
    "start_metrics_server",
]

# Why an event did not produce its normal output: the dead-letter reason codes of
# topology.schemas (invalid input, engine_error), plus failures that send nothing to the
# dead-letter topic. Dead letters are labelled with DEAD_LETTER_REASONS only.
EVENT_FAILURE_REASONS = (
    *DEAD_LETTER_REASONS,
    "publish_error",  # the output could not be produced to Kafka
    "restore_error",  # the stream's cache could not be restored or replayed
    "other",
)

# Sources of a restored stream cache, for a stream that was not resident when needed.
RESTORE_SOURCES = (
    "host",  # offloaded to host memory by this worker
    "redis",  # a snapshot in Redis
    "replay",  # rebuilt by replaying the stream's events from Kafka
    "new",  # no earlier state: the stream starts empty
)

SNAPSHOT_DIRECTIONS = ("write", "read")

# Buckets, in seconds unless stated. Chosen for a small model on one GPU or a CPU:
# a first token in tens of milliseconds to tens of seconds behind a queue, one decode
# step in milliseconds, and event latency that includes queueing behind long prompts.
TIME_TO_FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
EVENT_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300)
STEP_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_TOKENS_BUCKETS = (1, 16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
SNAPSHOT_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SNAPSHOT_SIZE_BUCKETS = tuple(float(2**k) for k in range(10, 32, 2))  # 1 KiB to 2 GiB


class WorkerMetrics:
    """All metrics of one worker; each attribute is one prometheus-client object.

    Pass a fresh :class:`CollectorRegistry` in tests; ``None`` creates a private registry
    (never the global default one, so two instances never collide).

    Counters:
      ``events_consumed``: records fetched from the events topic.
      ``events_processed``: events handled to the end (output produced, or appended).
      ``events_failed{reason}``: events that failed; ``reason`` is one of
        :data:`EVENT_FAILURE_REASONS`. Use :meth:`event_failed`.
      ``tokens_prefilled`` / ``tokens_generated``: tokens run through prefill / sampled.
      ``tokens_evicted``: tokens dropped from stream windows by the sink + window rule.
      ``rebalances``: consumer group rebalances that changed this worker's assignment.
      ``dead_letters{reason}``: records produced to the dead-letter topic, by
        ``topology.schemas.DEAD_LETTER_REASONS``. Use :meth:`dead_lettered`.
      ``snapshot_bytes{direction}``: snapshot bytes written to / read from Redis.
      ``snapshot_failures``: snapshots that could not be written.
      ``restores{source}``: stream caches brought back, by :data:`RESTORE_SOURCES`.
      ``replayed_events``: events re-run from Kafka to rebuild a stream's cache.
      ``checkpoints``: completed checkpoints (snapshots flushed, offsets committed).

    Histograms:
      ``time_to_first_token``: from the engine accepting the event to its first generated
        token. Use :meth:`observe_result`.
      ``inter_token_latency``: mean time between generated tokens of one reply: the
        generation time after the first token over (generated tokens - 1).
      ``event_latency``: from the Kafka record timestamp to the output being produced
        (use :meth:`observe_event_latency`; includes producer-side delay and clock skew).
      ``queue_wait``: from consumption to the engine accepting the event.
      ``engine_step_duration``: one batched forward (``engine.step()``).
      ``engine_batch_size``: streams in one step (``StepStats.num_streams``);
        ``engine_batch_tokens``: tokens in it (``StepStats.batch_size``).
      ``snapshot_duration`` / ``restore_duration``: one snapshot write / restore.
      ``snapshot_size``: bytes of one snapshot.

    Gauges:
      ``streams_resident``: streams holding a cache slot on the device.
      ``streams_host``: streams offloaded to host memory.
      ``streams_known``: streams in the engine (resident or host).
      ``slot_utilization``: resident streams / slot pool size (0 to 1).
      ``queue_events``: events consumed and waiting for the engine.
      ``consumer_lag{topic,partition}``: end offset minus position, per assigned partition.
      ``consumer_last_progress{topic,partition}``: Unix time of the partition's last progress.
      ``consumer_assigned_partitions``: partitions this worker holds.
      ``consumer_stuck``: 1 while a partition has lag and made no progress for
        ``metrics.stuck_after_s``.
      ``kafka_connected`` / ``redis_connected``: 1 while the connection works.
      ``model_loaded``: 1 once the model is loaded. ``ready``: 1 while ``/readyz`` passes.

    Info:
      ``engine``: model and engine configuration (``sinkstream_engine_info``).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self._init_counters(r)
        self._init_histograms(r)
        self._init_gauges(r)
        self.engine = Info("sinkstream_engine", "Model and engine configuration.", registry=r)
        self._known_partitions: set[tuple[str, int]] = set()

    def _init_counters(self, r: CollectorRegistry) -> None:
        self.events_consumed = Counter(
            "sinkstream_events_consumed", "Records fetched from the events topic.", registry=r
        )
        self.events_processed = Counter(
            "sinkstream_events_processed", "Events handled to the end.", registry=r
        )
        self.events_failed = Counter(
            "sinkstream_events_failed", "Events that failed, by reason.", ["reason"], registry=r
        )

        self.tokens_prefilled = Counter(
            "sinkstream_tokens_prefilled", "Tokens run through prefill.", registry=r
        )
        self.tokens_generated = Counter(
            "sinkstream_tokens_generated", "Tokens sampled by the model.", registry=r
        )
        self.tokens_evicted = Counter(
            "sinkstream_tokens_evicted", "Tokens evicted from stream windows.", registry=r
        )

        self.rebalances = Counter(
            "sinkstream_consumer_rebalances", "Consumer group rebalances seen by this worker.", registry=r
        )
        self.dead_letters = Counter(
            "sinkstream_dead_letters", "Records produced to the dead-letter topic, by reason.", ["reason"],
            registry=r,
        )

        self.snapshot_bytes = Counter(
            "sinkstream_snapshot_bytes", "Snapshot bytes written to or read from Redis.", ["direction"],
            registry=r,
        )
        self.snapshot_failures = Counter(
            "sinkstream_snapshot_failures", "Snapshots that could not be written.", registry=r
        )
        self.restores = Counter(
            "sinkstream_restores", "Stream caches brought back, by source.", ["source"], registry=r
        )
        self.replayed_events = Counter(
            "sinkstream_replayed_events", "Events replayed from Kafka to rebuild caches.", registry=r
        )
        self.checkpoints = Counter(
            "sinkstream_checkpoints", "Checkpoints completed (snapshots flushed, offsets committed).",
            registry=r,
        )

        # Create every labelled series at zero, so rate() and the dashboards see them
        # before the first failure.
        for reason in EVENT_FAILURE_REASONS:
            self.events_failed.labels(reason=reason)
        for reason in DEAD_LETTER_REASONS:
            self.dead_letters.labels(reason=reason)
        for direction in SNAPSHOT_DIRECTIONS:
            self.snapshot_bytes.labels(direction=direction)
        for source in RESTORE_SOURCES:
            self.restores.labels(source=source)

    def _init_histograms(self, r: CollectorRegistry) -> None:
        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, buckets=buckets, registry=r)

        self.time_to_first_token = histogram(
            "sinkstream_time_to_first_token_seconds", "Engine submission to first generated token.",
            TIME_TO_FIRST_TOKEN_BUCKETS,
        )
        self.inter_token_latency = histogram(
            "sinkstream_inter_token_latency_seconds", "Mean time between generated tokens of one reply.",
            INTER_TOKEN_BUCKETS,
        )
        self.event_latency = histogram(
            "sinkstream_event_latency_seconds", "Kafka record timestamp to output produced.",
            EVENT_LATENCY_BUCKETS,
        )
        self.queue_wait = histogram(
            "sinkstream_queue_wait_seconds", "Consumption to engine admission.", QUEUE_WAIT_BUCKETS
        )
        self.engine_step_duration = histogram(
            "sinkstream_engine_step_duration_seconds", "Duration of one batched engine step.",
            STEP_DURATION_BUCKETS,
        )
        self.engine_batch_size = histogram(
            "sinkstream_engine_batch_size", "Streams in one engine step.", BATCH_SIZE_BUCKETS
        )
        self.engine_batch_tokens = histogram(
            "sinkstream_engine_batch_tokens", "Tokens in one engine step.", BATCH_TOKENS_BUCKETS
        )
        self.snapshot_duration = histogram(
            "sinkstream_snapshot_duration_seconds", "Duration of one snapshot write.", SNAPSHOT_DURATION_BUCKETS
        )
        self.restore_duration = histogram(
            "sinkstream_restore_duration_seconds", "Duration of one cache restore.", SNAPSHOT_DURATION_BUCKETS
        )
        self.snapshot_size = histogram(
            "sinkstream_snapshot_size_bytes", "Size of one snapshot.", SNAPSHOT_SIZE_BUCKETS
        )

    def _init_gauges(self, r: CollectorRegistry) -> None:
        self.streams_resident = Gauge(
            "sinkstream_streams_resident", "Streams holding a device cache slot.", registry=r
        )
        self.streams_host = Gauge(
            "sinkstream_streams_host", "Streams offloaded to host memory.", registry=r
        )
        self.streams_known = Gauge(
            "sinkstream_streams_known", "Streams in the engine (resident or host).", registry=r
        )

        self.slot_utilization = Gauge(
            "sinkstream_slot_utilization_ratio", "Resident streams over slot pool size.", registry=r
        )
        self.queue_events = Gauge(
            "sinkstream_queue_events", "Events waiting for the engine.", registry=r
        )

        self.consumer_lag = Gauge(
            "sinkstream_consumer_lag_records", "End offset minus position, per partition.",
            ["topic", "partition"], registry=r,
        )
        self.consumer_last_progress = Gauge(
            "sinkstream_consumer_last_progress_timestamp_seconds",
            "Unix time of the partition's last progress.", ["topic", "partition"], registry=r,
        )
        self.consumer_assigned_partitions = Gauge(
            "sinkstream_consumer_assigned_partitions", "Partitions assigned to this worker.", registry=r
        )
        self.consumer_stuck = Gauge(
            "sinkstream_consumer_stuck", "1 while a partition has lag and no progress.", registry=r
        )

        self.kafka_connected = Gauge(
            "sinkstream_kafka_connected", "1 while the Kafka connection works.", registry=r
        )
        self.redis_connected = Gauge(
            "sinkstream_redis_connected", "1 while the Redis connection works.", registry=r
        )
        self.model_loaded = Gauge("sinkstream_model_loaded", "1 once the model is loaded.", registry=r)
        self.ready = Gauge("sinkstream_ready", "1 while /readyz passes.", registry=r)

    # -- helpers that keep labels inside their fixed sets ---------------------------------

    def event_failed(self, reason: str) -> None:
        self.events_failed.labels(reason=_known(reason, EVENT_FAILURE_REASONS)).inc()

    def dead_lettered(self, reason: str) -> None:
        """Count one dead letter; ``reason`` must be one of ``topology.schemas.DEAD_LETTER_REASONS``."""
        if reason not in DEAD_LETTER_REASONS:
            raise ValueError(
                f"dead-letter reason {reason!r} is not one of topology.schemas.DEAD_LETTER_REASONS; "
                "add it to the schema first"
            )
        self.dead_letters.labels(reason=reason).inc()

    def restored(self, source: str, duration_s: float, num_bytes: int = 0) -> None:
        """Count one restore from ``source`` (``RESTORE_SOURCES``) and its duration and bytes."""
        self.restores.labels(source=_known(source, RESTORE_SOURCES, fallback="new")).inc()
        self.restore_duration.observe(duration_s)
        if num_bytes:
            self.snapshot_bytes.labels(direction="read").inc(num_bytes)

    def snapshot_written(self, num_bytes: int, duration_s: float) -> None:
        self.snapshot_bytes.labels(direction="write").inc(num_bytes)
        self.snapshot_size.observe(num_bytes)
        self.snapshot_duration.observe(duration_s)

    def observe_event_latency(self, record_timestamp_ms: int | None, now_s: float | None = None) -> None:
        """Observe the latency of one output from its input's Kafka record timestamp.

        Records without a timestamp (``None`` or negative, as Kafka reports missing ones)
        are skipped. A negative latency comes from clock skew between producer and
        worker and is recorded as 0 so the histogram stays valid.
        """
        if record_timestamp_ms is None or record_timestamp_ms < 0:
            return
        now_s = time.time() if now_s is None else now_s
        self.event_latency.observe(max(0.0, now_s - record_timestamp_ms / 1000.0))

    def observe_step(self, stats: Any) -> None:
        """Record one engine step from the engine's ``StepStats``.

        Reads ``num_streams`` (streams in the step), ``batch_size`` (tokens in the step),
        ``tokens_prefilled``, ``tokens_generated``, ``tokens_evicted``, ``duration_s``,
        ``resident_streams``, ``host_streams``, ``known_streams`` and ``slots_total``.
        A step with no streams is not observed.
        """
        if stats.num_streams <= 0:
            return
        self.engine_batch_size.observe(stats.num_streams)
        self.engine_batch_tokens.observe(stats.batch_size)
        self.engine_step_duration.observe(stats.duration_s)
        self.tokens_prefilled.inc(stats.tokens_prefilled)
        self.tokens_generated.inc(stats.tokens_generated)
        self.tokens_evicted.inc(stats.tokens_evicted)
        self.set_slot_pool(stats.resident_streams, stats.slots_total)
        self.streams_host.set(stats.host_streams)
        self.streams_known.set(stats.known_streams)

    def observe_result(self, result: Any) -> None:
        """Record the time to first token and the inter-token latency of one engine result."""
        first_s = getattr(result, "time_to_first_token_s", None)
        if first_s is None:
            return
        self.time_to_first_token.observe(first_s)
        generated = getattr(result, "generated_tokens", 0) or 0
        if generated >= 2:
            self.inter_token_latency.observe(max(0.0, result.total_s - first_s) / (generated - 1))

    def set_slot_pool(self, num_resident: int, num_slots: int) -> None:
        self.streams_resident.set(num_resident)
        self.slot_utilization.set(num_resident / num_slots if num_slots > 0 else 0.0)

    def set_engine_info(self, info: Mapping[str, Any]) -> None:
        """Publish the model and engine configuration, e.g. model path, dtype, window."""
        self.engine.info({str(k): str(v) for k, v in info.items()})

    def update_health(self, snap: HealthSnapshot) -> None:
        """Copy a health snapshot into the health gauges; the metrics server calls this per scrape."""
        self.model_loaded.set(int(snap.model_loaded))
        self.kafka_connected.set(int(snap.kafka_connected))
        if snap.redis_connected is not None:
            # Left alone otherwise, so code that sets the gauge directly is not overwritten.
            self.redis_connected.set(int(snap.redis_connected))
        self.consumer_stuck.set(int(bool(snap.stuck_partitions)))
        self.ready.set(int(snap.ready))
        self.consumer_assigned_partitions.set(len(snap.partitions))
        for topic, partition in self._known_partitions - snap.partitions.keys():
            self.consumer_lag.remove(topic, str(partition))
            self.consumer_last_progress.remove(topic, str(partition))
        for (topic, partition), progress in snap.partitions.items():
            self.consumer_lag.labels(topic=topic, partition=str(partition)).set(progress.lag)
            self.consumer_last_progress.labels(topic=topic, partition=str(partition)).set(
                progress.last_progress_unix_s
            )
        self._known_partitions = set(snap.partitions)


def _known(value: str, allowed: tuple[str, ...], fallback: str = "other") -> str:
    return value if value in allowed else fallback


def _exposed_names(metrics: WorkerMetrics) -> tuple[str, ...]:
    """Return every sample name the registry exposes (with _total, _bucket, _info...)."""
    names: set[str] = set()
    for family in metrics.registry.collect():
        for sample in family.samples:
            names.add(sample.name)
    return tuple(sorted(names))


# Every sample name /metrics exposes, e.g. ``sinkstream_events_failed_total`` and
# ``sinkstream_event_latency_seconds_bucket``; tests check dashboards and alerts against it.
# Labelled series without fixed values (consumer lag) are added by name.
METRIC_NAMES: tuple[str, ...] = tuple(
    sorted(
        set(_exposed_names(WorkerMetrics()))
        | {"sinkstream_consumer_lag_records", "sinkstream_consumer_last_progress_timestamp_seconds"}
    )
)
