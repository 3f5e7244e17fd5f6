"""The byte protocol between the front door and its decode workers.

Deliberately not pickle: a worker that a hostile file has compromised must not
be able to make the server run anything, so the server reads only fixed
headers and raw bytes from a worker and checks every length it is told.

Worker -> server, once at start: READY.

Server -> worker, one request::

    REQUEST  = ">4sIIIQI"  magic, width, height, channels, max_pixels, count
    then per image: ">I" length, the file's bytes

Worker -> server, one answer per image, in order, flushed as each is done::

    ANSWER   = ">BBIIIII"  status (OK or FAILED), bytes per sample, rows, columns, the file's full
                           width and height (EXIF orientation applied), payload length
    then the payload: pixels (rows, columns, C) for OK, a UTF-8 reason for FAILED
"""
from __future__ import annotations

import struct

MAGIC = b"DEC2"
READY = b"R"  # the worker's first byte, once it has started (start-up never counts against a file)
REQUEST = struct.Struct(">4sIIIQI")
LENGTH = struct.Struct(">I")
ANSWER = struct.Struct(">BBIIIII")
OK, FAILED = 0, 1
MAX_REASON_BYTES = 1024
