"""Smoke test of the CAM bench at tiny settings: it runs, and every row has the schema the
kernel bench merges. Never asserts a time."""
from __future__ import annotations

import argparse
import json

from loadtests import bench_cam

TINY = ["--cam-model", "demo", "--cam-size", "32", "--cam-batch", "2", "--cam-perturbation-batch", "1", "--cam-patch", "16",
        "--cam-stride", "16", "--cam-repeats", "1", "--cam-fold-requests", "3", "--device", "cpu",
        "--cam-rise-masks", "8", "--cam-xrai-steps", "2", "--threads", "1", "--quiet"]  # one thread: OpenMP spinning on a shared host
KEYS = {"method", "seconds", "floor_seconds", "ratio_to_floor", "peer_seconds", "ratio_to_peer"}


def test_standalone_run_writes_the_report(tmp_path):
    out = tmp_path / "bench.json"
    bench_cam.main([*TINY, "--json", str(out)])
    report = json.loads(out.read_text())
    methods = [r["method"] for r in report["results"]]
    assert methods == ["grad_cam", "grad_cam_plus_plus", "layer_cam", "hires_cam", "xgrad_cam", "eigen_cam",
                       "score_cam", "ablation_cam", "occlusion", "rise", "xrai", "fold_3_batch1_grad_cam"]
    for row in report["results"]:
        assert KEYS <= set(row), row
        timed = KEYS - {"method"} - ({"peer_seconds", "ratio_to_peer"} if row["method"] in ("rise", "xrai") else set())
        assert all(isinstance(row[k], float) and row[k] > 0 for k in timed), row
    xrai = report["results"][methods.index("xrai")]
    assert xrai["rows"] == 2 * 2 and 0 < xrai["ig_seconds"] < xrai["seconds"]  # 1 item x 2 baselines x 2 steps
    assert report["machine"]["device"] == "cpu"
    assert bench_cam.format_table(report["results"]).count("\n") == len(methods)


def test_arguments_merge_into_a_parser_that_owns_the_shared_flags():
    parser = argparse.ArgumentParser()
    for flag in ("--device", "--seed", "--json", "--quiet", "--threads"):
        parser.add_argument(flag)
    bench_cam.add_arguments(parser)  # no conflict
    args = parser.parse_args(["--cam-size", "48", "--cam-skip", "score_cam,occlusion"])
    assert args.cam_size == 48 and args.cam_skip == "score_cam,occlusion"
