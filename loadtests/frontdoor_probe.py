"""Front-door probe: what our gRPC front door costs over a direct handle call, next to Ray Serve's own gRPC proxy.

One run, one local Ray (`ray.init(num_cpus=2)`), the demo model deployed as the product deploys it
(`workers.serve.app.deploy_all`); small Grad-CAM requests (batch 1, 64x64) through, side by side, interleaved:

    direct       `ServeBackend.explain(spec)` from this process: a handle call, no gRPC, no decode/encode.
    front_door   our grpc.aio front door (`service.server.create_server` over `ServeBackend`, metrics on), in
                 its own process as `attribution serve --attach` runs it, called with `service.client` over
                 loopback: gRPC + validation + codec + the same handle call.
    front_door_single  the same front door in a second process with `server.coalesce.max_requests: 1` and no
                 bound on calls in flight: one handle call per request, as before coalescing
                 (service/backends/coalesce.py).
    --variant NAME=JSON  more front doors, each in its own process, with these `server` settings (e.g.
                 `unbounded='{"coalesce": {"max_in_flight_per_replica": 0}}'`), measured interleaved with the rest.
    serve_proxy  Ray Serve's gRPC proxy -> an ingress deployment (`ProbeIngress`: validate, the model's
                 handle, encode) -> the model. Measured only when the proxy answers at all.

Serve's proxy is tried three ways, each on a fresh Serve instance, and what happens is recorded: with the
generated `add_AttributionServiceServicer_to_server` (as Serve documents); with the same handlers minus
`add_registered_method_handlers` (`add_attribution_service_generic_only`); and with that plus an alias that
lets pickle find our message classes (`add_attribution_service_for_serve_proxy`), the configuration measured.
Both servers are asked for grpc.health.v1, reflection and Serve's Healthz (`--no-serve-proxy` skips the
proxy). Prints p50/p99 latency and throughput per concurrency, the ratios to direct, and each front door's
CPU time per request.

    python -m loadtests.frontdoor_probe --requests 400 --concurrency 1,16 --json out/frontdoor.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Awaitable, Callable

import grpc
import numpy as np

from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc

from loadtests.frontdoor_child import FrontDoorProcess
from loadtests.serve_proxy import (GENERIC_SERVICER, INGRESS_APP, MODEL, SHIM_SERVICER, STOCK_SERVICER, deploy, proxy_status,
                                   start_serve, try_proxy_explain, wire_services)

VARIANTS = 8
CALL_TIMEOUT_S = 60.0


# ------------------------------------------------------------------ measuring --

def build_requests(channels: int, height: int, width: int) -> list[pb.ExplainRequest]:
    """`VARIANTS` distinct batch-1 Grad-CAM requests, uint8 pixels."""
    from service.client import build_request

    rng = np.random.default_rng(0)
    return [build_request(rng.integers(0, 256, (1, channels, height, width), dtype=np.uint8), method="grad_cam",
                          model=MODEL, seed=i, request_id=f"probe-{i}") for i in range(VARIANTS)]


async def closed_loop(call: Callable[[int], Awaitable[int]], requests: int, concurrency: int) -> dict:
    """`concurrency` clients, each sending its next request when the last answers, `requests` in all.

    `call(k)` sends request k and answers the size (in requests) of the batch it rode in.
    """
    latencies: list[float] = []
    batches: list[int] = []
    issued = 0

    async def client() -> None:
        nonlocal issued
        while issued < requests:
            k = issued
            issued += 1
            t0 = time.perf_counter()
            batches.append(await call(k))
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return {"latencies": latencies, "batches": batches, "seconds": time.perf_counter() - started}


def summarize(segments: list[dict]) -> dict:
    """Merged segments of one (path, concurrency): latency percentiles in ms, throughput in requests/s."""
    latencies = [x for s in segments for x in s["latencies"]]
    seconds = sum(s["seconds"] for s in segments)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")  # linear interpolation
    return {"requests": len(latencies), "seconds": round(seconds, 3), "rps": round(len(latencies) / seconds, 2),
            "p50_ms": round(cuts[49] * 1e3, 2), "p99_ms": round(cuts[98] * 1e3, 2),
            "mean_ms": round(statistics.fmean(latencies) * 1e3, 2),
            "rps_by_round": [round(len(s["latencies"]) / s["seconds"], 2) for s in segments],
            # Each answer names its batch's request count b: summing 1/b counts the batches exactly.
            "mean_batch_requests": round(len(latencies) / sum(1 / max(1, b) for s in segments
                                                              for b in s["batches"]), 2)}


class Counted:
    """A call that counts how often it was made."""

    def __init__(self, call: Callable[[int], Awaitable[int]]):
        self.call, self.count = call, 0

    def __call__(self, k: int) -> Awaitable[int]:
        self.count += 1
        return self.call(k)


async def make_calls(front_door_ports: dict[str, int], proxy_port: int | None,
                     requests: list[pb.ExplainRequest]) -> tuple:
    """Every path as a `call(k)` coroutine, and the clients to close afterwards."""
    from service.client import AsyncAttributionClient
    from service.config import Limits
    from service.backends.serve import ServeBackend
    from service.validation import validate_explain

    backend = ServeBackend([MODEL])
    (described,) = await backend.models()
    specs = [validate_explain(r, described, Limits()) for r in requests]

    async def direct(k: int) -> int:
        return (await backend.explain(specs[k % len(specs)])).batch_requests

    def through(client: AsyncAttributionClient) -> Callable[[int], Awaitable[int]]:
        async def call(k: int) -> int:
            return int((await client.explain_request(requests[k % len(requests)])).timings["batch_requests"])
        return call

    calls: dict = {"direct": direct}
    closers = []
    for name, port in front_door_ports.items():
        client = AsyncAttributionClient(f"127.0.0.1:{port}", timeout=CALL_TIMEOUT_S)
        calls[name] = Counted(through(client))
        closers.append(client.close)
    if proxy_port is not None:
        from service.client import Explanation

        channel = grpc.aio.insecure_channel(f"127.0.0.1:{proxy_port}")
        stub = pb_grpc.AttributionServiceStub(channel)
        metadata = (("application", INGRESS_APP),)

        async def serve_proxy(k: int) -> int:
            response = await stub.Explain(requests[k % len(requests)], metadata=metadata, timeout=CALL_TIMEOUT_S)
            return int(Explanation.from_response(response).timings["batch_requests"])
        calls["serve_proxy"] = serve_proxy
        closers.append(channel.close)
    return calls, closers


async def measure(calls: dict, requests: int, concurrencies: list[int], rounds: int, warmup: int) -> dict:
    """Interleaved: every round runs each concurrency on each path in turn, so drift hits all alike."""
    for name, call in calls.items():
        await closed_loop(call, warmup, min(4, warmup))
    segments: dict[tuple[str, int], list[dict]] = {}
    per_round = max(1, requests // rounds)
    for _ in range(rounds):
        for concurrency in concurrencies:
            for name, call in calls.items():
                result = await closed_loop(call, max(per_round, concurrency), concurrency)
                segments.setdefault((name, concurrency), []).append(result)
    return {c: {name: summarize(segments[(name, c)]) for name in calls} for c in concurrencies}


def ratios(table: dict) -> dict:
    """Per concurrency: p50, p99 and throughput of each gRPC path over direct (latency > 1 = slower)."""
    out: dict = {}
    for c, row in table.items():
        base = row["direct"]
        out[c] = {name: {"p50": round(r["p50_ms"] / base["p50_ms"], 3), "p99": round(r["p99_ms"] / base["p99_ms"], 3),
                         "rps": round(r["rps"] / base["rps"], 3)}
                  for name, r in row.items() if name != "direct"}
    return out


def print_table(table: dict, overhead: dict) -> None:
    print(f"\n{'path':>12} {'conc':>5} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>8} {'batch':>6}"
          "   vs direct: p50  p99  req/s")
    for c, row in table.items():
        for name, r in row.items():
            rel = overhead[c].get(name)
            tail = f"{rel['p50']:>6.2f} {rel['p99']:>5.2f} {rel['rps']:>6.2f}" if rel else ""
            print(f"{name:>12} {c:>5} {r['p50_ms']:>9.2f} {r['p99_ms']:>9.2f} {r['rps']:>8.2f} "
                  f"{r['mean_batch_requests']:>6.2f}   {tail:>18}")


# ----------------------------------------------------------------------- run --

def probe_proxy(servicer_function: str, cache_dir: str, request: pb.ExplainRequest) -> dict:
    """Serve's gRPC proxy with `servicer_function` in front of the ingress: one Explain, and what else it serves."""
    from ray import serve

    port = start_serve(servicer_function)
    try:
        deploy(cache_dir)
        return {"servicer_function": servicer_function, "proxies": proxy_status(),
                "explain": try_proxy_explain(port, request), "wire_services": wire_services(port)}
    finally:
        serve.shutdown()


