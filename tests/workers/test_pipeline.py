"""The batch pipeline: folding across requests, error isolation, targets, outputs."""
from __future__ import annotations

import time

import pytest
import torch

from workers.config import ModelConfig
from workers.errors import DeadlineExceeded, InternalError, InvalidArgument, LayerNotFound
from workers.models import load_model
from workers.pipeline import WorkerContext, explain_batch
from workers.postprocess import normalize, reduce_channels
from workers.spec import ExplainResult, ExplainSpec, MethodParams, OutputSpec, TargetSpec


@pytest.fixture(scope="module")
def ctx(demo_cache_dir):
    context = WorkerContext.create(load_model(ModelConfig(name="demo", source="demo"), "cpu", demo_cache_dir))
    yield context
    context.taps.close()


def _spec(inputs, method="grad_cam", **kw) -> ExplainSpec:
    return ExplainSpec(model="demo", method=method, inputs=inputs, request_id=kw.pop("request_id", method), **kw)


def _maps(result: ExplainResult) -> list[torch.Tensor]:
    return [a.map for item in result.items for a in item.attributions]


MIXED = [
    ("vanilla", MethodParams()),
    ("smoothgrad", MethodParams(samples=6)),
    ("vargrad", MethodParams(samples=4, noise_fraction=0.2)),
    ("integrated_gradients", MethodParams(steps=8, baseline="blurred")),
    ("grad_cam", MethodParams()),
    ("layer_cam", MethodParams(layer="block3")),
]


