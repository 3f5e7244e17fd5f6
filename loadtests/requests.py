"""A scenario's requests, encoded once: the payloads the load generators send, and their schedule.

`encode_requests(scenario, models)` builds every mix entry's `variants` requests for the models the
server describes (synthetic images, seeded), serialized once, plus the weighted schedule that
`PreparedScenario.next()` walks; sending then costs no protobuf encoding.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from loadtests.scenario import (CAM_METHODS, DTYPES, NOISE_METHODS, NORMALIZATIONS, ONLINE_METHODS, REDUCTIONS,
                                MixEntry, Scenario, check)
from service._proto import attribution_pb2 as pb

SCHEDULE_LENGTH = 1000


@dataclass
class PreparedEntry:
    """One mix entry, ready to send: serialized requests and their gRPC timeout."""

    entry: MixEntry
    payloads: list[bytes]
    timeout_s: float | None


@dataclass
class PreparedScenario:
    """Everything the loader sends, encoded once; `next()` is a list lookup."""

    scenario: Scenario
    entries: list[PreparedEntry]
    schedule: list[int]            # entry index per slot, shuffled, weights exact
    _cursor: int = 0

    def next(self) -> tuple[int, bytes, float | None]:
        """(entry index, request bytes, timeout) of the next request in the mix."""
        slot = self._cursor
        self._cursor += 1
        index = self.schedule[slot % len(self.schedule)]
        prepared = self.entries[index]
        # Variants cycle independently of the mix, so every (entry, variant) pair recurs.
        return index, prepared.payloads[slot % len(prepared.payloads)], prepared.timeout_s

    @property
    def max_timeout_s(self) -> float | None:
        timeouts = [e.timeout_s for e in self.entries]
        return None if None in timeouts else max(timeouts)  # type: ignore[type-var]


def encode_requests(scenario: Scenario, models: dict[str, pb.ModelInfo]) -> PreparedScenario:
    """Serializes `variants` requests per entry against the server's models (by name; "" = default)."""
    rng = np.random.default_rng(scenario.seed)
    entries = []
    for i, entry in enumerate(scenario.mix):
        info = models.get(entry.model) if entry.model else next((m for m in models.values() if m.is_default), None)
        check(info is not None, f"mix[{i}].model",
               f"the server has no model {entry.model or '(default)'!r}; it has {sorted(models)}")
        payloads = [_request(entry, info, rng, f"lt-{scenario.name}-{i}-{v}",  # type: ignore[arg-type]
                             scenario.seed + v, f"mix[{i}]").SerializeToString() for v in range(scenario.variants)]
        timeout = entry.deadline_ms / 1e3 if entry.deadline_ms else None
        entries.append(PreparedEntry(entry, payloads, timeout))
    return PreparedScenario(scenario, entries, mix_schedule(scenario))


def mix_schedule(scenario: Scenario) -> list[int]:
    """Entry indices in proportion to the weights (largest remainder), shuffled with the seed."""
    weights = np.array([e.weight for e in scenario.mix], dtype=float)
    share = weights / weights.sum() * SCHEDULE_LENGTH
    counts = np.floor(share).astype(int)
    for j in np.argsort(-(share - counts))[:SCHEDULE_LENGTH - counts.sum()]:
        counts[j] += 1
    schedule = [i for i, c in enumerate(counts) for _ in range(c)]
    random.Random(scenario.seed).shuffle(schedule)
    return schedule


def _request(entry: MixEntry, info: pb.ModelInfo, rng: np.random.Generator, request_id: str, seed: int,
             path: str) -> pb.ExplainRequest:
    if info.modality == pb.TEXT:
        return _text_request(entry, info, rng, request_id, seed, path)
    spec = info.input_spec
    height, width = entry.image.height or spec.height, entry.image.width or spec.width
    if entry.image.encoding == "tensor":
        check((height, width) == (spec.height, spec.width), f"{path}.image",
               f"{height}x{width} tensors do not fit model {info.name!r} ({spec.height}x{spec.width}); "
               "use encoding: png to have the server resize, or leave the size at 0")
    pixels = synthetic_images(rng, entry.items, spec.channels, height, width)  # (N, C, H, W) uint8
    request = pb.ExplainRequest(request_id=request_id, model=info.name, method=ONLINE_METHODS[entry.method],
                                seed=seed, output=pb.OutputOptions(dtype=DTYPES[entry.output.dtype],
                                reduction=REDUCTIONS[entry.output.reduction],
                                normalization=NORMALIZATIONS[entry.output.normalization]))
    if entry.image.encoding == "tensor":
        request.inputs.tensor.CopyFrom(pb.Tensor(data=pixels.tobytes(), dtype=pb.UINT8, shape=list(pixels.shape),
                                                 layout=pb.NCHW))
        request.inputs.space = pb.PIXELS
    else:
        request.inputs.images.images.extend(_png(item) for item in pixels)
    _set_params(request, entry)
    return request


