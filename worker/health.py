"""Worker health: readiness bookkeeping and the ``/metrics``, ``/healthz``, ``/readyz`` server.

Endpoints: ``/healthz`` returns 200 while the process serves HTTP (liveness),
``/startupz`` returns 200 once the model is loaded (the startup probe, which must cover
model loading), and ``/readyz`` returns 200 while :meth:`HealthState.ready` passes and
503 with the reason otherwise.

:class:`HealthState` is plain bookkeeping that the stage updates from its event loop:
whether the model is loaded, which partitions the consumer holds, each partition's lag
and the last time it made progress, and the Redis and Kafka connection state. It never
touches Prometheus. The HTTP server reads it from its own thread, so every method takes
a lock.

A consumer is *stuck* when a partition has records waiting (lag above zero) and its
position has not moved for ``stuck_after_s`` seconds. aiokafka can stay connected after a
broker restart and never fetch again, and no public attribute shows it. The only
visible symptom is lag that does not shrink. So the stuck check needs a lag measured
apart from the fetcher. The stage must compute it from ``consumer.end_offsets()`` (a
separate ListOffsets request). ``consumer.highwater()`` is only refreshed by fetch
responses, so it freezes together with a stuck fetcher.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from prometheus_client.exposition import choose_encoder

if TYPE_CHECKING:
    from worker.metrics import WorkerMetrics

logger = logging.getLogger(__name__)

TopicPartition = tuple[str, int]


@dataclass
class PartitionProgress:
    """Progress of one assigned partition; times are ``time.monotonic()`` seconds."""

    lag: int = 0
    position: int | None = None
    last_progress_s: float = 0.0
    last_progress_unix_s: float = 0.0


@dataclass(frozen=True)
class HealthSnapshot:
    """A consistent copy of :class:`HealthState`, taken under its lock."""

    model_loaded: bool
    kafka_connected: bool
    redis_connected: bool | None  # None: never reported, e.g. no Redis store configured
    partitions: dict[TopicPartition, PartitionProgress]
    stuck_partitions: tuple[TopicPartition, ...]
    ready: bool
    reason: str


class HealthState:
    """Readiness inputs of one worker, shared between its event loop and the HTTP server.

    Ready means: the model is loaded, the Kafka consumer is connected and has at least
    one partition, no partition is stuck, and (with ``max_unsafe_s``) processed events
    have not gone longer than that without a checkpoint. Redis being down does not make the worker
    unready, because events still flow without snapshots (snapshot failures show up in
    the metrics and alerts instead).
    """

    def __init__(
        self,
        stuck_after_s: float = 120.0,
        max_unsafe_s: float | None = None,
        clock=time.monotonic,
        wall_clock=time.time,
    ) -> None:
        if stuck_after_s <= 0:
            raise ValueError(f"stuck_after_s must be positive, got {stuck_after_s!r}")
        if max_unsafe_s is not None and max_unsafe_s <= 0:
            raise ValueError(f"max_unsafe_s must be positive or None, got {max_unsafe_s!r}")
        self.stuck_after_s = stuck_after_s
        self.max_unsafe_s = max_unsafe_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._model_loaded = False
        self._kafka_connected = False
        self._redis_connected: bool | None = None
        self._partitions: dict[TopicPartition, PartitionProgress] = {}
        # Time of the oldest processed event not yet covered by a checkpoint, or None.
        self._unsafe_since_s: float | None = None

    def set_model_loaded(self, loaded: bool = True) -> None:
        with self._lock:
            self._model_loaded = loaded

    def set_kafka_connected(self, connected: bool) -> None:
        with self._lock:
            self._kafka_connected = connected

    def set_redis_connected(self, connected: bool) -> None:
        with self._lock:
            self._redis_connected = connected

    def set_assignment(self, partitions: Iterable[TopicPartition]) -> None:
        """Replace the assigned partitions; a newly assigned one starts its stuck timer now."""
        now, now_unix = self._clock(), self._wall_clock()
        assigned = {(str(topic), int(partition)) for topic, partition in partitions}
        with self._lock:
            retained = {tp: p for tp, p in self._partitions.items() if tp in assigned}
            for tp in assigned - retained.keys():
                retained[tp] = PartitionProgress(last_progress_s=now, last_progress_unix_s=now_unix)
            self._partitions = retained

    def update_partition(self, tp: TopicPartition, position: int | None, lag: int) -> None:
        """Record a partition's consumer position and lag (end offset minus committed position).

        The position moving forward counts as progress. So does being caught up: the timer
        does not run while a partition idles at lag zero, and restarts when records arrive.
        """
        now, now_unix = self._clock(), self._wall_clock()
        with self._lock:
            progress = self._partitions.get(tp)
            if progress is None:
                return  # revoked meanwhile; the next assignment starts it afresh
            moved = position is not None and (progress.position is None or position > progress.position)
            caught_up = lag <= 0 or progress.lag <= 0
            if moved or caught_up:
                progress.last_progress_s = now
                progress.last_progress_unix_s = now_unix
            if position is not None:
                progress.position = position
            progress.lag = max(0, int(lag))

    def record_progress(self, tp: TopicPartition, offset: int) -> None:
        """Record that the record at ``offset`` of ``tp`` was processed."""
        with self._lock:
            progress = self._partitions.get(tp)
            if progress is None:
                return
            if progress.position is None or offset + 1 > progress.position:
                progress.position = offset + 1
                progress.last_progress_s = self._clock()
                progress.last_progress_unix_s = self._wall_clock()
            if self._unsafe_since_s is None:
                self._unsafe_since_s = self._clock()

    def record_checkpoint(self) -> None:
        """Record a successful checkpoint: everything processed so far is safe."""
        with self._lock:
            self._unsafe_since_s = None

    def snapshot(self) -> HealthSnapshot:
        """Copy the state and evaluate readiness at the current time."""
        now = self._clock()
        with self._lock:
            partitions = {tp: PartitionProgress(**vars(p)) for tp, p in self._partitions.items()}
            model_loaded = self._model_loaded
            kafka_connected = self._kafka_connected
            redis_connected = self._redis_connected
            unsafe_s = None if self._unsafe_since_s is None else now - self._unsafe_since_s
        stuck = tuple(
            sorted(
                tp
                for tp, p in partitions.items()
                if p.lag > 0 and now - p.last_progress_s >= self.stuck_after_s
            )
        )
        ready, reason = _evaluate(model_loaded, kafka_connected, partitions, stuck, now)
        if ready and self.max_unsafe_s is not None and unsafe_s is not None and unsafe_s > self.max_unsafe_s:
            ready, reason = False, f"no successful checkpoint for {unsafe_s:.0f}s of processed events"
        return HealthSnapshot(
            model_loaded=model_loaded,
            kafka_connected=kafka_connected,
            redis_connected=redis_connected,
            partitions=partitions,
            stuck_partitions=stuck,
            ready=ready,
            reason=reason,
        )

    def ready(self) -> tuple[bool, str]:
        """Return (ready, reason); the reason names what is missing, or is ``"ready"``."""
        snap = self.snapshot()
        return snap.ready, snap.reason


def _evaluate(
    model_loaded: bool,
    kafka_connected: bool,
    partitions: dict[TopicPartition, PartitionProgress],
    stuck: tuple[TopicPartition, ...],
    now: float,
) -> tuple[bool, str]:
    if not model_loaded:
        return False, "model not loaded"
    if not kafka_connected:
        return False, "Kafka consumer not connected"
    if not partitions:
        return False, "no partitions assigned to this consumer"
    if stuck:
        details = ", ".join(
            f"{topic}[{partition}] lag {partitions[(topic, partition)].lag} "
            f"without progress for {now - partitions[(topic, partition)].last_progress_s:.0f}s"
            for topic, partition in stuck
        )
        return False, f"consumer stuck: {details}"
    return True, "ready"


class MetricsServer:
    """A running ``/metrics``, ``/healthz``, ``/readyz`` server; :meth:`stop` shuts it down."""

    def __init__(self, httpd: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread

    @property
    def host(self) -> str:
        return self._httpd.server_address[0]

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        logger.info("metrics server on port %s stopped", self.port)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def start_metrics_server(
    port: int, metrics: WorkerMetrics, health: HealthState, host: str = "127.0.0.1"
) -> MetricsServer:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` from a daemon thread.

    ``port=0`` binds a free port (read it back from ``server.port``). Every scrape of
    ``/metrics`` first copies the health state into the health gauges, so the stuck
    consumer gauge is current even while the event loop is blocked.
    """
    handler = _make_handler(metrics, health)
    try:
        httpd = ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        from worker.exceptions import ConfigError

        raise ConfigError(
            f"failed to listen for metrics on {host}:{port}: {exc}; "
            "set --metrics.host (SINKSTREAM_METRICS__HOST) to an address of this machine and --metrics.port "
            "(SINKSTREAM_METRICS__PORT) to a free port, or the port to 0 to turn the server off"
        ) from exc
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-server", daemon=True)
    thread.start()
    server = MetricsServer(httpd, thread)
    logger.info("metrics server listening on %s:%s", server.host, server.port)
    return server


def _make_handler(metrics: WorkerMetrics, health: HealthState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._metrics()
            elif path == "/healthz":
                self._reply(200, b"ok\n")
            elif path == "/startupz":
                loaded = health.snapshot().model_loaded
                self._reply(200 if loaded else 503, b"model loaded\n" if loaded else b"model not loaded\n")
            elif path == "/readyz":
                snap = health.snapshot()
                metrics.update_health(snap)
                status = 200 if snap.ready else 503
                self._reply(status, (snap.reason + "\n").encode())
            else:
                self._reply(404, b"not found: try /metrics, /healthz, /startupz or /readyz\n")

        def _metrics(self) -> None:
            metrics.update_health(health.snapshot())
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._reply(200, encoder(metrics.registry), content_type)

        def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
            logger.debug("metrics server: " + format, *args)

    return Handler
