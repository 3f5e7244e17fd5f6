"""`attribution health` against a real in-process server, and `attribution deploy serve-config | warm-cache`."""
from __future__ import annotations

import contextlib
import io
import json
import pathlib
import subprocess
import sys

import pytest

from service.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_health_is_0_while_serving_and_1_once_draining_or_gone(start_server):
    harness = start_server()
    try:
        assert _run(["health", "--server", harness.address]) == (0, f"{harness.address} (server): SERVING\n", "")
        code, _, err = _run(["health", "--server", harness.address, "--service",
                             "attribution.v1.AttributionService/demo"])
        assert code == 0
        code, _, err = _run(["health", "--server", harness.address, "--service", "no.such.Service"])
        assert code == 1 and "SERVICE_UNKNOWN" in err
        harness.call(harness.running.health.enter_graceful_shutdown())  # what stop() does first
        code, _, err = _run(["health", "--server", harness.address])
        assert code == 1 and "NOT_SERVING" in err
    finally:
        address = harness.address
        harness.stop()
    code, out, err = _run(["health", "--server", address, "--timeout", "1"])
    assert code == 1 and out == "" and "UNREACHABLE" in err
    assert _run(["health", "--server", address, "--timeout", "1", "--quiet"]) == (1, "", "")


@pytest.mark.process
def test_health_imports_neither_torch_nor_ray():
    probe = ("import sys; from service.cli import main; code = main(['health', '--server', '127.0.0.1:1', "
             "'--timeout', '0.5', '--quiet']); import json; "
             "print(json.dumps([code, sorted(m for m in ('torch', 'ray') if m in sys.modules)]))")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert json.loads(run.stdout.strip().splitlines()[-1]) == [1, []], run.stderr[-2000:]


def test_serve_config_with_its_header_is_the_committed_serve_yaml():
    code, out, _ = _run(["deploy", "serve-config", "--header"])
    assert code == 0 and out == (ROOT / "deploy" / "serve.yaml").read_text()


def test_serve_config_follows_the_config_and_refuses_a_bad_one(tmp_path):
    import yaml

    config = tmp_path / "c.yaml"
    config.write_text("models: [{name: demo, source: demo, replicas: 2}]\njobs: {offline: {replicas: 3}}\n")
    code, out, _ = _run(["deploy", "serve-config", "--config", str(config)])
    online, offline = yaml.safe_load(out)["applications"]
    assert code == 0 and (online["name"], offline["name"]) == ("attribution-demo", "attribution_offline")
    assert online["args"]["model"]["replicas"] == 2 and online["args"]["is_default"]
    assert offline["args"]["offline"]["replicas"] == 3
    config.write_text("models: [{name: a, source: demo, colour: red}]\n")
    code, out, err = _run(["deploy", "serve-config", "--config", str(config)])
    assert code == 2 and out == "" and "colour" in err


def test_warm_cache_builds_the_demo_model_into_the_configured_cache(demo_cache_dir, demo_model, tmp_path):
    from workers.demo import DemoConfig

    config = tmp_path / "c.yaml"
    config.write_text(f"models: [{{name: demo, source: demo}}]\ncache_dir: {demo_cache_dir}\n")
    code, out, _ = _run(["deploy", "warm-cache", "--config", str(config)])
    assert code == 0 and f"demo ready in {demo_cache_dir}" in out
    assert (demo_cache_dir / f"demo-{DemoConfig().cache_key()}.pt").exists()
    config.write_text("models: [{name: r, source: torchvision, arch: resnet18, num_classes: 10}]\n")
    code, out, _ = _run(["deploy", "warm-cache", "--config", str(config)])
    assert code == 0 and "nothing to build" in out
