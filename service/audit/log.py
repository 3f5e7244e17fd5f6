"""Per-prediction explanation log: one JSON line per explained map, written off the hot path.

`AuditLog.record(spec, response)` only puts the request on a bounded queue; a
writer thread turns it into records and appends them to `<dir>/audit.jsonl`,
rotated by size (`audit.jsonl.1` is the newest rotated file). A full queue
either blocks the caller or counts the request's records as dropped: a record
is never lost without `attribution_audit_dropped_total` saying so.

One record (schema 2) per item x map; RECORD_FIELDS lists the keys and JSON types:
    schema             SCHEMA_VERSION (verify also reads schema 1, which lacks the four fields marked *)
    path *             "online" (Explain, ExplainStream) or "offline" (a job): how a re-run computes it
    guarantee, tolerance *   what a re-run is held to: "summary_within_tolerance" with tolerance 1e-3,
                       i.e. the re-run map's summary agrees within 1e-3 x the map's largest |value|
                       (a map may differ in its last bits with its batch and the worker's threads)
    ts                 RFC 3339 UTC time the response was recorded
    received_ts        RFC 3339 UTC time the server received the request
    entry_id           hex, one per recorded request (request ids are client-chosen and may repeat)
    request_id, items  the request's id and item count
    model, model_version   name; sha256 of the weights
    method, seed       the requested method; the seed (0..2^64-1: read it as a big int)
    target_spec        {kind, indices, k}, the TargetSpec as requested
    params             every MethodParams field; baseline_tensor is null or {sha256, shape, ref}
    output             every OutputSpec field
    item, map_index    this item; this map among the item's maps (per target, then per CAM variant)
    map_method         this map's method (a CAM variant from `also` differs from `method`)
    target, target_score   the class this map explains; its softmax probability
    predicted_classes, predicted_scores   the item's top classes, best first
    input_sha256       hex sha256 of the item's model-space float32 bytes (as in the response)
    input_ref          "inputs/<input_sha256>.npy", relative to the log's directory, or null
    map_sha256, map_dtype, map_shape   of the encoded map (as in the response)
    native_map_sha256  of the native-resolution map's bytes, or null
    completeness_error IG only, else null
    queue_ms, compute_ms, total_ms, batch_samples, batch_requests   the response's timings
    map_summary *      {grid: [planes, rows, cols], values, abs_max}: the map averaged over at most 8x8
                       cells per plane (6 significant digits), and its largest |value|
Non-finite floats are written as strings ("nan", "inf"): JSON has no NaN.
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
import math
import os
import pathlib
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from service import codec
from service._proto import attribution_pb2 as pb
from workers.errors import FailedPrecondition
from workers.schema import build, check
from workers.spec import ExplainSpec

from service.audit.records import (LOG_NAME, Entry, rotated_indices,
                                   input_ref, map_count, record_lines, save_array, should_audit)


log = logging.getLogger(__name__)

FULL_POLICIES = ("block", "drop")
MIB = 1 << 20
_LOCK_NAME = ".audit.lock"
_DRAIN_MAX = 256          # entries written between two flushes
_BLOCK_POLL_S = 0.1       # a blocked caller re-checks for room and shutdown this often
_WARN_EVERY_S = 10.0

@dataclass(frozen=True)
class AuditConfig:
    """The audit log: the `audit:` section of the config file.

    enabled: the server-wide default for requests that leave `audit` unspecified;
        AUDIT_ON / AUDIT_OFF on a request always win.
    directory: where the log lives; "" = `<data-dir>/audit`.
    max_bytes: rotate `audit.jsonl` before a request's records would take it past
        this; 0 = never rotate. A request's records always stay in one file.
    keep: rotated files kept (`audit.jsonl.1` newest); 0 = keep all, because
        deleting audit records is the operator's decision, not ours.
    buffer_entries: requests waiting for the writer; each holds its response until written.
    when_full: "block" (the caller waits for room: nothing is lost) or "drop" (the
        request's records are counted in attribution_audit_dropped_total{reason="buffer_full"}).
    store_inputs: save each audited item's model-space input as
        `inputs/<input_sha256>.npy`, so `audit verify` needs nothing from the client.
        Off by default: inputs may be personal data.
    store_baselines: save custom IG baselines the same way; they are parameters,
        and a map cannot be reproduced without them.
    fsync_interval_s: the longest a written record waits for fsync; 0 = after every write batch.
    """

    enabled: bool = True
    directory: str = ""
    max_bytes: int = 64 * MIB
    keep: int = 0
    buffer_entries: int = 1024
    when_full: str = "block"
    store_inputs: bool = False
    store_baselines: bool = True
    fsync_interval_s: float = 1.0

    def __post_init__(self) -> None:
        check(self.max_bytes == 0 or 1024 <= self.max_bytes <= 1 << 40, "audit.max_bytes",
               "must be 0 (never rotate) or 1 KiB..1 TiB")
        check(0 <= self.keep <= 100_000, "audit.keep", "must be 0 (keep all)..100000")
        check(1 <= self.buffer_entries <= 1_000_000, "audit.buffer_entries", "must be 1..1000000")
        check(self.when_full in FULL_POLICIES, "audit.when_full", f"must be one of {', '.join(FULL_POLICIES)}")
        check(0 <= self.fsync_interval_s <= 3600, "audit.fsync_interval_s", "must be 0..3600 seconds")

    def directory_for(self, data_dir: str | os.PathLike) -> pathlib.Path:
        """The log directory: `directory`, else `<data_dir>/audit`."""
        return pathlib.Path(self.directory) if self.directory else pathlib.Path(data_dir) / "audit"

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "AuditConfig":
        return build(cls, raw, "audit")


class AuditLog:
    """The writer: a bounded queue, one background thread, size-rotated JSON Lines files.

    Call `record` (or `record_async` from the event loop) once per answered
    request, after the response is final; never mutate the response afterwards.
    Call `close` on graceful shutdown: it writes everything queued.
    """

    def __init__(self, config: AuditConfig, directory: str | os.PathLike,
                 registry: CollectorRegistry | None = None, start: bool = True):
        self.config = config
        self.directory = pathlib.Path(directory)
        self.path = self.directory / LOG_NAME
        self._queue: queue.Queue[Entry] = queue.Queue(maxsize=config.buffer_entries)
        registry = registry if registry is not None else CollectorRegistry()
        self.records_total = Counter("attribution_audit_records", "Audit records written.", registry=registry)
        self.dropped_total = Counter("attribution_audit_dropped", "Audit records not written, by reason.",
                                     ["reason"], registry=registry)
        depth = Gauge("attribution_audit_queue_depth", "Requests waiting for the audit writer.", registry=registry)
        depth.set_function(self._queue.qsize)
        self._closing = threading.Event()
        self._abort = threading.Event()
        self._gate = threading.Lock()
        self._room = threading.Condition()
        self._last_warning = -math.inf
        self._lock_fh = self._take_lock()
        self._file = None
        self._size = 0
        self._dirty_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        if start:
            self._thread.start()

    @property
    def server_default(self) -> bool:
        return self.config.enabled

    def wants(self, spec: ExplainSpec) -> bool:
        return should_audit(spec, self.config.enabled)

    # ------------------------------------------------------------ callers --

    def record(self, spec: ExplainSpec, response: pb.ExplainResponse, path: str = "online") -> bool:
        """Queues the request's records; True when queued. Blocks only under when_full="block".

        path: "offline" for a job's result (verify re-runs it the offline way)."""
        entry, done = self._admit(spec, response, path)
        return done if done is not None else self._wait_for_room(entry)

    async def record_async(self, spec: ExplainSpec, response: pb.ExplainResponse, path: str = "online") -> bool:
        """`record` for the event loop: a blocking wait for room happens on a worker thread."""
        entry, done = self._admit(spec, response, path)
        if done is not None:
            return done
        return await asyncio.get_running_loop().run_in_executor(None, self._wait_for_room, entry)

    def _admit(self, spec: ExplainSpec, response: pb.ExplainResponse,
               path: str) -> tuple[Entry | None, bool | None]:
        """(entry, True/False when settled) or (entry, None): the queue is full and the policy blocks."""
        if not self.wants(spec) or response.HasField("error") or not response.items:
            return None, False
        entry = Entry(time.time(), spec, response, map_count(response), path)
        queued = self._offer(entry)
        if queued is None and self.config.when_full == "drop":
            queued = self._drop(entry, "buffer_full")
        return entry, queued

    def _offer(self, entry: Entry) -> bool | None:
        """True: queued; False: refused (closed, counted); None: the queue is full."""
        # Under the gate, no entry can enter the queue once closing is set, so
        # the writer's last emptiness check is final and nothing is stranded.
        with self._gate:
            if self._closing.is_set():
                return self._drop(entry, "closed")
            try:
                self._queue.put_nowait(entry)
                return True
            except queue.Full:
                return None

    def _wait_for_room(self, entry: Entry) -> bool:
        while True:
            with self._room:
                self._room.wait(_BLOCK_POLL_S)
            queued = self._offer(entry)
            if queued is not None:
                return queued

    def _drop(self, entry: Entry, reason: str) -> bool:
        self.dropped_total.labels(reason).inc(entry.records)
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:  # one line per interval, not one per request
            self._last_warning = now
            log.warning("audit: %d records of request %s not written (%s); see attribution_audit_dropped_total",
                        entry.records, entry.spec.request_id, reason)
        return False

    def start(self) -> None:
        """Starts the writer (done by the constructor unless start=False)."""
        if not self._thread.is_alive() and self._thread.ident is None:
            self._thread.start()

    def close(self, timeout: float = 30.0) -> bool:
        """Writes every queued record, fsyncs and closes; True when all was written in `timeout`.

        What is still queued after `timeout` is counted as dropped (reason "shutdown");
        a `record` after close is counted as dropped (reason "closed").
        """
        with self._gate:
            self._closing.set()
        with self._room:
            self._room.notify_all()  # blocked callers give up now, counted
        self.start()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._abort.set()
            self._thread.join(5.0)
        if self._lock_fh is not None and not self._thread.is_alive():
            self._lock_fh.close()  # releases the flock
            self._lock_fh = None
        return not self._abort.is_set()

    # ------------------------------------------------------------- writer --

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

    def _run(self) -> None:
        poll = min(max(self.config.fsync_interval_s, 0.01), _BLOCK_POLL_S)
        while True:
            try:
                entry = self._queue.get(timeout=poll)
            except queue.Empty:
                if self._closing.is_set() and self._queue.empty():
                    break
                self._sync(fsync=False)
                continue
            batch = [entry]
            while len(batch) < _DRAIN_MAX:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            with self._room:
                self._room.notify_all()
            for item in batch:
                if self._abort.is_set():
                    self._drop(item, "shutdown")
                else:
                    self._write_entry(item)
            self._sync(fsync=False)
            if self._abort.is_set():
                self._drain_dropped()
                break
        self._sync(fsync=True)
        self._close_file()

    def _drain_dropped(self) -> None:
        while True:
            try:
                self._drop(self._queue.get_nowait(), "shutdown")
            except queue.Empty:
                return

    def _write_entry(self, entry: Entry) -> None:
        try:
            lines = record_lines(entry, self._store_inputs(entry), self._baseline(entry.spec))
            self._append("".join(line + "\n" for line in lines).encode())
        except OSError as exc:
            log.error("audit: cannot write %s: %s", self.path, exc)
            self._close_file()  # reopened for the next entry: the disk may recover
            self._drop(entry, "write_error")
        except Exception:  # a bug here must cost this request's records, counted, not the writer
            log.exception("audit: cannot build the records of request %s", entry.spec.request_id)
            self._drop(entry, "error")
        else:
            self.records_total.inc(len(lines))

    def _store_inputs(self, entry: Entry) -> list[str | None]:
        items = entry.response.items
        if not self.config.store_inputs:
            return [None] * len(items)
        refs = []
        for i, item in enumerate(items):
            sha = item.input_sha256 or codec.input_sha256(entry.spec.inputs[i])
            save_array(self.directory / input_ref(sha), entry.spec.inputs[i])
            refs.append(input_ref(sha))
        return refs

    def _baseline(self, spec: ExplainSpec) -> dict | None:
        tensor = spec.params.baseline_tensor
        if tensor is None:
            return None
        sha = codec.input_sha256(tensor)
        ref = None
        if self.config.store_baselines:
            save_array(self.directory / input_ref(sha), tensor)
            ref = input_ref(sha)
        return {"sha256": sha, "shape": [int(d) for d in tensor.shape], "ref": ref}

    def _append(self, data: bytes) -> None:
        if self._file is None:
            self._open()
        limit = self.config.max_bytes
        if limit and self._size and self._size + len(data) > limit:
            self._rotate()
        self._file.write(data)
        self._size += len(data)
        if self._dirty_since is None:
            self._dirty_since = time.monotonic()

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
        self._sync(fsync=True)
        self._close_file()
        rotated = sorted(rotated_indices(self.directory), reverse=True)
        keep = self.config.keep
        for n in rotated:
            source = self.directory / f"{LOG_NAME}.{n}"
            if keep and n >= keep:
                source.unlink(missing_ok=True)
            else:
                os.replace(source, self.directory / f"{LOG_NAME}.{n + 1}")
        os.replace(self.path, self.directory / f"{LOG_NAME}.1")
        _fsync_dir(self.directory)
        self._open()

    def _sync(self, fsync: bool) -> None:
        """Flushes to the OS (readers see the records), and fsyncs when asked or due."""
        if self._file is None:
            return
        due = self._dirty_since is not None and time.monotonic() - self._dirty_since >= self.config.fsync_interval_s
        try:
            self._file.flush()
            if fsync or due:
                os.fsync(self._file.fileno())
                self._dirty_since = None
        except OSError as exc:
            log.error("audit: cannot flush %s: %s", self.path, exc)


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
