"""create_server(config, backend) -> a started grpc.aio server with everything wired.

The server carries the AttributionService, the standard grpc.health.v1 service
(per-service status, Watch included), server reflection (grpcurl needs no
proto file), the request-id and optional auth interceptors, message size and
keepalive options, optional TLS, and a Prometheus exporter on its own port.
`RunningServer.stop()` flips health to NOT_SERVING first, so load balancers
drain the instance while in-flight calls finish within the grace period.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc
from service.backends.protocol import ExplainBackend
from service.config import MIB, DecodeConfig, ServerConfig
from service.decoding.pool import DecodePool, ImageDecoder, InlineDecoder
from service.interceptors import BearerTokenInterceptor, MalformedMessageInterceptor, RequestIdInterceptor
from workers.admission import Admission
from service.loop_lag import LagShedder, LoopLag
from service.metrics import AdmissionCollector, CoalescerCollector, ServiceMetrics, start_metrics_server
from service.flow import ExplainFlow, with_default_flag
from service.servicer import AttributionServicer

if TYPE_CHECKING:
    from service.audit import AuditConfig
    from service.jobs import JobsConfig

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AttributionService"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class _StatusRecorder:
    """A Watch call's context that notes when NOT_SERVING has gone out."""

    def __init__(self, context: grpc.aio.ServicerContext):
        self._context = context
        self.not_serving_sent = asyncio.Event()

    async def write(self, message: health_pb2.HealthCheckResponse) -> None:
        await self._context.write(message)
        if message.status == health_pb2.HealthCheckResponse.NOT_SERVING:
            self.not_serving_sent.set()

    def __getattr__(self, name: str):
        return getattr(self._context, name)


class DrainingHealthServicer(health_aio.HealthServicer):
    """The stock aio health service, whose Watch streams end once shutdown has been announced.

    A Watch stream never ends on its own, so without this every connected
    load balancer would hold `server.stop(grace)` for the full grace period.
    """

    # Watchers of a service that never turns NOT_SERVING (an unknown name) wait this long.
    FINAL_STATUS_WAIT_S = 1.0

    def __init__(self) -> None:
        super().__init__()
        self._draining = asyncio.Event()
        self._known: set[str] = {""}

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        self._draining.set()

    async def set(self, service: str, status) -> None:
        self._known.add(service)
        await super().set(service, status)

    async def Check(self, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckResponse:
        if request.service not in self._known and request.service != "":
            listed = ", ".join(repr(name) for name in sorted(self._known))
            shown = request.service if len(request.service) <= 64 else request.service[:61] + "..."
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no health status for service {shown!r}; this server reports: {listed} "
                                "('' is the server as a whole)")
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        recorder = _StatusRecorder(context)
        watching = asyncio.ensure_future(super().Watch(request, recorder))
        draining = asyncio.ensure_future(self._draining.wait())
        try:
            await asyncio.wait({watching, draining}, return_when=asyncio.FIRST_COMPLETED)
            if not watching.done():  # shutdown: let NOT_SERVING go out, then end the stream with OK
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(recorder.not_serving_sent.wait(), self.FINAL_STATUS_WAIT_S)
        finally:
            draining.cancel()
            watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching  # a failure of the stock Watch surfaces as such


