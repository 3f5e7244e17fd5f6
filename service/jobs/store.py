"""The durable job store: the `JobStore` interface and its SQLite (WAL) implementation
(PostgreSQL, shared by the front doors of a cluster: pg_store.py).

A job moves QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED. Every move is one
SQLite write statement or one IMMEDIATE transaction, so it is atomic across threads,
connections and processes. A claim hands out a fresh attempt token; progress and
the final write must present it, so a worker whose attempt was taken back (the
process died and `recover()` requeued the job, or another runner claimed it) can
never write over the new attempt. The result is committed in the same transaction
as the SUCCEEDED state: a client sees a final state with its result, or no final
state at all, and never two.

The store speaks `JobRecord`s and the proto's JobState numbers; it knows nothing
of gRPC or of what a request means. The shared store for multi-node clusters
(pg_store.PostgresJobStore) implements the same `JobStore` protocol.
"""
from __future__ import annotations

import base64
import binascii
import fcntl
import json
import os
import pathlib
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator, Sequence

from service.jobs.records import (  # noqa: F401  (the store's vocabulary, re-exported)
    ALL_STATES, CANCELLED, COLUMNS, EVALUATION, EXPLAIN, FAILED, FINAL_STATES, QUEUED, RUNNING, SUCCEEDED, JobRecord,
    JobStore, NewJob, StaleAttempt, record_from_row)
from service._proto import attribution_pb2 as pb
from workers.errors import FailedPrecondition, InvalidArgument, JobNotFound

# google.rpc.Code INTERNAL: what a job that keeps killing its process fails with.
INTERNAL_CODE = 13
_TOKEN_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,      -- submission order: ties of priority, paging
    id TEXT NOT NULL UNIQUE,
    state INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    idempotency_key TEXT UNIQUE,                -- NULL when the client gave none
    model TEXT NOT NULL,
    method INTEGER NOT NULL,
    num_items INTEGER NOT NULL,
    request BLOB NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL NOT NULL DEFAULT 0,
    finished REAL NOT NULL DEFAULT 0,
    attempt INTEGER NOT NULL DEFAULT 0,         -- claims so far
    token TEXT,                                 -- the RUNNING attempt's token
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error_code INTEGER NOT NULL DEFAULT 0,
    error_message TEXT NOT NULL DEFAULT '',
    item_names TEXT NOT NULL DEFAULT '[]',     -- JSON list of the submitted item names
    kind TEXT NOT NULL DEFAULT 'explain'       -- 'explain' or 'evaluation'
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (state, priority DESC, seq);
CREATE TABLE IF NOT EXISTS results (
    job_id TEXT PRIMARY KEY REFERENCES jobs (id),
    response BLOB NOT NULL,                     -- serialized ExplainResponse (evaluations: EvaluationResult)
    recommendation BLOB                         -- evaluations: the serialized Recommendation, if one was made
);
CREATE TABLE IF NOT EXISTS adoptions (         -- AdoptRecommendation: each model's adopted defaults
    model TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    recommendation BLOB NOT NULL,
    adopted REAL NOT NULL
);
"""
def default_data_dir() -> pathlib.Path:
    """`$XDG_DATA_HOME/attribution-service`, else `~/.local/share/attribution-service`."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return pathlib.Path(base) / "attribution-service"


def open_store(data_dir: str | os.PathLike | None = None, *, max_attempts: int = 5, url: str = "",
               lease_s: float = 30.0) -> JobStore:
    """The job store: PostgreSQL at `url` (postgresql://...) when given, shared by every front door;
    else the data directory's own SQLite file (created if missing), `<dir>/jobs.sqlite3`."""
    if url:
        from service.jobs.pg_store import PostgresJobStore

        return PostgresJobStore(url, lease_s=lease_s, max_attempts=max_attempts)
    directory = pathlib.Path(data_dir) if data_dir else default_data_dir()
    directory.mkdir(parents=True, exist_ok=True)
    return SqliteJobStore(directory / "jobs.sqlite3", max_attempts=max_attempts)


