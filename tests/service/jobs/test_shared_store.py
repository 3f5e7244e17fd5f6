"""Front doors sharing one PostgreSQL job store: any of them answers for any job, and a job whose front
door dies is taken over by another once its lease has run out, ending exactly once."""
from __future__ import annotations

import json
import signal
import time

from service._proto import attribution_pb2 as pb
from service.jobs.pg_store import PostgresJobStore
from tests.service.jobs.conftest import job_request
from tests.service.jobs.test_restart import ServiceProcess, processes, wait_running  # noqa: F401 (fixture)

LEASE_S = "2"


def _front_door(tmp_path, name: str, url: str, cache_dir) -> ServiceProcess:
    return ServiceProcess(tmp_path / name, cache_dir, "--job-store", url, "--lease-s", LEASE_S)


def _audited(data_dir, request_id: str) -> list[dict]:
    path = data_dir / "audit" / "audit.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("request_id") == request_id]


def test_a_job_submitted_to_one_front_door_is_followed_and_fetched_from_another(
        tmp_path, processes, postgres_url, demo_batch, demo_registry, service_cache_dir):  # noqa: F811
    a = _front_door(tmp_path, "a", postgres_url, service_cache_dir)
    processes.append(a)
    b = _front_door(tmp_path, "b", postgres_url, service_cache_dir)
    processes.append(b)
    job = a.stub.SubmitJob(job_request(demo_batch.images[:2], pb.OCCLUSION, key="shared-1",
                                       occlusion=pb.OcclusionParams(patch_size=8, stride=4)), timeout=30)
    events = list(b.stub.WatchJob(pb.WatchJobRequest(id=job.id, include_result=True), timeout=300))
    states = [e.job.state for e in events]
    assert states[-1] == pb.SUCCEEDED and states.count(pb.SUCCEEDED) == 1
    assert len(events[-1].job.result.items) == 2
    fetched = b.stub.GetJob(pb.GetJobRequest(id=job.id, include_result=True), timeout=30)
    assert fetched.state == pb.SUCCEEDED and fetched.result == events[-1].job.result
    assert [j.id for j in b.stub.ListJobs(pb.ListJobsRequest(), timeout=30).jobs] == [job.id]
    # The same idempotency key through the other front door is the same job.
    again = b.stub.SubmitJob(job_request(demo_batch.images[:2], pb.OCCLUSION, key="shared-1",
                                         occlusion=pb.OcclusionParams(patch_size=8, stride=4)), timeout=30)
    assert again.id == job.id
    # Cancelled through B while it runs on whichever front door claimed it.
    long = b.stub.SubmitJob(job_request(demo_batch.images[:4], pb.OCCLUSION,
                                        occlusion=pb.OcclusionParams(patch_size=4, stride=1)), timeout=30)
    wait_running(a.stub)
    b.stub.CancelJob(pb.CancelJobRequest(id=long.id), timeout=30)
    final = list(a.stub.WatchJob(pb.WatchJobRequest(id=long.id), timeout=120))[-1].job
    assert final.state == pb.CANCELLED


def test_a_killed_front_door_s_job_is_taken_over_after_its_lease_and_ends_once(
        tmp_path, processes, postgres_url, demo_batch, demo_registry, service_cache_dir):  # noqa: F811
    a = _front_door(tmp_path, "a", postgres_url, service_cache_dir)
    processes.append(a)
    request = job_request(demo_batch.images[:1], pb.OCCLUSION, key="takeover",
                          occlusion=pb.OcclusionParams(patch_size=4, stride=2))
    job = a.stub.SubmitJob(request, timeout=30)
    running = wait_running(a.stub)
    assert running.id == job.id
    a.proc.send_signal(signal.SIGSTOP)  # frozen while it holds the job: no more lease renewals, no writes
    try:
        b = _front_door(tmp_path, "b", postgres_url, service_cache_dir)
        processes.append(b)
        events = list(b.stub.WatchJob(pb.WatchJobRequest(id=job.id, include_result=True), timeout=300))
    finally:
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(timeout=30)
    assert [e.job.state for e in events].count(pb.SUCCEEDED) == 1 and events[-1].job.state == pb.SUCCEEDED
    maps = [a.map_sha256 for item in events[-1].job.result.items for a in item.attributions]
    assert len(maps) == 1
    assert b.stub.SubmitJob(request, timeout=30).id == job.id  # a client's retry: still the one job
    reader = PostgresJobStore(postgres_url)
    try:
        record = reader.get(job.id)
        assert record.attempt == 2 and record.state == pb.SUCCEEDED  # A's attempt, then B's
        assert reader.counts()[pb.SUCCEEDED] == 1
    finally:
        reader.close()
    # Audited once, by the front door that finished it (its writer thread appends the line: bounded wait).
    deadline = time.monotonic() + 30
    while not _audited(tmp_path / "b", job.id) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _audited(tmp_path / "a", job.id) == []
    assert [r["map_sha256"] for r in _audited(tmp_path / "b", job.id)] == maps
