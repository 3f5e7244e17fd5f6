"""Validation of the offline perturbation methods' parameters (RISE, XRAI): wire message -> MethodParams.

Called by service/validation.py for the `rise` and `xrai` members of ExplainRequest.params; every
refusal is a field violation added to the request's collection, so one answer lists them all.
"""
from __future__ import annotations

import math

from service._proto import attribution_pb2 as pb
from workers.config import Limits
from workers.kernels.rise import MAX_GRID, MAX_MASKS, MIN_GRID
from workers.kernels.xrai import MAX_SCALE, MAX_SCALES
from workers.spec import MethodParams

_DEFAULTS = MethodParams()


def rise_params(p: pb.RiseParams, v) -> MethodParams:
    """RiseParams with defaults filled in: masks 4000, grid 7, keep_probability 0.5 (unset)."""
    masks = p.masks or _DEFAULTS.masks
    if not 1 <= masks <= MAX_MASKS:
        v.add("rise.masks", f"must be 1..{MAX_MASKS}, got {masks}")
    grid = p.grid or _DEFAULTS.grid
    if not MIN_GRID <= grid <= MAX_GRID:
        v.add("rise.grid", f"must be {MIN_GRID}..{MAX_GRID} cells per side, got {grid}")
    keep = p.keep_probability if p.HasField("keep_probability") else _DEFAULTS.keep_probability
    if not 0.0 < keep < 1.0:  # NaN fails too
        v.add("rise.keep_probability", f"must lie strictly between 0 and 1, got {keep}")
    return MethodParams(masks=int(masks), grid=int(grid), keep_probability=float(keep))


def xrai_params(p: pb.XraiParams, limits: Limits, v) -> MethodParams:
    """XraiParams with defaults filled in: steps 32 per baseline, the six default Felzenszwalb scales."""
    steps = p.steps or _DEFAULTS.steps
    if not 1 <= steps <= limits.max_steps:
        v.add("xrai.steps", f"must be 1..{limits.max_steps} (server.limits.max_steps), got {steps}")
    scales = tuple(float(s) for s in p.segmentation_scales) or _DEFAULTS.segmentation_scales
    if len(scales) > MAX_SCALES:
        v.add("xrai.segmentation_scales", f"has {len(scales)} scales; at most {MAX_SCALES}")
    bad = [s for s in scales if not (math.isfinite(s) and 0.0 < s <= MAX_SCALE)]
    if bad:
        v.add("xrai.segmentation_scales", f"each scale must lie in (0, {MAX_SCALE:g}]; got {bad[:4]}")
    return MethodParams(steps=int(steps), segmentation_scales=scales)
