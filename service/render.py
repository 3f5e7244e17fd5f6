"""Overlays people look at, drawn on the client from a returned map and the original photo.

The server's `png_overlay` is at the model's input size (what the model saw). Here the map is
brought back to the original image through the same geometry the server's decoder used (EXIF
orientation applied, then the model's resize policy: the answer's `ItemResult.geometry` says which
rectangle of the photo the model's input covered, so a stretched input's map is stretched back, a
centre crop's map covers only the crop and a letterbox's padding falls outside the photo),
blended at the photo's own resolution and aspect ratio, with a choice of colormap and
blend, an optional legend strip (class, score, method) and a side-by-side panel
(image | map | overlay). `gallery_html` writes one page for a folder of results, so many
explanations, right and wrong, can be looked through at once.

Pure NumPy and Pillow: no torch, no server.
"""
from __future__ import annotations

import html
import io
import pathlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps

# 8-bit sRGB anchors, evenly spaced, interpolated to 256 colours.
_ANCHORS = {
    "inferno": ((0, 0, 4), (22, 11, 57), (66, 10, 104), (106, 23, 110), (147, 38, 103), (188, 55, 84),
                (221, 81, 58), (243, 120, 25), (252, 165, 10), (246, 215, 70), (252, 255, 164)),
    "viridis": ((68, 1, 84), (72, 36, 117), (65, 68, 135), (53, 95, 141), (42, 120, 142), (33, 145, 140),
                (34, 168, 132), (68, 191, 112), (122, 209, 81), (189, 223, 38), (253, 231, 37)),
    "gray": ((0, 0, 0), (255, 255, 255)),
    # Diverging, for signed maps: blue (negative), white (zero), red (positive).
    "coolwarm": ((59, 76, 192), (98, 130, 234), (141, 176, 254), (184, 208, 249), (221, 221, 221),
                 (245, 196, 173), (244, 154, 123), (222, 96, 77), (180, 4, 38)),
}
COLORMAPS = tuple(_ANCHORS)
DIVERGING = ("coolwarm",)


def lut(name: str) -> np.ndarray:
    """`(256, 3)` uint8 colours of a colormap, low to high."""
    anchors = np.asarray(_ANCHORS[name], dtype=np.float64)
    pos = np.linspace(0, len(anchors) - 1, 256)
    lo = np.minimum(np.floor(pos).astype(int), len(anchors) - 2)
    frac = (pos - lo)[:, None]
    return np.round(anchors[lo] * (1 - frac) + anchors[lo + 1] * frac).astype(np.uint8)


