"""`attribution serve` up to the point where Ray would start, in-process: the command line's server
keys (the metrics port follows --host), a bad config refused before Ray, what start-up says, and Ray's
own chatter kept out of it unless --verbose. Nothing here starts Ray: `ray.init` is replaced."""
from __future__ import annotations

import asyncio
import json
import logging

import pytest

from service.cli import CliError, build_parser
from service.cli import serve as serve_cli
from service.settings import ServiceConfig


def serve_args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


@pytest.mark.parametrize("argv, expected", [
    ([], {}),
    (["--host", "127.0.0.1"], {"host": "127.0.0.1", "metrics_host": "127.0.0.1"}),
    (["--host", "[::1]", "--port", "0"], {"host": "[::1]", "port": 0, "metrics_host": "::1"}),
    (["--host", "[::]"], {"host": "[::]", "metrics_host": "0.0.0.0"}),
    (["--host", "127.0.0.1", "--metrics-host", "0.0.0.0", "--metrics-port", "9100"],
     {"host": "127.0.0.1", "metrics_host": "0.0.0.0", "metrics_port": 9100}),
])
def test_the_metrics_port_follows_host_unless_given_its_own(argv, expected):
    overrides = serve_cli.server_overrides(serve_args(*argv))
    assert overrides == expected
    server = ServiceConfig.load(None, overrides).server
    assert server.metrics_host == expected.get("metrics_host", "0.0.0.0")


def test_a_bad_config_is_refused_before_ray_starts(tmp_path, monkeypatch, capsys):
    config = tmp_path / "ts.json"
    config.write_text(json.dumps({"models": [{"name": "ts", "source": "torchscript", "path": "/m.ts",
                                              "cam_layer": "layer4"}]}))

    async def must_not_start(*_):
        raise AssertionError("Ray would have started")

    monkeypatch.setattr(serve_cli, "_serve", must_not_start)
    assert serve_cli.run(serve_args("--config", str(config))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attribution serve: invalid config: models[ts].cam_layers: CAM layers layer4")
    assert "\n" not in err and "which support CAM" in err


@pytest.fixture
def ray_loggers():
    """The Ray loggers with whatever `configure_logging` added taken off again afterwards."""
    loggers = [logging.getLogger(name) for name in serve_cli.RAY_LOGGERS]
    before = [list(logger.filters) for logger in loggers]
    yield loggers
    for logger, filters in zip(loggers, before):
        logger.filters[:] = filters


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("verbose", [False, True])
def test_ray_info_chatter_is_hidden_unless_verbose(ray_loggers, verbose):
    serve_cli.configure_logging("INFO", verbose=False)
    serve_cli.configure_logging("INFO", verbose=verbose)  # --verbose takes the filter off again
    for logger in ray_loggers:
        collect, level = _Collect(), logger.level
        logger.addHandler(collect)
        logger.setLevel(logging.INFO)
        try:
            logger.info("Started a local Ray instance.")
            logger.warning("a warning")
        finally:
            logger.removeHandler(collect)
            logger.setLevel(level)
        said = [r.getMessage() for r in collect.records]
        assert said == (["Started a local Ray instance.", "a warning"] if verbose else ["a warning"]), logger.name


@pytest.mark.parametrize("verbose", [False, True])
def test_start_up_says_what_it_does_and_asks_ray_for_warnings_only(tmp_path, monkeypatch, capsys, verbose):
    import ray
    import torch

    asked = {}

    def refuse(**kwargs):
        asked.update(kwargs)
        raise RuntimeError("no room for a raylet\nmore detail")

    monkeypatch.setattr(ray, "init", refuse)
    # Whether or not the test session's own Ray runs, _serve sees none and asks for one (refused above).
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the test process keeps its threads
    argv = ["--port", "0", "--metrics-port", "0", "--data-dir", str(tmp_path)] + ["--verbose"] * verbose
    args = serve_args(*argv)
    with pytest.raises(CliError) as info:
        asyncio.run(serve_cli._serve(args, ServiceConfig.load(None, serve_cli.server_overrides(args))))
    assert capsys.readouterr().out == "attribution: starting a local Ray instance\n"
    assert str(info.value).startswith("Ray did not start: no room for a raylet (its logs:")
    assert asked["logging_level"] == (logging.INFO if verbose else logging.WARNING)
    assert asked["log_to_driver"] is False and asked["include_dashboard"] is False


def test_only_loopback_ray_addresses_are_kept_on_loopback():
    from service.cli.serve import is_loopback_address

    assert all(is_loopback_address(a) for a in ("127.0.0.1:6379", "localhost:6379", "[::1]:6379",
                                                 "ray://127.0.0.1:10001", "127.0.0.5:1"))
    assert not any(is_loopback_address(a) for a in ("10.0.0.4:6379", "head.cluster:6379", "auto", "[::]:1"))
