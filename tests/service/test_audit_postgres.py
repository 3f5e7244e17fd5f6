"""The audit log in a PostgreSQL table: two front doors' writers, one table; verify reads it, catches a
tampered row, and `audit export` writes it out as JSON Lines verify reads the same way."""
from __future__ import annotations

import json

import psycopg
import pytest

from service.audit import AuditConfig, AuditLog
from service.audit.verify import verify
from service.cli import main
from tests.service.test_audit import backend, explain  # noqa: F401 - backend is a fixture
from tests.service.test_audit_verify import _requests


@pytest.fixture
def table(backend, demo_heldout_inputs, postgres_url, tmp_path):  # noqa: F811
    """Half the requests logged by front door A, half by B, into one table; each stores inputs locally."""
    logs = [AuditLog(AuditConfig(store=postgres_url, store_inputs=True), tmp_path / name) for name in ("a", "b")]
    for i, request in enumerate(_requests(demo_heldout_inputs)):
        assert logs[i % 2].record(*explain(backend, request))
    assert all(log.close() for log in logs)
    return postgres_url, [tmp_path / "a" / "inputs", tmp_path / "b" / "inputs"]


def _rows(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT id, request_id, writer, record FROM attribution_audit ORDER BY id").fetchall()


def test_two_writers_one_table_and_verify_passes(table, backend):  # noqa: F811
    url, stores = table
    rows = _rows(url)
    assert len(rows) == 3 + 4 + 1 + 4 and len({writer for _, _, writer, _ in rows}) == 2
    assert {json.loads(record)["request_id"] for *_, record in rows} == {"sg", "ig", "ig-custom", "cam"}
    assert all(request_id == json.loads(record)["request_id"] for _, request_id, _, record in rows)
    report = verify([url], backend, store_dirs=stores)
    assert report.ok and report.counts() == {"ok": len(rows)}, report.summary()


def test_a_tampered_row_fails_verify(table, backend):  # noqa: F811
    url, stores = table
    row_id, _, _, record = next(r for r in _rows(url) if json.loads(r[3])["request_id"] == "sg")
    changed = json.loads(record)
    changed["map_sha256"] = "0" * 64
    changed["map_summary"]["values"][0] += 0.05 * max(changed["map_summary"]["abs_max"], 1e-6)
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE attribution_audit SET record = %s WHERE id = %s", (json.dumps(changed), row_id))
    report = verify([url], backend, store_dirs=stores)
    assert not report.ok
    (bad,) = [c for c in report.checks if c.status != "ok"]
    assert bad.status == "mismatch" and bad.source == f"attribution_audit:{row_id}"


def test_export_writes_the_table_as_jsonl(table, backend, tmp_path, capsys):  # noqa: F811
    url, stores = table
    out = tmp_path / "export.jsonl"
    assert main(["audit", "export", url, "-o", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines == [record for *_, record in _rows(url)]
    assert verify([out], backend, store_dirs=stores).ok
    assert main(["audit", "export", "postgresql://nobody@127.0.0.1:1/none"]) == 2
    assert "cannot read the audit table" in capsys.readouterr().err


def test_an_unreachable_table_is_a_clear_error_at_start(tmp_path):
    from workers.errors import Unavailable

    with pytest.raises(Unavailable, match="cannot reach the audit table at postgresql://u:\\*\\*\\*@127.0.0.1:1/x"):
        AuditLog(AuditConfig(store="postgresql://u:pw@127.0.0.1:1/x"), tmp_path)
    with pytest.raises(Exception, match="audit.store"):
        AuditConfig(store="sqlite:///x")


def test_records_wait_while_the_database_is_away_and_none_is_lost(backend, demo_heldout_inputs,  # noqa: F811
                                                                  postgres_server, postgres_url, tmp_path,
                                                                  caplog):
    import time

    name = postgres_url.rsplit("/", 1)[1]
    log = AuditLog(AuditConfig(store=postgres_url), tmp_path)
    request = _requests(demo_heldout_inputs)[0]
    with psycopg.connect(postgres_server.url, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        try:
            assert log.record(*explain(backend, request))  # queued: the writer cannot reach the table
            deadline = time.monotonic() + 10
            while log._queue.qsize() and time.monotonic() < deadline:  # the writer has taken it and is retrying
                time.sleep(0.02)
            time.sleep(0.3)
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    assert log.close(timeout=30)
    assert any("retrying" in r.getMessage() for r in caplog.records)  # it did fail, and waited
    assert log.dropped_total.labels("write_error")._value.get() == 0
    assert len(_rows(postgres_url)) == 3  # the request's three items, written once the database was back
