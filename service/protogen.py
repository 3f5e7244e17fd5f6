"""Regenerates the committed protobuf/gRPC modules: `python -m service.protogen`.

The generated modules live in service/_proto/. protoc writes the gRPC module
with an absolute import of its message module; it is rewritten to a relative
one so the package needs no sys.path entry. `--check` exits 1 when the
committed files differ from what the proto would generate now.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_FILE = "attribution/v1/attribution.proto"
OUT_DIR = ROOT / "service" / "_proto"
GENERATED = ("attribution_pb2.py", "attribution_pb2.pyi", "attribution_pb2_grpc.py")


def generate(out_dir: pathlib.Path) -> None:
    import grpc_tools  # test/dev extra only
    from grpc_tools import protoc

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"   # google/protobuf/any.proto and the rest
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", str(PROTO_ROOT / PROTO_FILE)]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        src = pathlib.Path(tmp) / "attribution" / "v1"
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in GENERATED:
            text = (src / name).read_text()
            text = text.replace("from attribution.v1 import attribution_pb2",
                                "from . import attribution_pb2")
            (out_dir / name).write_text(text)
    init = out_dir / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated from proto/attribution/v1/attribution.proto: do not edit."""\n')


def stale_files() -> list[str]:
    """Names of committed generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = pathlib.Path(tmp)
        generate(fresh)
        return [n for n in GENERATED
                if not (OUT_DIR / n).exists() or (OUT_DIR / n).read_text() != (fresh / n).read_text()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated files: " + ", ".join(stale) + "; run python -m service.protogen")
            return 1
        print("generated files are current")
        return 0
    generate(OUT_DIR)
    print(f"wrote {', '.join(GENERATED)} to {OUT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
