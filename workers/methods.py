"""The method table: every attribution method the service offers, in one place.

Each row says what the rest of the code needs to know about a method, and every
other view is derived from it: the proto enum <-> name maps (service/codec.py),
which `params` member of ExplainRequest a method reads (service/validation.py,
service/client.py), which methods run online (routing, validation, the load
generator's scenarios), how a request's batching cost is counted
(`workers.spec.request_cost`), and which kernel family computes it
(workers/pipeline.py, workers/offline.py).

Adding a method = its kernel, its proto enum value (and params message, if it
has new parameters), and one row here. Nothing in this module imports torch or
the generated proto code, so the CLI and the config loader can read it.
"""
from __future__ import annotations

from dataclasses import dataclass

# How a method's batching cost per item and target is counted.
COST_ONE, COST_SAMPLES, COST_STEPS = "one", "samples", "steps"
# What a model consumes (proto Modality): images, or token sequences.
IMAGE, TEXT = "image", "text"
# The `params` members of the methods that read one of the model's CAM layers, beside the CAM family.
LAYER_PARAMS = ("cam", "score_cam")


@dataclass(frozen=True)
class Method:
    """One row of the table.

    name: the workers' name (ExplainSpec.method, metrics labels, scenarios).
    proto: the `Method` enum value's name in proto/attribution/v1.
    family: the kernel family that computes it: "gradients" (workers/kernels/gradients.py, folded),
        "cam" (workers/kernels/cam.py, folded), "perturbation" (workers/kernels/perturbation.py,
        rise.py and xrai.py: jobs).
    params: the ExplainRequest `params` oneof member it reads.
    online: served by Explain / ExplainStream; False = offline jobs only (SubmitJob).
    cost: rows per item and target: "one", "samples" (NoiseParams / ExpectedGradientsParams.samples) or
        "steps" (the path's steps: IG, Blur IG, Guided IG).
    noise: draws noisy copies (NoiseParams), SmoothGrad-style.
    modalities: the inputs it explains (IMAGE, TEXT); a model of another modality does not serve it.
    """

    name: str
    proto: str
    family: str
    params: str
    online: bool = True
    cost: str = COST_ONE
    noise: bool = False
    modalities: tuple[str, ...] = (IMAGE,)

    @property
    def needs_layer(self) -> bool:
        """It reads one of the model's CAM layers: a model without any does not serve it."""
        return self.family == "cam" or self.params in LAYER_PARAMS


METHODS: tuple[Method, ...] = (
    Method("vanilla", "VANILLA_GRADIENT", "gradients", "gradient",
           modalities=(IMAGE, TEXT)),
    Method("smoothgrad", "SMOOTHGRAD", "gradients", "noise", cost=COST_SAMPLES, noise=True,
           modalities=(IMAGE, TEXT)),
    Method("smoothgrad_sq", "SMOOTHGRAD_SQ", "gradients", "noise", cost=COST_SAMPLES, noise=True),
    Method("vargrad", "VARGRAD", "gradients", "noise", cost=COST_SAMPLES, noise=True),
    Method("integrated_gradients", "INTEGRATED_GRADIENTS", "gradients", "integrated_gradients", cost=COST_STEPS,
           modalities=(IMAGE, TEXT)),
    Method("expected_gradients", "EXPECTED_GRADIENTS", "gradients", "expected_gradients", cost=COST_SAMPLES),
    Method("blur_ig", "BLUR_IG", "gradients", "blur_ig", cost=COST_STEPS),
    Method("guided_ig", "GUIDED_IG", "gradients", "guided_ig", cost=COST_STEPS),
    Method("grad_cam", "GRAD_CAM", "cam", "cam"),
    Method("grad_cam_plus_plus", "GRAD_CAM_PLUS_PLUS", "cam", "cam"),
    Method("layer_cam", "LAYER_CAM", "cam", "cam"),
    Method("hires_cam", "HIRES_CAM", "cam", "cam"),
    Method("xgrad_cam", "XGRAD_CAM", "cam", "cam"),
    Method("eigen_cam", "EIGEN_CAM", "cam", "cam"),
    Method("score_cam", "SCORE_CAM", "perturbation", "score_cam", online=False),
    Method("occlusion", "OCCLUSION", "perturbation", "occlusion", online=False),
    Method("ablation_cam", "ABLATION_CAM", "perturbation", "score_cam", online=False),
    Method("rise", "RISE", "perturbation", "rise", online=False),
    Method("xrai", "XRAI", "perturbation", "xrai", online=False),
)

BY_NAME: dict[str, Method] = {m.name: m for m in METHODS}
ALL_METHODS = tuple(m.name for m in METHODS)
ONLINE_METHODS = tuple(m.name for m in METHODS if m.online)
OFFLINE_ONLY_METHODS = tuple(m.name for m in METHODS if not m.online)
GRADIENT_METHODS = tuple(m.name for m in METHODS if m.family == "gradients")
NOISE_METHODS = tuple(m.name for m in METHODS if m.noise)
CAM_METHODS = tuple(m.name for m in METHODS if m.family == "cam")
# Offline-only image methods that need no CAM layer: every image model offers them.
LAYERLESS_OFFLINE_METHODS = tuple(m.name for m in METHODS if not m.online and not m.needs_layer)
# What a text model serves, online and as jobs (workers/kernels/text_gradients.py).
TEXT_METHODS = tuple(m.name for m in METHODS if TEXT in m.modalities)


def model_methods(modality: str = IMAGE, has_cam_layers: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(online, offline) methods of a model, in table order: the rows for its modality, those that read a CAM
    layer only where it has CAM layers (a TorchScript model has none). Jobs serve the online methods too."""
    rows = [m for m in METHODS if modality in m.modalities and (has_cam_layers or not m.needs_layer)]
    return tuple(m.name for m in rows if m.online), tuple(m.name for m in rows)


def method(name: str) -> Method | None:
    return BY_NAME.get(name)


def per_item_rows(name: str, samples: int, steps: int) -> int:
    """Folded rows one item and target of `name` costs (unknown names cost 1)."""
    row = BY_NAME.get(name)
    if row is None or row.cost == COST_ONE:
        return 1
    return samples if row.cost == COST_SAMPLES else steps
