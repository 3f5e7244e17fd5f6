"""Image decoders: in-process for trusted files, a process pool for client bytes.

`DecodePool` keeps a few `service.decoding.worker` processes. Each request
checks one out, sends its files one at a time and reads one answer per file.
A worker that dies on a file (a native decoder's crash) or runs past the
per-file timeout is killed; that file is reported as undecodable, the rest
of the request is not attempted (one bad file fails the request anyway), and
a fresh worker is started in the background. The server never runs a native
image decoder in its own process.

`InlineDecoder` runs the same Pillow code in the calling process, for files a
user reads from their own disk (the CLI, `audit verify`) and for tests.

Neither module imports torch: the caller turns pixels into tensors.
"""
from __future__ import annotations

import fcntl
import logging
import os
import pathlib
import queue
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from service.decoding import pillow, protocol
from service.decoding.pillow import DecodeFailure

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 60.0
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_PIPE_BYTES = 1 << 20
_ROOT = pathlib.Path(__file__).resolve().parents[2]  # the folder that holds the `service` package


@dataclass(frozen=True)
class Decoded:
    """One decoded file: C-order (rows, columns, C) samples of `bytes_per_sample` bytes each.

    At least the requested size per side and at most about twice it (see
    `pillow.decode`); the caller resizes to the exact size.
    """

    bytes_per_sample: int
    rows: int
    columns: int
    pixels: bytes | bytearray
    # The file's full size, EXIF orientation applied: what rows x columns are a reduction of.
    source_width: int = 0
    source_height: int = 0


# Per file: Decoded, DecodeFailure, or None when it was not attempted (an earlier file failed hard).
Outcome = Decoded | DecodeFailure | None


class ImageDecoder(Protocol):
    def decode(self, images: Sequence[bytes], width: int, height: int, channels: int,
               max_pixels: int) -> list[Outcome]:
        """One outcome per file, in order."""


class Busy(Exception):
    """Every decode worker stayed busy for the whole wait."""


class InlineDecoder:
    """Pillow in this process: for trusted files only."""

    def decode(self, images: Sequence[bytes], width: int, height: int, channels: int,
               max_pixels: int) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for data in images:
            try:
                outcomes.append(Decoded(*pillow.decode(data, width, height, channels, max_pixels)))
            except DecodeFailure as exc:
                outcomes.append(exc)
        return outcomes


