"""The committed generated gRPC code is what the proto generates now; a stale copy fails here."""
from __future__ import annotations

import pathlib

from service import protogen


def test_committed_generated_code_matches_the_proto():
    assert protogen.stale_files() == [], "run `python -m service.protogen` and commit service/_proto/"


def test_the_check_notices_a_changed_file(tmp_path, monkeypatch):
    copy = tmp_path / "_proto"
    copy.mkdir()
    for name in protogen.GENERATED:
        (copy / name).write_text((protogen.OUT_DIR / name).read_text())
    (copy / "attribution_pb2.pyi").write_text((copy / "attribution_pb2.pyi").read_text() + "\n# edited\n")
    monkeypatch.setattr(protogen, "OUT_DIR", pathlib.Path(copy))
    assert protogen.stale_files() == ["attribution_pb2.pyi"]
