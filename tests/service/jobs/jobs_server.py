"""A front door with the job RPCs wired, for tests: in a fixture's thread, or as a process to SIGKILL.

`JobsServicer` is the delegation the real servicer needs (each job RPC calls the
JobService method and aborts with `service.errors.abort_with` on a typed error);
`start_jobs_server` builds store, runner and gRPC server the way `attribution
serve --data-dir` will. Run as a script it serves the demo model in-process
(LocalBackend + LocalOfflineWorker) until it is killed:

    python -m tests.service.jobs.jobs_server --data-dir DIR [--cache-dir DIR]
"""
from __future__ import annotations

import argparse
import asyncio
import pathlib
from dataclasses import dataclass

import grpc

from service import errors
from service._proto import attribution_pb2_grpc as pb_grpc
from service.config import Limits
from service.jobs import Jobs, JobsConfig
from service.metrics import ServiceMetrics
from service.servicer import AttributionServicer


class JobsServicer(AttributionServicer):
    """The real servicer with its job RPCs delegated to a JobService (what the lead wires in)."""

    jobs: Jobs

    async def SubmitJob(self, request, context):
        return await self._delegate(self.jobs.service.submit, request, context)

    async def GetJob(self, request, context):
        return await self._delegate(self.jobs.service.get, request, context)

    async def CancelJob(self, request, context):
        return await self._delegate(self.jobs.service.cancel, request, context)

    async def ListJobs(self, request, context):
        return await self._delegate(self.jobs.service.list, request, context)

    async def WatchJob(self, request, context):
        try:
            async for event in self.jobs.service.watch(request, context):
                yield event
        except Exception as exc:
            await errors.abort_with(context, exc)

    @staticmethod
    async def _delegate(method, request, context):
        try:
            return await method(request, context)
        except Exception as exc:
            await errors.abort_with(context, exc)


@dataclass
class JobsServer:
    server: grpc.aio.Server
    jobs: Jobs
    metrics: ServiceMetrics
    port: int

    async def stop(self) -> None:
        await self.server.stop(0)
        await self.jobs.stop()


async def start_jobs_server(online, offline, data_dir: pathlib.Path, config: JobsConfig,
                            port: int = 0) -> JobsServer:
    """Servicer (models from the online backend), jobs in `data_dir`, gRPC on 127.0.0.1:`port`; started."""
    metrics = ServiceMetrics()
    servicer = JobsServicer(online, await online.models(), Limits(), metrics)
    # The servicer's view of the models (default flagged) is the one jobs validate against.
    jobs = servicer.jobs = Jobs.create(data_dir, offline, servicer.models, limits=Limits(), config=config,
                                       registry=metrics.registry)
    server = grpc.aio.server()
    pb_grpc.add_AttributionServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await jobs.start()
    return JobsServer(server, jobs, metrics, bound)


async def _serve_forever(args: argparse.Namespace) -> None:
    from workers.config import ModelConfig
    from workers.local import LocalBackend
    from workers.models import ModelRegistry
    from workers.config import OfflineConfig
    from workers.offline import LocalOfflineWorker

    import torch

    torch.set_num_threads(1)  # a test process on a shared machine
    registry = ModelRegistry([ModelConfig(name="demo", source="demo")], cache_dir=args.cache_dir)
    config = JobsConfig(offline=OfflineConfig(items_per_chunk=1, fold_max_rows=8), progress_persist_s=0.1,
                        poll_s=0.5)
    running = await start_jobs_server(LocalBackend(registry), LocalOfflineWorker(registry, config.offline),
                                      pathlib.Path(args.data_dir), config)
    print(f"READY {running.port}", flush=True)
    await asyncio.Event().wait()  # until the test kills the process


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--cache-dir", default=None)
    asyncio.run(_serve_forever(parser.parse_args()))
