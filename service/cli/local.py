"""What `explain` and `evaluate` share: the image files a command line names, and the in-process service
that `--local` runs on loopback (the config's models behind the local backend; with jobs for evaluations)."""
from __future__ import annotations

import argparse
import contextlib
import pathlib
import tempfile
from collections.abc import AsyncIterator, Sequence

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def image_files(paths: Sequence[pathlib.Path]) -> list[pathlib.Path]:
    """Files as given, folders as their PNG/JPEG files (sorted, recursively); CliError naming what is missing."""
    from service.cli import CliError

    files: list[pathlib.Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise CliError(f"{path}: a folder with no PNG or JPEG files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise CliError(f"{path}: no such file or folder")
    return files


@contextlib.asynccontextmanager
async def target(args: argparse.Namespace, *, jobs: bool = False) -> AsyncIterator[str]:
    """The address to call: `args.server`, or an in-process service on 127.0.0.1 (port 0) built from
    `args.config`, stopped on exit. `jobs`: it also runs jobs (an in-process offline worker and a
    temporary data directory for the job store)."""
    if args.server:
        yield args.server
        return
    from service.backends.local import LocalBackend
    from service.cli import CliError
    from service.server import create_server
    from service.settings import ServiceConfig
    from workers.errors import InvalidArgument
    from workers.models import ModelRegistry

    try:
        config = ServiceConfig.load(args.config, {"host": "127.0.0.1", "port": 0, "metrics_port": None})
    except InvalidArgument as exc:  # worded as `attribution serve` words it
        raise CliError(f"invalid config: {exc}") from None
    app = config.app
    registry = ModelRegistry(list(app.models), app.default, cache_dir=app.cache_dir or None)
    backend = LocalBackend(registry, limits=config.server.limits)
    with contextlib.ExitStack() as stack:
        options = {}
        if jobs:
            from workers.offline import LocalOfflineWorker

            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="attribution-local-"))
            options = {"offline": LocalOfflineWorker(registry, config.jobs.offline, config.server.limits),
                       "data_dir": pathlib.Path(data_dir), "audit": config.audit, "jobs": config.jobs}
        server = await create_server(config.server, backend, **options)
        try:
            yield f"127.0.0.1:{server.port}"
        finally:
            await server.stop(1.0)
