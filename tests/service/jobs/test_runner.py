"""The runner and the job RPC handlers in-process: real store, real demo model, real kernels."""
from __future__ import annotations

import hashlib
import json
import time
import uuid

import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service._proto import attribution_pb2 as pb
from service.codec import normalize
from service.jobs.store import NewJob
from tests.service.jobs.conftest import job_request
from workers.errors import FailedPrecondition, InvalidArgument, JobNotFound, ModelNotFound
from workers.kernels.perturbation import score_cam
from workers.pipeline import WorkerContext

FINAL = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)


def submit(h, request: pb.SubmitJobRequest) -> pb.Job:
    return h.call(h.jobs.service.submit(request))


def get(h, job_id: str, include_result: bool = False) -> pb.Job:
    return h.call(h.jobs.service.get(pb.GetJobRequest(id=job_id, include_result=include_result)))


def cancel(h, job_id: str) -> pb.Job:
    return h.call(h.jobs.service.cancel(pb.CancelJobRequest(id=job_id)))


def wait_for(h, job_id: str, done, timeout: float = 120.0) -> pb.Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = get(h, job_id)
        if done(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never got there: {job}")


def next_event(h, watch) -> pb.JobEvent:
    async def one():
        return await anext(watch)

    return h.call(one())


def slow_request(images) -> pb.SubmitJobRequest:
    """Occlusion with a 4 px patch every pixel: thousands of forwards, minutes of work if never cancelled."""
    return job_request(images, pb.OCCLUSION, priority=100, occlusion=pb.OcclusionParams(patch_size=4, stride=1))


def start_blocker(h, images) -> pb.Job:
    """Occupies the one job slot until cancelled, so later jobs wait in the queue."""
    job = submit(h, slow_request(images))
    return wait_for(h, job.id, lambda j: j.state == pb.RUNNING and j.progress > 0)


def test_score_cam_job_succeeds_with_progress_in_order(start_service, demo_batch, demo_registry):
    h = start_service()
    images = demo_batch.images[:3]
    blocker = start_blocker(h, demo_batch.images)
    job = submit(h, job_request(images, pb.SCORE_CAM))
    assert job.state == pb.QUEUED and job.num_items == 3 and job.model == "demo" and job.method == pb.SCORE_CAM
    watch = h.jobs.service.watch(pb.WatchJobRequest(id=job.id, include_result=True))
    first = next_event(h, watch)
    assert first.job.state == pb.QUEUED
    cancel(h, blocker.id)
    events = [first] + h.collect(watch)
    states = [e.job.state for e in events]
    assert states[0] == pb.QUEUED and states[-1] == pb.SUCCEEDED
    assert set(states[1:-1]) == {pb.RUNNING}
    progress = [e.job.progress for e in events[1:-1]]
    # A slow watcher gets merged events (the latest progress), so how many arrive depends on
    # scheduling; that they only ever rise does not.
    assert len(progress) >= 1 and progress == sorted(set(progress)), progress  # strictly increasing
    assert all(e.job.result.ByteSize() == 0 for e in events[:-1])

    done = events[-1].job
    assert done.progress == 1.0 and done.finished_unix_s >= done.started_unix_s > 0
    result = done.result
    assert result.request_id == job.id and len(result.items) == 3
    ctx = WorkerContext.create(demo_registry.get())
    x = normalize(images, h.jobs.runner.models["demo"])
    targets = ctx.model.module(x).argmax(dim=1)
    expected = score_cam(ctx.model.module, ctx.taps, x, targets, "block4")
    ctx.taps.close()
    for item, want, target in zip(result.items, expected, targets):
        (attribution,) = item.attributions
        assert attribution.method == pb.SCORE_CAM and attribution.target == int(target)
        assert list(attribution.map.shape) == [64, 64]
        assert attribution.map_sha256 == hashlib.sha256(attribution.map.data).hexdigest()
        got = torch.frombuffer(bytearray(attribution.map.data), dtype=torch.float32).view(64, 64)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert get(h, job.id).result.ByteSize() == 0  # only when asked for
    assert get(h, job.id, include_result=True).result == result


def test_cancel_running_job_stops_it_between_chunks(start_service, demo_batch):
    h = start_service()
    job = start_blocker(h, demo_batch.images)
    stopped = cancel(h, job.id)
    assert stopped.state == pb.CANCELLED and 0 < stopped.progress < 1
    with pytest.raises(FailedPrecondition, match="already CANCELLED"):
        cancel(h, job.id)
    # The one worker thread is free again: had the kernel kept going, this would wait minutes.
    nxt = submit(h, job_request(demo_batch.images[:1], pb.SCORE_CAM))
    assert wait_for(h, nxt.id, lambda j: j.state in FINAL, timeout=60).state == pb.SUCCEEDED


def test_cancel_queued_job_is_immediate(start_service, demo_batch):
    h = start_service()
    blocker = start_blocker(h, demo_batch.images)
    queued = submit(h, job_request(demo_batch.images[:1]))
    watch = h.jobs.service.watch(pb.WatchJobRequest(id=queued.id))
    assert next_event(h, watch).job.state == pb.QUEUED
    cancelled = cancel(h, queued.id)
    assert cancelled.state == pb.CANCELLED and cancelled.finished_unix_s > 0 and cancelled.started_unix_s == 0
    assert [e.job.state for e in h.collect(watch)] == [pb.CANCELLED]
    cancel(h, blocker.id)
    # A job submitted after it has run to the end: the runner went past the cancelled one.
    after = submit(h, job_request(demo_batch.images[:1], pb.GRAD_CAM))
    assert wait_for(h, after.id, lambda j: j.state in FINAL, timeout=60).state == pb.SUCCEEDED
    assert get(h, queued.id).started_unix_s == 0  # never ran


def test_higher_priority_runs_first(start_service, demo_batch):
    h = start_service()
    blocker = start_blocker(h, demo_batch.images)
    one = demo_batch.images[:1]
    low = submit(h, job_request(one, pb.GRAD_CAM, priority=-3))
    high = submit(h, job_request(one, pb.GRAD_CAM, priority=5))
    cancel(h, blocker.id)
    low_done = wait_for(h, low.id, lambda j: j.state in FINAL)
    high_done = wait_for(h, high.id, lambda j: j.state in FINAL)
    assert high_done.state == low_done.state == pb.SUCCEEDED
    assert high_done.finished_unix_s <= low_done.started_unix_s


def test_same_idempotency_key_returns_the_same_job(start_service, demo_batch):
    h = start_service()
    first = submit(h, job_request(demo_batch.images[:1], pb.GRAD_CAM, key="nightly-2024-06-01"))
    again = submit(h, job_request(demo_batch.images[:1], pb.GRAD_CAM, key="nightly-2024-06-01"))
    assert again.id == first.id
    listed = h.call(h.jobs.service.list(pb.ListJobsRequest()))
    assert [j.id for j in listed.jobs] == [first.id]


def test_bulk_online_method_matches_online_explain(start_service, demo_batch):
    h = start_service()
    images = demo_batch.images[:5]  # three chunks of up to two items
    job = submit(h, job_request(images, pb.GRAD_CAM, cam=pb.CamParams(also=[pb.LAYER_CAM])))
    events = h.collect(h.jobs.service.watch(pb.WatchJobRequest(id=job.id, include_result=True)))
    assert events[-1].job.state == pb.SUCCEEDED
    offline = events[-1].job.result
    online = h.stub().Explain(job_request(images, pb.GRAD_CAM, cam=pb.CamParams(also=[pb.LAYER_CAM])).request)
    assert len(offline.items) == len(online.items) == 5
    for a, b in zip(offline.items, online.items):
        assert [x.method for x in a.attributions] == [x.method for x in b.attributions] == [pb.GRAD_CAM, pb.LAYER_CAM]
        assert a.predicted_classes == b.predicted_classes and a.input_sha256 == b.input_sha256
        for x, y in zip(a.attributions, b.attributions):
            want = torch.frombuffer(bytearray(y.map.data), dtype=torch.float32)
            got = torch.frombuffer(bytearray(x.map.data), dtype=torch.float32)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # chunks of 2 vs one batch of 5


def test_submit_refuses_bad_requests(start_service, demo_batch):
    h = start_service()
    one = demo_batch.images[:1]
    with pytest.raises(InvalidArgument, match="priority"):
        submit(h, job_request(one, priority=101))
    with pytest.raises(InvalidArgument, match="idempotency_key"):
        submit(h, job_request(one, key="k" * 129))
    with pytest.raises(InvalidArgument, match="method"):
        submit(h, job_request(one, pb.METHOD_UNSPECIFIED))
    with pytest.raises(InvalidArgument, match="score_cam.layer"):
        submit(h, job_request(one, score_cam=pb.ScoreCamParams(layer="fc")))
    miscounted = job_request(demo_batch.images[:2])
    miscounted.item_names.append("only-one.png")
    with pytest.raises(InvalidArgument, match="1 names for 2 items"):
        submit(h, miscounted)
    unprintable = job_request(one)
    unprintable.item_names.append("bad\nname")
    with pytest.raises(InvalidArgument, match="item_names"):
        submit(h, unprintable)
    bad_model = job_request(one)
    bad_model.request.model = "resnet"
    with pytest.raises(ModelNotFound):
        submit(h, bad_model)
    for missing in (h.jobs.service.get(pb.GetJobRequest(id="nope")),
                    h.jobs.service.cancel(pb.CancelJobRequest(id="nope"))):
        with pytest.raises(JobNotFound):
            h.call(missing)
    with pytest.raises(JobNotFound):
        h.collect(h.jobs.service.watch(pb.WatchJobRequest(id="nope")))
    assert h.call(h.jobs.service.list(pb.ListJobsRequest())).jobs == []


def test_stored_request_that_no_longer_validates_fails_typed(start_service):
    """A job whose request cannot run (here: no method) fails with the status it would have had."""
    h = start_service()
    job_id = uuid.uuid4().hex
    h.jobs.store.submit(NewJob(id=job_id, priority=0, idempotency_key="", model="demo", method=0, num_items=1,
                               request=pb.ExplainRequest(model="demo").SerializeToString()))
    h.jobs.runner.wake()
    failed = wait_for(h, job_id, lambda j: j.state in FINAL)
    assert failed.state == pb.FAILED and failed.error.code == 3 and "method" in failed.error.message


def test_stop_requeues_running_job_and_next_start_finishes_it(start_service, demo_batch, tmp_path):
    data_dir = tmp_path / "shared"
    first = start_service(data_dir=data_dir)
    job = submit(first, job_request(demo_batch.images[:2], pb.OCCLUSION,
                                    occlusion=pb.OcclusionParams(patch_size=8, stride=2)))
    wait_for(first, job.id, lambda j: j.state == pb.RUNNING and j.progress > 0)
    first.stop()
    second = start_service(data_dir=data_dir)
    assert get(second, job.id).state in (pb.QUEUED, pb.RUNNING)
    done = wait_for(second, job.id, lambda j: j.state in FINAL)
    assert done.state == pb.SUCCEEDED and len(get(second, job.id, True).result.items) == 2
    assert second.jobs.store.get(job.id).attempt == 2


def test_list_filters_by_state_and_pages(start_service, demo_batch):
    h = start_service()
    blocker = start_blocker(h, demo_batch.images)
    queued = [submit(h, job_request(demo_batch.images[:1])).id for _ in range(5)]
    service = h.jobs.service
    page = h.call(service.list(pb.ListJobsRequest(states=[pb.QUEUED], page_size=2)))
    seen = [j.id for j in page.jobs]
    while page.next_page_token:
        page = h.call(service.list(pb.ListJobsRequest(states=[pb.QUEUED], page_size=2,
                                                      page_token=page.next_page_token)))
        seen += [j.id for j in page.jobs]
    assert seen == list(reversed(queued))
    running = h.call(service.list(pb.ListJobsRequest(states=[pb.RUNNING])))
    assert [j.id for j in running.jobs] == [blocker.id]
    with pytest.raises(InvalidArgument, match="states"):
        h.call(service.list(pb.ListJobsRequest(states=[9])))
    for job_id in queued + [blocker.id]:
        cancel(h, job_id)


def test_metrics_count_states_durations_and_samples(start_service, demo_batch):
    h = start_service()
    done = submit(h, job_request(demo_batch.images[:2], pb.SCORE_CAM))
    wait_for(h, done.id, lambda j: j.state in FINAL)
    blocker = start_blocker(h, demo_batch.images)
    submit(h, job_request(demo_batch.images[:1]))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(h.metrics.registry).decode())}
    by_state = {s.labels["state"]: s.value for s in families["attribution_jobs"].samples}
    assert by_state == {"queued": 1, "running": 1, "succeeded": 1, "failed": 0, "cancelled": 0}
    assert families["attribution_jobs_queue_depth"].samples[0].value == 1
    durations = {(s.labels.get("method"), s.labels.get("state")): s.value
                 for s in families["attribution_job_duration_seconds"].samples if s.name.endswith("_count")}
    assert durations == {("score_cam", "succeeded"): 1}
    samples = {s.labels["method"]: s.value for s in families["attribution_offline_samples"].samples
               if s.name.endswith("_total")}
    assert samples["score_cam"] == pytest.approx(2.0) and samples["occlusion"] > 0
    cancel(h, blocker.id)


