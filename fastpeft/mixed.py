"""Mixed-adapter batches: every row of a batch through its own LoRA adapter (PEFT's ``adapter_names``).

PEFT's ``lora.Linear._mixed_batch_forward`` computes, for a batch ``x`` of shape ``(B, ..., K)`` and one name per
batch row (``"__base__"``: no adapter; a name this layer does not hold: no adapter either)::

    y = base(x)
    for each distinct adapter a, rows R_a of the batch with that name:
        y[R_a] += (s_a * (drop_a(x[R_a].to(A_a.dtype)) A_a^T B_a^T + b_a)).to(y.dtype)

``add_mixed_lora_`` adds that update to a base output ``y`` in place, by the route chosen for the call
(``fastpeft.routing``, op ``lora_mixed_forward``):

- ``compose`` (every backend, the floor): per adapter a gather of its rows, two small GEMMs in the adapter's dtype
  and an ``index_add_`` into ``y``; plain torch, so autograd differentiates it (training) and torch.compile traces
  it;
- ``fused`` (cpu backend): one C++ pass (``fastpeft._C.lora_mixed_``) over runs of consecutive rows of one adapter,
  the shrink ``x A_a^T`` and the expand ``y += s_a xa B_a^T + s_a b_a`` in place, rows of one adapter back to back
  so its A and B stay in cache (SGMV-style; at decode each run is one row: BGMV), the adapters read where PEFT keeps
  them;
- ``sgmv`` (triton backend): one Triton launch for the shrink of every row by its own adapter, one for the expand
  (``fastpeft.kernels.mixed_lora``).

The grouping of rows by adapter is computed once per distinct ``adapter_names`` list (PEFT hands the same list to
every layer of a forward, and a ``generate`` call the same list at every step) and cached (``row_groups``). The C++
pass reads the adapters as PEFT keeps them; the Triton stacks of the adapters are kept across calls while the
adapters are frozen and unchanged, up to ``fastpeft._derived.DERIVED_CACHE_BYTES``.

This runs once per adapted layer per decoded token, after the base product has streamed the layer's weight through
the caches, so every Python step here runs cold: a call whose route is settled takes it without building the other
candidates, and the adapters are summarized in one pass.

Dropout (training, ``p_a > 0``): adapter ``a`` applies fastpeft's Philox mask (``fastpeft._philox``) drawn from its
own seed over its own gathered sub-batch (rows in batch order, tokens in order), as PEFT applies each adapter's own
dropout module to its sub-batch. Calls that record autograd run the ``compose`` route (autograd is torch's).
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch

from . import routing
from ._derived import SHARED
from .backends import get_backend
from .backends.compose import lossless
from .functional import dispatch_state, draw_seeds, may_settle, on_device
from .reference import apply_dropout

BASE_NAME = "__base__"
_GROUP_CACHE_SIZE = 64
_PLANS_PER_GROUPS = 8


@dataclass
class RowGroups:
    """The rows of a batch grouped by adapter name.

    ``names``: one name per batch row; ``adapters``: the distinct names other than ``"__base__"`` in order of first
    appearance; ``batch_rows[i]``: the batch rows of ``adapters[i]`` in ascending order. Token-level plans (rows of
    the flattened ``(M, K)`` input) are derived per tokens-per-row and device and kept (``plan``)."""

    names: tuple
    adapters: tuple
    batch_rows: tuple
    _plans: dict = field(default_factory=dict, repr=False)

    def plan(self, tokens_per_row: int, device: torch.device) -> "RowPlan":
        key = (tokens_per_row, device)
        found = self._plans.get(key)
        if found is None:
            # Made outside inference mode: a plan first built under torch.inference_mode is reused by calls that
            # record autograd, which cannot save inference tensors.
            with torch.inference_mode(False):
                found = _make_plan(self, tokens_per_row, device)
            while len(self._plans) >= _PLANS_PER_GROUPS:  # prompts of many lengths: keep the most recent
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = found
        return found


@dataclass
class RowPlan:
    """Rows of the flattened ``(M, K)`` input for one ``RowGroups`` and tokens-per-row ``T`` (``M = B * T``).

    ``rows[i]``: int64 ``(M_i,)`` on the input's device, the token rows of ``adapters[i]`` in ascending order;
    ``runs``: int64 ``(S, 3)`` on the CPU, ``[start, end, i]`` for every maximal run of consecutive token rows of
    one adapter, sorted by adapter (the C++ pass); ``blocks``: the Triton kernels' block tables
    (``fastpeft.kernels.mixed_lora.blocks_of``) per set of adapters the calling layer holds, made on first use."""

    rows: list
    runs: torch.Tensor
    blocks: dict = field(default_factory=dict)


def _make_plan(groups: RowGroups, T: int, device) -> RowPlan:
    rows, runs = [], []
    for i, batch_rows in enumerate(groups.batch_rows):
        token_rows = [b * T + t for b in batch_rows for t in range(T)]
        rows.append(torch.tensor(token_rows, dtype=torch.int64, device=device))
        start = prev = None
        for b in batch_rows:  # consecutive batch rows of one adapter make one run of token rows
            if prev is not None and b == prev + 1:
                prev = b
                continue
            if start is not None:
                runs.append((start * T, (prev + 1) * T, i))
            start = prev = b
        if start is not None:
            runs.append((start * T, (prev + 1) * T, i))
    return RowPlan(rows, torch.tensor(runs, dtype=torch.int64).reshape(-1, 3))


_groups: "OrderedDict[tuple, RowGroups]" = OrderedDict()
_groups_lock = threading.Lock()


def row_groups(adapter_names: Sequence[str]) -> RowGroups:
    """The ``RowGroups`` of ``adapter_names`` (one name per batch row), computed once per distinct list and kept (the
    ``_GROUP_CACHE_SIZE`` most recent)."""
    key = tuple(adapter_names)
    found = _groups.get(key)
    if found is not None:
        return found
    order: dict[str, list[int]] = {}
    for row, name in enumerate(key):
        if not isinstance(name, str):
            raise TypeError(f"fastpeft: adapter_names must hold str, got {type(name).__name__} at position {row}")
        if name != BASE_NAME:
            order.setdefault(name, []).append(row)
    found = RowGroups(key, tuple(order), tuple(tuple(rows) for rows in order.values()))
    with _groups_lock:
        _groups[key] = found
        while len(_groups) > _GROUP_CACHE_SIZE:
            _groups.popitem(last=False)
    return found


@dataclass
class MixedAdapters:
    """One layer's adapters aligned with ``RowGroups.adapters``: entry ``i`` is None where the layer does not hold
    ``adapters[i]`` (its rows get nothing, as in PEFT), else ``lora_A`` ``(r, K)``, ``lora_B`` ``(N, r)``,
    ``lora_bias`` ``(N,)``/None, ``scaling``, ``dropout_p`` (0 outside training) and the dropout ``seed``."""

    lora_A: list
    lora_B: list
    lora_bias: list
    scaling: list
    dropout_p: list
    seeds: list

    @classmethod
    def of(cls, lora_A: list, lora_B: list, lora_bias: list, scaling: list, dropout_p: Sequence[float],
           training: bool) -> "MixedAdapters":
        """The adapters with their dropout: ``dropout_p`` applies only when ``training``, and then each adapter with
        ``p > 0`` gets a seed drawn from torch's generator, in adapter order."""
        if not (training and any(p > 0 for p in dropout_p)):
            return cls(lora_A, lora_B, lora_bias, scaling, [0.0] * len(lora_A), [0] * len(lora_A))
        return cls(lora_A, lora_B, lora_bias, scaling, list(dropout_p),
                   [int(draw_seeds(1, [p], True)[0]) if p > 0 else 0 for p in dropout_p])

    def present(self) -> list[int]:
        return [i for i, A in enumerate(self.lora_A) if A is not None]