class _WorkerDied(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Worker:
    """One decode process and its pipes; used by one thread at a time."""

    def __init__(self, memory_bytes: int):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p)
        env.pop("PYTHONSTARTUP", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.decoding.worker", str(memory_bytes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=str(_ROOT),
            close_fds=True, start_new_session=True)
        self.uses = 0
        for pipe in (self.proc.stdout, self.proc.stdin):
            try:  # fewer wake-ups per decoded image: its pixels cross in one or two reads
                fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, _PIPE_BYTES)
            except OSError:  # capped by /proc/sys/fs/pipe-max-size; the default size still works
                pass

    def wait_ready(self, timeout_s: float) -> None:
        """Waits for the worker's READY byte; `_WorkerDied` if it does not come."""
        try:
            ready = self._read_exact(len(protocol.READY), time.monotonic() + timeout_s)
        except _WorkerDied:
            self.kill()
            raise
        if bytes(ready) != protocol.READY:
            self.kill()
            raise _WorkerDied("protocol")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - a killed process that does not go away
            log.warning("decode worker %d did not exit after SIGKILL", self.proc.pid)

    def close(self) -> None:
        """Polite stop: stdin closes, the worker returns; killed if it lingers."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()

    def _write(self, data: bytes) -> None:
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            raise _WorkerDied("crashed") from None

    def _read_exact(self, n: int, deadline: float) -> bytearray:
        """Exactly n bytes from the worker, into one writable buffer (tensors wrap it without a copy)."""
        fd = self.proc.stdout.fileno()
        buffer = bytearray(n)
        view, done = memoryview(buffer), 0
        while done < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _WorkerDied("timeout")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                raise _WorkerDied("timeout")
            got = os.readv(fd, [view[done:done + _PIPE_BYTES]])
            if not got:
                raise _WorkerDied("crashed")
            done += got
        return buffer

    def run(self, images: Sequence[bytes], width: int, height: int, channels: int, max_pixels: int,
            timeout_s: float, outcomes: list[Outcome]) -> None:
        """Appends one outcome per file to `outcomes`; `_WorkerDied` on a crash or a timeout."""
        self.uses += 1
        self._write(protocol.REQUEST.pack(protocol.MAGIC, width, height, channels, max_pixels, len(images)))
        for group in _groups(images):
            # A group fits in the pipe's buffer, so this write cannot block on a worker that is itself
            # blocked writing answers; then the group's answers are read, one per file, in order.
            self._write(b"".join(protocol.LENGTH.pack(len(data)) + bytes(data) for data in group))
            for _ in group:
                outcomes.append(self._answer(width, height, channels, max_pixels, timeout_s))

    def _answer(self, width: int, height: int, channels: int, max_pixels: int, timeout_s: float) -> Outcome:
        deadline = time.monotonic() + timeout_s
        answer = self._read_exact(protocol.ANSWER.size, deadline)
        status, bps, rows, columns, source_width, source_height, length = protocol.ANSWER.unpack(bytes(answer))
        if status == protocol.OK:
            if (bps not in (1, 2) or not 0 < rows * columns <= max_pixels
                    or length != rows * columns * channels * bps
                    or not (rows <= source_height and columns <= source_width
                            and source_width * source_height <= max_pixels)):
                raise _WorkerDied("protocol")
            return Decoded(bps, rows, columns, self._read_exact(length, deadline), source_width, source_height)
        if status == protocol.FAILED and length <= protocol.MAX_REASON_BYTES:
            reason = bytes(self._read_exact(length, deadline)).decode("utf-8", "replace")
            return DecodeFailure(pillow.clean_reason(reason))
        raise _WorkerDied("protocol")


# Linux pipes buffer 64 KiB; requests are written in groups below that.
_GROUP_BYTES = 48 * 1024


def _groups(images: Sequence[bytes]) -> list[list[bytes]]:
    """Consecutive files in groups of at most _GROUP_BYTES (a bigger file is a group of its own)."""
    groups: list[list[bytes]] = []
    size = _GROUP_BYTES
    for data in images:
        if size + len(data) > _GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(data)
        size += len(data) + protocol.LENGTH.size
    return groups


class DecodePool:
    """A few decode worker processes shared by every request of the server.

    workers: processes kept (and files decoded at once).
    timeout_s: the longest one file may take; past it the worker is killed.
    memory_bytes: each worker's address-space limit.
    max_uses: requests a worker serves before it is replaced (bounds slow leaks).
    wait_s: how long a request waits for a free worker before `Busy`.
    on_event: called with "crashed", "timeout", "protocol" or "started" (metrics).
    """

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, memory_bytes: int = 1 << 30,
                 max_uses: int = 10_000, wait_s: float = 10.0,
                 on_event: Callable[[str], None] | None = None):
        if workers < 1:
            raise ValueError("a decode pool needs at least one worker")
        self.workers, self.timeout_s, self.memory_bytes = workers, timeout_s, memory_bytes
        self.max_uses, self.wait_s = max_uses, wait_s
        self._on_event = on_event or (lambda event: None)
        self._slots = threading.BoundedSemaphore(workers)
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._live: set[_Worker] = set()
        self._closed = False
        self.started = 0

    # ----------------------------------------------------------- workers --

    def _spawn(self) -> _Worker:
        worker = _Worker(self.memory_bytes)
        try:
            worker.wait_ready(_START_TIMEOUT_S)
        except _WorkerDied as exc:
            raise Busy(f"a decode worker did not start ({exc.reason})") from None
        with self._lock:
            if self._closed:
                worker.kill()
                raise Busy("the decode pool is closed")
            self._live.add(worker)
            self.started += 1
        self._on_event("started")
        return worker

    def _retire(self, worker: _Worker) -> None:
        with self._lock:
            self._live.discard(worker)
        worker.kill()

    def _refill(self) -> None:
        """Starts a worker into the idle queue (after one died), so the next request does not wait for it."""
        try:
            with self._lock:
                if self._closed or len(self._live) >= self.workers:
                    return
            self._idle.put(self._spawn())
        except Exception:  # pragma: no cover - a failed start is retried by the next checkout
            log.warning("could not start a decode worker", exc_info=True)

    def start(self) -> "DecodePool":
        """Starts every worker now, so the first requests find them ready."""
        for _ in range(self.workers):
            self._refill()
        return self

    def pids(self) -> list[int]:
        with self._lock:
            return sorted(w.pid for w in self._live)

    # ------------------------------------------------------------ decode --

    def decode(self, images: Sequence[bytes], width: int, height: int, channels: int,
               max_pixels: int) -> list[Outcome]:
        if not self._slots.acquire(timeout=self.wait_s):
            raise Busy(f"all {self.workers} image decoders stayed busy for {self.wait_s:g} s")
        try:
            if self._closed:
                raise Busy("the decode pool is closed")
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                worker = self._spawn()
            outcomes: list[Outcome] = []
            try:
                worker.run(images, width, height, channels, max_pixels, self.timeout_s, outcomes)
            except _WorkerDied as died:
                self._retire(worker)
                self._on_event(died.reason)
                why = {"timeout": f"decoding took longer than {self.timeout_s:g} s",
                       "crashed": "the decoder failed on this file"}.get(died.reason, "the decoder misbehaved")
                log.info("decode worker %d %s on a file; starting another", worker.pid, died.reason)
                outcomes.append(DecodeFailure(why))
                outcomes.extend([None] * (len(images) - len(outcomes)))
                threading.Thread(target=self._refill, name="decode-refill", daemon=True).start()
                return outcomes
            if worker.uses >= self.max_uses or self._closed:
                self._retire(worker)
                threading.Thread(target=self._refill, name="decode-refill", daemon=True).start()
            else:
                self._idle.put(worker)
            return outcomes
        finally:
            self._slots.release()

    def close(self) -> None:
        """Stops every worker; later calls raise `Busy`."""
        with self._lock:
            self._closed = True
            live = list(self._live)
            self._live.clear()
        for worker in live:
            worker.close()
