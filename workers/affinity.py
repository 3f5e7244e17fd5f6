"""Pinning a process to CPU cores (Linux).

On a CPU-only host the kernels of a replica and the front door's per-request
work (gRPC, decoding, Ray calls) otherwise share every core: the OpenMP threads
of a kernel lose their cores mid-batch and wait on each other. Giving the
replica its own cores and the front door (with the Ray daemons it starts) the
rest keeps compute off contended cores; docs/benchmarks.md has the measurement.
"""
from __future__ import annotations

import os
from collections.abc import Sequence


def check_cores(cores: Sequence[int], fieldname: str) -> tuple[int, ...]:
    """The cores as a tuple; ValueError naming `fieldname` unless they are distinct ints >= 0."""
    values = tuple(cores)
    if any(not isinstance(c, int) or isinstance(c, bool) or c < 0 for c in values):
        raise ValueError(f"{fieldname}: cores are integers >= 0, got {list(values)}")
    if len(set(values)) != len(values):
        raise ValueError(f"{fieldname}: each core may appear once, got {list(values)}")
    return values


def pin_process(cores: Sequence[int], fieldname: str = "cpu_affinity") -> tuple[int, ...]:
    """Pins every thread of this process to `cores`; threads and processes started later inherit it.

    Returns the cores. RuntimeError, naming `fieldname`, where pinning is not
    possible (not Linux) or a core is not one this process may run on.
    """
    values = check_cores(cores, fieldname)
    if not values:
        return values
    if not hasattr(os, "sched_setaffinity"):
        raise RuntimeError(f"{fieldname}: CPU pinning needs Linux; remove the setting on this platform")
    # Checked against the machine, not this process's current mask: a pinned parent
    # (the front door, and the Ray daemons it started) passes its own cores down.
    count = os.cpu_count() or 1
    missing = sorted(c for c in values if c >= count)
    if missing:
        raise RuntimeError(f"{fieldname}: cores {missing} do not exist; this machine has cores 0..{count - 1}")
    try:
        os.sched_setaffinity(0, values)
    except OSError as exc:  # e.g. every core named is outside this container's cpuset
        raise RuntimeError(f"{fieldname}: cannot pin to cores {list(values)}: {exc.strerror}") from None
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), values)
        except ProcessLookupError:  # a thread that exited meanwhile
            continue
    return values
