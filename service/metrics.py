"""The front door's Prometheus metrics: names, buckets, exporter.

Each `ServiceMetrics` owns its own `CollectorRegistry` (never the process-wide
default), so several servers can live in one process (tests) without
colliding. Names use base units and `_total` counters; labels stay low
cardinality: `model` is a configured model name (or "unknown"), `method` the
lower-case method name (or "unknown"), `code` the gRPC status name.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from workers.spec import ExplainResult, ExplainSpec

UNKNOWN = "unknown"

# End-to-end and per-stage latencies: 1 ms .. 2 min, roughly x2.5 apart.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# A batch's cost in samples (SmoothGrad-50 counts 50) and its request count: powers of two.
SAMPLE_BUCKETS = tuple(float(2**i) for i in range(0, 15))
REQUEST_BUCKETS = tuple(float(2**i) for i in range(0, 11))


class ServiceMetrics:
    """Every metric the front door records, on one private registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        reg = self.registry
        self._replicas_seen: dict[str, int] = {}  # the last read per model, for `replica_losses`
        self.requests = Counter("attribution_requests", "Explain requests answered, by final status.",
                                ["model", "method", "code"], registry=reg)
        self.latency = Histogram("attribution_request_latency_seconds",
                                 "Receipt to response, per request (streamed requests included).",
                                 ["model", "method"], buckets=LATENCY_BUCKETS, registry=reg)
        self.queue = Histogram("attribution_queue_seconds", "Time a request waited for a worker batch slot.",
                               ["model", "method"], buckets=LATENCY_BUCKETS, registry=reg)
        self.compute = Histogram("attribution_compute_seconds", "Kernel time of the batch a request rode in.",
                                 ["model", "method"], buckets=LATENCY_BUCKETS, registry=reg)
        self.batch_samples = Histogram("attribution_batch_samples", "Cost in samples of the batch a request "
                                       "rode in.", ["model"], buckets=SAMPLE_BUCKETS, registry=reg)
        self.batch_requests = Histogram("attribution_batch_requests", "Requests in the batch a request rode in.",
                                        ["model"], buckets=REQUEST_BUCKETS, registry=reg)
        self.samples = Counter("attribution_samples", "Samples explained (noisy copies, interpolation points, "
                               "plain items); rate() gives samples per second.", ["model", "method"], registry=reg)
        self.inflight = Gauge("attribution_inflight_requests", "Explain requests being processed now.",
                              registry=reg)
        self.decode_events = Counter("attribution_decode_worker_events", "Image decode worker events: started, "
                                     "crashed (a file killed it), timeout (a file took too long; killed), "
                                     "protocol (it answered out of protocol; killed).", ["event"], registry=reg)
        self.rejected = Counter("attribution_rejected", "Explain calls refused before any work, by model and reason: "
                                "queue_full, deadline_too_short (admission), front_door_busy (this process saturated), "
                                "concurrency (max_concurrent_rpcs), "
                                "backpressure (a replica's queue), no_replica.", ["model", "reason"], registry=reg)
        self.dropped = Counter("attribution_dropped_expired", "Requests dropped because their deadline passed or "
                               "their caller cancelled, by the stage that dropped them (front door here; "
                               "replicas count theirs in the worker metrics).", ["stage"], registry=reg)
        self.malformed = Counter("attribution_malformed_messages", "Request messages that could not be parsed, "
                                 "by RPC method.", ["method"], registry=reg)
        # Set by the replica watcher (service/server.py) from Serve's status, so alerts can see a model with
        # no live replica and replicas that die; a backend without replicas (in-process) exports neither.
        self.replicas = Gauge("attribution_model_replicas", "Replicas of the model's worker that Serve runs "
                              "(RUNNING), as last read.", ["model"], registry=reg)
        self.replica_losses = Counter("attribution_model_replica_losses", "Replicas gone between two reads of "
                                      "Serve's status (a replica died, or autoscaling removed it).", ["model"],
                                      registry=reg)

    @contextmanager
    def track_inflight(self) -> Iterator[None]:
        self.inflight.inc()
        try:
            yield
        finally:
            self.inflight.dec()

    def observe_request(self, model: str, method: str, code: str, seconds: float) -> None:
        """One finished request: its status and end-to-end latency."""
        self.requests.labels(model or UNKNOWN, method or UNKNOWN, code).inc()
        self.latency.labels(model or UNKNOWN, method or UNKNOWN).observe(max(0.0, seconds))

    def observe_replicas(self, live: dict[str, int], models: list[str]) -> None:
        """One read of the running replicas per model: the gauge, and the replicas lost since the last read."""
        for model in models:
            count = live.get(model, 0)
            # The counter exists from the first read (at 0), so increase() sees the first loss; the first
            # read is no loss, whatever it finds.
            losses = self.replica_losses.labels(model)
            if model in self._replicas_seen and count < self._replicas_seen[model]:
                losses.inc(self._replicas_seen[model] - count)
            self._replicas_seen[model] = count
            self.replicas.labels(model).set(count)

    def observe_result(self, spec: ExplainSpec, result: ExplainResult) -> None:
        """The worker's timings and batch of one successful request."""
        model, method = spec.model, spec.method
        self.queue.labels(model, method).observe(max(0.0, result.queue_ms) / 1e3)
        self.compute.labels(model, method).observe(max(0.0, result.compute_ms) / 1e3)
        if result.batch_requests:
            self.batch_samples.labels(model).observe(result.batch_samples)
            self.batch_requests.labels(model).observe(result.batch_requests)
        self.samples.labels(model, method).inc(spec.cost)


