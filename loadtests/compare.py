"""`attribution loadtest --compare`: our service batched, unbatched, and the peer, one after another, then the kernel.

Each target runs in its own subprocess, started, loaded and stopped before the
next one starts, so the three never share the machine:

  batched    `python -m loadtests.compare serve-target`: a local Ray instance, the
             Serve apps of the config (workers.serve.app.deploy_all), the gRPC front
             door (service.server.create_server over ServeBackend) with its
             Prometheus exporter; all on 127.0.0.1, ports chosen by the OS.
  unbatched  the same with `batching.max_batch_samples: 1`.
  peer       `python -m loadtests.peer_baseline`: Captum / pytorch-grad-cam per request.

Subprocesses rather than in-process servers because the load generator must
not share a GIL and an event loop with the server it measures. A target
reports readiness by writing {port, metrics_port} to a file; its log goes to a
file in the work directory, printed when it fails to start.

Last, with every target stopped, the in-process kernel (workers.pipeline.explain_batch
on the same model, same torch thread count, same requests) is timed at the
batch size the batched service formed at the headline level: service_overhead
is the service's end-to-end throughput over that. That kernel figure is taken
minutes after the service's, so the machine's drift enters the ratio; a closed
loop therefore also measures them interleaved (`--interleave N`, 3 by default):
while the batched target still runs, N rounds of one service window at the
headline level followed by one in-process kernel window at the batch the service
just formed (the service idle meanwhile), and service_overhead_interleaved is the
median of the rounds' ratios, each taken from two windows a few seconds apart.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from loadtests import report
from loadtests.runs import TargetRun, measure, now, write_outputs
from loadtests.loadgen import LoadgenError
from loadtests.requests import mix_schedule
from loadtests.scenario import LoadSpec, Scenario
from workers.config import load_config_file

log = logging.getLogger(__name__)

TARGETS = ("batched", "unbatched", "peer")
STARTUP_TIMEOUT_S = 600.0   # a cold Ray start plus a model load on a busy 2-core machine
STOP_TIMEOUT_S = 60.0
KERNEL_MAX_S = 10.0


def target_configs(app_raw: dict) -> dict[str, dict]:
    """The AppConfig dict each target starts with."""
    unbatched = copy.deepcopy(app_raw)
    unbatched.setdefault("batching", {})["max_batch_samples"] = 1
    return {"batched": copy.deepcopy(app_raw), "unbatched": unbatched, "peer": copy.deepcopy(app_raw)}


class TargetProcess:
    """A target server in a subprocess we started; `stop()` ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, app_raw: dict, workdir: pathlib.Path):
        self.name = name
        self.config_path = workdir / f"{name}.json"
        self.config_path.write_text(json.dumps(app_raw))
        self.ready_path = workdir / f"{name}.ready.json"
        self.log_path = workdir / f"{name}.log"
        module = "loadtests.peer_baseline" if name == "peer" else "loadtests.compare"
        command = [sys.executable, "-m", module] + ([] if name == "peer" else ["serve-target"])
        command += ["--port", "0", "--config", str(self.config_path), "--ready-file", str(self.ready_path)]
        self._log = open(self.log_path, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=pathlib.Path(__file__).resolve().parent.parent)

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> dict:
        """{port, metrics_port?} once the target serves; LoadgenError (with its log) if it dies or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready_path.exists():
                return json.loads(self.ready_path.read_text())
            if self.proc.poll() is not None:
                break
            time.sleep(0.25)
        tail = self.log_path.read_text(errors="replace")[-4000:]
        self.stop()
        raise LoadgenError(f"target {self.name} did not start (exit {self.proc.returncode}); log tail:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("target %s ignored SIGTERM for %.0f s; killing it", self.name, STOP_TIMEOUT_S)
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def run_compare(scenario: Scenario, load: LoadSpec, args: argparse.Namespace) -> int:
    app_raw = app_config(scenario, args.config)
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(names) - set(TARGETS)
    if unknown or not names:
        raise LoadgenError(f"--targets: choose among {', '.join(TARGETS)}, got {args.targets!r}")
    print(f"compare {scenario.name}: {', '.join(names)}; {load.mode} loop, levels {list(load.levels)}, "
          f"{load.warmup_s:g}s warm-up + {load.duration_s:g}s each; headline level {load.headline_level:g}")
    started = now()
    runs: dict[str, TargetRun] = {}
    startup: dict[str, float] = {}
    interleaved = None
    with tempfile.TemporaryDirectory(prefix="loadtest-compare-") as tmp:
        configs = target_configs(app_raw)
        for name in names:
            after = None
            if name == "batched" and load.mode == "closed" and getattr(args, "interleave", 0) > 0:
                def after(address: str, run_: TargetRun) -> None:
                    nonlocal interleaved
                    interleaved = measure_interleaved(address, app_raw, scenario, load, run_, args)
            runs[name], startup[name] = _run_target(name, configs[name], pathlib.Path(tmp), scenario, load, args,
                                                    after)
    kernel = None
    if "batched" in runs:
        headline = _row_at(runs["batched"].rows, load.headline_level)
        kernel = measure_kernel(app_raw, scenario, (headline or {}).get("mean_batch_requests") or 1.0,
                                min(load.duration_s, KERNEL_MAX_S))
    payload = summarize(scenario, load, runs, kernel, started, startup)
    payload["interleaved"] = interleaved
    payload["service_overhead_interleaved"] = (interleaved or {}).get("service_overhead")
    _print_ratios(payload)
    write_outputs(args, payload, {n: r.rows for n, r in runs.items()}, {n: r.latencies for n, r in runs.items()})
    return 0


FRONT_DOOR_KEYS = ("torch_threads", "cpu_affinity", "admission", "coalesce", "inline_max_bytes")


def app_config(scenario: Scenario, path: str | None) -> dict:
    raw = load_config_file(path) if path else dict(scenario.serve)
    # The front door's section: host, ports and the rest are fixed here; only where
    # it computes (torch_threads, cpu_affinity) is the scenario's to choose.
    server = {k: v for k, v in (raw.get("server") or {}).items() if k in FRONT_DOOR_KEYS}
    raw = {k: v for k, v in raw.items() if k != "server"} | ({"server": server} if server else {})
    if not raw.get("models"):
        raise LoadgenError("--compare needs models to start: give --config FILE or a `serve:` section "
                           "in the scenario")
    from service.settings import ServiceConfig

    ServiceConfig.from_dict(copy.deepcopy(raw))  # fail here, not in three subprocesses
    return raw


def _run_target(name: str, app_raw: dict, workdir: pathlib.Path, scenario: Scenario, load: LoadSpec,
                args: argparse.Namespace, after=None) -> tuple[TargetRun, float]:
    """Starts, loads and stops one target; `after(address, run)` runs while it still serves."""
    target = TargetProcess(name, app_raw, workdir)
    try:
        ready = target.wait_ready()
        startup_s = time.monotonic() - target.started
        print(f"[{name}] serving on 127.0.0.1:{ready['port']} after {startup_s:.1f} s")
        metrics = f"http://127.0.0.1:{ready['metrics_port']}/metrics" if ready.get("metrics_port") else None
        echo = (lambda line: None) if args.quiet else print
        address = f"127.0.0.1:{ready['port']}"
        run_ = asyncio.run(measure(name, address, scenario, load, metrics, args.channels, echo))
        if after is not None:
            after(address, run_)
    finally:
        target.stop()
    return run_, startup_s


class KernelBench:
    """workers.pipeline.explain_batch in this process on the scenario's main model, as a replica runs it."""

    def __init__(self, app_raw: dict, scenario: Scenario):
        import torch

        from service._proto import attribution_pb2 as pb
        from service.model_info import model_info
        from service.config import Limits
        from service.validation import validate_explain
        from service.settings import ServiceConfig
        from workers.batching import FoldBudget
        from workers.models import describe, load_model, select_device
        from workers.pipeline import WorkerContext
        from loadtests.requests import encode_requests

        app = ServiceConfig.from_dict(copy.deepcopy(app_raw)).app
        weights: dict[str, float] = {}
        for entry in scenario.mix:  # the kernel of the model that carries most of the mix
            weights[entry.model or app.default] = weights.get(entry.model or app.default, 0.0) + entry.weight
        cfg = app.model(max(weights, key=weights.__getitem__))
        self.model_name = cfg.name
        self.threads = max(1, int(cfg.num_cpus))  # the replica's torch thread count
        model = load_model(cfg, select_device(app.device), pathlib.Path(app.cache_dir) if app.cache_dir else None)
        described = describe(model, is_default=True)
        prepared = encode_requests(scenario, {cfg.name: model_info(described, Limits())})
        self.specs = [[validate_explain(pb.ExplainRequest.FromString(p), described, Limits()) for p in e.payloads]
                      for e in prepared.entries]
        self.schedule = [i for i in mix_schedule(scenario) if scenario.mix[i].model in ("", cfg.name)] or [0]
        # Chunks as the replica folds them: sized from the measured cost curve (batching.fold_measure).
        self.ctx = WorkerContext.create(model, FoldBudget(measure=app.batching.fold_measure))
        # On a kernel thread, as the replica runs it. Measured here: on a busy 2-core machine the
        # main thread's OpenMP team spin-waits against other processes and runs 10-20x slower.
        self._thread = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(self.threads,))

    def time(self, batch: int, duration_s: float) -> dict:
        return self._thread.submit(_time_kernel, self.ctx, self.specs, self.schedule, max(1, batch),
                                   duration_s).result()

    def close(self) -> None:
        self._thread.shutdown()


