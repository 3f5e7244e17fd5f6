"""`attribution audit verify`: re-run logged explanations and check their maps.

Each (sampled) record is re-run in-process from its recorded parameters, on its
recorded input, the way it was computed (`path`: online records through the
batch kernels, job records through the offline chunked executor), and the map is
encoded by the same codec function the servicer uses. A record holds a re-run to
its `guarantee`: an identical map hash is `ok`; otherwise the map's pooled summary
must agree within `tolerance` x the map's largest |value| (`ok_within_tolerance`),
because a map's last bits can depend on what it was batched with and on the
worker's thread count. Schema 1 records carry no summary and need the same hash.
A request is re-run whole: SmoothGrad noise and noise baselines are drawn for
all of a request's items at once, so an item alone would get other noise.
Inputs come from the audit store (`input_ref`, `<log dir>/inputs/`) or from a
directory the client kept (.npy arrays or PNG/JPEG files, matched by hash); a
record whose input is in neither is `skipped`, with the reason, not failed.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import pathlib
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from service import codec
from service.audit.records import (INPUTS_DIR, READABLE_SCHEMAS, decode_map, fields_for, log_files, map_summary,
                                   summaries_agree)
from service.audit.client_inputs import client_items as _client_items
from service.audit.sinks import read_table
from service.pgschema import is_url
from service.text_inputs import pad_sequences
from workers.errors import AttributionError
from service.backends.local import LocalBackend
from workers.models import ModelRegistry, describe
from workers.offline import run_offline
from workers.spec import ExplainSpec, MethodParams, ModelDescription, OutputSpec, TargetSpec

# Passing checks; `skipped` neither passes nor fails (the reason says what would let it be checked).
PASSING = ("ok", "ok_within_tolerance")
STATUSES = PASSING + ("skipped", "mismatch", "model_version_mismatch", "rerun_error", "invalid_record")
_NO_INPUT = ("the input is neither in the audit store (audit.store_inputs is off by default) nor among the "
             "files given with --inputs")
# What the server computed a map from; records that agree on these re-run together.
_RUN_KEYS = ("entry_id", "path", "model", "model_version", "method", "seed", "target_spec", "params", "output")


@dataclass
class RecordCheck:
    """The verdict on one record (or one unreadable line)."""

    source: str                 # file:line
    status: str                 # one of STATUSES
    request_id: str = ""
    item: int = -1
    map_index: int = -1
    detail: str = ""


@dataclass
class VerifyReport:
    records: int = 0            # readable records found
    checks: list[RecordCheck] = field(default_factory=list)

    @property
    def checked(self) -> list[RecordCheck]:
        """The checks that were made: every one but the skipped."""
        return [c for c in self.checks if c.status != "skipped"]

    @property
    def ok(self) -> bool:
        """True when at least one record was checked and every checked record passed."""
        checked = self.checked
        return bool(checked) and all(c.status in PASSING for c in checked)

    @property
    def verdict(self) -> str:
        """PASS, FAIL, or NOTHING CHECKED (every record skipped, or none found)."""
        if not self.checked:
            return "NOTHING CHECKED"
        return "PASS" if self.ok else "FAIL"

    def counts(self) -> dict[str, int]:
        return dict(Counter(c.status for c in self.checks))

    def summary(self) -> str:
        counts = ", ".join(f"{n} {status}" for status, n in sorted(self.counts().items())) or "no records"
        lines = [f"audit verify: {len(self.checks)} of {self.records} records looked at: {counts}"]
        problems = [c for c in self.checks if c.status not in PASSING and c.status != "skipped"]
        lines += [f"  {c.source} request {c.request_id!r} item {c.item} map {c.map_index}: {c.status}: {c.detail}"
                  for c in problems]
        skipped = Counter(c.detail for c in self.checks if c.status == "skipped")
        lines += [f"  skipped {n}: {reason}" for reason, n in skipped.most_common()]
        lines.append(self.verdict)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "verdict": self.verdict, "records": self.records, "counts": self.counts(),
                "checks": [dataclasses.asdict(c) for c in self.checks]}


@dataclass
class _Logged:
    record: dict[str, Any]
    source: str
    log_dir: pathlib.Path

    def check(self, status: str, detail: str = "") -> RecordCheck:
        r = self.record
        return RecordCheck(self.source, status, r["request_id"], r["item"], r["map_index"], detail)


# ------------------------------------------------------------- reading --


def expand_paths(paths: Iterable[str | pathlib.Path]) -> list[pathlib.Path]:
    """Files as given; a directory stands for its log files, oldest first."""
    out: list[pathlib.Path] = []
    for p in map(pathlib.Path, paths):
        out.extend(log_files(p) if p.is_dir() else [p])
    return out


def _problem(record: Any) -> str:
    """Why a parsed line is not a usable record; "" when it is."""
    if not isinstance(record, dict):
        return "not a JSON object"
    fields = fields_for(record.get("schema"))
    if fields is None:
        return (f"schema {record.get('schema')!r}; this verifier reads schema "
                f"{', '.join(map(str, READABLE_SCHEMAS))}")
    for key, types in fields.items():
        value = record.get(key, ...)
        if value is ... or not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return f"field {key!r} missing or not {'/'.join(t.__name__ for t in types)}"
    return ""


def read_records(paths: Iterable[pathlib.Path]) -> tuple[list[_Logged], list[RecordCheck]]:
    """Every readable record, and an `invalid_record` check per line that is not one."""
    logged, invalid = [], []
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                for number, line in enumerate(fh, 1):
                    if line.strip():
                        _read_line(line, f"{path}:{number}", path.parent, logged, invalid)
        except OSError as exc:
            invalid.append(RecordCheck(str(path), "invalid_record", detail=f"cannot read: {exc}"))
    return logged, invalid


def _read_line(line: str, source: str, log_dir: pathlib.Path, logged: list[_Logged],
               invalid: list[RecordCheck]) -> None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        invalid.append(RecordCheck(source, "invalid_record", detail=f"not JSON: {exc}"))
        return
    problem = _problem(record)
    if problem:
        invalid.append(RecordCheck(source, "invalid_record", detail=problem))
    else:
        logged.append(_Logged(record, source, log_dir))

# -------------------------------------------------------------- inputs --


class InputFinder:
    """Model-space tensors by sha256: the audit store first, then a client's directory."""

    def __init__(self, store_dirs: Iterable[pathlib.Path] = (), client_dir: pathlib.Path | None = None):
        self.store_dirs = list(store_dirs)
        self.client_dir = client_dir
        self._client: dict[str, torch.Tensor] = {}
        self._indexed: set[tuple] = set()

    def find(self, sha: str, ref: str | None, log_dir: pathlib.Path,
             model: ModelDescription) -> torch.Tensor | None:
        candidates = ([log_dir / ref] if ref else []) + [d / f"{sha}.npy" for d in [log_dir / INPUTS_DIR,
                                                                                     *self.store_dirs]]
        for path in candidates:
            tensor = _load_npy(path)
            if tensor is not None and codec.input_sha256(tensor) == sha:
                return tensor
        if self.client_dir is not None:
            self._index_client(model)
        return self._client.get(sha)

    def has(self, logged: "_Logged", backend: LocalBackend) -> bool:
        """Whether the record's own input can be found (cheap: files' existence, the client index)."""
        r = logged.record
        sha, ref = r["input_sha256"], r["input_ref"]
        if ref and (logged.log_dir / ref).is_file():
            return True
        if any((d / f"{sha}.npy").is_file() for d in [logged.log_dir / INPUTS_DIR, *self.store_dirs]):
            return True
        if self.client_dir is None:
            return False
        try:
            self._index_client(describe(backend.context(r["model"]).model))
        except AttributionError:  # a model this server no longer has: its re-run reports it
            return True
        return sha in self._client

    def _index_client(self, model: ModelDescription) -> None:
        """Hashes every item the client kept, read each way the server could have read it."""
        key = (model.channels, model.height, model.width, model.mean, model.std)
        if key in self._indexed:
            return
        self._indexed.add(key)
        for path in sorted(self.client_dir.rglob("*")):
            for item in _client_items(path, model):
                self._client.setdefault(codec.input_sha256(item), item)


