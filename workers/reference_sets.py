"""A model's reference set: the baselines Expected Gradients (and GradientSHAP) draw from.

Configured per model (`models[].reference_set`) as a file of pixel-space images, `# (R, C, H, W)`
in [0, 1] (float) or 0..255 (uint8), in .npy, .pt/.pth (a tensor) or .safetensors (one tensor), or as
a folder of PNG/JPEG images, each stretched to the model's input size. The demo model's set is built
in code from its own synthetic data. The set is kept in model space, `(x - mean) / std`, on the
model's device, like every input a kernel sees.
"""
from __future__ import annotations

import pathlib

import numpy as np
import torch
import torch.nn.functional as F

from workers.config import InputSpec
from workers.errors import ModelLoadError

TENSOR_SUFFIXES = (".npy", ".pt", ".pth", ".safetensors")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_REFERENCE_IMAGES = 4096  # as many baselines as a request's own reference set may hold
DEMO_REFERENCE_IMAGES = 64
DEMO_REFERENCE_SEED_OFFSET = 7919  # a draw of the demo's data apart from its training and held-out sets


def load_reference_set(path: str, spec: InputSpec, model: str) -> torch.Tensor:
    """The configured reference set in model space `# (R, C, H, W)` float32 (CPU); ModelLoadError naming
    `models[<model>].reference_set` and what to fix when it cannot be used."""
    where = f"model {model!r}: reference_set {path}"
    source = pathlib.Path(path)
    try:
        pixels = _read_folder(source, spec, where) if source.is_dir() else _read_tensor(source, where)
    except OSError as exc:
        raise ModelLoadError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    if pixels.dim() != 4 or tuple(pixels.shape[1:]) != spec.shape or pixels.shape[0] == 0:
        raise ModelLoadError(f"{where}: holds a tensor shaped {tuple(pixels.shape)}; it must be (R, *{spec.shape}) "
                             "images in NCHW, R >= 1, at the model's input size")
    if pixels.shape[0] > MAX_REFERENCE_IMAGES:
        raise ModelLoadError(f"{where}: {pixels.shape[0]} images; at most {MAX_REFERENCE_IMAGES}")
    if pixels.dtype == torch.uint8:
        pixels = pixels.float() / 255.0
    elif pixels.is_floating_point():
        pixels = pixels.float()
        if not bool(torch.isfinite(pixels).all()) or float(pixels.min()) < 0 or float(pixels.max()) > 1:
            raise ModelLoadError(f"{where}: float images must be finite pixel values in [0, 1]")
    else:
        raise ModelLoadError(f"{where}: images must be uint8 (0..255) or float (0..1), got {pixels.dtype}")
    return to_model_space(pixels, spec)


def to_model_space(pixels: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Pixel-space images `# (R, C, H, W)` in [0, 1] -> `(x - mean) / std` per channel."""
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (pixels - mean) / std


def demo_reference_set(seed: int, spec: InputSpec) -> torch.Tensor:
    """The demo model's reference set: DEMO_REFERENCE_IMAGES of its synthetic scenes, model space."""
    from workers.demo import DemoConfig, make_watermark_dataset

    config = DemoConfig(seed=seed)
    images = make_watermark_dataset(DEMO_REFERENCE_IMAGES, seed + DEMO_REFERENCE_SEED_OFFSET, config).images
    return to_model_space(images, spec)


def _read_tensor(path: pathlib.Path, where: str) -> torch.Tensor:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False))
    if suffix in (".pt", ".pth"):
        value = torch.load(path, map_location="cpu", weights_only=True)
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if len(tensors) != 1:
            raise ModelLoadError(f"{where}: holds {len(tensors)} tensors ({', '.join(sorted(tensors))}); "
                                 "store the images as its one tensor")
        value = next(iter(tensors.values()))
    else:
        raise ModelLoadError(f"{where}: not a folder of images or a {'/'.join(TENSOR_SUFFIXES)} file")
    if not isinstance(value, torch.Tensor):
        raise ModelLoadError(f"{where}: holds a {type(value).__name__}, not a tensor of images")
    return value


def _read_folder(folder: pathlib.Path, spec: InputSpec, where: str) -> torch.Tensor:
    """Every PNG/JPEG of the folder (sorted by name), decoded and stretched to the input size, uint8."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ModelLoadError(f"{where}: a folder with no PNG or JPEG images")
    if len(files) > MAX_REFERENCE_IMAGES:
        raise ModelLoadError(f"{where}: {len(files)} images; at most {MAX_REFERENCE_IMAGES}")
    mode = ImageReadMode.GRAY if spec.channels == 1 else ImageReadMode.RGB
    images = []
    for file in files:
        try:
            image = decode_image(read_file(str(file)), mode=mode).float().unsqueeze(0)  # (1, C, h, w)
        except RuntimeError as exc:
            raise ModelLoadError(f"{where}: cannot decode {file.name}: {exc}") from None
        images.append(F.interpolate(image, size=(spec.height, spec.width), mode="bilinear", antialias=True,
                                    align_corners=False).clamp_(0, 255))
    pixels = torch.cat(images) / 255.0
    if pixels.shape[1] != spec.channels:
        raise ModelLoadError(f"{where}: images have {pixels.shape[1]} channels; the model takes {spec.channels}")
    return pixels
