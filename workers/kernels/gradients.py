"""Gradient-family attributions, folded across requests into one row tensor.

Methods and papers:
    vanilla               d f_t / d x (Simonyan et al. 2014, "Deep Inside Convolutional Networks")
    smoothgrad            E[grad] over noisy copies (Smilkov et al. 2017, "SmoothGrad")
    smoothgrad_sq         E[grad^2] over noisy copies (Hooker et al. 2019, "A Benchmark for
                          Interpretability Methods in Deep Neural Networks")
    vargrad               Var[grad] over noisy copies (Adebayo et al. 2018, "Sanity Checks for
                          Saliency Maps"; population variance E[g^2] - E[g]^2, like Captum)
    integrated_gradients  (x - b) * sum_i w_i grad f(b + a_i (x - b)) (Sundararajan et al. 2017,
                          "Axiomatic Attribution for Deep Networks")
    expected_gradients    IG from baselines drawn from a reference set, one random path point per draw
                          (Erion et al. 2021); GradientSHAP with input noise (workers/kernels/path_rows.py)
    blur_ig               the path of Gaussian blurs down to the input (Xu et al. 2020; path_rows.py)
    guided_ig             an adaptive path, walked step by step (Kapishnikov et al. 2021; guided_ig.py)

Every request becomes rows of one tensor `# (R, C, H, W)` with a target per
row: N plain inputs (vanilla), N*S noisy copies (noise family) or N*T path
points (IG). One forward and one `autograd.grad` to the rows per chunk, the
chunk size taken from the memory budget, then each request's slice of the
row gradients is reduced on its own. A request's result does not depend on
what it was folded with: its rows and its noise (from its own seeded
generator) are the same alone or folded. The path methods (IG, Blur IG,
Guided IG) also report their completeness error, from one cheap
inference-mode forward over the path endpoints.

A fold that runs in several chunks asks, before each chunk after the first,
which of its requests are still wanted (`FoldWatch`): the rows of a request
whose caller has gone are taken out of the chunks still to run, so a
SmoothGrad-256 request cancelled in its first chunk costs one chunk, not all.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from workers.batching import FoldBudget, FoldWatch, iter_chunks, probe_model, rows_per_chunk
from workers.errors import InvalidArgument
from workers.kernels import path_rows
from workers.kernels.gradient_requests import (BASELINE_METHODS, METHODS, RULES, GradientLimits,  # noqa: F401
                                               GradientRequest, request_cost, validate_gradient_request)
from workers.kernels.guided_ig import guided_ig
from workers.kernels.row_gradients import row_gradients
from workers.methods import NOISE_METHODS

__all__ = [
    "METHODS", "NOISE_METHODS", "RULES", "GradientRequest", "GradientLimits", "GradientResult",
    "request_cost", "validate_gradient_request", "smoothgrad_noise", "explain_gradients", "fold_rows",
    "integration_points",
]

# Path methods: their attributions add up to about f(x) - f(path start), and the error is reported.
PATH_METHODS = ("integrated_gradients", "blur_ig", "guided_ig")
# The relative completeness error divides by max(|f(x)_t - f(b)_t|, this): where IG
# explains a (near) zero change the relative error is huge whatever the integration,
# so the absolute error is always reported beside it and a client can tell the two apart.
COMPLETENESS_TINY = 1e-6


@dataclass
class GradientResult:
    attributions: Tensor  # (N, C, H, W) float32
    completeness_error: Tensor | None  # (N,) float32, IG only: relative, see completeness_error()
    rows: int  # folded rows this request cost (its batching cost)
    completeness_error_absolute: Tensor | None = None  # (N,) float32, IG only: |sum(a) - delta|


@functools.lru_cache(maxsize=64)
def _gauss_legendre(n: int) -> tuple[Tensor, Tensor]:
    """Gauss-Legendre nodes and weights on [-1, 1], float64 (Golub & Welsch 1969).

    The nodes are the eigenvalues of the symmetric Jacobi matrix of the Legendre
    recurrence, off-diagonal k / sqrt(4k^2 - 1); the weights are 2 v_0^2 from
    the first component of each unit eigenvector.
    """
    k = torch.arange(1, n, dtype=torch.float64)
    off = k / torch.sqrt(4.0 * k * k - 1.0)  # (n-1,)
    jacobi = torch.diag(off, 1) + torch.diag(off, -1)  # (n, n)
    nodes, vectors = torch.linalg.eigh(jacobi)  # ascending, like numpy's leggauss
    return nodes, 2.0 * vectors[0] ** 2


@functools.lru_cache(maxsize=256)
def _points_cpu(rule: str, steps: int) -> tuple[Tensor, Tensor]:
    if rule == "gauss_legendre":
        nodes, weights = _gauss_legendre(steps)
        # Mapped from [-1, 1] to [0, 1] as Captum does (weights halve).
        return (0.5 * (1.0 + nodes)).float(), (0.5 * weights).float()
    # Captum's riemann_builders, float32 linspace and all, so alphas match exactly.
    n = steps
    alphas = {
        "riemann_left": lambda: torch.linspace(0, 1 - 1 / n, n),
        "riemann_right": lambda: torch.linspace(1 / n, 1, n),
        "riemann_middle": lambda: torch.linspace(1 / (2 * n), 1 - 1 / (2 * n), n),
        "riemann_trapezoid": lambda: torch.linspace(0, 1, n),
    }[rule]()
    weights = torch.full((n,), 1 / n, dtype=torch.float64)
    if rule == "riemann_trapezoid":
        weights[0] /= 2
        weights[-1] /= 2
    return alphas.float(), weights.float()


def integration_points(rule: str, steps: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Alphas `# (T,)` in [0, 1] and weights `# (T,)` float32 for an IG rule, as Captum defines them."""
    if rule not in RULES:
        raise InvalidArgument.field("integrated_gradients.rule", f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    alphas, weights = _points_cpu(rule, int(steps))
    return alphas.to(device), weights.to(device)


def _noise_std(x: Tensor, fraction: float) -> Tensor:
    spread = x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))  # (N,)
    return (spread * fraction).view(-1, 1, 1, 1, 1)  # (N, 1, 1, 1, 1)


