"""The GPU check in its tiny CPU mode: the script runs end to end and reports every row (figures mean nothing here)."""
from __future__ import annotations

import json

import pytest

from loadtests import gpu_check


@pytest.mark.slow
def test_tiny_gpu_check_reports_floor_kernels_and_service(tmp_path):
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--tiny", "--dtype", "bf16", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and set(report["floor_samples_per_s"]) == {"fp32", "bf16"}
    assert [r["method"] for r in report["rows"]] == list(gpu_check.METHODS)
    for row in report["rows"]:
        assert row["kernel_explanations_per_s"] > 0 and row["service_explanations_per_s"] > 0
        assert row["kernel_ratio_to_floor"] > 0 and row["service_ratio_to_floor"] > 0
