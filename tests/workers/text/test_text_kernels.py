"""Token attributions of the text demo: the planted cue wins, Captum agrees, folding changes nothing."""
from __future__ import annotations

import pytest
import torch
from captum.attr import IntegratedGradients, LayerIntegratedGradients

from workers.batching import FoldBudget
from workers.errors import InvalidArgument
from workers.kernels.gradients import GradientLimits
from workers.text.demo import make_sentences
from workers.kernels.text_gradients import TextGradientRequest, explain_text, validate_text_request

METHODS = {"vanilla": {}, "smoothgrad": {"samples": 16, "noise_fraction": 0.1},
           "integrated_gradients": {"steps": 32}}


def _request(batch, method, **kw):
    return TextGradientRequest(ids=batch.ids, mask=batch.mask, targets=batch.labels, method=method,
                               **{**METHODS[method], **kw})


@pytest.mark.parametrize("method", list(METHODS))
def test_planted_token_gets_the_top_score(forward, sentences, method):
    (result,) = explain_text(forward, [_request(sentences, method)])
    scores = result.scores.masked_fill(sentences.mask == 0, float("-inf"))
    hits = (scores.argmax(dim=1) == sentences.cue_positions).float().mean().item()
    assert hits >= 0.95, f"{method}: the cue has the top score in {hits:.1%} of the sentences"
    assert bool((result.scores[sentences.mask == 0] == 0).all())  # padding scores nothing


@pytest.mark.parametrize("baseline", ["zero", "pad_token"])
def test_integrated_gradients_is_complete(forward, sentences, baseline):
    (result,) = explain_text(forward, [_request(sentences, "integrated_gradients", steps=64, baseline=baseline)])
    assert float(result.completeness_error_absolute.max()) < 1e-2
    assert float(result.completeness_error.median()) < 1e-2


def test_zero_baseline_matches_captum_embedding_ig(text_model, sentences):
    """Embedding-level IG from zero embeddings (Captum IntegratedGradients on f(E)), same model and rule.
    Tolerance: 1e-4 absolute on scores of order 1 (float32 reductions in another order)."""
    batch = make_sentences(24, 31_337, length=10)
    fwd = text_model.text.forward
    (ours,) = explain_text(fwd, [_request(batch, "integrated_gradients", steps=32)])
    embeds = fwd.embed(batch.ids).detach()
    ig = IntegratedGradients(fwd.logits)
    theirs = ig.attribute(embeds, baselines=torch.zeros_like(embeds), target=batch.labels, n_steps=32,
                          additional_forward_args=(batch.ids, batch.mask), method="gausslegendre").sum(dim=-1)
    assert torch.allclose(ours.scores, theirs.float(), atol=1e-4, rtol=1e-4)


def test_pad_baseline_matches_captum_layer_ig(text_model, sentences):
    """LayerIntegratedGradients at the embedding layer with the pad-id sequence as baseline.
    Tolerance: 1e-4 absolute (same path, same Gauss-Legendre points)."""
    batch = make_sentences(24, 31_337, length=10)
    module = text_model.module
    (ours,) = explain_text(text_model.text.forward,
                           [_request(batch, "integrated_gradients", steps=32, baseline="pad_token")])
    lig = LayerIntegratedGradients(lambda ids, mask: module(ids, mask), module.embedding)
    theirs = lig.attribute(batch.ids, baselines=torch.zeros_like(batch.ids), target=batch.labels,
                           additional_forward_args=(batch.mask,), n_steps=32, method="gausslegendre").sum(dim=-1)
    assert torch.allclose(ours.scores, theirs.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", list(METHODS))
def test_folded_equals_one_by_one(forward, sentences, method):
    parts = [make_sentences(5, 40 + i) for i in range(3)] + [make_sentences(4, 50, length=9)]
    reqs = [_request(b, method, seed=i) for i, b in enumerate(parts)]
    folded = explain_text(forward, reqs, FoldBudget(max_rows=7))
    for req, together in zip(reqs, folded):
        (alone,) = explain_text(forward, [req])
        assert torch.allclose(together.scores, alone.scores, atol=1e-6, rtol=1e-5)


def test_bad_requests_are_refused(sentences):
    limits = GradientLimits(max_items=256)
    bad_ids = sentences.ids.clone()
    bad_ids[0, 0] = 999
    with pytest.raises(InvalidArgument, match=r"\[0, 54\)"):
        validate_text_request(TextGradientRequest(bad_ids, sentences.mask, sentences.labels, "vanilla"), 54, 4,
                              limits)
    with pytest.raises(InvalidArgument, match="vanilla, smoothgrad, integrated_gradients"):
        validate_text_request(TextGradientRequest(sentences.ids, sentences.mask, sentences.labels, "grad_cam"), 54,
                              4, limits)
    with pytest.raises(InvalidArgument, match="PAD_TOKEN"):
        validate_text_request(TextGradientRequest(sentences.ids, sentences.mask, sentences.labels,
                                                  "integrated_gradients", baseline="black"), 54, 4, limits)
