"""The one error tree of the project.

Every failure a client can cause or observe is one of these types. They carry
no transport knowledge: `service/errors.py` is the only place that maps them to
gRPC status codes. `client_error` says whether the caller (4xx-like) or the
service (5xx-like) is at fault, classified once here.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One bad field: a dotted path into the request and what to fix."""

    field: str
    description: str


class AttributionError(Exception):
    """Base of every typed error. Subclasses set `client_error`."""

    client_error = False

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __reduce__(self):
        # Subclasses take other constructor arguments; rebuild from the state so
        # every error crosses process boundaries (Ray) intact.
        return (_restore, (type(self), self.message, dict(self.__dict__)))


def _restore(cls: type, message: str, state: dict) -> "AttributionError":
    exc = Exception.__new__(cls)
    Exception.__init__(exc, message)
    exc.__dict__.update(state)
    return exc


class InvalidArgument(AttributionError):
    """The request is malformed or a parameter is out of range."""

    client_error = True

    def __init__(self, message: str, violations: list[FieldViolation] | None = None):
        super().__init__(message)
        self.violations = list(violations or [])

    @classmethod
    def field(cls, field: str, description: str) -> "InvalidArgument":
        return cls(f"{field}: {description}", [FieldViolation(field, description)])


class NotFound(AttributionError):
    client_error = True


class ModelNotFound(NotFound):
    def __init__(self, name: str, known: list[str]):
        super().__init__(f"unknown model {name!r}; known models: {', '.join(sorted(known)) or 'none'}")
        self.name = name


class LayerNotFound(NotFound):
    def __init__(self, model: str, layer: str, known: list[str]):
        super().__init__(
            f"model {model!r} has no CAM-able layer {layer!r}; choose one of: {', '.join(known)}")
        self.layer = layer


class JobNotFound(NotFound):
    def __init__(self, job_id: str):
        super().__init__(f"no job with id {job_id!r}")
        self.job_id = job_id


class FailedPrecondition(AttributionError):
    """The request is well formed but cannot apply to the current state."""

    client_error = True


class Overloaded(AttributionError):
    """The service cannot take the request now: the caller should back off and retry.

    retry_after_s: the suggested delay (sent as google.rpc.RetryInfo); 0 = none given.
    reason: why, for metrics: "queue_full", "deadline_too_short", "concurrency", "backpressure".
    """

    client_error = True

    def __init__(self, message: str, retry_after_s: float = 0.0, reason: str = "queue_full"):
        super().__init__(message)
        self.retry_after_s = float(retry_after_s)
        self.reason = reason


class DeadlineExceeded(AttributionError):
    client_error = True


class Cancelled(AttributionError):
    client_error = True


class Unavailable(AttributionError):
    """A worker or dependency is down or shutting down; retrying may succeed.

    retry_after_s: the suggested delay (sent as google.rpc.RetryInfo); 0 = none given.
    """

    def __init__(self, message: str, retry_after_s: float = 0.0):
        super().__init__(message)
        self.retry_after_s = float(retry_after_s)


class ModelLoadError(AttributionError):
    """A model config or weights file cannot be loaded."""


class InternalError(AttributionError):
    """A bug or an unexpected failure; details stay in the server log."""
