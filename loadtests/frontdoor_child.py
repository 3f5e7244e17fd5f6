"""A front door in a process of its own, on the parent's Ray, for `loadtests.frontdoor_probe`.

`FrontDoorProcess` starts `python -m loadtests.frontdoor_child READY_FILE RAY_ADDRESS SETTINGS_JSON`,
which runs what `attribution serve --attach` runs with those `server` settings, writes its ports to
READY_FILE and serves until SIGTERM.
"""
from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

from loadtests.serve_proxy import MODEL

CHILD_START_TIMEOUT_S = 180.0


async def _front_door_child(ray_address: str, ready_file: str, settings: dict) -> None:
    """Our front door, attached to the parent's Ray: what `attribution serve --attach` runs."""
    import ray

    from service.config import ServerConfig
    from service.backends.serve import ServeBackend
    from service.server import create_server

    ray.init(address=ray_address, log_to_driver=False)
    config = ServerConfig.from_dict(dict(settings, host="127.0.0.1", port=0, metrics_port=0, metrics_host="127.0.0.1"))
    server = await create_server(config, ServeBackend([MODEL], **config.coalesce.backend_options()))
    pathlib.Path(ready_file).write_text(json.dumps({"port": server.port, "metrics_port": server.metrics_port}))
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(2.0)
    ray.shutdown()


class FrontDoorProcess:
    """The child above, started by us and stopped by us (SIGTERM, then SIGKILL)."""

    def __init__(self, ray_address: str, workdir: pathlib.Path, name: str, settings: dict):
        self.ready = workdir / f"{name}.ready.json"
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "loadtests.frontdoor_child", str(self.ready), ray_address,
                                      json.dumps(settings)],
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> dict:
        deadline = time.monotonic() + CHILD_START_TIMEOUT_S
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.ready.exists() and self.ready.read_text():
                return json.loads(self.ready.read_text())
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("front door did not start; log tail:\n" + self.log_path.read_text(errors="replace")[-3000:])

    def cpu_seconds(self) -> float:
        """User + system CPU time the child has used so far (Linux /proc)."""
        fields = pathlib.Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()




if __name__ == "__main__":
    ready_file, ray_address, settings = sys.argv[1:4]
    asyncio.run(_front_door_child(ray_address, ready_file, json.loads(settings)))
