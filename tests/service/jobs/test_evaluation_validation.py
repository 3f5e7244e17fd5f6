"""EvaluationRequest checks: every mistake is INVALID_ARGUMENT naming the field to fix, before any job is queued."""
from __future__ import annotations

import dataclasses
import io

import grpc
import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from service._proto import attribution_pb2 as pb
from service.config import Limits
from service.evaluation.validation import validate_evaluation
from service.jobs.config import EvaluationConfig, JobsConfig
from tests.service.jobs.conftest import FAST, pixels
from workers.errors import InvalidArgument, ModelNotFound
from workers.evaluation import jobspec as js
from workers.spec import CAM_METHODS, GRADIENT_METHODS, OFFLINE_ONLY_METHODS, ModelDescription

DEMO = ModelDescription(name="demo", version="v", channels=3, height=64, width=64, mean=(0.5,) * 3, std=(0.2,) * 3,
                        num_classes=4, labels=(), cam_layers=("block3", "block4"), default_cam_layer="block4",
                        online_methods=GRADIENT_METHODS + CAM_METHODS,
                        offline_methods=GRADIENT_METHODS + CAM_METHODS + OFFLINE_ONLY_METHODS, is_default=True)
MODELS = {"demo": DEMO, "shuffled": dataclasses.replace(DEMO, name="shuffled", is_default=False),
          "other": dataclasses.replace(DEMO, name="other", num_classes=3, is_default=False),
          "text": dataclasses.replace(DEMO, name="text", modality="text", cam_layers=(), is_default=False)}


def request(n: int = 2, **fields) -> pb.EvaluationRequest:
    base = pb.EvaluationRequest(inputs=pixels(torch.rand(n, 3, 64, 64)),
                                methods=[pb.ExplainRequest(method=pb.GRAD_CAM),
                                         pb.ExplainRequest(method=pb.VANILLA_GRADIENT)])
    for name, value in fields.items():
        if isinstance(value, list):
            del getattr(base, name)[:]
            getattr(base, name).extend(value)
        elif hasattr(value, "CopyFrom"):
            getattr(base, name).CopyFrom(value)
        else:
            setattr(base, name, value)
    return base


def validate(req: pb.EvaluationRequest, datasets=None, config=EvaluationConfig()):
    return validate_evaluation(req, MODELS, Limits(), config, datasets or {}, request_id="job")


def box(t, l, b, r) -> pb.Region:
    return pb.Region(box=pb.Box(top=t, left=l, bottom=b, right=r))


def test_defaults_and_pinned_request():
    checked = validate(request(regions=[box(0, 0, 8, 8), box(4, 4, 12, 12)], shuffled_labels_model="shuffled"))
    spec = checked.spec
    assert spec.items == 2 and spec.metrics == js.METRICS  # every metric the inputs allow
    assert [m.label for m in spec.methods] == ["grad_cam@block4", "vanilla"]
    assert spec.regions.shape == (2, 64, 64) and int(spec.regions[1].sum()) == 64
    assert spec.options == js.EvalOptions(top_k=3)
    assert checked.pinned.model == "demo" and checked.pinned.methods[0].cam.layer == "block4"
    bare = validate(request()).spec  # no regions, no shuffled model: those metrics are left out
    assert set(bare.metrics) == set(js.METRICS) - set(js.LOCALISATION) - {js.DATA_RANDOMIZATION}
    same = validate(request(methods=[pb.ExplainRequest(method=pb.GRAD_CAM)] * 2)).spec
    assert [m.label for m in same.methods] == ["grad_cam@block4", "grad_cam@block4'"]


