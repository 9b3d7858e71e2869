"""Exceptions of the snapshot store and the checkpoint protocol."""

from __future__ import annotations

from worker.exceptions import SinkstreamError


class SnapshotError(SinkstreamError):
    """Base class of the errors raised by ``worker.state``."""


class SnapshotRejectedError(SnapshotError):
    """A snapshot cannot be loaded here; ``reason`` is a fixed code used in logs and metrics.

    Reason codes: ``checksum``, ``truncated``, ``format`` (not a snapshot, or an
    unknown format version), ``fingerprint`` (another model), ``engine_config``
    (other sinks, window, dtype or capacity), ``chain`` (a delta without its base).
    """

    REASONS = ("checksum", "truncated", "format", "fingerprint", "engine_config", "chain")

    def __init__(self, reason: str, message: str) -> None:
        assert reason in self.REASONS, f"unknown rejection reason {reason!r}"
        super().__init__(message)
        self.reason = reason


class StoreUnavailableError(SnapshotError):
    """Redis could not be reached or timed out after the configured retries."""

    retriable = True
