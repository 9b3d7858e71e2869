"""Logging set-up for the command line, with repeated aiokafka messages rate-limited.

While a broker is down, aiokafka 0.14 logs each failed connect, metadata refresh, fetch
and coordinator request at ERROR, on every retry. One consumer and one producer against a
stopped local Tansu broker logged about 90 such lines a second
(``tests/test_logconfig.py`` measures this). ``RepeatFilter`` lets the first message of
each kind through, then at most one per interval with the number it suppressed, so an
outage stays visible in the log at a readable rate.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

RATE_LIMITED_LOGGERS = ("aiokafka",)
REPEAT_INTERVAL_S = 60.0

# Kinds are message templates, so the log calls of the limited libraries bound their number.
# This cap only guards against a library that logs preformatted messages.
_MAX_KINDS = 1024

_Kind = tuple[str, int, str]


@dataclass
class _KindState:
    passed_at: float
    num_suppressed: int = 0


class RepeatFilter(logging.Filter):
    """Rate-limit repeated records of the named loggers to one per ``interval_s`` per kind.

    A kind is the logger name, the level and the message template (``record.msg`` before
    ``%`` formatting), so "Unable connect to node with id %s: %s" is one kind whatever the
    node and the error. Records below ``min_level`` and records of other loggers always
    pass. A record that passes after suppressed ones of its kind gets their count appended
    to its message. A count is reported only when a later record of that kind passes, so
    the count of the last burst before the messages stop is never logged.

    Attach one instance to one handler. It changes the message of the records it passes,
    so a second handler on the same logger receives the changed message.
    """

    def __init__(
        self,
        logger_names: Iterable[str] = RATE_LIMITED_LOGGERS,
        interval_s: float = REPEAT_INTERVAL_S,
        min_level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        if not interval_s > 0:
            raise ValueError(f"interval_s must be positive, got {interval_s!r}; pass the seconds between repeats")
        self.logger_names = tuple(logger_names)
        self.interval_s = interval_s
        self.min_level = min_level
        self._clock = clock
        self._lock = threading.Lock()  # handlers may run in several threads
        self._kinds: dict[_Kind, _KindState] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level or not self._is_limited(record.name):
            return True
        kind = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        with self._lock:
            state = self._kinds.get(kind)
            if state is not None and now - state.passed_at < self.interval_s:
                state.num_suppressed += 1
                return False
            if state is None and len(self._kinds) >= _MAX_KINDS:
                self._forget_quiet_kinds(now)
            self._kinds[kind] = _KindState(passed_at=now)
        if state is not None and state.num_suppressed:
            elapsed_s = now - state.passed_at
            suffix = f"[{state.num_suppressed} more like this suppressed in the last {elapsed_s:.0f} s]"
            record.msg = f"{record.msg} {suffix}"
        return True

    def _is_limited(self, name: str) -> bool:
        return any(name == prefix or name.startswith(prefix + ".") for prefix in self.logger_names)

    def _forget_quiet_kinds(self, now: float) -> None:
        # Drops the kinds quiet for a full interval, or all kinds when none is, with their
        # pending suppressed counts. That only happens past _MAX_KINDS kinds.
        quiet = [kind for kind, state in self._kinds.items() if now - state.passed_at >= self.interval_s]
        for kind in quiet or list(self._kinds):
            del self._kinds[kind]


def configure_logging(level: str) -> None:
    """Log to stderr at ``level``, with repeated aiokafka warnings and errors rate-limited.

    ``level`` is one of LOG_LEVELS in any case; another value raises ValueError.

    At DEBUG every record passes, for debugging connection problems. Like
    ``logging.basicConfig``, this does nothing when the root logger already has handlers,
    because an embedding program (or pytest) owns logging then.
    """
    if level.upper() not in LOG_LEVELS:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LOG_LEVELS)}")
    handler = logging.StreamHandler()
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, handlers=[handler])
    root = logging.getLogger()
    if handler in root.handlers and root.level > logging.DEBUG:
        handler.addFilter(RepeatFilter())
