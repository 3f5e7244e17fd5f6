"""A front door on the demo model in its own process, for checks that watch the server from outside.

    python -m tests.hostile.serve_demo CACHE_DIR

Prints `PORT <n>` once serving on 127.0.0.1, then serves until stdin closes.
"""
from __future__ import annotations

import asyncio
import pathlib
import sys

from service.config import ServerConfig
from service.server import create_server
from workers.config import ModelConfig
from service.backends.local import LocalBackend
from workers.models import ModelRegistry


async def main(cache_dir: str) -> None:
    registry = ModelRegistry([ModelConfig(name="demo", source="demo")], cache_dir=pathlib.Path(cache_dir))
    registry.get()
    running = await create_server(ServerConfig(host="127.0.0.1", port=0, metrics_port=None, grace_s=0.0),
                                  LocalBackend(registry))
    print(f"PORT {running.port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await running.stop(0)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
