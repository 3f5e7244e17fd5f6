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

Every request becomes rows of one tensor `# (R, C, H, W)` with a target per
row: N plain inputs (vanilla), N*S noisy copies (noise family) or N*T path
points (IG). One forward and one `autograd.grad` to the rows per chunk, the
chunk size taken from the memory budget, then each request's slice of the
row gradients is reduced on its own. A request's result does not depend on
what it was folded with: its rows and its noise (from its own seeded
generator) are the same alone or folded. IG also reports its completeness
error, from one cheap inference-mode forward over the path endpoints.

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
from workers.kernels.row_gradients import row_gradients
from workers.errors import InvalidArgument
from workers.methods import GRADIENT_METHODS, NOISE_METHODS

__all__ = [
    "METHODS", "NOISE_METHODS", "RULES", "GradientRequest", "GradientLimits", "GradientResult",
    "request_cost", "validate_gradient_request", "smoothgrad_noise", "explain_gradients", "fold_rows",
    "integration_points",
]

RULES = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gauss_legendre")
METHODS = GRADIENT_METHODS  # the gradient family of the method table
# The relative completeness error divides by max(|f(x)_t - f(b)_t|, this): where IG
# explains a (near) zero change the relative error is huge whatever the integration,
# so the absolute error is always reported beside it and a client can tell the two apart.
COMPLETENESS_TINY = 1e-6


@dataclass(frozen=True)
class GradientRequest:
    """One attribution request: N items, one method, its parameters.

    inputs: `# (N, C, H, W)` model-space input on the model's device.
    targets: `# (N,)` int64 class per item.
    samples / noise_fraction: noise family; noise std is noise_fraction * (max - min) of each item.
    steps / rule / baselines: IG; baselines `# (N, C, H, W)` (see baselines.make_baseline), None = zeros.
    seed: seeds the request's own noise generator. absolute: vanilla only, |grad|.
    """

    inputs: Tensor
    targets: Tensor
    method: str
    samples: int = 32
    noise_fraction: float = 0.15
    steps: int = 32
    rule: str = "gauss_legendre"
    baselines: Tensor | None = None
    seed: int = 0
    absolute: bool = False


@dataclass
class GradientLimits:
    """Server caps per request: noisy copies, IG steps, items."""

    max_samples: int = 256
    max_steps: int = 512
    max_items: int = 64


@dataclass
class GradientResult:
    attributions: Tensor  # (N, C, H, W) float32
    completeness_error: Tensor | None  # (N,) float32, IG only: relative, see completeness_error()
    rows: int  # folded rows this request cost (its batching cost)
    completeness_error_absolute: Tensor | None = None  # (N,) float32, IG only: |sum(a) - delta|


def request_cost(req: GradientRequest) -> int:
    """Rows `req` folds into: N * samples (noise family), N * steps (IG), N (vanilla)."""
    n = int(req.inputs.shape[0])
    if req.method in NOISE_METHODS:
        return n * int(req.samples)
    if req.method == "integrated_gradients":
        return n * int(req.steps)
    return n


def _bad(field: str, description: str) -> InvalidArgument:
    return InvalidArgument.field(field, description)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_gradient_request(req: GradientRequest, num_classes: int, limits: GradientLimits) -> None:
    """Raise InvalidArgument naming the first bad field of `req`."""
    if req.method not in METHODS:
        raise _bad("method", f"unknown gradient method {req.method!r}; choose one of {', '.join(METHODS)}")
    x = req.inputs
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point() or x.shape[0] == 0:
        raise _bad("inputs", "must be a non-empty floating tensor shaped (N, C, H, W)")
    if x.shape[0] > limits.max_items:
        raise _bad("inputs", f"{x.shape[0]} items exceed the limit of {limits.max_items}")
    if not bool(torch.isfinite(x).all()):
        raise _bad("inputs", "contains NaN or Inf")
    _validate_targets(req.targets, int(x.shape[0]), num_classes)
    if not _is_int(req.seed) or not 0 <= req.seed < 2**64:
        raise _bad("seed", f"must be an integer in [0, 2^64), got {req.seed!r}")
    if req.method in NOISE_METHODS:
        _validate_noise(req, limits)
    elif req.method == "integrated_gradients":
        _validate_integrated(req, limits)