def _generator(req: GradientRequest) -> torch.Generator:
    return torch.Generator(device=req.inputs.device).manual_seed(req.seed)


def smoothgrad_noise(req: GradientRequest) -> Tensor:
    """The noise `# (N, S, C, H, W)` the kernel adds to `req.inputs`: N(0, std_i^2), seeded by req.seed."""
    x = req.inputs
    noise = torch.randn((x.shape[0], req.samples, *x.shape[1:]), generator=_generator(req),
                        dtype=x.dtype, device=x.device)
    return noise.mul_(_noise_std(x, req.noise_fraction))


def explain_gradients(model: nn.Module, requests: list[GradientRequest], budget: FoldBudget = FoldBudget(),
                      limits: GradientLimits = GradientLimits(),
                      num_classes: int | None = None, watch: FoldWatch | None = None) -> list[GradientResult | None]:
    """Attributions `# (N, C, H, W)` for every request, folded into shared forward/backward chunks.

    Requests are validated first (nothing runs if one is bad), then folded per
    (item shape, dtype, device) group; results come back in request order.
    The model is used as it is: eval mode and frozen parameters are the
    registry's job, and no parameter gradient is touched here.
    With `watch`, a request found dead between chunks (`watch.alive(i)` False, i its
    index in `requests`) is answered None and its remaining rows are not computed.
    """
    groups: dict[tuple, list[int]] = {}
    for index, req in enumerate(requests):
        x = req.inputs
        classes = num_classes
        if classes is None and isinstance(x, Tensor) and x.dim() == 4:
            classes = probe_model(model, tuple(x.shape[1:]), x.dtype, x.device).output_shape[-1]
        validate_gradient_request(req, classes if classes is not None else 0, limits)
        groups.setdefault((tuple(x.shape[1:]), x.dtype, x.device), []).append(index)
    results: list[GradientResult | None] = [None] * len(requests)
    # A caller inside inference_mode / no_grad still gets gradients; only the
    # row chunks record a graph, so inputs that require grad leave none behind.
    with torch.inference_mode(False), torch.no_grad():
        for indices in groups.values():
            folded = _explain_fold(model, [requests[i] for i in indices], budget, indices, watch)
            for index, result in zip(indices, folded):
                results[index] = result
    return results  # type: ignore[return-value]


