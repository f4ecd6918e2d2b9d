"""Tensors derived from adapter parameters (fp32 copies, transposes, stacks), kept across calls.

The kernels want adapters in layouts PEFT does not keep (``B^T`` in fp32 for the CPU passes, stacked adapters for
the mixed-batch kernels); deriving them per call cost a copy of every adapter on every layer call. ``SHARED`` keeps
them while the source parameters live and are not modified in place (checked by identity and version counter, so an
optimizer step invalidates them), least recently used dropped beyond ``DERIVED_CACHE_BYTES``.

Training stacks update parameters in ways the version counter does not see (FSDP2 all-gathers into the same
unsharded tensor, also before an evaluation between training steps; writes through ``.data``), so a kept copy of
a parameter that trains could go stale. Copies are therefore kept only of tensors that do not require grad (frozen
adapters: PEFT's ``from_pretrained`` loads them so, for inference), and the LoRA passes read them only in calls that
record no autograd (``kept_copies()``, entered by ``fastpeft.functional`` for inference calls).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Sequence

import torch


def nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(nbytes(v) for v in value)


class DerivedTensors:
    """Tensors derived from adapter parameters (fp32 copies, transposes, stacks) kept while those parameters live
    and are not modified in place (checked by identity and version counter), least recently used dropped beyond
    ``max_bytes`` (then those are derived again per call: slower, never wrong)."""

    def __init__(self, max_bytes: int):
        self._entries: OrderedDict = OrderedDict()
        self._max_bytes = max_bytes
        self._bytes = 0

    def get_one(self, tensor: torch.Tensor, make, extra=()):
        """``get([tensor], make, extra)`` without building tuples: this runs per adapter per layer call."""
        if tensor.requires_grad:  # a trainable parameter: kept copies only of frozen ones (see the module docstring)
            return make()
        found = self._entries.get(((id(tensor),), extra))
        if found is not None and found[0][0]() is tensor:
            try:
                if found[1] == (tensor._version,):
                    self._entries.move_to_end(((id(tensor),), extra))
                    return found[2]
            except RuntimeError:  # an inference tensor: no version counter, nothing kept
                return make()
        return self.get([tensor], make, extra)

    def get(self, tensors: Sequence[torch.Tensor], make, extra=()):
        if any(t.requires_grad for t in tensors):
            return make()
        try:
            versions = tuple(t._version for t in tensors)
        except RuntimeError:  # inference tensors keep no version counter: nothing can be kept for them
            return make()
        key = (tuple(id(t) for t in tensors), extra)
        found = self._entries.get(key)
        if found is not None:
            refs, seen, value, size = found
            if seen == versions and all(ref() is t for ref, t in zip(refs, tensors)):
                self._entries.move_to_end(key)
                return value
            del self._entries[key]
            self._bytes -= size
        value = make()
        size = nbytes(value)
        self._entries[key] = ([weakref.ref(t) for t in tensors], versions, value, size)
        self._bytes += size
        while self._bytes > self._max_bytes and len(self._entries) > 1:
            self._bytes -= self._entries.popitem(last=False)[1][3]
        return value


# What the shared cache may keep: at most this many bytes of derived tensors.
DERIVED_CACHE_BYTES = 512 * 2**20
SHARED = DerivedTensors(DERIVED_CACHE_BYTES)


_scope = threading.local()


class kept_copies:
    """Within this context (per thread) the LoRA passes may read copies kept across calls; elsewhere they derive
    their operands per call. Entered around inference calls, which train nothing."""

    def __enter__(self):
        self._outer = getattr(_scope, "on", False)
        _scope.on = True
        return self

    def __exit__(self, *exc):
        _scope.on = self._outer


def kept_copies_allowed() -> bool:
    return getattr(_scope, "on", False)
