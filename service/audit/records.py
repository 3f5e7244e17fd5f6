"""Audit records: the schema (one JSON line per item x map) and how a response becomes lines.

service/audit/log.py writes these lines; service/audit/verify.py reads them back.
The schema is documented in service/audit/log.py.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import pathlib
import tempfile
import uuid
from typing import Any, NamedTuple

import numpy as np
import torch

from service import codec
from service._proto import attribution_pb2 as pb
from workers import tracing
from workers.spec import ExplainSpec

SCHEMA_VERSION = 4
READABLE_SCHEMAS = (1, 2, 3, 4)
LOG_NAME = "audit.jsonl"
INPUTS_DIR = "inputs"
# What a record guarantees (`guarantee`): a re-run on the same model version, config and hardware gives a
# map whose pooled summary (`map_summary`) agrees within `tolerance` x the map's largest |value|. Not
# bit-exact: a map can differ in its last bits with what it was batched with and the worker's thread count.
GUARANTEE = "summary_within_tolerance"
TOLERANCE = 1e-3
SUMMARY_GRID = 8   # the summary averages the map over at most this many cells per side

# Every record key and its JSON types; verify refuses a record that breaks this.
RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "schema": (int,), "ts": (str,), "received_ts": (str,), "entry_id": (str,), "request_id": (str,),
    "items": (int,), "model": (str,), "model_version": (str,), "method": (str,), "seed": (int,),
    "target_spec": (dict,), "params": (dict,), "output": (dict,), "item": (int,), "map_index": (int,),
    "map_method": (str,), "target": (int,), "target_score": (float, str), "predicted_classes": (list,),
    "predicted_scores": (list,), "input_sha256": (str,), "input_ref": (str, type(None)), "map_sha256": (str,),
    "map_dtype": (str,), "map_shape": (list,), "native_map_sha256": (str, type(None)),
    "completeness_error": (float, str, type(None)), "queue_ms": (float,), "compute_ms": (float,),
    "total_ms": (float,), "batch_samples": (int,), "batch_requests": (int,),
}
SCHEMA_1_FIELDS = dict(RECORD_FIELDS)
# Schema 2 (written now): how the map was computed and what a re-run is held to, and the map's summary.
SCHEMA_2_FIELDS = {"schema": (int,), "path": (str,), "guarantee": (str,), "tolerance": (float,),
                   **{k: v for k, v in SCHEMA_1_FIELDS.items() if k != "schema"}, "map_summary": (dict,)}
# Schema 3: the request's OpenTelemetry trace id after its request id (null when untraced).
SCHEMA_3_FIELDS = {}
for _key, _types in SCHEMA_2_FIELDS.items():
    SCHEMA_3_FIELDS[_key] = _types
    if _key == "request_id":
        SCHEMA_3_FIELDS["trace_id"] = (str, type(None))
# Schema 4 (written now): IG's absolute completeness error beside the relative one (null for other methods).
RECORD_FIELDS = {}
for _key, _types in SCHEMA_3_FIELDS.items():
    RECORD_FIELDS[_key] = _types
    if _key == "completeness_error":
        RECORD_FIELDS["completeness_error_absolute"] = (float, str, type(None))
del _key, _types


def fields_for(schema: Any) -> dict[str, tuple[type, ...]] | None:
    """The keys and JSON types a record of `schema` has; None for a schema this code cannot read."""
    known = {1: SCHEMA_1_FIELDS, 2: SCHEMA_2_FIELDS, 3: SCHEMA_3_FIELDS, 4: RECORD_FIELDS}
    return known.get(schema) if type(schema) is int else None
PATHS = ("online", "offline")


def should_audit(spec: ExplainSpec, server_default: bool) -> bool:
    """The request's own choice (AUDIT_ON / AUDIT_OFF) when it made one, else the server's."""
    return server_default if spec.audit is None else bool(spec.audit)


def rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(
        timespec="microseconds").replace("+00:00", "Z")


def input_ref(sha256: str) -> str:
    """Where the store keeps an input, relative to the log's directory."""
    return f"{INPUTS_DIR}/{sha256}.npy"


