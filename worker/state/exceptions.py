"""Exceptions of the snapshot store and the checkpoint protocol."""

from __future__ import annotations

from worker.exceptions import SinkstreamError


class SnapshotError(SinkstreamError):
    """Base class of the errors raised by ``worker.state``."""


class SnapshotRejectedError(SnapshotError):
    """A snapshot cannot be loaded here; ``reason`` is a fixed code used in logs and metrics.

    Reason codes: ``checksum``, ``truncated``, ``format`` (not a snapshot, or an
    unknown format version), ``fingerprint`` (another model), ``engine_config``
    (other sinks, window, dtype or capacity), ``chain`` (a delta without its base),
    ``head`` (the stream's head key is damaged, see :class:`DamagedHeadError`).
    """

    REASONS = ("checksum", "truncated", "format", "fingerprint", "engine_config", "chain", "head")

    def __init__(self, reason: str, message: str) -> None:
        assert reason in self.REASONS, f"unknown rejection reason {reason!r}"
        super().__init__(message)
        self.reason = reason


class DamagedHeadError(SnapshotRejectedError):
    """A stream's head key that contains something other than a valid head hash.

    The key may have the wrong Redis type, or a chain field may hold invalid JSON or an
    invalid chain. Retrying cannot help, so this is permanent for the stream: a restore
    rejects the snapshot, and the next checkpoint deletes the key and writes a new base.
    """

    def __init__(self, stream_id: str, key: str, problem: str) -> None:
        super().__init__("head", f"the snapshot head key {key!r} of stream {stream_id!r} is damaged: {problem}")
        self.stream_id = stream_id
        self.key = key
        self.problem = problem


class StoreUnavailableError(SnapshotError):
    """Redis could not be reached or timed out after the configured retries."""

    retriable = True


class ChainConflictError(SnapshotError):
    """The stream's latest chain in Redis is not the one this worker last wrote or loaded.

    ``current`` is None when Redis lost the chain (a restart without persistence); then the
    next snapshot must be a new base. Otherwise another worker wrote the stream since, and
    this worker must not overwrite it.
    """

    def __init__(self, stream_id: str, current: object | None) -> None:
        if current is None:
            message = f"the snapshot chain of stream {stream_id} is missing from Redis"
        else:
            message = f"another worker replaced the snapshot chain of stream {stream_id}"
        super().__init__(message)
        self.stream_id = stream_id
        self.current = current