@dataclass
class RunningServer:
    """A started server: where it listens, and how to stop it."""

    server: grpc.aio.Server
    config: ServerConfig
    port: int
    backend: ExplainBackend
    servicer: AttributionServicer
    health: DrainingHealthServicer
    metrics: ServiceMetrics
    metrics_port: int | None = None
    jobs: Any = None    # service.jobs.Jobs
    audit: Any = None   # service.audit.AuditLog
    decoder: ImageDecoder | None = None
    _stop_metrics: Callable[[], None] | None = field(default=None, repr=False)
    _watcher: asyncio.Task | None = field(default=None, repr=False)
    _lag: LoopLag | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def address(self) -> str:
        """host:port a client on this machine can dial."""
        host = self.config.host
        host = "localhost" if host in ("[::]", "0.0.0.0", "") else host
        return f"{host}:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, then in-flight calls get `grace` seconds, then the backend closes. Idempotent.

        Health Watch streams end as soon as they have sent NOT_SERVING, so
        connected load balancers do not hold the server for the whole grace
        period; an ExplainStream left open by its client does, up to `grace`.
        """
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_s if grace is None else grace
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self._lag is not None:
            await self._lag.stop()
        try:
            if self.jobs is not None:  # running jobs go back to the queue
                await self.jobs.stop()
            await self.backend.close()
        finally:
            if self.audit is not None:  # everything queued is written and synced
                await asyncio.to_thread(self.audit.close)
            if self._stop_metrics is not None:
                await asyncio.to_thread(self._stop_metrics)
            await asyncio.to_thread(_close_decoder, self.decoder)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def model_health_name(model: str) -> str:
    """The grpc.health.v1 service name that reports one model: NOT_SERVING while no replica of it runs."""
    return f"{SERVICE_NAME}/{model}"


# Reading `serve.status()` costs the front door several ms of CPU (the controller's answer
# becomes pydantic models): a steady poll every second took ~9% of a busy front door's
# samples. So it is read every REPLICA_POLL_S, at once when a call finds a replica gone
# (`ServeBackend.replicas_changed`), and every REPLICA_RECOVERY_POLL_S while a model has none.
REPLICA_POLL_S = 5.0
REPLICA_RECOVERY_POLL_S = 1.0


async def _watch_replicas(health: "DrainingHealthServicer", backend, models: list[str],
                          metrics: ServiceMetrics | None = None) -> None:
    """Keeps per-model health (and the replica metrics) true to the replicas Serve runs; the server stays
    SERVING while any model can."""
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    shown: dict[str, int] = {}
    live: dict[str, int] = {}
    while True:
        try:
            live = await backend.refresh_replicas()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Ray's controller busy or restarting: keep the last view, say so once
            log.warning("cannot read replica status (%s); health keeps its last state", type(exc).__name__)
        else:
            if metrics is not None:
                metrics.observe_replicas(live, models)
            for model in models:
                state = serving if live.get(model, 0) > 0 else not_serving
                if shown.get(model) != state:
                    if state == not_serving:
                        log.warning("model %s has no running replica: NOT_SERVING until Serve starts one", model)
                    await health.set(model_health_name(model), state)
                    shown[model] = state
            overall = serving if any(live.get(m, 0) > 0 for m in models) else not_serving
            for service in ("", SERVICE_NAME):
                if shown.get(service) != overall:
                    await health.set(service, overall)
                    shown[service] = overall
        changed = getattr(backend, "replicas_changed", None)
        wait = REPLICA_RECOVERY_POLL_S if any(live.get(m, 0) == 0 for m in models) else REPLICA_POLL_S
        if changed is None:
            await asyncio.sleep(wait)
            continue
        try:
            await asyncio.wait_for(changed.wait(), wait)
        except asyncio.TimeoutError:
            pass
        changed.clear()


def make_decoder(config: DecodeConfig, metrics: ServiceMetrics) -> ImageDecoder:
    """The server's decoder for client images: an isolated, started process pool unless configured inline."""
    if config.isolation == "inline":
        return InlineDecoder()
    return DecodePool(workers=config.workers, timeout_s=config.timeout_s, memory_bytes=config.memory_mb * MIB,
                      max_uses=config.max_uses, wait_s=config.wait_s,
                      on_event=lambda event: metrics.decode_events.labels(event).inc()).start()


def _close_decoder(decoder: ImageDecoder | None) -> None:
    close = getattr(decoder, "close", None)
    if close is not None:
        close()


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        # A second server on the same port must fail loudly, not share the traffic.
        ("grpc.so_reuseport", 0),
    ] + config.keepalive.channel_options()


def _bind(server: grpc.aio.Server, config: ServerConfig) -> int:
    """Adds the listening port (TLS, mutual when configured); returns the bound port. OSError when it cannot,
    InvalidArgument naming the key when a TLS file cannot be read."""
    try:
        if config.tls:
            key, cert, client_ca = config.read_tls()
            # With a client CA, the handshake itself refuses a client whose certificate it did not sign.
            credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                                      require_client_auth=client_ca is not None)
            port = server.add_secure_port(config.address, credentials)
        else:
            port = server.add_insecure_port(config.address)
    except RuntimeError as exc:  # grpc's way of saying the address is taken or invalid
        raise OSError(f"cannot listen on {config.address}: {exc}") from None
    if not port:
        raise OSError(f"cannot listen on {config.address}")
    return port


