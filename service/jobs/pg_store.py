"""`JobStore` on PostgreSQL: one queue shared by every front door of a cluster.

Same states, tokens and atomicity rules as the SQLite store (store.py); what changes is
that several processes on several hosts run jobs from one table at once:

- A claim picks the next QUEUED row with `FOR UPDATE SKIP LOCKED`, so concurrent runners
  never wait on each other nor get the same job, and gives it a **lease**: the row's
  `lease_expires`, in the database's clock (hosts' clocks never compare). The runner renews
  it with every progress write and a heartbeat (`heartbeat`), a third of the lease apart.
- A job whose lease ran out belongs to a runner that died (or lost the database): any
  runner settles it before claiming (requeued, or CANCELLED when cancel was asked, or FAILED
  after `max_attempts`), the same rules `recover()` applies to a restarted SQLite service.
  The dead runner's token no longer matches, so nothing it might still write lands, and the
  result is committed with the final state in one transaction: each job ends once.
- The schema is versioned (service/pgschema.py): a service applies the migrations it knows
  under an advisory lock at start, and refuses a database a newer service has migrated.

Results are stored in the table as the serialized ExplainResponse (BYTEA; an evaluation's EvaluationResult,
with its Recommendation beside it), like SQLite's; adopted recommendations live in `attribution_adoptions`.
"""
from __future__ import annotations

import threading
import time
import uuid
from typing import Sequence

from service.jobs.records import (ALL_STATES, CANCELLED, COLUMNS, FAILED, FINAL_STATES, QUEUED, RUNNING,
                                  SUCCEEDED, JobRecord, NewJob, StaleAttempt, record_from_row)
from service.jobs.store import INTERNAL_CODE, StoreReads, encode_page_token, list_filter
from service.pgschema import migrate, reason, redact
from service._proto import attribution_pb2 as pb
from workers.errors import FailedPrecondition, InvalidArgument, Unavailable

_NOW = "EXTRACT(EPOCH FROM clock_timestamp())"


