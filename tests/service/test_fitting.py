"""Resize policies (service/fitting.py): stretch, centre crop, letterbox, and the geometry each answer
carries so a map maps back to the photo, through the inline decoder and the isolated decode pool."""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from service import codec, render
from service.decoding.pool import DecodePool
from workers.config import InputSpec
from workers.errors import InvalidArgument
from workers.spec import ModelDescription

SQUARE = ModelDescription(name="m", version="v", channels=3, height=32, width=32, mean=(0.5, 0.25, 0.75),
                          std=(0.5, 0.5, 0.5), num_classes=4, labels=(), cam_layers=("l",), default_cam_layer="l",
                          online_methods=("grad_cam",), offline_methods=("grad_cam",))
RED, BLUE = (255, 0, 0), (0, 0, 255)


def _banded(width: int = 200, height: int = 100, left: int = 56, fmt: str = "PNG", orientation: int | None = None):
    """Red where x < left, blue elsewhere."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, :left] = RED
    pixels[:, left:] = BLUE
    out = io.BytesIO()
    extra = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        extra["exif"] = exif.tobytes()
    Image.fromarray(pixels).save(out, format=fmt, **extra)
    return out.getvalue()


def _model(resize: str, **kw) -> ModelDescription:
    return dataclasses.replace(SQUARE, resize=resize, **kw)


def _fit(data: bytes, model: ModelDescription, decoder=None):
    pixels, (geometry,) = codec.decode_pixels_with_geometry([data], model, 1 << 24, "images", decoder)
    return pixels[0], geometry


def test_stretch_keeps_the_whole_image():
    pixels, g = _fit(_banded(), _model("stretch"))
    assert (g.width, g.height, g.resize) == (200, 100, "stretch")
    assert (g.x0, g.y0, g.x1, g.y1) == (0, 0, 200, 100)
    assert pixels[0, :, :4].mean() > 0.95  # the red band is squeezed in, on the left


def test_center_crop_is_torchvision_s_and_says_where_it_cropped():
    pixels, g = _fit(_banded(), _model("center_crop"))
    # 32 / 0.875 = 36.6 covers the 100-pixel side: a centred 88 x 88 square, from (56, 6).
    assert (g.width, g.height, g.resize) == (200, 100, "center_crop")
    assert (g.x0, g.y0, g.x1, g.y1) == (56, 6, 144, 94)
    assert pixels.shape == (3, 32, 32)
    assert pixels[0].max() < 0.02 and pixels[2].min() > 0.98  # no red: that band lies left of the crop
    full = dataclasses.replace(_model("center_crop"), crop_fraction=1.0)
    assert _fit(_banded(), full)[1].x0 == 50  # the 100 x 100 centre


def test_letterbox_pads_with_the_mean_and_the_box_reaches_past_the_image():
    model = _model("letterbox")
    pixels, g = _fit(_banded(), model)
    # 200 x 100 fits as 32 x 16, rows 8..23; 8 rows of padding above and below, each 6.25 photo pixels.
    assert (g.x0, g.y0, g.x1, g.y1) == (0, -50, 200, 150)
    mean = torch.tensor(model.mean).view(3, 1, 1)
    torch.testing.assert_close(pixels[:, :8], mean.expand(3, 8, 32), rtol=0, atol=0)
    torch.testing.assert_close(pixels[:, 24:], mean.expand(3, 8, 32), rtol=0, atol=0)
    assert pixels[2, 8:24, 16:].min() > 0.98
    normalized = codec.normalize(pixels[None], model)[0]
    assert normalized[:, :8].abs().max() == 0  # padding is zero in model space


def test_a_reduced_or_rotated_decode_still_reports_the_full_photo():
    big = _banded(width=1000, height=500, left=280, fmt="JPEG")  # decoded at a reduced DCT scale
    _, g = _fit(big, _model("center_crop"))
    assert (g.width, g.height) == (1000, 500)
    assert g.x0 == pytest.approx(280, abs=8) and g.x1 == pytest.approx(720, abs=8)
    _, turned = _fit(_banded(fmt="JPEG", orientation=6), _model("stretch"))
    assert (turned.width, turned.height) == (100, 200)  # shown a quarter turned


def test_the_isolated_decode_pool_reports_the_same_geometry():
    pool = DecodePool(workers=1).start()
    try:
        for resize in ("stretch", "center_crop", "letterbox"):
            data = _banded(fmt="JPEG", orientation=6)
            inline_pixels, inline = _fit(data, _model(resize))
            pooled_pixels, pooled = _fit(data, _model(resize), pool)
            assert pooled == inline
            torch.testing.assert_close(pooled_pixels, inline_pixels, rtol=0, atol=0)
    finally:
        pool.close()


def test_a_map_goes_back_over_the_photo_through_the_geometry():
    photo = render.open_photo(_banded())
    ones = np.ones((32, 32))
    _, crop = _fit(_banded(), _model("center_crop"))
    covered = render.to_photo_size(ones, photo.size, render.photo_box(crop, photo.size))
    assert covered.shape == (100, 200)
    assert covered[:, :50].max() == 0 and covered[:, 150:].max() == 0  # outside the crop: not seen
    assert covered[10:90, 60:140].min() > 0.99
    _, box = _fit(_banded(), _model("letterbox"))
    padded = np.zeros((32, 32))
    padded[:8] = padded[24:] = 1.0  # heat only on the padding
    assert render.to_photo_size(padded, photo.size, render.photo_box(box, photo.size))[5:95].max() < 0.05
    # A photo drawn at another size than the server decoded (a thumbnail) scales the box with it.
    assert render.photo_box(crop, (100, 50)) == (28, 3, 72, 47)
    assert render.photo_box(None, photo.size) is None


def test_the_overlay_draws_the_crop_only_where_the_model_looked():
    photo = render.open_photo(_banded())
    _, crop = _fit(_banded(), _model("center_crop"))
    out = np.asarray(render.overlay(photo, np.ones((32, 32)), render.Style(colormap="gray", alpha=1.0), "",
                                    render.photo_box(crop, photo.size)), dtype=float)
    assert out[:, :50].max() == 0 and out[10:90, 60:140].min() > 250


@pytest.mark.parametrize("raw, words", [({"resize": "crop"}, "not one of stretch, center_crop, letterbox"),
                                        ({"crop_fraction": 0}, "crop_fraction")])
def test_bad_resize_settings_are_refused(raw, words):
    with pytest.raises(InvalidArgument, match=words):
        InputSpec(**raw)
