"""What a load run produces, shared by `attribution loadtest` (cli.py) and `--compare` (compare.py):
the measured levels of one target, their output files, and the run's timestamp."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
from typing import Callable

from loadtests import report
from loadtests.loadgen import LevelResult, LoadGenerator, fetch_models, run_levels
from loadtests.requests import encode_requests
from loadtests.scenario import LoadSpec, Scenario


@dataclasses.dataclass
class TargetRun:
    """One target's measured levels: summary rows and the raw OK latencies per level."""

    name: str
    address: str
    rows: list[dict]
    latencies: list[list[float]]


async def measure(name: str, address: str, scenario: Scenario, load: LoadSpec, metrics_url: str | None = None,
                  channels: int = 1, echo: Callable[[str], None] = print) -> TargetRun:
    """Runs every level of `load` against `address` and summarizes each as it finishes."""
    models = await fetch_models(address)
    prepared = encode_requests(scenario, models)
    labels = [e.entry.label for e in prepared.entries]
    scrape = None if metrics_url is None else (lambda: report.scrape(metrics_url))
    rows: list[dict] = []

    def on_level(result: LevelResult) -> None:
        rows.append(report.summarize_level(result, labels))
        echo(report.format_level(rows[-1], name))

    async with LoadGenerator(address, prepared, channels=channels, scrape=scrape) as gen:
        results = await run_levels(gen, load.mode, load.levels, load.duration_s, load.warmup_s, load.max_requests,
                                   on_level)
    return TargetRun(name, address, rows, [report.latencies_of(r) for r in results])


def write_outputs(args: argparse.Namespace, payload: dict, rows: dict[str, list[dict]],
                   latencies: dict[str, list[list[float]]]) -> None:
    if args.json:
        print(f"wrote {report.write_json(args.json, payload)}")
    if args.plots:
        for path in report.plot_levels(rows, latencies, args.plots):
            print(f"wrote {path}")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
