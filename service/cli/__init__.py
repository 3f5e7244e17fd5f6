"""`attribution serve | explain | evaluate | models | jobs | audit | health | deploy | bench | loadtest`.

Each subcommand is a module with `add_arguments(parser)` and `run(args)`. Building
the parser imports only those modules, which import torch and Ray inside `run`:
`attribution --help` and a mistyped argument answer at once.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from typing import Sequence


class CliError(Exception):
    """A mistake the person at the terminal can fix: printed as one line, exit code 2."""


def suggest(value: str, names: Sequence[str]) -> str:
    """'; did you mean X?' for the closest known name ('' when none is close)."""
    close = difflib.get_close_matches(value.replace("-", "_").lower(), list(names), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def add_tls_arguments(parser: argparse.ArgumentParser, ca_help: str = "PEM root certificates: use TLS") -> None:
    """--ca, --cert and --key: the TLS options of every command that calls a server."""
    parser.add_argument("--ca", default=None, help=ca_help)
    parser.add_argument("--cert", default=None,
                        help="PEM client certificate (chain), for a server that wants one (mutual TLS); with --key")
    parser.add_argument("--key", default=None, help="PEM private key of --cert")


def tls_options(args: argparse.Namespace) -> dict[str, str | None]:
    """The client's TLS keywords from --ca, --cert and --key (TLS is on when any is given)."""
    if (args.cert is None) != (args.key is None):
        raise CliError("--cert and --key go together: the client certificate and its private key")
    return {"root_certificates": args.ca, "client_cert": args.cert, "client_key": args.key}


# subcommand -> (module with add_arguments(parser) and run(args), one-line help)
_COMMANDS = {
    "serve": ("service.cli.serve", "start Ray, the workers, the gRPC front door and /metrics"),
    "explain": ("service.cli.explain", "explain images (a folder at once) against a server or in-process"),
    "evaluate": ("service.cli.evaluate", "rank attribution methods by faithfulness metrics; writes a report"),
    "models": ("service.cli.models", "list a server's models, layers and methods"),
    "jobs": ("service.cli.jobs", "offline jobs: submit | get | watch | cancel | list"),
    "audit": ("service.cli.audit", "audit logs: verify that logged maps reproduce"),
    "health": ("service.cli.health", "ask a server's grpc.health.v1 service: exit 0 when SERVING"),
    "deploy": ("service.cli.deploy", "deployment inputs: serve-config (KubeRay serveConfigV2) | warm-cache"),
    "loadtest": ("loadtests.cli", "drive a server with a closed- or open-loop load and report"),
}
_BENCHES = {
    "kernels": ("loadtests.bench", "in-process kernel timings against floors and peers"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attribution", description="Batched, audited saliency maps over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in _COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(_module=module)
        _add_module_arguments(cmd, module)
    bench = sub.add_parser("bench", help="benchmarks (scripts that print measured ratios)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, (module, help_text) in _BENCHES.items():
        cmd = bench_sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(_module=module)
        _add_module_arguments(cmd, module)
    return parser


def _add_module_arguments(parser: argparse.ArgumentParser, module: str) -> None:
    try:
        importlib.import_module(module).add_arguments(parser)
    except ImportError as exc:  # an optional part (e.g. test extras for the bench) is missing
        parser.set_defaults(_import_error=str(exc))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "_import_error", None):
        print(f"attribution {args.command}: unavailable: {args._import_error}", file=sys.stderr)
        return 2
    name = f"attribution {args.command}"
    try:
        result = importlib.import_module(args._module).run(args)
    except CliError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.filename is None:
            raise
        print(f"{name}: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        import grpc

        from workers.errors import AttributionError, ModelLoadError

        if isinstance(exc, AttributionError):  # typed, from the workers in this process (`--local`): its message
            print(f"{name}: {exc.message}", file=sys.stderr)
            return 2 if exc.client_error or isinstance(exc, ModelLoadError) else 1
        if not (isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None))):
            raise  # a bug: its traceback is what a report needs
        print(f"{name}: {service_error_line(exc, args)}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


def service_error_line(exc, args: argparse.Namespace) -> str:
    """One line for a failed call, with what to check where the code says it."""
    import grpc

    server = getattr(args, "server", None) or "the server"
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE and _tls_refused(exc, args):
        hint = ("does it trust the CA that signed --cert?" if getattr(args, "cert", None)
                else "if it wants a client certificate, give --cert and --key")
        return f"{server} closed the TLS connection: {exc.details()} ({hint})"
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach {server}: {exc.details()} (is the service running there? `attribution serve` starts it)"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"{server} refused the credentials: {exc.details()} (give --token)"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{server} did not answer in time: {exc.details()} (raise --timeout)"
    return f"{code.name}: {exc.details()}"


def _tls_refused(exc, args: argparse.Namespace) -> bool:
    """Whether a TLS connection was closed in its handshake: what a server that wants client certificates
    does to a client without one (or with one it does not trust); grpc tells the client no more than that."""
    details = exc.details() or ""
    tls = bool(getattr(args, "ca", None) or getattr(args, "cert", None))
    return tls and ("Socket closed" in details or "handshake" in details.lower())


if __name__ == "__main__":
    sys.exit(main())
