"""Overload control on the real Serve deployment: dead work never reaches a kernel.

Counts come from the replica itself (`OnlineWorker.overload_stats`), so the
assertions say what was computed, not how long anything took.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc
from service.config import Limits
from service.backends.serve import ServeBackend
from service.server import model_health_name
from service.validation import validate_explain
from tests.service.conftest import explain_request
from tests.support import LoopThread, start_front_door
from workers.serve.app import AppConfig, app_name, deploy_all, shutdown_all
from workers.config import BatchingConfig, ModelConfig

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def deployed(ray_session, demo_cache_dir):
    from ray import serve

    app = AppConfig(models=(ModelConfig(name="demo", source="demo"),), cache_dir=str(demo_cache_dir),
                    batching=BatchingConfig(max_concurrent_batches=1, batch_wait_timeout_s=0.005,
                                            fold_max_rows=64))
    deploy_all(app)
    backend = ServeBackend.from_config(app)
    loop = LoopThread()
    running = start_front_door(loop, backend)
    yield serve.get_app_handle(app_name("demo")), running, backend
    loop.call(running.stop(0.0))
    loop.close()
    shutdown_all(app)


def _spec(images, samples: int, deadline: float | None = None):
    from tests.hostile.fuzz import DEMO

    spec = validate_explain(explain_request(images, pb.SMOOTHGRAD, noise={"samples": samples}), DEMO, Limits())
    return dataclasses.replace(spec, deadline=deadline)


def _stats(handle) -> dict:
    return handle.overload_stats.remote().result(timeout_s=60)


def test_a_flood_of_expired_requests_never_reaches_a_kernel(deployed, demo_batch):
    handle, *_ = deployed
    before = _stats(handle)
    responses = [handle.explain.remote(_spec(demo_batch.images[:1], 8, deadline=time.time() - 1))
                 for _ in range(40)]
    outcomes = [r.result(timeout_s=60) for r in responses]
    after = _stats(handle)
    assert {type(o).__name__ for o in outcomes} <= {"DeadlineExceeded", "Overloaded"}
    assert after["computed"] == before["computed"]
    dropped = lambda s: s["refused"] + s["dropped_waiting"] + s["dropped_in_batch"]
    assert dropped(after) - dropped(before) == 40


def test_cancelled_requests_are_removed_from_the_backlog(deployed, demo_batch):
    handle, *_ = deployed
    before = _stats(handle)
    busy = handle.explain.remote(_spec(demo_batch.images, 128))   # holds the only compute slot
    time.sleep(0.2)
    queued = [handle.explain.remote(_spec(demo_batch.images[:1], 32)) for _ in range(6)]
    time.sleep(0.2)
    for response in queued:
        response.cancel()
    assert type(busy.result(timeout_s=120)).__name__ == "ExplainResult"
    time.sleep(0.5)
    after = _stats(handle)
    assert after["computed"] - before["computed"] == 1, (before, after)


def _wait_for(handle, predicate, what: str, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = _stats(handle)
        if predicate(stats):
            return stats
        time.sleep(0.01)
    raise AssertionError(f"the replica never reported {what} within {timeout_s} s: {_stats(handle)}")


def test_a_request_cancelled_mid_fold_leaves_its_remaining_chunks_uncomputed(deployed, demo_batch):
    handle, *_ = deployed
    _wait_for(handle, lambda s: not s["computing"], "an idle model")
    before = _stats(handle)
    # 32 items x 256 noisy copies = 8,192 rows, folded in 128 chunks of 64 (fold_max_rows).
    images = demo_batch.images.repeat(4, 1, 1, 1)
    response = handle.explain.remote(_spec(images, 256))
    # Cancelled once the fold has run a chunk and asked (not before: then it is dropped at a stage boundary).
    _wait_for(handle, lambda s: s["fold_checks"] > before["fold_checks"], "the fold running its chunks")
    response.cancel()
    after = _wait_for(handle, lambda s: s["dropped_in_batch"] > before["dropped_in_batch"],
                      "the request dropped inside its batch")
    assert after["computed"] == before["computed"]
    skipped = after["rows_skipped"] - before["rows_skipped"]
    assert 0 < skipped < 8192 and skipped % 64 == 0, (before, after)


def test_clients_that_cancel_leave_no_work_behind(deployed, demo_batch):
    handle, running, _ = deployed
    before = _stats(handle)
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.AttributionServiceStub(channel)
        busy = stub.Explain.future(explain_request(demo_batch.images, pb.SMOOTHGRAD, noise={"samples": 128}),
                                   timeout=120)
        time.sleep(0.2)
        small = explain_request(demo_batch.images[:1], pb.SMOOTHGRAD, noise={"samples": 32})
        cancelled = [stub.Explain.future(small, timeout=120) for _ in range(6)]
        time.sleep(0.3)
        for future in cancelled:
            future.cancel()
        busy.result()
        time.sleep(0.5)
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=model_health_name("demo")), timeout=10)
    after = _stats(handle)
    assert after["computed"] - before["computed"] == 1, (before, after)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_concurrent_calls_share_handle_calls_and_answer_as_if_alone(deployed, demo_batch):
    import numpy as np

    _, running, backend = deployed
    request = explain_request(demo_batch.images[:1], pb.SMOOTHGRAD, noise={"samples": 4})
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.AttributionServiceStub(channel)
        alone = stub.Explain(request, timeout=60)
        calls, requests = backend.coalescer.calls, backend.coalescer.requests
        futures = [stub.Explain.future(request, timeout=60) for _ in range(24)]
        together = [f.result() for f in futures]
    sent_calls = backend.coalescer.calls - calls
    assert backend.coalescer.requests - requests == 24
    assert sent_calls < 24, "no two of 24 concurrent calls travelled together"
    reference = np.frombuffer(alone.items[0].attributions[0].map.data, np.float32)
    for response in together:
        got = np.frombuffer(response.items[0].attributions[0].map.data, np.float32)
        np.testing.assert_allclose(got, reference, rtol=0, atol=1e-6)


def test_batch_wait_adapts_to_an_idle_model_and_to_a_burst(deployed, demo_batch):
    handle, *_ = deployed
    time.sleep(0.5)                                   # quiet: longer than the 5 ms wait since the last arrival
    assert type(handle.explain.remote(_spec(demo_batch.images[:1], 2)).result(timeout_s=60)).__name__ == \
        "ExplainResult"
    assert _stats(handle)["batch_wait_s"] == 0.0      # a lone request to an idle model went at once
    burst = [handle.explain.remote(_spec(demo_batch.images[:1], 2)) for _ in range(12)]
    assert {type(r.result(timeout_s=120)).__name__ for r in burst} == {"ExplainResult"}
    assert _stats(handle)["batch_wait_s"] == 0.005    # arrivals close together: batches wait to fill


def test_requests_held_for_a_call_slot_expire_in_the_front_door_without_reaching_the_replica(deployed, demo_batch):
    """With one call in flight per replica, a long call holds the slot: requests behind it wait in the front
    door, and those whose deadline passes there are never sent (the replica's counters do not move)."""
    from workers.errors import DeadlineExceeded

    handle, _, _ = deployed
    backend = ServeBackend(["demo"], max_in_flight_per_replica=1)
    loop = LoopThread()
    try:
        async def scenario():
            await backend.refresh_replicas()
            busy = asyncio.ensure_future(backend.explain(_spec(demo_batch.images, 128)))
            await asyncio.sleep(0.05)
            assert backend.coalescer.in_flight("demo") == 1
            short = [asyncio.ensure_future(backend.explain(_spec(demo_batch.images[:1], 8,
                                                                  deadline=time.time() + 0.2)))
                     for _ in range(5)]
            await asyncio.sleep(0)
            outcomes = await asyncio.gather(*short, return_exceptions=True)
            return await busy, outcomes

        before = _stats(handle)
        sent_before = backend.coalescer.requests
        result, outcomes = loop.call(scenario(), timeout=120)
        after = _stats(handle)
    finally:
        loop.call(backend.close())
        loop.close()
    assert type(result).__name__ == "ExplainResult"
    assert [type(o) for o in outcomes] == [DeadlineExceeded] * 5
    assert backend.coalescer.dropped == 5 and backend.coalescer.requests - sent_before == 1
    assert after["computed"] - before["computed"] == 1
    untouched = ("refused", "dropped_waiting", "dropped_in_batch")
    assert {k: after[k] - before[k] for k in untouched} == dict.fromkeys(untouched, 0), (before, after)


def test_an_adaptive_bound_learns_from_the_replica_s_answers_and_stays_within_its_ceiling(deployed, demo_batch):
    backend = ServeBackend(["demo"], max_in_flight_per_replica=8, adaptive_in_flight=True)
    loop = LoopThread()
    try:
        async def burst():
            await backend.refresh_replicas()
            limits = []
            for _ in range(6):
                calls = [backend.explain(_spec(demo_batch.images[:1], 4)) for _ in range(24)]
                outcomes = await asyncio.gather(*calls)
                assert {type(o).__name__ for o in outcomes} == {"ExplainResult"}
                limits.append(backend.coalescer.limit("demo"))
            return limits

        limits = loop.call(burst(), timeout=180)
    finally:
        loop.call(backend.close())
        loop.close()
    limiter = backend.limiters["demo"]
    assert limiter.samples == backend.coalescer.calls > 0
    assert all(1 <= limit <= 8 for limit in limits)
