"""The one mapping from the error tree to gRPC statuses.

This is the only module that knows status codes. Everything below the front
door raises `workers.errors` types; the servicer hands whatever it caught to
`classify` once, and the resulting `Status` goes to the client either as the
call's status (`abort`) or, inside ExplainStream, as `ExplainResponse.error`.

Unexpected exceptions become INTERNAL with a generic message and an error id;
the traceback goes to the server log under that id and never to the client.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import NoReturn

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from workers import errors as werr

log = logging.getLogger(__name__)

# Trailing metadata is capped (8 KiB by default on most clients); a request
# with hundreds of bad fields must not turn into an unreadable transport error.
MAX_VIOLATIONS = 20
MAX_DESCRIPTION_CHARS = 300
MAX_MESSAGE_CHARS = 1000


class Unauthenticated(werr.AttributionError):
    """The call carries no valid credentials (the auth interceptor raises it)."""

    client_error = True


class Unimplemented(werr.AttributionError):
    """The RPC exists in the contract but this server does not offer it yet."""

    client_error = True


# Order matters: the first matching base wins, so subclasses come first.
_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (werr.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (werr.NotFound, grpc.StatusCode.NOT_FOUND),
    (werr.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (werr.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (werr.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (werr.Cancelled, grpc.StatusCode.CANCELLED),
    (werr.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
)


@dataclass(frozen=True)
class Status:
    """A classified failure: what the client is told, and nothing more."""

    code: grpc.StatusCode
    message: str
    violations: tuple[werr.FieldViolation, ...] = field(default=())
    retry_after_s: float = 0.0  # > 0: a google.rpc.RetryInfo detail suggests this delay
    reason: str = ""            # RESOURCE_EXHAUSTED: why (metrics)

    @property
    def code_number(self) -> int:
        """google.rpc.Code value, as ExplainError.code carries it."""
        return int(self.code.value[0])

    @property
    def code_name(self) -> str:
        """Upper-case status name, the metrics' `code` label."""
        return self.code.name

    def to_rpc_status(self) -> status_pb2.Status:
        """google.rpc.Status, with a BadRequest detail when fields are named."""
        rich = status_pb2.Status(code=self.code_number, message=self.message)
        if self.violations:
            bad = error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in self.violations])
            rich.details.add().Pack(bad)
        if self.retry_after_s > 0:
            info = error_details_pb2.RetryInfo()
            info.retry_delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            rich.details.add().Pack(info)
        return rich


OK = Status(grpc.StatusCode.OK, "")


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def classify(exc: BaseException) -> Status:
    """The status `exc` stands for; logs server faults with a fresh error id.

    Call it once per failure: an unexpected exception is logged (traceback
    included) each time it is classified.
    """
    for kind, code in _CODES:
        if isinstance(exc, kind):
            message = _truncate(getattr(exc, "message", None) or str(exc) or code.name.lower(), MAX_MESSAGE_CHARS)
            violations = tuple(
                werr.FieldViolation(v.field, _truncate(v.description, MAX_DESCRIPTION_CHARS))
                for v in getattr(exc, "violations", ())[:MAX_VIOLATIONS])
            if not exc.client_error:
                log.warning("request failed with %s: %s", code.name, message)
            return Status(code, message, violations, retry_after_s=float(getattr(exc, "retry_after_s", 0.0)),
                          reason=str(getattr(exc, "reason", "")))
    error_id = uuid.uuid4().hex[:16]
    log.error("internal error %s", error_id, exc_info=(type(exc), exc, exc.__traceback__))
    return Status(grpc.StatusCode.INTERNAL,
                  f"internal error (error id {error_id}); the details are in the server log")


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, message) of `exc`; see `classify`."""
    status = classify(exc)
    return status.code, status.message


def code_from_number(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode for a google.rpc.Code number (UNKNOWN when unknown)."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


class _StatusWithPushback(grpc.Status):
    def __init__(self, code, details, trailing_metadata):
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata


def grpc_status(status: Status) -> grpc.Status:
    """The grpc.Status to abort with: google.rpc.Status details, plus `grpc-retry-pushback-ms` when a
    retry delay is suggested (gRPC's own retry policies honour it; our client reads RetryInfo)."""
    plain = rpc_status.to_status(status.to_rpc_status())
    if status.retry_after_s <= 0:
        return plain
    pushback = (("grpc-retry-pushback-ms", str(max(1, int(status.retry_after_s * 1000)))),)
    return _StatusWithPushback(plain.code, plain.details, tuple(plain.trailing_metadata) + pushback)


async def abort(context: grpc.aio.ServicerContext, status: Status) -> NoReturn:
    """Ends the call with `status`; the rich status rides in the trailers."""
    await context.abort_with_status(grpc_status(status))
    raise RuntimeError("abort_with_status returned")  # unreachable: it always raises


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """Classifies `exc` and ends the call with its status."""
    await abort(context, classify(exc))
