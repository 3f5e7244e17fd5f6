"""`attribution jobs ...` through the real CLI entry point, against a real server on a socket."""
from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import torch
import torchvision.io as tvio

from service._proto import attribution_pb2 as pb
from service.cli import main
from tests.service.jobs.conftest import job_request


@pytest.fixture
def images(tmp_path, demo_batch):
    paths = []
    for i, image in enumerate(demo_batch.images[:2]):
        path = tmp_path / f"image{i}.png"
        path.write_bytes(tvio.encode_png((image * 255).round().to(torch.uint8)).numpy().tobytes())
        paths.append(str(path))
    return paths


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["jobs", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_submit_watch_get_list_cancel(start_service, images, tmp_path, capsys):
    server = ["--server", start_service().address]
    code, out, _ = run_cli(capsys, "submit", *images, "--method", "score_cam", "--overlay", "--priority", "3",
                           "--idempotency-key", "cli-1", *server, "--json")
    assert code == 0
    job = json.loads(out)
    assert job["state"] in ("QUEUED", "RUNNING") and job["num_items"] == 2 and job["priority"] == 3

    outputs = tmp_path / "maps"
    code, out, _ = run_cli(capsys, "watch", job["id"], *server, "--json", "-o", str(outputs))
    assert code == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["id"] == job["id"] and events[-1]["state"] == "SUCCEEDED"
    assert [e["progress"] for e in events] == sorted(e["progress"] for e in events)
    npy, png = sorted(outputs.glob("*.npy")), sorted(outputs.glob("*.png"))
    assert [p.name.split("_class")[0] for p in npy] == ["image0_score_cam", "image1_score_cam"]
    assert [p.stem for p in png] == [p.stem for p in npy]  # one overlay per map
    manifest = json.loads((outputs / "manifest.json").read_text())
    assert [m["name"] for m in manifest["items"]] == images and manifest["job"] == job["id"]
    assert [m["files"] for m in manifest["items"]] == [[p.name, p.with_suffix(".png").name] for p in npy]
    assert events[-1]["item_names"] == images
    assert all(np.load(p).shape == (64, 64) and np.load(p).dtype == np.float32 for p in npy)
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in png)

    code, out, _ = run_cli(capsys, "get", job["id"], *server, "--json")
    assert code == 0 and json.loads(out)["state"] == "SUCCEEDED" and "result" not in json.loads(out)
    code, out, _ = run_cli(capsys, "list", "--state", "succeeded", *server, "--json")
    assert code == 0 and [j["id"] for j in json.loads(out)["jobs"]] == [job["id"]]
    code, _, err = run_cli(capsys, "cancel", job["id"], *server)
    assert code == 1 and "FAILED_PRECONDITION" in err


def test_watch_draws_a_progress_bar(start_service, images, capsys):
    server = ["--server", start_service().address]
    code, out, err = run_cli(capsys, "submit", *images, "--method", "occlusion", "--patch-size", "8", "--stride",
                             "8", "--watch", *server)
    assert code == 0
    assert "[" + "#" * 30 + "] 100%" in err and "SUCCEEDED" in err
    assert "SUCCEEDED" in out


def test_bad_requests_exit_nonzero_with_the_status(start_service, images, capsys):
    server = ["--server", start_service().address]
    code, _, err = run_cli(capsys, "submit", *images, "--method", "score_cam", "--layer", "fc", *server)
    assert code == 1 and "INVALID_ARGUMENT" in err and "score_cam.layer" in err
    code, _, err = run_cli(capsys, "get", "no-such-job", *server)
    assert code == 1 and "NOT_FOUND" in err
    code, _, err = run_cli(capsys, "submit", *images, "--method", "no_such_method", *server)
    assert code == 1 and "unknown Method" in err


def test_overlays_are_drawn_over_the_photo_at_hand_and_classes_are_named(start_service, demo_batch, tmp_path,
                                                                          capsys):
    """With the submitted file at hand, `-o` draws each overlay over it at its own resolution (96x48 here,
    the model's input is 64x64); without it, the server's overlay is written. Classes carry their names."""
    from PIL import Image

    from workers.demo import DEMO_LABELS

    wide = torch.nn.functional.interpolate(demo_batch.images[:1], size=(48, 96), mode="bilinear")[0]
    photo = tmp_path / "wide.png"
    photo.write_bytes(tvio.encode_png((wide * 255).round().to(torch.uint8)).numpy().tobytes())
    server = ["--server", start_service().address]
    code, out, _ = run_cli(capsys, "submit", str(photo), "--method", "score_cam", "--overlay", *server, "--json")
    assert code == 0
    job_id = json.loads(out)["id"]

    code, out, _ = run_cli(capsys, "watch", job_id, *server, "-o", str(tmp_path / "drawn"))
    assert code == 0
    (item,) = json.loads((tmp_path / "drawn" / "manifest.json").read_text())["items"]
    assert item["overlays"] == "photo"
    assert item["predicted_labels"] == [DEMO_LABELS[c] for c in item["predicted_classes"]]
    (target,) = item["targets"]
    assert item["target_labels"] == [DEMO_LABELS[target]]
    (overlay,) = (tmp_path / "drawn").glob("*.png")
    assert Image.open(overlay).size == (96, 48)
    best = item["predicted_classes"][0]
    assert f"{photo}: predicted {best} '{DEMO_LABELS[best]}' (" in out
    assert f"; maps for {target} '{DEMO_LABELS[target]}'" in out

    photo.rename(tmp_path / "moved.png")  # the photo is no longer where the job's item name points
    code, out, _ = run_cli(capsys, "get", job_id, *server, "-o", str(tmp_path / "served"), "--json")
    assert code == 0
    shown = json.loads(out)
    assert shown["items"][0]["target_labels"] == [DEMO_LABELS[target]]
    assert json.loads((tmp_path / "served" / "manifest.json").read_text())["items"][0]["overlays"] == "model_input"
    (overlay,) = (tmp_path / "served").glob("*.png")
    assert Image.open(overlay).size == (64, 64)


@pytest.mark.process
def test_ctrl_c_during_watch_leaves_the_job_running_on_the_server(start_service, demo_batch):
    """SIGINT to the real `attribution jobs watch` process: one line saying the job goes on, exit 130, no
    traceback; the server keeps the job (it is not cancelled)."""
    service = start_service()
    stub = service.stub()
    job = stub.SubmitJob(job_request(demo_batch.images[:4], pb.OCCLUSION,
                                     occlusion=pb.OcclusionParams(patch_size=4, stride=1)), timeout=30)
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "jobs", "watch", job.id,
                             "--server", service.address, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline, seen = time.monotonic() + 60, ""
        while '"RUNNING"' not in seen and time.monotonic() < deadline:  # watching, the job under way
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = proc.stdout.readline() if ready else ""
            if not line:
                break
            seen = line
        assert '"RUNNING"' in seen and json.loads(seen)["id"] == job.id, seen
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in out + err, err
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0] == (f"stopped watching; job {job.id} goes on on the server "
                        f"(`attribution jobs watch {job.id}` picks it up again, `jobs cancel` stops it)")
    after = stub.GetJob(pb.GetJobRequest(id=job.id), timeout=10)
    assert after.state in (pb.RUNNING, pb.SUCCEEDED), pb.JobState.Name(after.state)
    if after.state == pb.RUNNING:  # spare the machine the rest of it (it may have just finished)
        with contextlib.suppress(grpc.RpcError):
            stub.CancelJob(pb.CancelJobRequest(id=job.id), timeout=10)
