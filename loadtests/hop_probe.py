"""The Ray hop's cost per call by input encoding: `python -m loadtests.hop_probe [--sizes 64,112,224]`.

A Serve deployment that only normalizes its input answers sequential handle calls
carrying one image either as model-space float32 (what the front door sent before
`ExplainSpec.pixels_u8`) or as uint8 pixels normalized on arrival (what it sends
now for uint8 requests). The two encodings alternate in rounds, so drift hits both;
the report is milliseconds per call and their ratio per image size. The size that
matters is Ray's inline-argument limit: a float32 224x224 image is 600 kB, a
112x112 one 150 kB, both above it, so they go through the object store; their
uint8 pixels (150 kB, 37 kB) need it less or not at all.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _deployment():
    from ray import serve

    from workers.spec import pixels_to_model_space

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Normalize:
        def run(self, x: torch.Tensor) -> float:
            if x.dtype == torch.uint8:
                x = pixels_to_model_space(x, MEAN, STD)
            return float(x[0, 0, 0, 0])

    return Normalize


def measure(sizes: list[int], calls: int, rounds: int) -> list[dict]:
    """Per size: ms per call for float32 and uint8, the median over `rounds` alternating rounds."""
    import ray
    from ray import serve

    from workers.spec import pixels_to_model_space

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    try:
        handle = serve.run(_deployment().bind(), name="hop-probe", route_prefix=None)
        rows = []
        for size in sizes:
            u8 = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8)
            encodings = {"float32": lambda: pixels_to_model_space(u8, MEAN, STD), "uint8": lambda: u8}
            for _ in range(20):
                handle.run.remote(u8).result()
            ms: dict[str, list[float]] = {name: [] for name in encodings}
            for _ in range(rounds):
                for name, make in encodings.items():
                    start = time.perf_counter()
                    for _ in range(calls):
                        handle.run.remote(make()).result()
                    ms[name].append((time.perf_counter() - start) / calls * 1e3)
            f32, u8_ms = statistics.median(ms["float32"]), statistics.median(ms["uint8"])
            rows.append({"size": size, "float32_ms": round(f32, 3), "uint8_ms": round(u8_ms, 3),
                         "ratio_uint8_to_float32": round(u8_ms / f32, 3), "rounds": ms})
            print(f"{size}x{size}: float32 {f32:.2f} ms/call, uint8 {u8_ms:.2f} ms/call, ratio {u8_ms / f32:.3f}",
                  flush=True)
        serve.shutdown()
        return rows
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,112,224", help="image sides, comma-separated")
    parser.add_argument("--calls", type=int, default=200, help="sequential calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    rows = measure([int(s) for s in args.sizes.split(",")], args.calls, args.rounds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