def _load_npy(path: pathlib.Path) -> torch.Tensor | None:
    try:
        array = torch.from_numpy(np.load(path, allow_pickle=False))
        return array.to(torch.float32 if array.is_floating_point() else torch.int64)  # token ids stay ids
    except (OSError, ValueError):
        return None


# -------------------------------------------------------------- re-run --


def _run_key(record: dict[str, Any]) -> str:
    return json.dumps({k: record.get(k, "online" if k == "path" else None) for k in _RUN_KEYS}, sort_keys=True)


def spec_from_record(record: dict[str, Any], inputs: torch.Tensor, baseline: torch.Tensor | None,
                     attention_mask: torch.Tensor | None = None) -> ExplainSpec:
    """The ExplainSpec the record was computed from; TypeError/ValueError when the record disagrees."""
    params = dict(record["params"])
    params.pop("baseline_tensor", None)
    params["also"] = tuple(params.get("also", ()))
    target = dict(record["target_spec"])
    target["indices"] = tuple(target.get("indices", ()))
    # The overlay does not change the map; skipping it saves the PNG encode.
    output = dict(record["output"], png_overlay=False)
    return ExplainSpec(model=record["model"], method=record["method"], inputs=inputs,
                       request_id=record["request_id"], target=TargetSpec(**target),
                       params=MethodParams(**params, baseline_tensor=baseline), output=OutputSpec(**output),
                       seed=int(record["seed"]), audit=False, attention_mask=attention_mask)


