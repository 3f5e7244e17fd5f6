"""The one config: every section checked before anything starts, unknown keys named by path."""
from __future__ import annotations

import subprocess
import sys

import pytest

from service.settings import ServiceConfig
from workers.errors import InvalidArgument

BAD = [
    ({"sever": {}}, "the config file", "sever"),
    ({"server": {"limits": {"max_itmes": 3}}}, "server.limits", "max_itmes"),
    ({"server": {"admission": {"target_delay": 1}}}, "server.admission", "target_delay"),
    ({"server": {"coalesce": {"max_requests": 0}}}, "server.coalesce.max_requests", "1..4096"),
    ({"server": {"port": "fifty"}}, "server.port", "integer"),
    ({"batching": {"max_batch": 8}}, "batching", "max_batch"),
    ({"batching": {"max_batch_samples": 0}}, "batching.max_batch_samples", "1..1e6"),
    ({"models": [{"name": "a", "source": "demo", "colour": 1}]}, "models[a]", "colour"),
    ({"models": [{"source": "demo"}]}, "models[0]", "name"),
    ({"models": [{"name": "a", "source": "demo", "input": {"hieght": 8}}]}, "models[a].input", "hieght"),
    ({"models": [{"name": "a", "source": "demo", "autoscaling": {"max": 2}}]}, "models[a].autoscaling", "max"),
    ({"jobs": {"concurency": 2}}, "jobs", "concurency"),
    ({"jobs": {"offline": {"replica": 2}}}, "jobs.offline", "replica"),
    ({"jobs": {"offline": {"replicas": 0}}}, "jobs.offline.replicas", ">= 1"),
    ({"audit": {"enable": True}}, "audit", "enable"),
    ({"audit": {"when_full": "later"}}, "audit.when_full", "block"),
    ({"limits": {"max_items": 2}}, "the config file", "limits"),
]


@pytest.mark.parametrize("raw, path, word", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_every_level_refuses_what_it_does_not_know_naming_the_path(raw, path, word):
    with pytest.raises(InvalidArgument) as caught:
        ServiceConfig.from_dict(raw)
    (violation,) = caught.value.violations
    assert violation.field == path and word in violation.description, caught.value


def test_server_limits_reach_the_workers_and_overrides_apply():
    config = ServiceConfig.from_dict({"server": {"limits": {"max_items": 8, "max_samples": 512}}},
                                     {"port": 0, "host": "127.0.0.1"})
    assert config.app.limits.max_items == 8 and config.app.limits.max_samples == 512
    assert (config.server.port, config.server.host) == (0, "127.0.0.1")


@pytest.mark.process
def test_check_validates_a_file_and_exits(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("models:\n  - {name: demo, source: demo}\nserver: {port: 50051}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - {name: demo, source: demo}\nsever: {port: 50051}\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [\n")
    run = lambda path: subprocess.run([sys.executable, "-m", "service.cli", "serve", "--config", str(path), "--check"],
                                      capture_output=True, text=True, timeout=120)
    ok = run(good)
    assert ok.returncode == 0 and "valid" in ok.stdout and "demo" in ok.stdout, ok.stderr
    for path, word in ((bad, "sever"), (broken, "does not parse"), (tmp_path / "missing.yaml", "cannot read")):
        failed = run(path)
        assert failed.returncode == 2 and word in failed.stderr and "Traceback" not in failed.stderr, failed.stderr


def test_replicas_are_placed_by_custom_ray_resources():
    from workers.config import BatchingConfig, ModelConfig, OfflineConfig
    from workers.errors import InvalidArgument
    from workers.serve.offline import offline_deployment
    from workers.serve.online import online_deployment

    config = ServiceConfig.from_dict({"models": [{"name": "big", "source": "demo", "resources": {"a100": 1}}],
                                      "jobs": {"offline": {"resources": {"batch_node": 0.5}}}})
    (model,) = config.app.models
    assert online_deployment(model, BatchingConfig()).ray_actor_options["resources"] == {"a100": 1}
    assert offline_deployment(config.jobs.offline).ray_actor_options["resources"] == {"batch_node": 0.5}
    assert "resources" not in online_deployment(ModelConfig(name="m", source="demo"),
                                                BatchingConfig()).ray_actor_options
    for bad, words in (({"GPU": 1}, "use num_cpus / num_gpus"), ({"a100": -1}, "a number >= 0"),
                       (["a100"], "mapping of resource names")):
        with pytest.raises(InvalidArgument, match=words):
            ModelConfig(name="m", source="demo", resources=bad)
    with pytest.raises(InvalidArgument, match="jobs.offline.resources"):
        OfflineConfig(resources={"x": "many"})