def test_audit_verify_passes_on_a_default_server_given_the_files_the_client_sent(start_service, tmp_path,
                                                                                   demo_batch, demo_registry):
    """The README's sequence on a server with the default audit settings (inputs not stored): PNGs sent
    online and to a job, kept by the client, are found by hash; every record checks, none is skipped."""
    import torchvision.io as tvio

    from service.audit import log_files
    from service.audit.verify import verify

    h = start_service()
    stub = h.stub()
    sent = tmp_path / "sent"
    sent.mkdir()
    pngs = [tvio.encode_png((p * 255).round().to(torch.uint8)).numpy().tobytes() for p in demo_batch.images[:2]]
    for i, png in enumerate(pngs):
        (sent / f"demo-{i:03d}.png").write_bytes(png)
    encoded = pb.Inputs(images=pb.EncodedImages(images=pngs))
    stub.Explain(pb.ExplainRequest(request_id="online", inputs=encoded, method=pb.GRAD_CAM), timeout=60)
    job = submit(h, pb.SubmitJobRequest(request=pb.ExplainRequest(inputs=encoded, method=pb.SCORE_CAM)))
    assert wait_for(h, job.id, lambda j: j.state in FINAL).state == pb.SUCCEEDED
    audit_dir = h.data_dir / "audit"
    h.stop()
    records = [json.loads(line) for path in log_files(audit_dir) for line in path.read_text().splitlines()]
    assert {r["path"] for r in records} == {"online", "offline"} and len(records) == 4
    assert verify([audit_dir], demo_registry).counts() == {"skipped": 4}   # nothing to re-run without inputs
    report = verify([audit_dir], demo_registry, inputs_dir=sent)
    assert report.verdict == "PASS", report.summary()
    assert len(report.checks) == 4 and not report.counts().get("skipped")


