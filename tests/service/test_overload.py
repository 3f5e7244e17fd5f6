"""Overload control: admission by cost and deadline, drops of dead work, health under load, retries.

Functional: assertions are on status codes and counts, never on how long anything took.
"""
from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc
from service.client import AttributionClient, RetryPolicy, retry_delay
from service.server import model_health_name
from tests.service.conftest import explain_request
from workers.admission import AdmissionConfig, ModelAdmission
from workers.errors import Overloaded


# ---------------------------------------------------------------- the controller --

def test_admission_refuses_by_queue_bound_and_by_deadline():
    adm = ModelAdmission("m", AdmissionConfig(target_queue_delay_s=1.0, min_queued_cost=4,
                                              deadline_fraction=1.0))
    first = adm.admit(50, remaining_s=None)   # no rate yet: admitted, whatever the cost
    adm.rate, adm.measured = 100.0, True       # 100 cost units per second, measured
    tickets = [first] + [adm.admit(10, remaining_s=None) for _ in range(5)]
    assert adm.queued == 100 and adm.bound == 100
    with pytest.raises(Overloaded) as full:
        adm.admit(10, remaining_s=None)
    assert full.value.reason == "queue_full" and full.value.retry_after_s > 0
    for ticket in tickets[:3]:
        ticket.release(completed=True)
    assert adm.queued == 30
    with pytest.raises(Overloaded) as late:
        adm.admit(10, remaining_s=0.2)        # 0.4 s of work ahead, 0.2 s left
    assert late.value.reason == "deadline_too_short" and "0.20 s left" in late.value.message
    ticket = adm.admit(10, remaining_s=1.0)
    ticket.resize(20)
    assert adm.queued == 50
    ticket.release(completed=False)
    ticket.release(completed=False)            # idempotent
    assert adm.queued == 30


