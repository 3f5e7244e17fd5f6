"""Image decoding cost, side by side: torchvision in-process, Pillow in-process, Pillow in the worker pool.

    python -m loadtests.decode_bench [--rounds 5] [--json out.json]

Each case decodes the same files to the same model size, interleaved round by
round so machine drift hits every decoder alike, and prints milliseconds per
image (median over rounds) with each decoder's ratio to torchvision's. The
torchvision column is the decoder the service used before it moved decoding
out of process; it runs here on valid files only (malformed ones crash it).
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.io as tvio
from PIL import Image

from service.decoding.pool import DecodePool, InlineDecoder


def _photo(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth colour fields with edges: compresses like a photograph, not like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        for _ in range(6):
            fx, fy, phase = rng.uniform(0.002, 0.03, 2).tolist() + [rng.uniform(0, 6.28)]
            out[..., c] += np.sin(xx * fx * 6.28 + yy * fy * 6.28 + phase)
    out += (xx[..., None] > width * 0.6) * 1.5
    out += rng.normal(0, 0.08, out.shape)
    out = (out - out.min()) / (out.max() - out.min())
    return (out * 255).astype(np.uint8)


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


CASES = (  # name, source size, format, model size
    ("png 64x64 -> 64x64", (64, 64), "PNG", (64, 64)),
    ("png 224x224 -> 224x224", (224, 224), "PNG", (224, 224)),
    ("jpeg 640x427 -> 64x64", (640, 427), "JPEG", (64, 64)),
    ("jpeg 640x427 -> 224x224", (640, 427), "JPEG", (224, 224)),
    ("jpeg 4032x3024 -> 224x224", (4032, 3024), "JPEG", (224, 224)),
)


def _torchvision(files: list[bytes], size: tuple[int, int]) -> None:
    for data in files:
        image = tvio.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=tvio.ImageReadMode.RGB)
        x = image.unsqueeze(0)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        (x.to(torch.float32) / 255.0)


def _decoder(decoder, files: list[bytes], size: tuple[int, int]) -> None:
    """The service's whole path: header check, decode (via `decoder`), final resize, to float."""
    from service import codec
    from workers.spec import ModelDescription

    model = ModelDescription(name="bench", version="", channels=3, height=size[0], width=size[1],
                             mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), num_classes=2, labels=(), cam_layers=(),
                             default_cam_layer="", online_methods=(), offline_methods=())
    codec.decode_pixels(files, model, 1 << 26, "bench", decoder)


def run(rounds: int, files_per_case: int) -> list[dict]:
    torch.set_num_threads(1)
    pool = DecodePool(workers=1).start()
    inline = InlineDecoder()
    rows = []
    try:
        for name, (w, h), fmt, size in CASES:
            count = max(2, files_per_case // max(1, (w * h) // (640 * 427)))
            files = [_encode(_photo(w, h, seed), fmt) for seed in range(count)]
            timings = {"torchvision": [], "pillow": [], "pillow_pool": []}
            runners = {"torchvision": lambda: _torchvision(files, size),
                       "pillow": lambda: _decoder(inline, files, size),
                       "pillow_pool": lambda: _decoder(pool, files, size)}
            for fn in runners.values():  # warm-up
                fn()
            for _ in range(rounds):
                for key, fn in runners.items():
                    start = time.perf_counter()
                    fn()
                    timings[key].append((time.perf_counter() - start) / len(files) * 1e3)
            ms = {k: statistics.median(v) for k, v in timings.items()}
            rows.append({"case": name, "files": len(files), "ms_per_image": ms,
                         "ratio_vs_torchvision": {k: v / ms["torchvision"] for k, v in ms.items()}})
    finally:
        pool.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--files", type=int, default=20, help="files per case (fewer for the big photos)")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args(argv)
    rows = run(args.rounds, args.files)
    print(f"{'case':28} {'files':>5} {'torchvision ms':>14} {'pillow ms':>10} {'pool ms':>8} "
          f"{'pillow/tv':>9} {'pool/tv':>8}")
    for row in rows:
        ms, ratio = row["ms_per_image"], row["ratio_vs_torchvision"]
        print(f"{row['case']:28} {row['files']:>5} {ms['torchvision']:>14.3f} {ms['pillow']:>10.3f} "
              f"{ms['pillow_pool']:>8.3f} {ratio['pillow']:>9.2f} {ratio['pillow_pool']:>8.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rounds": args.rounds, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