def measure_kernel(app_raw: dict, scenario: Scenario, batch_requests: float, duration_s: float) -> dict:
    """Requests/s of workers.pipeline.explain_batch in this process, in batches of `batch_requests`."""
    bench = KernelBench(app_raw, scenario)
    batch = max(1, round(batch_requests))
    try:
        at_batch = bench.time(batch, duration_s)
        at_one = at_batch if batch == 1 else bench.time(1, duration_s)
    finally:
        bench.close()
    return {"model": bench.model_name, "threads": bench.threads, "batch_requests": batch,
            "observed_mean_batch_requests": batch_requests, "rps": at_batch["rps"], "rps_batch_1": at_one["rps"],
            "at_batch": at_batch, "at_batch_1": at_one}


def measure_interleaved(address: str, app_raw: dict, scenario: Scenario, load: LoadSpec, sweep: TargetRun,
                        args: argparse.Namespace) -> dict:
    """Rounds of one service window at the headline level, then one in-process kernel window at the batch
    the service formed in it; the median of the rounds' ratios is the overhead with drift on both sides."""
    import statistics

    level = int(load.headline_level)
    window = min(load.duration_s, KERNEL_MAX_S)
    single = dataclasses.replace(load, closed=(level,), open=(), duration_s=window,
                                 warmup_s=min(load.warmup_s, 2.0))
    bench = KernelBench(app_raw, scenario)
    rounds = []
    try:
        for _ in range(args.interleave):
            row = asyncio.run(measure("batched", address, scenario, single, None, args.channels,
                                      lambda line: None)).rows[0]
            batch = max(1, round(row.get("mean_batch_requests") or 1.0))
            kernel = bench.time(batch, window)
            rounds.append({"service_rps": row["rps"], "batch_requests": batch, "kernel_rps": kernel["rps"],
                           "ratio": _ratio(row["rps"], kernel["rps"])})
            print(f"[interleaved] service {row['rps']} req/s at {level:g} clients (batch {batch}); in-process "
                  f"kernel {kernel['rps']} req/s at batch {batch}: {rounds[-1]['ratio']}")
    finally:
        bench.close()
    ratios = [r["ratio"] for r in rounds if r["ratio"] is not None]
    return {"level": level, "window_s": window, "rounds": rounds,
            "service_overhead": round(statistics.median(ratios), 3) if ratios else None}


