"""The audit writer: complete records, rotation, full-buffer policies, flush on close, overrides."""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import pathlib
import threading
import time

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service import codec
from service._proto import attribution_pb2 as pb
from service.audit import LOG_NAME, RECORD_FIELDS, AuditConfig, AuditLog, log_files, should_audit
from service.config import Limits
from service.validation import validate_explain
from workers.config import ModelConfig
from workers.errors import FailedPrecondition, InvalidArgument
from service.backends.local import LocalBackend
from workers.models import ModelRegistry, describe
from workers.spec import ExplainSpec, MethodParams

# ---------------------------------------------------------------- helpers (shared with test_audit_verify) --


@pytest.fixture(scope="module")
def backend(demo_cache_dir):
    local = LocalBackend(ModelRegistry([ModelConfig(name="demo", source="demo")], cache_dir=demo_cache_dir))
    yield local
    asyncio.run(local.close())


def model_tensor(x: torch.Tensor) -> pb.Inputs:
    """Model-space float32 items as the wire carries them."""
    tensor = pb.Tensor(data=x.contiguous().numpy().tobytes(), dtype=pb.FLOAT32, shape=list(x.shape))
    return pb.Inputs(tensor=tensor, space=pb.MODEL)


def explain(backend: LocalBackend, request: pb.ExplainRequest) -> tuple[ExplainSpec, pb.ExplainResponse]:
    """The servicer's path in-process: validate -> LocalBackend -> codec."""
    model = describe(backend.context("demo").model, is_default=True)
    spec = validate_explain(request, model, Limits())
    response = codec.encode_result(backend.explain_sync(spec), spec, model)
    response.timings.total_ms = 12.5
    return spec, response


def read_lines(directory: pathlib.Path) -> list[dict]:
    """The complete records, as a tailing reader sees them: a line counts once its newline is written
    (while the writer runs, the file may end in the part of a record a buffer flush has written so far)."""
    records = []
    for path in log_files(directory):
        text = path.read_text()
        records += [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]
    return records


def metric(registry: CollectorRegistry, name: str, **labels) -> float:
    """One sample's value from the registry's real exposition text (0 when absent)."""
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


@pytest.fixture(scope="module")
def cam_pair(backend, demo_heldout_inputs):
    """A real two-item Grad-CAM (+ Layer-CAM) answer: 4 records per request."""
    request = pb.ExplainRequest(request_id="cam-1", inputs=model_tensor(demo_heldout_inputs[:2]),
                                method=pb.GRAD_CAM, cam=pb.CamParams(also=[pb.LAYER_CAM]),
                                output=pb.OutputOptions(native_resolution=True, dtype=pb.FLOAT16))
    return explain(backend, request)

# ---------------------------------------------------------------- records --


def test_records_are_complete_and_parse(backend, demo_heldout_inputs, cam_pair, tmp_path):
    registry = CollectorRegistry()
    audit = AuditLog(AuditConfig(store_inputs=True), tmp_path, registry)
    ig_request = pb.ExplainRequest(
        request_id="ig-1", inputs=model_tensor(demo_heldout_inputs[2:4]), method=pb.INTEGRATED_GRADIENTS,
        target=pb.Target(top_k=2), seed=2**64 - 1,
        integrated_gradients=pb.IntegratedGradientsParams(steps=8, baseline=pb.Baseline(kind=pb.UNIFORM_NOISE)))
    ig_spec, ig_response = explain(backend, ig_request)
    cam_spec, cam_response = cam_pair
    assert audit.record(ig_spec, ig_response) and audit.record(cam_spec, cam_response)
    assert audit.close()

    records = read_lines(tmp_path)
    assert len(records) == 2 * 2 + 2 * 2 == metric(registry, "attribution_audit_records_total")
    for r in records:
        assert list(r) == list(RECORD_FIELDS)
        for key, types in RECORD_FIELDS.items():
            assert isinstance(r[key], types) and not (isinstance(r[key], bool) and bool not in types), key
        assert r["ts"].endswith("Z") and datetime.datetime.fromisoformat(r["ts"]).tzinfo is not None
        assert r["model"] == "demo" and r["model_version"] == backend.context("demo").model.version
        assert set(r["params"]) == {f.name for f in dataclasses.fields(MethodParams)}
        stored = np.load(tmp_path / r["input_ref"])
        assert codec.input_sha256(torch.from_numpy(stored)) == r["input_sha256"]
    ig = [r for r in records if r["request_id"] == "ig-1"]
    assert [(r["item"], r["map_index"]) for r in ig] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["seed"] == 2**64 - 1 and r["params"]["steps"] == 8 and r["params"]["baseline"] == "uniform_noise"
               and r["target_spec"] == {"kind": "top_k", "indices": [], "k": 2} for r in ig)
    assert all(isinstance(r["completeness_error"], float) and r["native_map_sha256"] is None for r in ig)
    for r in ig:
        attr = ig_response.items[r["item"]].attributions[r["map_index"]]
        assert attr.HasField("completeness_error_absolute")
        assert r["completeness_error_absolute"] == pytest.approx(attr.completeness_error_absolute, rel=1e-6)
        assert r["map_sha256"] == attr.map_sha256 and r["target"] == attr.target
        assert r["predicted_classes"] == list(ig_response.items[r["item"]].predicted_classes)
        assert r["map_shape"] == [64, 64] and r["map_dtype"] == "float32" and r["total_ms"] == 12.5
    cam = [r for r in records if r["request_id"] == "cam-1"]
    assert [r["map_method"] for r in cam] == ["grad_cam", "layer_cam"] * 2
    assert all(r["completeness_error"] is None and len(r["native_map_sha256"]) == 64 for r in cam)
    assert all(r["completeness_error_absolute"] is None for r in cam)
    assert all(r["map_dtype"] == "float16" and r["output"]["native_resolution"] for r in cam)
    assert len({r["entry_id"] for r in records}) == 2


