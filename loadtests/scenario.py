"""Load-test scenarios from YAML: what to send (a weighted method mix), how hard, and what to start.

A scenario file has this shape; every key but `mix` is optional::

    name: mixed-demo
    description: 70% Grad-CAM, 20% SmoothGrad-32, 10% IG-32 on the server's default model
    seed: 0                       # images, request seeds and the mix order
    variants: 8                   # distinct pre-encoded requests per mix entry
    defaults:                     # any mix-entry key; an entry's own value wins
      model: ""                   # "" = the server's default model
      items: 1                    # images per request
      image: {height: 0, width: 0, encoding: tensor}   # 0 = the model's input size; tensor | png
      deadline_ms: 30000          # gRPC deadline per request; 0 = none (the loader still stops)
      output: {dtype: float32, reduction: abs_max, normalization: none}
      tokens: 0                   # text models (ModelInfo.modality TEXT): ids per item; 0 = min(16, max_length)
    mix:
      - {method: grad_cam, weight: 70}
      - {method: smoothgrad, weight: 20, samples: 32}
      - {method: integrated_gradients, weight: 10, steps: 32}
    load:                         # the CLI's --closed / --open / --duration / --warmup override these
      closed: [1, 4, 16, 32, 64]  # concurrency sweep; or `open: [5, 10]` (requests per second)
      duration_s: 20              # measured seconds per level
      warmup_s: 5                 # unmeasured seconds before each level
      max_requests: 100000        # hard cap per level, warm-up included
      headline: 32                # the level `--compare` takes its top-level ratios at (default: the last)
    serve:                        # what `--compare` starts: an AppConfig (workers/serve/app.py), models + batching,
      models: [{name: demo, source: demo}]   # and `server: {torch_threads, cpu_affinity}` for its front door

Everything is validated on load and every mistake is named with its path
(`mix[1].samples: must be 1..65536, got 0`), so a typo fails before a minute of load
is spent. `loadtests.requests.encode_requests` serializes the requests once, for the models the
server describes.
"""
from __future__ import annotations

import dataclasses
import pathlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service._proto import attribution_pb2 as pb
from workers.methods import CAM_METHODS, METHODS, NOISE_METHODS, per_item_rows  # noqa: F401  (views for requests.py)

SCENARIO_DIR = pathlib.Path(__file__).parent / "scenarios"
DEFAULT_SCENARIO = SCENARIO_DIR / "default.yaml"

ONLINE_METHODS = {m.name: getattr(pb, m.proto) for m in METHODS if m.online}
# The online methods whose cost is `samples` / `steps` per item (the method table's rule).
SAMPLE_METHODS = tuple(m.name for m in METHODS if m.online and m.cost == "samples")
STEP_METHODS = tuple(m.name for m in METHODS if m.online and m.cost == "steps")
_ENCODINGS = ("tensor", "png")
DTYPES = {"float32": pb.FLOAT32, "float16": pb.FLOAT16, "uint8": pb.UINT8}
REDUCTIONS = {"abs_max": pb.ABS_MAX, "sum": pb.SUM, "none": pb.NONE}
NORMALIZATIONS = {"none": pb.NO_NORMALIZATION, "max_abs": pb.MAX_ABS, "min_max": pb.MIN_MAX}
# Mix order: a shuffled cycle this long keeps the proportions exact over any long run.


class ScenarioError(ValueError):
    """A scenario file or value is wrong; the message names the field."""


def check(ok: bool, path: str, description: str) -> None:
    if not ok:
        raise ScenarioError(f"{path}: {description}")


@dataclass(frozen=True)
class ImageSpec:
    """Request images: size (0 = the model's input size) and wire encoding (raw uint8 tensor or PNG)."""

    height: int = 0
    width: int = 0
    encoding: str = "tensor"


@dataclass(frozen=True)
class OutputSpec:
    dtype: str = "float32"
    reduction: str = "abs_max"
    normalization: str = "none"


