"""The load tester itself: scenarios, reports, and short real runs so the tool cannot rot.

The runs are smoke runs (a second or two per level on the demo model) against
real servers over real sockets: the front door on the in-process LocalBackend,
once on real Ray Serve, and the peer as `--compare` starts it (a subprocess).
Nothing here asserts a time or a throughput; only that the numbers exist and
have the documented shape.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import pathlib

import pytest
import torch
from prometheus_client import generate_latest

from loadtests import cli, compare, report
from loadtests.loadgen import LoadgenError, check_loopback
from loadtests.requests import encode_requests, mix_schedule
from loadtests.scenario import DEFAULT_SCENARIO, SCENARIO_DIR, ScenarioError, load_scenario, scenario_from_dict
from service._proto import attribution_pb2 as pb
from service.metrics import ServiceMetrics
from service.settings import ServiceConfig
from workers.serve.app import AppConfig
from workers.config import ModelConfig
from tests.support import LoopThread, start_front_door
from service.backends.local import LocalBackend
from workers.models import ModelRegistry
from workers.spec import ExplainResult, ExplainSpec

LEVEL_KEYS = {"concurrency", "rate", "rps", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "errors", "mean_batch_size",
              "server", "by_method", "ok", "sent", "window_s"}


@pytest.fixture(scope="module")
def cache_dir(request):
    try:
        return request.getfixturevalue("demo_cache_dir")
    except pytest.FixtureLookupError:
        return None


@pytest.fixture(scope="module")
def local_server(cache_dir):
    """Our front door on LocalBackend (demo model), with its metrics exporter."""
    loop = LoopThread()
    registry = ModelRegistry([ModelConfig(name="demo", source="demo")], cache_dir=cache_dir)
    running = start_front_door(loop, LocalBackend(registry))
    yield running
    loop.call(running.stop(0.0))
    loop.close()


def loadtest_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


# ------------------------------------------------------------------ scenarios --

def test_shipped_scenarios_load():
    default = load_scenario(DEFAULT_SCENARIO)
    assert [e.label for e in default.mix] == ["grad_cam", "smoothgrad-32", "integrated_gradients-32"]
    assert default.load.closed == (1, 4, 16, 32, 64) and default.serve["models"][0]["source"] == "demo"
    headline = load_scenario(SCENARIO_DIR / "gradcam_resnet18.yaml")
    (entry,) = headline.mix
    assert (entry.method, entry.items, entry.image.height, entry.model) == ("grad_cam", 1, 112, "resnet18")
    assert headline.load.headline_level == 32
    ServiceConfig.from_dict(headline.serve)  # what --compare would start is a valid config
    # Pinned: the replica on core 1, the front door (and Ray's daemons) on core 0; only where the
    # front door computes passes through from a scenario's server section.
    started = compare.app_config(headline, None)
    assert started["server"] == {"cpu_affinity": [0]} and started["models"][0]["cpu_affinity"] == [1]
    unpinned = compare.app_config(load_scenario(SCENARIO_DIR / "gradcam_resnet18_unpinned.yaml"), None)
    assert "server" not in unpinned and unpinned["models"][0]["num_cpus"] == 2
    odd = scenario_from_dict({"mix": [{"method": "grad_cam"}], "serve": {
        "models": [{"name": "demo", "source": "demo"}], "server": {"port": 1, "torch_threads": 2}}})
    assert compare.app_config(odd, None)["server"] == {"torch_threads": 2}
    for name, label in (("overload.yaml", "grad_cam"), ("overload_smoothgrad.yaml", "smoothgrad-64")):
        overload = load_scenario(SCENARIO_DIR / name)
        assert [e.label for e in overload.mix] == [label] and overload.mix[0].deadline_ms == 2000
        ServiceConfig.from_dict(overload.serve)


def test_mix_schedule_keeps_the_weights_exactly():
    scenario = scenario_from_dict({"mix": [{"method": "grad_cam", "weight": 70},
                                           {"method": "smoothgrad", "weight": 20, "samples": 32},
                                           {"method": "integrated_gradients", "weight": 10}]})
    schedule = mix_schedule(scenario)
    assert [schedule.count(i) for i in range(3)] == [700, 200, 100]
    assert schedule != sorted(schedule)  # shuffled, so short windows see the mix too


@pytest.mark.parametrize("raw, message", [
    ({"mix": []}, "mix: must be a non-empty list"),
    ({"mix": [{"method": "score_cam"}]}, "mix[0].method: 'score_cam' is not an online method"),
    ({"mix": [{"method": "grad_cam", "samples": 32}]}, "mix[0].samples: applies to smoothgrad"),
    ({"mix": [{"method": "smoothgrad", "samples": 0.5}]}, "mix[0].samples: must be 0..65536"),
    ({"mix": [{"method": "grad_cam", "image": {"height": 64}}]}, "give both height and width"),
    ({"mix": [{"method": "grad_cam", "colour": 1}]}, "mix[0]: unknown keys ['colour']"),
    ({"mix": [{"method": "grad_cam"}], "load": {"closed": [1], "open": [5]}}, "not both"),
    ({"mix": [{"method": "grad_cam"}], "load": {"closed": [1, 4], "headline": 8}}, "load.headline"),
    ({"mix": [{"method": "grad_cam"}], "load": {"duration_s": 0}}, "load.duration_s"),
])
def test_scenario_mistakes_name_the_field(raw, message):
    with pytest.raises(ScenarioError, match=None) as info:
        scenario_from_dict(raw)
    assert message in str(info.value)


def test_tensor_images_must_fit_the_model():
    scenario = scenario_from_dict({"mix": [{"method": "grad_cam", "image": {"height": 32, "width": 32}}]})
    info = pb.ModelInfo(name="demo", is_default=True, input_spec=pb.InputSpec(channels=3, height=64, width=64))
    with pytest.raises(ScenarioError, match="encoding: png"):
        encode_requests(scenario, {"demo": info})
    png = scenario_from_dict({"mix": [{"method": "grad_cam", "image": {"height": 32, "width": 32,
                                                                       "encoding": "png"}}], "variants": 2})
    prepared = encode_requests(png, {"demo": info})
    request = pb.ExplainRequest.FromString(prepared.entries[0].payloads[0])
    assert request.inputs.images.images[0].startswith(b"\x89PNG") and request.model == "demo"


def test_only_loopback_targets():
    assert check_loopback("127.0.0.1:50051") == "127.0.0.1:50051"
    for target in ("10.1.2.3:50051", "example.com:443", "localhost", "0.0.0.0:80"):
        with pytest.raises(LoadgenError):
            check_loopback(target)
    with pytest.raises(LoadgenError):
        report.check_metrics_url("http://192.168.0.1:9090/metrics")


# -------------------------------------------------------------------- reports --

def test_server_view_from_real_prometheus_text():
    metrics = ServiceMetrics()
    before = report.parse_metrics(generate_latest(metrics.registry).decode())
    spec = ExplainSpec(model="demo", method="grad_cam", inputs=torch.zeros(1, 3, 8, 8))
    for batch in (4, 4, 4, 4, 2, 2):  # a batch of 4 and a batch of 2, one observation per request
        metrics.observe_result(spec, ExplainResult("r", "demo", "v", "grad_cam", [], queue_ms=10.0,
                                                   compute_ms=30.0, batch_samples=batch, batch_requests=batch))
        metrics.observe_request("demo", "grad_cam", "OK", 0.05)
    metrics.observe_request("demo", "grad_cam", "DEADLINE_EXCEEDED", 1.0)
    view = report.server_view(before, report.parse_metrics(generate_latest(metrics.registry).decode()))
    assert view["requests"] == 7 and view["codes"] == {"OK": 6, "DEADLINE_EXCEEDED": 1}
    assert view["mean_queue_ms"] == pytest.approx(10.0) and view["mean_compute_ms"] == pytest.approx(30.0)
    assert view["mean_batch_requests_per_request"] == pytest.approx(20 / 6, rel=1e-3)
    assert 25.0 <= view["p50_latency_ms"] <= 50.0


def test_percentiles_and_histogram_quantile():
    values = [float(v) for v in range(1, 1001)]
    p = report.percentiles(values)
    assert p["p50_ms"] == pytest.approx(500.5) and p["p999_ms"] == pytest.approx(999.001)
    assert report.percentiles([]) == {"p50_ms": None, "p90_ms": None, "p99_ms": None, "p999_ms": None}
    assert report.histogram_quantile(0.5, [(1.0, 0.0), (2.0, 10.0), (float("inf"), 10.0)]) == pytest.approx(1.5)


# ----------------------------------------------------------------- smoke runs --

def test_closed_and_open_loop_smoke_writes_json_and_plots(local_server, tmp_path):
    common = ("--server", f"127.0.0.1:{local_server.port}", "--scenario", str(DEFAULT_SCENARIO),
              "--metrics-url", f"http://127.0.0.1:{local_server.metrics_port}/metrics",
              "--duration", "1.5", "--warmup", "0.3", "--max-requests", "200", "--quiet")
    assert cli.run(loadtest_args(*common, "--closed", "1,2", "--json", str(tmp_path / "closed.json"),
                                 "--plots", str(tmp_path / "plots"))) == 0
    closed = json.loads((tmp_path / "closed.json").read_text())
    assert [row["concurrency"] for row in closed["levels"]] == [1, 2]
    for row in closed["levels"]:
        assert LEVEL_KEYS <= set(row) and row["ok"] > 0 and row["rps"] > 0 and row["errors"] == {}
        assert row["p50_ms"] <= row["p99_ms"] and row["mean_batch_size"] >= 1
        assert row["server"]["requests"] >= 1 and row["server"]["mean_compute_ms"] > 0
    for name in ("latency_cdf_service.png", "throughput.png", "p99.png"):
        assert (tmp_path / "plots" / name).read_bytes().startswith(b"\x89PNG")

    assert cli.run(loadtest_args(*common, "--open", "4", "--json", str(tmp_path / "open.json"))) == 0
    (row,) = json.loads((tmp_path / "open.json").read_text())["levels"]
    assert row["mode"] == "open" and row["rate"] == 4.0 and row["concurrency"] is None
    assert row["sent"] == 6 and row["ok"] + row["error_count"] == row["sent"]


def test_deadlines_show_up_as_error_counts(local_server, tmp_path):
    scenario = tmp_path / "tight.yaml"
    scenario.write_text("mix: [{method: integrated_gradients, steps: 256, deadline_ms: 1}]\n"
                        "load: {closed: [2], duration_s: 1, warmup_s: 0}\n")
    args = loadtest_args("--server", f"127.0.0.1:{local_server.port}", "--scenario", str(scenario), "--quiet",
                         "--max-requests", "40", "--json", str(tmp_path / "tight.json"))
    assert cli.run(args) == 1  # nothing succeeded, and the exit status says so
    (row,) = json.loads((tmp_path / "tight.json").read_text())["levels"]
    # Each call either runs out of time or is refused at once because it cannot finish in time (admission).
    late = row["errors"].get("DEADLINE_EXCEEDED", 0) + row["errors"].get("RESOURCE_EXHAUSTED", 0)
    assert row["ok"] == 0 and late == sum(row["errors"].values()) > 0 and row["p50_ms"] is None


def test_bad_target_is_refused_before_any_load():
    assert cli.run(loadtest_args("--server", "10.0.0.1:50051", "--closed", "1", "--duration", "1")) == 2


def test_smoke_against_the_ray_served_front_door(ray_session, cache_dir):
    from service.backends.serve import ServeBackend
    from workers.serve.app import deploy_all, shutdown_all

    app = AppConfig(models=(ModelConfig(name="demo", source="demo"),), cache_dir=str(cache_dir or ""))
    deploy_all(app)
    loop = LoopThread()
    try:
        running = start_front_door(loop, ServeBackend.from_config(app))
        scenario = load_scenario(DEFAULT_SCENARIO)
        load = cli.effective_load(scenario.load, loadtest_args("--closed", "1,4", "--duration", "2",
                                                               "--warmup", "0.5"))
        run = asyncio.run(cli.measure("ray", f"127.0.0.1:{running.port}", scenario, load,
                                      f"http://127.0.0.1:{running.metrics_port}/metrics", echo=lambda line: None))
        loop.call(running.stop(0.0))
    finally:
        loop.close()
        shutdown_all(app)
    for row in run.rows:
        assert row["ok"] > 0 and row["errors"] == {} and row["mean_batch_requests"] >= 1
        assert row["server"]["mean_batch_samples_per_request"] >= 1


@pytest.mark.process
def test_compare_starts_the_peer_and_times_the_kernel(tmp_path, cache_dir):
    # The peer only: the Ray-backed targets take minutes to start here; the full compare is run by hand.
    scenario = tmp_path / "peer.yaml"
    serve = {"models": [{"name": "demo", "source": "demo"}], "cache_dir": str(cache_dir or "")}
    scenario.write_text(json.dumps({"mix": [{"method": "grad_cam"}], "serve": serve,
                                    "load": {"closed": [2], "duration_s": 2, "warmup_s": 1}}))
    args = loadtest_args("--compare", "--targets", "peer", "--scenario", str(scenario), "--quiet",
                         "--json", str(tmp_path / "compare.json"))
    assert cli.run(args) == 0
    out = json.loads((tmp_path / "compare.json").read_text())
    assert {"ratio_vs_unbatched", "ratio_vs_peer", "service_overhead"} <= set(out)
    assert out["ratio_vs_peer"] is None  # no batched target ran
    (row,) = out["targets"]["peer"]["levels"]
    assert row["ok"] > 0 and row["mean_batch_requests"] == 1.0 and row["server"] is None

    kernel = compare.measure_kernel(serve, load_scenario(scenario), batch_requests=2.4, duration_s=0.3)
    assert kernel["batch_requests"] == 2 and kernel["rps"] > 0 and kernel["rps_batch_1"] > 0


def test_interleaved_overhead_alternates_service_and_kernel_windows(local_server, cache_dir, tmp_path):
    """Against a running front door: each round a service window then a kernel window at the batch the
    service formed; the overhead is the median of the rounds' ratios."""
    from loadtests.scenario import LoadSpec

    serve = {"models": [{"name": "demo", "source": "demo"}], "cache_dir": str(cache_dir or "")}
    scenario = tmp_path / "mix.yaml"
    scenario.write_text(json.dumps({"mix": [{"method": "grad_cam"}], "serve": serve}))
    load = LoadSpec(closed=(4,), duration_s=1.0, warmup_s=0.3)
    args = argparse.Namespace(interleave=3, channels=1)
    out = compare.measure_interleaved(f"127.0.0.1:{local_server.port}", serve, load_scenario(scenario), load,
                                      None, args)
    assert out["level"] == 4 and len(out["rounds"]) == 3
    for r in out["rounds"]:
        assert r["service_rps"] > 0 and r["kernel_rps"] > 0 and r["batch_requests"] >= 1
        assert r["ratio"] == round(r["service_rps"] / r["kernel_rps"], 3)
    assert out["service_overhead"] == sorted(r["ratio"] for r in out["rounds"])[1]