class StoreReads:
    """The reads both stores answer alike; a store sets its table names and parameter mark, and `_one`."""

    _jobs, _results, _adoptions, _mark = "jobs", "results", "adoptions", "?"

    def _one(self, sql: str, args: tuple) -> tuple | None:
        raise NotImplementedError

    def _all(self, sql: str, args: tuple) -> list[tuple]:
        raise NotImplementedError

    def recommendation(self, model: str, job_id: str = "") -> tuple[str, bytes] | None:
        m = self._mark
        where = f"j.id = {m}" if job_id else f"j.model = {m}"
        row = self._one(f"SELECT j.id, r.recommendation FROM {self._jobs} j JOIN {self._results} r ON r.job_id = j.id "
                        f"WHERE {where} AND j.kind = {m} AND j.state = {m} AND r.recommendation IS NOT NULL "
                        f"ORDER BY j.finished DESC, j.seq DESC LIMIT 1",
                        (job_id or model, EVALUATION, SUCCEEDED))
        return None if row is None else (row[0], bytes(row[1]))

    def adoptions(self) -> dict[str, bytes]:
        return {model: bytes(blob) for model, blob in
                self._all(f"SELECT model, recommendation FROM {self._adoptions}", ())}

    def get(self, job_id: str) -> JobRecord:
        row = self._one(f"SELECT {COLUMNS} FROM {self._jobs} WHERE id = {self._mark}", (job_id,))
        if row is None:
            raise JobNotFound(job_id)
        return record_from_row(row)

    def result(self, job_id: str) -> bytes | None:
        row = self._one(f"SELECT response FROM {self._results} WHERE job_id = {self._mark}", (job_id,))
        return None if row is None else bytes(row[0])

    def request(self, job_id: str) -> bytes:
        row = self._one(f"SELECT request FROM {self._jobs} WHERE id = {self._mark}", (job_id,))
        if row is None:
            raise JobNotFound(job_id)
        return bytes(row[0])


def list_filter(states: Sequence[int], page_size: int, page_token: str) -> tuple[list[int], int | None]:
    """ListJobs' arguments checked: (the states wanted, sorted; the seq the page starts below, or None)."""
    wanted = sorted(set(states))
    if any(s not in ALL_STATES for s in wanted):
        raise InvalidArgument.field("states", f"unknown job state in {wanted}")
    if page_size < 1:
        raise InvalidArgument.field("page_size", "must be positive")
    return wanted, decode_page_token(page_token, wanted) if page_token else None


