"""`audit verify`: a fresh log of real explanations reproduces; tampering and drift are caught."""
from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch
import torchvision.io as tvio

from service._proto import attribution_pb2 as pb
from service.audit import LOG_NAME, AuditConfig, AuditLog
from service.audit.verify import verify
from service.cli import main
from tests.service.test_audit import backend, explain, model_tensor  # noqa: F401 - backend is a fixture
from workers import demo


def _requests(x: torch.Tensor) -> list[pb.ExplainRequest]:
    """SmoothGrad (seeded), IG (noise and custom baselines, top-2), Grad-CAM (+Layer-CAM, native, uint8)."""
    custom = pb.Baseline(kind=pb.CUSTOM, tensor=model_tensor(x[7:8] * 0.25).tensor)
    return [
        pb.ExplainRequest(request_id="sg", inputs=model_tensor(x[0:3]), method=pb.SMOOTHGRAD, seed=1234,
                          noise=pb.NoiseParams(samples=8, noise_fraction=0.2)),
        pb.ExplainRequest(request_id="ig", inputs=model_tensor(x[3:5]), method=pb.INTEGRATED_GRADIENTS, seed=7,
                          target=pb.Target(top_k=2), output=pb.OutputOptions(normalization=pb.MAX_ABS),
                          integrated_gradients=pb.IntegratedGradientsParams(
                              steps=8, baseline=pb.Baseline(kind=pb.UNIFORM_NOISE))),
        pb.ExplainRequest(request_id="ig-custom", inputs=model_tensor(x[5:6]), method=pb.INTEGRATED_GRADIENTS,
                          integrated_gradients=pb.IntegratedGradientsParams(steps=6, baseline=custom)),
        pb.ExplainRequest(request_id="cam", inputs=model_tensor(x[6:8]), method=pb.GRAD_CAM,
                          cam=pb.CamParams(layer="block3", also=[pb.LAYER_CAM]),
                          output=pb.OutputOptions(native_resolution=True, dtype=pb.UINT8)),
    ]


@pytest.fixture(scope="module")
def audit_dir(backend, demo_heldout_inputs, tmp_path_factory):  # noqa: F811
    directory = tmp_path_factory.mktemp("audit")
    audit = AuditLog(AuditConfig(store_inputs=True), directory)
    for request in _requests(demo_heldout_inputs):
        assert audit.record(*explain(backend, request))
    assert audit.close()
    return directory


def _records(directory: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (directory / LOG_NAME).read_text().splitlines()]


def _tampered(audit_dir: pathlib.Path, tmp_path: pathlib.Path, pick, change) -> tuple[pathlib.Path, int]:
    """A copy of the log (inputs included) with the first record `pick` accepts changed; its line number."""
    copy = tmp_path / "copy"
    shutil.copytree(audit_dir, copy, ignore=shutil.ignore_patterns(".audit.lock"))
    records = _records(copy)
    index = next(i for i, r in enumerate(records) if pick(r))
    change(records[index])
    (copy / LOG_NAME).write_text("".join(json.dumps(r) + "\n" for r in records))
    return copy, index + 1


def test_verify_passes_on_a_fresh_log(audit_dir, backend):  # noqa: F811
    records = _records(audit_dir)
    assert {r["method"] for r in records} == {"smoothgrad", "integrated_gradients", "grad_cam"}
    report = verify([audit_dir / LOG_NAME], backend)
    assert report.ok, report.summary()
    assert report.counts() == {"ok": len(records)} and report.records == 3 + 4 + 1 + 4


def test_a_tampered_map_summary_fails_that_record(audit_dir, backend, tmp_path):  # noqa: F811
    def nudge(r):
        values = r["map_summary"]["values"]
        values[3] = values[3] + 0.01 * max(r["map_summary"]["abs_max"], 1e-6)  # 1 % of the scale: past 1e-3
        r["map_sha256"] = "0" * 64

    copy, line = _tampered(audit_dir, tmp_path, lambda r: r["method"] == "smoothgrad" and r["item"] == 1, nudge)
    report = verify([copy], backend)
    assert not report.ok
    (bad,) = [c for c in report.checks if c.status != "ok"]
    assert bad.status == "mismatch" and bad.source.endswith(f":{line}") and "summary differs" in bad.detail
    assert (bad.request_id, bad.item) == ("sg", 1)