@pytest.mark.slow
def test_overload_benchmark_runs_and_reports_every_figure(local_server, tmp_path):
    """`--overload` end to end in a tiny mode (figures here mean nothing; the shape of the report does)."""
    out = tmp_path / "overload.json"
    args = loadtest_args("--overload", "--server", f"127.0.0.1:{local_server.port}", "--closed", "4",
                         "--duration", "1", "--warmup", "0.2", "--json", str(out))
    assert cli.run(args) == 0
    report = json.loads(out.read_text())
    assert report["saturation_rps"] > 0 and set(report["goodput_ratio"]) == {"2x", "4x", "8x"}
    for level in report["levels"]:
        assert level["health_failures"] == 0 and level["health_checks"] > 0
        assert {"ok_p50_ms", "ok_p99_ms", "refused_p99_ms", "recovery_s", "shares", "send_lag_p99_ms",
                "refused_from_send_p99_ms"} <= set(level)
        assert level["send_lag_p50_ms"] is not None and level["send_lag_p50_ms"] >= 0
    assert report["flood"]["alone_rps"] > 0


@pytest.mark.process
def test_refusal_cost_script_runs(cache_dir):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "loadtests.refusal_cost", "--calls", "160", "--clients", "4",
                          "--cache-dir", str(cache_dir or "")], capture_output=True, text=True, timeout=300,
                         cwd=pathlib.Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ms per refused call" in run.stdout