class PostgresJobStore(StoreReads):
    """`JobStore` on a PostgreSQL database shared by every front door (psycopg 3, a connection pool).

    lease_s: how long a claimed job stays with its runner without a renewal.
    max_attempts: a job whose lease ran out this many times fails instead of running again.
    """

    _jobs, _results, _adoptions, _mark = "attribution_jobs", "attribution_job_results", "attribution_adoptions", "%s"

    def __init__(self, url: str, *, lease_s: float = 30.0, max_attempts: int = 5, pool_size: int = 4,
                 connect_timeout_s: float = 10.0):
        import psycopg
        from psycopg_pool import ConnectionPool

        if max_attempts < 1:
            raise InvalidArgument.field("jobs.max_attempts", "must be >= 1")
        self.url, self.lease_s, self.max_attempts = url, float(lease_s), max_attempts
        self.owner = uuid.uuid4().hex[:12]
        self._psycopg = psycopg
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, open=False, timeout=connect_timeout_s,
                                    kwargs={"autocommit": True, "connect_timeout": max(1, int(connect_timeout_s))},
                                    name="attribution-jobs")
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s)
        except Exception as exc:
            self._pool.close()
            raise Unavailable(f"cannot reach the job store at {redact(url)}: {reason(exc)}") from None
        self._reaped_at = 0.0
        self._reap_lock = threading.Lock()
        try:
            self._migrate()
        except BaseException:
            self._pool.close()
            raise

    # ------------------------------------------------------------ schema --

    def _migrate(self) -> None:
        with self._pool.connection() as conn:
            migrate(conn, self.url)

    def schema_version(self) -> int:
        return int(self._one("SELECT COALESCE(MAX(version), 0) FROM attribution_schema", ())[0])

    # ------------------------------------------------------------- reads --

    def _one(self, sql: str, args: tuple) -> tuple | None:
        with self._pool.connection() as conn:
            return conn.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple) -> list[tuple]:
        with self._pool.connection() as conn:
            return conn.execute(sql, args).fetchall()

    def counts(self) -> dict[int, int]:
        with self._pool.connection() as conn:
            found = dict(conn.execute("SELECT state, COUNT(*) FROM attribution_jobs GROUP BY state").fetchall())
        return {state: int(found.get(state, 0)) for state in ALL_STATES}

    def list(self, states: Sequence[int] = (), page_size: int = 50,
             page_token: str = "") -> tuple[list[JobRecord], str]:
        wanted, before = list_filter(states, page_size, page_token)
        where, args = [], []
        if wanted:
            where.append("state = ANY(%s)")
            args.append(wanted)
        if before is not None:
            where.append("seq < %s")
            args.append(before)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._pool.connection() as conn:
            rows = conn.execute(f"SELECT {COLUMNS} FROM attribution_jobs {clause} ORDER BY seq DESC LIMIT %s",
                                (*args, page_size + 1)).fetchall()
        records = [record_from_row(r) for r in rows[:page_size]]
        return records, encode_page_token(records[-1].seq, wanted) if len(rows) > page_size else ""

    # ------------------------------------------------------------ writes --

    def submit(self, job: NewJob) -> tuple[JobRecord, bool]:
        key = job.idempotency_key or None
        with self._pool.connection() as conn:
            row = conn.execute(
                f"INSERT INTO attribution_jobs (id, state, priority, idempotency_key, model, method, num_items, "
                f"request, created, item_names, kind) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                f"ON CONFLICT (idempotency_key) DO NOTHING RETURNING {COLUMNS}",
                (job.id, QUEUED, job.priority, key, job.model, job.method, job.num_items, job.request, time.time(),
                 job.item_names, job.kind)).fetchone()
            if row is not None:
                return record_from_row(row), True
            row = conn.execute(f"SELECT {COLUMNS} FROM attribution_jobs WHERE idempotency_key = %s",
                               (key,)).fetchone()
        return record_from_row(row), False

    def claim(self) -> JobRecord | None:
        self._reap_if_due()
        row = self._one(
            f"UPDATE attribution_jobs SET state = %s, token = %s, attempt = attempt + 1, started = %s, progress = 0, "
            f"lease_expires = {_NOW} + %s, owner = %s "
            f"WHERE seq = (SELECT seq FROM attribution_jobs WHERE state = %s ORDER BY priority DESC, seq "
            f"LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING {COLUMNS}",
            (RUNNING, uuid.uuid4().hex, time.time(), self.lease_s, self.owner, QUEUED))
        return None if row is None else record_from_row(row)

    def _owned(self, sql: str, args: tuple, job_id: str, token: str) -> tuple:
        row = self._one(sql, args)
        if row is None:
            raise StaleAttempt(f"job {job_id}: attempt {token[:8]} no longer owns it")
        return row

    def set_progress(self, job_id: str, token: str, progress: float) -> bool:
        row = self._owned(
            f"UPDATE attribution_jobs SET progress = GREATEST(progress, %s), lease_expires = {_NOW} + %s "
            f"WHERE id = %s AND token = %s AND state = %s RETURNING cancel_requested",
            (float(progress), self.lease_s, job_id, token, RUNNING), job_id, token)
        return bool(row[0])

    def heartbeat(self, job_id: str, token: str) -> bool:
        row = self._owned(
            f"UPDATE attribution_jobs SET lease_expires = {_NOW} + %s WHERE id = %s AND token = %s AND state = %s "
            f"RETURNING cancel_requested", (self.lease_s, job_id, token, RUNNING), job_id, token)
        return bool(row[0])

    def finish(self, job_id: str, token: str, state: int, *, error: tuple[int, str] = (0, ""),
               result: bytes | None = None, recommendation: bytes | None = None) -> JobRecord:
        if state not in FINAL_STATES:
            raise InvalidArgument.field("state", f"{state} is not a final state")
        progress = "1.0" if state == SUCCEEDED else "progress"
        with self._pool.connection() as conn, conn.transaction():
            row = conn.execute(
                f"UPDATE attribution_jobs SET state = %s, finished = %s, progress = {progress}, token = NULL, "
                f"lease_expires = 0, error_code = %s, error_message = %s WHERE id = %s AND token = %s AND state = %s "
                f"RETURNING {COLUMNS}", (state, time.time(), error[0], error[1], job_id, token, RUNNING)).fetchone()
            if row is None:
                raise StaleAttempt(f"job {job_id}: attempt {token[:8]} no longer owns it")
            if result is not None:
                conn.execute("INSERT INTO attribution_job_results (job_id, response, recommendation) "
                             "VALUES (%s, %s, %s)", (job_id, result, recommendation))
        return record_from_row(row)

    def adopt(self, model: str, job_id: str, recommendation: bytes) -> None:
        with self._pool.connection() as conn:
            conn.execute("INSERT INTO attribution_adoptions (model, job_id, recommendation, adopted) "
                         "VALUES (%s, %s, %s, %s) ON CONFLICT (model) DO UPDATE SET job_id = EXCLUDED.job_id, "
                         "recommendation = EXCLUDED.recommendation, adopted = EXCLUDED.adopted",
                         (model, job_id, recommendation, time.time()))

    def release(self, job_id: str, token: str) -> JobRecord:
        row = self._owned(
            f"UPDATE attribution_jobs SET state = %s, token = NULL, progress = 0, started = 0, lease_expires = 0 "
            f"WHERE id = %s AND token = %s AND state = %s RETURNING {COLUMNS}",
            (QUEUED, job_id, token, RUNNING), job_id, token)
        return record_from_row(row)

    def cancel(self, job_id: str) -> JobRecord:
        row = self._one(
            f"UPDATE attribution_jobs SET state = CASE state WHEN %s THEN %s ELSE state END, "
            f"finished = CASE state WHEN %s THEN %s ELSE finished END, cancel_requested = TRUE "
            f"WHERE id = %s AND state IN (%s, %s) RETURNING {COLUMNS}",
            (QUEUED, CANCELLED, QUEUED, time.time(), job_id, QUEUED, RUNNING))
        if row is not None:
            return record_from_row(row)
        job = self.get(job_id)  # JobNotFound, or it is already final
        raise FailedPrecondition(f"job {job_id} is already {pb.JobState.Name(job.state)}; only QUEUED or "
                                 "RUNNING jobs can be cancelled")

    def recover(self) -> dict[str, int]:
        """Settles the RUNNING jobs whose lease ran out; jobs other front doors are running are theirs."""
        return self._reap()

    def _reap_if_due(self) -> None:
        now = time.monotonic()
        with self._reap_lock:
            if now - self._reaped_at < self.lease_s / 4:
                return
            self._reaped_at = now
        self._reap()

    def _reap(self) -> dict[str, int]:
        expired = f"state = {RUNNING} AND lease_expires < {_NOW}"
        now = time.time()
        with self._pool.connection() as conn, conn.transaction():
            cancelled = conn.execute(
                f"UPDATE attribution_jobs SET state = %s, finished = %s, token = NULL WHERE {expired} "
                f"AND cancel_requested", (CANCELLED, now)).rowcount
            failed = conn.execute(
                f"UPDATE attribution_jobs SET state = %s, finished = %s, token = NULL, error_code = %s, "
                f"error_message = %s WHERE {expired} AND attempt >= %s",
                (FAILED, now, INTERNAL_CODE, f"the runner of this job stopped {self.max_attempts} times; it is "
                                             "not retried again", self.max_attempts)).rowcount
            requeued = conn.execute(
                f"UPDATE attribution_jobs SET state = %s, token = NULL, progress = 0, started = 0 WHERE {expired}",
                (QUEUED,)).rowcount
        return {"requeued": requeued, "cancelled": cancelled, "failed": failed}

    def close(self) -> None:
        self._pool.close()

