"""Chunk size from a measured cost curve (workers/chunk_curve.py): the choice on synthetic curves, and the
probe on a real model through the fold budget."""
from __future__ import annotations

import torch
from torch import nn

from workers.batching import FoldBudget, rows_per_chunk
from workers.chunk_curve import curve_for, measure_curve, measured_rows


def timing_from(per_row_ms):
    """A timing function whose seconds for `rows` rows are rows x per_row_ms(rows) / 1000; records calls."""
    calls = []

    def timing(model, rows):
        calls.append(rows)
        return rows * per_row_ms(rows) / 1e3

    return timing, calls


def test_the_chunk_stops_before_the_curve_rises_and_the_probe_stops_past_it():
    # Per-row cost falls until 64 rows (overheads amortised), then rises (caches overflow): 128 rows cost
    # 11 % more per row than 64, 256 rows 34 % more.
    curve = lambda s: 1 + 8 / s if s <= 64 else 1.125 + 0.002 * (s - 64)  # noqa: E731
    timing, calls = timing_from(curve)
    result = measure_curve(nn.Identity(), cap=4096, timing=timing)
    assert result.rows == 64
    assert sorted(set(calls)) == [4, 8, 16, 32, 64, 128, 256]   # two sizes clearly past the best, then no more
    assert all(calls.count(s) == 2 for s in set(calls))          # each size timed twice, the faster counts


def test_a_flat_curve_keeps_the_cap():
    timing, calls = timing_from(lambda s: 2.0 if s < 16 else 1.0 + 0.05 * (s % 3))   # flat within 10 %
    assert measure_curve(nn.Identity(), cap=1000, timing=timing).rows == 1000
    assert max(calls) == 1000


def test_the_cap_is_probed_and_never_exceeded():
    timing, calls = timing_from(lambda s: 10.0 / s)   # bigger is always better
    assert measure_curve(nn.Identity(), cap=100, timing=timing).rows == 100
    assert max(calls) == 100
    timing, calls = timing_from(lambda s: 1.0)
    assert measure_curve(nn.Identity(), cap=3, timing=timing).rows == 3 and set(calls) == {3}


def test_the_probe_stops_when_its_time_budget_is_spent():
    now = [0.0]
    timing, calls = timing_from(lambda s: 10.0 / s)
    clock = lambda: now[0]  # noqa: E731

    def slow(model, rows):
        now[0] += 1.0         # every timed pass takes a second of the probe's budget
        return timing(model, rows)

    result = measure_curve(nn.Identity(), cap=4096, timing=slow, budget_s=3.0, clock=clock)
    assert sorted(set(calls)) == [4, 8] and result.rows == 8


def test_a_real_model_is_probed_once_and_the_fold_budget_uses_the_result():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 5))
    model.eval().requires_grad_(False)
    budget = FoldBudget(max_bytes=1 << 30, max_rows=64, measure=True)   # a cap of 64 rows
    rows = rows_per_chunk(model, (3, 8, 8), budget, device="cpu")
    curve = curve_for(model, (3, 8, 8), torch.float32, "cpu")
    assert curve is not None and curve.cap == 64 and 1 <= rows == curve.rows <= 64
    assert set(curve.per_row_s) <= {4, 8, 16, 32, 64} and all(t > 0 for t in curve.per_row_s.values())
    again = measured_rows(model, (3, 8, 8), torch.float32, "cpu", cap=64)
    assert again == rows and curve_for(model, (3, 8, 8), torch.float32, "cpu") is curve   # cached
    assert measured_rows(model, (3, 8, 8), torch.float32, "cpu", cap=2) <= 2             # a lower cap holds
    # Without `measure` the budget is the cap itself; inference-only folds are never measured; a
    # max_rows alone is the operator's chunk size, exactly.
    assert rows_per_chunk(model, (3, 8, 8), FoldBudget(max_bytes=1 << 30, max_rows=64), device="cpu") == 64
    assert rows_per_chunk(model, (3, 8, 8), budget, device="cpu", backward=False) == 64
    assert rows_per_chunk(model, (3, 8, 8), FoldBudget(max_rows=48, measure=True), device="cpu") == 48