def test_custom_baseline_is_hashed_and_stored(backend, demo_heldout_inputs, tmp_path):
    baseline = pb.Baseline(kind=pb.CUSTOM, tensor=model_tensor(demo_heldout_inputs[5:6] * 0.5).tensor)
    request = pb.ExplainRequest(request_id="custom", inputs=model_tensor(demo_heldout_inputs[:1]),
                                method=pb.INTEGRATED_GRADIENTS,
                                integrated_gradients=pb.IntegratedGradientsParams(steps=4, baseline=baseline))
    spec, response = explain(backend, request)
    audit = AuditLog(AuditConfig(), tmp_path)
    audit.record(spec, response)
    audit.close()
    (record,) = read_lines(tmp_path)
    info = record["params"]["baseline_tensor"]
    assert record["input_ref"] is None  # store_inputs is off by default
    assert info["shape"] == [1, 3, 64, 64] and info["sha256"] == codec.input_sha256(spec.params.baseline_tensor)
    assert torch.equal(torch.from_numpy(np.load(tmp_path / info["ref"])), spec.params.baseline_tensor)

# ---------------------------------------------------------------- rotation and buffering --


@pytest.mark.parametrize("keep", [0, 2])
def test_rotation_by_size(cam_pair, tmp_path, keep):
    registry = CollectorRegistry()
    audit = AuditLog(AuditConfig(max_bytes=16384, keep=keep), tmp_path, registry)  # ~3 requests per file
    for _ in range(30):
        audit.record(*cam_pair)
    assert audit.close()
    files = log_files(tmp_path)
    assert files[-1].name == LOG_NAME and all(f.stat().st_size <= 16384 for f in files)
    rotated = sorted(int(f.name.rsplit(".", 1)[1]) for f in files[:-1])
    written = metric(registry, "attribution_audit_records_total")
    assert written == 30 * 4
    if keep:
        assert rotated == [1, 2]
    else:
        assert rotated == list(range(1, len(files))) and len(files) > 3
        assert len(read_lines(tmp_path)) == written
    for path in files:  # a request's records never straddle two files
        entries = [json.loads(line)["entry_id"] for line in path.read_text().splitlines()]
        assert all(entries.count(e) == 4 for e in entries)


def test_drop_policy_counts_every_missing_record(cam_pair, tmp_path):
    registry = CollectorRegistry()
    audit = AuditLog(AuditConfig(buffer_entries=2, when_full="drop"), tmp_path, registry, start=False)
    outcomes = [audit.record(*cam_pair) for _ in range(5)]
    assert outcomes == [True, True, False, False, False]
    assert metric(registry, "attribution_audit_queue_depth") == 2
    assert metric(registry, "attribution_audit_dropped_total", reason="buffer_full") == 3 * 4
    audit.start()
    assert audit.close()
    missing = 5 * 4 - len(read_lines(tmp_path))
    assert missing == 3 * 4 == metric(registry, "attribution_audit_dropped_total")
    assert metric(registry, "attribution_audit_records_total") == 2 * 4
    assert metric(registry, "attribution_audit_queue_depth") == 0