async def run_measured(args: argparse.Namespace, workdir: pathlib.Path, proxy_port: int | None) -> dict:
    """Serve is up and the apps deployed: check the proxy (when asked), start our front doors, measure."""
    import ray

    from service.backends.serve import ServeBackend

    (described,) = await ServeBackend([MODEL]).models()
    requests = build_requests(described.channels, described.height, described.width)
    shim = None
    if proxy_port is not None:
        shim = {"servicer_function": SHIM_SERVICER, "proxies": proxy_status(),
                "explain": await asyncio.to_thread(try_proxy_explain, proxy_port, requests[0]),
                "wire_services": await asyncio.to_thread(wire_services, proxy_port)}
    gcs = ray.get_runtime_context().gcs_address
    children = {name: FrontDoorProcess(gcs, workdir, name, settings) for name, settings in args.variants.items()}
    try:
        ready = {name: await asyncio.to_thread(child.wait_ready) for name, child in children.items()}
        ours = await asyncio.to_thread(wire_services, ready["front_door"]["port"])
        calls, closers = await make_calls({name: r["port"] for name, r in ready.items()},
                                          proxy_port if shim and shim["explain"]["ok"] else None, requests)
        cpu_before = {name: child.cpu_seconds() for name, child in children.items()}
        try:
            table = await measure(calls, args.requests, args.concurrency, args.rounds, args.warmup)
        finally:
            for close in closers:
                await close()
        cpu = {name: child.cpu_seconds() - cpu_before[name] for name, child in children.items()}
    finally:
        for child in children.values():
            await asyncio.to_thread(child.stop)
    return {"model": {"name": described.name, "input": [described.channels, described.height, described.width]},
            "serve_proxy_shim": shim, "front_door_wire_services": ours, "table": table,
            "front_door_variants": args.variants,
            "front_door_cpu_ms_per_request": {name: _per_request(cpu[name], calls[name]) for name in children}}


