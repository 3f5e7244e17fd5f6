"""The embedded default model: a tiny CNN with a known answer.

Synthetic images carry their label ONLY in a planted "watermark" patch (a
black-and-white stripe or dot pattern) beside larger, colourful distractor
"objects" drawn independently of the label: the shortcut story in miniature.
The known patch location makes attribution testable (pointing game: the argmax
of a saliency map falls inside the patch). Deterministic from `DemoConfig.seed`
(explicit `torch.Generator`s, never the global RNG), trained in seconds on a
CPU, cached as a `weights_only` checkpoint keyed by config and RECIPE_VERSION.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import tempfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.demo_net import DemoNet  # noqa: F401  (re-exported: the demo's network)
from workers.errors import InvalidArgument

log = logging.getLogger(__name__)

# Bump whenever the data set, the net or the training loop change in a way
# that changes the weights: it is part of the cache key.
RECIPE_VERSION = 1

# The watermark-free training scenes come from seed + this offset: far from
# the small seeds that held-out sets use, whose scenes would otherwise repeat.
_BLANK_SEED_OFFSET = 1_000_003
# A shuffled-labels model's permutation comes from seed + this offset: its own stream, not the data's.
_SHUFFLE_SEED_OFFSET = 2_000_003

# Pixel-space statistics of the synthetic images (over 4096 images, rounded): the net consumes (x - mean) / std.
DEMO_MEAN: tuple[float, float, float] = (0.48, 0.48, 0.48)
DEMO_STD: tuple[float, float, float] = (0.18, 0.18, 0.18)

# Class names say what the label really is: the watermark pattern.
DEMO_LABELS: tuple[str, ...] = ("stripes-horizontal", "stripes-vertical", "dots", "stripes-diagonal")

# CAM-able layers (names in `dict(model.named_modules())`): 16x16 maps for a 64x64 input
# (4 px cells), fine enough to localize the 12 px patch. The default is the last conv map.
DEMO_CAM_LAYERS: tuple[str, ...] = ("block3", "block4")
DEMO_CAM_LAYER = "block4"


@dataclass(frozen=True)
class DemoConfig:
    """Recipe of the demo model; every field is part of `cache_key()`.

    image_size: side of the square images (px), >= 32 and a multiple of 4.
    num_classes: 2..len(DEMO_LABELS); class k is watermark pattern k.
    patch_size: side of the watermark patch (px), 8..16 and even.
    train_size: number of training images (>= 64).
    epochs: passes over the training set (>= 1).
    seed: drives data, initialization and shuffling.
    batch_size, lr: Adam mini-batch size and peak learning rate.
    train_noise: std (pixel space) of Gaussian noise added to training batches,
        so the net stays confident under SmoothGrad's noise.
    blank_fraction: watermark-free training scenes (uniform target) per watermarked one.
    shuffle_labels: train on the targets randomly permuted over the training set (the permutation
        drawn from `seed`): the model of the data-randomization test (Adebayo et al. 2018, section 4),
        same net and recipe with no link left between an image and its label. Left out of
        `cache_key()` while False, so the ordinary demo's cache file keeps its name.
    """

    image_size: int = 64
    num_classes: int = 4
    patch_size: int = 12
    train_size: int = 2048
    epochs: int = 5
    seed: int = 0
    batch_size: int = 32
    lr: float = 1e-2
    train_noise: float = 0.2
    blank_fraction: float = 0.25
    shuffle_labels: bool = False

    def __post_init__(self) -> None:
        checks = [  # (field, ok, how to fix)
            ("image_size", self.image_size >= 32 and self.image_size % 4 == 0, "must be >= 32 and a multiple of 4"),
            ("num_classes", 2 <= self.num_classes <= len(DEMO_LABELS), f"must be in 2..{len(DEMO_LABELS)}"),
            ("patch_size", 8 <= self.patch_size <= 16 and self.patch_size % 2 == 0, "must be even, in 8..16"),
            ("train_size", self.train_size >= 64, "must be >= 64"),
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("lr", self.lr > 0, "must be > 0"),
            ("train_noise", self.train_noise >= 0, "must be >= 0"),
            ("blank_fraction", 0 <= self.blank_fraction <= 1, "must be in [0, 1]"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise InvalidArgument.field(f"DemoConfig.{name}", why)

    def cache_key(self) -> str:
        """Short stable hash of the recipe (config fields + RECIPE_VERSION)."""
        fields = dataclasses.asdict(self)
        if not self.shuffle_labels:
            del fields["shuffle_labels"]
        blob = json.dumps({"recipe": RECIPE_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class WatermarkBatch:
    """A synthetic batch with its ground truth.

    images: float32 (N, 3, H, W), pixel space in [0, 1].
    labels: int64 (N,), the watermark class.
    boxes: int64 (N, 4) as (top, left, bottom, right); bottom/right exclusive.
    """

    images: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) pixel space -> the net's input space, (x - mean) / std."""
    mean = torch.tensor(DEMO_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(DEMO_STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def watermark_template(label: int, size: int, border: int = 2) -> torch.Tensor:
    """The (size, size) pattern of class `label`: 0/1 inside, 0.5 on the border.

    Stripes and dots of period 4 px: high-frequency and achromatic, so
    nothing in the smooth background or the solid colour distractors looks
    like them. The mid-grey plate border is where the conv receptive fields
    straddling the pattern's edge spill their gradient, so it keeps that halo
    inside the patch box rather than on the background around it.
    """
    i = torch.arange(size).view(-1, 1)
    j = torch.arange(size).view(1, -1)
    patterns = {
        0: (i // 2) % 2 + 0 * j,
        1: (j // 2) % 2 + 0 * i,
        2: ((i // 2) % 2) * ((j // 2) % 2),
        3: ((i + j) // 2) % 2,
    }
    if label not in patterns:
        raise InvalidArgument.field("label", f"must be in 0..{len(patterns) - 1}, got {label}")
    template = patterns[label].to(torch.float32)
    inner = (i >= border) & (i < size - border) & (j >= border) & (j < size - border)
    return torch.where(inner, template, torch.full_like(template, 0.5))


def make_watermark_dataset(n: int, seed: int, config: DemoConfig = DemoConfig()) -> WatermarkBatch:
    """`n` synthetic images, a pure function of (n, seed, config).

    Drawing order: labels and patch boxes, then background, then distractors
    (which avoid the patch box), then the watermark stamped on top.
    """
    if n < 1:
        raise InvalidArgument.field("n", f"must be >= 1, got {n}")
    return _synthesize(n, seed, config, watermark=True)


def _synthesize(n: int, seed: int, config: DemoConfig, watermark: bool) -> WatermarkBatch:
    """The scenes of `make_watermark_dataset`; without `watermark` nothing is
    stamped (labels and boxes are drawn, and mean nothing)."""
    gen = torch.Generator().manual_seed(int(seed))
    size, p = config.image_size, config.patch_size
    labels = torch.randint(0, config.num_classes, (n,), generator=gen)
    tops = torch.randint(0, size - p + 1, (n,), generator=gen)
    lefts = torch.randint(0, size - p + 1, (n,), generator=gen)
    boxes = torch.stack([tops, lefts, tops + p, lefts + p], dim=1)
    images = _background(n, size, gen)
    count = torch.randint(2, 4, (n,), generator=gen)  # 2 or 3 distractors per image
    for slot in range(3):
        _paint_distractor(images, boxes, count > slot, gen)
    if watermark:
        _stamp_watermarks(images, labels, boxes, p, gen)
    return WatermarkBatch(images.clamp_(0.0, 1.0), labels, boxes)


def _background(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """(N, 3, S, S) smooth colour clouds + mid-frequency texture + pixel noise."""
    coarse = torch.rand(n, 3, 5, 5, generator=gen) * 0.5 + 0.25
    mid = torch.rand(n, 1, size // 4, size // 4, generator=gen) - 0.5
    images = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)
    images += 0.12 * F.interpolate(mid, size=(size, size), mode="bilinear", align_corners=False)
    images += 0.03 * torch.randn(n, 3, size, size, generator=gen)
    return images


def _uniform_int(lo: torch.Tensor, hi: torch.Tensor, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Integers uniform in [lo, hi] (inclusive, broadcast per row), int64 `shape`."""
    return (lo + torch.rand(shape, generator=gen) * (hi - lo + 1)).floor().long().clamp(max=hi)


def _paint_distractor(images: torch.Tensor, boxes: torch.Tensor, active: torch.Tensor,
                      gen: torch.Generator, tries: int = 24, max_overlap: float = 0.15) -> None:
    """Paint one solid saturated ellipse / rectangle / diamond per active image, in place.

    Each is 14-26 px across (bigger than the patch) at a position whose
    bounding box covers at most `max_overlap` of the patch box; the first of
    `tries` candidates that fits wins, and an image with none gets no shape.
    """
    n, _, size, _ = images.shape
    ry = torch.randint(7, 14, (n, 1), generator=gen)
    rx = (ry * (0.6 + 0.4 * torch.rand(n, 1, generator=gen))).round().long()
    cy = _uniform_int(ry, size - 1 - ry, (n, tries), gen)  # (N, T)
    cx = _uniform_int(rx, size - 1 - rx, (n, tries), gen)
    inter_h = (torch.minimum(cy + ry + 1, boxes[:, 2:3]) - torch.maximum(cy - ry, boxes[:, 0:1])).clamp(min=0)
    inter_w = (torch.minimum(cx + rx + 1, boxes[:, 3:4]) - torch.maximum(cx - rx, boxes[:, 1:2])).clamp(min=0)
    patch_area = (boxes[:, 2:3] - boxes[:, 0:1]) * (boxes[:, 3:4] - boxes[:, 1:2])
    fits = inter_h * inter_w <= max_overlap * patch_area  # (N, T)
    first = fits.long().argmax(dim=1, keepdim=True)  # index of the first fitting try
    cy, cx = cy.gather(1, first), cx.gather(1, first)  # (N, 1)
    shape = torch.randint(0, 3, (n, 1, 1), generator=gen)
    colour = torch.rand(n, 3, generator=gen)
    lo, hi = colour.min(1, keepdim=True).values, colour.max(1, keepdim=True).values
    colour = (colour - lo) / (hi - lo + 1e-6)  # saturated: one channel 0, one 1
    colour = colour * (0.6 + 0.4 * torch.rand(n, 1, generator=gen))

    grid = torch.arange(size, dtype=torch.float32)
    dy = (grid.view(1, -1, 1) - cy.view(-1, 1, 1)) / ry.view(-1, 1, 1)  # (N, S, 1)
    dx = (grid.view(1, 1, -1) - cx.view(-1, 1, 1)) / rx.view(-1, 1, 1)  # (N, 1, S)
    ellipse = dy**2 + dx**2 <= 1.0
    rectangle = (dy.abs() <= 1.0) & (dx.abs() <= 1.0)
    diamond = dy.abs() + dx.abs() <= 1.0
    mask = torch.where(shape == 0, ellipse, torch.where(shape == 1, rectangle, diamond))  # (N, S, S)
    mask &= (fits.any(dim=1) & active).view(-1, 1, 1)
    images.copy_(torch.where(mask.unsqueeze(1), colour.view(n, 3, 1, 1), images))


def _stamp_watermarks(images: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor, p: int,
                      gen: torch.Generator) -> None:
    """Blend each image's class pattern into its p x p box (opacity 0.85-1), in place."""
    n, _, size, _ = images.shape
    templates = torch.stack([watermark_template(k, p) for k in range(len(DEMO_LABELS))])  # (K, p, p)
    grid = torch.arange(size)
    local_y = grid.view(1, -1, 1) - boxes[:, 0].view(-1, 1, 1)  # (N, S, 1)
    local_x = grid.view(1, 1, -1) - boxes[:, 1].view(-1, 1, 1)  # (N, 1, S)
    inside = (local_y >= 0) & (local_y < p) & (local_x >= 0) & (local_x < p)  # (N, S, S)
    values = templates[labels.view(-1, 1, 1), local_y.clamp(0, p - 1), local_x.clamp(0, p - 1)]  # (N, S, S)
    alpha = (0.85 + 0.15 * torch.rand(n, 1, 1, 1, generator=gen))
    pattern = (0.05 + 0.9 * values).unsqueeze(1)  # (N, 1, S, S), dark 0.05 / light 0.95
    blended = alpha * pattern + (1 - alpha) * images
    images.copy_(torch.where(inside.unsqueeze(1), blended, images))


def train_demo_model(config: DemoConfig = DemoConfig()) -> DemoNet:
    """Train a DemoNet on `make_watermark_dataset(train_size, seed)`; eval mode.

    Adam with a one-cycle schedule. Two choices serve attribution, not accuracy:
    - a share of watermark-free scenes with a uniform target, so every class
      needs positive evidence in its patch (otherwise one class becomes "none
      of the others" and its gradient spreads over the whole background);
    - Gaussian noise on each batch, which penalizes sensitivity to anything
      but the patch and keeps the net confident under SmoothGrad's noise.
    """
    # One thread: convs this small gain nothing from a second (on a shared 2-core box two
    # were measured 1.5-3x slower in wall time), and a fixed summation order makes the
    # weights the same whatever the machine's core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(config)
    finally:
        torch.set_num_threads(threads)


def _train(config: DemoConfig) -> DemoNet:
    # One generator for init, shuffling and noise: the data has its own seeds.
    gen = torch.Generator().manual_seed(config.seed + 1)
    inputs, targets = _training_set(config)
    if config.shuffle_labels:  # every row's target, blank scenes' included, goes to another image
        shuffle = torch.Generator().manual_seed(config.seed + _SHUFFLE_SEED_OFFSET)
        targets = targets[torch.randperm(targets.shape[0], generator=shuffle)]
    noise_std = torch.tensor(config.train_noise) / torch.tensor(DEMO_STD).view(1, 3, 1, 1)
    model = DemoNet(config.num_classes)
    model.init_weights(gen)
    model.train()
    n = inputs.shape[0]
    total = -(-n // config.batch_size) * config.epochs
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total,
                                                   pct_start=0.2, anneal_strategy="linear")
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, config.batch_size):
            idx = order[start:start + config.batch_size]
            x = inputs[idx] + noise_std * torch.randn(inputs[idx].shape, generator=gen)
            loss = F.cross_entropy(model(x), targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def _training_set(config: DemoConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Model-space inputs (N, 3, H, W) and soft targets (N, num_classes): `train_size`
    watermarked scenes (one-hot) and `blank_fraction` as many blank ones (uniform)."""
    data = make_watermark_dataset(config.train_size, config.seed, config)
    targets = F.one_hot(data.labels, config.num_classes).float()
    n_blank = round(config.blank_fraction * config.train_size)
    if n_blank == 0:
        return to_model_space(data.images), targets
    blank = _synthesize(n_blank, config.seed + _BLANK_SEED_OFFSET, config, watermark=False)
    uniform = torch.full((n_blank, config.num_classes), 1.0 / config.num_classes)
    return to_model_space(torch.cat([data.images, blank.images])), torch.cat([targets, uniform])


def default_cache_dir() -> pathlib.Path:
    """`$XDG_CACHE_HOME/attribution-service`, else `~/.cache/attribution-service`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "attribution-service"


def load_or_build_demo(cache_dir: pathlib.Path | str,
                       config: DemoConfig = DemoConfig()) -> tuple[DemoNet, pathlib.Path]:
    """The demo model from `<cache_dir>/demo-<cache_key>.pt`, trained on a miss.

    A corrupt, unreadable or mismatching cache file is logged, retrained and
    replaced, never fatal. An unwritable cache dir is logged too: the model is
    still served from memory (the returned path then does not exist).
    Returns the model in eval mode with no parameter requiring grad.
    """
    cache_dir = pathlib.Path(cache_dir)
    path = cache_dir / f"demo-{config.cache_key()}.pt"
    model = _load_cached(path, config) if path.exists() else None
    if model is None:
        model = train_demo_model(config)
        try:
            _save_atomically(model, path, config)
        except OSError as exc:
            log.warning("cannot write demo model cache %s (%s); serving it from memory", path, exc)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, path


def _load_cached(path: pathlib.Path, config: DemoConfig) -> DemoNet | None:
    """The cached model, or None (with a warning) when the file cannot be used."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("recipe_version") != RECIPE_VERSION or payload.get("cache_key") != config.cache_key():
            raise ValueError("recipe or config mismatch")
        model = DemoNet(config.num_classes)
        model.load_state_dict(payload["state_dict"], strict=True)
    except Exception as exc:  # any unusable file (truncated zip, bad pickle, wrong keys) means: rebuild
        log.warning("demo model cache %s is unusable (%s: %s); retraining", path, type(exc).__name__, exc)
        return None
    return model


def _save_atomically(model: DemoNet, path: pathlib.Path, config: DemoConfig) -> None:
    """Write next to `path` then os.replace, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"recipe_version": RECIPE_VERSION, "cache_key": config.cache_key(),
               "state_dict": model.state_dict()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
