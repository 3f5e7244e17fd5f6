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
import dataclasses
import logging
import os
import pathlib
import signal
import sys
from typing import TYPE_CHECKING, Any

from workers.affinity import pin_process
from workers.errors import InvalidArgument

if TYPE_CHECKING:
    from service.settings import ServiceConfig

log = logging.getLogger("attribution.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML/JSON config file (models, batching, server, audit, jobs)")
    parser.add_argument("--host", help="gRPC bind address (default [::])")
    parser.add_argument("--port", type=int, help="gRPC port (default 50051; 0 = any free port)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 9090; 0 = any)")
    parser.add_argument("--metrics-host", help="/metrics bind address (default: --host when given, else 0.0.0.0)")
    parser.add_argument("--data-dir", help="jobs, results and audit logs (default: the user's data directory)")
    parser.add_argument("--job-store", metavar="URL",
                        help="jobs in PostgreSQL (postgresql://user@host/db), one queue shared by every front door "
                             "that names it (default: SQLite in the data directory; config: jobs.store)")
    parser.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    parser.add_argument("--num-cpus", type=int, help="CPUs for a local Ray instance (default: all)")
    parser.add_argument("--attach", action="store_true", help="front already-deployed applications only")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and Serve's own start-up logs too")
    parser.add_argument("--check", action="store_true",
                        help="validate the config (every section, every key) and exit: 0 valid, 2 not")


def server_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The `server:` keys the command line sets (--host, --port, --metrics-port, --metrics-host).

    --host alone moves /metrics too: `--host 127.0.0.1` keeps the whole server on loopback."""
    metrics_host = args.metrics_host
    if metrics_host is None and args.host is not None:
        metrics_host = "0.0.0.0" if args.host in ("[::]", "::", "0.0.0.0") else args.host.strip("[]")
    return {key: value for key, value in (("host", args.host), ("port", args.port),
                                          ("metrics_port", args.metrics_port), ("metrics_host", metrics_host))
            if value is not None}


RAY_LOGGERS = ("ray", "ray.serve")


def _warnings_and_errors(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def configure_logging(level: str, verbose: bool) -> None:
    """Our own log lines at `level`; Ray's and Serve's internal start-up chatter hidden unless `verbose`
    (their warnings and errors still show). A filter, not a level: Serve sets its logger's level as it
    starts. Calling it again adds nothing."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in RAY_LOGGERS:
        if verbose:
            logging.getLogger(name).removeFilter(_warnings_and_errors)
        else:
            logging.getLogger(name).addFilter(_warnings_and_errors)


def run(args: argparse.Namespace) -> int:
    from service.settings import ServiceConfig

    configure_logging(args.log_level, args.verbose)
    try:  # all of it, before Ray starts: a bad key costs nothing to find
        config = ServiceConfig.load(args.config, server_overrides(args))
        if getattr(args, "job_store", None):
            config = dataclasses.replace(config, jobs=dataclasses.replace(config.jobs, store=args.job_store))
        if config.server.tls:
            config.server.read_tls()  # the certificate files, which the config itself only names
    except InvalidArgument as exc:
        print(f"attribution serve: invalid config: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"attribution serve: {args.config or 'the defaults'}: valid\n{config.summary()}")
        return 0
    if args.address and is_loopback_address(args.address):
        # Ray would rewrite a loopback cluster address into this machine's outward address (where a
        # cluster started on loopback does not listen) unless its multi-node switch is off; set before
        # Ray is first imported, as it reads the switch once.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    return asyncio.run(_serve(args, config))


def is_loopback_address(address: str) -> bool:
    """Whether a Ray address (HOST:PORT, or ray://HOST:PORT) names this machine's loopback."""
    import ipaddress

    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _serve(args: argparse.Namespace, config: "ServiceConfig") -> int:
    import ray
    import torch
    from ray import serve

    from service.backends.serve import ServeBackend
    from service.server import create_server
    from workers.serve.app import deploy_all

    from workers import tracing

    app_config, server_config, jobs_config = config.app, config.server, config.jobs
    _check_ports(server_config)
    tracing.setup(config.tracing)  # the front door's spans; each replica sets up its own (OnlineWorker)  # a port in use is found now, not after Ray and the replicas have started
    torch.set_num_threads(server_config.torch_threads)  # the kernels run in the replicas
    # Before Ray starts: the raylet and the other daemons it spawns inherit the cores.
    pin_process(server_config.cpu_affinity, "server.cpu_affinity")
    owns_ray = not ray.is_initialized() and not args.address and not args.attach
    if not ray.is_initialized():
        from service.cli import CliError

        print("attribution: starting a local Ray instance" if owns_ray
              else f"attribution: connecting to Ray at {args.address or 'the running cluster'}", flush=True)
        try:
            # A Ray of our own is local to this machine: its daemons listen on loopback only.
            ray.init(address=args.address or None, num_cpus=args.num_cpus if owns_ray else None,
                     include_dashboard=False, log_to_driver=False,
                     logging_level=logging.INFO if args.verbose else logging.WARNING,
                     **({"_node_ip_address": "127.0.0.1"} if owns_ray else {}))
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise CliError(f"Ray did not start: {first} "
                           "(its logs: /tmp/ray/session_latest/logs; --verbose shows its start-up)") from None
    from service.backends.offline import ServeOfflineBackend
    from service.jobs.store import default_data_dir
    from workers.serve.offline import deploy_offline

    data_dir = pathlib.Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    deployed = []
    try:
        if args.attach:
            backend = ServeBackend.discover(app_config.default if args.config else "",
                                            **server_config.coalesce.backend_options())
        else:
            print(f"attribution: deploying {', '.join(m.name for m in app_config.models)} on Ray Serve (a demo "
                  "model is trained on its first start, about a minute; then it loads from the cache)", flush=True)
            deployed = deploy_all(app_config)
            deployed.append(deploy_offline(app_config, jobs_config.offline))
            backend = ServeBackend.from_config(app_config, **server_config.coalesce.backend_options())
        server = await create_server(server_config, backend, offline=ServeOfflineBackend(), data_dir=data_dir,
                                     audit=config.audit, jobs=jobs_config)
        if jobs_config.store:
            from service.pgschema import redact

            print(f"attribution: data directory (audit) {data_dir}; jobs and results in {redact(jobs_config.store)}",
                  flush=True)
        else:
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
        tracing.shutdown()  # exports the spans still buffered
        if deployed and owns_ray:
            serve.shutdown()
        if owns_ray:
            ray.shutdown()
    print("attribution: stopped", flush=True)
    return 0


def _check_ports(server_config) -> None:
    """Refuses to start when the gRPC or metrics port is taken (CliError names it and what to change)."""
    import socket

    from service.cli import CliError

    wanted = [("gRPC", server_config.host, server_config.port, "--port or server.port")]
    if server_config.metrics_port:
        wanted.append(("metrics", server_config.metrics_host, server_config.metrics_port,
                       "--metrics-port or server.metrics_port"))
    for what, host, port, knob in wanted:
        if not port:
            continue
        host = host.strip("[]") or "::"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise CliError(f"the {what} port {port} on {host} is not free ({exc.strerror}): is another "
                               f"server running? choose another with {knob}") from None


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
