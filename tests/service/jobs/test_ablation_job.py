"""An ABLATION_CAM job through the job service in process: real store, demo model, kernel."""
from __future__ import annotations

import torch

from service._proto import attribution_pb2 as pb
from service.codec import normalize
from tests.service.jobs.conftest import job_request
from tests.service.jobs.test_runner import get, submit, wait_for
from workers.kernels.perturbation import ablation_cam
from workers.pipeline import WorkerContext


def test_ablation_cam_job_succeeds_and_matches_the_kernel(start_service, demo_batch, demo_registry):
    h = start_service()
    images = demo_batch.images[:3]
    job = submit(h, job_request(images, pb.ABLATION_CAM, score_cam=pb.ScoreCamParams(layer="block3", top_k_channels=8)))
    assert job.method == pb.ABLATION_CAM and job.num_items == 3
    done = wait_for(h, job.id, lambda j: j.state in (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED))
    assert done.state == pb.SUCCEEDED, done.error
    result = get(h, job.id, include_result=True).result
    ctx = WorkerContext.create(demo_registry.get())
    try:
        x = normalize(images, h.jobs.runner.models["demo"])
        with torch.inference_mode():
            targets = ctx.model.module(x).argmax(dim=1)
        expected = ablation_cam(ctx.model.module, ctx.taps, x, targets, "block3", top_k_channels=8)
    finally:
        ctx.taps.close()
    assert len(result.items) == 3
    for item, want, target in zip(result.items, expected, targets):
        (attribution,) = item.attributions
        assert attribution.method == pb.ABLATION_CAM and attribution.target == int(target)
        got = torch.frombuffer(bytearray(attribution.map.data), dtype=torch.float32).view(64, 64)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
