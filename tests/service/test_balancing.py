"""Several front doors: the client balances over them (round_robin with health checks), and the shipped
nginx configuration does the same for clients that dial one address (real nginx, real servers)."""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from service.client import AttributionClient

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _answered(harness) -> float:
    """Explain calls this front door has answered (attribution_requests_total)."""
    total = 0.0
    for metric in harness.running.metrics.registry.collect():
        if metric.name == "attribution_requests":
            total += sum(s.value for s in metric.samples if s.name == "attribution_requests_total")
    return total


@pytest.fixture
def two_front_doors(start_server):
    doors = [start_server(), start_server()]
    yield doors
    for door in doors:
        door.stop()


@pytest.fixture(scope="module")
def image(demo_batch) -> np.ndarray:
    return demo_batch.images[:1].numpy()


def _calls(client, image, n: int) -> None:
    for _ in range(n):
        client.explain(image, method="grad_cam", timeout=30)


def _until_only(client, image, doors, quiet) -> None:
    """Calls until `quiet`'s count stops moving for 10 calls in a row (bounded)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        before = _answered(quiet)
        _calls(client, image, 10)
        if _answered(quiet) == before:
            return
    raise AssertionError("calls kept reaching the front door that is out")


def test_the_client_spreads_calls_and_leaves_out_a_front_door_that_is_not_serving(two_front_doors, image):
    a, b = two_front_doors
    with AttributionClient(f"{a.running.address},{b.running.address}".replace("localhost", "127.0.0.1")) as client:
        _calls(client, image, 20)
        assert _answered(a) >= 5 and _answered(b) >= 5  # round robin, not pick-first
        b.call(b.running.health.set("", NOT_SERVING))
        _until_only(client, image, two_front_doors, b)
        before_a = _answered(a)
        _calls(client, image, 10)
        assert _answered(a) == before_a + 10
        b.stop()
        _calls(client, image, 5)  # the other one is gone altogether: still answered
        assert _answered(a) == before_a + 15


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nginx_config(directory: pathlib.Path, port: int, backends: list[str]) -> pathlib.Path:
    """The shipped deploy/nginx/attribution.conf with this test's listen port and front doors."""
    text = (ROOT / "deploy" / "nginx" / "attribution.conf").read_text()
    servers = "".join(f"        server {b} max_fails=1 fail_timeout=10s;\n" for b in backends)
    text, n = re.subn(r"(upstream attribution_front_doors \{\n)(?:\s*server [^\n]*\n)+", r"\g<1>" + servers, text)
    assert n == 1
    text, n = re.subn(r"^(\s+)listen [^;]+ http2;", rf"\g<1>listen 127.0.0.1:{port} http2;", text, flags=re.M)
    assert n == 1
    path = directory / "nginx.conf"
    path.write_text(text)
    return path


NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if pathlib.Path("/usr/sbin/nginx").exists() else None)


@pytest.mark.skipif(NGINX is None and os.environ.get("ATTRIBUTION_REQUIRE_SYSTEM") != "1",
                    reason="nginx is not installed (apt-get install nginx-light)")
def test_the_shipped_nginx_config_balances_and_skips_a_front_door_that_is_down(two_front_doors, image, tmp_path):
    a, b = two_front_doors
    port = _free_port()
    backends = [a.running.address.replace("localhost", "127.0.0.1"), b.running.address.replace("localhost", "127.0.0.1")]
    conf = _nginx_config(tmp_path, port, backends)
    (tmp_path / "logs").mkdir()
    proc = subprocess.Popen([NGINX or "nginx", "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        with AttributionClient(f"127.0.0.1:{port}") as client:
            assert [m.name for m in client.models()] == ["demo"]
            _calls(client, image, 20)
            assert _answered(a) >= 5 and _answered(b) >= 5
            b.stop()  # down: connections refused
            before = _answered(a)
            _calls(client, image, 10)  # nginx tries the next front door: every call still answered
            assert _answered(a) == before + 10
    finally:
        proc.terminate()
        proc.wait(timeout=30)
