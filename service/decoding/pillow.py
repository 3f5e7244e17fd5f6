"""One PNG or JPEG file -> raw pixels at a requested size, with Pillow.

This module imports only Pillow and the standard library: it runs inside the
decode worker processes (service/decoding/worker.py), which must start fast
and hold nothing of the server's. It is also the in-process decoder for files
a user reads from their own disk (CLI, audit verify).

Hardening, on top of the front door's own header check (codec.image_dimensions):
- only the PNG and JPEG plugins may open a file (`formats=`), so no other
  parser in Pillow ever sees client bytes;
- Pillow's decompression-bomb guard is set to the caller's pixel cap and its
  warning is an error;
- truncated files are errors (LOAD_TRUNCATED_IMAGES stays off);
- every failure is a `DecodeFailure` with a short message of our own words plus
  Pillow's reason with anything path-like removed.
"""
from __future__ import annotations

import io
import re
import warnings

from PIL import ExifTags, Image, ImageFile, ImageOps

ImageFile.LOAD_TRUNCATED_IMAGES = False

FORMATS = ("PNG", "JPEG")
# Output modes by model channel count.
_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_PATHLIKE = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][\w.+-]+){2,}(?::\d+)?")
MAX_REASON_CHARS = 160


class DecodeFailure(Exception):
    """The file could not be decoded; `str()` is safe to show to a client."""


def clean_reason(text: str) -> str:
    """A decoder's message without file paths or line numbers, one line, bounded."""
    text = _PATHLIKE.sub("", " ".join(str(text).split())).strip(" ,:;")
    return text[:MAX_REASON_CHARS] or "corrupt data"


# EXIF orientations that turn the picture a quarter: its sides swap.
_QUARTER_TURNS = (5, 6, 7, 8)


def decode(data: bytes, width: int, height: int, channels: int,
           max_pixels: int) -> tuple[int, int, int, bytes, int, int]:
    """Decodes `data` for a width x height model input with `channels` channels.

    Returns (bytes_per_sample, rows, columns, pixels, source_width,
    source_height): pixels are C-order (rows, columns, channels), one byte per
    sample for 8-bit sources, two (little-endian) for a 16-bit grayscale PNG
    given to a one-channel model; the source size is the file's full size the
    way up a viewer shows it (what the returned pixels are a reduction of).
    The image comes back at most about twice the target size per side, never
    smaller than it: JPEGs decode at a reduced DCT scale and big images are
    box-reduced by an integer factor here; the caller does the final
    antialiased resize. EXIF orientation is applied first, so a photo is
    explained the way up a viewer shows it.
    """
    if channels not in _MODES:
        raise DecodeFailure(f"models with {channels} channels cannot take encoded images")
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                source = image.size
                if image.getexif().get(ExifTags.Base.Orientation) in _QUARTER_TURNS:
                    source = source[::-1]
                if image.format == "JPEG":
                    # libjpeg decodes at 1/2, 1/4 or 1/8 scale when that still covers the target size;
                    # an EXIF rotation swaps the sides, so the draft covers both orientations.
                    side = max(width, height)
                    image.draft(_MODES[3] if channels >= 3 else "L", (side, side))
                image.load()
                image = ImageOps.exif_transpose(image)
                return (*_convert_and_reduce(image, width, height, channels), *source)
    except DecodeFailure:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DecodeFailure(f"the image has more than the cap of {max_pixels} pixels") from None
    except Image.UnidentifiedImageError:
        raise DecodeFailure("not a PNG or JPEG file Pillow can read") from None
    except MemoryError:
        raise DecodeFailure("decoding needs more memory than a decoder may use") from None
    except Exception as exc:  # OSError, SyntaxError, ValueError, zlib errors...: all mean bad bytes
        raise DecodeFailure(clean_reason(str(exc) or type(exc).__name__)) from None


def _convert_and_reduce(image: Image.Image, width: int, height: int, channels: int) -> tuple[int, int, int, bytes]:
    factor = min(image.width // (2 * width), image.height // (2 * height))
    if image.mode in _SIXTEEN_BIT:
        image = image.convert("I")
        if channels == 1:
            if factor >= 2:
                image = image.reduce(factor)
            return 2, image.height, image.width, image.convert("I;16").tobytes()  # "I;16" is little-endian
        image = image.point(lambda v: v * (1 / 257)).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    target = _MODES[channels]
    if image.mode != target:
        image = image.convert(target)
    if factor >= 2:
        image = image.reduce(factor)
    return 1, image.height, image.width, image.tobytes()
