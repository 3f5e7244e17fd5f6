"""Kernel bench smoke test: the tiniest config runs and the report has its schema (no time is asserted)."""
from __future__ import annotations

import argparse
import json

from loadtests import bench_args, kernel_bench

ROW_KEYS = {"method", "seconds", "floor_seconds", "ratio_to_floor", "captum_seconds", "ratio_to_captum",
            "floor_one_chunk_seconds", "ratio_to_floor_one_chunk", "chunks",
            "captum_tuned_seconds", "ratio_to_captum_tuned", "rows"}
FOLD_KEYS = {"method", "seconds", "one_by_one_seconds", "ratio_folded_to_one_by_one", "rows", "requests"}


def test_tiny_bench_report_schema(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    kernel_bench.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--model", "resnet18", "--size", "32", "--batch", "1", "--samples", "2",
                              "--steps", "2", "--repeats", "1", "--threads", "1", "--json", str(out)])
    report = kernel_bench.run(args)

    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert {"torch", "threads", "cpu"} <= set(report["machine"])
    assert report["config"]["samples"] == 2 and report["config"]["methods"] == list(bench_args.DEFAULT_METHODS)
    methods = [row["method"] for row in report["results"]]
    assert methods == [*bench_args.DEFAULT_METHODS, "fold_8_batch1_vanilla", "fold_8_batch1_smoothgrad"]
    by_method = {row["method"]: row for row in report["results"]}
    assert by_method["smoothgrad"]["rows"] == 2 and by_method["integrated_gradients"]["rows"] == 2
    for method in bench_args.DEFAULT_METHODS:
        row = by_method[method]
        assert ROW_KEYS <= set(row)
        assert all(row[key] > 0 for key in ROW_KEYS - {"method", "rows", "chunks"}) and row["chunks"] == 1
    for method in ("fold_8_batch1_vanilla", "fold_8_batch1_smoothgrad"):
        assert FOLD_KEYS <= set(by_method[method]) and by_method[method]["requests"] == 8
    assert "ratio_to_floor" not in by_method["fold_8_batch1_vanilla"]
    assert "fold_8_batch1_smoothgrad" in capsys.readouterr().out  # the table is printed


def test_json_option_is_not_added_twice():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    kernel_bench.add_arguments(parser)  # a CLI that owns --json keeps it
    assert parser.parse_args(["--json", "x.json"]).json == "x.json"


def test_cli_bench_kernels_has_both_families(tmp_path):
    from service.cli import main

    out = tmp_path / "all.json"
    assert main(["bench", "kernels", "--model", "demo", "--size", "64", "--batch", "1", "--samples", "2",
                 "--steps", "2", "--repeats", "1", "--threads", "1", "--no-captum", "--cam-model", "demo",
                 "--cam-size", "64", "--cam-batch", "1", "--cam-repeats", "1", "--cam-fold-requests", "2",
                 "--cam-patch", "32", "--cam-stride", "32", "--quiet", "--json", str(out)]) == 0
    methods = {row["method"] for row in json.loads(out.read_text())["results"]}
    assert {"smoothgrad", "integrated_gradients", "grad_cam", "grad_cam_plus_plus", "layer_cam", "score_cam",
            "occlusion"} <= methods


def test_path_method_rows(capsys):
    """Expected Gradients against Captum's GradientShap, Blur IG and Guided IG against their floor alone
    (Captum has neither), Guided IG's fold row: each a ratio over the rows it runs."""
    parser = argparse.ArgumentParser()
    kernel_bench.add_arguments(parser)
    args = parser.parse_args(["--model", "demo", "--size", "32", "--batch", "1", "--samples", "2", "--steps", "2",
                              "--repeats", "1", "--threads", "1", "--methods",
                              "expected_gradients,blur_ig,guided_ig", "--quiet"])
    by_method = {row["method"]: row for row in kernel_bench.run(args)["results"]}
    assert set(by_method) == {"expected_gradients", "blur_ig", "guided_ig", "fold_8_batch1_guided_ig"}
    assert ROW_KEYS <= set(by_method["expected_gradients"]) and by_method["expected_gradients"]["ratio_to_captum"] > 0
    for method in ("blur_ig", "guided_ig"):
        row = by_method[method]
        assert row["rows"] == 2 and row["ratio_to_floor"] > 0 and "captum_seconds" not in row
    assert by_method["guided_ig"]["chunks"] == 2  # one fold per step
    assert by_method["fold_8_batch1_guided_ig"]["rows"] == 16
