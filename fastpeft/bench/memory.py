"""Memory measurements: bytes saved for backward, and peak memory of a forward+backward.

Saved-for-backward bytes come from ``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd saves
passes through the pack hook. Several saved tensors may be views of one storage (``x`` and ``x.t()``), so bytes
are counted once per unique storage. Storages that belong to the module's parameters (the base weight, the
adapter matrices) are reported apart: they exist anyway and cost nothing extra to save.

Peak memory:

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated before
  the call (so the number is what the call itself added at its peak).
- CPU: there is no allocator counter in torch for the CPU, and ``tracemalloc`` sees only Python's allocations,
  not torch's. We run the call under ``torch.profiler`` with ``profile_memory=True`` and add up each operator's
  self allocations (allocations minus frees) in start-time order; the peak of that running sum is reported. It is
  exact at operator granularity: a buffer allocated and freed inside one operator is not seen. Labelled
  ``peak_bytes (cpu profiler)`` in the CSV's unit column.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch
from torch import nn


def saved_bytes(module: nn.Module, call: Callable[[], torch.Tensor]) -> dict:
    """Bytes autograd saves during ``call()`` (a forward through ``module``), by unique storage.

    Returns ``{"saved_bytes": all, "saved_activation_bytes": excluding the module's parameters and buffers}``.
    """
    param_storages = set()
    for t in list(module.parameters()) + list(module.buffers()):
        with contextlib.suppress(Exception):
            param_storages.add(t.untyped_storage().data_ptr())
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        with contextlib.suppress(Exception):  # some saved tensors (sparse, nested, fake) have no plain storage
            storage = t.untyped_storage()
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call()
    del out
    total = sum(seen.values())
    activations = sum(n for ptr, n in seen.items() if ptr not in param_storages)
    return {"saved_bytes": total, "saved_activation_bytes": activations}


def peak_bytes(call: Callable[[], None], device: torch.device) -> tuple[int, str]:
    """Peak memory ``call()`` adds above what was allocated before it, and how it was measured."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, "bytes (cuda max_memory_allocated)"
    # kineto writes start/stop lines to the C-level stderr on every profile, a Python redirect does not reach them;
    # its log level is read from the environment when the profiler first starts (an explicit user setting wins).
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak, "bytes (cpu profiler, op granularity)"
