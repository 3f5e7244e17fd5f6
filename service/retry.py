"""Client-side retries: which codes, how long to wait (backoff with jitter, or the server's RetryInfo),
and never past the call's overall timeout. Used by both clients in service/client.py."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of one call: attempt k waits a random time in [b/2, b], b = min(max, initial * 2**(k-1)).

    A refusal that carries google.rpc.RetryInfo waits at least the delay the server suggests (plus up to
    20 % jitter). Retries stay within the call's overall timeout: a pause that would end past it ends
    the call with the last error instead. Retrying is safe here because explanations are deterministic
    (seeded): a retried Explain computes the same maps. `RetryPolicy.off()` (or `retry=False`) disables it.
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    codes: tuple[grpc.StatusCode, ...] = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
    honour_retry_info: bool = True

    @classmethod
    def off(cls) -> "RetryPolicy":
        return cls(max_attempts=1)

    def pause(self, attempt: int, suggested: float = 0.0) -> float:
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * 2 ** (attempt - 1))
        backoff = random.uniform(ceiling / 2, ceiling)  # jitter: retrying clients must not march in step
        if self.honour_retry_info and suggested > 0:
            return max(backoff, suggested * random.uniform(1.0, 1.2))
        return backoff


def retry_delay(exc: grpc.RpcError) -> float:
    """The delay a refusal's google.rpc.RetryInfo suggests, in seconds; 0 without one."""
    try:
        status = rpc_status.from_call(exc)
    except (AttributeError, ValueError):  # not a call error, or trailers that disagree with the status
        return 0.0
    info = error_details_pb2.RetryInfo()
    for detail in status.details if status is not None else ():
        if detail.Unpack(info):
            return info.retry_delay.ToNanoseconds() / 1e9
    return 0.0


class Attempts:
    """The retry schedule of one call within its overall timeout."""

    def __init__(self, policy: RetryPolicy, timeout: float | None):
        self.policy, self.attempt = policy, 0
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def next_pause(self, exc: grpc.RpcError) -> float | None:
        """Seconds to wait before the next attempt, or None: give up and raise."""
        self.attempt += 1
        if exc.code() not in self.policy.codes or self.attempt >= self.policy.max_attempts:
            return None
        pause = self.policy.pause(self.attempt, retry_delay(exc))
        left = self.remaining()
        return None if left is not None and pause >= left else pause
