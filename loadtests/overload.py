"""`attribution loadtest --overload`: goodput under 2x, 4x and 8x the saturation load, in one run.

1. S: the saturation throughput, closed loop at the scenario's concurrency (16 by default).
2. Open loop at 2x, 4x and 8x S for the scenario's duration, every call with the scenario's deadline
   (2 s in loadtests/scenarios/overload.yaml), while a prober checks grpc.health.v1 every 100 ms.
   Per level: goodput (OK calls per second) / S, shares by status code, p50/p99 of OK calls, p99 of
   refusals, health-check failures, and the recovery time: after the load stops, one client sends
   calls back to back until one answers within 1.5x the p50 of a lone client measured first.
3. A flood of 50 ms-deadline calls at S per second beside 8 closed-loop clients: their throughput
   with the flood over their throughput alone.

With no --server it starts the service itself, as --compare does (loadtests/compare.py), from the
scenario's `serve` section or --config; with --server it drives that one.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import pathlib
import tempfile
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtests import report
from loadtests.loadgen import LevelResult, LoadGenerator, LoadgenError, fetch_models
from loadtests.requests import encode_requests
from loadtests.scenario import LoadSpec, Scenario

MULTIPLES = (2.0, 4.0, 8.0)
FLOOD_DEADLINE_MS = 50.0
FLOOD_CLIENTS = 8
HEALTH_PERIOD_S = 0.1
RECOVERY_LIMIT_S = 30.0


async def _prober(address: str, stop: asyncio.Event) -> dict[str, int]:
    """grpc.health.v1 Check every HEALTH_PERIOD_S on its own channel; counts failures."""
    counts = {"checks": 0, "failures": 0}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not stop.is_set():
            counts["checks"] += 1
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                counts["failures"] += reply.status != health_pb2.HealthCheckResponse.SERVING
            except grpc.aio.AioRpcError:
                counts["failures"] += 1
            try:
                await asyncio.wait_for(stop.wait(), HEALTH_PERIOD_S)
            except asyncio.TimeoutError:
                pass
    return counts


async def _lone_latency(gen: LoadGenerator) -> float:
    """p50 ms of one client's back-to-back calls for 3 s (the normal latency recovery is judged by)."""
    result = await gen.run_closed(1, duration_s=3.0, warmup_s=0.5, max_requests=100_000)
    p50 = report.percentiles(result.recorder.latencies_ms)["p50_ms"]
    if p50 is None:
        raise LoadgenError("no lone call succeeded; the server is not answering normally")
    return p50


async def _recovery(address: str, prepared, normal_ms: float) -> float | None:
    """Seconds from now until a lone call answers OK within 1.5x `normal_ms`; None past the limit."""
    started = time.monotonic()
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary("/attribution.v1.AttributionService/Explain")
        while time.monotonic() - started < RECOVERY_LIMIT_S:
            _, payload, timeout = prepared.next()
            sent = time.monotonic()
            try:
                await call(payload, timeout=timeout)
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.01)
                continue
            if (time.monotonic() - sent) * 1e3 <= 1.5 * normal_ms:
                return round(time.monotonic() - started, 3)
    return None


def _level_row(result: LevelResult, saturation: float, health: dict) -> dict:
    rec = result.recorder
    total = sum(rec.codes.values()) or 1
    ok = rec.codes.get("OK", 0)
    ok_pct = report.percentiles(rec.latencies_ms)
    refused_pct = report.percentiles(rec.refused_ms)
    refused_sent = report.percentiles(rec.refused_sent_ms)
    lag = report.percentiles(rec.send_lag_ms)
    return {"offered_rps": result.level, "offered_x": round(result.level / saturation, 3),
            "window_s": round(result.window_s, 3), "sent": result.sent, "ok": ok,
            "goodput_rps": round(ok / result.window_s, 3), "goodput_ratio": round(ok / result.window_s / saturation, 3),
            "shares": {code: round(n / total, 4) for code, n in sorted(rec.codes.items())},
            "ok_p50_ms": ok_pct["p50_ms"], "ok_p99_ms": ok_pct["p99_ms"],
            "refused_p50_ms": refused_pct["p50_ms"], "refused_p99_ms": refused_pct["p99_ms"],
            # The same refusals timed from when they left the client, and the client's own lag
            # behind its schedule: on a machine the load generator shares, part of the latency is its own.
            "refused_from_send_p50_ms": refused_sent["p50_ms"], "refused_from_send_p99_ms": refused_sent["p99_ms"],
            "send_lag_p50_ms": lag["p50_ms"], "send_lag_p99_ms": lag["p99_ms"],
            "health_checks": health["checks"], "health_failures": health["failures"]}


