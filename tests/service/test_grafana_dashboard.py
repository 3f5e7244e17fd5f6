"""deploy/grafana/attribution-dashboard.json: every metric its queries name is one a running front door exports.

A dashboard query on a misspelt or renamed metric shows "No data" instead of failing, so the names are
checked here against a real /metrics scrape of a front door with jobs and an audit log, after real calls
and a finished job (the histograms and job series only appear once something happened).
"""
from __future__ import annotations

import json
import pathlib
import re
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc
from tests.service.conftest import explain_request, pixels_tensor

ROOT = pathlib.Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "attribution-dashboard.json"

# PromQL words that look like names but are not metrics.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
            "offset", "inf", "nan"}
# Each sample a family of this type exports, by suffix (the text parser drops a counter's _total).
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count"),
            "gauge": ("",), "untyped": ("",)}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana label_values() query) selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings first: they may hold braces or names
    text = re.sub(r"\{[^}]*\}", " ", text)           # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)          # range and subquery selectors ($__rate_interval too)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    text = re.sub(r"\$\{?\w+\}?", " ", text)         # Grafana variables outside selectors
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if not call and name.lower() not in KEYWORDS:
            names.add(name)
    return names


def test_metric_names_strips_functions_matchers_and_label_lists():
    expr = ('histogram_quantile(0.9, sum by (le, model) (rate(attribution_queue_seconds_bucket'
            '{model=~"$model", code!="a{b}"}[$__rate_interval]))) / on (model) group_left '
            'max without (instance) (attribution_jobs) > 1e3 and ignoring(x) up offset 5m')
    assert metric_names(expr) == {"attribution_queue_seconds_bucket", "attribution_jobs", "up"}
    assert metric_names("label_values(attribution_requests_total, model)") == {"attribution_requests_total",
                                                                               "model"}


def _queries(dashboard: dict) -> list[str]:
    """Every PromQL the dashboard runs: panel targets (rows' nested panels too) and query variables."""
    exprs = []
    panels = list(dashboard["panels"])
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels", []))
        exprs.extend(target["expr"] for target in panel.get("targets", []) if target.get("expr"))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def _selected(expr: str) -> set[str]:
    """metric_names, less label_values()' label argument."""
    labels = set(re.findall(r"label_values\(\s*[^,()]*?,\s*(\w+)\s*\)", expr))
    return metric_names(expr) - labels


def _exported(metrics_port: int) -> set[str]:
    """Every sample name http://127.0.0.1:port/metrics exports, declared families' samples included."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        # A labelled counter is declared before its first event (e.g. no audit record dropped yet).
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def _run_traffic(address: str, demo_batch) -> None:
    """Explain calls (one for an unknown model) and a job run to its end."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.AttributionServiceStub(channel)
        for method in (pb.VANILLA_GRADIENT, pb.GRAD_CAM):
            stub.Explain(explain_request(demo_batch.images[:2], method), timeout=60)
        with pytest.raises(grpc.RpcError):
            stub.Explain(explain_request(demo_batch.images[:1], model="nope"), timeout=60)
        request = pb.ExplainRequest(method=pb.GRAD_CAM, inputs=pb.Inputs(tensor=pixels_tensor(demo_batch.images[:2]),
                                                                         space=pb.PIXELS))
        job = stub.SubmitJob(pb.SubmitJobRequest(request=request), timeout=30)
        deadline = time.monotonic() + 60
        while stub.GetJob(pb.GetJobRequest(id=job.id), timeout=10).state not in (pb.SUCCEEDED, pb.FAILED):
            assert time.monotonic() < deadline, "the job did not finish in 60 s"
            time.sleep(0.2)


def test_every_dashboard_query_names_a_metric_the_service_exports(observed_server, demo_batch):
    dashboard = json.loads(DASHBOARD.read_text())
    queries = _queries(dashboard)
    assert len(queries) >= 10
    _run_traffic(observed_server.address, demo_batch)
    exported = _exported(observed_server.running.metrics_port)
    used = {name: expr for expr in queries for name in _selected(expr)}
    assert used, "no metric found in the dashboard's queries"
    missing = {name: expr for name, expr in used.items() if name not in exported}
    assert missing == {}, "dashboard queries name metrics the front door does not export"
    # The panels the issue asks for are there, each with a query.
    titles = " / ".join(panel["title"].lower() for panel in dashboard["panels"] if panel.get("targets"))
    for topic in ("latency", "queue", "compute", "throughput", "batch", "errors by code", "goodput", "offered",
                  "jobs", "audit"):
        assert topic in titles, topic
