"""`attribution evaluate`: the command line becomes one EvaluationRequest (methods with their parameters,
metrics, regions, options), progress is shown as a bar on a terminal and as lines otherwise, mistakes get one
line and exit 2, and a whole evaluation runs end to end (in-process with --local, and against a server in
its own process, where Ctrl-C leaves the job running)."""
from __future__ import annotations

import io
import json
import os
import pathlib
import select
import signal
import socket
import subprocess
import sys

import grpc
import pytest
import torch
from google.protobuf import json_format
from torchvision.io import encode_png

from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc
from service.cli import CliError, build_parser
from service.cli.evaluate import _inputs, _regions, evaluation_request
from service.cli.evaluate_watch import Progress
from workers.demo import make_watermark_dataset

CLI = [sys.executable, "-m", "service.cli"]
ROOT = pathlib.Path(__file__).resolve().parents[2]


def parse(*argv: str):
    return build_parser().parse_args(["evaluate", *argv])


def test_the_command_line_becomes_one_evaluation_request(tmp_path):
    args = parse("--demo", "3", "--local", "-o", str(tmp_path), "--methods",
                 "grad_cam@block3,grad_cam@block4,integrated_gradients,smoothgrad", "--steps", "8", "--samples", "4",
                 "--metrics", "deletion,pointing_game", "--curve-baselines", "zero,blur", "--seed", "7",
                 "--curve-steps", "12", "--confidence", "0.9", "--target", "1", "--shuffled-model", "shuffled")
    names, pictures, boxes = _inputs(args)
    request = evaluation_request(args, pictures, _regions(args, names, boxes))
    assert [(m.method, m.cam.layer) for m in request.methods[:2]] == [(pb.GRAD_CAM, "block3"), (pb.GRAD_CAM, "block4")]
    assert request.methods[2].integrated_gradients.steps == 8 and request.methods[3].noise.samples == 4
    assert not any(m.HasField("inputs") or m.HasField("output") or m.model for m in request.methods)
    assert list(request.metrics) == [pb.DELETION, pb.POINTING_GAME] and request.shuffled_labels_model == "shuffled"
    assert list(request.target.class_indices.indices) == [1]
    options = request.options
    assert (options.curve_steps, list(options.baselines), options.seed) == (12, ["zero", "blur"], 7)
    assert options.confidence == pytest.approx(0.9)
    demo = make_watermark_dataset(3, seed=7 + 1000)
    assert names == ["demo-000.png", "demo-001.png", "demo-002.png"] and len(request.inputs.images.images) == 3
    assert [[r.box.top, r.box.left, r.box.bottom, r.box.right] for r in request.regions] == demo.boxes.tolist()


def test_boxes_are_matched_by_path_or_file_name(tmp_path):
    batch = make_watermark_dataset(2, seed=3)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"img{i}.png")
        paths[-1].write_bytes(encode_png((batch.images[i] * 255).round().to(torch.uint8)).numpy().tobytes())
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({str(paths[0]): [1, 2, 13, 14], "img1.png": [5, 6, 17, 18], "other.png": [0, 0, 1, 1]}))
    args = parse(str(paths[0]), str(paths[1]), "--local", "-o", str(tmp_path / "out"), "--boxes", str(boxes))
    names, _, demo = _inputs(args)
    assert _regions(args, names, demo) == [(1, 2, 13, 14), (5, 6, 17, 18)]
    boxes.write_text(json.dumps({"img1.png": [5, 6, 17, 18]}))
    with pytest.raises(CliError, match="no box for .*img0.png"):
        _regions(args, names, demo)
    assert _regions(parse(str(paths[0]), "--local", "-o", "x"), names[:1], {}) == []  # no boxes: no regions


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _job(state: int, progress: float) -> pb.Job:
    return pb.Job(id="0123456789abcdef", state=state, progress=progress, is_evaluation=True)


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise():
    events = [_job(pb.QUEUED, 0.0)] + [_job(pb.RUNNING, p / 100) for p in range(0, 100, 4)] + [_job(pb.SUCCEEDED, 1)]
    log = io.StringIO()
    shown = Progress(log)
    for job in events:
        shown.update(job)
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("evaluation 0123456789abcdef: QUEUED 0%")
    assert len(lines) == 1 + 10 + 1 and lines[-1].startswith("evaluation 0123456789abcdef: SUCCEEDED 100%")
    terminal = _Terminal()
    bar = Progress(terminal)
    for job in events[:5]:
        bar.update(job)
    bar.close()
    text = terminal.getvalue()
    assert text.count("\r") == 5 and text.endswith("\n") and text.count("\n") == 1 and "12%" in text


