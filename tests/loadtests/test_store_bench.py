"""loadtests.store_bench: both stores drained by concurrent runners, every job once."""
from __future__ import annotations

import json

from loadtests import store_bench


def test_store_bench_drains_both_stores(postgres_url, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert store_bench.main(["--jobs", "12", "--runners", "1,3", "--result-kib", "1", "--url", postgres_url,
                             "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["store"], r["runners"]) for r in rows} == {(s, n) for s in ("sqlite", "postgresql") for n in (1, 3)}
    assert all(r["jobs"] == 12 and r["per_s"] > 0 for r in rows)
    assert "postgresql / sqlite" in capsys.readouterr().out
