"""The shipped server with jobs, in-process on the demo model, as a process a test can SIGKILL.

`create_server` over LocalBackend and LocalOfflineWorker, jobs and audit in
`--data-dir`, on 127.0.0.1 and a free port; prints `READY <port>` and serves
until it is killed:

    python -m tests.service.jobs.serve_local --data-dir DIR [--cache-dir DIR] [--job-store URL --lease-s S]
"""
from __future__ import annotations

import argparse
import asyncio
import pathlib


async def _serve_forever(args: argparse.Namespace) -> None:
    import torch

    from service.backends.local import LocalBackend
    from service.config import ServerConfig
    from service.jobs import JobsConfig
    from service.server import create_server
    from workers.config import ModelConfig, OfflineConfig
    from workers.models import ModelRegistry
    from workers.offline import LocalOfflineWorker

    torch.set_num_threads(1)  # a test process on a shared machine
    registry = ModelRegistry([ModelConfig(name="demo", source="demo")], cache_dir=args.cache_dir)
    config = JobsConfig(offline=OfflineConfig(items_per_chunk=1, fold_max_rows=8), progress_persist_s=0.1,
                        poll_s=0.5, store=args.job_store, lease_s=args.lease_s)
    running = await create_server(ServerConfig(host="127.0.0.1", port=0, metrics_port=None, grace_s=0.0),
                                  LocalBackend(registry), offline=LocalOfflineWorker(registry, config.offline),
                                  data_dir=pathlib.Path(args.data_dir), jobs=config)
    print(f"READY {running.port}", flush=True)
    await asyncio.Event().wait()  # until the test kills the process


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--job-store", default="")
    parser.add_argument("--lease-s", type=float, default=30.0)
    asyncio.run(_serve_forever(parser.parse_args()))
