"""Job-store throughput: claims + completions per second with 1, 4 and 16 concurrent runners,
SQLite and PostgreSQL side by side in one run (docs/scaling.md).

    python -m loadtests.store_bench [--jobs 400] [--runners 1,4,16] [--result-kib 16] [--url postgresql://...]

Each runner is a thread with its own store (its own connection, as a front door has), claiming jobs
and finishing each with a result of `--result-kib` KiB (a 64x64 float32 map is 16 KiB) until the
queue is empty. Without --url a throwaway PostgreSQL server is started (loadtests/pgserver.py); the
SQLite store is a WAL file in a temporary directory with synchronous=FULL, as the service runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import threading
import time
import uuid

from service._proto import attribution_pb2 as pb
from service.jobs.pg_store import PostgresJobStore
from service.jobs.records import NewJob, SUCCEEDED
from service.jobs.store import SqliteJobStore


def _fill(store, jobs: int) -> None:
    for _ in range(jobs):
        store.submit(NewJob(id=uuid.uuid4().hex, priority=0, idempotency_key="", model="demo",
                            method=pb.OCCLUSION, num_items=1, request=b"r" * 256))


def timed_threads(count: int, work) -> float:
    """Runs `work(i)` on `count` threads started together; the seconds from their start to the last end."""
    barrier = threading.Barrier(count + 1)

    def run(i: int) -> None:
        barrier.wait()
        work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def _drain(make, runners: int, result: bytes) -> tuple[int, float]:
    stores = [make() for _ in range(runners)]
    done = [0] * runners

    def run(i: int) -> None:
        while (job := stores[i].claim()) is not None:
            stores[i].finish(job.id, job.token, SUCCEEDED, result=result)
            done[i] += 1

    elapsed = timed_threads(runners, run)
    for s in stores:
        s.close()
    return sum(done), elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=400, help="jobs per measurement")
    parser.add_argument("--runners", default="1,4,16")
    parser.add_argument("--result-kib", type=int, default=16)
    parser.add_argument("--url", help="a PostgreSQL database to use (its job tables are emptied first)")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args(argv)
    runners = [int(r) for r in args.runners.split(",")]
    result = os.urandom(args.result_kib * 1024)
    server = None
    if not args.url:
        from loadtests.pgserver import PostgresServer

        server = PostgresServer(durable=True)  # fsync on: SQLite runs with synchronous=FULL
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for n in runners:
                for kind in ("sqlite", "postgresql"):
                    if kind == "sqlite":
                        path = pathlib.Path(tmp) / f"jobs-{n}.sqlite3"
                        make = lambda: SqliteJobStore(path, exclusive=False)  # noqa: E731
                    else:
                        url = args.url or server.database()
                        make = lambda: PostgresJobStore(url, pool_size=2)  # noqa: E731
                        if args.url:
                            _truncate(url)
                    filler = make()
                    _fill(filler, args.jobs)
                    filler.close()
                    count, elapsed = _drain(make, n, result)
                    rows.append({"store": kind, "runners": n, "jobs": count, "seconds": round(elapsed, 3),
                                 "per_s": round(count / elapsed, 1)})
                    print(f"{kind:10s} runners {n:2d}: {count} claims+completions in {elapsed:.2f} s = "
                          f"{count / elapsed:.1f}/s", flush=True)
    finally:
        if server is not None:
            server.stop()
    by = {(r["store"], r["runners"]): r["per_s"] for r in rows}
    for n in runners:
        print(f"runners {n:2d}: postgresql / sqlite = {by['postgresql', n] / by['sqlite', n]:.2f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"result_kib": args.result_kib, "jobs": args.jobs,
                                                       "load_avg": os.getloadavg(), "rows": rows}, indent=2))
    return 0


def _truncate(url: str) -> None:
    import psycopg

    PostgresJobStore(url).close()  # the tables exist
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE attribution_job_results, attribution_jobs")


if __name__ == "__main__":
    raise SystemExit(main())