def collect_adapters(groups: RowGroups, lora_A: Mapping[str, torch.Tensor], lora_B: Mapping[str, torch.Tensor],
                     lora_bias: Mapping[str, Optional[torch.Tensor]], scaling: Mapping[str, float],
                     dropout_p: Mapping[str, float], training: bool) -> MixedAdapters:
    """The layer's adapters in ``groups.adapters`` order; dropout seeds drawn from torch's generator (one per
    adapter with ``p > 0``) only when ``training``."""
    names = groups.adapters
    As = [lora_A.get(name) for name in names]
    if all(A is not None for A in As):  # the common case: the layer holds every adapter of the batch
        Bs = [lora_B[name] for name in names]
        biases = [lora_bias.get(name) for name in names]
        scales = [float(scaling[name]) for name in names]
    else:
        Bs = [None if A is None else lora_B[name] for name, A in zip(names, As)]
        biases = [None if A is None else lora_bias.get(name) for name, A in zip(names, As)]
        scales = [0.0 if A is None else float(scaling[name]) for name, A in zip(names, As)]
    ps = [0.0 if A is None else float(dropout_p.get(name, 0.0)) for name, A in zip(names, As)]
    return MixedAdapters.of(As, Bs, biases, scales, ps, training)


# ---------------------------------------------------------------------------------------------------- the spec
def reference_mixed(x, y, adapter_names, adapters: MixedAdapters) -> torch.Tensor:
    """PEFT's mixed-batch loop, plainly (the executable spec): ``x`` ``(B, ..., K)``, ``y`` the base output
    ``(B, ..., N)``; returns a new tensor. Differentiable by autograd."""
    groups = row_groups(adapter_names)
    result = y.clone()
    for i, batch_rows in enumerate(groups.batch_rows):
        A = adapters.lora_A[i]
        if A is None:
            continue
        idx = list(batch_rows)
        sub = x[idx].to(A.dtype)
        flat = apply_dropout(sub.reshape(-1, sub.shape[-1]), adapters.dropout_p[i], adapters.seeds[i]).view_as(sub)
        h = torch.nn.functional.linear(flat, A)
        update = torch.nn.functional.linear(h, adapters.lora_B[i], adapters.lora_bias[i]) * adapters.scaling[i]
        result[idx] += update.to(result.dtype)
    return result


