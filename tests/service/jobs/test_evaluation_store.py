"""Evaluation jobs in both stores (SQLite and PostgreSQL): the job's kind, the recommendation beside the
result, adoptions, and additive migrations of stores made before them."""
from __future__ import annotations

import sqlite3
import uuid

import pytest

from service._proto import attribution_pb2 as pb
from service.jobs.pg_store import PostgresJobStore
from service.jobs.store import EVALUATION, SUCCEEDED, NewJob, SqliteJobStore
from service.pgschema import MIGRATIONS
from tests.service.jobs.test_store import open_shared, store  # noqa: F401  (both stores' fixtures)


def evaluation_job(model: str = "demo") -> NewJob:
    return NewJob(id=uuid.uuid4().hex, priority=0, idempotency_key="", model=model, method=pb.METHOD_UNSPECIFIED,
                  num_items=4, request=b"evaluation-request", kind=EVALUATION)


def recommendation(job_id: str, method: int) -> bytes:
    return pb.Recommendation(method=method, cam_layer="block4", evaluation_job_id=job_id).SerializeToString()


def run(store, job: NewJob, rec: bytes | None) -> None:
    store.submit(job)
    claimed = store.claim()
    assert claimed.id == job.id and claimed.is_evaluation
    store.finish(job.id, claimed.token, SUCCEEDED, result=b"evaluation-result", recommendation=rec)


def test_recommendations_and_adoptions(store):  # noqa: F811
    assert store.recommendation("demo") is None and store.adoptions() == {}
    first, second, silent, other = evaluation_job(), evaluation_job(), evaluation_job(), evaluation_job("other")
    run(store, first, recommendation(first.id, pb.GRAD_CAM))
    run(store, second, recommendation(second.id, pb.INTEGRATED_GRADIENTS))
    run(store, silent, None)  # recommended nothing: it does not hide the latest recommendation
    run(store, other, recommendation(other.id, pb.SMOOTHGRAD))
    explain = NewJob(id="explain", priority=0, idempotency_key="", model="demo", method=pb.GRAD_CAM, num_items=1,
                     request=b"r")
    store.submit(explain)
    assert store.get(explain.id).kind == "explain" and not store.get(explain.id).is_evaluation
    assert store.get(first.id).is_evaluation and store.result(first.id) == b"evaluation-result"
    job_id, blob = store.recommendation("demo")
    assert job_id == second.id and pb.Recommendation.FromString(blob).method == pb.INTEGRATED_GRADIENTS
    assert store.recommendation("demo", first.id)[0] == first.id
    assert store.recommendation("demo", silent.id) is None and store.recommendation("demo", "explain") is None
    store.adopt("demo", first.id, recommendation(first.id, pb.GRAD_CAM))
    store.adopt("demo", second.id, recommendation(second.id, pb.INTEGRATED_GRADIENTS))  # replaces the first
    adopted = {model: pb.Recommendation.FromString(blob) for model, blob in store.adoptions().items()}
    assert list(adopted) == ["demo"] and adopted["demo"].evaluation_job_id == second.id


def test_sqlite_store_from_before_evaluations_is_migrated(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    old = SqliteJobStore(path)
    old.submit(NewJob(id="old", priority=-1, idempotency_key="", model="demo", method=1, num_items=1, request=b""))
    old.close()
    db = sqlite3.connect(path)
    db.executescript("ALTER TABLE jobs DROP COLUMN kind; ALTER TABLE results DROP COLUMN recommendation; "
                     "DROP TABLE adoptions;")
    db.close()
    store = SqliteJobStore(path)
    try:
        assert store.get("old").kind == "explain"
        job = evaluation_job()
        run(store, job, recommendation(job.id, pb.GRAD_CAM))
        assert store.recommendation("demo")[0] == job.id
        store.adopt("demo", job.id, b"x")
        assert store.adoptions() == {"demo": b"x"}
    finally:
        store.close()


def test_postgres_database_at_version_2_is_migrated(postgres_url):
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE attribution_schema (version INTEGER NOT NULL, applied DOUBLE PRECISION NOT NULL)")
        for number in (1, 2):
            conn.execute(MIGRATIONS[number - 1])
            conn.execute("INSERT INTO attribution_schema VALUES (%s, 0)", (number,))
        conn.execute("INSERT INTO attribution_jobs (id, state, priority, model, method, num_items, request, created) "
                     "VALUES ('old', %s, 0, 'demo', 1, 1, 'x', 0)", (pb.SUCCEEDED,))
    store = PostgresJobStore(postgres_url)
    try:
        assert store.schema_version() == len(MIGRATIONS) >= 3
        assert store.get("old").kind == "explain"
        job = evaluation_job()
        run(store, job, recommendation(job.id, pb.GRAD_CAM))
        assert store.recommendation("demo")[0] == job.id
    finally:
        store.close()
