"""The README's Python snippet runs as written against a real server (the in-process front door on the
demo model): only its address is replaced, by the test server's."""
from __future__ import annotations

import pathlib
import re

import numpy as np

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
