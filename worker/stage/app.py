"""Assemble and run one worker process: model, engine, hooks, metrics and the consume loop."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from worker.stage.hooks import NoStateHooks, StreamStateHooks
from worker.stage.settings import WorkerSettings
from worker.stage.worker import StageWorker

logger = logging.getLogger(__name__)


def build_engine(settings: WorkerSettings) -> Any:
    """Load the model and build the engine from ``settings.engine``."""
    from worker.engine import EngineConfig, StreamEngine, load_model

    engine_settings = settings.engine
    config = EngineConfig(
        sink_tokens=engine_settings.sink_tokens,
        window_tokens=engine_settings.window_tokens,
        prefill_chunk_tokens=engine_settings.prefill_chunk_tokens,
        max_resident_streams=engine_settings.max_resident_streams,
        max_host_streams=engine_settings.max_host_streams,
        max_batch_tokens=engine_settings.max_batch_tokens,
        dtype=engine_settings.dtype,
        device=engine_settings.device,
    )
    loaded = load_model(engine_settings.model_path, dtype=engine_settings.dtype, device=engine_settings.device,
                        capacity=config.capacity)
    return StreamEngine(loaded, config)


def build_hooks(settings: WorkerSettings, engine: Any, metrics: Any | None) -> StreamStateHooks:
    """Return the state hooks that ``checkpoint.store`` selects."""
    if settings.checkpoint.store == "none":
        return NoStateHooks()
    from worker.state.hooks import from_worker_settings

    return from_worker_settings(settings, engine, metrics)


async def run_worker(
    settings: WorkerSettings,
    engine: Any | None = None,
    hooks: StreamStateHooks | None = None,
    install_signal_handlers: bool = True,
    created: asyncio.Future | None = None,
) -> StageWorker:
    """Run a worker until SIGTERM or SIGINT, then shut down within ``stage.shutdown_grace_s``.

    ``created`` receives the :class:`StageWorker` once it exists, so that an embedding
    program (the demo) can stop it with ``request_stop()``.
    """
    from worker.metrics import HealthState, WorkerMetrics, start_metrics_server

    metrics = WorkerMetrics()
    health = HealthState(stuck_after_s=settings.metrics.stuck_after_s,
                         max_unsafe_s=settings.checkpoint.max_unsafe_s)
    server = None
    if settings.metrics.port:
        server = start_metrics_server(settings.metrics.port, metrics, health, host=settings.metrics.host)
        logger.info("metrics on %s (listening on %s)", server.url,
                    "all interfaces" if server.host in ("0.0.0.0", "") else server.host)
    try:
        if engine is None:
            engine = await asyncio.to_thread(build_engine, settings)
        health.set_model_loaded(True)
        fingerprint = getattr(getattr(engine, "loaded", None), "fingerprint", "")
        metrics.set_engine_info({
            "model_fingerprint": fingerprint,
            "sink_tokens": settings.engine.sink_tokens,
            "window_tokens": settings.engine.window_tokens,
            "dtype": settings.engine.dtype,
            "device": settings.engine.device,
        })
        hooks = hooks or build_hooks(settings, engine, metrics)
        worker = StageWorker(settings, engine, hooks=hooks, metrics=metrics, health=health,
                             model_fingerprint=fingerprint)
        if install_signal_handlers:
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, _on_signal, worker, signum)
        if created is not None:
            created.set_result(worker)
        try:
            await worker.run()
        finally:
            close = getattr(hooks, "close", None)
            if close is not None:
                await close()
        return worker
    finally:
        if server is not None:
            server.stop()


def _on_signal(worker: StageWorker, signum: int) -> None:
    logger.info("received %s; stopping within %.0f s", signal.Signals(signum).name, worker.settings.stage.shutdown_grace_s)
    worker.request_stop()