@dataclass(frozen=True)
class Style:
    colormap: str = "inferno"
    alpha: float = 0.5         # weight of the colours over the photo
    legend: bool = False       # a strip under the picture: class, score, method
    panel: bool = False        # image | map | overlay side by side

    def __post_init__(self) -> None:
        if self.colormap not in _ANCHORS:
            raise ValueError(f"unknown colormap {self.colormap!r}; one of: {', '.join(COLORMAPS)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


# The client's own photos: Pillow's decompression-bomb guard at a bound for photographs, set per call
# (the in-process decoder lowers the process-wide default to the server's image limit).
MAX_PHOTO_PIXELS = 1 << 29


def open_photo(data: bytes) -> Image.Image:
    """The photo as the server saw it before resizing: EXIF orientation applied, RGB."""
    guard, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, MAX_PHOTO_PIXELS
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    finally:
        Image.MAX_IMAGE_PIXELS = guard


def heat(values: np.ndarray, diverging: bool) -> np.ndarray:
    """A map `(H, W)` or `(C, H, W)` as [0, 1]: |values| / max, or, diverging, 0.5 + values / (2 max |values|)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 3:  # per-channel maps: the channel with the largest magnitude at each pixel
        v = np.take_along_axis(v, np.abs(v).argmax(axis=0)[None], axis=0)[0]
    scale = float(np.abs(v).max()) if v.size else 0.0
    if scale <= 0 or not np.isfinite(scale):
        return np.full(v.shape, 0.5 if diverging else 0.0)
    return 0.5 + v / (2 * scale) if diverging else np.abs(v) / scale


Box = tuple[float, float, float, float]


def photo_box(geometry, size: tuple[int, int]) -> Box | None:
    """An answer's `SourceGeometry` as (x0, y0, x1, y1) in the pixels of a photo of `size` (width, height).

    None when the answer carries none (a raw tensor input, or a server that does not say): the map
    is then taken to cover the whole photo, as a stretched input's does.
    """
    if geometry is None or not geometry.width or not geometry.height:
        return None
    sx, sy = size[0] / geometry.width, size[1] / geometry.height
    return geometry.x0 * sx, geometry.y0 * sy, geometry.x1 * sx, geometry.y1 * sy


def to_photo_size(values: np.ndarray, size: tuple[int, int], box: Box | None = None) -> np.ndarray:
    """A [0, 1] heat map `(h, w)` drawn over a photo of `size` (width, height).

    box: the rectangle of the photo, in its pixels, that the model's input (the map's frame) covered;
    None = the whole photo. Photo pixels outside it were not seen by the model and get 0; map pixels
    outside the photo (letterbox padding) are left out.
    """
    source = Image.fromarray(np.float32(values), mode="F")
    if box is None or box == (0, 0, size[0], size[1]):
        image = source.resize(size, Image.Resampling.BILINEAR)
    else:
        x0, y0, x1, y1 = box
        ax, ay = source.width / (x1 - x0), source.height / (y1 - y0)
        # Photo pixel (x, y) reads the map at ((x - x0) * ax, (y - y0) * ay).
        image = source.transform(size, Image.Transform.AFFINE, (ax, 0.0, -x0 * ax, 0.0, ay, -y0 * ay),
                                 resample=Image.Resampling.BILINEAR, fillcolor=0.0)
    return np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)


def overlay(photo: Image.Image, values: np.ndarray, style: Style = Style(), caption: str = "",
            box: Box | None = None) -> Image.Image:
    """The map blended over the photo at the photo's resolution (+ panel, + legend per `style`).

    box: where the model's input lay in the photo (`photo_box` of the answer's geometry)."""
    h = to_photo_size(heat(values, style.colormap in DIVERGING), photo.size, box)
    colours = lut(style.colormap)[np.round(h * 255).astype(np.uint8)]  # (H, W, 3)
    base = np.asarray(photo, dtype=np.float64)
    blended = Image.fromarray(np.round((1 - style.alpha) * base + style.alpha * colours).astype(np.uint8))
    picture = blended
    if style.panel:
        picture = Image.new("RGB", (photo.width * 3, photo.height))
        for i, part in enumerate((photo, Image.fromarray(colours), blended)):
            picture.paste(part, (i * photo.width, 0))
    if style.legend and caption:
        picture = _with_legend(picture, caption, style.colormap)
    return picture


def _with_legend(picture: Image.Image, caption: str, colormap: str) -> Image.Image:
    strip = max(18, picture.height // 12)
    out = Image.new("RGB", (picture.width, picture.height + strip), (255, 255, 255))
    out.paste(picture, (0, 0))
    draw = ImageDraw.Draw(out)
    bar_width = min(picture.width // 4, 160)
    bar = Image.fromarray(np.repeat(lut(colormap)[None], max(4, strip // 3), axis=0)).resize(
        (bar_width, max(4, strip // 3)))
    out.paste(bar, (picture.width - bar_width - 4, picture.height + (strip - bar.height) // 2))
    draw.text((4, picture.height + max(1, (strip - 11) // 2)), caption, fill=(0, 0, 0))
    return out


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class GalleryEntry:
    input: str          # the input's name
    picture: str        # the overlay's file name, relative to the page
    caption: str        # predicted class and score, target, method
    error: str = ""     # set for an input that failed (no picture)


def gallery_html(entries: Sequence[GalleryEntry], title: str) -> str:
    """One self-contained page: a grid of overlays with their captions, failures listed with their reason."""
    cards = []
    for e in entries:
        body = (f'<div class="err">{html.escape(e.error)}</div>' if e.error else
                f'<a href="{html.escape(e.picture)}"><img src="{html.escape(e.picture)}" loading="lazy" '
                f'alt="{html.escape(e.input)}"></a>')
        cards.append(f'<figure>{body}<figcaption><b>{html.escape(pathlib.Path(e.input).name)}</b><br>'
                     f'{html.escape(e.caption)}</figcaption></figure>')
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>" + html.escape(title) + "</title><style>"
            "body{font-family:sans-serif;margin:1em}main{display:grid;grid-template-columns:repeat(auto-fill,"
            "minmax(240px,1fr));gap:12px}figure{margin:0;border:1px solid #ddd;padding:6px}img{width:100%}"
            ".err{color:#a00;padding:2em 0}figcaption{font-size:13px}</style></head><body><h1>"
            + html.escape(title) + f"</h1><p>{len(entries)} inputs</p><main>" + "".join(cards)
            + "</main></body></html>\n")