BAD = [
    ("no inputs", dict(inputs=pb.Inputs()), "evaluation.inputs", "exactly one of"),
    ("both sources", dict(dataset="holdout"), "evaluation.inputs", "exactly one of"),
    ("unknown dataset", dict(inputs=pb.Inputs(), dataset="nope"), "evaluation.dataset", "unknown data set"),
    ("too many items", dict(), "evaluation.inputs.tensor", "at most 4"),
    ("no methods", dict(methods=[]), "evaluation.methods", "name the methods"),
    ("method unset", dict(methods=[pb.ExplainRequest()]), "evaluation.methods[0].method", "must be set"),
    ("method inputs set", dict(methods=[pb.ExplainRequest(method=pb.GRAD_CAM, inputs=pixels(torch.rand(1, 3, 64, 64)))]),
     "evaluation.methods[0].inputs", "must be unset"),
    ("bad params", dict(methods=[pb.ExplainRequest(method=pb.INTEGRATED_GRADIENTS,
                                                   integrated_gradients=pb.IntegratedGradientsParams(steps=9999))]),
     "evaluation.methods[0].integrated_gradients.steps", "must be 1.."),
    ("bad layer", dict(methods=[pb.ExplainRequest(method=pb.GRAD_CAM, cam=pb.CamParams(layer="fc"))]),
     "evaluation.methods[0].cam.layer", "no CAM-able layer"),
    ("cam also", dict(methods=[pb.ExplainRequest(method=pb.GRAD_CAM, cam=pb.CamParams(also=[pb.LAYER_CAM]))]),
     "evaluation.methods[0].cam.also", "own"),
    ("localisation without regions", dict(metrics=[pb.POINTING_GAME]), "evaluation.regions", "needs regions"),
    ("one region for two items", dict(regions=[box(0, 0, 8, 8)]), "evaluation.regions", "one per item"),
    ("box out of range", dict(regions=[box(0, 0, 8, 8), box(60, 0, 70, 8)]), "evaluation.regions[1].box",
     "bottom <= 64"),
    ("empty box", dict(regions=[box(0, 0, 8, 8), box(5, 5, 5, 9)]), "evaluation.regions[1].box", "top < bottom"),
    ("mask shape", dict(regions=[box(0, 0, 8, 8), pb.Region(mask=pb.Tensor(data=bytes(32 * 32), dtype=pb.UINT8,
                                                                          shape=[32, 32]))]),
     "evaluation.regions[1].mask.shape", "[64, 64]"),
    ("empty mask", dict(regions=[box(0, 0, 8, 8), pb.Region(mask=pb.Tensor(data=bytes(64 * 64), dtype=pb.UINT8,
                                                                          shape=[64, 64]))]),
     "evaluation.regions[1].mask", "no pixel inside"),
    ("data randomization without model", dict(metrics=[pb.DATA_RANDOMIZATION]), "evaluation.metrics",
     "needs shuffled_labels_model"),
    ("shuffled model unknown", dict(shuffled_labels_model="nope"), "evaluation.shuffled_labels_model", "unknown"),
    ("shuffled model differs", dict(shuffled_labels_model="other"), "evaluation.shuffled_labels_model", "same"),
    ("completeness without a path method", dict(metrics=[pb.COMPLETENESS]), "evaluation.metrics", "path methods"),
    ("unknown metric", dict(metrics=[42]), "evaluation.metrics", "unknown metric"),
    ("top_k target", dict(target=pb.Target(top_k=2)), "evaluation.target.top_k", "one class per item"),
    ("bad class", dict(target=pb.Target(class_indices=pb.ClassIndices(indices=[9]))),
     "evaluation.target.class_indices.indices", "out of range"),
    ("curve steps", dict(options=pb.EvaluationOptions(curve_steps=1000)), "evaluation.options.curve_steps", "1..256"),
    ("patch", dict(options=pb.EvaluationOptions(patch_size=65)), "evaluation.options.patch_size", "1..64"),
    ("baseline", dict(options=pb.EvaluationOptions(baselines=["grey"])), "evaluation.options.baselines", "unknown"),
    ("mode", dict(options=pb.EvaluationOptions(randomization_modes=["all"])),
     "evaluation.options.randomization_modes", "cascading"),
    ("threshold", dict(options=pb.EvaluationOptions(randomization_threshold=2.0)),
     "evaluation.options.randomization_threshold", "[-1, 1]"),
    ("augmentation", dict(options=pb.EvaluationOptions(augmentations=["rotate:5"])),
     "evaluation.options.augmentations[0]", "unknown augmentation"),
    ("shift size", dict(options=pb.EvaluationOptions(augmentations=["shift:2.5"])),
     "evaluation.options.augmentations[0]", "whole number"),
    ("top_k option", dict(options=pb.EvaluationOptions(top_k=9)), "evaluation.options.top_k", "2..4"),
    ("confidence", dict(options=pb.EvaluationOptions(confidence=1.0)), "evaluation.options.confidence", "(0, 1)"),
    ("bootstrap", dict(options=pb.EvaluationOptions(bootstrap_samples=10_001)), "evaluation.options.bootstrap_samples",
     "1..10000"),
    ("too many augmentations", dict(options=pb.EvaluationOptions(augmentations=[f"noise:0.0{i}" for i in range(1, 10)])),
     "evaluation.options.augmentations", "at most 8"),
    ("regions beyond the item cap", dict(inputs=pb.Inputs(), dataset="", regions=[box(0, 0, 8, 8)] * 5000),
     "evaluation.regions", "one per item"),
    ("shuffled model is text", dict(shuffled_labels_model="text"), "evaluation.shuffled_labels_model",
     "text model"),
]


