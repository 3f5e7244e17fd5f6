"""A corpus of hostile inputs, written from the wire contract alone.

Each case is a serialized request message (bytes, so garbage that is not a
message fits too) and the status code a correct server answers. The same
corpus drives the server tests, the memory check and the fuzzers' seeds.
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from service._proto import attribution_pb2 as pb

SIZE = 64  # the demo model's side
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Case:
    name: str
    payload: bytes          # a serialized ExplainRequest (or garbage)
    code: str               # expected grpc status name
    words: str = ""         # expected in the message (lower case)


def chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def ihdr(width: int, height: int, depth: int = 8, colour: int = 2, interlace: int = 0) -> bytes:
    return chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace))


def photo(width: int = SIZE, height: int = SIZE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def encode(pixels: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options)
    return buffer.getvalue()


def valid_png(seed: int = 0) -> bytes:
    return encode(photo(seed=seed), "PNG")


def hostile_images() -> dict[str, bytes]:
    """Malformed PNG/JPEG of every kind found so far, bombs, and other formats."""
    good_png, good_jpeg = valid_png(), encode(photo(160, 120), "JPEG", quality=90)
    progressive = encode(photo(160, 120), "JPEG", quality=90, progressive=True)
    rows = zlib.compress(b"".join(b"\x00" + bytes(3 * SIZE) for _ in range(SIZE)))
    sof = good_jpeg.index(b"\xff\xc0")
    huge_sof = bytearray(good_jpeg)
    huge_sof[sof + 5:sof + 9] = struct.pack(">HH", 4000, 4000)
    return {
        "png_empty_idat": PNG_SIGNATURE + ihdr(8, 8) + chunk(b"IDAT", b"") + chunk(b"IEND", b""),
        "png_garbage_idat": PNG_SIGNATURE + ihdr(8, 8) + chunk(b"IDAT", b"\x13garbage!!") + chunk(b"IEND", b""),
        "png_cut_at_65_bytes": (PNG_SIGNATURE + ihdr(SIZE, SIZE) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))[:65],
        "png_cut_mid_idat": good_png[:len(good_png) // 2],
        "png_claims_4096_tiny_idat": PNG_SIGNATURE + ihdr(4096, 4096) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b""),
        "png_bomb_header_100000": PNG_SIGNATURE + ihdr(100_000, 100_000) + chunk(b"IDAT", zlib.compress(b"\0" * 64)),
        "png_zero_width": PNG_SIGNATURE + ihdr(0, 8) + chunk(b"IEND", b""),
        "png_bad_crc": PNG_SIGNATURE + ihdr(SIZE, SIZE) + chunk(b"IDAT", rows, crc=0) + chunk(b"IEND", b""),
        "png_bad_bit_depth": PNG_SIGNATURE + ihdr(8, 8, depth=7) + chunk(b"IDAT", zlib.compress(b"\0" * 80))
        + chunk(b"IEND", b""),
        "png_interlaced_truncated": encode(photo(), "PNG")[:200],
        "png_no_ihdr": PNG_SIGNATURE + chunk(b"IDAT", rows),
        "png_signature_only": PNG_SIGNATURE,
        "jpeg_cut_at_half": good_jpeg[:len(good_jpeg) // 2],
        "jpeg_header_only": good_jpeg[:sof + 20],
        "jpeg_progressive_truncated": progressive[:len(progressive) // 3],
        "jpeg_garbage_scan": good_jpeg[:sof + 200] + bytes(range(256)) * 8 + b"\xff\xd9",
        "jpeg_claims_4000x4000": bytes(huge_sof),
        "jpeg_soi_eoi_only": b"\xff\xd8\xff\xd9",
        "jpeg_no_frame": b"\xff\xd8" + b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + b"\xff\xd9",
        "gif": encode(photo(16, 16), "GIF"),
        "bmp": encode(photo(16, 16), "BMP"),
        "tiff": encode(photo(16, 16), "TIFF"),
        "webp": encode(photo(16, 16), "WEBP"),
        "empty": b"",
        "random_bytes": np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "png_signature_then_jpeg": PNG_SIGNATURE + good_jpeg,
    }


# Malformed files a hardened decoder still decodes to an image, as viewers do: a PNG whose IDAT CRC is
# wrong but whose data is intact, and a JPEG whose scan is shorter than its header claims (libjpeg fills
# the rest; the claim is within the pixel cap, and the reduced-scale decode keeps its cost small).
DECODABLE = frozenset({"png_bad_crc", "jpeg_claims_4000x4000"})


def _images_request(*images: bytes, method: int = pb.GRAD_CAM) -> bytes:
    return pb.ExplainRequest(method=method, inputs=pb.Inputs(images=pb.EncodedImages(images=list(images)))) \
        .SerializeToString()


def _tensor_request(values: np.ndarray, space: int = pb.PIXELS, dtype: int = pb.FLOAT32,
                    shape: list[int] | None = None) -> bytes:
    tensor = pb.Tensor(data=values.tobytes(), dtype=dtype, shape=shape or list(values.shape))
    return pb.ExplainRequest(method=pb.VANILLA_GRADIENT, inputs=pb.Inputs(tensor=tensor, space=space)) \
        .SerializeToString()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def garbage_messages() -> dict[str, bytes]:
    """Bytes that are not a valid ExplainRequest encoding."""
    valid = pb.ExplainRequest(request_id="ok", method=pb.GRAD_CAM).SerializeToString()
    return {
        "raw_garbage": b"\xff" * 64,
        "invalid_utf8_request_id": b"\x0a\x04\xff\xfe\xfd\xfc",
        "overlong_varint": b"\x28" + b"\xff" * 11 + b"\x01",
        "field_number_zero": b"\x00\x01",
        "deep_group_nesting": b"\x4b" * 200_000,  # field 9, start-group, nested past any recursion limit
        "truncated_length": b"\x1a\x80\x80\x04" + b"\x00" * 8,
        "truncated_valid": valid[:-1] if len(valid) > 1 else b"\x0a",
        "end_group_without_start": b"\x0c",
        "length_past_end": b"\x12" + _varint(1 << 30) + b"abc",
    }


def tensor_cases() -> dict[str, tuple[bytes, str, str]]:
    """Wrong shapes, dtypes, non-finite and out-of-range values: (payload, code, words)."""
    ok = np.full((1, 3, SIZE, SIZE), 0.5, np.float32)
    nan = ok.copy()
    nan[0, 0, 0, 0] = np.nan
    inf = ok.copy()
    inf[0, 1, 2, 3] = np.inf
    return {
        "nan_pixels": (_tensor_request(nan), "INVALID_ARGUMENT", "nan or inf"),
        "inf_pixels": (_tensor_request(inf), "INVALID_ARGUMENT", "nan or inf"),
        "pixels_above_one": (_tensor_request(ok * 2000), "INVALID_ARGUMENT", "[0, 1]"),
        "pixels_negative": (_tensor_request(ok - 5.5), "INVALID_ARGUMENT", "[0, 1]"),
        "pixels_float_max": (_tensor_request(np.full_like(ok, 3.4e38)), "INVALID_ARGUMENT", "[0, 1]"),
        "model_space_3e38": (_tensor_request(np.full_like(ok, 3e38), space=pb.MODEL), "INVALID_ARGUMENT",
                             "nan or inf"),
        "wrong_item_shape": (_tensor_request(np.zeros((1, 3, 32, 32), np.float32)), "INVALID_ARGUMENT", "takes"),
        "length_mismatch": (_tensor_request(ok[:, :, :10], shape=[1, 3, SIZE, SIZE]), "INVALID_ARGUMENT", "bytes"),
        "huge_claimed_shape": (_tensor_request(ok, shape=[1 << 40, 3, 1 << 20, 1 << 20]), "INVALID_ARGUMENT", ""),
        "negative_dim": (_tensor_request(ok, shape=[1, -3, SIZE, SIZE]), "INVALID_ARGUMENT", "positive"),
        "five_dims": (_tensor_request(ok, shape=[1, 1, 3, SIZE, SIZE]), "INVALID_ARGUMENT", "4"),
        "unknown_dtype": (_tensor_request(ok, dtype=99), "INVALID_ARGUMENT", "dtype"),
        "uint8_model_space": (_tensor_request((ok * 255).astype(np.uint8), space=pb.MODEL, dtype=pb.UINT8),
                              "INVALID_ARGUMENT", "uint8"),
    }


def cases() -> list[Case]:
    """The whole corpus."""
    out = [Case(f"image:{name}", _images_request(data), "OK" if name in DECODABLE else "INVALID_ARGUMENT", "")
           for name, data in hostile_images().items()]
    out.append(Case("image:bad_among_good", _images_request(valid_png(1), hostile_images()["png_empty_idat"],
                                                            valid_png(2)), "INVALID_ARGUMENT", "images[1]"))
    out += [Case(f"message:{name}", data, "INVALID_ARGUMENT", "not a valid attribution.v1.explainrequest")
            for name, data in garbage_messages().items()]
    out += [Case(f"tensor:{name}", payload, code, words) for name, (payload, code, words) in tensor_cases().items()]
    return out
