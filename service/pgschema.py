"""The service's tables in a shared PostgreSQL database: versioned migrations, applied at start.

Every process that opens the database (job stores, audit writers, on any host) runs `migrate`: under a
transaction-scoped advisory lock it applies, in order, the migrations the database has not had yet and
records each in `attribution_schema`; a database a newer service has migrated is refused, with a message
saying so, rather than written with an older idea of its tables. A migration is never edited once
shipped, only appended to.
"""
from __future__ import annotations

import re
import time

from workers.errors import FailedPrecondition

URL_SCHEMES = ("postgresql://", "postgres://")
_LOCK_KEY = 0x61747472  # pg_advisory_xact_lock key of schema changes ("attr")

# Version n is MIGRATIONS[n - 1].
MIGRATIONS = (
    # 1: the job queue and its results (service/jobs/pg_store.py).
    """
    CREATE TABLE attribution_jobs (
        seq BIGSERIAL PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        state INTEGER NOT NULL,
        priority INTEGER NOT NULL,
        idempotency_key TEXT UNIQUE,
        model TEXT NOT NULL,
        method INTEGER NOT NULL,
        num_items INTEGER NOT NULL,
        request BYTEA NOT NULL,
        progress DOUBLE PRECISION NOT NULL DEFAULT 0,
        created DOUBLE PRECISION NOT NULL,
        started DOUBLE PRECISION NOT NULL DEFAULT 0,
        finished DOUBLE PRECISION NOT NULL DEFAULT 0,
        attempt INTEGER NOT NULL DEFAULT 0,
        token TEXT,
        cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
        error_code INTEGER NOT NULL DEFAULT 0,
        error_message TEXT NOT NULL DEFAULT '',
        item_names TEXT NOT NULL DEFAULT '[]',
        lease_expires DOUBLE PRECISION NOT NULL DEFAULT 0,  -- database clock, epoch seconds
        owner TEXT NOT NULL DEFAULT ''                      -- the runner holding the lease
    );
    CREATE INDEX attribution_jobs_queue ON attribution_jobs (state, priority DESC, seq);
    CREATE TABLE attribution_job_results (
        job_id TEXT PRIMARY KEY REFERENCES attribution_jobs (id),
        response BYTEA NOT NULL
    );
    """,
    # 2: the audit log (service/audit/sinks.py): one row per record, the record itself as written to JSONL.
    """
    CREATE TABLE attribution_audit (
        id BIGSERIAL PRIMARY KEY,
        ts TIMESTAMPTZ NOT NULL,
        request_id TEXT NOT NULL,
        entry_id TEXT NOT NULL,
        writer TEXT NOT NULL,        -- the front door that wrote it
        record TEXT NOT NULL         -- the JSON record, byte for byte as a JSONL line would hold it
    );
    CREATE INDEX attribution_audit_request ON attribution_audit (request_id);
    CREATE INDEX attribution_audit_ts ON attribution_audit (ts);
    """,
    # 3: evaluation jobs (the job's kind, the recommendation beside its result) and adopted recommendations.
    """
    ALTER TABLE attribution_jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'explain';
    ALTER TABLE attribution_job_results ADD COLUMN recommendation BYTEA;
    CREATE INDEX attribution_jobs_evaluations ON attribution_jobs (model, kind, state, finished);
    CREATE TABLE attribution_adoptions (
        model TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        recommendation BYTEA NOT NULL,
        adopted DOUBLE PRECISION NOT NULL
    );
    """,
)


def is_url(value: str) -> bool:
    return str(value).startswith(URL_SCHEMES)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def reason(exc: BaseException) -> str:
    """A database error's first line, without a URL's password."""
    text = str(exc).strip().splitlines()
    return redact(text[0] if text else type(exc).__name__)


def migrate(conn, url: str) -> int:
    """Brings the schema up to date on `conn` (a psycopg connection); the version it is at."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute("CREATE TABLE IF NOT EXISTS attribution_schema (version INTEGER NOT NULL, "
                     "applied DOUBLE PRECISION NOT NULL)")
        (version,) = conn.execute("SELECT COALESCE(MAX(version), 0) FROM attribution_schema").fetchone()
        if version > len(MIGRATIONS):
            raise FailedPrecondition(
                f"the database at {redact(url)} has schema version {version}; this service knows up to "
                f"{len(MIGRATIONS)}: upgrade the service (a newer one migrated the database)")
        for number in range(version + 1, len(MIGRATIONS) + 1):
            conn.execute(MIGRATIONS[number - 1])
            conn.execute("INSERT INTO attribution_schema (version, applied) VALUES (%s, %s)", (number, time.time()))
    return len(MIGRATIONS)
