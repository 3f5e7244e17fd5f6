"""`attribution deploy serve-config | warm-cache`: what a deployment is built from.

- `serve-config --config FILE` prints the Ray Serve config (the applications, their import paths and args) for a
  service config: deploy/serve.yaml, and KubeRay's `serveConfigV2` in deploy/k8s, are this command's output.
- `warm-cache --config FILE` builds every demo model of the config into the cache (`cache_dir`, else
  `$XDG_CACHE_HOME/attribution-service`), so a first start loads instead of training: the container image runs it.
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    printer = sub.add_parser("serve-config", help="print the Ray Serve config (KubeRay serveConfigV2) for a config",
                             description="print the Ray Serve config (KubeRay serveConfigV2) for a config")
    printer.add_argument("--config", help="YAML/JSON service config (default: every default)")
    printer.add_argument("--header", action="store_true",
                         help="start with the comment deploy/serve.yaml carries (how to run it)")
    warm = sub.add_parser("warm-cache", help="build the config's demo models into the cache",
                          description="build the config's demo models into the cache")
    warm.add_argument("--config", help="YAML/JSON service config (default: every default)")


def _load(path: str | None):
    from service.cli import CliError
    from service.settings import ServiceConfig
    from workers.errors import InvalidArgument

    try:
        return ServiceConfig.load(path)
    except InvalidArgument as exc:
        raise CliError(f"invalid config: {exc}") from None


def run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if args.action == "serve-config":
        from workers.serve.app import SERVE_YAML_HEADER, serve_config_text

        sys.stdout.write((SERVE_YAML_HEADER if args.header else "") + serve_config_text(config.app,
                                                                                       config.jobs.offline))
        return 0
    import pathlib

    from workers.models import ModelRegistry

    demos = [m for m in config.app.models if m.source == "demo"]
    if not demos:
        print("attribution deploy: the config names no demo model; nothing to build", flush=True)
        return 0
    cache_dir = pathlib.Path(config.app.cache_dir).expanduser() if config.app.cache_dir else None
    registry = ModelRegistry(demos, cache_dir=cache_dir)
    for cfg in demos:
        loaded = registry.get(cfg.name)
        print(f"attribution deploy: {cfg.name} ready in {cache_dir or 'the default cache'} "
              f"(version {loaded.version[:16]})", flush=True)
    return 0