@pytest.mark.parametrize("name,fields,field,words", BAD, ids=[b[0] for b in BAD])
def test_mistakes_name_their_field(name, fields, field, words):
    n = 5 if name == "too many items" else 2
    config = EvaluationConfig(max_items=4)
    with pytest.raises(InvalidArgument) as info:
        validate(request(n, **fields), datasets={"holdout": ()}, config=config)
    found = {v.field: v.description for v in info.value.violations}
    assert field in found and words in found[field], found


def test_a_text_model_is_refused_and_repeated_augmentations_run_once():
    with pytest.raises(InvalidArgument) as refused:
        validate(request(model="text"))
    assert "text model" in str(refused.value)
    twice = validate(request(options=pb.EvaluationOptions(augmentations=["noise:0.05", "noise:0.05"]))).spec
    assert twice.options.augmentations == (("noise", 0.05),)
    wide = dataclasses.replace(DEMO, num_classes=1000)
    with pytest.raises(InvalidArgument) as many:
        validate_evaluation(request(options=pb.EvaluationOptions(top_k=11)), {"demo": wide}, Limits(),
                            EvaluationConfig(), {}, request_id="job")
    assert "2..10" in str(many.value)


def test_unknown_model_is_not_found():
    with pytest.raises(ModelNotFound):
        validate(request(model="resnet9000"))


def test_dataset_images_are_decoded_in_file_order(tmp_path):
    for name, shade in (("b.png", 200), ("a.png", 10)):
        buffer = io.BytesIO()
        Image.fromarray(np.full((32, 48, 3), shade, dtype=np.uint8)).save(buffer, format="PNG")
        (tmp_path / name).write_bytes(buffer.getvalue())
    (tmp_path / "notes.txt").write_text("not an image")
    config = EvaluationConfig(datasets={"holdout": str(tmp_path)})
    checked = validate(request(inputs=pb.Inputs(), dataset="holdout"), datasets=config.list_datasets())
    assert checked.item_names == ["a.png", "b.png"] and checked.spec.inputs.shape == (2, 3, 64, 64)
    assert checked.spec.inputs[0].mean() < checked.spec.inputs[1].mean()  # a.png (dark) first
    assert not checked.pinned.HasField("inputs") and checked.pinned.dataset == "holdout"
    with pytest.raises(InvalidArgument) as missing:
        EvaluationConfig(datasets={"gone": str(tmp_path / "gone")}).list_datasets()
    assert missing.value.violations[0].field == "jobs.evaluation.datasets.gone"
    with pytest.raises(InvalidArgument):
        JobsConfig.from_dict({"max_items": 8, "evaluation": {"max_items": 16}})


def test_refusals_over_grpc_carry_bad_request_details(start_service, demo_batch):
    stub = start_service(config=JobsConfig(offline=FAST, poll_s=0.5)).stub()
    bad = request(methods=[pb.ExplainRequest(method=pb.GRAD_CAM, model="demo")])
    for submit in (pb.SubmitJobRequest(evaluation=bad),
                   pb.SubmitJobRequest(evaluation=request(), request=pb.ExplainRequest(method=pb.GRAD_CAM))):
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitJob(submit, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "Traceback" not in info.value.details()
        details = error_details_pb2.BadRequest()
        assert rpc_status.from_call(info.value).details[0].Unpack(details)
        assert {v.field for v in details.field_violations} & {"evaluation.methods[0].model", "request"}
    assert not stub.ListJobs(pb.ListJobsRequest(), timeout=10).jobs  # nothing was queued
