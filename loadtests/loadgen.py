"""Closed- and open-loop load over grpc.aio: pre-encoded requests out, per-request outcomes in.

Closed loop: `concurrency` clients each send, wait for the answer, send again,
for a warm-up and then a measured window; a request counts when it completes
inside the window, so throughput is completions per second at steady state.

Open loop: requests are scheduled on a clock at a constant rate, whatever the
server does, and latency runs from the *scheduled* time. A server that falls
behind therefore shows its queueing in the latency instead of slowing the
sender down (no coordinated omission). A backlog cap keeps the client bounded;
a request that would exceed it is counted as dropped, never delayed.

Every level is bounded in requests (`max_requests`) and in time (the window,
then at most `drain_s` for stragglers, which are cancelled). Requests are
bytes serialized once (requests.encode_requests) and sent through a raw
unary-unary callable, so the client does no protobuf work per request beyond
reading the response's timings. Only loopback targets are accepted.
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import grpc

from loadtests.requests import PreparedScenario
from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["AttributionService"]
EXPLAIN_PATH = f"/{SERVICE.full_name}/Explain"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20),
                   # Each channel its own TCP connection: several channels spread the load
                   # over several HTTP/2 connections instead of sharing one subchannel.
                   ("grpc.use_local_subchannel_pool", 1)]
CLIENT_ERROR = "CLIENT_ERROR"      # the client failed to send or read (not a gRPC status)
DROPPED = "DROPPED_BY_CLIENT"      # open loop: the backlog cap was reached


class LoadgenError(RuntimeError):
    """The load cannot run as asked (a non-loopback target, a server that never answers)."""


def check_loopback(target: str) -> str:
    """`target` (HOST:PORT) when HOST is a loopback name; load tests never leave this machine."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise LoadgenError(f"--server must be HOST:PORT, got {target!r}")
    if host not in LOOPBACK_HOSTS:
        raise LoadgenError(f"refusing to load-test {host!r}: only loopback targets "
                           f"({', '.join(sorted(LOOPBACK_HOSTS))}) are allowed")
    return target


@dataclass
class LevelRecorder:
    """The measured requests of one level: latencies, status codes and the batches they rode in."""

    entries: int
    latencies_ms: list[float] = field(default_factory=list)           # OK requests only
    refused_ms: list[float] = field(default_factory=list)             # RESOURCE_EXHAUSTED answers
    # Open loop: how late each call left against its schedule (the client's own lag), and the
    # refusals' latency from the moment they left (what the server took).
    send_lag_ms: list[float] = field(default_factory=list)
    refused_sent_ms: list[float] = field(default_factory=list)
    by_entry_ms: list[list[float]] = field(default_factory=list)
    codes: Counter = field(default_factory=Counter)
    timed: int = 0                 # OK answers that reported their batch
    batches: float = 0.0           # sum of 1 / batch_requests: the number of batches they rode in
    batch_samples: float = 0.0     # sum of batch_samples / batch_requests: those batches' samples
    queue_ms: float = 0.0          # sums of the server's own timings
    compute_ms: float = 0.0
    last_done: float = 0.0

    def __post_init__(self) -> None:
        self.by_entry_ms = [[] for _ in range(self.entries)]

    def record(self, entry: int, latency_s: float, code: str, raw: bytes | None, done: float,
               lag_s: float | None = None) -> None:
        self.codes[code] += 1
        self.last_done = max(self.last_done, done)
        if lag_s is not None:
            self.send_lag_ms.append(lag_s * 1e3)
        if code == "RESOURCE_EXHAUSTED":
            self.refused_ms.append(latency_s * 1e3)
            if lag_s is not None:
                self.refused_sent_ms.append((latency_s - lag_s) * 1e3)
        if code != "OK":
            return
        ms = latency_s * 1e3
        self.latencies_ms.append(ms)
        self.by_entry_ms[entry].append(ms)
        timings = pb.ExplainResponse.FromString(raw).timings if raw else None
        if timings is not None and timings.batch_requests:
            # Each request of a batch of R reports it: 1/R per request sums to one per batch.
            self.timed += 1
            self.batches += 1.0 / timings.batch_requests
            self.batch_samples += timings.batch_samples / timings.batch_requests
            self.queue_ms += timings.queue_ms
            self.compute_ms += timings.compute_ms


