"""The hostile corpus, several passes against one server process: does its memory level off?

    python -m tests.hostile.memory_check [--passes 3] [--repeat 4] [--cache-dir DIR]

Starts `tests.hostile.serve_demo` in its own process, sends the whole corpus
`--repeat` times per pass (plus valid requests between, so real work is
mixed in), and prints the server's resident set size (VmRSS) after each pass
and its growth. Also counts the decode workers' RSS, which are separate
processes and restarted when they die.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import select
import subprocess
import sys
import tempfile

import grpc

from service._proto import attribution_pb2 as pb

ROOT = pathlib.Path(__file__).resolve().parents[2]


def rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    path = pathlib.Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def start_server(cache_dir: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.hostile.serve_demo", cache_dir], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 300)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return proc, int(line.split()[1])


def one_pass(channel: grpc.Channel, repeat: int) -> dict[str, int]:
    from tests.hostile.corpus import cases, valid_png

    call = channel.unary_unary("/attribution.v1.AttributionService/Explain", request_serializer=lambda b: b,
                               response_deserializer=pb.ExplainResponse.FromString)
    good = pb.ExplainRequest(method=pb.GRAD_CAM, inputs=pb.Inputs(images=pb.EncodedImages(images=[valid_png()])))
    codes: dict[str, int] = {}
    corpus = cases()
    for _ in range(repeat):
        futures = [call.future(case.payload, timeout=120) for case in corpus]
        futures.append(call.future(good.SerializeToString(), timeout=120))
        for future in futures:
            try:
                future.result()
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            codes[code] = codes.get(code, 0) + 1
    return codes


def run(passes: int, repeat: int, cache_dir: str) -> dict:
    proc, port = start_server(cache_dir)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            one_pass(channel, 1)  # warm-up: first-use allocations are not growth
            rows = [{"pass": 0, "server_rss_mb": rss_mb(proc.pid)}]
            for n in range(1, passes + 1):
                codes = one_pass(channel, repeat)
                workers = children(proc.pid)
                rows.append({"pass": n, "server_rss_mb": rss_mb(proc.pid), "codes": codes,
                             "decode_workers": len(workers),
                             "decode_workers_rss_mb": sum(rss_mb(w) for w in workers)})
        for before, after in zip(rows, rows[1:]):
            after["growth_mb"] = after["server_rss_mb"] - before["server_rss_mb"]
        return {"passes": passes, "repeat": repeat, "rows": rows}
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=4, help="corpus sends per pass")
    parser.add_argument("--cache-dir", help="demo model cache (default: a fresh temporary one)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.passes, args.repeat, args.cache_dir or tmp)
    for row in result["rows"][1:]:
        print(f"pass {row['pass']}: server RSS {row['server_rss_mb']:.1f} MB ({row['growth_mb']:+.1f}), "
              f"{row['decode_workers']} decode workers {row['decode_workers_rss_mb']:.1f} MB, codes {row['codes']}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