def _text_request(entry: MixEntry, info: pb.ModelInfo, rng: np.random.Generator, request_id: str, seed: int,
                  path: str) -> pb.ExplainRequest:
    """A text model's request: `items` sequences of `tokens` random ids (seeded) from its vocabulary."""
    text = info.text_spec
    length = entry.tokens or min(16, text.max_length)
    check(length <= text.max_length, f"{path}.tokens", f"{length} tokens exceed model {info.name!r}'s max_length "
                                                       f"{text.max_length}")
    request = pb.ExplainRequest(request_id=request_id, model=info.name, method=ONLINE_METHODS[entry.method],
                                seed=seed, output=pb.OutputOptions(normalization=NORMALIZATIONS[
                                    entry.output.normalization]))
    ids = rng.integers(0, text.vocab_size, size=(entry.items, length))
    request.inputs.tokens.sequences.extend(pb.TokenSequence(ids=row.tolist()) for row in ids)
    _set_params(request, entry)
    return request


def _set_params(request: pb.ExplainRequest, entry: MixEntry) -> None:
    if entry.method in NOISE_METHODS:
        request.noise.CopyFrom(pb.NoiseParams(samples=entry.samples))
        if entry.noise_fraction:  # 0 in a scenario = the server's default; the field is optional on the wire
            request.noise.noise_fraction = entry.noise_fraction
    elif entry.method == "integrated_gradients":
        request.integrated_gradients.CopyFrom(pb.IntegratedGradientsParams(steps=entry.steps))
    elif entry.method == "expected_gradients":  # from the model's reference set
        request.expected_gradients.CopyFrom(pb.ExpectedGradientsParams(samples=entry.samples))
    elif entry.method == "blur_ig":
        request.blur_ig.CopyFrom(pb.BlurIgParams(steps=entry.steps))
    elif entry.method == "guided_ig":
        request.guided_ig.CopyFrom(pb.GuidedIgParams(steps=entry.steps))
    elif entry.method in CAM_METHODS:
        request.cam.CopyFrom(pb.CamParams(layer=entry.layer))


def synthetic_images(rng: np.random.Generator, n: int, channels: int, height: int, width: int) -> np.ndarray:
    """Smooth random images `# (N, C, H, W)` uint8: coarse noise upsampled plus fine grain.

    Smooth rather than white noise so PNGs compress like photos do and the
    model's predictions vary from image to image.
    """
    coarse = rng.random((n, channels, 8, 8))
    rows, cols = np.linspace(0, 7, height), np.linspace(0, 7, width)
    r0, c0 = np.floor(rows).astype(int).clip(0, 6), np.floor(cols).astype(int).clip(0, 6)
    fr, fc = (rows - r0)[:, None], (cols - c0)[None, :]
    top = coarse[:, :, r0][:, :, :, c0] * (1 - fc) + coarse[:, :, r0][:, :, :, c0 + 1] * fc
    bottom = coarse[:, :, r0 + 1][:, :, :, c0] * (1 - fc) + coarse[:, :, r0 + 1][:, :, :, c0 + 1] * fc
    smooth = top * (1 - fr) + bottom * fr  # (N, C, H, W) in [0, 1]
    grain = rng.normal(0.0, 0.03, smooth.shape)
    return np.clip((smooth + grain) * 255.0, 0, 255).astype(np.uint8)


def _png(item: np.ndarray) -> bytes:
    """One `# (C, H, W)` uint8 item as PNG bytes."""
    import torch
    import torchvision.io as tvio

    return bytes(tvio.encode_png(torch.from_numpy(np.ascontiguousarray(item))).numpy().tobytes())

