"""The peer to beat: the Explain service a team would write without us, Captum and pytorch-grad-cam per request.

Same proto, same model (built from the same ModelConfig and seed by
workers.models.load_model), same request validation and response encoding
(service.validation / service.codec), so the only difference under load is the
compute path: one library call per request, no cross-request batching, no
folding of CAM variants into one pass.

How a careful team would run these libraries, and so how this peer does:
- One compute thread. pytorch-grad-cam registers its hooks on the shared model
  per CAM object, and Captum's NoiseTunnel draws from torch's global generator,
  so concurrent calls would capture each other's activations and noise. The
  thread uses every core torch is given (`num_cpus` of the model's config,
  like our replica).
- Frozen weights, inputs that require grad: pytorch-grad-cam then backpropagates
  to the input without computing any weight gradient.

Definition differences from our kernels (tests/loadtests/test_peer_baseline.py
checks the maps agree up to these):
- CAM maps come back min-max normalized per map at the layer's resolution and
  then resized (pytorch-grad-cam's `scale_cam_image`); ours are raw unless the
  request asks for a normalization. Compare after MIN_MAX.
- SmoothGrad noise comes from torch's global generator seeded with the request
  seed (Captum's draws), not from our per-request generator: same
  distribution, different draws. The noise std is `noise_fraction` times the
  value range of the whole request (Captum takes one std per input tensor);
  ours is per item, identical for one-item requests.
- No native-resolution CAM maps.

Run it: `python -m loadtests.peer_baseline --port 50052 --config FILE` (an
AppConfig YAML: models, ...), or `await start_peer(config)` in-process.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import pathlib
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch
# Test-only dependencies of the project (pyproject's `test` extra): the peer exists to be measured.
from captum.attr import IntegratedGradients, NoiseTunnel, Saliency
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from service import codec, errors
from service.model_info import model_info
from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc
from service.config import Limits
from service.validation import resolve_model, validate_explain
from service.settings import ServiceConfig
from workers.serve.app import AppConfig

from workers.errors import DeadlineExceeded
from workers.kernels.baselines import make_baseline
from workers.models import LoadedModel, describe, load_model, select_device
from workers.postprocess import finish_maps
from workers.spec import (CAM_METHODS, NOISE_METHODS, AttributionMap, ExplainResult, ExplainSpec,
                          ItemExplanation)

log = logging.getLogger(__name__)

TOP_PREDICTIONS = 5
_IG_RULES = {"gauss_legendre": "gausslegendre", "riemann_left": "riemann_left", "riemann_right": "riemann_right",
             "riemann_middle": "riemann_middle", "riemann_trapezoid": "riemann_trapezoid"}
_TINY = 1e-6


# ------------------------------------------------------------------ compute --

def explain_one(model: LoadedModel, spec: ExplainSpec) -> ExplainResult:
    """One request, the library way: a prediction forward, then one Captum / grad-cam call."""
    started = time.perf_counter()
    x = spec.inputs.to(model.device)                                      # (N, C, H, W)
    with torch.inference_mode():
        probs = torch.softmax(model.module(x).float(), dim=1)             # (N, classes)
    targets, k = _targets(spec, probs, model.num_classes)                 # (N*k,)
    rows = x if k == 1 else x.repeat_interleave(k, dim=0)                 # (N*k, C, H, W)
    completeness = None
    if spec.method in CAM_METHODS:
        maps = _cam_maps(model, spec, rows, targets)
    else:
        attributions, completeness = _captum(model, spec, rows, targets)
        maps = {spec.method: finish_maps(attributions, spec.output.reduction, spec.output.normalization)}
    compute_ms = (time.perf_counter() - started) * 1e3
    return _assemble(model, spec, probs, targets, k, maps, completeness, compute_ms)


def _targets(spec: ExplainSpec, probs: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, int]:
    target, n = spec.target, spec.items
    if target.kind == "top_k":
        k = min(target.k, num_classes)
        return probs.topk(k, dim=1).indices.reshape(-1), k
    if target.kind == "indices":
        idx = torch.tensor(target.indices, dtype=torch.long, device=probs.device)
        return (idx.expand(n) if idx.numel() == 1 else idx), 1
    return probs.argmax(dim=1), 1


def _captum(model: LoadedModel, spec: ExplainSpec, x: torch.Tensor,
            targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Captum attributions `# (M, C, H, W)` and, for IG, the relative completeness error `# (M,)`."""
    p, net = spec.params, model.module
    if spec.method == "vanilla":
        return Saliency(net).attribute(x, target=targets, abs=p.absolute), None
    if spec.method in NOISE_METHODS:
        stdev = float(p.noise_fraction * (x.max() - x.min()))
        torch.manual_seed(spec.seed % 2**63)  # Captum draws from the global generator; one compute thread
        attributions = NoiseTunnel(Saliency(net)).attribute(x, nt_type=spec.method, nt_samples=p.samples,
                                                            stdevs=stdev, target=targets, abs=False)
        return attributions, None
    custom = None if p.baseline_tensor is None else p.baseline_tensor.to(x.device)
    if custom is not None and custom.shape[0] not in (1, x.shape[0]):
        custom = custom.repeat_interleave(x.shape[0] // custom.shape[0], dim=0)
    baselines = make_baseline(p.baseline, x, mean=model.spec.mean, std=model.spec.std, seed=spec.seed,
                              blur_sigma=p.blur_sigma, custom=custom)
    attributions, delta = IntegratedGradients(net).attribute(
        x, baselines=baselines, target=targets, n_steps=p.steps, method=_IG_RULES[p.rule],
        return_convergence_delta=True)
    with torch.inference_mode():
        gap = (net(x).gather(1, targets[:, None]) - net(baselines).gather(1, targets[:, None])).squeeze(1).float()
    delta = delta.detach().abs().float()
    relative = torch.where(gap.abs() > _TINY, delta / gap.abs().clamp_min(_TINY), delta)
    return attributions.detach(), relative.cpu()


def _cam_maps(model: LoadedModel, spec: ExplainSpec, x: torch.Tensor,
              targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """pytorch-grad-cam maps `# (M, H, W)`, one library call (forward + backward) per variant."""
    classes = {"grad_cam": GradCAM, "grad_cam_plus_plus": GradCAMPlusPlus, "layer_cam": LayerCAM}
    layer = model.layer(spec.params.layer or model.default_cam_layer)
    wanted = [ClassifierOutputTarget(int(t)) for t in targets.tolist()]
    maps = {}
    for variant in (spec.method,) + tuple(v for v in spec.params.also if v != spec.method):
        # The `with` releases the CAM object's hooks even when the call fails.
        with classes[variant](model=model.module, target_layers=[layer]) as cam:
            grayscale = cam(input_tensor=x.detach().clone().requires_grad_(True), targets=wanted)  # (M, H, W)
        maps[variant] = finish_maps(torch.from_numpy(grayscale), "none", spec.output.normalization)
    return maps


def _assemble(model: LoadedModel, spec: ExplainSpec, probs: torch.Tensor, targets: torch.Tensor, k: int,
              maps: dict[str, torch.Tensor], completeness: torch.Tensor | None, compute_ms: float) -> ExplainResult:
    top = probs.topk(min(TOP_PREDICTIONS, model.num_classes), dim=1)
    rows = torch.arange(spec.items, device=probs.device).repeat_interleave(k)
    scores = probs[rows, targets].tolist()
    target_list = targets.tolist()
    items = []
    for i in range(spec.items):
        attributions = [AttributionMap(method=method, target=target_list[r], target_score=scores[r], map=m[r],
                                       completeness_error=None if completeness is None else float(completeness[r]))
                        for r in range(i * k, (i + 1) * k) for method, m in maps.items()]
        items.append(ItemExplanation(top.indices[i].tolist(), top.values[i].tolist(), attributions))
    return ExplainResult(request_id=spec.request_id, model=model.name, model_version=model.version,
                         method=spec.method, items=items, compute_ms=compute_ms, batch_samples=spec.cost,
                         batch_requests=1)


# ------------------------------------------------------------------ service --

class PeerServicer(pb_grpc.AttributionServiceServicer):
    """Explain, ListModels and GetModel; every other RPC answers UNIMPLEMENTED (the generated default)."""

    def __init__(self, models: dict[str, LoadedModel], default: str, limits: Limits, threads: int):
        self._models = models
        self._described = {name: describe(m, is_default=name == default) for name, m in models.items()}
        self._limits = limits
        # Set where the work runs, once: the same intra-op thread count as our replica.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peer-compute",
                                        initializer=torch.set_num_threads, initargs=(threads,))

    def _compute(self, spec: ExplainSpec, submitted: float) -> ExplainResult:
        queue_ms = (time.perf_counter() - submitted) * 1e3
        if spec.deadline is not None and time.time() > spec.deadline:
            raise DeadlineExceeded("the deadline passed while the request waited for the compute thread")
        result = explain_one(self._models[spec.model], spec)
        result.queue_ms = queue_ms
        return result

    async def Explain(self, request: pb.ExplainRequest, context) -> pb.ExplainResponse:
        started = time.perf_counter()
        try:
            model = resolve_model(request.model, self._described)
            spec = validate_explain(request, model, self._limits, time_remaining=context.time_remaining())
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._pool, self._compute, spec, time.perf_counter())
            response = codec.encode_result(result, spec, model)
        except Exception as exc:  # typed errors keep their status; anything else is INTERNAL
            await errors.abort_with(context, exc)
        response.timings.total_ms = (time.perf_counter() - started) * 1e3
        return response

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_info(m, self._limits) for m in self._described.values()])

    async def GetModel(self, request, context) -> pb.ModelInfo:
        try:
            return model_info(resolve_model(request.name, self._described), self._limits)
        except Exception as exc:
            await errors.abort_with(context, exc)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@dataclass
