"""Client-side overlays: at the photo's own resolution and orientation, the chosen colormap, panels, legends,
and the gallery page."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service import render


def _jpeg(width: int, height: int, orientation: int | None = None) -> bytes:
    image = Image.fromarray(np.zeros((height, width, 3), np.uint8) + 128)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif.tobytes())
    return out.getvalue()


def test_the_overlay_has_the_photos_size_and_exif_orientation():
    wide = render.open_photo(_jpeg(640, 427))
    assert render.overlay(wide, np.random.default_rng(0).random((64, 64))).size == (640, 427)
    turned = render.open_photo(_jpeg(640, 427, orientation=6))  # shown rotated: 427 wide, 640 high
    assert render.overlay(turned, np.ones((64, 64))).size == (427, 640)


def test_the_hot_region_lands_where_it_is_in_the_map():
    photo = render.open_photo(_jpeg(200, 100))
    values = np.zeros((64, 64))
    values[:, 48:] = 1.0  # the right quarter
    out = np.asarray(render.overlay(photo, values, render.Style(colormap="gray", alpha=1.0)), dtype=float)
    assert out[:, 170:].mean() > 200 and out[:, :120].mean() < 10


def test_panel_and_legend_change_the_layout():
    photo = render.open_photo(_jpeg(120, 80))
    values = np.random.default_rng(1).random((3, 64, 64)) - 0.5   # a signed per-channel map
    panel = render.overlay(photo, values, render.Style(colormap="coolwarm", panel=True, legend=True), "cat 0.9")
    assert panel.width == 360 and panel.height > 80


def test_diverging_maps_put_zero_in_the_middle():
    assert render.heat(np.array([[-2.0, 0.0, 2.0]]), diverging=True).tolist() == [[0.0, 0.5, 1.0]]
    assert render.heat(np.array([[-2.0, 0.0, 1.0]]), diverging=False).tolist() == [[1.0, 0.0, 0.5]]
    assert render.heat(np.zeros((2, 2)), diverging=False).max() == 0.0


def test_bad_styles_are_refused():
    with pytest.raises(ValueError, match="unknown colormap"):
        render.Style(colormap="jet")
    with pytest.raises(ValueError, match="alpha"):
        render.Style(alpha=1.5)


def test_the_gallery_escapes_names_and_lists_failures():
    page = render.gallery_html([render.GalleryEntry("a<b>.png", "a.grad_cam.png", "predicted 1"),
                                render.GalleryEntry("bad.png", "", "", error="INVALID_ARGUMENT: could not decode")],
                               "run")
    assert "a&lt;b&gt;.png" in page and 'src="a.grad_cam.png"' in page and "could not decode" in page