def _gather(group: list[_Logged], entry: list[_Logged], finder: InputFinder,
            model: ModelDescription) -> tuple[torch.Tensor | None, torch.Tensor | None, str]:
    """The request's inputs `# (N, C, H, W)` (a text request's: ids and mask `# (N, L)`) and custom baseline,
    or a reason they cannot be had."""
    first = group[0].record
    shas: dict[int, tuple[str, str | None, pathlib.Path]] = {}
    for logged in entry:
        r = logged.record
        shas.setdefault(r["item"], (r["input_sha256"], r["input_ref"], logged.log_dir))
    if sorted(shas) != list(range(first["items"])):
        return None, None, f"the log holds items {sorted(shas)} of the request's {first['items']}"
    items = []
    for i in range(first["items"]):
        sha, ref, log_dir = shas[i]
        item = finder.find(sha, ref, log_dir, model)
        if item is None:
            return None, None, _NO_INPUT
        items.append(item.reshape(-1) if model.modality == "text" else
                     item.reshape(model.channels, model.height, model.width))
    baseline = None
    info = first["params"].get("baseline_tensor")
    if isinstance(info, dict):
        baseline = finder.find(info.get("sha256", ""), info.get("ref"), group[0].log_dir, model)
        if baseline is None:
            return None, None, f"no custom baseline with sha256 {info.get('sha256')}"
        baseline = baseline.reshape(info["shape"])
    if model.modality == "text":  # a text request's items are its real token ids: padded and masked again
        return pad_sequences([(t.tolist(), [1] * len(t)) for t in items], model.text.pad_id), baseline, ""
    return torch.stack(items), baseline, ""


def _compare(logged: _Logged, response) -> RecordCheck:
    r = logged.record
    if r["item"] >= len(response.items) or r["map_index"] >= len(response.items[r["item"]].attributions):
        return logged.check("mismatch", "the re-run produced no such map")
    item = response.items[r["item"]]
    attr = item.attributions[r["map_index"]]
    got = {"input_sha256": item.input_sha256, "target": int(attr.target),
           "map_method": codec.METHOD_NAMES.get(attr.method, ""), "map_dtype": codec.DTYPE_NAMES.get(attr.map.dtype),
           "map_shape": [int(d) for d in attr.map.shape]}
    diffs = [f"{k}: logged {r[k]!r}, re-run {v!r}" for k, v in got.items() if r[k] != v]
    if diffs:
        return logged.check("mismatch", "; ".join(diffs))
    native = codec.map_sha256(attr.native_map.data) if attr.HasField("native_map") else None
    if attr.map_sha256 == r["map_sha256"] and native == r["native_map_sha256"]:
        return logged.check("ok")
    if "map_summary" not in r:  # schema 1: bit-exact or nothing
        return logged.check("mismatch", f"map_sha256: logged {r['map_sha256']}, re-run {attr.map_sha256} "
                                        "(a schema 1 record carries no summary to compare within a tolerance)")
    agree, relative = summaries_agree(r["map_summary"], map_summary(decode_map(attr.map)), float(r["tolerance"]))
    if agree:
        return logged.check("ok_within_tolerance", f"map differs in its last bits; summary within {relative:.2g} "
                                                   f"of its largest |value| (tolerance {r['tolerance']:g})")
    return logged.check("mismatch", f"the map's summary differs by {relative:.3g} of its largest |value|, more "
                                    f"than the record's tolerance {r['tolerance']:g}")


