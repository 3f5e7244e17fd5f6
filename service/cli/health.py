"""`attribution health`: one grpc.health.v1 Check, as a container's HEALTHCHECK or a person runs it.

Exit 0 when the server answers SERVING, 1 when it answers anything else or cannot be reached in time.
Imports grpc and the health stubs only (no torch, no Ray): a probe every few seconds costs little.
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT (default 127.0.0.1:50051)")
    parser.add_argument("--service", default="",
                        help="the health service name: '' the whole server (default), or "
                             "attribution.v1.AttributionService/<model> for one model")
    parser.add_argument("--ca", default=None, help="PEM root certificates: use TLS")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    parser.add_argument("--quiet", action="store_true", help="print nothing; the exit code says it")


def check(server: str, service: str = "", timeout: float = 5.0, ca: str | None = None) -> str:
    """The status name the server answers (SERVING, NOT_SERVING, SERVICE_UNKNOWN, ...), or UNREACHABLE."""
    import pathlib

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if ca:
        credentials = grpc.ssl_channel_credentials(root_certificates=pathlib.Path(ca).read_bytes())
        channel = grpc.secure_channel(server, credentials)
    else:
        channel = grpc.insecure_channel(server)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:  # the server knows no such service name
                return "SERVICE_UNKNOWN"
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def run(args: argparse.Namespace) -> int:
    status = check(args.server, args.service, args.timeout, args.ca)
    if not args.quiet:
        print(f"{args.server} {args.service or '(server)'}: {status}", file=sys.stdout if status == "SERVING"
              else sys.stderr)
    return 0 if status == "SERVING" else 1
