"""The request and result dataclasses cross Ray pickled: tensors travel as NumPy arrays and come back as
writable tensors with the same values, dtypes and shapes."""
from __future__ import annotations

import copy
import dataclasses
import pickle

import numpy as np
import torch

from workers.spec import AttributionMap, ExplainResult, ExplainSpec, ItemExplanation, MethodParams


def _roundtrip(obj):
    return pickle.loads(pickle.dumps(obj, protocol=5))


def test_a_spec_round_trips_with_its_input_and_custom_baseline_as_tensors():
    inputs = torch.randn(2, 3, 8, 8)
    baseline = torch.zeros(1, 3, 8, 8)
    spec = ExplainSpec(model="m", method="integrated_gradients", inputs=inputs,
                       params=MethodParams(baseline="custom", baseline_tensor=baseline), seed=7)
    back = _roundtrip(spec)
    assert type(back.inputs) is torch.Tensor and torch.equal(back.inputs, inputs)
    assert type(back.params.baseline_tensor) is torch.Tensor and torch.equal(back.params.baseline_tensor, baseline)
    assert back.params.baseline == "custom" and back.seed == 7 and back.cost == spec.cost
    back.inputs.add_(1.0)  # writable, and not the sender's memory
    assert torch.equal(spec.inputs, inputs)


def test_tensors_are_pickled_as_numpy_not_through_torch_save():
    spec = ExplainSpec(model="m", method="grad_cam", inputs=torch.rand(1, 3, 64, 64))
    payload = pickle.dumps(spec, protocol=5)
    assert b"torch._utils" not in payload and b"_rebuild_tensor" not in payload


def test_a_read_only_buffer_becomes_a_writable_tensor():
    amap = AttributionMap(method="grad_cam", target=3, target_score=0.5, map=torch.rand(4, 4), native=None)
    state = amap.__getstate__()
    state["map"] = np.frombuffer(state["map"].tobytes(), dtype=np.float32).reshape(4, 4)  # read-only, as Ray gives
    assert not state["map"].flags.writeable
    restored = AttributionMap.__new__(AttributionMap)
    restored.__setstate__(state)
    restored.map.mul_(2.0)
    assert restored.native is None and restored.target == 3


def test_results_with_float16_and_non_contiguous_maps_keep_values_and_dtypes():
    half = torch.rand(3, 5, 5).half()
    strided = torch.rand(6, 6).t()
    result = ExplainResult(request_id="r", model="m", model_version="1", method="vanilla", items=[
        ItemExplanation([1], [0.9], [AttributionMap("vanilla", 1, 0.9, half, native=strided)])])
    back = copy.deepcopy(result)
    amap = back.items[0].attributions[0]
    assert amap.map.dtype == torch.float16 and torch.equal(amap.map, half)
    assert torch.equal(amap.native, strided)


def test_tensors_that_need_grad_or_have_no_numpy_dtype_are_left_to_torch():
    spec = ExplainSpec(model="m", method="vanilla", inputs=torch.rand(1, 3, 2, 2, dtype=torch.bfloat16))
    back = _roundtrip(spec)
    assert back.inputs.dtype == torch.bfloat16 and torch.equal(back.inputs, spec.inputs)


def _pixel_spec(n: int = 2, size: int = 112) -> ExplainSpec:
    from workers.spec import pixels_to_model_space
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pixels = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    return ExplainSpec(model="m", method="grad_cam", inputs=pixels_to_model_space(pixels, mean, std),
                       pixels_u8=pixels, pixel_mean=mean, pixel_std=std)


def test_a_spec_with_uint8_pixels_crosses_as_pixels_and_arrives_bit_for_bit_equal():
    spec = _pixel_spec()
    payload = pickle.dumps(spec, protocol=5)
    float_only = pickle.dumps(ExplainSpec(model="m", method="grad_cam", inputs=spec.inputs), protocol=5)
    assert len(payload) < 0.3 * len(float_only)  # a quarter of the input bytes, plus the envelope
    back = pickle.loads(payload)
    assert back.inputs.dtype == torch.float32 and torch.equal(back.inputs, spec.inputs)
    assert torch.equal(back.pixels_u8, spec.pixels_u8)
    back.inputs.add_(1.0)  # writable


def test_pixels_that_no_longer_match_the_inputs_are_never_sent():
    spec = _pixel_spec()
    spec.inputs = spec.inputs[:1]  # e.g. a slice made without its pixels
    back = _roundtrip(spec)
    assert back.pixels_u8 is None and torch.equal(back.inputs, spec.inputs)
    other = dataclasses.replace(_pixel_spec(), inputs=torch.zeros(2, 3, 112, 112))  # same shape, other values
    back = _roundtrip(other)
    assert back.pixels_u8 is None and torch.equal(back.inputs, other.inputs)


def test_a_job_chunk_slices_the_pixels_with_the_inputs():
    from workers.offline import slice_spec
    spec = _pixel_spec(n=4, size=16)
    part = _roundtrip(slice_spec(spec, slice(1, 3)))
    assert torch.equal(part.inputs, spec.inputs[1:3]) and torch.equal(part.pixels_u8, spec.pixels_u8[1:3])


def test_a_job_chunk_keeps_a_reference_set_whole_and_splits_per_item_baselines():
    from workers.offline import slice_spec
    from workers.spec import params_for_items

    inputs = torch.rand(4, 3, 8, 8)
    references = torch.rand(100, 3, 8, 8)  # Expected Gradients draws from all of them, whatever the items
    eg = ExplainSpec(model="m", method="expected_gradients", inputs=inputs,
                     params=MethodParams(baseline_tensor=references))
    assert slice_spec(eg, slice(2, 4)).params.baseline_tensor is references
    per_item = torch.rand(4, 3, 8, 8)
    ig = ExplainSpec(model="m", method="integrated_gradients", inputs=inputs,
                     params=MethodParams(baseline="custom", baseline_tensor=per_item))
    assert torch.equal(slice_spec(ig, slice(2, 4)).params.baseline_tensor, per_item[2:4])
    rows = torch.arange(4).repeat_interleave(3)  # rows that repeat items (one per class): each row its item's
    assert torch.equal(params_for_items("integrated_gradients", ig.params, rows).baseline_tensor, per_item[rows])
    one = MethodParams(baseline="custom", baseline_tensor=per_item[:1])
    assert params_for_items("guided_ig", one, slice(2, 4)) is one
