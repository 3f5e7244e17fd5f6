"""The offline queue's configuration: the config file's `jobs:` section, read once at start.

    jobs:
      store: ""                 # "" = SQLite in the data directory; postgresql://user@host/db = shared
      lease_s: 30               # a shared store's claim lasts this long without a renewal
      concurrency: 1            # jobs this front door runs at once
      max_items: 1024           # items per job request
      max_attempts: 5
      progress_persist_s: 1.0
      poll_s: 2.0
      cancel_wait_s: 2.0
      retries: 3
      offline: {replicas: 1, num_cpus: 1, max_ongoing_requests: 1, items_per_chunk: 8}
      evaluation: {max_items: 256, datasets: {holdout: /data/holdout-images}}
"""
from __future__ import annotations

import dataclasses
import pathlib
from dataclasses import dataclass, field
from typing import Any

from service.config import Limits
from workers.config import OfflineConfig
from workers.errors import InvalidArgument
from workers.schema import build, check

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class EvaluationConfig:
    """Evaluation jobs (SubmitJobRequest.evaluation; docs/faithfulness.md, *The evaluation job*).

    max_items: items one evaluation may score (each item's maps are computed many times over: per
        randomized model, augmentation and class), at most `jobs.max_items`.
    datasets: name -> a directory of PNG/JPEG images; `EvaluationRequest.dataset` names one, and the
        evaluation scores its images in file-name order. Listed once at start: a missing or empty
        directory fails the start.
    """

    max_items: int = 256
    datasets: dict | None = None

    def __post_init__(self):
        check(1 <= self.max_items <= 4096, "jobs.evaluation.max_items", "must be 1..4096")
        datasets = self.datasets or {}
        check(isinstance(datasets, dict), "jobs.evaluation.datasets", "must be a mapping of name to directory")
        for name, directory in datasets.items():
            check(isinstance(name, str) and name.isprintable() and 0 < len(name) <= 64,
                  "jobs.evaluation.datasets", f"names must be 1..64 printable characters, got {name!r}")
            check(isinstance(directory, str) and directory, f"jobs.evaluation.datasets.{name}",
                  "must be the path of a directory of images")

    def list_datasets(self) -> dict[str, tuple[pathlib.Path, ...]]:
        """Each data set's image files, sorted by name; `InvalidArgument` naming the key when one is unusable."""
        found = {}
        for name, directory in (self.datasets or {}).items():
            path = pathlib.Path(directory).expanduser()
            if not path.is_dir():
                raise InvalidArgument.field(f"jobs.evaluation.datasets.{name}", f"{directory!r} is not a directory")
            files = tuple(sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
            if not files:
                raise InvalidArgument.field(f"jobs.evaluation.datasets.{name}",
                                            f"{directory!r} holds no {'/'.join(IMAGE_SUFFIXES)} files")
            found[name] = files
        return found


@dataclass(frozen=True)
class JobsConfig:
    """The job runner and the offline workers it feeds.

    concurrency: jobs this front door runs at once; match it to the offline slots
        (offline.replicas x offline.max_ongoing_requests), so a job is RUNNING only
        while a replica works on it.
    max_items: items one job's request may carry (online requests keep limits.max_items).
    max_attempts: a job left RUNNING by this many dead processes fails instead of rerunning.
    progress_persist_s: how often a running job's progress is written to the store
        (watchers in this process see every step at once).
    poll_s: how often an idle runner looks for work it was not told about, and a
        watcher rereads the store (jobs submitted or run by another process).
    cancel_wait_s: how long CancelJob waits for a running job to stop before answering.
    retries: reruns of a job whose offline worker became unavailable, before it fails.
    offline: the offline Serve deployment.
    evaluation: evaluation jobs: their item limit and the data sets they may name.
    store: where jobs live. "" (the default): `<data dir>/jobs.sqlite3`, this front door's own.
        A `postgresql://` URL (libpq form, e.g. postgresql://attribution@db.internal:5432/attribution):
        one queue shared by every front door that names it; any of them runs, answers and
        cancels any job.
    lease_s: with a shared store, how long a claimed job stays with its runner without a
        renewal (the runner renews it every third of that); a job whose runner died is taken over
        by another front door once its lease has run out.
    """

    store: str = ""
    lease_s: float = 30.0

    concurrency: int = 1
    max_items: int = 1024
    max_attempts: int = 5
    progress_persist_s: float = 1.0
    poll_s: float = 2.0
    cancel_wait_s: float = 2.0
    retries: int = 3
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self):
        checks = (("concurrency", 1 <= self.concurrency <= 256, "must be 1..256"),
                  ("max_items", 1 <= self.max_items <= 4096, "must be 1..4096"),
                  ("max_attempts", 1 <= self.max_attempts <= 100, "must be 1..100"),
                  ("progress_persist_s", 0 <= self.progress_persist_s <= 3600, "must be 0..3600 seconds"),
                  ("poll_s", 0.01 <= self.poll_s <= 3600, "must be 0.01..3600 seconds"),
                  ("cancel_wait_s", 0 <= self.cancel_wait_s <= 60, "must be 0..60 seconds"),
                  ("retries", 0 <= self.retries <= 100, "must be 0..100"),
                  ("store", not self.store or self.store.startswith(("postgresql://", "postgres://")),
                   "must be empty (SQLite in the data directory) or a postgresql:// URL"),
                  ("lease_s", 1 <= self.lease_s <= 3600, "must be 1..3600 seconds"),
                  ("evaluation.max_items", self.evaluation.max_items <= self.max_items,
                   f"must be at most jobs.max_items ({self.max_items})"))
        for name, ok, why in checks:
            check(ok, f"jobs.{name}", why)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "JobsConfig":
        return build(cls, raw, "jobs")

    def request_limits(self, limits: Limits) -> Limits:
        """The online limits, but a job may carry `max_items` items."""
        return dataclasses.replace(limits, max_items=self.max_items)