def save_array(path: pathlib.Path, tensor: torch.Tensor) -> None:
    """Writes `tensor` as float32 (token ids: int64) .npy once: content-addressed, so an existing file is the
    same bytes."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            dtype = torch.float32 if tensor.is_floating_point() else torch.int64
            np.save(fh, tensor.detach().to(dtype).cpu().contiguous().numpy(), allow_pickle=False)
        os.replace(tmp, path)  # readers never see a partial file
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _number(x: float) -> float | str:
    # JSON has no NaN/Inf; a string keeps the fact without breaking parsers.
    return float(x) if math.isfinite(x) else str(float(x))


class Entry(NamedTuple):
    ts: float
    spec: ExplainSpec
    response: pb.ExplainResponse
    records: int
    path: str = "online"   # "offline": computed by a job, re-run the offline way


def decode_map(tensor: pb.Tensor) -> np.ndarray:
    """A wire map as float64 `# (H, W)` or `# (C, H, W)`, in its own units (uint8 maps as 0..255)."""
    dtype = {pb.FLOAT16: np.float16, pb.UINT8: np.uint8}.get(tensor.dtype, np.float32)
    return np.frombuffer(tensor.data, dtype=dtype).reshape([int(d) for d in tensor.shape]).astype(np.float64)


def map_summary(values: np.ndarray) -> dict[str, Any]:
    """The map averaged over a grid of at most SUMMARY_GRID cells per side (per channel), and its scale.

    Cells split the height and width as evenly as they go (`np.array_split`), so any size works; a text
    map `# (L,)` is one row of tokens."""
    planes = values.reshape((-1,) + (values.shape[-2:] if values.ndim >= 2 else (1, values.shape[-1])))
    rows = min(SUMMARY_GRID, planes.shape[1])
    cols = min(SUMMARY_GRID, planes.shape[2])
    cells = [[float(cell.mean()) for band in np.array_split(plane, rows, axis=0)
              for cell in np.array_split(band, cols, axis=1)] for plane in planes]
    return {"grid": [len(planes), rows, cols], "values": [_number(round_sig(v)) for plane in cells for v in plane],
            "abs_max": _number(float(np.abs(values).max()) if values.size else 0.0)}


def round_sig(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}")


def summaries_agree(logged: dict[str, Any], rerun: dict[str, Any], tolerance: float) -> tuple[bool, float]:
    """(agree, the largest difference as a fraction of the logged map's largest |value|)."""
    if logged.get("grid") != rerun.get("grid") or len(logged.get("values", ())) != len(rerun.get("values", ())):
        return False, float("inf")
    scale = float(logged.get("abs_max", 0.0) or 0.0)
    worst = max((abs(float(a) - float(b)) for a, b in zip(logged["values"], rerun["values"])), default=0.0)
    relative = worst / scale if scale > 0 else (0.0 if worst == 0 else float("inf"))
    return relative <= tolerance, relative


def map_count(response: pb.ExplainResponse) -> int:
    """Records a response yields: one per item x attribution."""
    return sum(len(item.attributions) for item in response.items)


def _request_fields(entry: Entry, baseline: dict | None) -> dict[str, Any]:
    """The part of a record every map of the request shares."""
    spec, resp = entry.spec, entry.response
    params = {f.name: getattr(spec.params, f.name) for f in dataclasses.fields(spec.params)}
    params["also"] = list(params["also"])
    params["baseline_tensor"] = baseline
    target_spec = {"kind": spec.target.kind, "indices": list(spec.target.indices), "k": spec.target.k}
    return {"schema": SCHEMA_VERSION, "path": entry.path, "guarantee": GUARANTEE, "tolerance": TOLERANCE,
            "ts": rfc3339(entry.ts), "received_ts": rfc3339(spec.received_at),
            "entry_id": uuid.uuid4().hex, "request_id": resp.request_id or spec.request_id,
            "trace_id": tracing.trace_id(spec.trace),
            "items": len(resp.items), "model": resp.model or spec.model, "model_version": resp.model_version,
            "method": spec.method, "seed": int(spec.seed), "target_spec": target_spec, "params": params,
            "output": dataclasses.asdict(spec.output)}


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def record_lines(entry: Entry, input_refs: list[str | None], baseline: dict | None) -> list[str]:
    """The request's records as JSON lines, keys in RECORD_FIELDS order.

    The shared part (parameters, mostly) is encoded once and spliced into each
    map's line: the writer shares the GIL with the event loop, so its time counts.
    """
    head = _dumps(_request_fields(entry, baseline))[:-1] + ","
    t = entry.response.timings
    timings = {"queue_ms": float(t.queue_ms), "compute_ms": float(t.compute_ms), "total_ms": float(t.total_ms),
               "batch_samples": int(t.batch_samples), "batch_requests": int(t.batch_requests)}
    lines = []
    for i, item in enumerate(entry.response.items):
        sha = item.input_sha256 or codec.input_sha256(codec.item_input(entry.spec, i))
        predicted = {"predicted_classes": [int(c) for c in item.predicted_classes],
                     "predicted_scores": [_number(s) for s in item.predicted_scores]}
        for j, attr in enumerate(item.attributions):
            lines.append(head + _dumps({
                "item": i, "map_index": j, "map_method": codec.METHOD_NAMES.get(attr.method, str(attr.method)),
                "target": int(attr.target), "target_score": _number(attr.target_score), **predicted,
                "input_sha256": sha, "input_ref": input_refs[i], "map_sha256": attr.map_sha256,
                "map_dtype": codec.DTYPE_NAMES.get(attr.map.dtype, str(attr.map.dtype)),
                "map_shape": [int(d) for d in attr.map.shape],
                "native_map_sha256": codec.map_sha256(attr.native_map.data) if attr.HasField("native_map") else None,
                "completeness_error": (_number(attr.completeness_error) if attr.HasField("completeness_error")
                                       else None),
                "completeness_error_absolute": (_number(attr.completeness_error_absolute)
                                                if attr.HasField("completeness_error_absolute") else None),
                **timings,
                "map_summary": map_summary(decode_map(attr.map))})[1:])
    return lines


def rotated_indices(directory: pathlib.Path) -> list[int]:
    prefix = LOG_NAME + "."
    return [int(p.name[len(prefix):]) for p in directory.glob(prefix + "*") if p.name[len(prefix):].isdigit()]


def log_files(directory: str | os.PathLike) -> list[pathlib.Path]:
    """Every log file in `directory`, oldest first (highest rotation index first, the live file last)."""
    directory = pathlib.Path(directory)
    rotated = [directory / f"{LOG_NAME}.{n}" for n in sorted(rotated_indices(directory), reverse=True)]
    live = directory / LOG_NAME
    return rotated + ([live] if live.exists() else [])