def _explain_fold(model: nn.Module, requests: list[GradientRequest], budget: FoldBudget, ids: list[int],
                  watch: FoldWatch | None) -> list[GradientResult | None]:
    """One group's fold; `ids` are the requests' indices as `watch` knows them.

    Guided IG walks its path step by step (workers/kernels/guided_ig.py), every Guided IG request of the
    group in each step's fold; every other request's rows are known up front and fold together here.
    """
    guided = [k for k, req in enumerate(requests) if req.method == "guided_ig"]
    rest = [k for k in range(len(requests)) if requests[k].method != "guided_ig"]
    attributions: dict[int, Tensor] = {}
    if rest:
        folded = [requests[k] for k in rest]
        rows, row_targets, offsets = fold_rows(folded)
        grads = row_gradients(model, rows, row_targets, budget, [(ids[k], *span) for k, span in zip(rest, offsets)],
                              watch)  # (R, C, H, W)
        del rows
        for k, req, (start, stop) in zip(rest, folded, offsets):
            if watch is None or ids[k] not in watch.dropped:
                attributions[k] = _reduce(req, grads[start:stop])
        del grads
    if guided:
        walked = guided_ig(model, [requests[k].inputs for k in guided], [_baseline(requests[k]) for k in guided],
                           [requests[k].targets for k in guided], [requests[k].steps for k in guided],
                           [float(requests[k].fraction) for k in guided], budget, [ids[k] for k in guided], watch)
        attributions.update((k, a) for k, a in zip(guided, walked) if a is not None)
    complete = {k: requests[k] for k in attributions if requests[k].method in PATH_METHODS}
    endpoints = _endpoint_logits(model, complete, budget)
    results: list[GradientResult | None] = []
    for k, req in enumerate(requests):
        if k not in attributions:
            results.append(None)
            continue
        a, cost = attributions[k], request_cost(req)
        if k in endpoints:
            fx, fb = endpoints[k]
            relative, absolute = completeness_errors(a, fx - fb)
            results.append(GradientResult(a, relative, cost, absolute))
        else:
            results.append(GradientResult(a, None, cost))
    return results


