"""`attribution serve`: Ray, the Serve applications, the front door and /metrics, on one command.

Modes:
- default: start a local Ray instance, deploy every configured model, serve.
- `--address ADDR`: connect to an existing Ray cluster and deploy there.
- `--attach`: deploy nothing; front the `attribution-*` applications already
  running on the cluster (e.g. from `serve deploy deploy/serve.yaml`). Run one
  such front door per node behind a TCP load balancer to scale the front door
  with the cluster.
SIGINT/SIGTERM stop gracefully: health flips to NOT_SERVING, in-flight calls
finish within the grace period, then the applications and Ray are shut down.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import pathlib
import signal
from typing import Any

from workers.affinity import pin_process
from workers.app import AppConfig, deploy_all
from workers.config import load_config_file

log = logging.getLogger("attribution.serve")

_APP_KEYS = ("models", "default_model", "batching", "device", "cache_dir")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML/JSON config file (models, batching, server, audit, jobs)")
    parser.add_argument("--host", help="gRPC bind address (default [::])")
    parser.add_argument("--port", type=int, help="gRPC port (default 50051; 0 = any free port)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 9090; 0 = any)")
    parser.add_argument("--data-dir", help="jobs, results and audit logs (default: the user's data directory)")
    parser.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    parser.add_argument("--num-cpus", type=int, help="CPUs for a local Ray instance (default: all)")
    parser.add_argument("--attach", action="store_true", help="front already-deployed applications only")
    parser.add_argument("--log-level", default="INFO")


def split_config(raw: dict[str, Any]) -> tuple[AppConfig, dict[str, Any]]:
    """The one config file -> the workers' AppConfig and the front door's raw sections."""
    app = AppConfig.from_dict({k: raw[k] for k in _APP_KEYS if k in raw})
    return app, {k: v for k, v in raw.items() if k not in _APP_KEYS}


def _server_section(args: argparse.Namespace, rest: dict[str, Any]) -> dict[str, Any]:
    server = dict(rest.get("server") or {})
    for key, value in (("host", args.host), ("port", args.port), ("metrics_port", args.metrics_port)):
        if value is not None:
            server[key] = value
    return server


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raw = load_config_file(args.config) if args.config else {}
    app_config, rest = split_config(raw)
    return asyncio.run(_serve(args, app_config, rest))


async def _serve(args: argparse.Namespace, app_config: AppConfig, rest: dict[str, Any]) -> int:
    import ray
    import torch
    from ray import serve

    from service.config import ServerConfig
    from service.serve_backend import ServeBackend
    from service.server import create_server

    server_config = ServerConfig.from_dict(_server_section(args, rest))
    torch.set_num_threads(server_config.torch_threads)  # the kernels run in the replicas
    # Before Ray starts: the raylet and the other daemons it spawns inherit the cores.
    pin_process(server_config.cpu_affinity, "server.cpu_affinity")
    owns_ray = not ray.is_initialized() and not args.address and not args.attach
    if not ray.is_initialized():
        # A Ray of our own is local to this machine: its daemons listen on loopback only.
        ray.init(address=args.address or None, num_cpus=args.num_cpus if owns_ray else None,
                 include_dashboard=False, log_to_driver=False,
                 **({"_node_ip_address": "127.0.0.1"} if owns_ray else {}))
    from service.jobs import JobsConfig
    from service.jobs.offline_backend import ServeOfflineBackend
    from service.jobs.store import default_data_dir
    from workers.offline import deploy_offline

    jobs_config = JobsConfig.from_dict(rest.get("jobs"))
    data_dir = pathlib.Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    deployed = []
    try:
        if args.attach:
            backend = ServeBackend.discover(app_config.default if args.config else "",
                                            **server_config.coalesce.backend_options())
        else:
            deployed = deploy_all(app_config)
            deployed.append(deploy_offline(app_config, jobs_config.offline))
            backend = ServeBackend.from_config(app_config, **server_config.coalesce.backend_options())
        server = await create_server(server_config, backend, offline=ServeOfflineBackend(), data_dir=data_dir,
                                     sections=rest)
        print(f"attribution: data directory (jobs, results, audit) {data_dir}", flush=True)
        print(f"attribution: gRPC listening on {server_config.host}:{server.port} "
              f"(front door on {torch.get_num_threads()} torch threads; the kernels run in the replicas)", flush=True)
        if getattr(server, "metrics_port", None):
            print(f"attribution: Prometheus metrics on http://{server_config.metrics_host}:"
                  f"{server.metrics_port}/metrics", flush=True)
        print(f"attribution: models {', '.join(m.name for m in app_config.models) if not args.attach else '(attached)'}"
              f"; Ctrl-C stops", flush=True)
        await _wait_for_signal()
        print("attribution: stopping (grace %.0fs)" % server_config.grace_s, flush=True)
        await server.stop(server_config.grace_s)
    finally:
        if deployed and owns_ray:
            serve.shutdown()
        if owns_ray:
            ray.shutdown()
    print("attribution: stopped", flush=True)
    return 0


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