def test_results_same_alone_or_batched(ctx, demo_heldout_inputs):
    x = demo_heldout_inputs
    specs = [_spec(x[2 * i:2 * i + 2], method, params=params, seed=11) for i, (method, params) in enumerate(MIXED)]
    batched = explain_batch(ctx, specs)
    for spec, together in zip(specs, batched):
        (alone,) = explain_batch(ctx, [spec])
        assert isinstance(together, ExplainResult) and together.batch_requests == len(specs)
        assert together.batch_samples == sum(s.cost for s in specs)
        for a, b in zip(_maps(alone), _maps(together)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_one_bad_request_fails_alone(ctx, demo_heldout_inputs):
    x = demo_heldout_inputs[:2]
    specs = [
        _spec(x, request_id="good-1"),
        _spec(x, target=TargetSpec(kind="indices", indices=(7,)), request_id="bad-target"),
        _spec(x, params=MethodParams(layer="fc"), request_id="bad-layer"),
        _spec(x, "smoothgrad", params=MethodParams(samples=0), request_id="bad-samples"),
        _spec(x, "score_cam", request_id="offline-only"),
        _spec(x, deadline=time.time() - 1, request_id="late"),
        _spec(x, "integrated_gradients", params=MethodParams(steps=4), request_id="good-2"),
    ]
    out = dict(zip([s.request_id for s in specs], explain_batch(ctx, specs)))
    assert isinstance(out["good-1"], ExplainResult) and isinstance(out["good-2"], ExplainResult)
    assert isinstance(out["bad-target"], InvalidArgument) and "[0, 4)" in out["bad-target"].message
    assert isinstance(out["bad-layer"], LayerNotFound)
    assert isinstance(out["bad-samples"], InvalidArgument)
    assert isinstance(out["offline-only"], InvalidArgument) and "SubmitJob" in out["offline-only"].message
    assert isinstance(out["late"], DeadlineExceeded)


def test_kernel_failure_is_isolated_and_typed(ctx, demo_heldout_inputs):
    x = demo_heldout_inputs[:1]
    poisoned = x.clone()
    poisoned[0, 0, 0, 0] = float("nan")  # validation upstream refuses this; here it must still fail alone
    out = explain_batch(ctx, [_spec(x, "vanilla"), _spec(poisoned, "vanilla", request_id="nan")])
    assert isinstance(out[0], ExplainResult)
    assert isinstance(out[1], (InvalidArgument, InternalError))


def test_targets_topk_indices_and_variants(ctx, demo_heldout_inputs):
    x = demo_heldout_inputs[:3]
    (res,) = explain_batch(ctx, [_spec(x, target=TargetSpec(kind="top_k", k=2),
                                       params=MethodParams(also=("grad_cam_plus_plus", "layer_cam")),
                                       output=OutputSpec(native_resolution=True))])
    for item in res.items:
        assert [a.method for a in item.attributions] == ["grad_cam", "grad_cam_plus_plus", "layer_cam"] * 2
        assert [a.target for a in item.attributions[::3]] == item.predicted_classes[:2]
        assert all(a.native is not None and a.native.shape == (16, 16) for a in item.attributions)
        assert abs(sum(item.predicted_scores) - 1.0) < 1e-4  # 4 classes: top-5 covers all
    (res,) = explain_batch(ctx, [_spec(x, "vanilla", target=TargetSpec(kind="indices", indices=(0, 1, 3)))])
    assert [i.attributions[0].target for i in res.items] == [0, 1, 3]


def test_cam_predictions_come_from_the_cam_pass(ctx, demo_heldout_inputs):
    x = demo_heldout_inputs[:4]
    with torch.inference_mode():
        probs = torch.softmax(ctx.model.module(x).float(), dim=1)
    top = probs.topk(4, dim=1)
    specs = [_spec(x[:2]), _spec(x[2:], target=TargetSpec(kind="indices", indices=(1, 3)), request_id="given"),
             _spec(x[:2], target=TargetSpec(kind="top_k", k=1), request_id="top-1")]
    forwards = []
    hook = ctx.model.module.register_forward_pre_hook(lambda m, a: forwards.append(a[0].shape[0]))
    try:
        results = explain_batch(ctx, specs)
    finally:
        hook.remove()
    assert forwards == [6]  # no prediction forward: the one CAM pass over the 6 folded images
    items = [item for r in results for item in r.items]
    for i, item in zip([0, 1, 2, 3, 0, 1], items):
        assert item.predicted_classes == top.indices[i].tolist()
        assert item.predicted_scores == pytest.approx(top.values[i].tolist(), rel=1e-5, abs=1e-6)
        attribution = item.attributions[0]
        assert attribution.target_score == pytest.approx(float(probs[i, attribution.target]), rel=1e-5, abs=1e-6)
    assert [i.attributions[0].target for i in items] == [*top.indices[:2, 0].tolist(), 1, 3,
                                                         *top.indices[:2, 0].tolist()]
    # top-2 needs the predictions before the pass (two rows per item): a prediction forward first.
    forwards.clear()
    hook = ctx.model.module.register_forward_pre_hook(lambda m, a: forwards.append(a[0].shape[0]))
    try:
        explain_batch(ctx, [_spec(x[:2], target=TargetSpec(kind="top_k", k=2))])
    finally:
        hook.remove()
    assert forwards == [2, 4]


def test_output_reduction_and_normalization(ctx, demo_heldout_inputs):
    x = demo_heldout_inputs[:2]
    (raw,) = explain_batch(ctx, [_spec(x, "vanilla", output=OutputSpec(reduction="none"))])
    (summed,) = explain_batch(ctx, [_spec(x, "vanilla", output=OutputSpec(reduction="sum", normalization="max_abs"))])
    full = raw.items[0].attributions[0].map
    assert full.shape == (3, 64, 64)
    expected = full.sum(0)
    torch.testing.assert_close(summed.items[0].attributions[0].map, expected / expected.abs().max())
    (ig,) = explain_batch(ctx, [_spec(x, "integrated_gradients", params=MethodParams(steps=16))])
    assert all(a.completeness_error is not None and a.completeness_error < 0.05
               for i in ig.items for a in i.attributions)


def test_postprocess_helpers():
    maps = torch.tensor([[[[1.0, -3.0]], [[2.0, 1.0]]]])  # (1, 2, 1, 2)
    assert reduce_channels(maps, "abs_max").tolist() == [[[2.0, 3.0]]]
    assert reduce_channels(maps, "sum").tolist() == [[[3.0, -2.0]]]
    flat = torch.tensor([[[0.0, 2.0]], [[5.0, 5.0]]])
    assert normalize(flat, "min_max").tolist() == [[[0.0, 1.0]], [[0.0, 0.0]]]
    assert normalize(flat, "max_abs").tolist() == [[[0.0, 1.0]], [[1.0, 1.0]]]


def test_a_request_cancelled_mid_fold_is_dropped_and_its_remaining_rows_are_not_computed(demo_cache_dir,
                                                                                        demo_heldout_inputs):
    from workers.batching import FoldBudget
    from workers.errors import Cancelled

    model = load_model(ModelConfig(name="demo", source="demo"), "cpu", demo_cache_dir)
    chunked = WorkerContext.create(model, FoldBudget(max_rows=16))
    grad_chunks = []
    hook = model.module.register_forward_hook(
        lambda module, args, out: grad_chunks.append(args[0].shape[0]) if torch.is_grad_enabled() else None)
    x = demo_heldout_inputs[:1]
    specs = [_spec(x, "smoothgrad", params=MethodParams(samples=64), request_id="doomed", seed=1),
             _spec(x, "smoothgrad", params=MethodParams(samples=16), request_id="kept", seed=2)]
    # The caller of "doomed" goes away once the fold's first chunk has run.
    gone = lambda spec: spec.request_id == "doomed" and bool(grad_chunks)  # noqa: E731
    try:
        doomed, kept = explain_batch(chunked, specs, abandoned=gone)
        (alone,) = explain_batch(WorkerContext(model, chunked.taps), [specs[1]])
    finally:
        hook.remove()
        chunked.taps.close()
    assert isinstance(doomed, Cancelled)
    assert isinstance(kept, ExplainResult)
    # 80 rows in chunks of 16: one chunk of "doomed" ran, its other 48 rows never did; "kept" ran in one chunk.
    assert grad_chunks[:2] == [16, 16]
    assert chunked.rows_skipped == 48 and chunked.dropped == 1
    for a, b in zip(_maps(alone), _maps(kept)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
