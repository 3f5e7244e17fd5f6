"""The README runs as written: its Python snippet against a real server (the in-process front door on the
demo model; only its address is replaced, by the test server's), and its `attribution evaluate` line."""
from __future__ import annotations

import json
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
ADDRESS = "localhost:50051"


def python_snippets() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.S | re.M)


def test_the_python_snippet_runs_as_written(server, capsys):
    (snippet,) = python_snippets()  # a second snippet needs its own test
    assert snippet.count(ADDRESS) == 1, "the snippet names the service's address once"
    namespace: dict = {}
    exec(compile(snippet.replace(ADDRESS, server.address), str(README), "exec"), namespace)
    maps = namespace["maps"]
    assert maps.dtype == np.float32 and maps.shape == (2, 1, 64, 64) and np.isfinite(maps).all()
    assert namespace["result"].method == "smoothgrad"
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and re.fullmatch(r"\[\d(, \d)*\] \{'queue_ms': .*'batch_requests': \d+\}",
                                              printed[0]), printed


@pytest.mark.process
@pytest.mark.slow
def test_the_evaluate_command_runs_as_written(demo_cache_dir, demo_model, tmp_path):
    """The README's `attribution evaluate --local` line, with only its output directory moved into a temporary
    one and the suite's demo-model cache given as --config (so nothing is trained twice): it prints the
    ranking and writes the report."""
    (line,) = [ln for ln in README.read_text().splitlines() if ln.startswith("attribution evaluate --local")]
    argv = shlex.split(line, comments=True)
    assert argv.count("report/") == 1
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"models": [{"name": "demo", "source": "demo"}], "cache_dir": str(demo_cache_dir)}))
    argv = [str(tmp_path / "report") if a == "report/" else a for a in argv[1:]] + ["--config", str(config)]
    done = subprocess.run([sys.executable, "-m", "service.cli", *argv], capture_output=True, text=True,
                          timeout=600, cwd=README.parent)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["#", "method"] and [ln.split()[0] for ln in lines[1:4]] == ["1", "2", "3"]
    assert lines[-2].startswith("recommended: ") and lines[-1].startswith("cost: ")
    assert (tmp_path / "report" / "index.html").is_file() and (tmp_path / "report" / "evaluation.json").is_file()