def test_audit_verify_passes_on_a_mix_of_online_calls_and_jobs(start_service, demo_batch, demo_registry):
    """The issue's acceptance: a server that served online calls and offline jobs leaves a log that
    `audit verify` passes, job records re-run the offline way."""
    from service.audit import AuditConfig, log_files
    from service.audit.verify import verify
    from tests.service.conftest import explain_request

    h = start_service(audit=AuditConfig(store_inputs=True))
    stub = h.stub()
    images = demo_batch.images[:2]
    for method in (pb.GRAD_CAM, pb.GRAD_CAM_PLUS_PLUS, pb.INTEGRATED_GRADIENTS):
        stub.Explain(explain_request(images, method), timeout=60)
    jobs = [submit(h, job_request(images)), submit(h, job_request(images[:1], method=pb.GRAD_CAM))]
    for job in jobs:
        assert wait_for(h, job.id, lambda j: j.state in FINAL).state == pb.SUCCEEDED
    audit_dir = h.data_dir / "audit"
    h.stop()  # the writer flushes on close
    records = [json.loads(line) for path in log_files(audit_dir) for line in path.read_text().splitlines()]
    assert {r["path"] for r in records} == {"online", "offline"}
    assert {r["method"] for r in records if r["path"] == "offline"} == {"score_cam", "grad_cam"}
    report = verify([audit_dir], demo_registry)
    assert report.verdict == "PASS", report.summary()
    assert len(report.checks) == len(records) and not report.counts().get("skipped")
