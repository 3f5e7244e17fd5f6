"""The method table against the contract and the views derived from it."""
from __future__ import annotations

from service import codec, validation
from service import client_messages as client_module
from service._proto import attribution_pb2 as pb
from loadtests import scenario
from workers import methods, spec
from workers.kernels import gradients


def test_every_proto_method_has_one_row_and_every_row_a_proto_method():
    wire = {name for name in pb.Method.keys() if name != "METHOD_UNSPECIFIED"}
    assert wire == {m.proto for m in methods.METHODS}
    assert len({m.name for m in methods.METHODS}) == len(methods.METHODS)


def test_each_row_names_a_params_member_of_the_request():
    oneof = {f.name for f in pb.ExplainRequest.DESCRIPTOR.oneofs_by_name["params"].fields}
    assert {m.params for m in methods.METHODS} <= oneof
    assert {m.family for m in methods.METHODS} == {"gradients", "cam", "perturbation"}


def test_the_views_are_the_table():
    assert set(codec.METHOD_NAMES.values()) == set(methods.ALL_METHODS)
    assert {codec.METHOD_ENUMS[m.name] for m in methods.METHODS} == set(codec.METHOD_NAMES)
    assert set(scenario.ONLINE_METHODS) == set(methods.ONLINE_METHODS)
    assert spec.GRADIENT_METHODS == gradients.METHODS == methods.GRADIENT_METHODS
    assert set(client_module._FAMILY.values()) <= set(client_module._FAMILY_KEYWORDS)
    assert validation._PARAMS_FIELD == {m.name: m.params for m in methods.METHODS}
    assert not set(methods.OFFLINE_ONLY_METHODS) & set(methods.ONLINE_METHODS)


def test_cost_follows_the_row():
    assert spec.request_cost("smoothgrad", 2, 3, samples=50, steps=7) == 300
    assert spec.request_cost("integrated_gradients", 2, 1, samples=50, steps=7) == 14
    assert spec.request_cost("grad_cam", 4, 2, samples=50, steps=7) == 8


def test_a_models_methods_follow_the_rows_and_what_the_model_declares():
    """Online methods are the served rows that run online, offline ones every served row, both in table order;
    a row is served where the model's modality is among the row's and, if it reads a CAM layer, the model has one."""
    for modality in (methods.IMAGE, methods.TEXT):
        for layers in (False, True):
            online, offline = methods.model_methods(modality, layers)
            served = [m for m in methods.METHODS if modality in m.modalities and (layers or not m.needs_layer)]
            assert offline == tuple(m.name for m in served) and online == tuple(m.name for m in served if m.online)
    online, offline = methods.model_methods(methods.IMAGE, has_cam_layers=False)
    assert "vanilla" in online and "grad_cam" not in online and "score_cam" not in offline and "occlusion" in offline
    online, offline = methods.model_methods(methods.IMAGE, has_cam_layers=True)
    assert {"grad_cam", "layer_cam"} <= set(online) and {"score_cam", "occlusion"} <= set(offline) - set(online)
    assert all(methods.BY_NAME[m].needs_layer for m in methods.CAM_METHODS + ("score_cam",))
