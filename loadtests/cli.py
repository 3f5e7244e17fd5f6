"""`attribution loadtest`: drive a server with a scenario, or `--compare` three targets; print, JSON, plots.

    attribution loadtest --server 127.0.0.1:50051 --metrics-url http://127.0.0.1:9090/metrics \\
        --scenario loadtests/scenarios/default.yaml --closed 1,4,16,32,64 --duration 20 --warmup 5 \\
        --json out/load.json --plots out/plots
    attribution loadtest --server 127.0.0.1:50051 --open 5,10,20
    attribution loadtest --compare --scenario loadtests/scenarios/gradcam_resnet18.yaml --json out/compare.json

Also `python -m loadtests.cli ...`. service/cli/__init__.py wires `add_arguments` and
`run` under the `loadtest` subcommand.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from typing import Any

from loadtests import report
from loadtests.loadgen import LoadgenError
from loadtests.runs import TargetRun, measure, now, write_outputs  # noqa: F401  (TargetRun: the API)
from loadtests.scenario import (DEFAULT_SCENARIO, SCENARIO_DIR, LoadSpec, Scenario, ScenarioError, check_load,
                                load_scenario)


OVERLOAD_SCENARIO = SCENARIO_DIR / "overload.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("--server", metavar="HOST:PORT", help="the server to load (loopback only)")
    target.add_argument("--metrics-url", metavar="URL",
                        help="its Prometheus endpoint, e.g. http://127.0.0.1:9090/metrics (loopback only); "
                             "adds the server's view: queue vs compute time, batch sizes")
    target.add_argument("--compare", action="store_true",
                        help="start and load, one after another: our service, our service with batching off, "
                             "and the peer baseline; then measure the in-process kernel and print the ratios")
    target.add_argument("--overload", action="store_true",
                        help="measure saturation S, then offer 2x, 4x and 8x S open loop with the scenario's "
                             "deadlines (default scenario: loadtests/scenarios/overload.yaml); starts the service "
                             "itself unless --server is given")
    target.add_argument("--multiples", metavar="M1,M2,...", default="2,4,8",
                        help="--overload: the offered loads, as multiples of S (default 2,4,8)")
    target.add_argument("--config", metavar="FILE",
                        help="--compare: the service config (models, batching) to start; default: the "
                             "scenario's `serve` section")
    target.add_argument("--targets", default="batched,unbatched,peer",
                        help="--compare: which targets to run (default: all three)")
    load = parser.add_argument_group("load (overrides the scenario's `load` section)")
    load.add_argument("--scenario", metavar="FILE", help=f"scenario YAML (default: {DEFAULT_SCENARIO.name}; "
                                                          "with --overload, overload.yaml)")
    mode = load.add_mutually_exclusive_group()
    mode.add_argument("--closed", metavar="C1,C2,...", help="closed loop: concurrency sweep, e.g. 1,4,16,32,64")
    mode.add_argument("--open", metavar="R1,R2,...", help="open loop: arrival rates in requests/s, e.g. 5,10")
    load.add_argument("--duration", type=float, metavar="S", help="measured seconds per level")
    load.add_argument("--warmup", type=float, metavar="S", help="unmeasured seconds before each level")
    load.add_argument("--max-requests", type=int, metavar="N", help="hard cap on requests per level")
    load.add_argument("--headline", type=float, metavar="LEVEL", help="--compare: the level the ratios are taken at")
    load.add_argument("--interleave", type=int, default=3, metavar="N",
                      help="--compare, closed loop: rounds of service and in-process kernel windows, alternating, "
                           "for service_overhead_interleaved (0 = none)")
    load.add_argument("--channels", type=int, default=1, help="gRPC channels (TCP connections) to spread clients over")
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    out.add_argument("--plots", metavar="DIR", help="write PNG plots here: latency CDF per level, throughput and p99")
    out.add_argument("--quiet", action="store_true", help="only the summary lines")


def effective_load(spec: LoadSpec, args: argparse.Namespace) -> LoadSpec:
    """The scenario's load with the command line's overrides applied and re-checked."""
    changes: dict[str, Any] = {}
    if args.closed:
        changes.update(closed=_numbers(args.closed, int, "--closed"), open=())
    if args.open:
        changes.update(open=_numbers(args.open, float, "--open"), closed=())
    for name, key in (("duration", "duration_s"), ("warmup", "warmup_s"), ("max_requests", "max_requests"),
                      ("headline", "headline")):
        if getattr(args, name, None) is not None:
            changes[key] = getattr(args, name)
    new = dataclasses.replace(spec, **changes)
    if new.headline and new.headline not in new.levels and args.headline is None:
        new = dataclasses.replace(new, headline=0.0)  # the scenario's headline is not among the new levels
    check_load(new)
    return new


def _numbers(text: str, kind: type, flag: str) -> tuple:
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ScenarioError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ScenarioError(f"{flag}: expected positive numbers, got {text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    """The `loadtest` subcommand; returns the exit status."""
    try:
        default = OVERLOAD_SCENARIO if args.overload else DEFAULT_SCENARIO
        scenario = load_scenario(args.scenario or str(default))
        load = effective_load(scenario.load, args)
        if args.metrics_url:
            report.check_metrics_url(args.metrics_url)
        if args.overload:
            if args.compare:
                raise LoadgenError("--overload and --compare are separate runs; give one")
            from loadtests.overload import run as run_overload

            return run_overload(scenario, load, args)
        if args.compare:
            from loadtests.compare import run_compare

            return run_compare(scenario, load, args)
        if not args.server:
            raise LoadgenError("give --server HOST:PORT (or --compare to start the targets here)")
        return _run_single(scenario, load, args)
    except (ScenarioError, LoadgenError) as exc:
        print(f"attribution loadtest: {exc}", file=sys.stderr)
        return 2


def _run_single(scenario: Scenario, load: LoadSpec, args: argparse.Namespace) -> int:
    echo = (lambda line: None) if args.quiet else print
    print(f"loadtest {scenario.name} against {args.server}: {load.mode} loop, levels {list(load.levels)}, "
          f"{load.warmup_s:g}s warm-up + {load.duration_s:g}s each")
    started = now()
    run_ = asyncio.run(measure("service", args.server, scenario, load, args.metrics_url, args.channels, echo))
    payload = {"kind": "loadtest", "started_at": started, "target": args.server, "metrics_url": args.metrics_url,
               "scenario": scenario.to_dict(), "load": dataclasses.asdict(load), "machine": report.machine(),
               "levels": run_.rows}
    if args.quiet:
        for row in run_.rows:
            print(report.format_level(row))
    write_outputs(args, payload, {"service": run_.rows}, {"service": run_.latencies})
    failed = sum(r["ok"] for r in run_.rows) == 0
    if failed:
        print("no request succeeded; see the error counts above", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.cli", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(run(args))


if __name__ == "__main__":
    main()