@dataclass
class LevelResult:
    """One level's outcome: the raw record plus the server's metrics around the window."""

    mode: str                       # closed | open
    level: float                    # concurrency or requests per second
    window_s: float                 # measured seconds
    recorder: LevelRecorder
    sent: int = 0                   # measured requests sent (open loop: scheduled)
    scrape_before: dict | None = None
    scrape_after: dict | None = None


Scrape = Callable[[], dict]


class LoadGenerator:
    """Drives one server with a prepared scenario; `async with` opens and closes its channels."""

    def __init__(self, target: str, prepared: PreparedScenario, channels: int = 1,
                 scrape: Scrape | None = None, drain_s: float = 30.0):
        self.target = check_loopback(target)
        self.prepared = prepared
        self.scrape = scrape
        self.drain_s = drain_s
        self._channels = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(max(1, channels))]
        # Raw bytes in and out: no serializer, so a request costs no protobuf encoding.
        self._calls = [ch.unary_unary(EXPLAIN_PATH) for ch in self._channels]

    async def __aenter__(self) -> "LoadGenerator":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def run_closed(self, concurrency: int, duration_s: float, warmup_s: float,
                         max_requests: int, honour_pushback: bool = False) -> LevelResult:
        """`concurrency` clients back to back; counts completions inside the measured window.

        honour_pushback: a client that is refused waits the delay the server suggests before its next
        call, as the shipped client does (else it sends again at once, a refusal storm under overload)."""
        loop = asyncio.get_running_loop()
        rec = LevelRecorder(len(self.prepared.entries))
        measure = loop.time() + warmup_s
        end = measure + duration_s
        budget = [max_requests]

        async def client(k: int) -> None:
            call = self._calls[k % len(self._calls)]
            while budget[0] > 0 and loop.time() < end:
                budget[0] -= 1
                index, payload, timeout = self.prepared.next()
                sent = loop.time()
                code, raw, pushback = await _send_with_pushback(call, payload, timeout)
                done = loop.time()
                if measure <= done <= end:
                    rec.record(index, done - sent, code, raw, done)
                if honour_pushback and pushback:
                    await asyncio.sleep(min(pushback, max(0.0, end - loop.time())))

        scrapes = self._scrapes_at(measure, end)
        await _drain([asyncio.create_task(client(k)) for k in range(concurrency)], end + self.drain_s)
        window_end = end if budget[0] > 0 else min(end, rec.last_done or end)
        before, after = await scrapes
        return LevelResult("closed", float(concurrency), max(1e-9, window_end - measure), rec,
                           sent=sum(rec.codes.values()), scrape_before=before, scrape_after=after)

    async def run_open(self, rate: float, duration_s: float, warmup_s: float, max_requests: int,
                       max_in_flight: int = 4096) -> LevelResult:
        """Requests at `rate` per second on a fixed schedule; latency from each scheduled time."""
        loop = asyncio.get_running_loop()
        rec = LevelRecorder(len(self.prepared.entries))
        warm = round(warmup_s * rate)
        total = min(warm + max(1, round(duration_s * rate)), max_requests)
        start = loop.time() + 0.01
        measure, end = start + warm / rate, start + total / rate
        in_flight: set[asyncio.Task] = set()
        scrapes = self._scrapes_at(measure, end)
        sent = 0
        for i in range(total):
            scheduled = start + i / rate
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            measured = i >= warm
            if len(in_flight) >= max_in_flight:
                if measured:  # the client's own limit, reported as such; the schedule never slips
                    rec.codes[DROPPED] += 1
                continue
            sent += measured
            task = asyncio.create_task(self._scheduled(self._calls[i % len(self._calls)], scheduled,
                                                       rec if measured else None))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        await _drain(list(in_flight), end + self.drain_s)
        before, after = await scrapes
        # Achieved throughput: a server that cannot keep up finishes after the schedule ends.
        window = max(end - measure, (rec.last_done or end) - measure)
        return LevelResult("open", float(rate), max(1e-9, window), rec, sent=sent,
                           scrape_before=before, scrape_after=after)

    async def _scheduled(self, call, scheduled: float, rec: LevelRecorder | None) -> None:
        index, payload, timeout = self.prepared.next()
        sent_at = asyncio.get_running_loop().time()
        code, raw = await _send(call, payload, timeout)
        if rec is not None:
            done = asyncio.get_running_loop().time()
            rec.record(index, done - scheduled, code, raw, done, lag_s=max(0.0, sent_at - scheduled))

    def _scrapes_at(self, first: float, second: float) -> Awaitable[tuple[dict | None, dict | None]]:
        """The server's metrics at two loop times, taken off the loop (they are blocking HTTP GETs)."""
        async def at(when: float) -> dict | None:
            await asyncio.sleep(max(0.0, when - asyncio.get_running_loop().time()))
            if self.scrape is None:
                return None
            try:
                return await asyncio.to_thread(self.scrape)
            except Exception as exc:  # a metrics hiccup must not void the level; the report says null
                log.warning("metrics scrape failed: %s", exc)
                return None

        async def both() -> tuple[dict | None, dict | None]:
            return await asyncio.gather(at(first), at(second))  # type: ignore[return-value]

        return asyncio.ensure_future(both())


