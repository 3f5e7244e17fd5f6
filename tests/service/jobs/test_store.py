"""The job stores: claims, tokens, idempotency, cancel, paging, recovery, durability.

The tests taking `store` or `open_shared` run against SQLite and against a real PostgreSQL server
(loadtests/pgserver.py); the rest are one store's own: SQLite's file lock and WAL, PostgreSQL's leases
and migrations."""
from __future__ import annotations

import sqlite3
import threading
import uuid

import pytest

from service._proto import attribution_pb2 as pb
from service.jobs.pg_store import PostgresJobStore
from service.pgschema import MIGRATIONS
from service.jobs.store import (CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, NewJob, SqliteJobStore,
                                StaleAttempt, open_store)
from workers.errors import FailedPrecondition, InvalidArgument, JobNotFound, Unavailable


def new_job(priority: int = 0, key: str = "", items: int = 1) -> NewJob:
    return NewJob(id=uuid.uuid4().hex, priority=priority, idempotency_key=key, model="demo", method=pb.SCORE_CAM,
                  num_items=items, request=b"request-bytes")


@pytest.fixture(params=["sqlite", "postgres"])
def open_shared(request, tmp_path):
    """Opens another store on the same jobs: another connection, as another process (or, on PostgreSQL,
    another host's front door) would hold."""
    if request.param == "sqlite":
        make = lambda **kw: SqliteJobStore(tmp_path / "jobs.sqlite3", exclusive=False, **kw)  # noqa: E731
    else:
        url = request.getfixturevalue("postgres_url")
        make = lambda **kw: PostgresJobStore(url, **kw)  # noqa: E731
    opened = []

    def open_(**kw):
        opened.append(make(**kw))
        return opened[-1]

    request.addfinalizer(lambda: [s.close() for s in opened])  # before the database is dropped
    return open_


@pytest.fixture
def store(open_shared):
    return open_shared()


def test_submit_then_get(store):
    job, created = store.submit(new_job(priority=7, items=3))
    assert created
    got = store.get(job.id)
    assert (got.state, got.priority, got.num_items, got.progress) == (QUEUED, 7, 3, 0.0)
    assert got.created > 0 and got.started == 0 and got.finished == 0 and got.token == ""
    assert store.request(job.id) == b"request-bytes"
    assert store.result(job.id) is None
    with pytest.raises(JobNotFound):
        store.get("nope")


def test_same_idempotency_key_gives_same_job(store):
    first, created = store.submit(new_job(key="nightly-42"))
    again, created_again = store.submit(new_job(key="nightly-42", priority=99))
    assert created and not created_again
    assert again.id == first.id and again.priority == first.priority
    other, _ = store.submit(new_job(key="nightly-43"))
    assert other.id != first.id
    # No key: every submission is a new job.
    assert store.submit(new_job())[0].id != store.submit(new_job())[0].id


def test_concurrent_submissions_with_one_key_make_one_job(open_shared):
    stores = [open_shared() for _ in range(2)]
    ids, barrier = [], threading.Barrier(8)

    def submit(i):
        barrier.wait()
        ids.append(stores[i % 2].submit(new_job(key="same"))[0].id)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 8 and len(set(ids)) == 1
    assert stores[0].counts()[QUEUED] == 1


def test_claim_order_priority_then_submission(store):
    low = store.submit(new_job(priority=-5))[0]
    first = store.submit(new_job(priority=10))[0]
    second = store.submit(new_job(priority=10))[0]
    middle = store.submit(new_job(priority=0))[0]
    order = [store.claim().id for _ in range(4)]
    assert order == [first.id, second.id, middle.id, low.id]
    assert store.claim() is None


def test_claim_marks_running_with_a_fresh_token(store):
    job = store.submit(new_job())[0]
    claimed = store.claim()
    assert claimed.id == job.id and claimed.state == RUNNING and claimed.attempt == 1
    assert claimed.token and claimed.started >= job.created
    assert store.get(job.id).token == claimed.token


