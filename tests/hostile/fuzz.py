"""Coverage-guided fuzzing (atheris/libFuzzer) of request parsing, validation and image decoding.

    python -m tests.hostile.fuzz request [-runs=N] [-max_total_time=S] [libFuzzer flags...]
    python -m tests.hostile.fuzz image   [-runs=N] ...

`request` feeds bytes through the server's path for a request message: the
same parse the malformed-message interceptor does, then `validate_explain`
on the demo model's description (decoding images in process, so a decoder
crash is a fuzzer crash). `image` feeds bytes to the decode path alone
(header checks, Pillow, resize). Every `AttributionError` is an answer to the
client and fine; anything else, or a crash, is a finding. Seeds come from the
hostile corpus (tests/hostile/corpus.py) plus every committed finding in
tests/hostile/found/, which the suite also replays.
"""
from __future__ import annotations

import pathlib
import sys
import tempfile

import atheris

with atheris.instrument_imports(include=["service", "PIL"]):
    from service import codec
    from service._proto import attribution_pb2 as pb
    from service.config import Limits
    from service.validation import validate_explain
    from workers.errors import AttributionError
    from workers.spec import ModelDescription

FOUND = pathlib.Path(__file__).parent / "found"
DEMO = ModelDescription(
    name="demo", version="fuzz", channels=3, height=64, width=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
    num_classes=4, labels=(), cam_layers=("features.3", "features.6"), default_cam_layer="features.6",
    online_methods=("vanilla", "smoothgrad", "smoothgrad_sq", "vargrad", "integrated_gradients", "grad_cam",
                    "grad_cam_plus_plus", "layer_cam"),
    offline_methods=("vanilla", "smoothgrad", "smoothgrad_sq", "vargrad", "integrated_gradients", "grad_cam",
                     "grad_cam_plus_plus", "layer_cam", "score_cam", "occlusion"), is_default=True)
LIMITS = Limits(max_image_pixels=1 << 20)  # keeps each input cheap, so the fuzzer explores rather than decodes


def request_target(data: bytes) -> None:
    try:
        request = pb.ExplainRequest.FromString(data)
    except Exception:  # the interceptor answers INVALID_ARGUMENT for any parse failure
        return
    for offline in (False, True):
        try:
            validate_explain(request, DEMO, LIMITS, offline=offline)
        except AttributionError:
            pass


def image_target(data: bytes) -> None:
    try:
        codec.decode_images([data], DEMO, LIMITS.max_image_pixels, "inputs.images.images")
    except AttributionError:
        pass


TARGETS = {"request": request_target, "image": image_target}


def seeds(target: str) -> list[bytes]:
    from tests.hostile.corpus import cases, hostile_images, valid_png

    if target == "image":
        out = list(hostile_images().values()) + [valid_png(0)]
    else:
        out = [case.payload for case in cases()]
    out += [path.read_bytes() for path in sorted(FOUND.glob(f"{target}-*"))]
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in TARGETS:
        print(__doc__)
        return 2
    target = argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = pathlib.Path(tmp)
        for i, seed in enumerate(seeds(target)):
            (corpus / f"seed{i:04d}").write_bytes(seed)
        args = [argv[0]] + argv[2:]
        if not any(a.startswith("-artifact_prefix") for a in args):
            args.append(f"-artifact_prefix={FOUND}/{target}-")
        args.append(str(corpus))
        if not any(a.startswith("-max_len") for a in args):
            args.insert(1, "-max_len=65536")
        atheris.Setup(args, TARGETS[target])
        atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
