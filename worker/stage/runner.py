"""The engine thread: the only thread that touches the StreamEngine.

The asyncio loop must never run a forward pass, because aiokafka's heartbeats, fetches and
rebalance callbacks run on that loop. A consumer whose loop is blocked past the session
timeout is removed from the group and may never consume again. So
the engine lives in one dedicated thread: the loop puts commands on a queue, the thread
runs them between steps, and results come back to the loop with
``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

ResultsCallback = Callable[[list[Any], Any], None]
SubmitErrorCallback = Callable[[Any, Exception], None]


class EngineRunner:
    """Runs ``engine.step()`` in a dedicated thread while the engine has work.

    ``on_results(results, step_stats)`` is called on the asyncio loop after every step
    that produced results or stats. Commands run in submission order, between steps.
    """

    def __init__(
        self,
        engine: Any,
        loop: asyncio.AbstractEventLoop,
        on_results: ResultsCallback,
        on_submit_error: SubmitErrorCallback,
    ) -> None:
        self._engine = engine
        self._loop = loop
        self._on_results = on_results
        self._on_submit_error = on_submit_error
        self._commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="sinkstream-engine", daemon=True)
        self._stopping = False
        self.error: BaseException | None = None
        self.last_progress = time.monotonic()
        self.num_steps = 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Any) -> None:
        """Queue ``engine.submit(request)``; requests keep their order.

        A request the engine rejects goes to ``on_submit_error`` on the loop.
        """

        def command() -> None:
            try:
                self._engine.submit(request)
            except Exception as exc:
                self._loop.call_soon_threadsafe(self._on_submit_error, request, exc)

        self._commands.put(command)

    def call(self, function: Callable[[Any], Any]) -> asyncio.Future:
        """Run ``function(engine)`` in the engine thread and return a future of its result."""
        future = self._loop.create_future()

        def command() -> None:
            try:
                value = function(self._engine)
            except BaseException as exc:  # handed to the awaiting coroutine
                self._loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                self._loop.call_soon_threadsafe(_set_result, future, value)

        self._commands.put(command)
        return future

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the thread after the command in progress; unfinished engine work is abandoned."""
        self._stopping = True
        self._commands.put(None)
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            logger.warning("the engine thread did not stop within %.0f s; leaving it as a daemon", timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            while not self._stopping:
                # Block for commands only when there is nothing to step.
                if not self._drain_commands(block=not self._engine.has_work()):
                    return
                if self._stopping or not self._engine.has_work():
                    continue
                results = self._engine.step()
                self.num_steps += 1
                self.last_progress = time.monotonic()
                stats = getattr(self._engine, "last_step_stats", None)
                self._loop.call_soon_threadsafe(self._on_results, results, stats)
        except BaseException as exc:
            self.error = exc
            logger.exception("the engine thread failed; the worker stops")
            self._loop.call_soon_threadsafe(self._on_results, None, exc)

    def _drain_commands(self, block: bool) -> bool:
        """Run queued commands and return False once a stop command arrives."""
        while True:
            try:
                command = self._commands.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return True
            if command is None:
                return False
            command()
            block = False


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
