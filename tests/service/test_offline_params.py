"""RISE and XRAI requests: defaults from the proto, every limit refused as a field violation, offline only,
and offered by models without CAM layers too."""
from __future__ import annotations

import pytest
import torch

from service._proto import attribution_pb2 as pb
from service.client import build_request
from service.config import Limits
from service.validation import validate_explain
from tests.service.conftest import explain_request
from workers.errors import InvalidArgument
from workers.methods import LAYERLESS_OFFLINE_METHODS
from workers.spec import CAM_METHODS, GRADIENT_METHODS, OFFLINE_ONLY_METHODS, ModelDescription

DEMO = ModelDescription(name="demo", version="v", channels=3, height=64, width=64, mean=(0.47,) * 3,
                        std=(0.25,) * 3, num_classes=4, labels=(), cam_layers=("block3", "block4"),
                        default_cam_layer="block4", online_methods=GRADIENT_METHODS + CAM_METHODS,
                        offline_methods=GRADIENT_METHODS + CAM_METHODS + OFFLINE_ONLY_METHODS, is_default=True)


def _images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(n))


def _offline(request: pb.ExplainRequest, limits: Limits = Limits()):
    return validate_explain(request, DEMO, limits, offline=True)


def test_defaults_follow_the_proto():
    p = _offline(explain_request(_images(), pb.RISE)).params
    assert (p.masks, p.grid, p.keep_probability) == (4000, 7, 0.5)
    p = _offline(explain_request(_images(), pb.RISE, rise={"masks": 64, "grid": 3, "keep_probability": 0.25})).params
    assert (p.masks, p.grid, p.keep_probability) == (64, 3, 0.25)
    spec = _offline(explain_request(_images(), pb.XRAI))
    assert spec.method == "xrai" and spec.params.steps == 32
    assert spec.params.segmentation_scales == (50.0, 100.0, 150.0, 250.0, 500.0, 1200.0)
    p = _offline(explain_request(_images(), pb.XRAI, xrai={"steps": 8, "segmentation_scales": [80, 300]})).params
    assert (p.steps, p.segmentation_scales) == (8, (80.0, 300.0))


@pytest.mark.parametrize("method, params, field, words", [
    (pb.RISE, dict(rise={"masks": 16385}), "rise.masks", "1..16384"),
    (pb.RISE, dict(rise={"grid": 1}), "rise.grid", "2..64"),
    (pb.RISE, dict(rise={"grid": 65}), "rise.grid", "2..64"),
    (pb.RISE, dict(rise={"keep_probability": 0.0}), "rise.keep_probability", "strictly between 0 and 1"),
    (pb.RISE, dict(rise={"keep_probability": 1.0}), "rise.keep_probability", "strictly between 0 and 1"),
    (pb.RISE, dict(rise={"keep_probability": float("nan")}), "rise.keep_probability", "strictly between"),
    (pb.XRAI, dict(xrai={"steps": 513}), "xrai.steps", "1..512"),
    (pb.XRAI, dict(xrai={"segmentation_scales": [100, 0]}), "xrai.segmentation_scales", "(0, 100000]"),
    (pb.XRAI, dict(xrai={"segmentation_scales": [float("inf")]}), "xrai.segmentation_scales", "(0, 100000]"),
    (pb.XRAI, dict(xrai={"segmentation_scales": [100] * 17}), "xrai.segmentation_scales", "at most 16"),
    (pb.XRAI, dict(rise={"masks": 4}), "rise", "do not apply to XRAI"),
])
def test_limits_are_field_violations(method, params, field, words):
    with pytest.raises(InvalidArgument) as info:
        _offline(explain_request(_images(), method, **params))
    assert [v.field for v in info.value.violations] == [field]
    assert words in info.value.violations[0].description


def test_every_mistake_is_reported_at_once():
    request = explain_request(_images(), pb.RISE, rise={"masks": 20000, "grid": 99, "keep_probability": 2.0})
    with pytest.raises(InvalidArgument) as info:
        _offline(request)
    assert {v.field for v in info.value.violations} == {"rise.masks", "rise.grid", "rise.keep_probability"}


@pytest.mark.parametrize("method", [pb.RISE, pb.XRAI])
def test_online_requests_are_sent_to_jobs(method):
    with pytest.raises(InvalidArgument, match="SubmitJob"):
        validate_explain(explain_request(_images(), method), DEMO, Limits())


def test_models_without_cam_layers_offer_them():
    assert set(LAYERLESS_OFFLINE_METHODS) >= {"occlusion", "rise", "xrai"}
    assert "score_cam" not in LAYERLESS_OFFLINE_METHODS


def test_client_keywords_build_the_params():
    request = build_request(_images(1).numpy(), method="rise", masks=100, grid=5, keep_probability=0.25, seed=7)
    assert request.WhichOneof("params") == "rise" and request.seed == 7
    assert (request.rise.masks, request.rise.grid, request.rise.keep_probability) == (100, 5, 0.25)
    request = build_request(_images(1).numpy(), method="xrai", steps=4, segmentation_scales=[50, 500])
    assert (request.xrai.steps, list(request.xrai.segmentation_scales)) == (4, [50.0, 500.0])
    with pytest.raises(TypeError, match="takes grid, keep_probability, masks"):
        build_request(_images(1).numpy(), method="rise", steps=3)