# ------------------------------------------------------------------------------------------------------ routes
def _records_autograd(x, y, adapters: MixedAdapters, present: list[int]) -> bool:
    """Whether this call is recorded by autograd (then ``y`` is not updated in place and only ``compose`` runs)."""
    return torch.is_grad_enabled() and (x.requires_grad or y.requires_grad or any(
        adapters.lora_A[i].requires_grad or adapters.lora_B[i].requires_grad for i in present))


def _compose(x2, y2, plan: RowPlan, adapters: MixedAdapters, present: list[int]) -> torch.Tensor:
    """Route ``compose``: gather, two GEMMs in the adapter's dtype, ``index_add_`` into ``y2`` (in place unless
    autograd or torch.compile needs an out-of-place result). ``x2`` ``(M, K)``, ``y2`` ``(M, N)``."""
    out_of_place = _records_autograd(x2, y2, adapters, present)
    for i in present:
        A, B, b = adapters.lora_A[i], adapters.lora_B[i], adapters.lora_bias[i]
        rows = plan.rows[i]
        sub = apply_dropout(x2.index_select(0, rows).to(A.dtype), adapters.dropout_p[i], adapters.seeds[i])
        update = torch.nn.functional.linear(torch.nn.functional.linear(sub, A), B, b) * adapters.scaling[i]
        update = update.to(y2.dtype)
        y2 = y2.index_add(0, rows, update) if out_of_place else y2.index_add_(0, rows, update)
    return y2


# The Triton stacks of the adapters, kept across calls for frozen adapters (shared with the cpu backend's copies).
_derived = SHARED


@functools.cache
def _extension():
    """``fastpeft._C`` (imported where the cpu backend serves a call, so it is built), once: an import statement
    per call costs a microsecond."""
    return importlib.import_module("fastpeft._C")


def _fused_cpu(x2, y2, plan: RowPlan, adapters: MixedAdapters, present: list[int]) -> torch.Tensor:
    """Route ``fused`` (cpu backend): ``fastpeft._C.lora_mixed_`` over the plan's runs, ``y2`` updated in place. It
    takes the adapters as the layer holds them (None for one the layer lacks): fp32 ones are read in place."""
    _C = _extension()
    _C.lora_mixed_(y2, x2 if x2.stride(-1) == 1 else x2.contiguous(), plan.runs, adapters.lora_A, adapters.lora_B,
                   adapters.lora_bias, adapters.scaling)
    return y2