async def create_server(config: ServerConfig, backend: ExplainBackend, *, metrics: ServiceMetrics | None = None,
                        offline: Any = None, data_dir: pathlib.Path | None = None,
                        audit: "AuditConfig | None" = None, jobs: "JobsConfig | None" = None) -> RunningServer:
    """Builds, binds and starts the server; `RunningServer.port` is the bound port (config.port may be 0).

    The backend is asked for its models once, here; a backend that cannot
    answer fails the start rather than the first request. With `data_dir`,
    the server keeps an audit log there (`audit`, defaults when None); with an
    `offline` backend too, it runs the durable job queue (`jobs`). Whatever it
    opened is closed again when the start fails (the port is taken, ...).
    """
    metrics = metrics or ServiceMetrics()
    opened: list[Callable[[], Any]] = []  # closers of what is open so far, for a failed start
    try:
        decoder = make_decoder(config.decode, metrics)
        opened.append(lambda: _close_decoder(decoder))
        admission = Admission(config.admission)
        models = with_default_flag(await backend.models())  # once: a backend that cannot answer fails here
        audit_log = None
        if data_dir is not None:
            from service.audit import AuditConfig, AuditLog

            audit_config = audit or AuditConfig()
            audit_log = AuditLog(audit_config, audit_config.directory_for(data_dir), registry=metrics.registry)
            opened.append(audit_log.close)
        job_queue = None
        if offline is not None:
            from service.jobs import Jobs, JobsConfig

            job_queue = Jobs.create(data_dir, offline, models, limits=config.limits, config=jobs or JobsConfig(),
                                    registry=metrics.registry, decoder=decoder, audit=audit_log)
            opened.append(job_queue.close)
        lag = LoopLag()
        shedder = (LagShedder(lag, config.admission.max_loop_lag_s)
                   if config.admission.enabled and config.admission.max_loop_lag_s > 0 else None)
        flow = ExplainFlow(backend, list(models.values()), config.limits, metrics, decoder, admission,
                           config.max_concurrent_rpcs, audit=audit_log, inline_max_bytes=config.inline_max_bytes,
                           inline_max_calls=config.inline_max_calls, shedder=shedder)
        if job_queue is not None:
            flow.defaults = job_queue.defaults  # adopted recommendations apply to Explain too
        servicer = AttributionServicer(flow, config.stream_max_in_flight, jobs=job_queue)
        metrics.registry.register(AdmissionCollector(admission, lag))
        if getattr(backend, "coalescer", None) is not None:
            metrics.registry.register(CoalescerCollector(backend.coalescer))
        interceptors: list[grpc.aio.ServerInterceptor] = [MalformedMessageInterceptor(metrics), RequestIdInterceptor()]
        if config.auth_token:
            interceptors.append(BearerTokenInterceptor(config.auth_token))
        # No maximum_concurrent_rpcs here: it would refuse health checks too. The servicer applies
        # max_concurrent_rpcs to explain calls only, and counts its refusals.
        server = grpc.aio.server(interceptors=interceptors, options=server_options(config))
        pb_grpc.add_AttributionServiceServicer_to_server(servicer, server)
        health = DrainingHealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
        port = _bind(server, config)
        opened.append(lambda: server.stop(0))
        metrics_port, stop_metrics = None, None
        if config.metrics_port is not None:
            metrics_port, stop_metrics = start_metrics_server(config.metrics_port, metrics.registry,
                                                              config.metrics_host)
            opened.append(stop_metrics)
        await server.start()
        lag.start()
        opened.append(lag.stop)
    except BaseException:
        for close in reversed(opened):
            try:
                outcome = close()
                if asyncio.iscoroutine(outcome):
                    await outcome
            except Exception:  # the start's own failure is the one to report
                log.warning("cleanup after a failed start failed", exc_info=True)
        raise
    if servicer.jobs is not None:
        await servicer.jobs.start()  # recovers what a killed process left, then runs the queue
    for service in ("", SERVICE_NAME) + tuple(model_health_name(m) for m in servicer.models):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    watcher = None
    if hasattr(backend, "refresh_replicas"):
        watcher = asyncio.create_task(_watch_replicas(health, backend, list(servicer.models), metrics),
                                      name="replica-health")
    security = (" with mutual TLS" if config.tls_client_ca else " with TLS") if config.tls else ""
    log.info("serving %s on %s (port %d)%s; metrics on %s", SERVICE_NAME, config.host, port, security,
             metrics_port if metrics_port is not None else "no port")
    return RunningServer(server=server, config=config, port=port, backend=backend, servicer=servicer,
                         health=health, metrics=metrics, metrics_port=metrics_port, jobs=servicer.jobs,
                         audit=audit_log, decoder=decoder, _stop_metrics=stop_metrics, _watcher=watcher,
                         _lag=lag)

