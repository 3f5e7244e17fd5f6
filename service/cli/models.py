"""`attribution models --server HOST:PORT`: models, their modality, CAM layers (with layouts), methods and
recommendations of a server; `attribution models --server HOST:PORT adopt MODEL [--job ID]`: adopt an
evaluation's recommendation."""
from __future__ import annotations

import argparse
import json

from google.protobuf.json_format import MessageToDict

from service._proto import attribution_pb2 as pb
from service.cli import add_tls_arguments, tls_options
from service.client import AttributionClient


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", required=True, help="HOST:PORT")
    parser.add_argument("--json", action="store_true", help="print the ModelInfo messages as JSON")
    parser.add_argument("--token", help="bearer token")
    add_tls_arguments(parser)
    parser.add_argument("--timeout", type=float, default=10.0)
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    adopt = sub.add_parser("adopt", help="make a model's evaluation recommendation its default method and CAM layer",
                           description="Adopts the recommendation of the model's latest succeeded evaluation (or "
                                       "of --job): requests naming no method get its method, CAM requests naming "
                                       "no layer its layer. Stored with the jobs: it survives restarts.")
    adopt.add_argument("model", help="the model's name")
    adopt.add_argument("--job", default="", help="the evaluation job whose recommendation to adopt (default: the "
                                                 "model's latest)")


def _method(value: int) -> str:
    return pb.Method.Name(value).lower()


def _print(m: pb.ModelInfo) -> None:
    spec = m.input_spec
    star = " (default)" if m.is_default else ""
    resize = spec.resize or "stretch"
    if resize == "center_crop":
        resize += f" {spec.crop_fraction:g}"
    modality = pb.Modality.Name(m.modality or pb.IMAGE).lower()
    if m.modality == pb.TEXT:
        t = m.text_spec
        shape = f"up to {t.max_length} tokens (vocabulary {t.vocab_size}{', tokenizer' if t.tokenizer else ''})"
    else:
        shape = f"{spec.channels}x{spec.height}x{spec.width} ({resize})"
    print(f"{m.name}{star}  {modality}  version {m.version[:16]}  input {shape}  classes {m.num_classes}")
    layouts = {c.name: c.layout for c in m.cam_layer_layouts}
    layers = [f"{name} ({layouts[name]})" if layouts.get(name) else name for name in m.cam_layers]
    print(f"  CAM layers: {', '.join(layers) or '-'} (default {m.default_cam_layer or '-'})")
    print(f"  online:  {', '.join(_method(x) for x in m.online_methods)}")
    print(f"  offline: {', '.join(_method(x) for x in m.offline_methods)}")
    if m.default_method:
        print(f"  default method: {_method(m.default_method)}")
    if m.HasField("recommendation"):
        rec = m.recommendation
        layer = f" at {rec.cam_layer}" if rec.cam_layer else ""
        print(f"  recommended: {_method(rec.method)}{layer} (evaluation {rec.evaluation_job_id}"
              f"{', adopted' if rec.adopted else ''})")


def run(args: argparse.Namespace) -> int:
    with AttributionClient(args.server, token=args.token, timeout=args.timeout, **tls_options(args)) as client:
        if getattr(args, "action", None) == "adopt":
            models = [client.adopt_recommendation(args.model, args.job)]
        else:
            models = client.models()
    if args.json:
        print(json.dumps([MessageToDict(m, preserving_proto_field_name=True) for m in models], indent=2))
        return 0
    for m in models:
        _print(m)
    return 0
