"""The console script as a person meets it: ordinary mistakes get one clear line and a non-zero exit, never a
traceback; outputs are named so that nothing overwrites anything. Each case runs the real `attribution`
command in a subprocess."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest
import torch
from torchvision.io import encode_png

pytestmark = pytest.mark.process

CLI = [sys.executable, "-m", "service.cli"]


def attribution(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    done = subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    return done


@pytest.fixture(scope="module")
def local_config(demo_cache_dir, demo_model, tmp_path_factory) -> str:
    """`--config` for `explain --local`: the demo model from the suite's cache (built once)."""
    path = tmp_path_factory.mktemp("cli") / "config.json"
    path.write_text(json.dumps({"models": [{"name": "demo", "source": "demo"}], "cache_dir": str(demo_cache_dir)}))
    return str(path)


@pytest.fixture(scope="module")
def images(demo_heldout, tmp_path_factory) -> pathlib.Path:
    """Two folders holding a PNG each, with the same file name."""
    root = tmp_path_factory.mktemp("images")
    for i, folder in enumerate(("a", "b")):
        (root / folder).mkdir()
        pixels = (demo_heldout.images[i] * 255).round().to(torch.uint8)
        (root / folder / "photo.png").write_bytes(encode_png(pixels).numpy().tobytes())
    return root


def test_a_missing_file_or_an_empty_folder_is_named(tmp_path, local_config):
    done = attribution("explain", str(tmp_path / "nope.png"), "--local", "--config", local_config)
    assert done.returncode == 2 and "nope.png: no such file or folder" in done.stderr
    done = attribution("explain", str(tmp_path), "--local", "--config", local_config)
    assert done.returncode == 2 and "a folder with no PNG or JPEG files" in done.stderr


@pytest.mark.parametrize("flags, said", [
    (["--method", "gradcam"], "did you mean 'grad_cam'?"),
    (["--method", "integrated_gradients", "--baseline", "blured"], "did you mean 'blurred'?"),
    (["--method", "integrated_gradients", "--rule", "simpson"], "--rule 'simpson' is not known"),
])
def test_misspelled_names_get_a_suggestion(images, local_config, flags, said):
    done = attribution("explain", str(images / "a"), "--local", "--config", local_config, *flags)
    assert done.returncode == 2 and said in done.stderr


