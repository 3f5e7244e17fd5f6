"""Front-door configuration: dataclasses with bounds, read once at start.

A config file's `server:` section has this shape (every key optional)::

    server:
      host: "[::]"
      port: 50051                 # 0 = any free port (tests)
      metrics_port: 9090          # null = no exporter; 0 = any free port
      max_message_bytes: 67108864
      keepalive: {time_s: 60, timeout_s: 20, permit_without_calls: true, min_ping_interval_s: 10}
      auth_token: ""              # "" = no auth
      tls_cert: ""                # PEM paths; both or neither
      tls_key: ""
      tls_client_ca: ""           # PEM CA bundle; set = mutual TLS (clients need a certificate it signed)
      grace_s: 10
      stream_max_in_flight: 8
      max_concurrent_rpcs: 0      # 0 = unbounded
      torch_threads: 1            # front-door process only; replicas set their own
      cpu_affinity: []            # cores for the front door and the Ray daemons it starts; [] = none
      limits: {max_items: 64, max_samples: 256, max_steps: 512, max_top_k: 10,
               max_image_pixels: 16777216, max_request_id_chars: 128}
      admission: {enabled: true, target_queue_delay_s: 1, default_deadline_s: 30, deadline_fraction: 0.5,
                  min_queued_cost: 64, smoothing: 0.3, max_retry_after_s: 5, max_loop_lag_s: 0}
      decode: {isolation: process, workers: 2, timeout_s: 5, memory_mb: 1024, max_uses: 10000, wait_s: 10}
      coalesce: {max_requests: 32, max_cost: 256, max_in_flight_per_replica: 4, adaptive: false}   # requests sent as one call
      inline_max_bytes: 65536     # small tensor requests validated/encoded on the event loop; 0 = never
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import Any

from workers.admission import AdmissionConfig
from workers.affinity import check_cores
from workers.config import Limits  # noqa: F401  (the front door's limits are the kernels' too)
from workers.errors import InvalidArgument
from workers.schema import build, check

MIB = 1 << 20


def _read_pem(path: str, key: str, kind: str) -> bytes:
    """The bytes of the PEM file `path`, refused naming the config `key` when unreadable or holding no `kind`
    block ("CERTIFICATE", "PRIVATE KEY": the second also matches "EC PRIVATE KEY" and "RSA PRIVATE KEY")."""
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument.field(key, f"cannot read {path}: {exc.strerror or exc}") from None
    check(b"-----BEGIN " in data and f"{kind}-----".encode() in data, key, f"{path} holds no PEM {kind.lower()}")
    return data


@dataclass(frozen=True)
class KeepaliveConfig:
    """HTTP/2 keepalive: detects dead peers behind load balancers and NATs.

    time_s: server ping period on an idle connection.
    timeout_s: how long a ping may go unanswered before the connection is dropped.
    permit_without_calls: accept client pings on connections with no call.
    min_ping_interval_s: the shortest client ping period tolerated (faster is a GOAWAY).
    max_connection_idle_s: close connections idle this long; 0 = never.
    """

    time_s: float = 60.0
    timeout_s: float = 20.0
    permit_without_calls: bool = True
    min_ping_interval_s: float = 10.0
    max_connection_idle_s: float = 0.0

    def __post_init__(self) -> None:
        check(1 <= self.time_s <= 86400, "keepalive.time_s", "must be 1..86400 seconds")
        check(1 <= self.timeout_s <= 3600, "keepalive.timeout_s", "must be 1..3600 seconds")
        check(0 <= self.min_ping_interval_s <= 3600, "keepalive.min_ping_interval_s", "must be 0..3600 seconds")
        check(0 <= self.max_connection_idle_s <= 86400 * 7, "keepalive.max_connection_idle_s",
               "must be 0..604800 seconds")

    def channel_options(self) -> list[tuple[str, int]]:
        options = [
            ("grpc.keepalive_time_ms", int(self.time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", int(self.permit_without_calls)),
            ("grpc.http2.min_ping_interval_without_data_ms", int(self.min_ping_interval_s * 1000)),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        if self.max_connection_idle_s:
            options.append(("grpc.max_connection_idle_ms", int(self.max_connection_idle_s * 1000)))
        return options


@dataclass(frozen=True)
class DecodeConfig:
    """How the front door decodes PNG/JPEG bytes from clients.

    isolation: "process" (default): in a pool of worker processes, so a file
        that crashes a native decoder costs one worker, never the server;
        "inline": in the server's own process (Pillow; for trusted clients only).
    workers: decode processes (files decoded at once).
    timeout_s: the longest one file may take before its worker is killed.
    memory_mb: each worker's address-space limit.
    max_uses: requests a worker serves before it is replaced.
    wait_s: how long a request waits for a free worker before RESOURCE_EXHAUSTED.
    """

    isolation: str = "process"
    workers: int = 2
    timeout_s: float = 5.0
    memory_mb: int = 1024
    max_uses: int = 10_000
    wait_s: float = 10.0

    def __post_init__(self) -> None:
        check(self.isolation in ("process", "inline"), "server.decode.isolation", "must be process or inline")
        check(1 <= self.workers <= 256, "server.decode.workers", "must be 1..256")
        check(0.1 <= self.timeout_s <= 600, "server.decode.timeout_s", "must be 0.1..600 seconds")
        check(128 <= self.memory_mb <= 1 << 20, "server.decode.memory_mb", "must be 128..1048576")
        check(1 <= self.max_uses <= 10_000_000, "server.decode.max_uses", "must be 1..10000000")
        check(0.01 <= self.wait_s <= 600, "server.decode.wait_s", "must be 0.01..600 seconds")


@dataclass(frozen=True)
class CoalesceConfig:
    """Requests for one model and method travel to the replicas as one call
    (service/backends/coalesce.py): those of one event-loop turn, or, while the model's
    calls in flight are at their bound, all that arrive until one returns.

    max_requests: members of one call; 1 = every request its own call.
    max_cost: cost units (samples) of one call, so its first member never waits
        behind a second replica batch.
    max_in_flight_per_replica: calls in flight per running replica of a model; while
        all are taken, requests gather here and go together when one returns
        (0: no bound, each loop turn's requests go at once). Autoscaled models are never bounded.
    adaptive: the bound per replica is learnt per model from the calls' latency per cost unit
        (service/backends/limiter.py, a Gradient2-style limit), between 1 and
        max_in_flight_per_replica. Off by default: measured no better than the fixed bound
        (docs/benchmarks.md, *Adaptive calls in flight*).
    """

    max_requests: int = 32
    max_cost: int = 256
    max_in_flight_per_replica: int = 4
    adaptive: bool = False

    def __post_init__(self) -> None:
        check(1 <= self.max_requests <= 4096, "server.coalesce.max_requests", "must be 1..4096")
        check(1 <= self.max_cost <= 1_000_000, "server.coalesce.max_cost", "must be 1..1000000")
        check(0 <= self.max_in_flight_per_replica <= 1024, "server.coalesce.max_in_flight_per_replica",
              "must be 0..1024 (0: no bound)")

    def backend_options(self) -> dict[str, int | bool]:
        return {"coalesce_max_requests": self.max_requests, "coalesce_max_cost": self.max_cost,
                "max_in_flight_per_replica": self.max_in_flight_per_replica,
                "adaptive_in_flight": self.adaptive}


@dataclass(frozen=True)
class ServerConfig:
    """The gRPC front door.

    host, port: where to listen; port 0 takes any free port (RunningServer.port says which).
    metrics_port: Prometheus /metrics over HTTP; None = no exporter, 0 = any free port.
    metrics_host: the exporter's bind address.
    max_message_bytes: largest request or response; the default carries 16 float32
        224x224 RGB images in and their maps and overlays out with room to spare.
    keepalive: HTTP/2 keepalive settings.
    auth_token: when set, every call but health and reflection needs
        `authorization: Bearer <token>` metadata.
    tls_cert, tls_key: PEM file paths; both set = TLS, neither = plaintext.
    tls_client_ca: PEM file of the CA certificates a client's certificate must chain to; set =
        mutual TLS: a client without such a certificate is refused in the handshake, before any
        call (health and reflection too, so probes need a certificate). Needs tls_cert and tls_key.
        Works with auth_token: the certificate says which machine connects, the token is still asked.
    grace_s: on stop, how long in-flight calls may run before they are cancelled.
    stream_max_in_flight: requests of one ExplainStream processed at once.
    max_concurrent_rpcs: Explain calls (and ExplainStream requests) served at once
        before new ones are refused with RESOURCE_EXHAUSTED; 0 = unbounded. Health,
        reflection, ListModels and jobs are never refused by it.
    torch_threads: torch intra-op threads of the front-door process, applied by
        `attribution serve` when the kernels run in Serve replicas. Its tensor work
        (decode, normalize, encode maps) is per request and small, so threads do not
        pay there, and idle OpenMP threads spin on the cores the replicas compute on.
    cpu_affinity: cores `attribution serve` pins its process to before it starts
        Ray, so the Ray daemons it starts inherit them; give the replicas the other
        cores (`models[].cpu_affinity`). Empty: no pinning.
    limits: per-request limits.
    decode: how client PNG/JPEG bytes are decoded (isolated worker processes by default).
    admission: refusing by cost and deadline (workers/admission.py).
    coalesce: requests that travel to the replicas together (service/backends/coalesce.py).
    inline_max_bytes: while at most `inline_max_calls` explain calls are in progress, tensor
        requests (and results without overlays) at most this big are validated (encoded) on the
        event loop instead of a worker thread, where the hop costs more than the work. 0 = always
        on a thread. Images are always decoded off the loop.
    inline_max_calls: calls in progress up to which small work stays on the event loop; beyond,
        it goes to worker threads (0 = no bound: small work is always inline).
    """

    host: str = "[::]"
    port: int = 50051
    metrics_port: int | None = 9090
    metrics_host: str = "0.0.0.0"
    max_message_bytes: int = 64 * MIB
    keepalive: KeepaliveConfig = field(default_factory=KeepaliveConfig)
    auth_token: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    grace_s: float = 10.0
    stream_max_in_flight: int = 8
    max_concurrent_rpcs: int = 0
    torch_threads: int = 1
    cpu_affinity: tuple[int, ...] = ()
    limits: Limits = field(default_factory=Limits)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    coalesce: CoalesceConfig = field(default_factory=CoalesceConfig)
    inline_max_bytes: int = 64 * 1024
    inline_max_calls: int = 0

    def __post_init__(self) -> None:
        check(bool(self.host), "server.host", "must not be empty")
        check(0 <= self.port <= 65535, "server.port", "must be 0..65535")
        check(self.metrics_port is None or 0 <= self.metrics_port <= 65535, "server.metrics_port",
               "must be 0..65535 or null")
        check(MIB <= self.max_message_bytes <= 2**31 - 1, "server.max_message_bytes", "must be 1 MiB..2 GiB")
        check(bool(self.tls_cert) == bool(self.tls_key), "server.tls_cert",
               "tls_cert and tls_key must be given together")
        check(not self.tls_client_ca or self.tls, "server.tls_client_ca",
              "needs tls_cert and tls_key: client certificates are asked for in a TLS handshake")
        check(self.auth_token == self.auth_token.strip(), "server.auth_token", "must not have surrounding spaces")
        check(0 <= self.grace_s <= 3600, "server.grace_s", "must be 0..3600 seconds")
        check(1 <= self.stream_max_in_flight <= 1024, "server.stream_max_in_flight", "must be 1..1024")
        check(0 <= self.max_concurrent_rpcs <= 1_000_000, "server.max_concurrent_rpcs", "must be 0..1e6")
        check(1 <= self.torch_threads <= 1024, "server.torch_threads", "must be 1..1024")
        check(0 <= self.inline_max_bytes <= 16 * MIB, "server.inline_max_bytes", "must be 0..16 MiB")
        check(0 <= self.inline_max_calls <= 1_000_000, "server.inline_max_calls", "must be 0..1000000")
        check(isinstance(self.cpu_affinity, (list, tuple)), "server.cpu_affinity", "must be a list of core numbers")
        try:
            object.__setattr__(self, "cpu_affinity", check_cores(self.cpu_affinity, "server.cpu_affinity"))
        except ValueError as exc:
            raise InvalidArgument.field("server.cpu_affinity", str(exc).split(": ", 1)[1]) from None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def read_tls(self) -> tuple[bytes, bytes, bytes | None]:
        """(key, certificate chain, client CA or None) as PEM bytes, for a TLS server.

        Read here, not when the config is built: the files may live only where the server runs (a
        mounted secret). `attribution serve` calls it before Ray starts, so a missing or wrong file
        is one line naming its key, not a failure deep in grpc's handshake setup.
        """
        check(self.tls, "server.tls_cert", "TLS is not configured")
        key = _read_pem(self.tls_key, "server.tls_key", "PRIVATE KEY")
        cert = _read_pem(self.tls_cert, "server.tls_cert", "CERTIFICATE")
        client_ca = _read_pem(self.tls_client_ca, "server.tls_client_ca", "CERTIFICATE") if self.tls_client_ca else None
        return key, cert, client_ca

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, path: str = "server") -> "ServerConfig":
        """Builds a config from a plain dict (a parsed YAML/JSON `server:` section)."""
        return build(cls, raw, path)