async def _send(call, payload: bytes, timeout: float | None) -> tuple[str, bytes | None]:
    code, raw, _ = await _send_with_pushback(call, payload, timeout)
    return code, raw


async def _send_with_pushback(call, payload: bytes,
                              timeout: float | None) -> tuple[str, bytes | None, float | None]:
    """(status name, response bytes, the server's retry pushback in seconds when it sent one)."""
    try:
        return "OK", await call(payload, timeout=timeout), None
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, None, _pushback_s(exc)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # counted, not raised: one broken call must not stop the level
        log.debug("client-side failure: %r", exc)
        return CLIENT_ERROR, None, None


def _pushback_s(exc: grpc.aio.AioRpcError) -> float | None:
    """The `grpc-retry-pushback-ms` trailer (the service sends it with every RetryInfo), in seconds."""
    try:
        for key, value in exc.trailing_metadata() or ():
            if key == "grpc-retry-pushback-ms":
                return max(0.0, int(value) / 1e3)
    except (TypeError, ValueError):
        return None
    return None


async def _drain(tasks: list[asyncio.Task], deadline: float) -> None:
    """Waits for `tasks` until loop time `deadline`, then cancels what is left."""
    if not tasks:
        return
    timeout = max(0.0, deadline - asyncio.get_running_loop().time())
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    if pending:
        log.warning("%d requests still in flight after the drain period; cancelled", len(pending))
        await asyncio.wait(pending)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


async def fetch_models(target: str, timeout_s: float = 60.0) -> dict[str, pb.ModelInfo]:
    """The server's models by name (waits up to `timeout_s` for it to answer)."""
    check_loopback(target)
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.AttributionServiceStub(channel)
        try:
            reply = await stub.ListModels(pb.ListModelsRequest(), timeout=timeout_s, wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            raise LoadgenError(f"{target} did not list its models: {exc.code().name}: {exc.details()}") from None
    return {m.name: m for m in reply.models}


async def run_levels(gen: LoadGenerator, mode: str, levels: tuple[float, ...], duration_s: float, warmup_s: float,
                     max_requests: int, on_level: Callable[[LevelResult], None] | None = None) -> list[LevelResult]:
    """Every level in order, each with its own warm-up."""
    results = []
    for level in levels:
        if mode == "open":
            result = await gen.run_open(level, duration_s, warmup_s, max_requests)
        else:
            result = await gen.run_closed(int(level), duration_s, warmup_s, max_requests)
        results.append(result)
        if on_level is not None:
            on_level(result)
    return results