def fold_rows(requests: list[GradientRequest]) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
    """Every request's rows in one tensor `# (R, C, H, W)`, targets `# (R,)`, and row spans.

    Guided IG's rows depend on its own gradients and are not laid out here (see `_explain_fold`).
    """
    first = requests[0].inputs
    if len(requests) == 1 and requests[0].method == "vanilla" and not first.is_inference():
        return first, requests[0].targets.to(first.device), [(0, first.shape[0])]  # no copy needed
    costs = [request_cost(req) for req in requests]
    rows = torch.empty((sum(costs), *first.shape[1:]), dtype=first.dtype, device=first.device)
    offsets, targets, start = [], [], 0
    for req, cost in zip(requests, costs):
        _fill_rows(req, rows[start:start + cost])  # writes in place: no per-request copy to cat
        targets.append(req.targets.to(first.device).repeat_interleave(cost // req.inputs.shape[0]))
        offsets.append((start, start + cost))
        start += cost
    return rows, torch.cat(targets), offsets  # (R, C, H, W), (R,)


def _fill_rows(req: GradientRequest, out: Tensor) -> None:
    x = req.inputs  # (N, C, H, W)
    if req.method == "vanilla":
        out.copy_(x)
    elif req.method in NOISE_METHODS:
        noisy = out.view(x.shape[0], req.samples, *x.shape[1:])  # (N, S, C, H, W)
        # Same draws and same arithmetic as smoothgrad_noise(req), then + x.
        torch.randn(noisy.shape, generator=_generator(req), out=noisy)
        noisy.mul_(_noise_std(x, req.noise_fraction)).add_(x.unsqueeze(1))
    elif req.method == "expected_gradients":
        path_rows.expected_gradients_rows(x, req.references, _draws(req), out)
    elif req.method == "blur_ig":
        path_rows.blur_ig_rows(x, req.max_sigma, req.steps, out)
    else:
        alphas, _ = integration_points(req.rule, req.steps, x.device)
        base = _baseline(req)
        path = out.view(x.shape[0], req.steps, *x.shape[1:])  # (N, T, C, H, W)
        # b + a_i (x - b), broadcast over (N, 1, C, H, W) x (1, T, 1, 1, 1). Multiply then
        # add, as Captum does: a fused addcmul rounds differently, and max-pool ties
        # turn one-ulp input differences into visibly different gradients.
        torch.mul(alphas.to(x.dtype).view(1, -1, 1, 1, 1), (x - base).unsqueeze(1), out=path)
        path.add_(base.unsqueeze(1))


def _draws(req: GradientRequest) -> path_rows.ExpectedGradientsDraws:
    return path_rows.expected_gradients_draws(req.inputs, req.references, req.samples, req.noise_stdev, req.seed)


def _baseline(req: GradientRequest) -> Tensor:
    return req.baselines if req.baselines is not None else torch.zeros_like(req.inputs)


def _endpoint_logits(model: nn.Module, requests: dict[int, GradientRequest],
                     budget: FoldBudget) -> dict[int, tuple[Tensor, Tensor]]:
    """Path methods: target logits at the path's ends, f(x)_t and f(start)_t `# (N,)` each, from one
    inference-mode forward. The start: IG's and Guided IG's baseline, Blur IG's most blurred image."""
    pieces, spans = [], {}
    start = 0
    for i, req in requests.items():
        x = req.inputs
        if req.method == "blur_ig":
            begin = path_rows.blur_ig_start(x, req.max_sigma)
        else:  # a zero baseline is one row whatever N: its logits serve every item
            begin = req.baselines if req.baselines is not None else x.new_zeros((1, *x.shape[1:]))
        pieces += [x, begin]
        spans[i] = (start, begin.shape[0])
        start += x.shape[0] + begin.shape[0]
    if not pieces:
        return {}
    ends = torch.cat(pieces)  # (E, C, H, W)
    size = rows_per_chunk(model, tuple(ends.shape[1:]), budget, device=ends.device,
                          dtype=ends.dtype, backward=False)
    with torch.inference_mode():
        logits = torch.cat([model(ends[c]) for c in iter_chunks(ends.shape[0], size)]).float()  # (E, K)
    out = {}
    for i, (start, begins) in spans.items():
        req = requests[i]
        n, t = req.inputs.shape[0], req.targets.to(logits.device)
        fx = logits[start:start + n].gather(1, t.unsqueeze(1)).squeeze(1)  # (N,)
        fb_rows = logits[start + n:start + n + begins].expand(n, -1)
        out[i] = (fx, fb_rows.gather(1, t.unsqueeze(1)).squeeze(1))
    return out


def _reduce(req: GradientRequest, grads: Tensor) -> Tensor:
    """One request's row gradients `# (cost, C, H, W)` -> its attributions `# (N, C, H, W)` float32."""
    x = req.inputs
    n, item = x.shape[0], x.shape[1:]
    if req.method == "vanilla":
        g = grads.float()
        return g.abs() if req.absolute else g
    if req.method in NOISE_METHODS:
        g = grads.float().view(n, req.samples, *item)  # (N, S, C, H, W)
        mean = g.mean(dim=1)
        if req.method == "smoothgrad":
            return mean
        if req.method == "smoothgrad_sq":
            return (g * g).mean(dim=1)
        # The population variance Captum reports, E[g^2] - E[g]^2, but taken in two
        # passes: the one-pass form cancels catastrophically when the samples nearly
        # agree (low noise), leaving rounding of g^2 in place of a variance near 0.
        return (g - mean.unsqueeze(1)).square_().mean(dim=1)
    if req.method == "expected_gradients":
        return path_rows.expected_gradients_reduce(x, req.references, _draws(req), grads)
    if req.method == "blur_ig":
        return path_rows.blur_ig_reduce(x, req.max_sigma, req.steps, grads)
    _, weights = integration_points(req.rule, req.steps, x.device)
    g = grads.float().view(n, req.steps, -1)  # (N, T, C*H*W)
    # Weighted sum over steps as a batched mat-vec: no (N, T, C*H*W) temporary.
    path_integral = torch.matmul(weights, g).view(n, *item)  # (N, C, H, W)
    return path_integral * (x - _baseline(req)).float()


def completeness_errors(attributions: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """Per item `# (N,)` float32: the relative error |sum(a) - delta| / max(|delta|, COMPLETENESS_TINY)
    and the absolute error |sum(a) - delta|.

    The relative error is always relative (it once switched silently to the absolute one below the
    guard, which the proto did not say); both are reported, so a large relative error over a tiny
    delta (a small absolute error) is told apart from a poor integration.
    """
    gap = (attributions.flatten(1).sum(dim=1) - delta).abs()  # (N,)
    return (gap / delta.abs().clamp_min(COMPLETENESS_TINY)).float(), gap.float()


def completeness_error(attributions: Tensor, delta: Tensor) -> Tensor:
    """The relative completeness error per item `# (N,)` (see `completeness_errors`)."""
    return completeness_errors(attributions, delta)[0]