class AdmissionCollector:
    """The admission controllers' state per model, read at scrape time."""

    def __init__(self, admission, lag=None) -> None:
        self._admission = admission  # workers.admission.Admission
        self._lag = lag              # service.loop_lag.LoopLag, the front door's own saturation signal

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        rate = GaugeMetricFamily("attribution_admission_service_rate", "Estimated cost units (samples) per "
                                 "second the model's workers complete; 0 before the first measurement.",
                                 labels=["model"])
        queued = GaugeMetricFamily("attribution_admission_queued_cost", "Cost admitted by this front door and not "
                                   "finished yet.", labels=["model"])
        bound = GaugeMetricFamily("attribution_admission_queue_bound", "Queued cost beyond which calls are "
                                  "refused (rate x target_queue_delay_s); -1 before the first measurement.",
                                  labels=["model"])
        for name, model in sorted(self._admission.models().items()):
            rate.add_metric([name], model.rate or 0.0)
            queued.add_metric([name], model.queued)
            bound.add_metric([name], -1.0 if model.rate is None else model.bound)
        yield from (rate, queued, bound)
        if self._lag is not None:
            lag = GaugeMetricFamily("attribution_event_loop_lag_seconds", "How late the front door's event loop "
                                    "runs (smoothed); above server.admission.max_loop_lag_s new Explain calls are "
                                    "refused (reason front_door_busy).")
            lag.add_metric([], self._lag.lag)
            yield lag


class CoalescerCollector:
    """Handle calls to the replicas (service/backends/coalesce.py), read at scrape time."""

    def __init__(self, coalescer) -> None:
        self._coalescer = coalescer  # service.backends.coalesce.Coalescer

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c = self._coalescer
        calls = CounterMetricFamily("attribution_handle_calls", "Calls made to the replicas; requests per call = "
                                    "attribution_handle_call_requests_total / this.")
        calls.add_metric([], c.calls)
        requests = CounterMetricFamily("attribution_handle_call_requests", "Requests carried by those calls.")
        requests.add_metric([], c.requests)
        dropped = CounterMetricFamily("attribution_handle_call_dropped", "Requests whose deadline passed or whose "
                                      "caller cancelled while they waited for a call slot; never sent.")
        dropped.add_metric([], c.dropped)
        in_flight = GaugeMetricFamily("attribution_handle_calls_in_flight", "Calls sent and not answered yet.",
                                      labels=["model"])
        limit = GaugeMetricFamily("attribution_handle_call_limit", "Calls in flight allowed (a few per running "
                                  "replica); 0 = no bound.", labels=["model"])
        waiting = GaugeMetricFamily("attribution_handle_call_waiting", "Requests waiting for a call slot.",
                                    labels=["model"])
        for model in c.models():
            in_flight.add_metric([model], c.in_flight(model))
            limit.add_metric([model], c.limit(model))
            waiting.add_metric([model], c.waiting(model))
        yield from (calls, requests, dropped, in_flight, limit, waiting)


class Stopwatch:
    """Seconds since creation, on the monotonic clock."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


def start_metrics_server(port: int, registry: CollectorRegistry,
                         addr: str = "0.0.0.0") -> tuple[int, Callable[[], None]]:
    """Serves `registry` as Prometheus text on http://addr:port/metrics (port 0: any free one).

    Returns the bound port and a function that stops the exporter.
    """
    httpd, thread = start_http_server(port, addr=addr, registry=registry)

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

    return int(httpd.server_address[1]), stop
