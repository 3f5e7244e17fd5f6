"""`attribution models --server HOST:PORT`: models, layers and methods of a server."""
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


def run(args: argparse.Namespace) -> int:
    with AttributionClient(args.server, token=args.token, timeout=args.timeout, **tls_options(args)) as client:
        models = client.models()
    if args.json:
        print(json.dumps([MessageToDict(m, preserving_proto_field_name=True) for m in models], indent=2))
        return 0
    for m in models:
        spec = m.input_spec
        star = " (default)" if m.is_default else ""
        resize = spec.resize or "stretch"
        if resize == "center_crop":
            resize += f" {spec.crop_fraction:g}"
        print(f"{m.name}{star}  version {m.version[:16]}  input {spec.channels}x{spec.height}x{spec.width} "
              f"({resize})  classes {m.num_classes}")
        print(f"  CAM layers: {', '.join(m.cam_layers) or '-'} (default {m.default_cam_layer or '-'})")
        print(f"  online:  {', '.join(pb.Method.Name(x).lower() for x in m.online_methods)}")
        print(f"  offline: {', '.join(pb.Method.Name(x).lower() for x in m.offline_methods)}")
    return 0