def _sgmv_triton(x2, y2, plan: RowPlan, adapters: MixedAdapters, present: list[int]) -> torch.Tensor:
    """Route ``sgmv`` (triton backend): ``fastpeft.kernels.mixed_lora``'s shrink and expand kernels, ``y2`` updated
    in place."""
    from fastpeft.kernels import mixed_lora

    held = tuple(present)  # layers that lack some of the batch's adapters leave those rows out of the blocks
    blocks = plan.blocks.get(held)
    if blocks is None:
        with torch.inference_mode(False):
            rows = [r if adapters.lora_A[i] is not None else r[:0] for i, r in enumerate(plan.rows)]
            blocks = plan.blocks[held] = mixed_lora.blocks_of(rows, x2.device)
    tensors = [t for t in (*adapters.lora_A, *adapters.lora_B, *adapters.lora_bias) if t is not None]
    shape = tuple(None if A is None else A.shape[0] for A in adapters.lora_A)
    stacked = _derived.get(tensors, lambda: mixed_lora.stack_adapters(
        adapters.lora_A, adapters.lora_B, adapters.lora_bias, adapters.scaling, x2.shape[1], y2.shape[1],
        x2.device), extra=(shape, tuple(adapters.scaling)))
    return mixed_lora.mixed_lora_(y2, x2, blocks, *stacked)


def _sgmv_eligible(adapters: MixedAdapters, present: list[int]) -> bool:
    """Ranks fit the kernels' padded rank tiles (``fastpeft.kernels.mixed_lora.RANK_TILES``)."""
    from fastpeft.kernels.mixed_lora import rank_tile

    return rank_tile(max(adapters.lora_A[i].shape[0] for i in present)) is not None


def _summary(x2, adapters: MixedAdapters, present: list[int]) -> tuple:
    """``(adapter dtypes, total rank, any dropout, kernels may serve)`` of the call in one pass over its adapters.
    The kernels (``fused`` / ``sgmv``, ``fastpeft.routing.ROUTE_LIMITS``) need no dropout and ``x`` widening to each
    adapter's dtype without rounding (PEFT's cast then loses nothing, so computing in fp32 is its meaning)."""
    dtypes, rank, dropout, kernels = [], 0, False, True
    for i in present:
        A = adapters.lora_A[i]
        dtypes.append(A.dtype)
        rank += A.shape[0]
        if adapters.dropout_p[i] > 0:
            dropout = kernels = False
        elif kernels and not lossless(x2.dtype, A.dtype):
            kernels = False
    return dtypes, rank, dropout, kernels


