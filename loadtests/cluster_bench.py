"""The service on a multi-node Ray cluster at two sizes, and online traffic beside job-store traffic
(docs/scaling.md).

    python -m loadtests.cluster_bench [--duration 15] [--warmup 3] [--clients 16] [--json OUT]

Sizes: a head and 1 worker node (one replica, one front door), then a head and 2 worker nodes (a replica
on each, a front door per worker node, the load split over both), each node a real raylet
(loadtests/raycluster.py) with one logical CPU per replica. For each size and scenario (batch-1
Grad-CAM, then batch-1 SmoothGrad-64, the overload scenarios' requests), closed-loop throughput and
latency; the clients wait the delay a refusal suggests before their next call, as the shipped client
does. On this 2-core machine both sizes share the same two cores: the figures check the scaling
model's prediction for that case (what grows with nodes is the cores, not the processes).

Job-store traffic: on the 1-node size, the front door's job store is a PostgreSQL database, and
windows of online Grad-CAM load alternate with and without four runners submitting, claiming and
completing jobs on the same PostgreSQL server at `--store-rate` jobs per second in all (each a thread
with its own connection, as front doors are; in a database of their own, so the front door's runner does
not take their jobs); the ratio says what the shared store's traffic costs the online path on this
machine, where the database shares the service's two cores. The CPU the PostgreSQL server's processes
took meanwhile is reported beside it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import tempfile
import threading
import time
import uuid

from loadtests.loadgen import LoadGenerator, fetch_models
from loadtests.raycluster import FrontDoorProcess, RayCluster
from loadtests.report import percentiles
from loadtests.requests import encode_requests
from loadtests.scenario import load_scenario

SCENARIOS = pathlib.Path(__file__).parent / "scenarios"
RUNNERS = 4


def _config(path: pathlib.Path, replicas: int, store: str, cache_dir: str) -> pathlib.Path:
    config = {"models": [{"name": "demo", "source": "demo", "replicas": replicas, "num_cpus": 1,
                          "resources": {"model_slot": 1}}],
              "cache_dir": cache_dir,
              "jobs": {"store": store, "offline": {"replicas": 1, "num_cpus": 0.1}}}
    path.write_text(json.dumps(config))
    return path


async def _closed(targets: list[str], scenario_path: pathlib.Path, clients: int, duration: float,
                  warmup: float) -> dict:
    """`clients` closed-loop clients split over `targets`, one measured window; summed throughput."""
    scenario = load_scenario(scenario_path)
    models = await fetch_models(targets[0])
    share = [clients // len(targets) + (1 if i < clients % len(targets) else 0) for i in range(len(targets))]
    generators = [LoadGenerator(t, encode_requests(scenario, models)) for t in targets]
    try:
        results = await asyncio.gather(*(g.run_closed(c, duration, warmup, 10_000_000, honour_pushback=True)
                                         for g, c in zip(generators, share)))
    finally:
        for g in generators:
            await g.close()
    latencies = [ms for r in results for ms in r.recorder.latencies_ms]
    codes: dict[str, int] = {}
    for r in results:
        for code, n in r.recorder.codes.items():
            codes[code] = codes.get(code, 0) + n
    rps = sum(len(r.recorder.latencies_ms) / r.window_s for r in results)
    return {"rps": round(rps, 2), **{k: (round(v, 2) if v is not None else None)
                                     for k, v in percentiles(latencies).items()}, "codes": codes}


class StoreTraffic:
    """RUNNERS threads submitting, claiming and completing jobs in a PostgreSQL job store at `rate` jobs per
    second in all (0: as fast as it lets them)."""

    def __init__(self, url: str, rate: float):
        from service.jobs.pg_store import PostgresJobStore

        self.url, self.rate = url, rate
        self._stop = threading.Event()
        self._make = lambda: PostgresJobStore(url)
        self.done = 0
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._stop.clear()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(RUNNERS)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        from service._proto import attribution_pb2 as pb
        from service.jobs.records import SUCCEEDED, NewJob

        store = self._make()
        result = b"m" * 16384  # one 64x64 float32 map
        deadline = time.monotonic() + 600
        period = RUNNERS / self.rate if self.rate > 0 else 0.0
        next_at = time.monotonic()
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                if period:
                    next_at += period
                    if self._stop.wait(max(0.0, next_at - time.monotonic())):
                        break
                store.submit(NewJob(id=uuid.uuid4().hex, priority=0, idempotency_key="", model="demo",
                                    method=pb.OCCLUSION, num_items=1, request=b"r" * 256))
                claimed = store.claim()
                if claimed is not None:
                    store.finish(claimed.id, claimed.token, SUCCEEDED, result=result)
                    self.done += 1
        finally:
            store.close()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


def _size(workdir: pathlib.Path, nodes: int, args, store: str) -> tuple[RayCluster, list[FrontDoorProcess]]:
    cluster = RayCluster({f"n{i}": {"model_slot": 1} for i in range(nodes)}, head_cpus=1, node_cpus=1)
    doors: list[FrontDoorProcess] = []
    try:
        config = _config(workdir / f"size{nodes}.json", nodes, store, args.cache_dir)
        doors.append(FrontDoorProcess(f"size{nodes}-fd0", cluster.address, config, workdir / f"size{nodes}-fd0"))
        for i in range(1, nodes):
            doors.append(FrontDoorProcess(f"size{nodes}-fd{i}", cluster.address, config,
                                          workdir / f"size{nodes}-fd{i}", "--attach"))
        return cluster, doors
    except BaseException:
        for door in doors:
            door.stop()
        cluster.stop()
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.cluster_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds per window")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="job-traffic windows of each kind, alternating")
    parser.add_argument("--store-rate", type=float, default=50.0,
                        help="jobs per second through the store beside the online load (0: as fast as it goes)")
    parser.add_argument("--cache-dir", default="", help="demo model cache (default: the user's)")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args(argv)
    from loadtests.pgserver import PostgresServer

    report: dict = {"clients": args.clients, "duration_s": args.duration, "sizes": {}, "store_traffic": {}}
    pg = PostgresServer(durable=True)
    try:
        url, traffic_url = pg.database(), pg.database()
        with tempfile.TemporaryDirectory(prefix="cluster-bench-") as tmp:
            workdir = pathlib.Path(tmp)
            for nodes in (1, 2):
                cluster, doors = _size(workdir, nodes, args, url)
                try:
                    targets = [d.address for d in doors]
                    for name in ("overload", "overload_smoothgrad"):
                        row = asyncio.run(_closed(targets, SCENARIOS / f"{name}.yaml", args.clients,
                                                  args.duration, args.warmup))
                        report["sizes"].setdefault(name, {})[nodes] = row
                        print(f"{nodes} worker node(s), {name}: {row['rps']} req/s, p50 {row['p50_ms']} ms, "
                              f"p99 {row['p99_ms']} ms, codes {row['codes']}", flush=True)
                    if nodes == 1:
                        report["store_traffic"] = _store_windows(targets, traffic_url, args)
                finally:
                    for door in doors:
                        door.stop()
                    cluster.stop()
    finally:
        pg.stop()
    for name, by_size in report["sizes"].items():
        ratio = by_size[2]["rps"] / by_size[1]["rps"] if by_size[1]["rps"] else None
        by_size["ratio_2_to_1"] = None if ratio is None else round(ratio, 3)
        print(f"{name}: 2 nodes / 1 node throughput = {by_size['ratio_2_to_1']}")
    traffic = report["store_traffic"]
    print(f"online Grad-CAM with job-store traffic / without: throughput {traffic['rps_ratio']}, "
          f"p50 {traffic['p50_ratio']}, p99 {traffic['p99_ratio']} ({traffic['store_ops_per_s']} "
          f"jobs/s through the store beside it, taking {traffic['store_cpu_cores']} cores)")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def _store_windows(targets: list[str], url: str, args) -> dict:
    """Alternating windows of online load without and with job-store traffic; medians of each kind."""
    traffic = StoreTraffic(url, args.store_rate)
    rows: dict[str, list[dict]] = {"without": [], "with": []}
    ops, cores = [], []
    for _ in range(args.rounds):
        for kind in ("without", "with"):
            if kind == "with":
                before = traffic.done
                cpu_before = _store_cpu_s()
                traffic.start()
                started = time.monotonic()
            try:
                row = asyncio.run(_closed(targets, SCENARIOS / "overload.yaml", args.clients, args.duration,
                                          args.warmup))
            finally:
                if kind == "with":
                    traffic.stop()
                    elapsed = time.monotonic() - started
                    ops.append((traffic.done - before) / elapsed)
                    cores.append((_store_cpu_s() - cpu_before) / elapsed)
            rows[kind].append(row)
            print(f"  online Grad-CAM {kind} job-store traffic: {row['rps']} req/s, p50 {row['p50_ms']} ms, "
                  f"p99 {row['p99_ms']} ms", flush=True)

    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[kind])

    def ratio(key: str) -> float:
        return round(median("with", key) / median("without", key), 3)

    return {"windows": rows, "rps_ratio": ratio("rps"), "p50_ratio": ratio("p50_ms"), "p99_ratio": ratio("p99_ms"),
            "store_ops_per_s": round(statistics.median(ops), 1), "store_rate": args.store_rate,
            "store_cpu_cores": round(statistics.median(cores), 3)}


def _store_cpu_s() -> float:
    """CPU seconds used so far by the PostgreSQL server's processes (the runner threads' own share is not
    counted: they share this process with the load generator)."""
    import os

    from loadtests.refusal_cost import process_cpu_s

    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as comm:
                name = comm.read().strip()
            if name == "postgres":
                total += process_cpu_s(int(pid))
        except OSError:
            continue
    return total


if __name__ == "__main__":
    raise SystemExit(main())
