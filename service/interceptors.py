"""Server interceptors: a request id for every log line, and optional bearer-token auth.

Both wrap the method handler instead of acting inside `intercept_service`
itself, so what they set (the request id) or refuse (a call without a token)
applies in the task that runs the handler, whatever the RPC's kind.
"""
from __future__ import annotations

import contextvars
import hmac
import inspect
import logging
import time
import uuid
from typing import Awaitable, Callable

import grpc

from service import errors

log = logging.getLogger(__name__)

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("attribution_request_id", default="")
REQUEST_ID_METADATA = "x-request-id"
MAX_REQUEST_ID_CHARS = 128

# Probes and tooling must work without the token: load balancers do not carry it,
# and grpcurl needs reflection before it can send anything.
EXEMPT_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                             "grpc.reflection.v1.ServerReflection"})


def current_request_id() -> str:
    """The id of the call this task serves ("" outside a call)."""
    return REQUEST_ID.get()


class RequestIdLogFilter(logging.Filter):
    """Adds `record.request_id`, so a format may say `%(request_id)s`."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get() or "-"
        return True


def _metadata_value(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for name, value in details.invocation_metadata or ():
        if name == key:
            return value if isinstance(value, str) else None
    return None


def _service_of(method: str) -> str:
    """'/pkg.Service/Method' -> 'pkg.Service'."""
    return method.lstrip("/").split("/", 1)[0]


_Behavior = Callable[..., object]


def _wrap_handler(handler: grpc.RpcMethodHandler,
                  before: Callable[[grpc.aio.ServicerContext], Awaitable[None]]) -> grpc.RpcMethodHandler:
    """The same handler with `before(context)` awaited at the start of the call, any RPC kind."""

    def wrap(behavior: _Behavior) -> _Behavior:
        if inspect.isasyncgenfunction(behavior):
            async def streaming(request, context):
                await before(context)
                async for response in behavior(request, context):
                    yield response
            return streaming

        async def single(request, context):
            await before(context)
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result
        return single

    return _rebuild(handler, wrap, handler.request_deserializer)


_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def _rebuild(handler: grpc.RpcMethodHandler, wrap: Callable[[_Behavior], _Behavior],
             request_deserializer) -> grpc.RpcMethodHandler:
    """`handler` with its behavior passed through `wrap` and the given request deserializer."""
    attr, build = _KINDS[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return build(wrap(getattr(handler, attr)), request_deserializer=request_deserializer,
                 response_serializer=handler.response_serializer)


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """Sets REQUEST_ID from `x-request-id` metadata, or a fresh uuid4 hex."""

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        given = _metadata_value(details, REQUEST_ID_METADATA)
        valid = given and len(given) <= MAX_REQUEST_ID_CHARS and given.isprintable()
        request_id = given if valid else uuid.uuid4().hex

        async def set_id(context) -> None:
            # Each RPC runs in its own task with its own context copy, so the
            # value dies with the call and needs no reset.
            REQUEST_ID.set(request_id)

        return _wrap_handler(handler, set_id)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` (UNAUTHENTICATED).

    Health checking and reflection stay open.
    """

    def __init__(self, token: str):
        if not token:
            raise ValueError("BearerTokenInterceptor needs a non-empty token")
        self._token = token.encode()

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        value = _metadata_value(details, "authorization") or ""
        scheme, _, credential = value.partition(" ")
        # compare_digest: the time taken must not tell how much of a guess was right.
        return scheme.lower() == "bearer" and hmac.compare_digest(credential.strip().encode(), self._token)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or _service_of(details.method) in EXEMPT_SERVICES or self._authorized(details):
            return handler

        async def refuse(context) -> None:
            await errors.abort_with(context, errors.Unauthenticated(
                "missing or invalid credentials: send metadata 'authorization: Bearer <token>'"))

        return _wrap_handler(handler, refuse)


class MalformedMessage:
    """Stands in for a request message that could not be parsed.

    Handlers never see one unless their method is listed as tolerant in
    `MalformedMessageInterceptor`; ExplainStream is, and answers it in-stream.
    """

    __slots__ = ("type_name",)

    def __init__(self, type_name: str):
        self.type_name = type_name

    @property
    def message(self) -> str:
        return (f"the message is not a valid {self.type_name}: its bytes are not a protobuf encoding of that "
                "type (truncated or corrupt data, invalid UTF-8 in a string field, or another message type)")


class RateLimitedLog:
    """Logs an event at most once per `every_s` per key, with the count of those not logged."""

    def __init__(self, logger: logging.Logger, every_s: float = 60.0):
        self._log, self._every = logger, every_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str, *args) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, -self._every) < self._every:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        suppressed = self._suppressed.pop(key, 0)
        self._last[key] = now
        suffix = f" ({suppressed} more since the last report)" if suppressed else ""
        self._log.warning(message + suffix, *args)
        return True


class MalformedMessageInterceptor(grpc.aio.ServerInterceptor):
    """Unparseable request messages end as INVALID_ARGUMENT with a plain message.

    Without it, grpc answers `UNKNOWN: Unexpected <class DecodeError>` and logs
    a traceback per message, which makes the log an easy target. Each event is
    counted (`attribution_malformed_messages_total`) and logged at most once a
    minute per method, without a traceback.
    """

    # Methods whose handler answers a malformed message itself (in-stream) instead of failing the call.
    TOLERANT = frozenset({"/attribution.v1.AttributionService/ExplainStream"})

    def __init__(self, metrics=None, log_every_s: float = 60.0):
        self._metrics = metrics
        self._log = RateLimitedLog(log, log_every_s)

    def _record(self, method: str, peer: str) -> None:
        if self._metrics is not None:
            self._metrics.malformed.labels(method.rsplit("/", 1)[-1] or "unknown").inc()
        self._log.warning(method, "malformed request message on %s from %s", method, peer)

    async def _refuse(self, context, method: str, bad: MalformedMessage) -> None:
        self._record(method, context.peer())
        await errors.abort(context, errors.Status(grpc.StatusCode.INVALID_ARGUMENT, bad.message))

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = details.method
        parse = handler.request_deserializer
        owner = getattr(parse, "__self__", None)
        type_name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "request message")

        def safe_parse(data: bytes):
            try:
                return parse(data)
            except Exception:  # DecodeError, RecursionError, ...: all mean the bytes are bad
                return MalformedMessage(type_name)

        tolerant = method in self.TOLERANT
        refuse, record = self._refuse, self._record

        def wrap(behavior: _Behavior) -> _Behavior:
            if handler.request_streaming:
                async def checked(requests, context):
                    async for request in requests:
                        if isinstance(request, MalformedMessage):
                            if not tolerant:
                                await refuse(context, method, request)
                            record(method, context.peer())
                        yield request

                if inspect.isasyncgenfunction(behavior):
                    async def streaming(requests, context):
                        async for response in behavior(checked(requests, context), context):
                            yield response
                    return streaming

                async def single(requests, context):
                    result = behavior(checked(requests, context), context)
                    return await result if inspect.isawaitable(result) else result
                return single

            if inspect.isasyncgenfunction(behavior):
                async def unary_streaming(request, context):
                    if isinstance(request, MalformedMessage):
                        await refuse(context, method, request)
                    async for response in behavior(request, context):
                        yield response
                return unary_streaming

            async def unary(request, context):
                if isinstance(request, MalformedMessage):
                    await refuse(context, method, request)
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result
            return unary

        return _rebuild(handler, wrap, safe_parse)