def attribution(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(CLI + list(argv), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    return done


@pytest.mark.process
@pytest.mark.parametrize("argv, said", [
    (["--local", "-o", "out"], "give image files (or folders of them), --demo N, or --dataset NAME"),
    (["--demo", "2", "-o", "out"], "give --server HOST:PORT or --local"),
    (["--demo", "2", "--local"], "give -o DIR"),
    (["--demo", "2", "--local", "-o", "out", "--methods", "gradcam"], "did you mean 'grad_cam'?"),
    (["--demo", "2", "--local", "-o", "out", "--metrics", "deletoin"], "did you mean 'deletion'?"),
    (["--demo", "2", "--local", "-o", "out", "--methods", "vanilla_gradient", "--steps", "8"],
     "--steps: none of the methods (vanilla_gradient) takes it"),
    (["--demo", "2", "--local", "-o", "out", "--methods", "smoothgrad@block4"], "smoothgrad has no layer"),
    (["--demo", "2", "--local", "-o", "out", "--curve-baselines", "zeros"], "did you mean 'zero'?"),
    (["nope.png", "--local", "-o", "out"], "nope.png: no such file or folder"),
    (["--demo", "2", "--dataset", "holdout", "--local", "-o", "out"], "--dataset names the server's items"),
])
def test_usage_errors_are_one_line_and_exit_2(tmp_path, argv, said):
    done = attribution("evaluate", *[str(tmp_path / a) if a in ("out", "nope.png") else a for a in argv])
    assert done.returncode == 2 and said in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and done.stdout == ""


@pytest.mark.process
def test_a_bad_boxes_file_and_an_unreachable_server_are_named(tmp_path):
    boxes = tmp_path / "boxes.json"
    boxes.write_text('{"demo-000.png": [4, 4, 2, 9]}')
    image = tmp_path / "a.png"
    image.write_bytes(encode_png(torch.zeros(3, 8, 8, dtype=torch.uint8)).numpy().tobytes())
    done = attribution("evaluate", str(image), "--local", "-o", str(tmp_path / "out"), "--boxes", str(boxes))
    assert done.returncode == 2 and "is not [top, left, bottom, right]" in done.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = attribution("evaluate", "--demo", "2", "--server", f"127.0.0.1:{port}", "-o", str(tmp_path / "out"),
                       "--timeout", "5")
    assert done.returncode == 1 and "cannot reach" in done.stderr


@pytest.fixture(scope="module")
def local_config(demo_cache_dir, demo_model, tmp_path_factory) -> str:
    """`--config` for `--local`: the demo model from the suite's cache (built once)."""
    path = tmp_path_factory.mktemp("evaluate") / "config.json"
    path.write_text(json.dumps({"models": [{"name": "demo", "source": "demo"}], "cache_dir": str(demo_cache_dir)}))
    return str(path)


@pytest.mark.process
def test_a_request_the_server_refuses_is_a_usage_error(local_config, tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(encode_png(torch.zeros(3, 64, 64, dtype=torch.uint8)).numpy().tobytes())
    done = attribution("evaluate", str(image), "--local", "--config", local_config, "--methods", "grad_cam",
                       "--metrics", "pointing_game", "-o", str(tmp_path / "out"))
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert "the server refused the evaluation: " in done.stderr and "regions" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.process
@pytest.mark.slow
def test_a_local_evaluation_writes_the_report_and_prints_the_ranking(local_config, tmp_path):
    out = tmp_path / "report"
    done = attribution("evaluate", "--local", "--config", local_config, "--demo", "6",
                       "--methods", "grad_cam,vanilla_gradient", "--curve-steps", "8", "--bootstrap", "200",
                       "--metrics", "deletion,insertion,model_randomization,pointing_game", "-o", str(out),
                       timeout=600)
    assert done.returncode == 0, done.stderr
    saved = json.loads((out / "evaluation.json").read_text())
    result = json_format.ParseDict(saved["result"], pb.EvaluationResult())
    assert result.num_items == 6 and len(result.methods) == 2
    assert set(result.ranking) == {m.label for m in result.methods}
    for method in result.methods:
        metrics = {v.metric for v in method.metrics}
        assert {pb.DELETION, pb.INSERTION, pb.MODEL_RANDOMIZATION, pb.POINTING_GAME} <= metrics
        assert all(len(v.per_item) == 6 for v in method.metrics if v.metric == pb.POINTING_GAME)
    assert saved["summary"]["item_names"] == [f"demo-{i:03d}.png" for i in range(6)]
    assert {"index.html", "cost.png"} <= {p.name for p in out.iterdir()}
    lines = done.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["#", "method"]
    assert [line.split()[:2] for line in lines[1:3]] == [["1", result.ranking[0]], ["2", result.ranking[1]]]
    assert lines[-1].startswith("cost: ")
    progress = [line for line in done.stderr.splitlines() if line.startswith("evaluation ")]
    assert progress and progress[-1].split()[2:4] == ["SUCCEEDED", "100%"]


@pytest.fixture
def served(demo_cache_dir, demo_model, tmp_path):
    """A whole service with jobs in its own process (tests/service/jobs/serve_local.py)."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.service.jobs.serve_local", "--data-dir",
                             str(tmp_path / "data"), "--cache-dir", str(demo_cache_dir)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 180)
        line = proc.stdout.readline() if ready else ""
        assert line.startswith("READY "), f"service process did not start (exit {proc.poll()})"
        yield f"127.0.0.1:{line.split()[1]}"
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.process
@pytest.mark.slow
def test_ctrl_c_stops_watching_and_the_job_goes_on(served, tmp_path):
    proc = subprocess.Popen(CLI + ["evaluate", "--server", served, "--demo", "48", "--methods",
                                   "integrated_gradients,smoothgrad", "--steps", "64", "--samples", "32",
                                   "--curve-steps", "32", "-o", str(tmp_path / "out")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        first = proc.stderr.readline()  # the job is submitted: its first progress line
        assert first.startswith("evaluation "), first
        job_id = first.split()[1].rstrip(":")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in out + err, err
    assert f"evaluation job {job_id} goes on on the server" in err and f"attribution jobs watch {job_id}" in err
    with grpc.insecure_channel(served) as channel:
        stub = pb_grpc.AttributionServiceStub(channel)
        job = stub.GetJob(pb.GetJobRequest(id=job_id), timeout=30)
        assert job.is_evaluation and job.state in (pb.QUEUED, pb.RUNNING, pb.SUCCEEDED)
        stub.CancelJob(pb.CancelJobRequest(id=job_id), timeout=60)
