"""Ray Serve's own gRPC proxy, set up for the front-door probe: the servicer variants and the ingress.

loadtests/frontdoor_probe.py tries the proxy three ways (see its docstring); the
registration functions below are what each way hands to Serve's gRPCOptions.
"""
from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any, Callable

import grpc

from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc

STOCK_SERVICER = "service._proto.attribution_pb2_grpc.add_AttributionServiceServicer_to_server"
GENERIC_SERVICER = "loadtests.serve_proxy.add_attribution_service_generic_only"
SHIM_SERVICER = "loadtests.serve_proxy.add_attribution_service_for_serve_proxy"
INGRESS_APP = "frontdoor-probe"
MODEL = "demo"
CALL_TIMEOUT_S = 60.0


def alias_proto_module() -> None:
    """Makes `attribution.v1.attribution_pb2` importable: the name protoc gave our message classes.

    Serve's proxy pickles each decoded request to the ingress replica, and pickle finds a
    class by its `__module__`; ours are generated for the proto package `attribution.v1`
    and committed as `service._proto`, so unpickling fails without this alias.
    """
    import types

    for name in ("attribution", "attribution.v1"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules.setdefault("attribution.v1.attribution_pb2", pb)
    sys.modules["attribution"].v1 = sys.modules["attribution.v1"]
    sys.modules["attribution.v1"].attribution_pb2 = pb


def add_attribution_service_generic_only(servicer, server) -> None:
    """The generated registration with its `add_registered_method_handlers` call dropped.

    Serve's proxy overrides only `add_generic_rpc_handlers` (to route every method to
    its own handler); stubs from recent grpcio-tools (1.85 here) also register the same methods as
    registered handlers, which take precedence and call the placeholder servicer.
    """

    class _GenericOnly:
        def add_generic_rpc_handlers(self, handlers) -> None:
            server.add_generic_rpc_handlers(handlers)

        def add_registered_method_handlers(self, service_name, handlers) -> None:
            pass

    pb_grpc.add_AttributionServiceServicer_to_server(servicer, _GenericOnly())


def add_attribution_service_for_serve_proxy(servicer, server) -> None:
    """`add_attribution_service_generic_only`, plus the message-module alias in the proxy's process."""
    alias_proto_module()
    add_attribution_service_generic_only(servicer, server)


class ProbeIngress:
    """The Serve-proxy ingress: Explain = validate -> the model's handle -> encode (the servicer's work)."""

    def __init__(self, models: list[str]):
        alias_proto_module()  # the proxy sends pickled requests
        self._models = models
        self._backend = None
        self._described = None

    async def Explain(self, request: pb.ExplainRequest) -> pb.ExplainResponse:
        from service import codec
        from service.config import Limits
        from service.backends.serve import ServeBackend
        from service.validation import resolve_model, validate_explain

        if self._backend is None:
            self._backend = ServeBackend(self._models)
            self._described = {m.name: m for m in await self._backend.models()}
        model = resolve_model(request.model, self._described)
        spec = await asyncio.to_thread(validate_explain, request, model, Limits())
        result = await self._backend.explain(spec)
        return await asyncio.to_thread(codec.encode_result, result, spec, model)


# ---------------------------------------------------------------- Serve's proxy --

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(servicer_function: str) -> int:
    """Serve with its proxy on this node, HTTP and gRPC on free loopback ports; answers the gRPC port."""
    from ray import serve
    from ray.serve.config import gRPCOptions

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()}, proxy_location="HeadOnly",
                grpc_options=gRPCOptions(port=port, grpc_servicer_functions=[servicer_function]))
    return port


def deploy(cache_dir: str) -> None:
    """The demo model as the product deploys it, plus the proxy's ingress application."""
    from ray import serve

    from workers.serve.app import AppConfig, deploy_all
    from workers.config import ModelConfig

    deploy_all(AppConfig(models=(ModelConfig(name=MODEL, source="demo"),), cache_dir=cache_dir))
    ingress = serve.deployment(ProbeIngress, name="ProbeIngress", max_ongoing_requests=64)
    serve.run(ingress.bind([MODEL]), name=INGRESS_APP, route_prefix="/" + INGRESS_APP)


def _rpc_outcome(call: Callable[[], Any]) -> dict:
    try:
        answer = call()
        return {"ok": True, "answer": answer}
    except grpc.RpcError as exc:
        return {"ok": False, "code": exc.code().name, "details": exc.details()}


def wire_services(port: int) -> dict:
    """What a gRPC client finds on `port`: grpc.health.v1 Check, reflection's service list, Serve's Healthz."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    from ray.serve.generated import serve_pb2, serve_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

        def listed() -> list[str]:
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            (reply,) = list(reflection.ServerReflectionInfo(iter([request]), timeout=10))
            return sorted(s.name for s in reply.list_services_response.service)

        return {
            "grpc.health.v1.Health/Check": _rpc_outcome(lambda: health_pb2.HealthCheckResponse.ServingStatus.Name(
                health.Check(health_pb2.HealthCheckRequest(), timeout=10).status)),
            "grpc.reflection.v1alpha.ServerReflection": _rpc_outcome(listed),
            "ray.serve.RayServeAPIService/Healthz": _rpc_outcome(lambda: serve_pb2_grpc.RayServeAPIServiceStub(
                channel).Healthz(serve_pb2.HealthzRequest(), timeout=10).message),
        }


def try_proxy_explain(port: int, request: pb.ExplainRequest) -> dict:
    """One Explain through Serve's proxy: the answer's first map shape, or the status and its exact text."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.AttributionServiceStub(channel)
        return _rpc_outcome(lambda: list(stub.Explain(request, metadata=(("application", INGRESS_APP),),
                                                     timeout=CALL_TIMEOUT_S).items[0].attributions[0].map.shape))


def proxy_status() -> dict:
    from ray import serve

    return {node: str(status) for node, status in serve.status().proxies.items()}