@dataclass(frozen=True)
class MixEntry:
    """One kind of request in the mix and its share (weights need not sum to anything)."""

    method: str
    weight: float = 1.0
    model: str = ""
    items: int = 1
    image: ImageSpec = field(default_factory=ImageSpec)
    samples: int = 0               # noise family, expected gradients; 0 = the server's default (32)
    noise_fraction: float = 0.0    # 0 = the server's default (0.15)
    steps: int = 0                 # integrated gradients, blur / guided IG; 0 = the server's default (32)
    layer: str = ""                # CAM family; "" = the model's default layer
    deadline_ms: float = 30000.0   # 0 = no gRPC deadline
    output: OutputSpec = field(default_factory=OutputSpec)
    tokens: int = 0                # text models: token ids per item (random, seeded); 0 = min(16, max_length)

    @property
    def label(self) -> str:
        """Short name for tables: grad_cam, smoothgrad-32, integrated_gradients-32."""
        if self.method in SAMPLE_METHODS and self.samples:
            return f"{self.method}-{self.samples}"
        if self.method in STEP_METHODS and self.steps:
            return f"{self.method}-{self.steps}"
        return self.method

    @property
    def cost(self) -> int:
        """Samples per request as the service counts them (the method table's rule; defaults assumed 32)."""
        return self.items * per_item_rows(self.method, self.samples or 32, self.steps or 32)


@dataclass(frozen=True)
class LoadSpec:
    """How hard: a closed-loop concurrency sweep or open-loop arrival rates."""

    closed: tuple[int, ...] = (1, 4, 16, 32, 64)
    open: tuple[float, ...] = ()
    duration_s: float = 20.0
    warmup_s: float = 5.0
    max_requests: int = 100_000
    headline: float = 0.0          # 0 = the last level

    @property
    def mode(self) -> str:
        return "open" if self.open else "closed"

    @property
    def levels(self) -> tuple[float, ...]:
        return self.open if self.open else tuple(float(c) for c in self.closed)

    @property
    def headline_level(self) -> float:
        return self.headline or self.levels[-1]


@dataclass(frozen=True)
class Scenario:
    name: str
    mix: tuple[MixEntry, ...]
    load: LoadSpec = field(default_factory=LoadSpec)
    description: str = ""
    seed: int = 0
    variants: int = 8
    serve: dict = field(default_factory=dict)   # AppConfig dict for --compare

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------ parsing --

def load_scenario(path: str | pathlib.Path | None = None) -> Scenario:
    """Reads and validates a scenario file (the default scenario when `path` is None)."""
    import yaml

    path = pathlib.Path(path or DEFAULT_SCENARIO)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not valid YAML: {exc}") from None
    try:
        return scenario_from_dict(raw, default_name=path.stem)
    except ScenarioError as exc:
        raise ScenarioError(f"{path}: {exc}") from None


def scenario_from_dict(raw: Any, default_name: str = "scenario") -> Scenario:
    check(isinstance(raw, dict), "(top level)", "must be a mapping with at least `mix`")
    _known(raw, ("name", "description", "seed", "variants", "defaults", "mix", "load", "serve"), "(top level)")
    defaults = raw.get("defaults") or {}
    check(isinstance(defaults, dict), "defaults", "must be a mapping")
    mix = raw.get("mix")
    check(isinstance(mix, list) and bool(mix), "mix", "must be a non-empty list of requests")
    entries = tuple(_mix_entry({**defaults, **_mapping(e, f"mix[{i}]")}, f"mix[{i}]") for i, e in enumerate(mix))
    check(sum(e.weight for e in entries) > 0, "mix", "at least one weight must be positive")
    seed, variants = raw.get("seed", 0), raw.get("variants", 8)
    check(_is_int(seed) and 0 <= seed < 2**63, "seed", f"must be an integer >= 0, got {seed!r}")
    check(_is_int(variants) and 1 <= variants <= 256, "variants", f"must be 1..256, got {variants!r}")
    serve = raw.get("serve") or {}
    check(isinstance(serve, dict), "serve", "must be a mapping (an AppConfig: models, batching, ...)")
    return Scenario(name=str(raw.get("name") or default_name), description=str(raw.get("description", "")),
                    mix=entries, load=_load_spec(raw.get("load") or {}), seed=seed, variants=variants,
                    serve=serve)


def _mapping(value: Any, path: str) -> dict:
    check(isinstance(value, dict), path, "must be a mapping such as {method: grad_cam, weight: 70}")
    return value