async def run_overload(address: str, scenario: Scenario, load: LoadSpec, echo=print,
                       multiples: tuple[float, ...] = MULTIPLES) -> dict:
    models = await fetch_models(address)
    prepared = encode_requests(scenario, models)
    concurrency = int(load.levels[0]) if load.mode == "closed" else 16
    async with LoadGenerator(address, prepared) as gen:
        normal_ms = await _lone_latency(gen)
        closed = await gen.run_closed(concurrency, load.duration_s, load.warmup_s, load.max_requests)
        saturation = closed.recorder.codes.get("OK", 0) / closed.window_s
        if saturation <= 0:
            raise LoadgenError(f"no call succeeded in the saturation run ({dict(closed.recorder.codes)}); "
                               "check the target's configuration and log")
        echo(f"saturation S = {saturation:.1f} req/s ({concurrency} closed-loop clients); lone p50 "
             f"{normal_ms:.1f} ms")
        levels = []
        for multiple in multiples:
            stop = asyncio.Event()
            prober = asyncio.create_task(_prober(address, stop))
            result = await gen.run_open(saturation * multiple, load.duration_s, load.warmup_s, load.max_requests)
            stop.set()
            health = await prober
            row = _level_row(result, saturation, health)
            row["recovery_s"] = await _recovery(address, prepared, normal_ms)
            levels.append(row)
            echo(f"{multiple:g}x S ({row['offered_rps']:.0f}/s): goodput {row['goodput_ratio']:.2f} S, shares "
                 f"{row['shares']}, OK p50/p99 {row['ok_p50_ms']}/{row['ok_p99_ms']} ms, refusals p99 "
                 f"{row['refused_p99_ms']} ms ({row['refused_from_send_p99_ms']} ms from send; client lag p99 "
                 f"{row['send_lag_p99_ms']} ms), health failures {row['health_failures']}/{row['health_checks']}, "
                 f"recovery {row['recovery_s']} s")
        alone = await gen.run_closed(FLOOD_CLIENTS, load.duration_s, load.warmup_s, load.max_requests)
        flood_prepared = encode_requests(_with_deadline(scenario, FLOOD_DEADLINE_MS), models)
        async with LoadGenerator(address, flood_prepared) as flood_gen:
            flood = asyncio.create_task(flood_gen.run_open(saturation, load.duration_s + load.warmup_s + 2,
                                                           0.0, load.max_requests))
            await asyncio.sleep(1.0)
            beside = await gen.run_closed(FLOOD_CLIENTS, load.duration_s, load.warmup_s, load.max_requests)
            flood_result = await flood
    rps = lambda r: r.recorder.codes.get("OK", 0) / r.window_s
    flood_row = {"clients": FLOOD_CLIENTS, "flood_rps": round(saturation, 3), "flood_deadline_ms": FLOOD_DEADLINE_MS,
                 "alone_rps": round(rps(alone), 3), "with_flood_rps": round(rps(beside), 3),
                 "ratio": round(rps(beside) / rps(alone), 3) if rps(alone) else None,
                 "flood_shares": {c: n for c, n in sorted(flood_result.recorder.codes.items())}}
    echo(f"flood of {FLOOD_DEADLINE_MS:g} ms-deadline calls at {saturation:.0f}/s: {FLOOD_CLIENTS} clients keep "
         f"{flood_row['ratio']}x of their throughput alone ({flood_row['with_flood_rps']} vs "
         f"{flood_row['alone_rps']} req/s)")
    return {"kind": "overload", "target": address, "scenario": scenario.name, "saturation_rps": round(saturation, 3),
            "closed_concurrency": concurrency, "lone_p50_ms": normal_ms, "levels": levels,
            "goodput_ratio": {f"{lv['offered_x']:.0f}x": lv["goodput_ratio"] for lv in levels},
            "flood": flood_row, "machine": report.machine()}


def _with_deadline(scenario: Scenario, deadline_ms: float) -> Scenario:
    mix = tuple(dataclasses.replace(entry, deadline_ms=deadline_ms) for entry in scenario.mix)
    return dataclasses.replace(scenario, mix=mix)


def parse_multiples(text: str) -> tuple[float, ...]:
    """`2,4,8` -> (2.0, 4.0, 8.0); each in (1, 64]."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(not 1 < v <= 64 for v in values):
        raise LoadgenError(f"--multiples {text!r}: give multiples of S above 1 and at most 64, e.g. 2,4,8")
    return values


def run(scenario: Scenario, load: LoadSpec, args: argparse.Namespace) -> int:
    from loadtests.compare import TargetProcess, app_config

    multiples = parse_multiples(getattr(args, "multiples", "2,4,8"))

    started = report.now() if hasattr(report, "now") else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if args.server:
        payload = asyncio.run(run_overload(args.server, scenario, load, multiples=multiples))
    else:
        app_raw = app_config(scenario, args.config)
        with tempfile.TemporaryDirectory(prefix="loadtest-overload-") as tmp:
            target = TargetProcess("batched", app_raw, pathlib.Path(tmp))
            try:
                ready = target.wait_ready()
                print(f"[service] serving on 127.0.0.1:{ready['port']}")
                payload = asyncio.run(run_overload(f"127.0.0.1:{ready['port']}", scenario, load,
                                                   multiples=multiples))
            finally:
                target.stop()
    payload["started_at"] = started
    if args.json:
        print(f"wrote {report.write_json(args.json, payload)}")
    return 0
