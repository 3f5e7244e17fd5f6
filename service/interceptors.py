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
import uuid
from typing import Awaitable, Callable

import grpc

from service import errors

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

    kinds = {
        (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
        (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
        (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
        (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
    }
    attr, build = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return build(wrap(getattr(handler, attr)), request_deserializer=handler.request_deserializer,
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
