"""deploy/prometheus/: promtool checks the shipped config and rules and runs their unit tests; a real
Prometheus (Debian's package) scrapes a running front door and loads the rules, read back over its HTTP API.

Skipped where Prometheus is not installed (apt-get install prometheus), unless ATTRIBUTION_REQUIRE_SYSTEM=1
(.ci/run), where a missing binary fails instead.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import grpc
import pytest
import yaml

from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc
from tests.service.conftest import explain_request

DEPLOY = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULE_FILES = ("attribution.rules.yml", "attribution.alerts.yml")
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")

needs_promtool = pytest.mark.skipif(PROMTOOL is None and os.environ.get("ATTRIBUTION_REQUIRE_SYSTEM") != "1",
                                    reason="promtool is not installed (apt-get install prometheus)")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None and os.environ.get("ATTRIBUTION_REQUIRE_SYSTEM") != "1",
                                      reason="prometheus is not installed (apt-get install prometheus)")


def _promtool(*args: str) -> str:
    """Runs promtool in deploy/prometheus (where the config names its rule files); its output, or a failure."""
    done = subprocess.run([PROMTOOL or "promtool", *args], cwd=DEPLOY, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.mark.process
@needs_promtool
def test_promtool_accepts_the_config_and_rules():
    out = _promtool("check", "rules", *RULE_FILES)
    assert out.count("SUCCESS") == len(RULE_FILES)
    _promtool("check", "config", "prometheus.yml")  # also checks the rule files it names


@pytest.mark.process
@needs_promtool
def test_every_alert_fires_and_stays_silent_in_the_rule_unit_tests():
    _promtool("test", "rules", "tests.yml")
    alerts = {rule["alert"] for group in yaml.safe_load((DEPLOY / "attribution.alerts.yml").read_text())["groups"]
              for rule in group["rules"]}
    tested = {case["alertname"] for test in yaml.safe_load((DEPLOY / "tests.yml").read_text())["tests"]
              for case in test.get("alert_rule_test", [])}
    assert alerts == tested, "every alert needs a unit test in deploy/prometheus/tests.yml"


# ----------------------------------------------------------------- a real Prometheus

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(metrics_port: int) -> dict:
    """The shipped prometheus.yml, scraping only this front door every second, with the shipped rules."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / name) for name in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    return config


class PrometheusServer:
    """Debian's prometheus on a free loopback port with its storage in `directory`; stop() ends it."""

    def __init__(self, directory: pathlib.Path, config: dict):
        self.port = _free_port()
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (directory / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [PROMETHEUS or "prometheus", f"--config.file={directory / 'prometheus.yml'}",
             f"--storage.tsdb.path={directory / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def get(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as answer:
            return json.loads(answer.read()) if path.startswith("/api/") else {}

    def query(self, expr: str) -> list[dict]:
        answer = self.get("/api/v1/query", query=expr)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def wait_until(self, check, what: str, timeout: float = 30.0):
        """check()'s first truthy result, polling; fails (with Prometheus's log) after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"prometheus exited: {self.log_text()}"
            try:
                found = check()
            except OSError:  # not listening yet
                found = None
            if found:
                return found
            if time.monotonic() > deadline:
                pytest.fail(f"Prometheus never showed {what} in {timeout} s; its log:\n{self.log_text()}")
            time.sleep(0.25)

    def log_text(self) -> str:
        self.log.flush()
        return pathlib.Path(self.log.name).read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


def _value(result: list[dict]) -> float | None:
    return float(result[0]["value"][1]) if result else None


@pytest.mark.process
@pytest.mark.slow
@needs_prometheus
def test_a_real_prometheus_scrapes_the_front_door_and_evaluates_the_rules(observed_server, demo_batch, tmp_path):
    port = observed_server.running.metrics_port
    assert port
    prometheus = PrometheusServer(tmp_path, _config(port))
    try:
        with grpc.insecure_channel(observed_server.address) as channel:
            stub = pb_grpc.AttributionServiceStub(channel)
            for _ in range(3):
                stub.Explain(explain_request(demo_batch.images[:1]), timeout=60)
            with pytest.raises(grpc.RpcError):
                stub.Explain(explain_request(demo_batch.images[:1], model="nope"), timeout=60)
        prometheus.wait_until(lambda: prometheus.get("/-/ready") == {}, "readiness")
        ok = 'sum(attribution_requests_total{job="attribution", model="demo", code="OK"})'
        prometheus.wait_until(lambda: _value(prometheus.query(ok)) == 3, "three OK calls")
        assert _value(prometheus.query('sum(attribution_requests_total{code="NOT_FOUND"})')) == 1
        assert _value(prometheus.query('up{job="attribution"}')) == 1
        # The recording rules evaluate on the scraped series (a rate needs two scrapes).
        prometheus.wait_until(lambda: prometheus.query('model:attribution_requests:rate5m{model="demo"}'),
                              "a recorded rate")

        def rules_evaluated():
            groups = prometheus.get("/api/v1/rules")["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            return groups if rules and all(rule.get("lastEvaluation", "").startswith("20") for rule in rules) else None

        groups = prometheus.wait_until(rules_evaluated, "every rule evaluated")
        assert {group["name"] for group in groups} == {"attribution.rules", "attribution.alerts"}
        assert {group["file"] for group in groups} == {str(DEPLOY / name) for name in RULE_FILES}
        rules = [rule for group in groups for rule in group["rules"]]
        shipped = [rule for name in RULE_FILES
                   for group in yaml.safe_load((DEPLOY / name).read_text())["groups"] for rule in group["rules"]]
        assert len(rules) == len(shipped)
        assert [(rule["name"], rule["health"], rule.get("lastError", "")) for rule in rules
                if rule["health"] != "ok"] == []
        # A healthy front door under light load: nothing fires.
        firing = [rule["name"] for rule in rules if rule.get("state") == "firing"]
        assert firing == []
    finally:
        prometheus.stop()
