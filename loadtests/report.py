"""Load-test results -> numbers, the server's own view, JSON and PNG plots.

Client view: latency percentiles of the OK answers (p50/p90/p99/p99.9),
throughput, error counts by gRPC status, and the batches the answers rode in
(from each response's Timings: a request of a batch of R reports R, so the
sum of 1/R counts batches exactly).

Server view: the Prometheus text of the front door scraped before and after
each measured window; histogram deltas give the mean queue and compute time
and the batch size as requests saw it (`attribution_batch_samples` is observed
once per request, so its mean weighs a batch by its size).
"""
from __future__ import annotations

import json
import math
import pathlib
import platform
import os
import urllib.parse
import urllib.request
from typing import Any, Iterable

import numpy as np

from loadtests.loadgen import LOOPBACK_HOSTS, LevelResult, LoadgenError

PERCENTILES = {"p50_ms": 50.0, "p90_ms": 90.0, "p99_ms": 99.0, "p999_ms": 99.9}
_HISTOGRAMS = {"latency": "attribution_request_latency_seconds", "queue": "attribution_queue_seconds",
               "compute": "attribution_compute_seconds", "batch_samples": "attribution_batch_samples",
               "batch_requests": "attribution_batch_requests"}
_REQUESTS = "attribution_requests_total"


# ------------------------------------------------------------ client view --

def percentiles(values_ms: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/p99.9 (linear interpolation); None when there is no value."""
    if not values_ms:
        return {k: None for k in PERCENTILES}
    points = np.percentile(np.asarray(values_ms, dtype=float), list(PERCENTILES.values()))
    return {k: round(float(v), 3) for k, v in zip(PERCENTILES, points)}


def summarize_level(result: LevelResult, labels: list[str]) -> dict[str, Any]:
    """One level as JSON-ready numbers; `labels` names the scenario's mix entries."""
    rec = result.recorder
    ok = rec.codes.get("OK", 0)
    errors = {code: n for code, n in sorted(rec.codes.items()) if code != "OK"}
    out: dict[str, Any] = {
        "mode": result.mode,
        "concurrency": int(result.level) if result.mode == "closed" else None,
        "rate": result.level if result.mode == "open" else None,
        "window_s": round(result.window_s, 3),
        "sent": result.sent,
        "ok": ok,
        "rps": round(ok / result.window_s, 3),
        **percentiles(rec.latencies_ms),
        "mean_ms": round(float(np.mean(rec.latencies_ms)), 3) if rec.latencies_ms else None,
        "max_ms": round(float(np.max(rec.latencies_ms)), 3) if rec.latencies_ms else None,
        "errors": errors,
        "error_count": sum(errors.values()),
        # Batch-weighted: the mean size of the batches the service formed, in samples.
        "mean_batch_size": round(rec.batch_samples / rec.batches, 3) if rec.batches else None,
        "mean_batch_requests": round(rec.timed / rec.batches, 3) if rec.batches else None,
        "mean_queue_ms": round(rec.queue_ms / rec.timed, 3) if rec.timed else None,
        "mean_compute_ms": round(rec.compute_ms / rec.timed, 3) if rec.timed else None,
        "by_method": {},
        "server": server_view(result.scrape_before, result.scrape_after),
    }
    for label, values in zip(labels, rec.by_entry_ms):
        stats = out["by_method"].setdefault(label, {"ok": 0, "values": []})
        stats["ok"] += len(values)
        stats["values"].extend(values)
    for stats in out["by_method"].values():
        values = stats.pop("values")
        stats.update({k: v for k, v in percentiles(values).items() if k in ("p50_ms", "p99_ms")})
    return out


def latencies_of(result: LevelResult) -> list[float]:
    return result.recorder.latencies_ms


# ------------------------------------------------------------ server view --

def check_metrics_url(url: str) -> str:
    """`url` when it is http(s) on a loopback host."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or (host not in LOOPBACK_HOSTS and f"[{host}]" not in LOOPBACK_HOSTS):
        raise LoadgenError(f"--metrics-url must be http://127.0.0.1:PORT/metrics or another loopback URL, "
                           f"got {url!r}")
    return url


def scrape(url: str, timeout_s: float = 5.0) -> dict[tuple[str, tuple], float]:
    """The Prometheus text at `url`, parsed (see `parse_metrics`)."""
    with urllib.request.urlopen(check_metrics_url(url), timeout=timeout_s) as reply:  # loopback only
        return parse_metrics(reply.read().decode("utf-8"))


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def _delta(before: dict, after: dict, name: str, where: Iterable[tuple[str, str]] = ()) -> float:
    """Sum over label sets of after - before for sample `name` (label filters in `where`)."""
    want = set(where)
    total = 0.0
    for (sample, labels), value in after.items():
        if sample == name and want <= set(labels):
            total += value - before.get((sample, labels), 0.0)
    return total


def _bucket_deltas(before: dict, after: dict, name: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count delta) of a histogram, summed over label sets, ascending."""
    sums: dict[float, float] = {}
    for (sample, labels), value in after.items():
        if sample == name + "_bucket":
            le = float(dict(labels)["le"])
            sums[le] = sums.get(le, 0.0) + value - before.get((sample, labels), 0.0)
    return sorted(sums.items())


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: linear within the bucket that holds rank q."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            span = count - below
            return lower + (upper - lower) * ((rank - below) / span if span > 0 else 1.0)
        lower, below = upper, count
    return lower


def server_view(before: dict | None, after: dict | None) -> dict[str, Any] | None:
    """The server's metrics over the window (None without two scrapes)."""
    if before is None or after is None:
        return None
    out: dict[str, Any] = {"requests": int(_delta(before, after, _REQUESTS))}
    out["codes"] = {}
    for (sample, labels), value in after.items():
        if sample == _REQUESTS:
            code = dict(labels).get("code", "?")
            n = value - before.get((sample, labels), 0.0)
            if n:
                out["codes"][code] = out["codes"].get(code, 0) + int(n)
    for key, name in _HISTOGRAMS.items():
        count = _delta(before, after, name + "_count")
        total = _delta(before, after, name + "_sum")
        mean = total / count if count else None
        scale = 1e3 if key in ("latency", "queue", "compute") else 1.0
        suffix = "_ms" if scale == 1e3 else "_per_request"
        out[f"mean_{key}{suffix}"] = None if mean is None else round(mean * scale, 3)
    lat = _bucket_deltas(before, after, _HISTOGRAMS["latency"])
    for label, q in (("p50_latency_ms", 0.5), ("p99_latency_ms", 0.99)):
        value = histogram_quantile(q, lat)
        out[label] = None if value is None else round(value * 1e3, 3)
    return out


# ------------------------------------------------------------------ output --

def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg())}


