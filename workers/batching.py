"""Memory budget for folded rows: how many input rows one forward(+backward) may carry.

Kernels fold heterogeneous requests (noisy copies, interpolation points, plain
inputs) into one row tensor `# (R, C, H, W)` and run it in chunks. The chunk
size comes from a byte budget, not a fixed count, so the same code saturates a
2-core CPU and an 80 GB GPU: the budget is divided by what one row is measured
to cost in the model at hand.
"""
from __future__ import annotations

import functools
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from workers.errors import InvalidArgument

# Fractions of memory a fold may claim. On CUDA the rest is left to the caching
# allocator's fragmentation, the model's workspace and concurrent batches.
CUDA_FREE_FRACTION = 0.6
# On CPU the host is shared with the service, Ray and other replicas, and bigger
# chunks stop paying long before RAM runs out. Measured on a 2-core EPYC (forward
# + backward-to-input of 128/32/64 rows, chunk bytes as estimated here): ResNet-18
# at 112 px 1.69 s in 0.9 GiB chunks, 2.09 s in 1.8 GiB; at 224 px 1.70 s in 0.9
# GiB, 1.90 s in 1.8 GiB; ResNet-50 at 112 px 2.48 s in 1 GiB, 3.01 s in 4 GiB;
# 0.25-0.5 GiB chunks were 5-10% slower again. The plateau is 0.5-1 GiB: cap there.
CPU_RAM_FRACTION = 0.25
CPU_BUDGET_CAP_BYTES = 1 * 2**30
# Backward-to-input holds the forward's saved activations and, transiently, a
# gradient of similar size for each. Leaf outputs overcount in-place ops and
# views, so 2x the forward measure is an upper bound in practice (ResNet-18:
# 7 MiB counted per 112px row, 6.5 MiB peak measured for forward+backward).
BACKWARD_FACTOR = 2.0


@dataclass(frozen=True)
class FoldBudget:
    """How much one chunk of folded rows may use.

    max_bytes: activation bytes a chunk may hold; None = derived from the device
        (a fraction of free CUDA memory, or of host RAM capped at a few GiB).
    max_rows: rows per chunk. Alone it is the chunk size exactly (no measuring);
        with max_bytes it caps the byte-derived count.
    measure: below that cap, the chunk size from the model's measured cost curve
        (workers/chunk_curve.py: the smallest size as fast per row as any), for folds
        with a backward pass; off, the cap itself.
    """

    max_bytes: int | None = None
    max_rows: int | None = None
    measure: bool = False

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_rows"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidArgument.field(
                    f"budget.{name}", f"must be a positive integer or unset, got {value!r}")


@dataclass(frozen=True)
class ModelProbe:
    """What one row costs in a model: forward activation bytes and output shape."""

    activation_bytes: int
    output_shape: tuple[int, ...]


# model -> {(row_shape, dtype, device): ModelProbe}. Weak on the model so an
# unloaded model takes its entries with it; a model sees few distinct shapes.
_PROBES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_PROBE_LOCK = threading.Lock()
_MAX_SHAPES_PER_MODEL = 16


def probe_model(model: nn.Module, row_shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device | str) -> ModelProbe:
    """Run one row `# (1, *row_shape)` through `model` once and cache what it cost.

    Forward hooks on leaf modules sum the bytes of every output tensor; they are
    registered for the one probe forward only and count only this thread's calls,
    so a concurrent batch on the same model neither sees them nor is counted.
    """
    key = (tuple(int(s) for s in row_shape), dtype, torch.device(device))
    with _PROBE_LOCK:
        per_model = _PROBES.setdefault(model, {})
        if key in per_model:
            return per_model[key]
        probe = _measure(model, key[0], dtype, key[2])
        if len(per_model) >= _MAX_SHAPES_PER_MODEL:
            per_model.pop(next(iter(per_model)))
        per_model[key] = probe
        return probe


def _measure(model: nn.Module, row_shape: tuple[int, ...], dtype: torch.dtype,
             device: torch.device) -> ModelProbe:
    if isinstance(model, torch.jit.ScriptModule):
        return _measure_saved(model, row_shape, dtype, device)
    owner = threading.get_ident()
    total = [0]

    def count(_module, _inputs, output) -> None:
        if threading.get_ident() != owner:
            return
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        total[0] += sum(t.numel() * t.element_size() for t in outputs if isinstance(t, torch.Tensor))

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.inference_mode():
            out = model(torch.zeros((1, *row_shape), dtype=dtype, device=device))
    finally:
        for handle in handles:
            handle.remove()
    row = torch.Size(row_shape).numel() * torch.empty((), dtype=dtype).element_size()
    return ModelProbe(activation_bytes=max(total[0], row), output_shape=tuple(out.shape[1:]))