def test_a_map_that_differs_only_in_its_last_bits_passes_within_tolerance(audit_dir, backend, tmp_path):  # noqa: F811
    """What batching with other requests or another thread count does to a map: the hash moves, the summary
    stays within the record's tolerance."""
    def last_bits(r):
        r["map_sha256"] = "0" * 64
        r["map_summary"]["values"] = [v + 1e-5 * r["map_summary"]["abs_max"] for v in r["map_summary"]["values"]]

    copy, line = _tampered(audit_dir, tmp_path, lambda r: r["request_id"] == "cam", last_bits)
    report = verify([copy], backend)
    assert report.ok and report.verdict == "PASS", report.summary()
    (close,) = [c for c in report.checks if c.status != "ok"]
    assert close.status == "ok_within_tolerance" and close.source.endswith(f":{line}")
    records = _records(audit_dir)
    assert {(r["guarantee"], r["tolerance"]) for r in records} == {("summary_within_tolerance", 1e-3)}


def test_schema_1_records_are_still_read_and_need_the_exact_hash(audit_dir, backend, tmp_path):  # noqa: F811
    copy, _ = _tampered(audit_dir, tmp_path, lambda r: True, lambda r: None)
    records = _records(copy)
    for r in records:
        for key in ("path", "guarantee", "tolerance", "map_summary"):
            r.pop(key)
        r["schema"] = 1
    (copy / LOG_NAME).write_text("".join(json.dumps(r) + "\n" for r in records))
    assert verify([copy], backend).ok
    flipped, _ = _tampered(copy, tmp_path / "flipped", lambda r: r["request_id"] == "cam",
                           lambda r: r.update(map_sha256="0" * 64))
    (bad,) = [c for c in verify([flipped], backend).checks if c.status != "ok"]
    assert bad.status == "mismatch" and "schema 1" in bad.detail


def test_schema_3_records_without_the_absolute_completeness_error_are_still_read(audit_dir, backend,  # noqa: F811
                                                                                   tmp_path):
    copy, _ = _tampered(audit_dir, tmp_path, lambda r: True, lambda r: None)
    records = _records(copy)
    assert any(isinstance(r["completeness_error_absolute"], float) for r in records)
    for r in records:
        r.pop("completeness_error_absolute")
        r["schema"] = 3
    (copy / LOG_NAME).write_text("".join(json.dumps(r) + "\n" for r in records))
    report = verify([copy], backend)
    assert report.ok and report.counts() == {"ok": len(records)}, report.summary()
    for r in records:
        r["schema"] = 4                                      # a schema 4 record must carry the field
    (copy / LOG_NAME).write_text("".join(json.dumps(r) + "\n" for r in records))
    report = verify([copy], backend)
    assert not report.ok and {c.status for c in report.checks} == {"invalid_record"}
    assert "completeness_error_absolute" in report.checks[0].detail


def test_a_tampered_seed_fails(audit_dir, backend, tmp_path):  # noqa: F811
    copy, line = _tampered(audit_dir, tmp_path, lambda r: r["method"] == "smoothgrad" and r["item"] == 2,
                           lambda r: r.update(seed=r["seed"] + 1))
    report = verify([copy], backend)
    (bad,) = [c for c in report.checks if c.status != "ok"]
    assert bad.status == "mismatch" and bad.source.endswith(f":{line}") and "summary differs" in bad.detail


def test_a_tampered_ig_parameter_fails(audit_dir, backend, tmp_path):  # noqa: F811
    copy, _ = _tampered(audit_dir, tmp_path, lambda r: r["request_id"] == "ig",
                        lambda r: r["params"].update(steps=9))
    assert [c.status for c in verify([copy], backend).checks].count("mismatch") == 1


def test_another_model_version_is_reported_as_such(audit_dir, backend, tmp_path):  # noqa: F811
    copy, _ = _tampered(audit_dir, tmp_path, lambda r: r["request_id"] == "cam",
                        lambda r: r.update(model_version="f" * 64))
    counts = verify([copy], backend).counts()
    assert counts["model_version_mismatch"] == 1 and "mismatch" not in counts


def test_inputs_come_from_the_store_or_from_the_client(audit_dir, backend, tmp_path):  # noqa: F811
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(audit_dir / LOG_NAME, alone / LOG_NAME)
    missing = verify([alone], backend)
    assert set(missing.counts()) == {"skipped"} and not missing.ok and missing.verdict == "NOTHING CHECKED"
    kept = verify([alone], backend, inputs_dir=audit_dir / "inputs")  # the client kept model-space .npy
    assert kept.ok, kept.summary()


