"""The front door's own saturation signal: how late its event loop runs, and the calls refused for it."""
from __future__ import annotations

import asyncio
import random
import time

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc
from service.backends.local import LocalBackend
from service.loop_lag import LagShedder, LoopLag
from tests.service.conftest import explain_request
from workers.admission import AdmissionConfig


def test_the_refused_share_grows_from_the_target_to_twice_it():
    lag = LoopLag()
    shedder = LagShedder(lag, target_s=0.05, rng=random.Random(0))
    for value, share in ((0.0, 0.0), (0.05, 0.0), (0.075, 0.5), (0.1, 1.0), (0.4, 1.0)):
        lag.lag = value
        assert abs(shedder.share() - share) < 1e-9
    lag.lag = 0.075
    decisions = [shedder.should_shed() for _ in range(2000)]
    assert 850 < sum(decisions) < 1150 and shedder.shed == sum(decisions)
    lag.lag = 0.01
    assert not any(shedder.should_shed() for _ in range(100))


def test_the_lag_follows_a_blocked_loop_and_settles_when_it_is_free():
    async def main():
        lag = LoopLag(interval_s=0.005, smoothing=0.5)
        lag.start()
        await asyncio.sleep(0.05)
        calm = lag.lag
        for _ in range(6):
            time.sleep(0.1)           # a callback that holds the loop
            await asyncio.sleep(0)     # one loop turn: the timer, due long ago, fires late
        blocked = lag.lag
        await asyncio.sleep(0.3)
        settled = lag.lag
        await lag.stop()
        return calm, blocked, settled
    calm, blocked, settled = asyncio.run(asyncio.wait_for(main(), 30))
    assert blocked > 0.05 and blocked > 5 * calm
    assert settled < blocked / 4


class LoopHoggingBackend:
    """A LocalBackend whose every call first holds the event loop: a front door with no CPU left."""

    def __init__(self, inner: LocalBackend, hold_s: float):
        self.inner, self.hold_s = inner, hold_s

    async def explain(self, spec):
        time.sleep(self.hold_s)
        return await self.inner.explain(spec)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_saturated_front_door_refuses_with_retry_info_and_health_keeps_answering(start_server, demo_registry,
                                                                                   demo_batch):
    harness = start_server(LoopHoggingBackend(LocalBackend(demo_registry), hold_s=0.08), metrics_port=None,
                           admission=AdmissionConfig(max_loop_lag_s=0.05))
    try:
        with grpc.insecure_channel(harness.address) as channel:
            stub = pb_grpc.AttributionServiceStub(channel)
            request = explain_request(demo_batch.images[:1], pb.GRAD_CAM)
            futures = [stub.Explain.future(request, timeout=60) for _ in range(40)]
            codes, busy = [], 0
            for future in futures:
                try:
                    future.result()
                    codes.append("OK")
                except grpc.RpcError as exc:
                    codes.append(exc.code().name)
                    status = rpc_status.from_call(exc)
                    info = error_details_pb2.RetryInfo()
                    if (exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "front door is saturated" in exc.details()
                            and any(d.Unpack(info) for d in status.details if d.Is(info.DESCRIPTOR))):
                        busy += 1
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
        assert codes.count("OK") > 0 and busy == codes.count("RESOURCE_EXHAUSTED") > 0, codes
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert harness.running.metrics.registry.get_sample_value(
            "attribution_rejected_total", {"model": "demo", "reason": "front_door_busy"}) == busy
        assert harness.running.metrics.registry.get_sample_value("attribution_event_loop_lag_seconds") > 0
    finally:
        harness.stop()


def test_off_by_default(start_server, demo_registry, demo_batch):
    harness = start_server(LoopHoggingBackend(LocalBackend(demo_registry), hold_s=0.08), metrics_port=None)
    try:
        with grpc.insecure_channel(harness.address) as channel:
            stub = pb_grpc.AttributionServiceStub(channel)
            request = explain_request(demo_batch.images[:1], pb.GRAD_CAM)
            futures = [stub.Explain.future(request, timeout=60) for _ in range(12)]
            assert all(f.result().items for f in futures)
    finally:
        harness.stop()