def _recompute(backend: LocalBackend, spec: ExplainSpec, path: str):
    """The ExplainResult the server would compute for `spec` on `path` ("online" or "offline")."""
    if path == "offline":
        return run_offline(backend.context(spec.model), spec)
    return backend.explain_sync(spec)


def _rerun(group: list[_Logged], entry: list[_Logged], backend: LocalBackend,
           finder: InputFinder) -> list[RecordCheck]:
    """Re-runs one request's parameter set and checks each of `group`'s records."""
    first = group[0].record
    try:
        loaded = backend.context(first["model"]).model
        if loaded.version != first["model_version"]:
            detail = f"logged {first['model_version']}, served now {loaded.version}"
            return [g.check("model_version_mismatch", detail) for g in group]
        model = describe(loaded)
        inputs, baseline, missing = _gather(group, entry, finder, model)
        if inputs is None:
            return [g.check("skipped", missing) for g in group]
        mask = None
        if isinstance(inputs, tuple):  # text: (ids, mask)
            inputs, mask = inputs
        spec = spec_from_record(first, inputs, baseline, mask)
        response = codec.encode_result(_recompute(backend, spec, first.get("path", "online")), spec, model)
    except AttributionError as exc:
        return [g.check("rerun_error", f"{type(exc).__name__}: {exc.message}") for g in group]
    except (TypeError, ValueError, KeyError) as exc:  # a record whose parameters no spec accepts
        return [g.check("invalid_record", f"parameters do not build a request: {exc}") for g in group]
    return [_compare(g, response) for g in group]


def verify(log_paths: Sequence[str | pathlib.Path], backend: LocalBackend | ModelRegistry,
           inputs_dir: str | pathlib.Path | None = None, sample: int | None = None, seed: int = 0,
           store_dirs: Sequence[str | pathlib.Path] = ()) -> VerifyReport:
    """Re-runs every (or `sample` randomly chosen, from `seed`) record of the logs; see VerifyReport.

    A sample is drawn from the records whose input is at hand (stored, or among `inputs_dir`'s files);
    the others are reported as skipped, so a log that mostly cannot be checked still gets `sample` checks.
    store_dirs: further audit stores to search for inputs (each log's own `inputs/` always is).
    log_paths: JSONL files, audit directories, or postgresql:// URLs of audit tables (audit.store).
    """
    sources = [str(p) for p in log_paths]
    tables = [s for s in sources if is_url(s)]
    logged, invalid = read_records(expand_paths([s for s in sources if not is_url(s)]))
    # A table's records name their stored inputs relative to an audit directory: the first store's.
    table_dir = pathlib.Path(next(iter(store_dirs))).parent if store_dirs else pathlib.Path.cwd()
    for url in tables:
        for row_id, line in read_table(url):
            _read_line(line, f"attribution_audit:{row_id}", table_dir, logged, invalid)
    report = VerifyReport(records=len(logged), checks=list(invalid))
    finder = InputFinder([pathlib.Path(d) for d in store_dirs], pathlib.Path(inputs_dir) if inputs_dir else None)
    owned = isinstance(backend, ModelRegistry)
    runner = LocalBackend(backend) if owned else backend
    try:
        chosen = logged
        if sample is not None and sample < len(logged):
            at_hand, missing = [], []
            for item in logged:
                (at_hand if finder.has(item, runner) else missing).append(item)
            report.checks.extend(item.check("skipped", _NO_INPUT) for item in missing)
            if sample < len(at_hand):
                at_hand = [at_hand[i] for i in sorted(random.Random(seed).sample(range(len(at_hand)), sample))]
            chosen = at_hand
        entries: dict[str, list[_Logged]] = defaultdict(list)
        for item in logged:
            entries[item.record["entry_id"]].append(item)
        groups: dict[str, list[_Logged]] = defaultdict(list)
        for item in chosen:
            groups[_run_key(item.record)].append(item)
        for group in groups.values():
            report.checks.extend(_rerun(group, entries[group[0].record["entry_id"]], runner, finder))
    finally:
        if owned:
            asyncio.run(runner.close())
    return report
