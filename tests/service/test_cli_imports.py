"""`attribution --help`, every `attribution X --help` and argument errors answer without torch or Ray."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import contextlib, io, json, sys
from service.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "ray", "torchvision") if m in sys.modules),
                  "text": out.getvalue()[-400:]}))
"""

ARGVS = [["--help"], ["serve", "--help"], ["explain", "--help"], ["models", "--help"], ["jobs", "--help"],
         ["audit", "--help"], ["audit", "verify", "--help"], ["health", "--help"], ["deploy", "serve-config", "--help"],
         ["loadtest", "--help"], ["bench", "kernels", "--help"],
         ["evaluate", "--help"], ["serve", "--port", "not-a-number"], ["explain"], ["evaluate"],
         ["evaluate", "--demo", "2", "--local"], ["no-such-command"]]


@pytest.mark.process
@pytest.mark.parametrize("argv", ARGVS, ids=[" ".join(a) for a in ARGVS])
def test_help_and_argument_errors_import_neither_torch_nor_ray(argv):
    run = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    answer = json.loads(run.stdout.strip().splitlines()[-1])
    assert answer["heavy"] == [], answer
    assert answer["code"] in (0, 2), answer
    assert "Traceback" not in answer["text"]
