"""A decode worker process: reads requests on stdin, answers on stdout.

Started by `service.decoding.pool.DecodePool` as `python -m
service.decoding.worker MEMORY_BYTES`. It holds nothing but Pillow; if a file
makes a native decoder crash, only this process dies, and the pool starts a
new one. The address-space limit turns a runaway allocation into a
MemoryError (a clean failure) rather than pressure on the server.
"""
from __future__ import annotations

import os
import resource
import sys

from service.decoding import pillow, protocol


def _read_exact(stream, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _answer(out, status: int, payload: bytes, bps: int = 0, rows: int = 0, columns: int = 0,
            source: tuple[int, int] = (0, 0)) -> None:
    out.write(protocol.ANSWER.pack(status, bps, rows, columns, *source, len(payload)))
    out.write(payload)
    out.flush()


def serve(inp, out) -> None:
    """Answers requests until stdin closes."""
    while True:
        header = _read_exact(inp, protocol.REQUEST.size)
        if header is None:
            return
        magic, width, height, channels, max_pixels, count = protocol.REQUEST.unpack(header)
        if magic != protocol.MAGIC:
            return  # not our server: stop rather than guess
        for _ in range(count):
            raw = _read_exact(inp, protocol.LENGTH.size)
            if raw is None:
                return
            data = _read_exact(inp, protocol.LENGTH.unpack(raw)[0])
            if data is None:
                return
            try:
                bps, rows, columns, pixels, *source = pillow.decode(data, width, height, channels, max_pixels)
            except pillow.DecodeFailure as exc:
                _answer(out, protocol.FAILED, str(exc).encode()[:protocol.MAX_REASON_BYTES])
            else:
                _answer(out, protocol.OK, pixels, bps, rows, columns, tuple(source))


def main(argv: list[str]) -> int:
    memory = int(argv[1]) if len(argv) > 1 else 0
    if memory > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    # Nothing may write to stdout but the protocol: native libraries' chatter goes to stderr.
    out = os.fdopen(os.dup(1), "wb", buffering=1 << 16)
    os.dup2(2, 1)
    out.write(protocol.READY)  # started and imported: the server times files from here on
    out.flush()
    serve(sys.stdin.buffer, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