def test_block_policy_waits_for_room(cam_pair, tmp_path):
    registry = CollectorRegistry()
    audit = AuditLog(AuditConfig(buffer_entries=1, when_full="block"), tmp_path, registry, start=False)
    assert audit.record(*cam_pair)
    outcome = []
    caller = threading.Thread(target=lambda: outcome.append(audit.record(*cam_pair)))
    caller.start()
    caller.join(0.3)
    assert caller.is_alive() and not outcome  # waiting: the buffer is full and nothing drains it
    audit.start()
    caller.join(10)
    assert outcome == [True]
    assert audit.close()
    assert len(read_lines(tmp_path)) == 2 * 4 and metric(registry, "attribution_audit_dropped_total") == 0


def test_record_async_waits_off_the_event_loop(cam_pair, tmp_path):
    audit = AuditLog(AuditConfig(buffer_entries=1), tmp_path, start=False)

    async def scenario() -> list[bool]:
        assert await audit.record_async(*cam_pair)
        blocked = asyncio.create_task(audit.record_async(*cam_pair))
        ticks = 0
        for _ in range(5):  # the loop keeps running while the record waits
            await asyncio.sleep(0.02)
            ticks += 1
        assert ticks == 5 and not blocked.done()
        audit.start()
        return [await asyncio.wait_for(blocked, 10)]

    assert asyncio.run(scenario()) == [True]
    assert audit.close()
    assert len(read_lines(tmp_path)) == 2 * 4


def test_close_flushes_everything_and_later_records_are_counted(cam_pair, tmp_path):
    registry = CollectorRegistry()
    audit = AuditLog(AuditConfig(fsync_interval_s=3600), tmp_path, registry)
    for _ in range(20):
        audit.record(*cam_pair)
    assert audit.close()
    assert len(read_lines(tmp_path)) == 20 * 4
    assert not audit.record(*cam_pair)
    assert metric(registry, "attribution_audit_dropped_total", reason="closed") == 4
    reopened = AuditLog(AuditConfig(), tmp_path)  # the lock went with close()
    reopened.close()


def test_a_torn_last_line_stays_on_its_own(cam_pair, tmp_path):
    (tmp_path / LOG_NAME).write_text('{"schema":1,"ts":"cut sh')
    audit = AuditLog(AuditConfig(), tmp_path)
    audit.record(*cam_pair)
    audit.close()
    lines = (tmp_path / LOG_NAME).read_text().splitlines()
    assert lines[0] == '{"schema":1,"ts":"cut sh' and all(json.loads(line) for line in lines[1:])
    assert len(lines) == 1 + 4

# ---------------------------------------------------------------- policy and config --


def test_per_request_override(cam_pair, tmp_path):
    spec, response = cam_pair
    for server_default, request, expected in [(True, None, True), (True, False, False), (False, None, False),
                                              (False, True, True)]:
        chosen = dataclasses.replace(spec, audit=request)
        assert should_audit(chosen, server_default) is expected
        directory = tmp_path / f"{server_default}-{request}"
        audit = AuditLog(AuditConfig(enabled=server_default), directory)
        assert audit.record(chosen, response) is expected
        audit.close()
        assert len(read_lines(directory)) == (4 if expected else 0)


def test_failed_stream_answers_are_not_records(cam_pair, tmp_path):
    spec, _ = cam_pair
    audit = AuditLog(AuditConfig(), tmp_path)
    failed = pb.ExplainResponse(request_id="x", error=pb.ExplainError(code=3, message="bad"))
    assert not audit.record(spec, failed)
    audit.close()


def test_one_writer_per_directory(tmp_path):
    first = AuditLog(AuditConfig(), tmp_path)
    with pytest.raises(FailedPrecondition):
        AuditLog(AuditConfig(), tmp_path)
    first.close()


def test_config_is_checked():
    assert AuditConfig.from_dict({"when_full": "drop", "keep": 3}).keep == 3
    for bad in ({"when_full": "maybe"}, {"max_bytes": 10}, {"buffer_entries": 0}, {"colour": "blue"}):
        with pytest.raises(InvalidArgument):
            AuditConfig.from_dict(bad)
    assert AuditConfig().directory_for("/data") == pathlib.Path("/data/audit")
    assert AuditConfig(directory="/logs").directory_for("/data") == pathlib.Path("/logs")


def test_records_appear_without_close(cam_pair, tmp_path):
    audit = AuditLog(AuditConfig(fsync_interval_s=0), tmp_path)
    audit.record(*cam_pair)
    deadline = time.monotonic() + 10
    while len(read_lines(tmp_path)) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(read_lines(tmp_path)) == 4  # flushed by the writer, not only at shutdown
    audit.close()
