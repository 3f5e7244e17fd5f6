"""The evaluation job as the workers see it: what to evaluate (`EvaluationSpec`) and what comes back
(`EvaluationOutcome`), plain picklable data with no proto in it.

The front door turns an `EvaluationRequest` into an `EvaluationSpec` (service/evaluation/validation.py),
the offline worker runs it (workers/evaluation/job.py) and answers an `EvaluationOutcome`, which the
front door turns into the wire `EvaluationResult` (service/evaluation/results.py). Tensors travel as
NumPy arrays (`TensorFields`), results are NumPy arrays and floats.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from workers.spec import MethodParams, TargetSpec, TensorFields

# Metric names (the proto's Metric enum in lower case), in the order a job computes them.
DELETION, INSERTION = "deletion", "insertion"
MODEL_RANDOMIZATION, DATA_RANDOMIZATION = "model_randomization", "data_randomization"
POINTING_GAME, IOU, ENERGY_IN_BOX = "pointing_game", "iou", "energy_in_box"
COMPLETENESS, STABILITY, CLASS_DISCRIMINATION = "completeness", "stability", "class_discrimination"
METRICS = (DELETION, INSERTION, MODEL_RANDOMIZATION, DATA_RANDOMIZATION, POINTING_GAME, IOU, ENERGY_IN_BOX,
           COMPLETENESS, STABILITY, CLASS_DISCRIMINATION)
LOCALISATION = (POINTING_GAME, IOU, ENERGY_IN_BOX)
RANDOMIZATION = (MODEL_RANDOMIZATION, DATA_RANDOMIZATION)

# Augmentations of the stability check and their default sizes (noise: fraction of the range;
# shift: pixels, both axes; brightness: value added in model space).
AUGMENTATION_DEFAULTS = (("noise", 0.05), ("shift", 2.0), ("brightness", 0.1))
# Items whose maps come back for the report's figures.
EXAMPLE_ITEMS = 4


@dataclass(frozen=True)
class EvalOptions:
    """EvaluationOptions with every default filled in (see the proto for each field)."""

    curve_steps: int = 16
    patch_size: int = 1
    deletion_baselines: tuple[str, ...] = ("zero",)
    insertion_baselines: tuple[str, ...] = ("blur",)
    randomization_modes: tuple[str, ...] = ("cascading", "independent")
    randomization_threshold: float = 0.5
    augmentations: tuple[tuple[str, float], ...] = AUGMENTATION_DEFAULTS
    top_k: int = 3
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    seed: int = 0


@dataclass(frozen=True)
class EvalMethod(TensorFields):
    """One compared method: its unique label, the method's worker name, its parameters and seed."""

    label: str
    method: str
    params: MethodParams = field(default_factory=MethodParams)
    seed: int = 0


@dataclass
class EvaluationSpec(TensorFields):
    """One validated evaluation. `inputs` `# (N, C, H, W)` model space, float32, CPU; `regions`
    `# (N, H, W)` bool ground truth (None without regions)."""

    model: str
    request_id: str
    inputs: torch.Tensor
    methods: tuple[EvalMethod, ...]
    metrics: tuple[str, ...]
    target: TargetSpec = field(default_factory=TargetSpec)
    regions: torch.Tensor | None = None
    shuffled_model: str = ""
    options: EvalOptions = field(default_factory=EvalOptions)
    example_items: int = EXAMPLE_ITEMS

    @property
    def items(self) -> int:
        return int(self.inputs.shape[0])


@dataclass
class MetricData:
    """One metric of one method (the proto's MetricValue): per-item values `# (N,)` and their aggregate."""

    metric: str
    variant: str
    statistic: str
    per_item: np.ndarray
    mean: float
    ci_low: float
    ci_high: float
    missing: int
    reference: float | None = None
    passed: bool | None = None


@dataclass
class CurveData:
    """A deletion or insertion curve, mean over items `# (S+1,)`, beside the random order's."""

    metric: str
    baseline: str
    fractions: np.ndarray
    scores: np.ndarray
    random_scores: np.ndarray


@dataclass
class RandomizationData:
    """Maps of the first items before and after each randomization step `# (steps, items, H, W)`,
    min-max normalized per map, and the mean Spearman correlation at each step (1 for "trained")."""

    mode: str
    steps: list[str]
    maps: np.ndarray
    spearman: list[float]


@dataclass
class MethodOutcome:
    """Everything one method scored; `example_maps` `# (items, H, W)` min-max normalized."""

    label: str
    method: str
    params: MethodParams
    metrics: list[MetricData] = field(default_factory=list)
    curves: list[CurveData] = field(default_factory=list)
    randomization: list[RandomizationData] = field(default_factory=list)
    example_maps: np.ndarray | None = None
    seconds: float = 0.0

    @property
    def failed_randomization(self) -> bool:
        return any(m.metric in RANDOMIZATION and m.passed is False for m in self.metrics)


@dataclass
class EvaluationOutcome:
    """The evaluation's answer: per method, the ranking (labels, best first), the recommended label
    ("" when none qualifies) and the cost (rows, wall seconds, the measured floor of those rows)."""

    request_id: str
    model: str
    model_version: str
    num_items: int
    methods: list[MethodOutcome]
    ranking: list[str]
    recommended: str
    ranked_by: list[str]
    forward_rows: int = 0
    backward_rows: int = 0
    seconds: float = 0.0
    floor_seconds: float = 0.0
