"""The service on a real multi-node Ray cluster: a head and two worker nodes (loadtests/raycluster.py), the
model's replicas placed one per worker node by a custom resource, two front doors started as a deployment
starts them (`attribution serve --address`, then `--attach`), jobs in one PostgreSQL store. A worker node
is killed under load: online calls fail over to the surviving replica, and the jobs end exactly once.

On one machine every raylet shares 127.0.0.1, and a driver attaches to the head's raylet, so both front
doors run beside the head here; on a real cluster each would run on its own node.
"""
from __future__ import annotations

import json
import os
import threading
import time

import grpc
import numpy as np
import pytest

from loadtests.raycluster import FrontDoorProcess
from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc
from service.client import AttributionClient, ServiceError
from service.jobs.pg_store import PostgresJobStore
from tests.service.jobs.conftest import job_request

pytestmark = [pytest.mark.ray, pytest.mark.process, pytest.mark.slow]

FINAL = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)


class FrontDoor(FrontDoorProcess):
    """A front door process with a blocking stub."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.AttributionServiceStub(self.channel)


@pytest.fixture
def cluster():
    from loadtests.raycluster import RayCluster

    slots = {"model_slot": 1, "offline_slot": 1}
    running = RayCluster({"b": slots, "c": slots}, head_cpus=1, node_cpus=2)
    yield running
    running.stop()


def _config(tmp_path, url: str, cache_dir) -> os.PathLike:
    config = {
        "models": [{"name": "demo", "source": "demo", "replicas": 2, "num_cpus": 1,
                    "resources": {"model_slot": 1}}],
        "cache_dir": str(cache_dir or ""),
        "batching": {"batch_wait_timeout_s": 0.005},
        "jobs": {"store": url, "lease_s": 5, "poll_s": 0.5, "retries": 6,
                 "offline": {"replicas": 1, "num_cpus": 1, "resources": {"offline_slot": 1}}},
    }
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(config))
    return path


class Load:
    """Closed-loop Grad-CAM calls through both front doors (the client balances and retries), on a thread."""

    def __init__(self, addresses: list[str], images: np.ndarray):
        self.client = AttributionClient(addresses, timeout=60.0)
        self.images = images
        self.outcomes: list[tuple[float, str]] = []   # (monotonic time, "OK" or the final status code)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 600  # bounded whatever happens to the test
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.client.explain(self.images, method="grad_cam", layout="NCHW")
                code = "OK"
            except ServiceError as exc:
                code = exc.code().name
            self.outcomes.append((time.monotonic(), code))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)
        self.client.close()


def _watch(stub, job_id: str, timeout_s: float = 300.0) -> list[pb.JobEvent]:
    return list(stub.WatchJob(pb.WatchJobRequest(id=job_id, include_result=True), timeout=timeout_s))


def test_a_worker_node_killed_under_load_fails_over_and_loses_no_job(
        tmp_path, cluster, postgres_url, demo_batch, demo_registry, service_cache_dir):
    config = _config(tmp_path, postgres_url, service_cache_dir)
    doors = []
    load = None
    try:
        doors.append(FrontDoor("a", cluster.address, config, tmp_path / "a"))      # deploys, then serves
        doors.append(FrontDoor("b", cluster.address, config, tmp_path / "b", "--attach"))
        a, b = doors
        assert cluster.where("OnlineWorker", count=2) == ["b", "c"]   # one replica per worker node
        (offline_node,) = cluster.where("OfflineWorker")
        assert offline_node in ("b", "c")

        images = demo_batch.images[:1].numpy()
        load = Load([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"], images)
        # A long job that will be running when its node goes, and one queued behind it.
        long = a.stub.SubmitJob(job_request(demo_batch.images[:4], pb.OCCLUSION, key="long",
                                            occlusion=pb.OcclusionParams(patch_size=4, stride=1)), timeout=30)
        queued = b.stub.SubmitJob(job_request(demo_batch.images[:2], pb.OCCLUSION, key="queued",
                                              occlusion=pb.OcclusionParams(patch_size=8, stride=4)), timeout=30)
        _wait_running(a.stub, long.id)
        ok_before = sum(1 for _, code in load.outcomes if code == "OK")
        assert ok_before > 0, load.outcomes

        killed_at = time.monotonic()
        cluster.kill(offline_node)  # its raylet, its model replica and the offline worker, without grace

        finals = {job.id: _watch(b.stub, job.id)[-1].job for job in (long, queued)}
        time.sleep(5.0)  # online load keeps going on the surviving replica
        load.stop()
        after = [code for t, code in load.outcomes if t > killed_at]
        survivors = cluster.where("OnlineWorker")
    finally:
        if load is not None:
            load.stop()
        for door in doors:
            door.stop()

    assert survivors == sorted({"b", "c"} - {offline_node})
    logs = "".join(door.log_path.read_text() for door in doors)
    # The job running on the lost node was run again by its runner, not lost or failed.
    assert f"job {long.id}" in logs and "running it again" in logs, logs[-4000:]
    assert {state for state in (j.state for j in finals.values())} == {pb.SUCCEEDED}, finals
    assert len(finals[long.id].result.items) == 4 and len(finals[queued.id].result.items) == 2
    # Online: every call after the kill ended OK (the client retried the UNAVAILABLE ones), and many did.
    assert after and set(after) == {"OK"}, after
    assert len(after) >= 10
    # Exactly once: one row per job, SUCCEEDED, with one result.
    store = PostgresJobStore(postgres_url)
    try:
        records, _ = store.list()
    finally:
        store.close()
    assert sorted(r.id for r in records) == sorted([long.id, queued.id])
    assert all(r.state == pb.SUCCEEDED for r in records)


def _wait_running(stub, job_id: str) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        job = stub.GetJob(pb.GetJobRequest(id=job_id), timeout=10)
        if job.state == pb.RUNNING and job.progress > 0:
            return
        assert job.state not in FINAL, job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} was never seen running")
