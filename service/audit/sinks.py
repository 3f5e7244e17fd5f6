"""Where the audit writer puts records: size-rotated JSON Lines files, or a PostgreSQL table.

Both take a batch of records (JSON lines, without newlines) from the writer thread and raise
`errors` when they cannot keep them; the writer decides what happens then (log.py). Stored inputs
(`inputs/<sha256>.npy`) stay files in the audit directory either way.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import pathlib
import time
import uuid

from service.audit.records import LOG_NAME, rotated_indices
from service.pgschema import migrate, reason, redact
from workers.errors import FailedPrecondition, Unavailable

log = logging.getLogger(__name__)

_LOCK_NAME = ".audit.lock"


class JsonlSink:
    """`<directory>/audit.jsonl`, rotated by size (`audit.jsonl.1` newest); one writer per directory."""

    errors: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self, directory: pathlib.Path, max_bytes: int, keep: int, fsync_interval_s: float):
        self.directory, self.path = directory, directory / LOG_NAME
        self.max_bytes, self.keep, self.fsync_interval_s = max_bytes, keep, fsync_interval_s
        self.retry = False  # a failed disk write costs its records (counted); the next entry reopens the file
        self._lock_fh = self._take_lock()
        self._file = None
        self._size = 0
        self._dirty_since: float | None = None

    def describe(self) -> str:
        return str(self.path)

    def _take_lock(self):
        """One writer per directory: rotation by two processes would interleave and lose files."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fh = open(self.directory / _LOCK_NAME, "a")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise FailedPrecondition(f"another process is writing the audit log in {self.directory}") from None
        return fh

    def write(self, lines: list[str]) -> None:
        data = "".join(line + "\n" for line in lines).encode()
        if self._file is None:
            self._open()
        if self.max_bytes and self._size and self._size + len(data) > self.max_bytes:
            self._rotate()
        self._file.write(data)
        self._size += len(data)
        if self._dirty_since is None:
            self._dirty_since = time.monotonic()

    def failed(self) -> None:
        """After an error: drop the handle, so the next write reopens the file (the disk may recover)."""
        self._close_file()

    def _open(self) -> None:
        self._file = open(self.path, "ab")
        self._size = self._file.tell()
        if self._size and not _ends_with_newline(self.path):
            # A crash cut the last line short: keep it a line of its own (verify
            # reports it) instead of gluing the next record onto it.
            self._file.write(b"\n")
            self._size += 1

    def _close_file(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError as exc:
                log.error("audit: cannot close %s: %s", self.path, exc)

    def _rotate(self) -> None:
        self.sync(fsync=True)
        self._close_file()
        rotated = sorted(rotated_indices(self.directory), reverse=True)
        for n in rotated:
            source = self.directory / f"{LOG_NAME}.{n}"
            if self.keep and n >= self.keep:
                source.unlink(missing_ok=True)
            else:
                os.replace(source, self.directory / f"{LOG_NAME}.{n + 1}")
        os.replace(self.path, self.directory / f"{LOG_NAME}.1")
        _fsync_dir(self.directory)
        self._open()

    def sync(self, fsync: bool) -> None:
        """Flushes to the OS (readers see the records), and fsyncs when asked or due."""
        if self._file is None:
            return
        due = self._dirty_since is not None and time.monotonic() - self._dirty_since >= self.fsync_interval_s
        try:
            self._file.flush()
            if fsync or due:
                os.fsync(self._file.fileno())
                self._dirty_since = None
        except OSError as exc:
            log.error("audit: cannot flush %s: %s", self.path, exc)

    def close(self) -> None:
        self.sync(fsync=True)
        self._close_file()

    def release(self) -> None:
        """Drops the directory lock (once the writer has stopped)."""
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None


class PostgresSink:
    """Rows of `attribution_audit` (service/pgschema.py), shared by every front door that names the database.

    A batch is one transaction: it is all in the table or not at all. While the database cannot be
    reached the writer retries (`retry`), so records wait in the buffer, under its when-full policy,
    instead of being lost.
    """

    retry = True

    def __init__(self, url: str, connect_timeout_s: float = 10.0):
        import psycopg

        self.url, self.connect_timeout_s = url, connect_timeout_s
        self.errors = (psycopg.Error, OSError)
        self.writer = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._psycopg = psycopg
        self._conn = None
        try:
            migrate(self._connect(), url)
        except psycopg.Error as exc:
            self.failed()
            raise Unavailable(f"cannot reach the audit table at {redact(url)}: {reason(exc)}") from None

    def describe(self) -> str:
        return f"attribution_audit at {redact(self.url)}"

    def _connect(self):
        if self._conn is None or self._conn.closed:
            self._conn = self._psycopg.connect(self.url, autocommit=True,
                                               connect_timeout=max(1, int(self.connect_timeout_s)))
        return self._conn

    def write(self, lines: list[str]) -> None:
        rows = []
        for line in lines:
            record = json.loads(line)
            rows.append((record["ts"], record["request_id"], record["entry_id"], self.writer, line))
        conn = self._connect()
        with conn.transaction(), conn.cursor() as cursor:
            cursor.executemany("INSERT INTO attribution_audit (ts, request_id, entry_id, writer, record) "
                               "VALUES (%s, %s, %s, %s, %s)", rows)

    def failed(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except self._psycopg.Error:
                pass
            self._conn = None

    def sync(self, fsync: bool) -> None:
        """Every committed batch is durable in the database already."""

    def close(self) -> None:
        self.failed()

    def release(self) -> None:
        pass


def read_table(url: str, connect_timeout_s: float = 10.0):
    """Every record of the audit table, oldest first: (row id, JSON line)."""
    import psycopg

    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(connect_timeout_s))) as conn:
            with conn.transaction(), conn.cursor(name="attribution_audit_read") as cursor:
                cursor.execute("SELECT id, record FROM attribution_audit ORDER BY id")
                yield from cursor
    except psycopg.errors.UndefinedTable:
        raise FailedPrecondition(f"no audit table at {redact(url)} (has a server logged there?)") from None
    except psycopg.Error as exc:
        raise Unavailable(f"cannot read the audit table at {redact(url)}: {reason(exc)}") from None


def _ends_with_newline(path: pathlib.Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def _fsync_dir(directory: pathlib.Path) -> None:
    """Makes renames durable, so a crash cannot lose a rotated file."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