def _measure_saved(model: nn.Module, row_shape: tuple[int, ...], dtype: torch.dtype,
                   device: torch.device) -> ModelProbe:
    """A TorchScript module takes no forward hooks: its row costs the bytes autograd saves for the backward
    in one forward from an input that requires grad (what a gradient row keeps alive), counted by
    saved-tensor hooks, which see the interpreter's ops as well."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    x = torch.zeros((1, *row_shape), dtype=dtype, device=device, requires_grad=True)
    with torch.inference_mode(False), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    row = torch.Size(row_shape).numel() * torch.empty((), dtype=dtype).element_size()
    return ModelProbe(activation_bytes=max(total[0], row), output_shape=tuple(out.shape[1:]))


def estimate_row_bytes(model: nn.Module, row_shape: tuple[int, ...], dtype: torch.dtype,
                       device: torch.device | str, backward: bool = True) -> int:
    """Bytes one input row costs in a forward (and backward-to-input when `backward`)."""
    probe = probe_model(model, row_shape, dtype, device)
    factor = BACKWARD_FACTOR if backward else 1.0
    return max(1, int(probe.activation_bytes * factor))


@functools.lru_cache(maxsize=1)
def _host_ram_bytes() -> int:
    # sysconf is one call and exact on Linux; /proc/meminfo is the fallback.
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def auto_budget_bytes(device: torch.device | str) -> int:
    """The byte budget a fold gets on `device` when the caller sets none."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _total = torch.cuda.mem_get_info(index)
        # Memory the caching allocator holds but does not use is free to us too.
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return max(1, int((free + cached) * CUDA_FREE_FRACTION))
    return max(1, min(int(_host_ram_bytes() * CPU_RAM_FRACTION), CPU_BUDGET_CAP_BYTES))


def rows_per_chunk(model: nn.Module, row_shape: tuple[int, ...], budget: FoldBudget, *,
                   device: torch.device | str, dtype: torch.dtype = torch.float32,
                   backward: bool = True) -> int:
    """Rows one forward(+backward) chunk may carry under `budget`: >= 1, <= max_rows."""
    if budget.max_rows is not None and budget.max_bytes is None:
        return budget.max_rows
    limit = budget.max_bytes if budget.max_bytes is not None else auto_budget_bytes(device)
    rows = max(1, limit // estimate_row_bytes(model, row_shape, dtype, device, backward))
    if budget.max_rows is not None:
        rows = min(rows, budget.max_rows)
    if budget.measure and backward:
        from workers.chunk_curve import measured_rows

        rows = measured_rows(model, row_shape, dtype, torch.device(device), cap=int(rows))
    return int(rows)


@dataclass
class FoldWatch:
    """Which folded requests are still wanted, asked between the chunks of a running fold.

    alive(i): whether request i of the fold still has a caller (its deadline has not passed,
    it was not cancelled). A request found dead has its remaining rows taken out of the chunks
    still to run; the kernel answers None for it. `rows_skipped` counts the rows never computed.
    """

    alive: Callable[[int], bool]
    rows_skipped: int = 0
    dropped: set[int] = field(default_factory=set)

    def check(self, pending: list[int]) -> list[int]:
        """The requests of `pending` still alive; the others are recorded as dropped."""
        live = []
        for index in pending:
            if index in self.dropped:
                continue
            if self.alive(index):
                live.append(index)
            else:
                self.dropped.add(index)
        return live


def iter_chunks(total: int, size: int) -> Iterator[slice]:
    """The fewest consecutive slices of at most `size` covering range(total), near-equal in length.

    Balanced rather than greedy: 130 rows at 64 go as 43+43+44, not 64+64+2, so
    no chunk runs at the poor efficiency of a tiny batch.
    """
    if size <= 0:
        raise InvalidArgument.field("budget.max_rows", f"chunk size must be positive, got {size}")
    count = -(-total // size)
    for index in range(count):
        yield slice(index * total // count, (index + 1) * total // count)
