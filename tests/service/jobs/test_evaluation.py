"""Evaluation jobs end to end over real gRPC: the shipped server, the in-process offline worker, the demo model.

The demo's label lives only in its watermark patch, so the patch boxes are ground truth with a known
answer: Grad-CAM and IG must point into them and beat a random order on deletion and insertion.
"""
from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from service._proto import attribution_pb2 as pb
from tests.service.jobs.conftest import pixels

ITEMS = 24
FINAL = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)


def boxes(batch, n: int) -> list[pb.Region]:
    return [pb.Region(box=pb.Box(top=int(t), left=int(l), bottom=int(b), right=int(r)))
            for t, l, b, r in batch.boxes[:n].tolist()]


def evaluation(batch, n: int = ITEMS, metrics=(pb.DELETION, pb.INSERTION, pb.POINTING_GAME, pb.MODEL_RANDOMIZATION),
               modes=("cascading",)) -> pb.EvaluationRequest:
    """Grad-CAM and IG on the first `n` demo items, their labels as targets, the patch boxes as regions."""
    return pb.EvaluationRequest(
        inputs=pixels(batch.images[:n]), target=pb.Target(class_indices=pb.ClassIndices(
            indices=batch.labels[:n].tolist())),
        methods=[pb.ExplainRequest(method=pb.GRAD_CAM),
                 pb.ExplainRequest(method=pb.INTEGRATED_GRADIENTS,
                                   integrated_gradients=pb.IntegratedGradientsParams(steps=16))],
        metrics=list(metrics), regions=boxes(batch, n),
        options=pb.EvaluationOptions(curve_steps=8, randomization_modes=list(modes), seed=7))


def wait_final(stub, job_id: str, timeout: float = 600.0) -> pb.Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = stub.GetJob(pb.GetJobRequest(id=job_id, include_result=True), timeout=30)
        if job.state in FINAL:
            return job
        time.sleep(0.1)
    raise AssertionError(f"evaluation {job_id} did not finish")


def values(method: pb.MethodEvaluation, metric: int, statistic: str) -> list[pb.MetricValue]:
    return [m for m in method.metrics if m.metric == metric and m.statistic == statistic]


def check_result(result: pb.EvaluationResult, n: int) -> None:
    assert result.model == "demo" and result.num_items == n and len(result.methods) == 2
    assert [m.label for m in result.methods] == ["grad_cam@block4", "integrated_gradients"]
    for method in result.methods:
        (hit,) = values(method, pb.POINTING_GAME, "hit")
        assert hit.mean >= 0.95 and len(hit.per_item) == n, (method.label, hit.mean)
        assert hit.passed and hit.reference == pytest.approx(144 / 4096)
        for metric in (pb.DELETION, pb.INSERTION):
            (gain,) = values(method, metric, "gain_vs_random")
            assert gain.ci_low > 0 and gain.passed and gain.reference == 0, (method.label, metric, gain)
        curves = {c.metric: c for c in method.curves}
        assert set(curves) == {pb.DELETION, pb.INSERTION}
        assert len(curves[pb.DELETION].fractions) == 9 == len(curves[pb.DELETION].random_scores)
        assert curves[pb.DELETION].baseline == "zero" and curves[pb.INSERTION].baseline == "blur"
        (figure,) = method.randomization
        assert figure.mode == "cascading" and figure.steps[0] == "trained" and figure.spearman[0] == 1.0
        steps, items, h, w = figure.maps.shape
        assert (steps, h, w) == (len(figure.steps), 64, 64) and items == 4
        maps = np.frombuffer(figure.maps.data, dtype="<f4")
        assert maps.min() >= 0 and maps.max() <= 1
        assert list(method.example_maps.shape) == [4, 64, 64] and method.seconds > 0
        (rho,) = values(method, pb.MODEL_RANDOMIZATION, "spearman")
        assert rho.reference == 0.5 and rho.HasField("passed")
    assert sorted(result.ranking) == ["grad_cam@block4", "integrated_gradients"]
    assert list(result.example_inputs.shape) == [4, 3, 64, 64]
    assert result.forward_rows > result.backward_rows > 0 and result.seconds > 0 and result.floor_seconds > 0