def _time_kernel(ctx, specs: list[list], schedule: list[int], batch: int, duration_s: float) -> dict:
    """Back-to-back batches for `duration_s` (after one warm-up batch); bounded at 10000 batches."""
    from workers.pipeline import explain_batch

    def batch_at(k: int) -> list:
        picks = [schedule[(k * batch + j) % len(schedule)] for j in range(batch)]
        return [specs[i][(k + j) % len(specs[i])] for j, i in enumerate(picks)]

    explain_batch(ctx, batch_at(0))
    done, started = 0, time.perf_counter()
    for k in range(1, 10_001):
        outcomes = explain_batch(ctx, batch_at(k))
        bad = [o for o in outcomes if isinstance(o, Exception)]
        if bad:
            raise LoadgenError(f"the in-process kernel failed: {bad[0]!r}")
        done += batch
        if time.perf_counter() - started >= duration_s:
            break
    elapsed = time.perf_counter() - started
    return {"batch_requests": batch, "requests": done, "seconds": round(elapsed, 3), "rps": round(done / elapsed, 3)}


def _row_at(rows: list[dict], level: float) -> dict | None:
    for row in rows:
        if (row["concurrency"] if row["mode"] == "closed" else row["rate"]) == level:
            return row
    return None


def _ratio(num: float | None, den: float | None) -> float | None:
    return round(num / den, 3) if num is not None and den else None


