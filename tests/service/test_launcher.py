"""`attribution serve` as a user runs it: a real process with its own Ray, stopped by SIGTERM."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc
from service.client import AttributionClient

START_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def serve_process(tmp_path_factory, demo_cache_dir, demo_model):
    folder = tmp_path_factory.mktemp("serve")
    config = folder / "config.json"
    # Pinned as on a CPU host: the front door (and the Ray daemons it starts) on one core, the replica
    # on the other when there is one.
    cores = sorted(os.sched_getaffinity(0))
    config.write_text(json.dumps({"models": [{"name": "demo", "source": "demo", "cpu_affinity": [cores[-1]]}],
                                  "server": {"cpu_affinity": [cores[0]]}, "cache_dir": str(demo_cache_dir),
                                  "audit": {"fsync_interval_s": 0}, "jobs": {"poll_s": 0.2}}))
    log = open(folder / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--config", str(config), "--port", "0",
                             "--metrics-port", "0", "--data-dir", str(folder / "data"), "--num-cpus", "2"],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    ports = _wait_for_ports(proc, folder / "serve.log")
    yield proc, ports, folder
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)
    log.close()


def _wait_for_ports(proc, log_path) -> dict[str, int]:
    deadline = time.time() + START_TIMEOUT_S
    while time.time() < deadline:
        text = log_path.read_text()
        if "Ctrl-C stops" in text:
            grpc_port = int(re.search(r"gRPC listening on .*:(\d+)", text).group(1))
            metrics_port = int(re.search(r"metrics on http://.*:(\d+)/metrics", text).group(1))
            return {"grpc": grpc_port, "metrics": metrics_port}
        if proc.poll() is not None:
            pytest.fail(f"attribution serve exited early:\n{text[-3000:]}")
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"attribution serve did not start in {START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_serve_explains_runs_jobs_audits_and_stops_gracefully(serve_process, demo_heldout):
    proc, ports, folder = serve_process
    address = f"127.0.0.1:{ports['grpc']}"
    with AttributionClient(address, timeout=120) as client:
        result = client.explain(demo_heldout.images[:2].numpy(), method="grad_cam", seed=3)
        assert result.model == "demo" and len(result.items) == 2
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
            jobs = pb_grpc.AttributionServiceStub(channel)
            request = pb.ExplainRequest(method=pb.OCCLUSION, inputs=pb.Inputs(
                tensor=pb.Tensor(data=demo_heldout.images[:1].numpy().tobytes(), dtype=pb.FLOAT32,
                                 shape=[1, 3, 64, 64])), occlusion=pb.OcclusionParams(patch_size=16, stride=8))
            job = jobs.SubmitJob(pb.SubmitJobRequest(request=request), timeout=30)
            states = [e.job.state for e in jobs.WatchJob(pb.WatchJobRequest(id=job.id), timeout=180)]
            assert states[-1] == pb.SUCCEEDED and states[0] in (pb.QUEUED, pb.RUNNING)
    cores = sorted(os.sched_getaffinity(0))
    assert os.sched_getaffinity(proc.pid) == {cores[0]}
    replicas = [pid for pid in _pids() if "ServeReplica:attribution-demo" in _cmdline(pid)]
    assert replicas and all(os.sched_getaffinity(pid) == {cores[-1]} for pid in replicas)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics").read().decode()
    assert 'attribution_requests_total{code="OK",method="grad_cam",model="demo"}' in metrics
    assert "attribution_jobs" in metrics and "attribution_audit_records_total" in metrics

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0
    log = (folder / "serve.log").read_text()
    assert "attribution: stopped" in log and "Traceback" not in log
    assert "front door on 1 torch threads" in log  # server.torch_threads: the replicas own the cores
    records = [json.loads(line) for line in (folder / "data" / "audit" / "audit.jsonl").read_text().splitlines()]
    assert {r["method"] for r in records} == {"grad_cam", "occlusion"}
    assert sum(r["method"] == "grad_cam" for r in records) == 2


def test_example_config_and_serve_yaml_are_valid(tmp_path):
    import pathlib

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from service.settings import ServiceConfig
    from workers.serve.app import AppConfig, serve_yaml

    root = pathlib.Path(__file__).resolve().parents[2]
    config = ServiceConfig.load(root / "deploy" / "config.example.yaml")
    assert config.app.default == "demo" and config.server.port == 50051
    assert config.audit.enabled and config.jobs.concurrency == 1
    assert config.app.limits == config.server.limits
    committed = root / "deploy" / "serve.yaml"
    schema = ServeDeploySchema.model_validate(yaml.safe_load(committed.read_text()))
    assert [a.name for a in schema.applications] == ["attribution-demo", "attribution_offline"]
    fresh = tmp_path / "serve.yaml"
    serve_yaml(AppConfig(), fresh)  # the committed file is what the generator writes today
    assert fresh.read_text() == committed.read_text()