def test_folders_are_explained_and_same_named_files_do_not_overwrite(images, local_config, tmp_path):
    out = tmp_path / "out"
    done = attribution("explain", str(images), "--local", "--config", local_config, "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 2 and "[2/2]" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["photo-a.grad_cam.png", "photo-b.grad_cam.png"]
    ids = [json.loads(line)["request_id"] for line in attribution(
        "explain", str(images), "--local", "--config", local_config, "--json").stdout.splitlines()]
    assert len(set(ids)) == 2


def test_every_top_k_map_is_saved_and_one_file_takes_one_input(images, local_config, tmp_path):
    out = tmp_path / "top"
    done = attribution("explain", str(images / "a"), "--local", "--config", local_config, "--top-k", "3",
                       "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert len(list(out.glob("photo.grad_cam.t*.png"))) == 3
    done = attribution("explain", str(images), "--local", "--config", local_config, "-o", str(tmp_path / "one.png"))
    assert done.returncode == 2 and "names one overlay file" in done.stderr
    assert not (tmp_path / "one.png").exists()


def test_no_server_running_is_said_in_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    done = attribution("models", "--server", f"127.0.0.1:{port}", "--timeout", "5")
    assert done.returncode == 1 and "cannot reach" in done.stderr and "is the service running" in done.stderr


def test_a_second_server_on_a_used_port_is_refused_before_ray_starts():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = attribution("serve", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", timeout=120)
    assert done.returncode == 2 and f"port {port} on 127.0.0.1 is not free" in done.stderr


def test_ray_that_does_not_start_is_one_line(tmp_path):
    # A cluster address Ray rejects at once: ray.init fails before anything starts (a closed port would
    # have it retry for minutes).
    done = attribution("serve", "--address", "not-an-address", "--host", "127.0.0.1", "--port", "0",
                       "--metrics-port", "0", "--data-dir", str(tmp_path), timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert lines[-1].startswith("attribution serve: Ray did not start: Invalid address format: not-an-address")
    assert "(its logs: /tmp/ray/session_latest/logs; --verbose shows its start-up)" in lines[-1]
    assert not any(line.startswith("attribution") for line in lines[:-1])  # one line (and Ray's own warnings)
    assert "connecting to Ray at not-an-address" in done.stdout


def test_ctrl_c_during_explain_says_what_was_done(local_config, tmp_path):
    proc = subprocess.Popen(CLI + ["explain", "--demo", "400", "--local", "--config", local_config,
                                   "--method", "smoothgrad", "--samples", "64", "--concurrency", "1",
                                   "-o", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()  # one result is in: interrupt mid-run
        assert first.startswith("[1/400]"), first
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in out + err, err
    assert "interrupted after" in err and "of 400 inputs" in err and "overlays in" in err


def test_jobs_watch_without_a_server_is_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(CLI + ["jobs", "watch", "--server", f"127.0.0.1:{port}", "job-1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in out + err, err
    assert proc.returncode == 1 and "cannot reach" in err


def test_overlays_keep_the_photos_resolution_and_a_gallery_lists_them(images, local_config, tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray((torch.rand(427, 640, 3) * 255).to(torch.uint8).numpy()).save(photos / "wide.jpg")
    out = tmp_path / "gallery"
    done = attribution("explain", str(photos), str(images / "a"), "--local", "--config", local_config,
                       "-o", str(out), "--format", "html", "--legend", "--colormap", "viridis")
    assert done.returncode == 0, done.stderr
    assert Image.open(out / "wide.grad_cam.png").size[0] == 640  # the photo's width, legend strip below
    page = (out / "index.html").read_text()
    assert 'src="wide.grad_cam.png"' in page and 'src="photo.grad_cam.png"' in page
    done = attribution("explain", str(photos), "--local", "--config", local_config, "-o", str(out),
                       "--colormap", "jett")
    assert done.returncode == 2 and "unknown colormap 'jett'" in done.stderr


@pytest.fixture(scope="module")
def scripted(tmp_path_factory) -> pathlib.Path:
    """A tiny TorchScript classifier (3x16x16 in, 2 classes out) and a 16x16 PNG to explain with it."""
    import warnings

    folder = tmp_path_factory.mktemp("torchscript")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; TorchScript files still exist
        torch.jit.save(torch.jit.script(net), str(folder / "tiny.ts"))
    (folder / "x.png").write_bytes(encode_png(torch.zeros(3, 16, 16, dtype=torch.uint8)).numpy().tobytes())
    return folder


def _scripted_config(folder: pathlib.Path, name: str, **model) -> str:
    path = folder / name
    path.write_text(json.dumps({"models": [{"name": "ts", "source": "torchscript", "path": str(folder / "tiny.ts"),
                                            "input": {"height": 16, "width": 16}, **model}]}))
    return str(path)


def test_a_torchscript_model_given_cam_layers_is_refused_when_the_config_is_checked(scripted):
    config = _scripted_config(scripted, "cam.json", cam_layers=["0"])
    for args in (["serve", "--config", config, "--check"],
                 ["explain", str(scripted / "x.png"), "--local", "--config", config]):
        done = attribution(*args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, done.stderr
        assert "invalid config: models[ts].cam_layers: CAM layers 0 were configured" in lines[-1]
        assert "source torchvision" in lines[-1] and "export (torch.export), which support CAM" in lines[-1]
        assert not any(line.startswith("attribution") for line in lines[:-1])  # one line (and torch's warnings)


def test_a_model_that_fails_to_load_locally_is_one_line(scripted):
    config = _scripted_config(scripted, "missing.json", path=str(scripted / "nope.ts"))
    done = attribution("explain", str(scripted / "x.png"), "--local", "--config", config)
    assert done.returncode == 2, done.stderr
    assert f"attribution explain: model 'ts': cannot load torchscript file {scripted / 'nope.ts'}" in done.stderr
    config = _scripted_config(scripted, "classes.json", num_classes=5)
    done = attribution("explain", str(scripted / "x.png"), "--local", "--config", config)
    assert done.returncode == 2 and "config says 5 classes, model gives 2" in done.stderr


@pytest.fixture(scope="module")
def tls_server(start_server, tmp_path_factory):
    """A front door on TLS (its own self-signed certificate) that wants the token `t0ken`; yields (harness, cert)."""
    pytest.importorskip("cryptography")
    from tests.support import self_signed_cert

    cert, key = self_signed_cert(tmp_path_factory.mktemp("tls"))
    harness = start_server(tls_cert=str(cert), tls_key=str(key), auth_token="t0ken")
    yield harness, cert
    harness.stop()


def test_explain_and_models_take_the_tls_and_token_options(tls_server, images):
    harness, cert = tls_server
    secure = ["--server", harness.address, "--ca", str(cert)]
    done = attribution("models", *secure, "--token", "t0ken")
    assert done.returncode == 0 and done.stdout.startswith("demo (default)"), done.stderr
    done = attribution("explain", str(images / "a" / "photo.png"), *secure, "--token", "t0ken")
    assert done.returncode == 0 and ": predicted " in done.stdout, done.stderr
    done = attribution("models", *secure, "--timeout", "10")
    assert done.returncode == 1 and f"{harness.address} refused the credentials" in done.stderr
    assert "(give --token)" in done.stderr
    done = attribution("explain", str(images / "a" / "photo.png"), *secure, "--token", "wrong")
    assert done.returncode == 1 and "UNAUTHENTICATED" in done.stdout  # per input, on its own line


@pytest.fixture(scope="module")
def mtls_server(start_server, tmp_path_factory):
    """A front door on mutual TLS: it lets in clients whose certificate its CA signed; yields (harness, pki)."""
    pytest.importorskip("cryptography")
    from tests.support import mutual_tls

    pki = mutual_tls(tmp_path_factory.mktemp("mtls"))
    harness = start_server(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca))
    yield harness, pki
    harness.stop()


def test_a_server_on_mutual_tls_takes_cert_and_key_and_says_when_they_are_missing(mtls_server, images):
    harness, pki = mtls_server
    secure = ["--server", harness.address, "--ca", str(pki.ca)]
    signed = ["--cert", str(pki.client_cert), "--key", str(pki.client_key)]
    done = attribution("models", *secure, *signed)
    assert done.returncode == 0 and done.stdout.startswith("demo (default)"), done.stderr
    done = attribution("explain", str(images / "a" / "photo.png"), *secure, *signed)
    assert done.returncode == 0 and ": predicted " in done.stdout, done.stderr
    for certificate, hint in (([], "give --cert and --key"),
                              (["--cert", str(pki.foreign_cert), "--key", str(pki.foreign_key)],
                               "does it trust the CA that signed --cert?")):
        done = attribution("models", *secure, *certificate, "--timeout", "10")
        said = [line for line in done.stderr.splitlines() if line.startswith("attribution")]
        assert done.returncode == 1 and len(said) == 1, done.stderr
        assert said[0].startswith(f"attribution models: {harness.address} closed the TLS connection: ")
        assert said[0].endswith(f"({hint})" if certificate else f"(if it wants a client certificate, {hint})")
    done = attribution("models", *secure, "--cert", str(pki.client_cert))
    assert done.returncode == 2 and done.stderr.strip() == (
        "attribution models: --cert and --key go together: the client certificate and its private key")


def test_an_unreadable_ca_file_is_one_line(tmp_path, images):
    missing = tmp_path / "missing.pem"
    for command in (["models"], ["explain", str(images / "a" / "photo.png")]):
        done = attribution(*command, "--server", "127.0.0.1:1", "--ca", str(missing), "--token", "t0ken")
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == f"attribution {command[0]}: {missing}: No such file or directory"


def test_explain_names_the_classes_of_a_model_with_labels(images, local_config):
    import re

    from workers.demo import DEMO_LABELS

    done = attribution("explain", str(images / "a"), "--local", "--config", local_config, "--top-k", "2")
    assert done.returncode == 0, done.stderr
    named = re.search(r"predicted (\d+) '([^']+)' \([0-9.]+\), grad_cam target (\d+) '([^']+)'", done.stdout)
    assert named, done.stdout
    predicted, predicted_label, target, target_label = named.groups()
    assert DEMO_LABELS[int(predicted)] == predicted_label and DEMO_LABELS[int(target)] == target_label
