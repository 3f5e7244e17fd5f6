"""The job store's vocabulary: job states, what a submission stores, a stored job, and the store interface.

`JobRecord`'s fields are the `jobs` table's columns, in the same order: the
column list and the row-to-record mapping are derived from the dataclass, so
the two cannot drift apart.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol, Sequence

from service._proto import attribution_pb2 as pb
from workers.errors import FailedPrecondition

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = pb.QUEUED, pb.RUNNING, pb.SUCCEEDED, pb.FAILED, pb.CANCELLED
FINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})
EXPLAIN, EVALUATION = "explain", "evaluation"  # JobRecord.kind
ALL_STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)


class StaleAttempt(FailedPrecondition):
    """The attempt token no longer owns the job: it was requeued, claimed again or finished."""


@dataclass(frozen=True)
class NewJob:
    """What a submission stores: the validated request, serialized, and what lists show."""

    id: str
    priority: int
    idempotency_key: str
    model: str
    method: int            # pb.Method
    num_items: int
    request: bytes         # serialized ExplainRequest (an evaluation job's: EvaluationRequest)
    item_names: str = "[]"  # JSON list of the submitted item names ([] when none)
    kind: str = "explain"   # "explain", or "evaluation" (SubmitJobRequest.evaluation)


@dataclass(frozen=True)
class JobRecord:
    """One job as stored. `token` is set while RUNNING: the owning attempt's proof."""

    id: str
    state: int
    priority: int
    idempotency_key: str
    model: str
    method: int
    num_items: int
    progress: float
    created: float
    started: float
    finished: float
    attempt: int
    token: str
    cancel_requested: bool
    error_code: int
    error_message: str
    seq: int
    item_names: str = "[]"  # JSON list
    kind: str = "explain"   # EXPLAIN or EVALUATION

    @property
    def is_evaluation(self) -> bool:
        return self.kind == EVALUATION

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


class JobStore(Protocol):
    """Durable jobs. Every method is blocking and thread-safe; async callers use a thread."""

    def submit(self, job: NewJob) -> tuple[JobRecord, bool]:
        """Stores `job`, or returns the job already stored under its idempotency key (created=False)."""

    def get(self, job_id: str) -> JobRecord:
        """The job; `JobNotFound` otherwise."""

    def result(self, job_id: str) -> bytes | None:
        """The serialized ExplainResponse (an evaluation's EvaluationResult) of a SUCCEEDED job; None otherwise."""

    def request(self, job_id: str) -> bytes:
        """The serialized ExplainRequest the job runs."""

    def claim(self) -> JobRecord | None:
        """Atomically marks the next QUEUED job (priority desc, submission asc) RUNNING with a new token."""

    def set_progress(self, job_id: str, token: str, progress: float) -> bool:
        """Records progress (and renews a lease); answers whether cancellation was requested.
        `StaleAttempt` if not the owner."""

    def heartbeat(self, job_id: str, token: str) -> bool:
        """The runner still works on the job: renews its lease where the store has leases; answers whether
        cancellation was requested. `StaleAttempt` if the attempt lost the job (its lease ran out)."""

    def finish(self, job_id: str, token: str, state: int, *, error: tuple[int, str] = (0, ""),
               result: bytes | None = None, recommendation: bytes | None = None) -> JobRecord:
        """Final state (with its result and an evaluation's serialized Recommendation, in one transaction);
        `StaleAttempt` if not the owner."""

    def recommendation(self, model: str, job_id: str = "") -> tuple[str, bytes] | None:
        """(job id, serialized Recommendation) of the model's latest SUCCEEDED evaluation that made one, or
        of evaluation `job_id` when given; None when there is none."""

    def adopt(self, model: str, job_id: str, recommendation: bytes) -> None:
        """Makes `recommendation` (from evaluation `job_id`) the model's adopted defaults, durably."""

    def adoptions(self) -> dict[str, bytes]:
        """Every model's adopted Recommendation, serialized."""

    def release(self, job_id: str, token: str) -> JobRecord:
        """Gives a RUNNING job back to the queue (graceful stop); `StaleAttempt` if not the owner."""

    def cancel(self, job_id: str) -> JobRecord:
        """QUEUED -> CANCELLED; RUNNING -> cancel requested; final -> `FailedPrecondition`."""

    def list(self, states: Sequence[int] = (), page_size: int = 50,
             page_token: str = "") -> tuple[list[JobRecord], str]:
        """Newest first, filtered by state; the next page's opaque token ("" on the last page)."""

    def counts(self) -> dict[int, int]:
        """Jobs per state."""

    def recover(self) -> dict[str, int]:
        """At start: settles the RUNNING jobs a killed process left (requeued, cancelled or failed); a shared
        store settles only those whose lease ran out."""

    def close(self) -> None:
        """Releases the store; idempotent."""


# Stored columns that hold NULL for "none" (the record says "").
_NULLABLE_TEXT = ("idempotency_key", "token")
COLUMNS = ", ".join(f.name for f in dataclasses.fields(JobRecord))


def record_from_row(row: Sequence) -> JobRecord:
    """A `SELECT {COLUMNS}` row as a JobRecord."""
    values = dict(zip(COLUMNS.split(", "), row))
    for name in _NULLABLE_TEXT:
        values[name] = values[name] or ""
    values["cancel_requested"] = bool(values["cancel_requested"])
    return JobRecord(**values)
