"""Per-prediction explanation log: one JSON line per explained map, written off the hot path.

`AuditLog.record(spec, response)` only puts the request on a bounded queue; a
writer thread turns it into records and appends them to `<dir>/audit.jsonl`,
rotated by size (`audit.jsonl.1` is the newest rotated file), or, with
`audit.store` set, inserts them into a PostgreSQL table shared by every front
door (service/audit/sinks.py; while it cannot be reached the records wait). A full queue
either blocks the caller or counts the request's records as dropped: a record
is never lost without `attribution_audit_dropped_total` saying so.

One record (schema 4) per item x map; RECORD_FIELDS lists the keys and JSON types:
    schema             SCHEMA_VERSION (verify also reads schema 3, which lacks completeness_error_absolute,
                       schema 2, which also lacks trace_id, and schema 1, which also lacks the four fields
                       marked *)
    path *             "online" (Explain, ExplainStream) or "offline" (a job): how a re-run computes it
    guarantee, tolerance *   what a re-run is held to: "summary_within_tolerance" with tolerance 1e-3,
                       i.e. the re-run map's summary agrees within 1e-3 x the map's largest |value|
                       (a map may differ in its last bits with its batch and the worker's threads)
    ts                 RFC 3339 UTC time the response was recorded
    received_ts        RFC 3339 UTC time the server received the request
    entry_id           hex, one per recorded request (request ids are client-chosen and may repeat)
    request_id, items  the request's id and item count
    trace_id           the request's W3C trace id (32 hex; the client's `traceparent` or the server's own
                       trace, workers/tracing.py), or null when the request was not traced
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
    completeness_error IG only, else null: relative, |sum(a) - delta| / max(|delta|, 1e-6)
    completeness_error_absolute   IG only, else null: |sum(a) - delta|, in logit units
    queue_ms, compute_ms, total_ms, batch_samples, batch_requests   the response's timings
    map_summary *      {grid: [planes, rows, cols], values, abs_max}: the map averaged over at most 8x8
                       cells per plane (6 significant digits), and its largest |value|
Non-finite floats are written as strings ("nan", "inf"): JSON has no NaN.
"""
from __future__ import annotations

import asyncio
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
from workers.schema import build, check
from workers.spec import ExplainSpec

from service.audit.records import LOG_NAME, Entry, input_ref, map_count, record_lines, save_array, should_audit
from service.audit.sinks import JsonlSink, PostgresSink
from service.pgschema import is_url


log = logging.getLogger(__name__)

FULL_POLICIES = ("block", "drop")
MIB = 1 << 20
_RETRY_FIRST_S, _RETRY_MAX_S = 0.1, 5.0   # a shared sink that cannot be reached is retried this often
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
    store: "" (the default): JSON Lines files in `directory`. A `postgresql://` URL: rows of the
        `attribution_audit` table, one table for every front door that names it (stored inputs stay
        files in `directory`; `audit verify URL` and `audit export URL` read the table).
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
    store: str = ""

    def __post_init__(self) -> None:
        check(self.max_bytes == 0 or 1024 <= self.max_bytes <= 1 << 40, "audit.max_bytes",
               "must be 0 (never rotate) or 1 KiB..1 TiB")
        check(0 <= self.keep <= 100_000, "audit.keep", "must be 0 (keep all)..100000")
        check(1 <= self.buffer_entries <= 1_000_000, "audit.buffer_entries", "must be 1..1000000")
        check(self.when_full in FULL_POLICIES, "audit.when_full", f"must be one of {', '.join(FULL_POLICIES)}")
        check(0 <= self.fsync_interval_s <= 3600, "audit.fsync_interval_s", "must be 0..3600 seconds")
        check(not self.store or is_url(self.store), "audit.store",
              "must be empty (JSON Lines files in the audit directory) or a postgresql:// URL")

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
        self.sink = (PostgresSink(config.store) if config.store else
                     JsonlSink(self.directory, config.max_bytes, config.keep, config.fsync_interval_s))
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
        self._warn(f"audit: {entry.records} records of request {entry.spec.request_id} not written ({reason}); "
                   "see attribution_audit_dropped_total")
        return False

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:  # one line per interval, not one per request
            self._last_warning = now
            log.warning("%s", message)

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
        if not self._thread.is_alive():
            self.sink.release()  # the directory's lock
        return not self._abort.is_set()

    # ------------------------------------------------------------- writer --

    def _run(self) -> None:
        poll = min(max(self.config.fsync_interval_s, 0.01), _BLOCK_POLL_S)
        while True:
            try:
                entry = self._queue.get(timeout=poll)
            except queue.Empty:
                if self._closing.is_set() and self._queue.empty():
                    break
                self.sink.sync(fsync=False)
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
            self.sink.sync(fsync=False)
            if self._abort.is_set():
                self._drain_dropped()
                break
        self.sink.close()

    def _drain_dropped(self) -> None:
        while True:
            try:
                self._drop(self._queue.get_nowait(), "shutdown")
            except queue.Empty:
                return

    def _write_entry(self, entry: Entry) -> None:
        try:
            lines = record_lines(entry, self._store_inputs(entry), self._baseline(entry.spec))
        except OSError as exc:
            log.error("audit: cannot store the inputs of request %s: %s", entry.spec.request_id, exc)
            self._drop(entry, "write_error")
            return
        except Exception:  # a bug here must cost this request's records, counted, not the writer
            log.exception("audit: cannot build the records of request %s", entry.spec.request_id)
            self._drop(entry, "error")
            return
        pause = _RETRY_FIRST_S
        while True:
            try:
                self.sink.write(lines)
            except self.sink.errors as exc:
                self.sink.failed()
                if not self.sink.retry or self._abort.is_set():
                    log.error("audit: cannot write to %s: %s", self.sink.describe(), exc)
                    self._drop(entry, "write_error")
                    return
                # The records wait here; the buffer behind them fills and its when-full policy applies.
                self._warn(f"audit: cannot write to {self.sink.describe()} ({exc}); retrying in {pause:.1f} s")
                self._abort.wait(pause)
                pause = min(pause * 2, _RETRY_MAX_S)
            else:
                self.records_total.inc(len(lines))
                return

    def _store_inputs(self, entry: Entry) -> list[str | None]:
        items = entry.response.items
        if not self.config.store_inputs:
            return [None] * len(items)
        refs = []
        for i, item in enumerate(items):
            sha = item.input_sha256 or codec.input_sha256(codec.item_input(entry.spec, i))
            save_array(self.directory / input_ref(sha), codec.item_input(entry.spec, i))
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