def _validate_targets(targets: Tensor, n: int, num_classes: int) -> None:
    if not isinstance(targets, Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise _bad("target", "must be an integer tensor with one class per item")
    if tuple(targets.shape) != (n,):
        raise _bad("target", f"needs one class per item: shape ({n},), got {tuple(targets.shape)}")
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= num_classes:
        raise _bad("target", f"class indices must be in [0, {num_classes}), got {low}..{high}")


def _validate_noise(req: GradientRequest, limits: GradientLimits) -> None:
    if not _is_int(req.samples) or not 1 <= req.samples <= limits.max_samples:
        raise _bad("noise.samples", f"must be in [1, {limits.max_samples}], got {req.samples!r}")
    fraction = req.noise_fraction
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 <= fraction <= 1.0:
        raise _bad("noise.noise_fraction", f"must be in [0, 1], got {fraction!r}")


def _validate_integrated(req: GradientRequest, limits: GradientLimits) -> None:
    if req.rule not in RULES:
        raise _bad("integrated_gradients.rule", f"unknown rule {req.rule!r}; choose one of {', '.join(RULES)}")
    if not _is_int(req.steps) or not 1 <= req.steps <= limits.max_steps:
        raise _bad("integrated_gradients.steps", f"must be in [1, {limits.max_steps}], got {req.steps!r}")
    if req.rule == "riemann_trapezoid" and req.steps < 2:
        raise _bad("integrated_gradients.steps", "riemann_trapezoid needs at least 2 steps")
    b = req.baselines
    if b is None:
        return
    if not isinstance(b, Tensor) or tuple(b.shape) != tuple(req.inputs.shape) or not b.is_floating_point():
        shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
        raise _bad("integrated_gradients.baseline", f"must be shaped like the inputs "
                                                    f"{tuple(req.inputs.shape)}, got {shape}")
    if b.device != req.inputs.device or not bool(torch.isfinite(b).all()):
        raise _bad("integrated_gradients.baseline", "must be finite and on the inputs' device")


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
        raise _bad("integrated_gradients.rule", f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
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
    """One group's fold; `ids` are the requests' indices as `watch` knows them."""
    rows, row_targets, offsets = fold_rows(requests)
    grads = row_gradients(model, rows, row_targets, budget, [(i, *span) for i, span in zip(ids, offsets)],
                           watch)  # (R, C, H, W)
    gone = {k for k, i in enumerate(ids) if watch is not None and i in watch.dropped}
    endpoint_logits = _endpoint_logits(model, requests, budget, skip=gone)
    return [None if i in gone else _reduce(req, grads[start:stop], endpoint_logits.get(i))
            for i, (req, (start, stop)) in enumerate(zip(requests, offsets))]


def fold_rows(requests: list[GradientRequest]) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
    """Every request's rows in one tensor `# (R, C, H, W)`, targets `# (R,)`, and row spans."""
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
    else:
        alphas, _ = integration_points(req.rule, req.steps, x.device)
        base = _baseline(req)
        path = out.view(x.shape[0], req.steps, *x.shape[1:])  # (N, T, C, H, W)
        # b + a_i (x - b), broadcast over (N, 1, C, H, W) x (1, T, 1, 1, 1). Multiply then
        # add, as Captum does: a fused addcmul rounds differently, and max-pool ties
        # turn one-ulp input differences into visibly different gradients.
        torch.mul(alphas.to(x.dtype).view(1, -1, 1, 1, 1), (x - base).unsqueeze(1), out=path)
        path.add_(base.unsqueeze(1))


def _baseline(req: GradientRequest) -> Tensor:
    return req.baselines if req.baselines is not None else torch.zeros_like(req.inputs)


def _endpoint_logits(model: nn.Module, requests: list[GradientRequest], budget: FoldBudget,
                     skip: frozenset[int] | set[int] = frozenset()) -> dict[int, tuple[Tensor, Tensor]]:
    """IG only: target logits f(x)_t and f(b)_t `# (N,)` each, from one inference-mode forward."""
    pieces, spans = [], {}
    start = 0
    for i, req in enumerate(requests):
        if req.method != "integrated_gradients" or i in skip:
            continue
        x = req.inputs
        # A zero baseline is one row whatever N: its logits serve every item.
        base = req.baselines if req.baselines is not None else x.new_zeros((1, *x.shape[1:]))
        pieces += [x, base]
        spans[i] = start
        start += x.shape[0] + base.shape[0]
    if not pieces:
        return {}
    ends = torch.cat(pieces)  # (E, C, H, W)
    size = rows_per_chunk(model, tuple(ends.shape[1:]), budget, device=ends.device,
                          dtype=ends.dtype, backward=False)
    with torch.inference_mode():
        logits = torch.cat([model(ends[c]) for c in iter_chunks(ends.shape[0], size)]).float()  # (E, K)
    out = {}
    for i, start in spans.items():
        req = requests[i]
        n, t = req.inputs.shape[0], req.targets.to(logits.device)
        fx = logits[start:start + n].gather(1, t.unsqueeze(1)).squeeze(1)  # (N,)
        fb_rows = logits[start + n:start + 2 * n] if req.baselines is not None else logits[start + n].expand(n, -1)
        out[i] = (fx, fb_rows.gather(1, t.unsqueeze(1)).squeeze(1))
    return out


def _reduce(req: GradientRequest, grads: Tensor, endpoints: tuple[Tensor, Tensor] | None) -> GradientResult:
    """One request's row gradients `# (cost, C, H, W)` -> its attributions `# (N, C, H, W)` float32."""
    x = req.inputs
    n, item = x.shape[0], x.shape[1:]
    cost = grads.shape[0]
    if req.method == "vanilla":
        g = grads.float()
        return GradientResult(g.abs() if req.absolute else g, None, cost)
    if req.method in NOISE_METHODS:
        g = grads.float().view(n, req.samples, *item)  # (N, S, C, H, W)
        mean = g.mean(dim=1)
        if req.method == "smoothgrad":
            return GradientResult(mean, None, cost)
        if req.method == "smoothgrad_sq":
            return GradientResult((g * g).mean(dim=1), None, cost)
        # The population variance Captum reports, E[g^2] - E[g]^2, but taken in two
        # passes: the one-pass form cancels catastrophically when the samples nearly
        # agree (low noise), leaving rounding of g^2 in place of a variance near 0.
        return GradientResult((g - mean.unsqueeze(1)).square_().mean(dim=1), None, cost)
    _, weights = integration_points(req.rule, req.steps, x.device)
    g = grads.float().view(n, req.steps, -1)  # (N, T, C*H*W)
    # Weighted sum over steps as a batched mat-vec: no (N, T, C*H*W) temporary.
    path_integral = torch.matmul(weights, g).view(n, *item)  # (N, C, H, W)
    attributions = path_integral * (x - _baseline(req)).float()
    fx, fb = endpoints  # type: ignore[misc]
    relative, absolute = completeness_errors(attributions, fx - fb)
    return GradientResult(attributions, relative, cost, absolute)


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
