"""The data-randomization test (Adebayo et al. 2018, section 4) end to end over real gRPC: the shipped
server serves the demo and the demo trained on shuffled labels (`shuffled_labels: true`) beside it, and
an evaluation of the demo names the second as its `shuffled_labels_model`.

The shuffled model learned nothing that links an image to its label, while the demo's maps sit on the
watermark patch: a map that explains the model must change, so Grad-CAM and IG must pass (mean Spearman
correlation between the two models' maps at or below the threshold, 0.5); a copy of the demo's own
weights in its place must make them fail.
"""
from __future__ import annotations

import math

import pytest

from service._proto import attribution_pb2 as pb
from service.backends.local import LocalBackend
from tests.service.jobs.conftest import FAST, pixels
from tests.service.jobs.test_evaluation import boxes, values, wait_final
from workers.config import ModelConfig
from workers.models import ModelRegistry
from workers.offline import LocalOfflineWorker

ITEMS = 8
LABELS = ["grad_cam@block4", "integrated_gradients"]

pytestmark = pytest.mark.slow  # trains the shuffled-labels demo once per session (tens of seconds on one core)


@pytest.fixture(scope="module")
def registry(service_cache_dir) -> ModelRegistry:
    """`demo`, `demo-shuffled` (same recipe, labels permuted) and `demo-copy` (the demo's own weights, the
    control that must fail), all loaded: trained or read from the cache."""
    registry = ModelRegistry([ModelConfig(name="demo", source="demo"),
                              ModelConfig(name="demo-shuffled", source="demo", shuffled_labels=True),
                              ModelConfig(name="demo-copy", source="demo")],
                             cache_dir=service_cache_dir)
    for name in registry.names():
        registry.get(name)
    return registry


def evaluation(batch, metrics=(pb.DATA_RANDOMIZATION,), shuffled: str = "demo-shuffled") -> pb.EvaluationRequest:
    n = ITEMS
    return pb.EvaluationRequest(
        model="demo", shuffled_labels_model=shuffled, inputs=pixels(batch.images[:n]),
        target=pb.Target(class_indices=pb.ClassIndices(indices=batch.labels[:n].tolist())),
        methods=[pb.ExplainRequest(method=pb.GRAD_CAM),
                 pb.ExplainRequest(method=pb.INTEGRATED_GRADIENTS,
                                   integrated_gradients=pb.IntegratedGradientsParams(steps=8))],
        metrics=list(metrics), regions=boxes(batch, n), options=pb.EvaluationOptions(seed=3))


def test_shuffled_labels_model_is_the_demo_recipe_with_its_labels_permuted(registry, demo_heldout):
    import torch

    from workers.demo import to_model_space

    trained, shuffled = registry.get("demo"), registry.get("demo-shuffled")
    assert trained.version != shuffled.version  # its own weights and cache file
    assert (trained.spec, trained.labels, trained.num_classes) == (shuffled.spec, shuffled.labels,
                                                                   shuffled.num_classes)
    with torch.no_grad():
        x = to_model_space(demo_heldout.images)
        right = lambda model: (model.module(x).argmax(1) == demo_heldout.labels).float().mean().item()  # noqa: E731
        assert right(trained) > 0.9 and right(shuffled) < 0.45  # 4 classes: chance is 0.25


def test_served_methods_pass_the_data_randomization_test(start_service, registry, demo_heldout):
    service = start_service(online=LocalBackend(registry), offline=LocalOfflineWorker(registry, FAST))
    stub = service.stub()
    job = stub.SubmitJob(pb.SubmitJobRequest(evaluation=evaluation(demo_heldout)), timeout=60)
    final = wait_final(stub, job.id, timeout=300)
    assert final.state == pb.SUCCEEDED, final.error
    result = final.evaluation
    assert result.model == "demo" and result.num_items == ITEMS
    assert [m.label for m in result.methods] == LABELS
    for method in result.methods:
        (rho,) = values(method, pb.DATA_RANDOMIZATION, "spearman")
        (ssim,) = values(method, pb.DATA_RANDOMIZATION, "ssim")
        assert rho.variant == "" and len(rho.per_item) == ITEMS == len(ssim.per_item)
        assert rho.missing == 0 and all(math.isfinite(v) and -1 <= v <= 1 for v in rho.per_item)
        assert rho.mean == pytest.approx(sum(rho.per_item) / ITEMS, abs=1e-5)
        assert rho.ci_low <= rho.mean <= rho.ci_high and rho.ci_low < rho.ci_high
        assert rho.reference == 0.5 and rho.passed, (method.label, rho.mean, list(rho.per_item))
        assert not ssim.HasField("passed")
        (figure,) = method.randomization
        assert figure.mode == "data" and figure.steps[0] == "trained" and len(figure.steps) == 2
        assert figure.spearman[1] == pytest.approx(rho.mean, abs=1e-5)
        print(f"{method.label}: data randomization spearman mean {rho.mean:.3f} "
              f"[{rho.ci_low:.3f}, {rho.ci_high:.3f}] per item {[round(v, 3) for v in rho.per_item]}; "
              f"ssim mean {ssim.mean:.3f}")

    # The control: a "shuffled" model that is the demo itself gives the same maps, and every method fails.
    job = stub.SubmitJob(pb.SubmitJobRequest(evaluation=evaluation(demo_heldout, shuffled="demo-copy")), timeout=60)
    final = wait_final(stub, job.id, timeout=300)
    assert final.state == pb.SUCCEEDED, final.error
    for method in final.evaluation.methods:
        (rho,) = values(method, pb.DATA_RANDOMIZATION, "spearman")
        assert rho.mean > 0.99 and rho.HasField("passed") and not rho.passed, (method.label, rho)