def summarize(scenario: Scenario, load: LoadSpec, runs: dict[str, TargetRun], kernel: dict | None,
              started: str, startup: dict[str, float]) -> dict:
    """The compare JSON: top-level ratios at the headline level, per-level ratios, every target's levels."""
    level = load.headline_level
    rps = {name: (_row_at(run_.rows, level) or {}).get("rps") for name, run_ in runs.items()}
    per_level = []
    for value in load.levels:
        at = {name: (_row_at(run_.rows, value) or {}).get("rps") for name, run_ in runs.items()}
        per_level.append({"level": value, "rps": at,
                          "ratio_vs_unbatched": _ratio(at.get("batched"), at.get("unbatched")),
                          "ratio_vs_peer": _ratio(at.get("batched"), at.get("peer"))})
    return {
        "kind": "compare", "started_at": started, "scenario": scenario.to_dict(), "load": dataclasses.asdict(load),
        "machine": report.machine(), "headline_level": level, "headline_rps": rps,
        "ratio_vs_unbatched": _ratio(rps.get("batched"), rps.get("unbatched")),
        "ratio_vs_peer": _ratio(rps.get("batched"), rps.get("peer")),
        "service_overhead": _ratio(rps.get("batched"), (kernel or {}).get("rps")),
        "kernel": kernel, "per_level": per_level,
        "targets": {name: {"address": r.address, "startup_s": round(startup[name], 1), "levels": r.rows}
                    for name, r in runs.items()},
    }


def _print_ratios(payload: dict) -> None:
    level, rps = payload["headline_level"], payload["headline_rps"]
    print(f"\nat the headline level {level:g}: " + ", ".join(f"{k} {v} req/s" for k, v in rps.items()))
    kernel = payload["kernel"]
    if kernel:
        print(f"in-process kernel ({kernel['model']}, {kernel['threads']} threads): {kernel['rps']} req/s at batch "
              f"{kernel['batch_requests']} (observed mean {kernel['observed_mean_batch_requests']}), "
              f"{kernel['rps_batch_1']} req/s at batch 1")
    for key in ("ratio_vs_unbatched", "ratio_vs_peer", "service_overhead", "service_overhead_interleaved"):
        value = payload.get(key)
        print(f"{key:>28}: {value if value is not None else 'n/a'}")


# ------------------------------------------------------------ serve-target --

async def _serve_target(args: argparse.Namespace) -> None:
    """Our service for one compare target: local Ray, the Serve apps, the front door; until SIGTERM."""
    import ray
    import torch

    from service.backends.serve import ServeBackend
    from service.server import create_server
    from service.settings import ServiceConfig
    from workers.affinity import pin_process
    from workers.serve.app import deploy_all, shutdown_all

    settings = ServiceConfig.load(args.config, {"host": "127.0.0.1", "port": args.port, "metrics_port": 0,
                                                "metrics_host": "127.0.0.1"})
    app, config = settings.app, settings.server
    torch.set_num_threads(config.torch_threads)  # as `attribution serve` does: kernels run in the replicas
    pin_process(config.cpu_affinity, "server.cpu_affinity")  # before Ray: its daemons inherit the cores
    cpus = max(os.cpu_count() or 1, int(sum(m.num_cpus * max(1, m.replicas) for m in app.models) + 0.999))
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             _node_ip_address="127.0.0.1")
    running = None
    try:
        await asyncio.to_thread(deploy_all, app)
        running = await create_server(config, ServeBackend.from_config(app, **config.coalesce.backend_options()))
        pathlib.Path(args.ready_file).write_text(json.dumps({"port": running.port,
                                                             "metrics_port": running.metrics_port,
                                                             "pid": os.getpid()}))
        stopping = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stopping.set)
        await stopping.wait()
    finally:
        if running is not None:
            await running.stop(grace=5.0)
        try:
            shutdown_all(app)
        finally:
            ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.compare")
    sub = parser.add_subparsers(dest="command", required=True)
    target = sub.add_parser("serve-target", help="run our service for one --compare target (internal)")
    target.add_argument("--port", type=int, default=0)
    target.add_argument("--config", required=True, help="AppConfig YAML/JSON")
    target.add_argument("--ready-file", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve_target(args))


if __name__ == "__main__":
    main()
