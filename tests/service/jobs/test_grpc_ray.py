"""Jobs end to end: gRPC over a real socket, the real servicer, real Ray Serve online and offline apps."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import time

import grpc
import pytest

from service._proto import attribution_pb2 as pb
from service.jobs import JobsConfig
from tests.service.jobs.conftest import FAST, job_request
from workers.serve.app import AppConfig, app_name, deploy_all
from workers.config import BatchingConfig, ModelConfig

FINAL = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)
# Half a CPU each: the online and offline replicas fit the session's 2-CPU Ray
# instance next to whatever else the session deployed.
ONLINE = ModelConfig(name="demo", source="demo", num_cpus=0.5)
OFFLINE = dataclasses.replace(FAST, num_cpus=0.5)


@pytest.fixture(scope="module")
def ray_apps(ray_session, demo_registry, service_cache_dir):
    from ray import serve

    from workers.serve.offline import OFFLINE_APP, deploy_offline

    config = AppConfig(models=(ONLINE,), device="cpu", cache_dir=str(service_cache_dir or ""),
                       batching=BatchingConfig(batch_wait_timeout_s=0.005))
    deploy_all(config)
    deploy_offline(config, OFFLINE)
    yield config
    for name in (app_name(ONLINE.name), OFFLINE_APP):
        serve.delete(name)


@pytest.fixture
def ray_service(ray_apps, start_service):
    from service.backends.offline import ServeOfflineBackend
    from service.backends.serve import ServeBackend

    config = JobsConfig(offline=OFFLINE, progress_persist_s=0.2, poll_s=0.5)
    return start_service(online=ServeBackend.from_config(ray_apps), offline=ServeOfflineBackend(), config=config)


def wait_for(stub, job_id: str, done, timeout: float = 120.0) -> pb.Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = stub.GetJob(pb.GetJobRequest(id=job_id), timeout=10)
        if done(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never got there: {job}")


def start_blocker(stub, images) -> pb.Job:
    """Fills the offline replica with minutes of occlusion work until cancelled."""
    job = stub.SubmitJob(job_request(images, pb.OCCLUSION, priority=100,
                                     occlusion=pb.OcclusionParams(patch_size=4, stride=1)), timeout=30)
    return wait_for(stub, job.id, lambda j: j.state == pb.RUNNING and j.progress > 0)


def test_submit_watch_cancel_list(ray_service, demo_batch):
    stub = ray_service.stub()
    blocker = start_blocker(stub, demo_batch.images)
    job = stub.SubmitJob(job_request(demo_batch.images[:3], pb.SCORE_CAM, key="e2e-1"), timeout=30)
    assert stub.SubmitJob(job_request(demo_batch.images[:3], pb.SCORE_CAM, key="e2e-1"), timeout=30).id == job.id
    watch = stub.WatchJob(pb.WatchJobRequest(id=job.id, include_result=True), timeout=120)
    first = next(watch)
    assert first.job.state == pb.QUEUED

    stopped = stub.CancelJob(pb.CancelJobRequest(id=blocker.id), timeout=30)
    assert stopped.state == pb.CANCELLED and 0 < stopped.progress < 1
    events = [first] + list(watch)  # the replica is free again: the job runs now
    states = [e.job.state for e in events]
    assert states[0] == pb.QUEUED and states[-1] == pb.SUCCEEDED and set(states[1:-1]) == {pb.RUNNING}
    progress = [e.job.progress for e in events[1:-1]]
    assert len(progress) >= 2 and progress == sorted(set(progress)), progress
    result = events[-1].job.result
    assert len(result.items) == 3 and all(i.attributions[0].method == pb.SCORE_CAM for i in result.items)

    listed = stub.ListJobs(pb.ListJobsRequest(states=[pb.SUCCEEDED, pb.CANCELLED]), timeout=10)
    assert [(j.id, j.state) for j in listed.jobs] == [(job.id, pb.SUCCEEDED), (blocker.id, pb.CANCELLED)]
    page = stub.ListJobs(pb.ListJobsRequest(page_size=1), timeout=10)
    assert len(page.jobs) == 1 and page.next_page_token
    rest = stub.ListJobs(pb.ListJobsRequest(page_size=1, page_token=page.next_page_token), timeout=10)
    assert [j.id for j in list(page.jobs) + list(rest.jobs)] == [job.id, blocker.id] and not rest.next_page_token


def test_errors_carry_their_status(ray_service, demo_batch):
    stub = ray_service.stub()
    with pytest.raises(grpc.RpcError) as missing:
        stub.GetJob(pb.GetJobRequest(id="does-not-exist"), timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as bad:
        stub.SubmitJob(job_request(demo_batch.images[:1], priority=1000), timeout=10)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "priority" in bad.value.details()
    with pytest.raises(grpc.RpcError) as unwatchable:
        list(stub.WatchJob(pb.WatchJobRequest(id="does-not-exist"), timeout=10))
    assert unwatchable.value.code() == grpc.StatusCode.NOT_FOUND
    job = stub.SubmitJob(job_request(demo_batch.images[:1], pb.GRAD_CAM), timeout=30)
    assert wait_for(stub, job.id, lambda j: j.state in FINAL).state == pb.SUCCEEDED
    with pytest.raises(grpc.RpcError) as finished:
        stub.CancelJob(pb.CancelJobRequest(id=job.id), timeout=10)
    assert finished.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_online_requests_succeed_while_offline_work_saturates(ray_service, demo_batch):
    """Score-CAM and occlusion jobs fill the offline replica; online Grad-CAM keeps answering in its deadline."""
    stub = ray_service.stub()
    blocker = start_blocker(stub, demo_batch.images)
    queued = [stub.SubmitJob(job_request(demo_batch.images, pb.SCORE_CAM), timeout=30).id for _ in range(3)]
    online = job_request(demo_batch.images[:2], pb.GRAD_CAM).request

    def explain(_):
        return stub.Explain(online, timeout=20)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(explain, range(16)))
    assert all(len(r.items) == 2 and r.items[0].attributions[0].method == pb.GRAD_CAM for r in responses)
    # The offline work was really going on the whole time.
    assert stub.GetJob(pb.GetJobRequest(id=blocker.id), timeout=10).state == pb.RUNNING
    for job_id in [blocker.id] + queued:
        stub.CancelJob(pb.CancelJobRequest(id=job_id), timeout=30)


def test_an_evaluation_job_runs_on_the_ray_offline_worker(ray_service, demo_batch):
    """Small: 4 items, Grad-CAM only, deletion and the pointing game; the outcome crosses Ray as plain data."""
    stub = ray_service.stub()
    request = pb.EvaluationRequest(
        inputs=job_request(demo_batch.images[:4]).request.inputs, methods=[pb.ExplainRequest(method=pb.GRAD_CAM)],
        target=pb.Target(class_indices=pb.ClassIndices(indices=demo_batch.labels[:4].tolist())),
        metrics=[pb.DELETION, pb.POINTING_GAME], options=pb.EvaluationOptions(curve_steps=4),
        regions=[pb.Region(box=pb.Box(top=t, left=l, bottom=b, right=r)) for t, l, b, r in demo_batch.boxes[:4].tolist()])
    job = stub.SubmitJob(pb.SubmitJobRequest(evaluation=request), timeout=30)
    done = wait_for(stub, job.id, lambda j: j.state in FINAL, timeout=300)
    assert done.state == pb.SUCCEEDED, done.error
    result = stub.GetJob(pb.GetJobRequest(id=job.id, include_result=True), timeout=30).evaluation
    (method,) = result.methods
    assert method.label == "grad_cam@block4" and result.num_items == 4 and result.ranking == ["grad_cam@block4"]
    assert {m.metric for m in method.metrics} == {pb.DELETION, pb.POINTING_GAME}
    assert result.forward_rows > 0 and result.floor_seconds > 0
    assert result.recommendation.method == pb.GRAD_CAM and result.recommendation.cam_layer == "block4"
