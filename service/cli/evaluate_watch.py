"""The calls of `attribution evaluate`: submit the evaluation job, follow it (a progress bar on a terminal,
plain progress lines otherwise), fetch the result, write the report and print the ranking. `--local` starts
the service in this process first (the front door and the job queue over the in-process offline worker, on
127.0.0.1 and a free port) and makes the very same calls to it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import TextIO

from service.cli import local

_FINAL_NAMES = ("SUCCEEDED", "FAILED", "CANCELLED")


class Progress:
    """A job's progress on `stream`: a redrawn bar when it is a terminal, else a line per state change and per
    tenth of the work done (so logs stay short)."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30):
        self.stream, self.width = stream, width
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        utf8 = "utf" in (getattr(stream, "encoding", None) or "utf-8").lower()
        self._full, self._empty = ("\u2588", "\u2591") if utf8 else ("#", "-")
        self.started = time.monotonic()
        self._last: tuple[str, int] | None = None
        self._drawn = False

    def update(self, job) -> None:
        from service._proto import attribution_pb2 as pb

        state = pb.JobState.Name(job.state)
        fraction = min(max(float(job.progress), 0.0), 1.0)
        elapsed = time.monotonic() - self.started
        if self.tty:
            done = int(round(fraction * self.width))
            bar = self._full * done + self._empty * (self.width - done)
            self.stream.write(f"\revaluation {job.id[:12]} |{bar}| {fraction:4.0%} {state:9s} {elapsed:5.0f}s")
            self._drawn = True
            if state in _FINAL_NAMES:
                self.stream.write("\n")
                self._drawn = False
        else:
            key = (state, int(fraction * 10))
            if key != self._last:
                self.stream.write(f"evaluation {job.id}: {state} {fraction:.0%} ({elapsed:.0f} s)\n")
            self._last = key
        self.stream.flush()

    def close(self) -> None:
        """Ends a bar left mid-line (an interrupted watch), so the next message starts on its own line."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def evaluate(args: argparse.Namespace, request, names: list[str]) -> int:
    """Runs the evaluation of `request` (item names `names`) to its report; the command's exit status."""
    state: dict = {"job": None}
    progress = Progress()
    try:
        return asyncio.run(_evaluate(args, request, names, state, progress))
    except KeyboardInterrupt:
        progress.close()
        job = state["job"]
        if job is None:
            print("attribution evaluate: interrupted before the job was submitted", file=sys.stderr)
        elif args.local:
            print(f"attribution evaluate: interrupted; evaluation job {job} stopped with the in-process service",
                  file=sys.stderr)
        else:
            print(f"attribution evaluate: stopped watching; evaluation job {job} goes on on the server "
                  f"(`attribution jobs watch {job}` follows it, `attribution jobs cancel {job}` stops it)",
                  file=sys.stderr)
        return 130


async def _evaluate(args: argparse.Namespace, request, names: list[str], state: dict, progress: Progress) -> int:
    import grpc

    from service._proto import attribution_pb2 as pb
    from service.cli import CliError, tls_options
    from service.client import AsyncAttributionClient
    from service.errors import code_from_number

    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()
    async with local.target(args, jobs=True) as address:
        tls = tls_options(args) if args.server else {}  # --local serves in-process, in plaintext
        async with AsyncAttributionClient(address, token=args.token, timeout=args.timeout, **tls) as client:
            stub = client.stub
            try:
                job = await stub.SubmitJob(pb.SubmitJobRequest(evaluation=request, item_names=names,
                                                               priority=args.priority),
                                           timeout=args.timeout, metadata=metadata)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:  # built from the command line: a usage error
                    raise CliError(f"the server refused the evaluation: {exc.details()}") from None
                raise
            state["job"] = job.id
            progress.update(job)
            if job.state not in (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED):  # no deadline: evaluations take long
                async for event in stub.WatchJob(pb.WatchJobRequest(id=job.id, include_result=True),
                                                 metadata=metadata):
                    job = event.job
                    progress.update(job)
            if job.state == pb.SUCCEEDED and not job.HasField("evaluation"):
                job = await stub.GetJob(pb.GetJobRequest(id=job.id, include_result=True), timeout=args.timeout,
                                        metadata=metadata)
    if job.state == pb.FAILED:
        print(f"attribution evaluate: job {job.id} failed: {code_from_number(job.error.code).name}: "
              f"{job.error.message}", file=sys.stderr)
        return 3
    if job.state != pb.SUCCEEDED:
        print(f"attribution evaluate: job {job.id} ended {pb.JobState.Name(job.state)}", file=sys.stderr)
        return 3
    return _report(args, job, names)


def _report(args: argparse.Namespace, job, names: list[str]) -> int:
    from service.report import ranking_table, summary, write_report

    result = job.evaluation
    item_names = list(job.item_names) or names
    written = write_report(result, args.output, item_names)
    if args.json:
        print(json.dumps(dict(summary(result, item_names), job=job.id, report=str(written[-1]))))
    else:
        print(ranking_table(result))
    print(f"attribution evaluate: job {job.id}: report in {args.output} (open {written[-1]})", file=sys.stderr)
    return 0