def _per_request(cpu_s: float, counted: "Counted") -> float | None:
    return round(cpu_s * 1e3 / counted.count, 3) if counted.count else None


def run(args: argparse.Namespace) -> dict:
    import ray
    from ray import serve

    from loadtests import report
    from service.client import build_request
    from workers.demo import default_cache_dir

    cache_dir = args.cache_dir or str(default_cache_dir())
    started = time.time()
    one = build_request(np.zeros((1, 3, 64, 64), np.uint8), method="grad_cam", model=MODEL)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        attempts = ([probe_proxy(fn, cache_dir, one) for fn in (STOCK_SERVICER, GENERIC_SERVICER)]
                    if args.serve_proxy else [])
        proxy_port = start_serve(SHIM_SERVICER)
        try:
            deploy(cache_dir)
            with tempfile.TemporaryDirectory(prefix="frontdoor-probe-") as tmp:
                measured = asyncio.run(run_measured(args, pathlib.Path(tmp),
                                                    proxy_port if args.serve_proxy else None))
        finally:
            serve.shutdown()
    finally:
        ray.shutdown()
    overhead = ratios(measured["table"])
    if args.serve_proxy:
        print_findings(attempts + [measured["serve_proxy_shim"]], measured["front_door_wire_services"])
    print_table(measured["table"], overhead)
    for name, ms in measured["front_door_cpu_ms_per_request"].items():
        print(f"{name} CPU per request: {ms} ms  ({json.dumps(args.variants[name])})")
    return {"kind": "frontdoor_probe", "machine": report.machine(), "seconds": round(time.time() - started, 1),
            "load": {"requests": args.requests, "concurrency": args.concurrency, "rounds": args.rounds,
                     "warmup": args.warmup, "method": "grad_cam", "batch": 1},
            "versions": _versions(), "serve_proxy_attempts": attempts, **measured,
            "ratios_vs_direct": overhead}


