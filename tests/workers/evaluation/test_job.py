"""The evaluation job on the worker: phases, folded maps on randomized copies, cost counting, ranking, cancel."""
from __future__ import annotations

import numpy as np
import pytest

from workers.batching import FoldBudget
from workers.config import Limits, ModelConfig
from workers.errors import Cancelled
from workers.evaluation import jobspec as js
from workers.evaluation.job import run_evaluation
from workers.evaluation.localisation import boxes_to_masks
from workers.evaluation.ranking import rank_methods
from workers.models import ModelRegistry
from workers.spec import MethodParams, TargetSpec
from workers.stages import ContextCache


@pytest.fixture(scope="module")
def contexts(demo_cache_dir, demo_model):
    cache = ContextCache(ModelRegistry([ModelConfig(name="demo", source="demo")], cache_dir=demo_cache_dir),
                         FoldBudget(max_rows=32), Limits())
    yield cache.get
    cache.close()


def spec(heldout, n: int, metrics, **options) -> js.EvaluationSpec:
    images = heldout.images[:n]
    from workers.demo import to_model_space

    return js.EvaluationSpec(
        model="demo", request_id="t", inputs=to_model_space(images),
        methods=(js.EvalMethod("grad_cam@block4", "grad_cam", MethodParams(layer="block4")),
                 js.EvalMethod("vanilla", "vanilla", MethodParams())),
        metrics=tuple(metrics), target=TargetSpec(kind="indices", indices=tuple(heldout.labels[:n].tolist())),
        regions=boxes_to_masks(heldout.boxes[:n], (64, 64)), options=js.EvalOptions(curve_steps=4, **options))


def test_phases_progress_cost_and_randomized_copies(contexts, demo_heldout, one_intra_op_thread):
    seen = []
    out = run_evaluation(contexts, spec(demo_heldout, 8, [js.DELETION, js.POINTING_GAME, js.MODEL_RANDOMIZATION],
                                        randomization_modes=("cascading",)), items_per_chunk=4, progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and len(seen) == 3  # maps, deletion, cascade
    by_label = {m.label: m for m in out.methods}
    figure = by_label["vanilla"].randomization[0]
    assert figure.maps.shape[:2] == (len(figure.steps), 4) and figure.steps[0] == "trained"
    assert len(set(np.round(figure.spearman[1:], 6))) > 1  # each step's re-initialised model really ran
    assert out.backward_rows > 0 and out.forward_rows > out.backward_rows and out.floor_seconds > 0
    # Per randomized model, both methods folded into one pass over the 8 items (one row each), once.
    assert out.backward_rows == 8 * 2 * len(figure.steps)
    assert out.ranking[0] in by_label and out.ranked_by == [js.DELETION, js.POINTING_GAME]


def test_cancel_between_phases(contexts, demo_heldout):
    calls = []

    def cancelled() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        run_evaluation(contexts, spec(demo_heldout, 4, [js.DELETION, js.INSERTION, js.STABILITY]),
                       cancelled=cancelled)


def outcome(label: str, gains: dict, failed: bool = False) -> js.MethodOutcome:
    out = js.MethodOutcome(label, "vanilla", MethodParams())
    for (metric, variant), mean in gains.items():
        statistic = "hit" if metric == js.POINTING_GAME else "gain_vs_random"
        out.metrics.append(js.MetricData(metric, variant, statistic, np.zeros(1), mean, mean, mean, 0))
    if failed:
        out.metrics.append(js.MetricData(js.MODEL_RANDOMIZATION, "cascading", "spearman", np.zeros(1), 0.9, 0.9, 0.9,
                                         0, 0.5, False))
    return out


def test_ranking_is_mean_rank_with_randomization_failures_last():
    d, i, p = (js.DELETION, "zero"), (js.INSERTION, "blur"), (js.POINTING_GAME, "")
    methods = [outcome("a", {d: 0.1, i: 0.1, p: 0.5}), outcome("b", {d: 0.3, i: 0.2, p: 0.9}),
               outcome("c", {d: 0.5, i: 0.5, p: 1.0}, failed=True), outcome("d", {d: 0.3, i: float("nan"), p: 0.9})]
    ranking, recommended, used = rank_methods(methods)
    # b: ranks (2.5, 2, 2.5) -> 2.33; d: (2.5, 4, 2.5) -> 3; a: (4, 3, 4) -> 3.67; c is best but failed.
    assert ranking == ["b", "d", "a", "c"] and recommended == "b" and used == ["deletion", "insertion", "pointing_game"]
    assert rank_methods([outcome("c", {d: 0.5}, failed=True)])[1] == ""  # every method failed: none recommended
    assert rank_methods([outcome("x", {})])[1] == ""  # no ranking metric computed: none recommended
