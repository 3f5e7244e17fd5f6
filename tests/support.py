"""Helpers shared by the tests: an event loop on a thread, and a front door started on it."""
from __future__ import annotations

import asyncio
import threading

from service.config import ServerConfig
from service.server import RunningServer, create_server


class LoopThread:
    """An event loop on a daemon thread: servers live there, tests call them over real sockets."""

    def __init__(self, name: str = "test-loop"):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def call(self, coro, timeout: float = 300.0):
        """Runs `coro` on the loop and waits for its result, at most `timeout` seconds."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Stops the loop and its thread; idempotent."""
        if self.loop.is_closed():
            return
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()


def start_front_door(loop: LoopThread, backend, **kwargs) -> RunningServer:
    """create_server on 127.0.0.1, any free port, with a metrics exporter on any free port."""
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, metrics_host="127.0.0.1", grace_s=0.0)
    return loop.call(create_server(config, backend, **kwargs))
