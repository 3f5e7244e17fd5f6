"""workers/offline.py: chunked offline runs, progress, cancellation between chunks, early-closed streams."""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from workers.batching import FoldBudget
from workers.errors import Cancelled
from workers.config import OfflineConfig
from workers.offline import LocalOfflineWorker, run_offline
from workers.pipeline import WorkerContext
from workers.spec import ExplainResult, ExplainSpec, MethodParams, TargetSpec


@pytest.fixture(scope="module")
def ctx(demo_registry):
    context = WorkerContext.create(demo_registry.get(), FoldBudget(max_rows=8))
    yield context
    context.taps.close()


@pytest.fixture(scope="module")
def inputs(demo_batch, demo_registry):
    model = demo_registry.get()
    mean = torch.tensor(model.spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(model.spec.std).view(1, -1, 1, 1)
    return ((demo_batch.images - mean) / std)[:4]


def maps(result: ExplainResult) -> list[torch.Tensor]:
    return [a.map for item in result.items for a in item.attributions]


@pytest.mark.parametrize("method, params, target", [
    ("occlusion", MethodParams(patch_size=16, stride=16), TargetSpec(kind="indices", indices=(0, 1, 2, 3))),
    ("score_cam", MethodParams(layer="block3", top_k_channels=4), TargetSpec(kind="top_k", k=2)),
    ("integrated_gradients", MethodParams(steps=4, baseline="black"), TargetSpec()),
    ("rise", MethodParams(masks=48, grid=4), TargetSpec(kind="top_k", k=2)),
    ("xrai", MethodParams(steps=4, segmentation_scales=(100.0, 500.0)), TargetSpec()),
])
def test_chunking_does_not_change_the_answer(ctx, inputs, method, params, target):
    spec = ExplainSpec(model="demo", method=method, inputs=inputs, params=params, target=target)
    whole = run_offline(ctx, spec, items_per_chunk=8)
    steps = []
    chunked = run_offline(ctx, spec, items_per_chunk=1, progress=steps.append)
    assert len(chunked.items) == 4 and chunked.batch_samples == spec.cost
    assert [a.target for i in chunked.items for a in i.attributions] == \
        [a.target for i in whole.items for a in i.attributions]
    for a, b in zip(maps(whole), maps(chunked)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # batch composition moves the last bits
    assert steps == sorted(steps) and steps[-1] == 1.0 and len(set(steps)) >= 4


def test_per_item_targets_follow_their_items(ctx, inputs):
    spec = ExplainSpec(model="demo", method="occlusion", inputs=inputs, params=MethodParams(patch_size=16, stride=16),
                       target=TargetSpec(kind="indices", indices=(3, 2, 1, 0)))
    result = run_offline(ctx, spec, items_per_chunk=3)
    assert [i.attributions[0].target for i in result.items] == [3, 2, 1, 0]


def test_cancel_flag_stops_between_chunks(ctx, inputs):
    steps = []
    spec = ExplainSpec(model="demo", method="occlusion", inputs=inputs, params=MethodParams(patch_size=4, stride=2))
    with pytest.raises(Cancelled):
        run_offline(ctx, spec, items_per_chunk=1, progress=steps.append, cancelled=lambda: len(steps) >= 3)
    assert len(steps) == 3 and steps[-1] < 0.25  # stopped inside the first item, at a chunk boundary


def test_closing_the_stream_early_frees_the_worker(demo_registry, inputs):
    worker = LocalOfflineWorker(demo_registry, OfflineConfig(items_per_chunk=1, fold_max_rows=8))
    slow = ExplainSpec(model="demo", method="occlusion", inputs=inputs, params=MethodParams(patch_size=4, stride=1))
    quick = ExplainSpec(model="demo", method="grad_cam", inputs=inputs[:1])

    async def scenario():
        stream = worker.run(slow)
        first = await anext(stream)
        await stream.aclose()  # what a cancelled job's runner (or Serve, on the replica) does
        # One worker thread: the quick spec only runs once the slow one has stopped.
        events = [e async for e in worker.run(quick)]
        await worker.close()
        return first, events

    first, events = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert 0 < first < 0.01
    assert isinstance(events[-1], ExplainResult) and len(events[-1].items) == 1
    assert not [t for t in threading.enumerate() if t.name.startswith("offline") and t.is_alive()]
