"""RISE and XRAI as jobs over gRPC and the CLI, through the shipped server and the in-process offline
worker: the answers are the kernels' on the same inputs, progress rises, cancellation stops RISE midway,
and bad parameters are INVALID_ARGUMENT naming the field."""
from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
import torch
import torchvision.io as tvio

from service._proto import attribution_pb2 as pb
from service.cli import main
from service.codec import normalize
from tests.service.jobs.conftest import job_request
from workers.kernels.rise import rise
from workers.kernels.xrai import xrai

FINAL = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)


def watch(stub, job_id: str) -> list[pb.Job]:
    return [event.job for event in stub.WatchJob(pb.WatchJobRequest(id=job_id, include_result=True), timeout=300)]


def maps_of(job: pb.Job) -> list[tuple[int, torch.Tensor]]:
    return [(a.target, torch.frombuffer(bytearray(a.map.data), dtype=torch.float32).view(*a.map.shape))
            for item in job.result.items for a in item.attributions]


def test_rise_job_over_grpc_is_the_kernels_answer_for_every_target(start_service, demo_batch, demo_registry):
    h = start_service()
    stub, images = h.stub(), demo_batch.images[:3]
    request = job_request(images, pb.RISE, rise=pb.RiseParams(masks=40, grid=4, keep_probability=0.4))
    request.request.seed, request.request.target.top_k = 5, 2
    job = stub.SubmitJob(request, timeout=30)
    events = watch(stub, job.id)
    done = events[-1]
    assert done.state == pb.SUCCEEDED and done.method == pb.RISE and done.progress == 1.0
    progress = [j.progress for j in events if j.state == pb.RUNNING]
    assert progress == sorted(progress)
    model = demo_registry.get()
    x = normalize(images, h.jobs.runner.models["demo"])
    with torch.no_grad():
        targets = model.module(x).topk(2, dim=1).indices                     # (3, 2), best first
    expected = rise(model.module, x, targets, masks=40, grid=4, keep_probability=float(np.float32(0.4)), seed=5)
    got = maps_of(done)
    assert [t for t, _ in got] == targets.flatten().tolist()
    for (_, value), want in zip(got, expected.flatten(0, 1)):
        torch.testing.assert_close(value, want, rtol=1e-4, atol=1e-6)


def test_xrai_job_over_grpc_is_the_kernels_answer(start_service, demo_batch, demo_registry):
    h = start_service()
    stub, images = h.stub(), demo_batch.images[:2]
    job = stub.SubmitJob(job_request(images, pb.XRAI, xrai=pb.XraiParams(steps=4, segmentation_scales=[100, 500])),
                         timeout=30)
    done = watch(stub, job.id)[-1]
    assert done.state == pb.SUCCEEDED and done.method == pb.XRAI
    model = demo_registry.get()
    x = normalize(images, h.jobs.runner.models["demo"])
    with torch.no_grad():
        targets = model.module(x).argmax(dim=1)
    expected = xrai(model.module, x, targets, mean=model.spec.mean, std=model.spec.std, steps=4,
                    scales=(100.0, 500.0))
    for (target, value), want, t in zip(maps_of(done), expected, targets):
        assert target == int(t)
        torch.testing.assert_close(value, want, rtol=1e-4, atol=1e-6)


def test_a_running_rise_job_is_cancelled_between_chunks(start_service, demo_batch):
    h = start_service()
    stub = h.stub()
    job = stub.SubmitJob(job_request(demo_batch.images[:2], pb.RISE, rise=pb.RiseParams(masks=16384)), timeout=30)
    asked = False
    for event in stub.WatchJob(pb.WatchJobRequest(id=job.id), timeout=300):
        if event.job.state == pb.RUNNING and event.job.progress > 0 and not asked:
            stub.CancelJob(pb.CancelJobRequest(id=job.id), timeout=30)
            asked = True
        if event.job.state in FINAL:
            break
    assert event.job.state == pb.CANCELLED and event.job.progress < 0.5


@pytest.mark.parametrize("method, params, field", [
    (pb.RISE, dict(rise=pb.RiseParams(grid=1)), "rise.grid"),
    (pb.RISE, dict(rise=pb.RiseParams(masks=20000)), "rise.masks"),
    (pb.XRAI, dict(xrai=pb.XraiParams(segmentation_scales=[-5])), "xrai.segmentation_scales"),
])
def test_bad_parameters_are_refused_at_submit(start_service, demo_batch, method, params, field):
    stub = start_service().stub()
    with pytest.raises(grpc.RpcError) as info:
        stub.SubmitJob(job_request(demo_batch.images[:1], method, **params), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in info.value.details()


def test_cli_submits_rise_with_its_options_and_seed(start_service, demo_batch, demo_registry, tmp_path, capsys):
    h = start_service()
    path = tmp_path / "photo.png"
    pixels = (demo_batch.images[0] * 255).round().to(torch.uint8)
    path.write_bytes(tvio.encode_png(pixels).numpy().tobytes())
    out_dir = tmp_path / "maps"
    code = main(["jobs", "submit", str(path), "--method", "rise", "--masks", "32", "--grid", "4",
                 "--keep-probability", "0.25", "--seed", "3", "--target", "1", "--watch", "-o", str(out_dir),
                 "--server", h.address, "--json"])
    out, _ = capsys.readouterr()
    assert code == 0 and json.loads(out.splitlines()[-1])["state"] == "SUCCEEDED"
    (npy,) = out_dir.glob("*.npy")
    assert npy.name == "photo_rise_class1.npy"
    model = demo_registry.get()
    x = normalize(pixels[None].float() / 255, h.jobs.runner.models["demo"])
    want = rise(model.module, x, torch.tensor([1]), masks=32, grid=4, keep_probability=0.25, seed=3)[0]
    np.testing.assert_allclose(np.load(npy), want.numpy(), rtol=1e-4, atol=1e-6)