def print_findings(attempts: list[dict], ours: dict) -> None:
    for attempt in attempts:
        explain = attempt["explain"]
        said = "OK" if explain["ok"] else f"{explain['code']}: {explain['details']}"
        print(f"Serve gRPC proxy with {attempt['servicer_function'].rsplit('.', 1)[-1]}: Explain -> {said}")
    for name, outcome in attempts[-1]["wire_services"].items():
        theirs = outcome.get("answer") if outcome["ok"] else outcome["code"]
        mine = ours[name].get("answer") if ours[name]["ok"] else ours[name]["code"]
        print(f"  {name}: Serve proxy {theirs}; our front door {mine}")


def _versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("ray", "grpcio", "grpcio-tools", "protobuf")}


def _concurrencies(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 or v > 256 for v in values):
        raise argparse.ArgumentTypeError("concurrency levels must be 1..256, e.g. 1,16")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.frontdoor_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="measured requests per path and concurrency")
    parser.add_argument("--concurrency", type=_concurrencies, default=[1, 16], help="closed-loop levels (1,16)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds the requests are split over")
    parser.add_argument("--warmup", type=int, default=16, help="unmeasured requests per path first")
    parser.add_argument("--cache-dir", default="", help="demo model cache (default: the user's cache directory)")
    parser.add_argument("--json", metavar="OUT", help="write the results here")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help='another front door with these server settings, e.g. '
                             'unbounded=\'{"coalesce": {"max_in_flight_per_replica": 0}}\' (repeatable)')
    parser.add_argument("--no-serve-proxy", dest="serve_proxy", action="store_false",
                        help="skip Ray Serve's gRPC proxy (measure our front doors only)")
    args = parser.parse_args(argv)
    args.variants = {"front_door": {},
                     "front_door_single": {"coalesce": {"max_requests": 1, "max_in_flight_per_replica": 0}}}
    for text in args.variant:
        name, sep, settings = text.partition("=")
        try:
            from service.config import ServerConfig

            variant = json.loads(settings) if sep else None
            ServerConfig.from_dict(variant)
        except Exception as exc:  # noqa: BLE001 - any bad variant is a usage error
            parser.error(f"--variant {text!r}: expected NAME={{server settings as JSON}} ({exc})")
        if not name.isidentifier() or name in args.variants or name == "direct":
            parser.error(f"--variant {text!r}: the name must be a new identifier")
        args.variants[name] = variant
    if not 1 <= args.requests <= 100_000 or not 1 <= args.rounds <= 100 or not 1 <= args.warmup <= 10_000:
        parser.error("--requests 1..100000, --rounds 1..100, --warmup 1..10000")
    payload = run(args)
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
