"""Audit rows per second one PostgreSQL server takes from several front doors' writers (docs/scaling.md).

    python -m loadtests.audit_bench [--records 20000] [--writers 1,4,16] [--batch 1,64] [--url postgresql://...]

Each writer is a thread with its own `PostgresSink` (its own connection, as each front door's audit writer
has), inserting schema-2 records (a pooled 8x8 map summary, hashes, parameters: ~1 KiB of JSON each) in
batches of `--batch` records, one transaction per batch, as the audit log's writer does. With every
prediction logged, this is the one write per request that all front doors share, so it is the first
shared limit of a cluster (docs/scaling.md). Without --url a throwaway PostgreSQL server is started
(loadtests/pgserver.py) with fsync on.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import time
import uuid

import numpy as np


def _record(i: int, rng: np.random.Generator) -> str:
    from service.audit.records import map_summary, rfc3339

    summary = map_summary(rng.random((64, 64), dtype=np.float32))
    record = {"schema": 2, "ts": rfc3339(time.time()), "request_id": f"bench-{i}", "entry_id": uuid.uuid4().hex,
              "model": "demo", "model_version": "demo-050891203b3b5744", "method": "grad_cam", "item": 0,
              "target": int(rng.integers(0, 4)), "seed": int(i), "params": {"layer": "block3"},
              "input_sha256": hashlib.sha256(str(i).encode()).hexdigest(),
              "map_sha256": hashlib.sha256(str(-i).encode()).hexdigest(), "map_shape": [64, 64],
              "path": "online", "guarantee": "summary_within_tolerance", "tolerance": 1e-3,
              "map_summary": summary, "trace": None}
    return json.dumps(record, separators=(",", ":"))


def _run(url: str, writers: int, batch: int, lines: list[str]) -> tuple[int, float]:
    from service.audit.sinks import PostgresSink

    from loadtests.store_bench import timed_threads

    sinks = [PostgresSink(url) for _ in range(writers)]
    share = [lines[k::writers] for k in range(writers)]

    def write(k: int) -> None:
        mine = share[k]
        for start in range(0, len(mine), batch):
            sinks[k].write(mine[start:start + batch])

    elapsed = timed_threads(writers, write)
    for sink in sinks:
        sink.close()
    return len(lines), elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000, help="records per measurement")
    parser.add_argument("--writers", default="1,4,16")
    parser.add_argument("--batch", default="1,64", help="records per transaction")
    parser.add_argument("--url", help="a PostgreSQL database to use (rows are added to its audit table)")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    lines = [_record(i, rng) for i in range(args.records)]
    server = None
    if not args.url:
        from loadtests.pgserver import PostgresServer

        server = PostgresServer(durable=True)
    rows = []
    try:
        for batch in (int(b) for b in args.batch.split(",")):
            for writers in (int(w) for w in args.writers.split(",")):
                url = args.url or server.database()
                count, elapsed = _run(url, writers, batch, lines)
                rows.append({"writers": writers, "batch": batch, "records": count, "seconds": round(elapsed, 3),
                             "per_s": round(count / elapsed, 1)})
                print(f"batch {batch:3d}, writers {writers:2d}: {count} audit rows in {elapsed:.2f} s = "
                      f"{count / elapsed:.0f}/s", flush=True)
    finally:
        if server is not None:
            server.stop()
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"record_bytes": round(np.mean([len(x) for x in lines])),
                                                       "load_avg": os.getloadavg(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