def _known(raw: dict, keys: tuple[str, ...], path: str) -> None:
    unknown = sorted(set(raw) - set(keys))
    check(not unknown, path, f"unknown keys {unknown}; known: {', '.join(keys)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _mix_entry(raw: dict, path: str) -> MixEntry:
    keys = tuple(f.name for f in dataclasses.fields(MixEntry))
    _known(raw, keys, path)
    method = str(raw.get("method", "")).lower()
    check(method in ONLINE_METHODS, f"{path}.method",
           f"{raw.get('method')!r} is not an online method; one of: {', '.join(ONLINE_METHODS)}")
    entry = dict(raw, method=method)
    for name, lo, hi in (("items", 1, 4096), ("samples", 0, 65536), ("steps", 0, 65536), ("tokens", 0, 8192)):
        value = entry.get(name, 0 if name != "items" else 1)
        check(_is_int(value) and lo <= value <= hi, f"{path}.{name}", f"must be {lo}..{hi}, got {value!r}")
    for name, lo, hi in (("weight", 0, 1e9), ("noise_fraction", 0, 1), ("deadline_ms", 0, 3.6e6)):
        value = entry.get(name, 0)
        check(_is_number(value) and lo <= value <= hi, f"{path}.{name}", f"must be {lo:g}..{hi:g}, got {value!r}")
    check(entry.get("samples", 0) == 0 or method in SAMPLE_METHODS, f"{path}.samples",
           f"applies to {', '.join(SAMPLE_METHODS)} only, not {method}")
    check(entry.get("steps", 0) == 0 or method in STEP_METHODS, f"{path}.steps",
           f"applies to {', '.join(STEP_METHODS)} only, not {method}")
    check(not entry.get("layer") or method in CAM_METHODS, f"{path}.layer", f"applies to CAM methods only, not {method}")
    entry["image"] = _image(entry.get("image") or {}, f"{path}.image")
    entry["output"] = _output(entry.get("output") or {}, f"{path}.output")
    entry["model"] = str(entry.get("model") or "")
    entry["layer"] = str(entry.get("layer") or "")
    return MixEntry(**entry)


def _image(raw: Any, path: str) -> ImageSpec:
    raw = _mapping(raw, path)
    _known(raw, ("height", "width", "encoding"), path)
    for name in ("height", "width"):
        value = raw.get(name, 0)
        check(_is_int(value) and (value == 0 or 8 <= value <= 4096), f"{path}.{name}",
               f"must be 0 (the model's size) or 8..4096, got {value!r}")
    check(raw.get("encoding", "tensor") in _ENCODINGS, f"{path}.encoding", f"must be one of {_ENCODINGS}")
    check((raw.get("height", 0) == 0) == (raw.get("width", 0) == 0), path, "give both height and width, or neither")
    return ImageSpec(**raw)


def _output(raw: Any, path: str) -> OutputSpec:
    raw = _mapping(raw, path)
    _known(raw, ("dtype", "reduction", "normalization"), path)
    for name, choices in (("dtype", DTYPES), ("reduction", REDUCTIONS), ("normalization", NORMALIZATIONS)):
        check(raw.get(name, next(iter(choices))) in choices, f"{path}.{name}", f"must be one of {list(choices)}")
    return OutputSpec(**raw)


def _load_spec(raw: Any) -> LoadSpec:
    raw = _mapping(raw, "load")
    _known(raw, tuple(f.name for f in dataclasses.fields(LoadSpec)), "load")
    closed, rates = raw.get("closed"), raw.get("open")
    if rates is not None:
        rates = rates if isinstance(rates, list) else [rates]
        check(bool(rates) and all(_is_number(r) and 0 < r <= 100_000 for r in rates), "load.open",
               "must be arrival rates in requests per second, each in (0, 100000]")
        closed = closed or []
        check(not closed, "load", "give `closed` or `open`, not both")
    closed = closed if closed is not None else list(LoadSpec.closed)
    closed = closed if isinstance(closed, list) else [closed]
    check(all(_is_int(c) and 1 <= c <= 4096 for c in closed), "load.closed", "must be client counts, each 1..4096")
    check(bool(closed) or bool(rates), "load", "give a `closed` sweep or `open` rates")
    spec = LoadSpec(closed=tuple(closed), open=tuple(float(r) for r in rates or ()),
                    **{k: raw[k] for k in ("duration_s", "warmup_s", "max_requests", "headline") if k in raw})
    check_load(spec)
    return spec


def check_load(spec: LoadSpec) -> None:
    """Bounds every run: a level is finite in time and in requests."""
    check(_is_number(spec.duration_s) and 0 < spec.duration_s <= 3600, "load.duration_s", "must be in (0, 3600]")
    check(_is_number(spec.warmup_s) and 0 <= spec.warmup_s <= 600, "load.warmup_s", "must be in [0, 600]")
    check(_is_int(spec.max_requests) and 1 <= spec.max_requests <= 10_000_000, "load.max_requests",
           "must be 1..1e7")
    check(_is_number(spec.headline) and (spec.headline == 0 or spec.headline in spec.levels), "load.headline",
           f"must be 0 or one of the levels {list(spec.levels)}")
