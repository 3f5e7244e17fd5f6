"""Durability: SIGKILL the service with jobs queued and running; the restarted one completes each exactly once."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import grpc
import pytest

from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc
from service.jobs.store import SqliteJobStore
from tests.service.jobs.conftest import job_request

START_TIMEOUT_S = 180.0
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


class ServiceProcess:
    """`python -m tests.service.jobs.serve_local` on a data dir: a whole service in its own process."""

    def __init__(self, data_dir, cache_dir, *extra: str):
        command = [sys.executable, "-m", "tests.service.jobs.serve_local", "--data-dir", str(data_dir), *extra]
        if cache_dir is not None:
            command += ["--cache-dir", str(cache_dir)]
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT_S)  # bounded: READY or EOF
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("READY "):
            self.proc.kill()
            raise AssertionError(f"service process did not start (exit {self.proc.wait()})")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{line.split()[1]}")
        self.stub = pb_grpc.AttributionServiceStub(self.channel)

    def kill(self) -> None:
        self.channel.close()
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL


def wait_running(stub) -> pb.Job:
    """A job caught midway: RUNNING with some progress stored."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for job in stub.ListJobs(pb.ListJobsRequest(states=[pb.RUNNING]), timeout=10).jobs:
            if 0 < job.progress < 1:
                return job
        time.sleep(0.02)
    raise AssertionError("no job was ever seen running")


@pytest.fixture
def processes():
    started = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            p.kill()


def test_jobs_survive_sigkill_and_complete_exactly_once(tmp_path, processes, demo_batch, demo_registry,
                                                      service_cache_dir):
    data_dir = tmp_path / "data"  # demo_registry: the model is in the cache before the processes look
    first = ServiceProcess(data_dir, service_cache_dir)
    processes.append(first)
    # Three identical occlusion jobs: whichever is interrupted, its redone result must equal the others'.
    request = dict(occlusion=pb.OcclusionParams(patch_size=4, stride=2))
    ids = [first.stub.SubmitJob(job_request(demo_batch.images[:1], pb.OCCLUSION, priority=-i, key=f"nightly-{i}",
                                            **request), timeout=30).id for i in range(3)]
    running = wait_running(first.stub)
    first.kill()  # no graceful stop: the store still says RUNNING

    second = ServiceProcess(data_dir, service_cache_dir)
    processes.append(second)
    # A client retrying its submissions after the crash gets the same jobs back.
    again = [second.stub.SubmitJob(job_request(demo_batch.images[:1], pb.OCCLUSION, priority=-i,
                                               key=f"nightly-{i}", **request), timeout=30).id for i in range(3)]
    assert again == ids
    finals = []
    for job_id in ids:
        events = list(second.stub.WatchJob(pb.WatchJobRequest(id=job_id, include_result=True), timeout=300))
        assert [e.job.state for e in events].count(pb.SUCCEEDED) == 1
        finals.append(events[-1].job)
    assert [j.state for j in finals] == [pb.SUCCEEDED] * 3
    hashes = [[a.map_sha256 for item in j.result.items for a in item.attributions] for j in finals]
    assert len(hashes[0]) == 1 and hashes[0] == hashes[1] == hashes[2]

    listed = second.stub.ListJobs(pb.ListJobsRequest(), timeout=10)
    assert sorted(j.id for j in listed.jobs) == sorted(ids)  # nothing lost, nothing duplicated
    reader = SqliteJobStore(data_dir / "jobs.sqlite3", exclusive=False)
    try:
        assert reader.get(running.id).attempt == 2  # the killed attempt was redone
        assert all(reader.result(job_id) for job_id in ids)
    finally:
        reader.close()
