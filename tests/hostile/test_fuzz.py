"""Fuzzing in the suite: committed findings replayed, a short coverage-guided run per target, and a
property-based search over structured requests.

The long run is documented in docs/robustness.md; its findings land in tests/hostile/found/.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service._proto import attribution_pb2 as pb
from service.config import Limits
from service.validation import validate_explain
from tests.hostile.corpus import encode, hostile_images, photo
from workers.errors import AttributionError

ROOT = pathlib.Path(__file__).resolve().parents[2]
FOUND = pathlib.Path(__file__).parent / "found"


def _replayed() -> list[tuple[str, str, bytes]]:
    """Every committed finding, then the seed corpus: (name, target, bytes)."""
    from tests.hostile import fuzz

    found = [(p.name, p.name.split("-", 1)[0], p.read_bytes()) for p in sorted(FOUND.glob("*-*"))]
    return found + [(f"seed-{t}-{i}", t, data) for t in fuzz.TARGETS for i, data in enumerate(fuzz.seeds(t))]


@pytest.mark.parametrize("name,target,data", _replayed(), ids=[r[0] for r in _replayed()])
def test_findings_and_seeds_are_answered_cleanly(name, target, data):
    from tests.hostile import fuzz

    fuzz.TARGETS[target](data)  # raises on anything but a typed error


@pytest.mark.process
@pytest.mark.parametrize("target", ["request", "image"])
def test_short_coverage_guided_run_finds_nothing(target, tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "tests.hostile.fuzz", target, "-runs=4000", "-max_total_time=90",
         f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONHASHSEED": "0"})
    findings = sorted(p.name for p in tmp_path.iterdir())
    assert run.returncode == 0 and not findings, (findings, run.stderr[-3000:])
    assert "Done" in run.stderr


_PNG = encode(photo(), "PNG")
_JPEG = encode(photo(96, 80), "JPEG", quality=85)


def _mutated(data: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    out = bytearray(data)
    for position, value in edits:
        out[position % len(out)] = value
    return bytes(out[:max(0, len(out) - cut)])


_images = st.one_of(
    st.sampled_from(list(hostile_images().values())),
    st.builds(_mutated, st.sampled_from([_PNG, _JPEG]),
              st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=12),
              st.integers(0, 4000)),
    st.binary(max_size=512),
)
_floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def _requests(draw) -> pb.ExplainRequest:
    request = pb.ExplainRequest(method=draw(st.integers(0, 12)), seed=draw(st.integers(0, 2**64 - 1)),
                                request_id=draw(st.text(max_size=140)))
    if draw(st.booleans()):
        request.inputs.images.images.extend(draw(st.lists(_images, min_size=0, max_size=3)))
    else:
        shape = draw(st.lists(st.integers(-2, 70), min_size=0, max_size=5))
        dtype = draw(st.integers(0, 4))
        count = int(np.prod([max(d, 0) for d in shape])) if shape else 0
        itemsize = {1: 4, 2: 2, 3: 1}.get(dtype, 4)
        if draw(st.booleans()) and 0 < count <= 3 * 64 * 64 * 2:
            fill = draw(_floats)
            with np.errstate(over="ignore", invalid="ignore"):
                data = np.full(count, fill, np.float32).astype({2: np.float16, 3: np.uint8}.get(dtype, np.float32),
                                                              casting="unsafe").tobytes()
        else:
            data = draw(st.binary(max_size=64)) * (count * itemsize // 64 + 1) if count < 100_000 else b""
        request.inputs.tensor.CopyFrom(pb.Tensor(data=data, dtype=dtype, shape=shape, layout=draw(st.integers(0, 3))))
        request.inputs.space = draw(st.integers(0, 3))
    which = draw(st.sampled_from(["none", "noise", "ig", "cam", "occ", "score"]))
    if which == "noise":
        request.noise.samples = draw(st.integers(0, 1000))
        if draw(st.booleans()):
            request.noise.noise_fraction = draw(_floats)
    elif which == "ig":
        request.integrated_gradients.steps = draw(st.integers(0, 1000))
        request.integrated_gradients.rule = draw(st.integers(0, 7))
        request.integrated_gradients.baseline.kind = draw(st.integers(0, 8))
        request.integrated_gradients.baseline.blur_sigma = draw(_floats)
    elif which == "cam":
        request.cam.layer = draw(st.sampled_from(["", "features.6", "x" * 300, "features"]))
        request.cam.also.extend(draw(st.lists(st.integers(0, 12), max_size=4)))
    elif which == "occ":
        request.occlusion.patch_size = draw(st.integers(0, 100))
        request.occlusion.stride = draw(st.integers(0, 100))
        request.occlusion.baseline_value = draw(_floats)
    elif which == "score":
        request.score_cam.top_k_channels = draw(st.integers(0, 10_000))
    kind = draw(st.sampled_from(["none", "top_k", "indices", "predicted"]))
    if kind == "top_k":
        request.target.top_k = draw(st.integers(0, 100))
    elif kind == "indices":
        request.target.class_indices.indices.extend(draw(st.lists(st.integers(-5, 10), max_size=5)))
    elif kind == "predicted":
        request.target.predicted = True
    request.output.dtype = draw(st.integers(0, 4))
    request.output.reduction = draw(st.integers(0, 4))
    request.output.normalization = draw(st.integers(0, 4))
    request.audit = draw(st.integers(0, 3))
    return request


@settings(max_examples=int(os.environ.get("HYPOTHESIS_FUZZ_EXAMPLES", "400")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=_requests(), offline=st.booleans())
def test_validation_answers_every_structured_request_with_a_typed_error_or_a_spec(request, offline):
    from tests.hostile.fuzz import DEMO

    # Through the wire first: what the server parses is what a client serialized.
    parsed = pb.ExplainRequest.FromString(request.SerializeToString())
    try:
        spec = validate_explain(parsed, DEMO, Limits(max_image_pixels=1 << 20), offline=offline)
    except AttributionError as exc:
        assert exc.message and "Traceback" not in exc.message
        return
    assert spec.inputs.shape[1:] == (3, 64, 64) and bool(spec.inputs.isfinite().all())


@pytest.mark.process
@pytest.mark.slow
def test_repeated_corpus_memory_levels_off(demo_cache_dir):
    from tests.hostile.memory_check import run

    result = run(passes=3, repeat=2, cache_dir=str(demo_cache_dir))
    rows = result["rows"][1:]
    assert all(row["codes"].get("OK", 0) > 0 for row in rows)  # real work was mixed in and succeeded
    growth = [row["growth_mb"] for row in rows]
    assert growth[-1] < 25 and sum(growth[1:]) < 50, growth
    assert all(row["decode_workers"] >= 1 for row in rows)