def test_closed_loop_clients_honour_the_servers_pushback():
    """A refused client waits the `grpc-retry-pushback-ms` delay before its next call: with 300 ms pushed
    back, 2 clients in a 1 s window send at most 2 x (1 + 1 / 0.3) calls, however fast the machine."""
    import grpc

    from loadtests.loadgen import LoadGenerator

    async def scenario():
        async def refuse(request, context):
            context.set_trailing_metadata((("grpc-retry-pushback-ms", "300"),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "refused")

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "attribution.v1.AttributionService", {"Explain": grpc.unary_unary_rpc_method_handler(refuse)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        prepared = encode_requests(load_scenario(SCENARIO_DIR / "overload.yaml"),
                                   {"demo": pb.ModelInfo(name="demo", is_default=True, input_spec=pb.InputSpec(
                                       channels=3, height=64, width=64))})
        try:
            async with LoadGenerator(f"127.0.0.1:{port}", prepared) as gen:
                return await gen.run_closed(2, 1.0, 0.0, 1000, honour_pushback=True)
        finally:
            await server.stop(0)

    result = asyncio.run(scenario())
    refused = result.recorder.codes["RESOURCE_EXHAUSTED"]
    assert set(result.recorder.codes) == {"RESOURCE_EXHAUSTED"}
    assert 2 <= refused <= 2 * (1 + int(1 / 0.3))


@pytest.mark.parametrize("method, enum", [("hires_cam", pb.HIRES_CAM), ("xgrad_cam", pb.XGRAD_CAM),
                                          ("eigen_cam", pb.EIGEN_CAM)])
def test_new_cam_methods_in_a_scenario(method, enum):
    scenario = scenario_from_dict({"mix": [{"method": method, "layer": "block3"}]})
    info = pb.ModelInfo(name="demo", is_default=True, input_spec=pb.InputSpec(channels=3, height=64, width=64))
    request = pb.ExplainRequest.FromString(encode_requests(scenario, {"demo": info}).entries[0].payloads[0])
    assert request.method == enum and request.WhichOneof("params") == "cam" and request.cam.layer == "block3"
    with pytest.raises(ScenarioError, match="not an online method"):
        scenario_from_dict({"mix": [{"method": "ablation_cam"}]})
