"""Exceptions of the worker package, all rooted at :class:`SinkstreamError`."""


class SinkstreamError(Exception):
    """Base class of every error sinkstream raises on purpose."""

    retriable: bool = False


class ConfigError(SinkstreamError, ValueError):
    """A setting is invalid; the message names the setting, the value and the fix."""


class UnsupportedModelError(SinkstreamError):
    """The model's architecture cannot run with a position-reassigning sink + window cache."""


class ModelNotFoundError(SinkstreamError):
    """No model at the given path; the message says how to fetch one."""


class CapacityError(SinkstreamError):
    """The configured cache pool does not fit in the device's memory."""


class InvalidEventError(SinkstreamError, ValueError):
    """An input event cannot be processed; ``reason`` is a fixed dead-letter reason code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ServiceError(SinkstreamError):
    """A local service (broker, Redis) failed to start or stop."""

    retriable = True