def test_rate_is_measured_only_over_busy_windows(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("workers.admission.time.monotonic", lambda: clock[0])
    adm = ModelAdmission("m", AdmissionConfig(smoothing=1.0))
    adm.observe_batch(10, 100.0)
    assert adm.rate == 100.0 and not adm.measured  # seeded from a batch's kernel rate
    assert adm.bound == float("inf")           # a seed never bounds the queue: one small batch says little
    backlog = [adm.admit(1, None) for _ in range(80)]
    clock[0] += 0.1
    backlog[0].release(True)                   # the window started idle: measures nothing
    clock[0] += 1.0
    backlog[1].release(True)
    assert adm.rate == 100.0
    for ticket in backlog[2:52]:               # a full window with work queued throughout: 50 units in 2 s
        clock[0] += 0.04
        ticket.release(True)
    assert adm.rate == pytest.approx(50 / 2.0, rel=0.05) and adm.measured
    assert adm.bound == pytest.approx(max(64, adm.rate))


def test_an_estimate_learnt_on_one_method_does_not_refuse_another_for_good(monkeypatch):
    """Grad-CAM traffic teaches a rate in cost units (1 per request); SmoothGrad-64 costs 64 units that
    run far faster per unit. Refused calls teach nothing, so the estimate must recover on its own."""
    clock = [1000.0]
    monkeypatch.setattr("workers.admission.time.monotonic", lambda: clock[0])
    adm = ModelAdmission("m", AdmissionConfig(smoothing=0.5, deadline_fraction=0.5))
    adm.rate, adm.measured = 50.0, True          # Grad-CAM: 50 requests (cost units) per second
    adm._measured_at = adm._seen_at = clock[0]
    with pytest.raises(Overloaded):              # 64 / 50 = 1.3 s predicted, 1 s allowed of a 2 s deadline
        adm.admit(64, remaining_s=2.0)
    clock[0] += 4.0                               # nothing confirmed the estimate since: stale
    ticket = adm.admit(64, remaining_s=2.0)       # an idle model takes the call rather than trust it
    for _ in range(6):                            # its batches (64 samples in 40 ms) pull the estimate up
        adm.observe_batch(64, 40.0)
        clock[0] += 0.05
    ticket.release(completed=True)
    assert adm.rate > 1000
    tickets = [adm.admit(64, remaining_s=2.0) for _ in range(8)]   # and several are admitted again
    assert adm.queued == 8 * 64
    for t in tickets:
        t.release(completed=True)


def test_a_confirmed_estimate_still_refuses_on_an_idle_model(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("workers.admission.time.monotonic", lambda: clock[0])
    adm = ModelAdmission("m")
    adm.observe_batch(100, 1000.0)                # 100 units per second, seen just now
    with pytest.raises(Overloaded) as refused:
        adm.admit(256, remaining_s=1.0)           # 2.6 s of work for a 1 s deadline
    assert refused.value.reason == "deadline_too_short"
    adm.observe_batch(100, 1000.0)                # a batch while a busy window confirms the rate ...
    adm.rate, adm.measured, adm._measured_at = 100.0, True, clock[0]
    adm.observe_batch(10, 1.0)                    # ... does not move it (10,000/s from one tiny batch)
    assert adm.rate == 100.0


# ------------------------------------------------------------ through a server --

def _status_of(exc: grpc.RpcError):
    return rpc_status.from_call(exc)


def _outcomes(futures) -> list[tuple[str, grpc.RpcError | None]]:
    """(status name, error) of each finished call future, in order."""
    out = []
    for future in futures:
        try:
            future.result()
            out.append(("OK", None))
        except grpc.RpcError as exc:
            out.append((exc.code().name, exc))
    return out


def test_overload_refuses_fast_admits_what_fits_and_health_stays_serving(start_server, demo_batch):
    harness = start_server(metrics_port=None)
    images = demo_batch.images[:1]
    health_failures, probes, stop = [], [0], threading.Event()

    def probe(channel):
        health = health_pb2_grpc.HealthStub(channel)
        while not stop.is_set():
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    health_failures.append(reply.status)
            except grpc.RpcError as exc:
                health_failures.append(exc.code())
            probes[0] += 1
            stop.wait(0.05)

    try:
        with grpc.insecure_channel(harness.address) as channel:
            stub = pb_grpc.AttributionServiceStub(channel)
            request = explain_request(images, pb.SMOOTHGRAD, noise={"samples": 16})
            for _ in range(3):  # the controller measures the model's rate from real batches
                stub.Explain(request, timeout=60)
            prober = threading.Thread(target=probe, args=(channel,), daemon=True)
            prober.start()
            futures = [stub.Explain.future(request, timeout=2.0) for _ in range(120)]
            outcomes = _outcomes(futures)
            codes, retry_infos = [code for code, _ in outcomes], 0
            for code, exc in outcomes:
                if code == "RESOURCE_EXHAUSTED":
                    info = error_details_pb2.RetryInfo()
                    retry_infos += any(d.Unpack(info) for d in _status_of(exc).details if d.Is(info.DESCRIPTOR))
            stop.set()
            prober.join(timeout=10)
            refused, ok = codes.count("RESOURCE_EXHAUSTED"), codes.count("OK")
            assert refused > 0 and ok > 0, codes
            assert retry_infos == refused
            assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}, set(codes)
            assert codes.count("DEADLINE_EXCEEDED") <= max(2, ok // 5), codes  # admitted calls mostly in time
            assert probes[0] > 0 and not health_failures, health_failures
            assert stub.Explain(request, timeout=60).items  # and it serves normally afterwards
    finally:
        harness.stop()


def test_max_concurrent_rpcs_limits_explain_only(start_server, demo_batch):
    harness = start_server(metrics_port=None, max_concurrent_rpcs=1)
    try:
        with grpc.insecure_channel(harness.address) as channel:
            stub = pb_grpc.AttributionServiceStub(channel)
            request = explain_request(demo_batch.images[:4], pb.SMOOTHGRAD, noise={"samples": 64})
            futures = [stub.Explain.future(request, timeout=120) for _ in range(6)]
            checks = [health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                      for _ in range(20)]
            assert all(c.status == health_pb2.HealthCheckResponse.SERVING for c in checks)
            assert stub.ListModels(pb.ListModelsRequest(), timeout=10).models
            codes = [code for code, _ in _outcomes(futures)]
            assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes
        text = harness.running.metrics.registry.get_sample_value(
            "attribution_requests_total", {"model": "demo", "method": "smoothgrad", "code": "RESOURCE_EXHAUSTED"})
        assert text == codes.count("RESOURCE_EXHAUSTED")  # refusals are counted
        assert harness.running.metrics.registry.get_sample_value(
            "attribution_rejected_total", {"model": "demo", "reason": "concurrency"}) == codes.count(
            "RESOURCE_EXHAUSTED")
    finally:
        harness.stop()


def test_per_model_health_is_reported(server):
    with grpc.insecure_channel(server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=model_health_name("demo")), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


class _CountingBackend:
    """Counts the requests that reach it; the servicer must not send it dead ones."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    async def models(self):
        return await self.inner.models()

    async def explain(self, spec):
        self.calls += 1
        return await self.inner.explain(spec)


class _Context:
    """A call whose deadline is a microsecond away: it passes while the request is validated."""

    def time_remaining(self):
        return 1e-6

    def cancelled(self):
        return False

    def done(self):
        return False


def test_a_request_whose_deadline_passed_in_validation_never_reaches_the_backend(demo_registry, demo_batch):
    from service.config import Limits
    from service.metrics import ServiceMetrics
    from service.backends.local import LocalBackend
    from service.flow import ExplainFlow

    async def run():
        backend = _CountingBackend(LocalBackend(demo_registry))
        metrics = ServiceMetrics()
        flow = ExplainFlow(backend, await backend.models(), Limits(), metrics)
        outcome = await flow.run(explain_request(demo_batch.images[:2], pb.GRAD_CAM), "r1", _Context().time_remaining)
        return backend.calls, outcome, metrics.registry.get_sample_value(
            "attribution_dropped_expired_total", {"stage": "front_door"})

    calls, outcome, dropped = asyncio.run(run())
    assert calls == 0 and dropped == 1
    assert outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED and "not computed" in outcome.message


# ------------------------------------------------------------------ the client --

class _Refuser(pb_grpc.AttributionServiceServicer):
    """Refuses the first `refusals` ListModels calls with RESOURCE_EXHAUSTED and a RetryInfo delay."""

    def __init__(self, refusals: int, delay_s: float):
        self.refusals, self.delay_s, self.arrivals = refusals, delay_s, []

    def ListModels(self, request, context):
        self.arrivals.append(time.monotonic())
        if len(self.arrivals) <= self.refusals:
            from service import errors

            status = errors.Status(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", retry_after_s=self.delay_s)
            context.abort_with_status(errors.grpc_status(status))
        return pb.ListModelsResponse()


@pytest.fixture()
def refuser():
    from concurrent.futures import ThreadPoolExecutor

    servicer = _Refuser(refusals=2, delay_s=0.3)
    server = grpc.server(ThreadPoolExecutor(4))
    pb_grpc.add_AttributionServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_client_retries_honour_retry_info(refuser):
    servicer, address = refuser
    with AttributionClient(address, retry=RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.02)) as client:
        client.models(timeout=30)
    assert len(servicer.arrivals) == 3
    gaps = np.diff(servicer.arrivals)
    assert (gaps >= 0.3).all()  # waited at least the suggested delay, not the 10-20 ms backoff


def test_client_gives_up_when_the_delay_would_pass_the_deadline(refuser):
    servicer, address = refuser
    with AttributionClient(address) as client:
        with pytest.raises(Exception) as info:
            client.models(timeout=0.2)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and len(servicer.arrivals) == 1


def test_retry_delay_is_read_from_the_trailers(refuser):
    _, address = refuser
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.AttributionServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
    assert retry_delay(info.value) == pytest.approx(0.3)
    assert ("grpc-retry-pushback-ms", "300") in info.value.trailing_metadata()


def test_deadline_races_log_no_errors(server, stub, demo_batch, caplog):
    import logging

    request = explain_request(demo_batch.images[:2], pb.SMOOTHGRAD, noise={"samples": 32})
    caplog.set_level(logging.INFO)
    futures = [stub.Explain.future(request, timeout=t) for t in (0.005, 0.02, 0.05, 0.1, 0.2) * 8]
    codes = {code for code, _ in _outcomes(futures)}
    time.sleep(0.5)  # let the server finish what it had started
    assert codes <= {"OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]