class SqliteJobStore(StoreReads):
    """`JobStore` on one SQLite file in WAL mode: one connection behind a lock.

    exclusive: hold an advisory lock on `<path>.lock` for the store's lifetime, so a
        second service on the same data directory fails at start instead of
        requeueing the first one's running jobs. The kernel drops the lock when the
        process dies, however it dies, so a restart after SIGKILL takes it at once.
    max_attempts: `recover()` fails a job left RUNNING this many times rather than
        requeue it again: a job that kills its process must not kill every restart.
    """

    def __init__(self, path: str | os.PathLike, *, exclusive: bool = True, max_attempts: int = 5):
        if max_attempts < 1:
            raise InvalidArgument.field("jobs.max_attempts", "must be >= 1")
        self.path = pathlib.Path(path)
        self.max_attempts = max_attempts
        self._lock_file = self._take_lock() if exclusive else None
        # No implicit transactions: each write is one statement or one `_transaction`.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._lock = threading.Lock()
        # synchronous FULL: a committed final state survives power loss, not only a process kill.
        self._db.executescript("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;"
                               + _SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Columns added since a store was created: added in place, with their defaults."""
        present = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "item_names" not in present:
            self._db.execute("ALTER TABLE jobs ADD COLUMN item_names TEXT NOT NULL DEFAULT '[]'")
        if "kind" not in present:
            self._db.execute("ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'explain'")
        if "recommendation" not in {row[1] for row in self._db.execute("PRAGMA table_info(results)")}:
            self._db.execute("ALTER TABLE results ADD COLUMN recommendation BLOB")

    def _take_lock(self):
        handle = open(f"{self.path}.lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise FailedPrecondition(f"job store {self.path} is in use by {owner}; one service per data "
                                     "directory") from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        return handle

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: the write lock is taken up front, so it never fails halfway."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ------------------------------------------------------------ reads --

    def _one(self, sql: str, args: tuple) -> tuple | None:
        # fetchall, not fetchone: an UPDATE ... RETURNING commits only once it has run to its end.
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return rows[0] if rows else None

    def _all(self, sql: str, args: tuple) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def counts(self) -> dict[int, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        found = dict(rows)
        return {state: found.get(state, 0) for state in ALL_STATES}

    def list(self, states: Sequence[int] = (), page_size: int = 50,
             page_token: str = "") -> tuple[list[JobRecord], str]:
        wanted, before = list_filter(states, page_size, page_token)
        where, args = [], []
        if wanted:
            where.append(f"state IN ({', '.join('?' * len(wanted))})")
            args.extend(wanted)
        if before is not None:
            where.append("seq < ?")
            args.append(before)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._lock:
            rows = self._db.execute(f"SELECT {COLUMNS} FROM jobs {clause} ORDER BY seq DESC LIMIT ?",
                                    (*args, page_size + 1)).fetchall()
        records = [record_from_row(r) for r in rows[:page_size]]
        more = len(rows) > page_size
        return records, encode_page_token(records[-1].seq, wanted) if more else ""

    # ----------------------------------------------------------- writes --

    def submit(self, job: NewJob) -> tuple[JobRecord, bool]:
        key = job.idempotency_key or None
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO jobs (id, state, priority, idempotency_key, model, method, num_items, request, created,"
                " item_names, kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (idempotency_key) DO NOTHING",
                (job.id, QUEUED, job.priority, key, job.model, job.method, job.num_items, job.request, time.time(),
                 job.item_names, job.kind))
            created = cursor.rowcount == 1
            column, value = ("id", job.id) if created else ("idempotency_key", key)
            row = self._db.execute(f"SELECT {COLUMNS} FROM jobs WHERE {column} = ?", (value,)).fetchall()
        return record_from_row(row[0]), created

    def claim(self) -> JobRecord | None:
        token = uuid.uuid4().hex
        # One statement: the pick and the mark are atomic, whatever other
        # connections or processes claim at the same moment.
        row = self._one(
            f"UPDATE jobs SET state = ?, token = ?, attempt = attempt + 1, started = ?, progress = 0 "
            f"WHERE seq = (SELECT seq FROM jobs WHERE state = ? ORDER BY priority DESC, seq ASC LIMIT 1) "
            f"AND state = ? RETURNING {COLUMNS}", (RUNNING, token, time.time(), QUEUED, QUEUED))
        return None if row is None else record_from_row(row)

    def heartbeat(self, job_id: str, token: str) -> bool:
        """One process owns this file (the lock), so there is no lease to renew: the ownership check."""
        row = self._one("SELECT cancel_requested FROM jobs WHERE id = ? AND token = ? AND state = ?",
                        (job_id, token, RUNNING))
        if row is None:
            raise StaleAttempt(f"job {job_id}: attempt {token[:8]} no longer owns it")
        return bool(row[0])

    def set_progress(self, job_id: str, token: str, progress: float) -> bool:
        row = self._one("UPDATE jobs SET progress = MAX(progress, ?) WHERE id = ? AND token = ? AND state = ? "
                        "RETURNING cancel_requested", (float(progress), job_id, token, RUNNING))
        if row is None:
            raise StaleAttempt(f"job {job_id}: attempt {token[:8]} no longer owns it")
        return bool(row[0])

    def finish(self, job_id: str, token: str, state: int, *, error: tuple[int, str] = (0, ""),
               result: bytes | None = None, recommendation: bytes | None = None) -> JobRecord:
        if state not in FINAL_STATES:
            raise InvalidArgument.field("state", f"{state} is not a final state")
        progress = "1.0" if state == SUCCEEDED else "progress"
        with self._transaction() as db:
            row = db.execute(
                f"UPDATE jobs SET state = ?, finished = ?, progress = {progress}, token = NULL, "
                f"error_code = ?, error_message = ? WHERE id = ? AND token = ? AND state = ? "
                f"RETURNING {COLUMNS}", (state, time.time(), error[0], error[1], job_id, token, RUNNING)
            ).fetchall()
            if not row:
                raise StaleAttempt(f"job {job_id}: attempt {token[:8]} no longer owns it")
            if result is not None:
                db.execute("INSERT INTO results (job_id, response, recommendation) VALUES (?, ?, ?)",
                           (job_id, result, recommendation))
        return record_from_row(row[0])

    def adopt(self, model: str, job_id: str, recommendation: bytes) -> None:
        with self._lock:
            self._db.execute("INSERT INTO adoptions (model, job_id, recommendation, adopted) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT (model) DO UPDATE SET job_id = excluded.job_id, "
                             "recommendation = excluded.recommendation, adopted = excluded.adopted",
                             (model, job_id, recommendation, time.time()))

    def release(self, job_id: str, token: str) -> JobRecord:
        row = self._one(f"UPDATE jobs SET state = ?, token = NULL, progress = 0, started = 0 "
                        f"WHERE id = ? AND token = ? AND state = ? RETURNING {COLUMNS}",
                        (QUEUED, job_id, token, RUNNING))
        if row is None:
            raise StaleAttempt(f"job {job_id}: attempt {token[:8]} no longer owns it")
        return record_from_row(row)

    def cancel(self, job_id: str) -> JobRecord:
        with self._lock:
            row = self._db.execute(
                f"UPDATE jobs SET state = CASE state WHEN ? THEN ? ELSE state END, "
                f"finished = CASE state WHEN ? THEN ? ELSE finished END, cancel_requested = 1 "
                f"WHERE id = ? AND state IN (?, ?) RETURNING {COLUMNS}",
                (QUEUED, CANCELLED, QUEUED, time.time(), job_id, QUEUED, RUNNING)).fetchall()
        if row:
            return record_from_row(row[0])
        job = self.get(job_id)  # JobNotFound, or it is already final
        raise FailedPrecondition(f"job {job_id} is already {pb.JobState.Name(job.state)}; only QUEUED or "
                                 "RUNNING jobs can be cancelled")

    def recover(self) -> dict[str, int]:
        now = time.time()
        with self._transaction() as db:
            cancelled = db.execute(
                "UPDATE jobs SET state = ?, finished = ?, token = NULL WHERE state = ? AND cancel_requested = 1",
                (CANCELLED, now, RUNNING)).rowcount
            failed = db.execute(
                "UPDATE jobs SET state = ?, finished = ?, token = NULL, error_code = ?, error_message = ? "
                "WHERE state = ? AND attempt >= ?",
                (FAILED, now, INTERNAL_CODE, f"the service stopped while running this job {self.max_attempts} "
                                         "times; it is not retried again", RUNNING, self.max_attempts)).rowcount
            requeued = db.execute("UPDATE jobs SET state = ?, token = NULL, progress = 0, started = 0 "
                                  "WHERE state = ?", (QUEUED, RUNNING)).rowcount
        return {"requeued": requeued, "cancelled": cancelled, "failed": failed}

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor drops the flock
            self._lock_file = None


def encode_page_token(last_seq: int, states: list[int]) -> str:
    raw = json.dumps({"v": _TOKEN_VERSION, "before": last_seq, "states": states}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_page_token(token: str, states: list[int]) -> int:
    """The seq the page starts below; the token must come from a listing with the same filter."""
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        before, token_states = raw["before"], raw["states"]
        if raw.get("v") != _TOKEN_VERSION or not isinstance(before, int) or not isinstance(token_states, list):
            raise ValueError("unexpected token content")
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument.field("page_token", "is not a token this server gave out") from None
    if token_states != states:
        raise InvalidArgument.field("page_token", "was given for a different state filter; keep the filter "
                                                  "while paging")
    return before