class RunningPeer:
    server: grpc.aio.Server
    servicer: PeerServicer
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float = 5.0) -> None:
        await self.server.stop(grace)
        await asyncio.to_thread(self.servicer.close)


async def start_peer(config: AppConfig, host: str = "127.0.0.1", port: int = 0, limits: Limits | None = None,
                     threads: int = 0) -> RunningPeer:
    """Loads every configured model and starts serving; port 0 takes a free one (RunningPeer.port)."""
    device = select_device(config.device)
    cache = pathlib.Path(config.cache_dir) if config.cache_dir else None
    models = {cfg.name: await asyncio.to_thread(load_model, cfg, device, cache) for cfg in config.models}
    threads = threads or max(1, int(config.model(config.default).num_cpus))
    servicer = PeerServicer(models, config.default, limits or Limits(), threads)
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 << 20),
                                      ("grpc.max_receive_message_length", 64 << 20), ("grpc.so_reuseport", 0)])
    pb_grpc.add_AttributionServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    log.info("peer baseline serving %s on %s:%d (%d torch threads)", list(models), host, bound, threads)
    return RunningPeer(server, servicer, bound)


async def _serve(args: argparse.Namespace) -> None:
    config = ServiceConfig.load(args.config).app
    peer = await start_peer(config, args.host, args.port, threads=args.threads)
    if args.ready_file:
        pathlib.Path(args.ready_file).write_text(json.dumps({"port": peer.port, "pid": os.getpid()}))
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await peer.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.peer_baseline", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50052)
    parser.add_argument("--config", help="AppConfig YAML/JSON (models, device); default: the demo model")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = the model's num_cpus")
    parser.add_argument("--ready-file", help="write {port, pid} here once serving (for orchestration)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