def test_evaluation_job_recommends_and_adoption_changes_defaults(start_service, demo_heldout, tmp_path):
    service = start_service(data_dir=tmp_path / "data")
    stub = service.stub()
    with pytest.raises(grpc.RpcError) as refused:  # nothing adopted yet: a method must be named
        stub.Explain(pb.ExplainRequest(inputs=pixels(demo_heldout.images[:1])), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "method" in refused.value.details()
    with pytest.raises(grpc.RpcError) as nothing:
        stub.AdoptRecommendation(pb.AdoptRecommendationRequest(model="demo"), timeout=30)
    assert nothing.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    submitted = stub.SubmitJob(pb.SubmitJobRequest(evaluation=evaluation(demo_heldout)), timeout=60)
    assert submitted.is_evaluation and submitted.num_items == ITEMS and submitted.method == pb.METHOD_UNSPECIFIED
    events = list(stub.WatchJob(pb.WatchJobRequest(id=submitted.id, include_result=True), timeout=600))
    final = events[-1].job
    assert final.state == pb.SUCCEEDED, final.error
    progress = [e.job.progress for e in events if e.job.state == pb.RUNNING]
    assert progress == sorted(progress) and len(set(progress)) >= 3  # reported phase by phase
    assert not final.HasField("result") and final.is_evaluation
    check_result(final.evaluation, ITEMS)
    rec = final.evaluation.recommendation
    assert rec.evaluation_job_id == final.id and rec.method in (pb.GRAD_CAM, pb.INTEGRATED_GRADIENTS)
    assert list(rec.metrics) == [pb.DELETION, pb.INSERTION, pb.POINTING_GAME] and not rec.adopted
    assert final.evaluation.ranking[0] == ("grad_cam@block4" if rec.method == pb.GRAD_CAM else "integrated_gradients")
    listed = stub.ListJobs(pb.ListJobsRequest(), timeout=30).jobs
    assert [(j.id, j.is_evaluation, j.HasField("evaluation")) for j in listed] == [(final.id, True, False)]

    info = stub.GetModel(pb.GetModelRequest(name="demo"), timeout=30)
    assert info.recommendation.evaluation_job_id == final.id and not info.recommendation.adopted
    assert info.default_method == pb.METHOD_UNSPECIFIED
    adopted = stub.AdoptRecommendation(pb.AdoptRecommendationRequest(model="demo"), timeout=30)
    assert adopted.default_method == rec.method and adopted.recommendation.adopted
    assert adopted.default_cam_layer == (rec.cam_layer or "block4")
    answer = stub.Explain(pb.ExplainRequest(inputs=pixels(demo_heldout.images[:2])), timeout=60)
    assert answer.method == rec.method and len(answer.items) == 2
    service.stop()

    again = start_service(data_dir=tmp_path / "data")  # a restart: the result and the adoption are durable
    stub = again.stub()
    kept = stub.GetJob(pb.GetJobRequest(id=final.id, include_result=True), timeout=30)
    assert kept.evaluation == final.evaluation and kept.is_evaluation
    info = stub.ListModels(pb.ListModelsRequest(), timeout=30).models[0]
    assert info.default_method == rec.method and info.recommendation.adopted
    assert stub.Explain(pb.ExplainRequest(inputs=pixels(demo_heldout.images[:1])), timeout=60).method == rec.method


def test_cancelling_a_running_evaluation_stops_it_between_steps(start_service, demo_heldout):
    stub = start_service().stub()
    heavy = evaluation(demo_heldout, 32, metrics=(), modes=("cascading", "independent"))
    heavy.methods.add(method=pb.SMOOTHGRAD, noise=pb.NoiseParams(samples=64))
    job = stub.SubmitJob(pb.SubmitJobRequest(evaluation=heavy), timeout=60)
    deadline = time.monotonic() + 300
    while (seen := stub.GetJob(pb.GetJobRequest(id=job.id), timeout=30)).progress <= 0:
        assert seen.state in (pb.QUEUED, pb.RUNNING) and time.monotonic() < deadline
        time.sleep(0.05)
    stub.CancelJob(pb.CancelJobRequest(id=job.id), timeout=60)
    final = wait_final(stub, job.id, timeout=120)
    assert final.state == pb.CANCELLED and 0 < final.progress < 1 and not final.HasField("evaluation")
    # The worker is free again: a small evaluation runs to its end.
    quick = stub.SubmitJob(pb.SubmitJobRequest(evaluation=evaluation(demo_heldout, 4, metrics=[pb.DELETION])),
                           timeout=60)
    assert wait_final(stub, quick.id).state == pb.SUCCEEDED


def test_client_helpers_and_cli_adopt(start_service, demo_heldout, capsys):
    from service.cli import main
    from service.client import AttributionClient

    service = start_service()
    with AttributionClient(service.address, timeout=60) as client:
        job = client.submit_evaluation(demo_heldout.images[:4].numpy(), methods=["grad_cam", {
            "method": "integrated_gradients", "steps": 8}], target=demo_heldout.labels[:4].tolist(),
            metrics=["deletion", "pointing_game"], boxes=demo_heldout.boxes[:4].tolist(), curve_steps=4,
            item_names=[f"item{i}.png" for i in range(4)])
        assert job.is_evaluation and list(job.item_names) == [f"item{i}.png" for i in range(4)]
        final = wait_final(client.stub, job.id)
        assert final.state == pb.SUCCEEDED and client.job(job.id, include_result=True).evaluation.num_items == 4
    assert main(["models", "--server", service.address, "adopt", "demo", "--job", job.id]) == 0
    printed = capsys.readouterr().out
    assert f"evaluation {job.id}, adopted" in printed and "default method:" in printed
    assert main(["models", "--server", service.address, "adopt", "demo", "--job", "nope"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