def write_json(path: str | pathlib.Path, payload: dict[str, Any]) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def format_level(row: dict[str, Any], name: str = "") -> str:
    """One line for the console."""
    level = f"c={row['concurrency']}" if row["mode"] == "closed" else f"rate={row['rate']:g}/s"
    def ms(key: str) -> str:
        return "-" if row.get(key) is None else f"{row[key]:.1f}"
    batch = "-" if row.get("mean_batch_size") is None else f"{row['mean_batch_size']:.2f}"
    errors = ",".join(f"{k}:{v}" for k, v in row["errors"].items()) or "0"
    prefix = f"{name:>10} " if name else ""
    return (f"{prefix}{level:>10}  rps={row['rps']:8.2f}  p50={ms('p50_ms'):>8}  p90={ms('p90_ms'):>8}  "
            f"p99={ms('p99_ms'):>8}  p99.9={ms('p999_ms'):>8} ms  batch={batch:>6}  errors={errors}")


def plot_levels(runs: dict[str, list[dict]], latencies: dict[str, list[list[float]]],
                out_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """Latency CDF per level (one figure per run) and throughput / p99 against the level (one line per run).

    runs: run name -> summarized levels; latencies: run name -> OK latencies (ms) per level.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rows in runs.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for row, values in zip(rows, latencies[name]):
            if values:
                xs = np.sort(np.asarray(values))
                ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=_level_label(row))
        ax.set_xscale("log")
        ax.set(xlabel="latency (ms, log scale)", ylabel="fraction of requests", title=f"Latency CDF: {name}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / f"latency_cdf_{_slug(name)}.png"))
    mode = next((rows[0]["mode"] for rows in runs.values() if rows), "closed")
    xlabel = "concurrent clients" if mode == "closed" else "offered rate (requests/s)"
    for key, ylabel, filename in (("rps", "throughput (requests/s)", "throughput.png"),
                                  ("p99_ms", "p99 latency (ms)", "p99.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, rows in runs.items():
            xs = [r["concurrency"] if mode == "closed" else r["rate"] for r in rows]
            ax.plot(xs, [r.get(key) if r.get(key) is not None else np.nan for r in rows], marker="o", label=name)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{ylabel} vs {xlabel}")
        ax.set_ylim(bottom=0)  # ratios read honestly only from a zero baseline
        if mode == "closed":
            levels = sorted({r["concurrency"] for rows in runs.values() for r in rows})
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels, [str(c) for c in levels])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / filename))
    return written


def _level_label(row: dict) -> str:
    return f"{row['concurrency']} clients" if row["mode"] == "closed" else f"{row['rate']:g} req/s"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