def test_concurrent_claims_hand_out_each_job_once(open_shared):
    """Threads on two connections (as two processes would be) race for 40 jobs."""
    stores = [open_shared() for _ in range(2)]
    submitted = {stores[0].submit(new_job(priority=i % 3))[0].id for i in range(40)}
    claimed, lock = [], threading.Lock()

    def worker(s):
        while (job := s.claim()) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(stores[i % 2],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(submitted)
    assert stores[1].counts()[RUNNING] == 40


def test_finish_stores_result_atomically_and_once(store):
    store.submit(new_job())
    job = store.claim()
    done = store.finish(job.id, job.token, SUCCEEDED, result=b"response")
    assert done.state == SUCCEEDED and done.progress == 1.0 and done.finished >= done.started and done.token == ""
    assert store.result(job.id) == b"response"
    with pytest.raises(StaleAttempt):
        store.finish(job.id, job.token, SUCCEEDED, result=b"second")
    assert store.result(job.id) == b"response"


def test_a_stale_attempt_can_never_write(store):
    store.submit(new_job())
    old = store.claim()
    if isinstance(store, PostgresJobStore):
        _expire(store.url, old.id)  # a shared store takes back only attempts whose lease ran out
    store.recover()  # as at a restart: the attempt is taken back and the job requeued
    new = store.claim()
    assert new.id == old.id and new.token != old.token and new.attempt == 2
    with pytest.raises(StaleAttempt):
        store.set_progress(old.id, old.token, 0.5)
    with pytest.raises(StaleAttempt):
        store.finish(old.id, old.token, SUCCEEDED, result=b"stale")
    assert store.get(new.id).state == RUNNING and store.result(new.id) is None
    store.finish(new.id, new.token, SUCCEEDED, result=b"fresh")
    assert store.result(new.id) == b"fresh"


def test_failed_job_keeps_its_error(store):
    store.submit(new_job())
    job = store.claim()
    store.set_progress(job.id, job.token, 0.25)
    failed = store.finish(job.id, job.token, FAILED, error=(3, "bad layer"))
    assert (failed.state, failed.error_code, failed.error_message, failed.progress) == (FAILED, 3, "bad layer", 0.25)


def test_progress_is_monotonic_and_reports_cancel_requests(store):
    store.submit(new_job())
    job = store.claim()
    assert store.set_progress(job.id, job.token, 0.5) is False
    store.set_progress(job.id, job.token, 0.3)
    assert store.get(job.id).progress == 0.5
    store.cancel(job.id)
    assert store.set_progress(job.id, job.token, 0.6) is True


def test_cancel_semantics(store):
    queued = store.submit(new_job())[0]
    running_job = store.submit(new_job(priority=-1))[0]
    cancelled = store.cancel(queued.id)
    assert cancelled.state == CANCELLED and cancelled.finished > 0
    claimed = store.claim()
    assert claimed.id == running_job.id  # a cancelled job is never claimed
    requested = store.cancel(claimed.id)
    assert requested.state == RUNNING and requested.cancel_requested
    assert store.cancel(claimed.id).state == RUNNING  # asking twice is harmless
    store.finish(claimed.id, claimed.token, CANCELLED)
    for job_id in (queued.id, claimed.id):
        with pytest.raises(FailedPrecondition, match="already CANCELLED"):
            store.cancel(job_id)
    with pytest.raises(JobNotFound):
        store.cancel("missing")


def test_release_requeues_for_the_next_claim(store):
    store.submit(new_job())
    job = store.claim()
    released = store.release(job.id, job.token)
    assert released.state == QUEUED and released.started == 0
    assert store.claim().id == job.id


def test_list_pages_newest_first_with_state_filter(store):
    ids = [store.submit(new_job())[0].id for _ in range(7)]
    for _ in range(2):
        store.claim()  # the two oldest are RUNNING now
    pages, token = [], ""
    while True:
        jobs, token = store.list([QUEUED], page_size=2, page_token=token)
        pages.append([j.id for j in jobs])
        if not token:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    assert sum(pages, []) == list(reversed(ids[2:]))
    everything, token = store.list([], page_size=50)
    assert [j.id for j in everything] == list(reversed(ids)) and token == ""
    running, _ = store.list([RUNNING, SUCCEEDED])
    assert {j.id for j in running} == set(ids[:2])


def test_page_tokens_are_checked(store):
    for _ in range(3):
        store.submit(new_job())
    _, token = store.list([QUEUED], page_size=1)
    with pytest.raises(InvalidArgument, match="different state filter"):
        store.list([RUNNING], page_size=1, page_token=token)
    with pytest.raises(InvalidArgument, match="page_token"):
        store.list([], page_size=1, page_token="not-a-token")
    with pytest.raises(InvalidArgument, match="states"):
        store.list([42])


def test_sqlite_recover_requeues_cancels_and_gives_up(tmp_path):
    store = open_store(tmp_path, max_attempts=2)
    poison = store.submit(new_job(priority=3))[0]
    to_cancel = store.submit(new_job(priority=2))[0]
    store.claim(), store.claim()
    store.cancel(to_cancel.id)
    assert store.recover() == {"requeued": 1, "cancelled": 1, "failed": 0}
    plain = store.submit(new_job(priority=1))[0]
    assert store.claim().id == poison.id and store.claim().id == plain.id  # poison's second attempt
    assert store.recover() == {"requeued": 1, "cancelled": 0, "failed": 1}
    assert store.get(to_cancel.id).state == CANCELLED
    failed = store.get(poison.id)
    assert failed.state == FAILED and failed.error_code == 13 and "2 times" in failed.error_message
    requeued = store.get(plain.id)
    assert (requeued.state, requeued.progress, requeued.token, requeued.attempt) == (QUEUED, 0.0, "", 1)
    store.close()


def test_jobs_and_results_survive_reopening(open_shared):
    store = open_shared()
    store.submit(new_job(key="k"))
    job = store.claim()
    store.finish(job.id, job.token, SUCCEEDED, result=b"kept")
    store.close()
    again = open_shared()
    assert again.get(job.id).state == SUCCEEDED and again.result(job.id) == b"kept"
    assert again.submit(new_job(key="k"))[0].id == job.id


def test_heartbeat_answers_cancel_requests_and_refuses_a_stale_attempt(store):
    job = store.submit(new_job())[0]
    claimed = store.claim()
    assert store.heartbeat(job.id, claimed.token) is False
    store.cancel(job.id)
    assert store.heartbeat(job.id, claimed.token) is True
    with pytest.raises(StaleAttempt):
        store.heartbeat(job.id, "not-the-token")
    store.finish(job.id, claimed.token, CANCELLED)
    with pytest.raises(StaleAttempt):
        store.heartbeat(job.id, claimed.token)


# ------------------------------------------------------------ PostgreSQL's own --

def _expire(url: str, job_id: str) -> None:
    """As if the job's runner had stopped renewing long ago (the database's clock decides)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE attribution_jobs SET lease_expires = 0 WHERE id = %s", (job_id,))


def _lease_left(url: str, job_id: str) -> float:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT lease_expires - EXTRACT(EPOCH FROM clock_timestamp()) FROM attribution_jobs "
                            "WHERE id = %s", (job_id,)).fetchone()[0]


def test_postgres_a_job_whose_lease_ran_out_is_taken_over_once(postgres_url):
    a, b = PostgresJobStore(postgres_url, lease_s=30), PostgresJobStore(postgres_url, lease_s=30)
    try:
        job = a.submit(new_job())[0]
        first = a.claim()
        assert 29 < _lease_left(postgres_url, job.id) <= 30
        assert b.claim() is None and b.recover() == {"requeued": 0, "cancelled": 0, "failed": 0}  # a's lease holds
        _expire(postgres_url, job.id)
        # b's runner settles expired leases before its claims (at most every quarter lease), then claims.
        assert b.recover() == {"requeued": 1, "cancelled": 0, "failed": 0}
        second = b.claim()
        assert (second.id, second.attempt) == (job.id, 2) and second.token != first.token
        for write in (lambda: a.set_progress(job.id, first.token, 0.5), lambda: a.heartbeat(job.id, first.token),
                      lambda: a.finish(job.id, first.token, SUCCEEDED, result=b"late")):
            with pytest.raises(StaleAttempt):
                write()
        b.set_progress(job.id, second.token, 0.5)
        b.finish(job.id, second.token, SUCCEEDED, result=b"once")
        assert a.get(job.id).state == SUCCEEDED and a.result(job.id) == b"once"
        later = a.submit(new_job())[0]
        a.claim()
        _expire(postgres_url, later.id)
        c = PostgresJobStore(postgres_url)
        try:
            assert c.claim().id == later.id  # a claim settles expired leases itself
        finally:
            c.close()
    finally:
        a.close(), b.close()


def test_postgres_expired_leases_are_settled_like_a_restart(postgres_url):
    store = PostgresJobStore(postgres_url, max_attempts=2)
    try:
        poison = store.submit(new_job(priority=3))[0]
        to_cancel = store.submit(new_job(priority=2))[0]
        alive = store.submit(new_job(priority=1))[0]
        store.claim(), store.claim(), store.claim()
        store.cancel(to_cancel.id)
        _expire(postgres_url, poison.id), _expire(postgres_url, to_cancel.id)
        assert store.recover() == {"requeued": 1, "cancelled": 1, "failed": 0}
        assert store.get(alive.id).state == RUNNING  # its lease holds: another runner has it
        assert store.claim().id == poison.id
        _expire(postgres_url, poison.id)
        assert store.recover() == {"requeued": 0, "cancelled": 0, "failed": 1}
        failed = store.get(poison.id)
        assert failed.state == FAILED and failed.error_code == 13 and "2 times" in failed.error_message
        assert store.get(to_cancel.id).state == CANCELLED
    finally:
        store.close()


def test_postgres_schema_is_versioned_and_a_newer_one_is_refused(postgres_url):
    import psycopg

    stores, errors, barrier = [], [], threading.Barrier(3)

    def open_one():
        barrier.wait()
        try:
            stores.append(PostgresJobStore(postgres_url))
        except Exception as exc:  # noqa: BLE001 (reported by the assert below)
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(3)]  # three front doors start at once
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(stores) == 3 and stores[0].schema_version() == len(MIGRATIONS)
    for s in stores:
        s.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        assert conn.execute("SELECT COUNT(*) FROM attribution_schema").fetchone()[0] == len(MIGRATIONS)
        conn.execute("INSERT INTO attribution_schema (version, applied) VALUES (99, 0)")
    with pytest.raises(FailedPrecondition, match="schema version 99.*upgrade the service"):
        PostgresJobStore(postgres_url)


def test_postgres_unreachable_says_where_without_the_password():
    with pytest.raises(Unavailable, match=r"cannot reach the job store at postgresql://u:\*\*\*@127.0.0.1:1/x") as info:
        PostgresJobStore("postgresql://u:secret@127.0.0.1:1/x", connect_timeout_s=2)
    assert "secret" not in str(info.value)


def test_open_store_picks_the_store_by_url(tmp_path, postgres_url):
    shared = open_store(tmp_path, url=postgres_url, lease_s=5)
    try:
        assert isinstance(shared, PostgresJobStore) and shared.lease_s == 5
        assert not (tmp_path / "jobs.sqlite3").exists()
    finally:
        shared.close()


def test_one_store_per_data_directory(tmp_path):
    store = open_store(tmp_path)
    with pytest.raises(FailedPrecondition, match="in use by pid"):
        open_store(tmp_path)
    store.close()
    open_store(tmp_path).close()  # the lock went with the first store


def test_database_is_in_wal_mode(tmp_path):
    open_store(tmp_path).close()
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_store_made_before_item_names_is_migrated_in_place(tmp_path):
    """A jobs.db written without the item_names column opens, keeps its jobs, and stores names for new ones."""
    import sqlite3

    path = tmp_path / "jobs.db"
    old = SqliteJobStore(path)
    job, _ = old.submit(NewJob(id="old", priority=0, idempotency_key="", model="demo", method=1, num_items=1,
                               request=b""))
    old.close()
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE jobs DROP COLUMN item_names")
    db.commit()
    db.close()
    store = SqliteJobStore(path)
    try:
        assert store.get("old").item_names == "[]"
        new, _ = store.submit(NewJob(id="new", priority=0, idempotency_key="", model="demo", method=1, num_items=2,
                                     request=b"", item_names='["a.png", "b.png"]'))
        assert store.get("new").item_names == '["a.png", "b.png"]'
    finally:
        store.close()
