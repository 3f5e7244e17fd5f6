"""What one refused call costs the front door: CPU per RESOURCE_EXHAUSTED answer.

    python -m loadtests.refusal_cost [--calls 3200] [--clients 16] [--bare]

Starts a front door (in-process backend, demo model) in its own process with its admission controller
forced to refuse every call, sends `--calls` batch-1 Grad-CAM calls from `--clients` concurrent
clients, and prints the server process's CPU time per refused call (from /proc), the client's own
(this process: a grpc.aio client, like the load generator's), and the refusal rate. Together they bound
what overload a machine can refuse while still computing (docs/benchmarks.md, *Overload*).

`--bare` measures, in the same run and after it, a bare grpc.aio server whose only handler answers every
call RESOURCE_EXHAUSTED at once (no interceptors, no metrics, no admission): the floor of a refusal in
this gRPC runtime, which no front door written on it can go under.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import grpc
import numpy as np

from service._proto import attribution_pb2 as pb

ROOT = pathlib.Path(__file__).resolve().parent.parent


def process_cpu_s(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _serve(cache_dir: str) -> None:
    from service.config import ServerConfig
    from service.server import create_server
    from workers.config import ModelConfig
    from service.backends.local import LocalBackend
    from workers.models import ModelRegistry

    registry = ModelRegistry([ModelConfig(name="demo", source="demo")], cache_dir=pathlib.Path(cache_dir))
    registry.get()
    running = await create_server(ServerConfig(host="127.0.0.1", port=0, metrics_port=None, grace_s=0),
                                  LocalBackend(registry))
    model = running.servicer.flow.admission.model("demo")
    model.rate, model.queued = 1.0, 1e9  # a queue no call fits behind: every call is refused
    print(running.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await running.stop(0)


async def _serve_bare() -> None:
    """A grpc.aio server that refuses every call of any method at once."""
    async def refuse(request, context):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "refused")

    handler = grpc.method_handlers_generic_handler(
        "attribution.v1.AttributionService", {"Explain": grpc.unary_unary_rpc_method_handler(refuse)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(0)


async def _send(port: int, calls: int, clients: int) -> None:
    pixels = np.full((1, 3, 64, 64), 128, np.uint8)
    request = pb.ExplainRequest(method=pb.GRAD_CAM, inputs=pb.Inputs(tensor=pb.Tensor(
        data=pixels.tobytes(), dtype=pb.UINT8, shape=[1, 3, 64, 64]))).SerializeToString()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/attribution.v1.AttributionService/Explain")

        async def client() -> None:
            for _ in range(calls // clients):
                try:
                    await call(request, timeout=10)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
        await asyncio.gather(*(client() for _ in range(clients)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--cache-dir")
    parser.add_argument("--bare", action="store_true", help="also measure a bare grpc.aio server's refusals")
    parser.add_argument("--serve", metavar="CACHE_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--serve-bare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(_serve(args.serve))
        return 0
    if args.serve_bare:
        asyncio.run(_serve_bare())
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        servers = {"front door": ["--serve", args.cache_dir or tmp]}
        if args.bare:
            servers["bare grpc.aio"] = ["--serve-bare"]
        for name, flags in servers.items():
            _measure(name, flags, args.calls, args.clients)
    return 0


def _measure(name: str, flags: list[str], calls: int, clients: int) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "loadtests.refusal_cost", *flags],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        asyncio.run(_send(port, clients * 20, clients))  # warm-up
        cpu0, own0, t0 = process_cpu_s(proc.pid), process_cpu_s(os.getpid()), time.monotonic()
        asyncio.run(_send(port, calls, clients))
        cpu1, own1, t1 = process_cpu_s(proc.pid), process_cpu_s(os.getpid()), time.monotonic()
    finally:
        proc.stdin.close()
        proc.wait(60)
    calls = calls // clients * clients
    print(f"{name}: {calls} refused calls in {t1 - t0:.2f} s ({calls / (t1 - t0):.0f}/s); server CPU "
          f"{1e3 * (cpu1 - cpu0) / calls:.3f} ms per refused call; client CPU {1e3 * (own1 - own0) / calls:.3f} ms "
          f"per call", flush=True)


if __name__ == "__main__":
    sys.exit(main())