def test_client_kept_png_files_are_matched_by_hash(backend, tmp_path):  # noqa: F811
    pixels = demo.make_watermark_dataset(2, seed=5).images
    pngs = [tvio.encode_png((p * 255).round().to(torch.uint8)).numpy().tobytes() for p in pixels]
    kept = tmp_path / "kept"
    kept.mkdir()
    for i, png in enumerate(pngs):
        (kept / f"img{i}.png").write_bytes(png)
    request = pb.ExplainRequest(request_id="png", inputs=pb.Inputs(images=pb.EncodedImages(images=pngs)),
                                method=pb.VARGRAD, seed=3, noise=pb.NoiseParams(samples=4))
    audit = AuditLog(AuditConfig(), tmp_path / "audit")
    audit.record(*explain(backend, request))
    audit.close()
    assert verify([tmp_path / "audit"], backend).counts() == {"skipped": 2}
    report = verify([tmp_path / "audit"], backend, inputs_dir=kept)
    assert report.ok, report.summary()


def test_unreadable_lines_fail_the_run(audit_dir, backend, tmp_path):  # noqa: F811
    copy, _ = _tampered(audit_dir, tmp_path, lambda r: True, lambda r: r.pop("seed"))
    with open(copy / LOG_NAME, "a") as fh:
        fh.write("{not json\n")
    report = verify([copy], backend)
    assert report.counts()["invalid_record"] == 2 and not report.ok


def test_sample_checks_that_many_records(audit_dir, backend):  # noqa: F811
    first = verify([audit_dir], backend, sample=3, seed=11)
    again = verify([audit_dir], backend, sample=3, seed=11)
    assert first.ok and len(first.checks) == 3
    assert [c.source for c in first.checks] == [c.source for c in again.checks]


def test_cli_exit_codes(audit_dir, demo_cache_dir, tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"models": [{"name": "demo", "source": "demo"}], "cache_dir": str(demo_cache_dir)}))
    assert main(["audit", "verify", str(audit_dir), "--config", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    copy, _ = _tampered(audit_dir, tmp_path, lambda r: r["request_id"] == "ig",
                        lambda r: r.update(map_sha256="0" * 64, target=r["target"] + 1))
    assert main(["audit", "verify", str(copy / LOG_NAME), "--config", str(config), "--sample", "50"]) == 1
    assert capsys.readouterr().out.rstrip().endswith("FAIL")
    empty = tmp_path / "empty"
    (empty / "audit").mkdir(parents=True)
    assert main(["audit", "verify", "--data-dir", str(empty), "--config", str(config)]) == 1  # nothing checked
    assert capsys.readouterr().out.rstrip().endswith("NOTHING CHECKED")
    assert main(["audit", "verify", "--data-dir", str(tmp_path / "none"), "--config", str(config)]) == 2
    assert "no audit log at" in capsys.readouterr().err


def test_cli_on_a_missing_log_says_so_without_a_traceback(tmp_path):
    import subprocess
    import sys

    missing = tmp_path / "nope" / "audit.jsonl"
    done = subprocess.run([sys.executable, "-m", "service.cli", "audit", "verify", str(missing)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr + done.stdout
    assert f"no such log file or directory: {missing}" in done.stderr


def test_a_sample_is_drawn_from_the_records_whose_inputs_are_at_hand(audit_dir, backend, tmp_path):  # noqa: F811
    """A log of which most records cannot be checked still gets the sample's checks."""
    records = _records(audit_dir)
    mixed = tmp_path / "mixed"
    shutil.copytree(audit_dir, mixed, ignore=shutil.ignore_patterns(".audit.lock"))
    unverifiable = []
    for r in records * 5:  # copies whose input was never stored
        unverifiable.append(dict(r, input_ref=None, input_sha256="e" * 64, entry_id="x" + r["entry_id"][1:]))
    (mixed / LOG_NAME).write_text("".join(json.dumps(r) + "\n" for r in unverifiable + records))
    report = verify([mixed], backend, sample=4, seed=1)
    counts = report.counts()
    assert counts["skipped"] == len(unverifiable) and counts.get("ok", 0) + counts.get("ok_within_tolerance", 0) == 4
    assert report.verdict == "PASS", report.summary()