def add_mixed_lora_(x: torch.Tensor, y: torch.Tensor, groups: RowGroups, adapters: MixedAdapters) -> torch.Tensor:
    """Add each row's own adapter update to the base output ``y``, by the route chosen for this call.

    Args:
        x: ``(B, ..., K)`` fp16/bf16/fp32, the layer input; ``B == len(groups.names)``.
        y: ``(B, ..., N)``, the base output (any float dtype); updated in place when no autograd is recorded.
        groups: ``row_groups(adapter_names)``, one adapter name (or ``"__base__"``) per batch row.
        adapters: the layer's adapters in ``groups.adapters`` order (``collect_adapters``).
    Returns:
        ``(B, ..., N)`` in ``y``'s dtype: ``y``'s values updated in place, or a new tensor where autograd needs one.
    """
    present = adapters.present()
    if not present:
        return y
    x2 = x.reshape(-1, x.shape[-1])
    y2 = y.reshape(-1, y.shape[-1])
    plan = groups.plan(x2.shape[0] // len(groups.names), x2.device)
    if _records_autograd(x, y, adapters, present) or torch.compiler.is_compiling():
        return _compose(x2, y2, plan, adapters, present).view(y.shape)
    backend, key, routes = _routes_of_call(x2, y2, adapters, present)
    route = routing.take(key, routes)
    if route is not None:  # settled: run it on y itself, nothing else built
        return routes[route](x2, y2, plan, adapters, present).view(y.shape)
    updaters = {name: (lambda out, fn=fn: fn(x2, out, plan, adapters, present)) for name, fn in routes.items()}
    out = routing.run_in_place(key, updaters, y2, device=x2.device.type, unmeasured=_unmeasured(backend, routes))
    return out.view(y.shape)


def _routes_of_call(x2, y2, adapters: MixedAdapters, present: list[int]) -> tuple:
    """``(backend, route key, {route: function})`` of a call without autograd of :func:`add_mixed_lora_`."""
    backend = get_backend(x2, y2)
    dtypes, rank, dropout, kernels = _summary(x2, adapters, present)
    routes = {"compose": _compose}
    if kernels:
        if backend.name == "cpu":
            routes["fused"] = _fused_cpu
        elif backend.name == "triton" and _sgmv_eligible(adapters, present):
            routes["sgmv"] = _sgmv_triton
    key = routing.make_key("lora_mixed_forward", backend.name, "dense", x2.dtype, y2.dtype, dtypes, x2.shape[0],
                           y2.shape[1], x2.shape[1], dropout, rank, len(present))
    return backend, key, routes


class SettledMixedCall:
    """A call of :func:`add_mixed_lora_` without autograd resolved once, for a caller that repeats it with new
    inputs (a decode step of ``generate`` with ``adapter_names``): the route its key takes, the row plan and the
    adapters, so a repeat skips resolving (after the base product streamed the layer's weight, resolving cost more
    than the C++ pass itself). :meth:`serves` declines a call whose dispatch could differ (another ``adapter_names``
    list, dtype, shape, device, grad or autocast mode, a changed ``functional.dispatch_state``, or a call due to
    measure the route again); the caller checks that its adapters are unchanged."""

    __slots__ = ("state", "groups", "dtype", "shape", "device", "plan", "adapters", "present", "function", "taken")

    def __init__(self, state, groups, dtype, shape, device, plan, adapters, present, function, taken):
        self.state, self.groups, self.dtype, self.shape, self.device = state, groups, dtype, shape, device
        self.plan = plan
        self.adapters, self.present, self.function, self.taken = adapters, present, function, taken

    @classmethod
    def of(cls, x: torch.Tensor, y: torch.Tensor, groups: RowGroups,
           adapters: MixedAdapters) -> Optional["SettledMixedCall"]:
        """The call of ``add_mixed_lora_(x, y, groups, adapters)`` just made, settled, or None where it cannot be
        (autograd or dropout, a route still to be measured, or no adapter present)."""
        present = adapters.present()
        if not present or not may_settle(x) or any(adapters.dropout_p):
            return None
        x2 = x.reshape(-1, x.shape[-1])
        _, key, routes = _routes_of_call(x2, y.reshape(-1, y.shape[-1]), adapters, present)
        found = routing.settled_call(key, routes)
        if found is None:
            return None
        plan = groups.plan(x2.shape[0] // len(groups.names), x2.device)
        return cls(dispatch_state(), groups, x.dtype, x.shape, x.device, plan, adapters, present, routes[found[0]],
                   routing.TakenRoutes({"lora_mixed_forward": found}))

    def serves(self, x: torch.Tensor, adapter_names) -> bool:
        """Whether this call may add the adapters' terms for ``x`` with ``adapter_names``."""
        return (may_settle(x) and x.dtype is self.dtype and x.shape == self.shape and on_device(x, self.device)
                and row_groups(adapter_names) is self.groups and dispatch_state() == self.state
                and not self.taken.due())

    def add_(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` (the base output for ``x``, a call :meth:`serves`) with each row's adapter terms added in place."""
        y2 = self.function(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), self.plan, self.adapters,
                           self.present)
        self.taken.served()
        return y2.view(y.shape)


def _unmeasured(backend, candidates) -> Optional[str]:
    """Under Triton's interpreter timing means nothing: take the kernel route unless one is pinned."""
    if backend.timings_mean_something():
        return None
    return "sgmv" if "sgmv" in candidates else "compose"
