"""The functional layer: autograd, dispatch, and the ``torch.library`` custom ops.

Public functions:

- ``lora_linear(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, training)``
- ``ia3_linear(x, weight, bias, ia3_vectors, is_feedforward)``
- ``add_lora_update(x, y, weight, lora_A, lora_B, lora_bias, scaling)``: the adapter terms alone, added to a base
  output computed elsewhere (no dropout)
- ``base_linear(x, weight, bias)``: the base product alone, for evaluation calls

Both take ``x`` of shape ``(..., K)`` and return ``(..., N)`` in ``x``'s dtype. ``weight`` is the ``(N, K)`` base
weight (a transposed view for ``fan_in_fan_out`` layers) or a ``fastpeft.quant.QuantizedWeight``.

Under ``torch.compile``, dense weights go through the custom ops ``fastpeft::lora_linear`` / ``fastpeft::ia3_linear``
(with fake implementations and registered autograd, so the compiler traces them without graph breaks). In eager
mode, and for quantized weights, the same kernels run through ``torch.autograd.Function`` twins: the custom-op
dispatcher costs tens to hundreds of microseconds a call in Python, as much as a whole LoRA update at decode
sizes. Both routes call the same ``_lora_forward``/``_lora_backward`` and ``_ia3_forward``/``_ia3_backward``, so the
gradient math lives in one place:

LoRA, per adapter ``i`` with ``h_i = drop_i(x) A_i^T`` (M x r_i, saved) and ``g_i = s_i * dY B_i`` (M x r_i)::

    dX   = dY W + sum_i (g_i A_i) * mask_i / (1 - p_i)
    dA_i = g_i^T drop_i(x)            (mask regenerated from the seed; drop(x) is never stored)
    dB_i = s_i * dY^T h_i
    db_i = s_i * sum_m dY             (lora_bias)

IA3 with the product ``l`` of active vectors::

    feedforward:  y = (x * l) W^T + b      ->  dX = (dY W) * l,   dl = sum_m (dY W) * x
    otherwise:    y = (x W^T + b) * l      ->  dX = (dY * l) W,   dl = sum_m dY * (x W^T + b)

Saved for backward: ``x`` (only when an adapter weight needs a gradient), the small ``h_i``, the parameters and the
seeds. Never ``drop(x)``, a mask, or a dequantized weight. IA3 with output scaling on the CPU backend saves the base
output ``x W^T + b`` instead of ``x`` (what PEFT saves), see ``IA3LinearFunction``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import _env, reference, routing
from ._derived import kept_copies
from .backends import get_backend, selection_guards, selection_state


def hold_weight(ctx, weight) -> None:
    """Keep a frozen base weight (a tensor or a ``QuantizedWeight``) on ``ctx`` for the backward, outside
    ``save_for_backward``, with the version check autograd makes for saved tensors: :func:`held_weight` raises where
    the weight was changed in place in between (PEFT's graph raises there too) instead of giving gradients of the
    changed weight."""
    ctx.weight = weight
    tracked = isinstance(weight, torch.Tensor) and not weight.is_inference()
    ctx.weight_version = weight._version if tracked else None


def held_weight(ctx):
    """The weight :func:`hold_weight` kept, unchanged since the forward (else a RuntimeError saying so)."""
    weight = ctx.weight
    if ctx.weight_version is not None and weight._version != ctx.weight_version:
        raise RuntimeError(
            f"fastpeft: the base weight {tuple(weight.shape)} of a layer was modified in place after the forward "
            f"whose backward is running (version {weight._version}, the forward saw {ctx.weight_version}): its "
            "gradients would come from the changed weight. Run the forward again after changing the weight.")
    return weight


def _flatten(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    if x.dim() == 2:  # already (M, K): no reshape call (torch calls cost microseconds at decode sizes)
        return x, (x.shape[0],)
    return x.reshape(-1, x.shape[-1]), tuple(x.shape[:-1])


def _unalias(tensors: list[torch.Tensor], inputs: Sequence[Optional[torch.Tensor]] = ()) -> list[torch.Tensor]:
    """Make op outputs what the fake implementations promise: contiguous, and sharing no storage with each other
    or with an input (clones where needed).

    A backend may hand back a transposed gradient (the CPU backend's ``dB``) or per-adapter slices of one
    concatenated buffer (``xa``, ``dA``, ``dB``: M x r or r x K, small). torch.library forbids aliased outputs, and
    inductor checks strides against the fakes. Empty tensors have no storage to share.
    """
    seen = {t.untyped_storage().data_ptr() for t in inputs if t is not None and t.numel()}
    out = []
    for t in tensors:
        t = t.contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
        out.append(t)
    return out


# under_func_transform() -> bool: whether a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``) is tracing this
# call, whose tensors are wrappers without storage that neither the kernels nor Python-side caches and stamps can
# read. The one place fastpeft names torch's private flag; bound directly, as it is asked on every call.
under_func_transform = torch._C._are_functorch_transforms_active


def _base_needs_grad(weight, bias) -> bool:
    """Whether autograd must reach the base weight or bias (not PEFT's frozen set-up)."""
    if not torch.is_grad_enabled():
        return False
    return (isinstance(weight, torch.Tensor) and weight.requires_grad) or (bias is not None and bias.requires_grad)


def _call_mode(weight, bias) -> str:
    """How a fused op runs this call; LoRA and IA3 route through this one decision.

    - ``"custom_op"``: under torch.compile with a dense weight, the registered ``torch.library`` op, whose
      autograd also returns the base weight's and bias's gradients when they require grad;
    - ``"reference"``: eager with a trainable base (not PEFT's frozen set-up), or under a ``torch.func`` transform
      (``grad``, ``vmap``, ``jacrev``: they run neither the eager Functions, which have no functorch rules, nor the
      kernels, whose operands are then wrapped tensors): autograd through the spec;
    - ``"inference"``: no autograd recording;
    - ``"autograd"``: the eager ``autograd.Function`` (frozen base).
    """
    if isinstance(weight, torch.Tensor) and torch.compiler.is_compiling():
        return "custom_op"
    if _base_needs_grad(weight, bias) or under_func_transform():
        return "reference"
    return "autograd" if torch.is_grad_enabled() else "inference"


def _base_grads(ctx, grad_z, x_in, weight_dtype, bias_dtype):
    """``(dW, db)`` of ``z = x_in W^T + b`` for the custom ops' autograd, None where not required."""
    grad_weight = grad_bias = None
    if ctx.needs_input_grad[1]:
        grad_weight = (grad_z.t().to(x_in.dtype) @ x_in).to(weight_dtype)
    if ctx.needs_input_grad[2]:
        grad_bias = grad_z.sum(0).to(bias_dtype)
    return grad_weight, grad_bias


def draw_seeds(n: int, dropout_p: Sequence[float], training: bool) -> torch.Tensor:
    """One int64 seed per adapter, drawn from torch's CPU generator when dropout is active.

    Drawing from torch's RNG (not a private counter) is what makes ``torch.manual_seed`` reproduce a run and makes
    activation-checkpoint recompute (which restores the RNG state) regenerate forward's masks.
    """
    if training and any(p > 0 for p in dropout_p):
        return torch.randint(0, 2**31 - 1, (n,), dtype=torch.int64)
    return torch.zeros(n, dtype=torch.int64)


# ------------------------------------------------------------------------------------------------------------ LoRA
def _lora_forward(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds):
    backend = get_backend(x, weight)
    return backend.lora_forward(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds)


def _lora_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x, needs_grad_A,
                   needs_grad_bias=True):
    backend = get_backend(grad_y, weight)
    return backend.lora_backward(
        grad_y.contiguous(), x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x, needs_grad_A,
        needs_grad_bias,
    )


@torch.library.custom_op("fastpeft::lora_linear", mutates_args=())
def lora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: list[torch.Tensor],
    lora_B: list[torch.Tensor],
    lora_bias: list[torch.Tensor],
    scaling: list[float],
    dropout_p: list[float],
    seeds: torch.Tensor,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Fused LoRA forward on 2-D ``x`` (M, K): returns ``y`` (M, N) and ``h_i = drop_i(x) A_i^T`` (M, r_i).

    ``lora_bias[i]`` is an empty tensor for an adapter without one (``Tensor?[]`` lists do not round-trip through
    the registered autograd)."""
    biases = [b if b.numel() else None for b in lora_bias]
    y, xa = _lora_forward(x, weight, bias, lora_A, lora_B, biases, scaling, dropout_p, seeds.tolist())
    y, *xa = _unalias([y, *xa], [x, weight, bias, *lora_A, *lora_B, *biases])
    return y, xa


@lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds):
    y = x.new_empty(x.shape[0], weight.shape[0])
    return y, [x.new_empty(x.shape[0], A.shape[0], dtype=A.dtype) for A in lora_A]


@torch.library.custom_op("fastpeft::lora_linear_backward", mutates_args=())
def lora_linear_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: list[torch.Tensor],
    lora_B: list[torch.Tensor],
    xa: list[torch.Tensor],
    scaling: list[float],
    dropout_p: list[float],
    seeds: torch.Tensor,
    needs_grad_x: bool,
    needs_grad_A: bool,
    needs_grad_bias: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Backward of ``fastpeft::lora_linear``; gradients not asked for come back as empty tensors."""
    dx, dA, dB, db = _lora_backward(
        grad_y, x if needs_grad_A else None, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds.tolist(),
        needs_grad_x, needs_grad_A, needs_grad_bias,
    )
    dx = dx if dx is not None else grad_y.new_empty(0)
    dA = [g if g is not None else A.new_empty(0) for g, A in zip(dA, lora_A)]
    db = [g if g is not None and needs_grad_bias else B.new_empty(0) for g, B in zip(db, lora_B)]
    n = len(lora_A)
    flat = _unalias([dx, *dA, *dB, *db], [grad_y, x, weight, *lora_A, *lora_B, *xa])
    return flat[0], flat[1 : 1 + n], flat[1 + n : 1 + 2 * n], flat[1 + 2 * n :]


@lora_linear_backward_op.register_fake
def _(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x, needs_grad_A, needs_grad_bias):
    M, K = grad_y.shape[0], weight.shape[1]
    dx = grad_y.new_empty(M, K) if needs_grad_x else grad_y.new_empty(0)
    dA = [A.new_empty(A.shape) if needs_grad_A else A.new_empty(0) for A in lora_A]
    dB = [B.new_empty(B.shape) for B in lora_B]
    db = [B.new_empty(B.shape[0] if needs_grad_bias else 0) for B in lora_B]
    return dx, dA, dB, db


def _split3(flat, n: int) -> tuple[list, list, list]:
    """``(A..., B..., third...)`` flattened for autograd, back to three per-adapter lists."""
    return list(flat[:n]), list(flat[n : 2 * n]), list(flat[2 * n :])


def _lora_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds = inputs
    _, xa = output
    ctx.n = len(lora_A)
    ctx.scaling, ctx.dropout_p = list(scaling), list(dropout_p)
    ctx.needs_grad_A = any(A.requires_grad for A in lora_A)
    ctx.has_lora_bias = [b.numel() > 0 for b in lora_bias]
    ctx.base_bias_dtype = bias.dtype if bias is not None else None
    # x is kept only for dA or a trainable base weight; with dropout it is still x itself, never a dropped copy.
    saved_x = x if (ctx.needs_grad_A or weight.requires_grad) else None
    ctx.save_for_backward(saved_x, weight, seeds, *lora_A, *lora_B, *xa)


def _lora_setup_backward(ctx, grad_y, grad_xa):
    saved = ctx.saved_tensors
    x, weight, seeds = saved[:3]
    lora_A, lora_B, xa = _split3(saved[3:], ctx.n)
    needs_grad_x = ctx.needs_input_grad[0]
    dx, dA, dB, db = lora_linear_backward_op(
        grad_y, x if x is not None else grad_y.new_empty(0), weight, lora_A, lora_B, xa, ctx.scaling,
        ctx.dropout_p, seeds, needs_grad_x, ctx.needs_grad_A, any(ctx.has_lora_bias),
    )
    grad_A = [g if ctx.needs_grad_A else None for g in dA]
    grad_bias = [g if has else None for g, has in zip(db, ctx.has_lora_bias)]
    grad_weight, grad_base_bias = _base_grads(ctx, grad_y, x, weight.dtype, ctx.base_bias_dtype)
    return dx if needs_grad_x else None, grad_weight, grad_base_bias, grad_A, list(dB), grad_bias, None, None, None


lora_linear_op.register_autograd(_lora_setup_backward, setup_context=_lora_setup_context)


class LoRALinearFunction(torch.autograd.Function):
    """The same forward/backward as ``fastpeft::lora_linear``, for eager mode and for a ``QuantizedWeight`` base."""

    @staticmethod
    def forward(ctx, x, weight, bias, n, scaling, dropout_p, seeds, settled, *adapter_tensors):
        # settled: a SettledTrainingCall whose routes serve this call and its backward, or None (dispatch per call)
        lora_A, lora_B, lora_bias = _split3(adapter_tensors, n)
        run = _lora_forward if settled is None else settled.forward
        y, xa = run(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds)
        hold_weight(ctx, weight)
        ctx.n, ctx.scaling, ctx.dropout_p, ctx.seeds = n, scaling, dropout_p, seeds
        ctx.settled = settled
        ctx.needs_grad_A = any(A.requires_grad for A in lora_A)
        ctx.has_lora_bias = [b is not None for b in lora_bias]
        ctx.save_for_backward(x if ctx.needs_grad_A else None, *lora_A, *lora_B, *xa)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, *adapters = ctx.saved_tensors
        lora_A, lora_B, xa = _split3(adapters, ctx.n)
        needs_grad_x = ctx.needs_input_grad[0]
        run = _lora_backward if ctx.settled is None else ctx.settled.backward
        dx, dA, dB, db = run(
            grad_y, x, held_weight(ctx), lora_A, lora_B, xa, ctx.scaling, ctx.dropout_p, ctx.seeds, needs_grad_x,
            ctx.needs_grad_A, any(ctx.has_lora_bias),
        )
        grad_bias = [g if has else None for g, has in zip(db, ctx.has_lora_bias)]
        return (dx, None, None, None, None, None, None, None, *dA, *dB, *grad_bias)


def _autocast(x, weight, bias, tensors):
    """Apply autocast as ``F.linear`` would: custom ops are opaque to it, so cast explicitly."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, weight, bias, tensors
    dtype = torch.get_autocast_dtype(device_type)
    cast = lambda t: t if (t is None or not t.is_floating_point()) else t.to(dtype)  # noqa: E731
    weight = cast(weight) if isinstance(weight, torch.Tensor) else weight
    return cast(x), weight, cast(bias), [[cast(t) for t in group] for group in tensors]


def capturing_cuda_graph(x: torch.Tensor) -> bool:
    """Whether ``x``'s stream is being captured into a CUDA graph. fastpeft draws dropout seeds on the host per
    call, so a captured graph would replay one mask forever; torch's own dropout is graph-safe."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def lora_linear(
    x: torch.Tensor,
    weight,
    bias: Optional[torch.Tensor],
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    lora_bias: Sequence[Optional[torch.Tensor]],
    scaling: Sequence[float],
    dropout_p: Sequence[float],
    training: bool,
) -> torch.Tensor:
    """PEFT's LoRA ``Linear`` forward, fused: ``y = x W^T + b + sum_i s_i (drop_i(x) A_i^T B_i^T + b_i)``.

    Args:
        x: ``(..., K)``, fp16/bf16/fp32, same dtype as a dense ``weight``.
        weight: ``(N, K)`` tensor (any strides) or ``fastpeft.quant.QuantizedWeight``.
        bias: ``(N,)`` or None.
        lora_A, lora_B, lora_bias: per active adapter, ``(r_i, K)``, ``(N, r_i)``, ``(N,)``/None.
        scaling: ``lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA) per adapter.
        dropout_p: per adapter; applied only when ``training``.
    Returns:
        ``(..., N)`` in ``x``'s dtype.
    """
    x2, lead = _flatten(x)
    ps = [float(p) for p in dropout_p] if training else [0.0] * len(dropout_p)
    if any(ps) and capturing_cuda_graph(x):
        raise RuntimeError(
            "fastpeft.functional.lora_linear: dropout in training while a CUDA graph is being captured would replay "
            "one dropout mask on every replay (the seeds are drawn on the host); the fused layers fall back to PEFT's "
            "forward there, call that (or torch's dropout) instead"
        )
    As, Bs, bs = list(lora_A), list(lora_B), list(lora_bias)
    if torch.is_autocast_enabled(x2.device.type):
        x2, weight, bias, (As, Bs, bs) = _autocast(x2, weight, bias, [As, Bs, bs])
    scaling = [float(s) for s in scaling]
    mode = _call_mode(weight, bias)
    if mode == "custom_op":
        seeds = draw_seeds(len(As), ps, training)  # a tensor, so the compiled graph draws it too
        biases = [b if b is not None else A.new_empty(0) for b, A in zip(bs, As)]
        y, _ = torch.ops.fastpeft.lora_linear(x2, weight, bias, As, Bs, biases, scaling, ps, seeds)
        return y.view(*lead, y.shape[-1])
    seeds = draw_seeds(len(As), ps, training).tolist() if any(ps) else [0] * len(As)
    if mode == "reference":
        # The fused eager kernels treat the base as frozen (PEFT's set-up); a trainable base is differentiated by
        # autograd through the reference instead of silently getting no gradient.
        y = reference.lora_linear(x2, weight, bias, As, Bs, bs, scaling, ps, seeds)
    elif mode == "inference":
        with kept_copies():  # nothing trains in this call: operands derived from the adapters may be kept
            y, _ = _lora_forward(x2, weight, bias, As, Bs, bs, scaling, ps, seeds)
    else:
        y = LoRALinearFunction.apply(x2, weight, bias, len(As), scaling, ps, seeds, None, *As, *Bs, *bs)
    return y if len(lead) == 1 else y.view(*lead, y.shape[-1])


def dispatch_state() -> tuple:
    """What the backend and route of every call depend on besides the call's own tensors and the route key:
    ``fastpeft.routing.generation()``, ``FASTPEFT_ROUTE``, ``set_backend`` and ``FASTPEFT_BACKEND``. Equal values
    mean unchanged dispatch."""
    return (*routing.choice_state(), *selection_state())


def dispatch_guards() -> Optional[list]:
    """:func:`dispatch_state` now as guards (``fastpeft.guards``): they hold while it is unchanged. None where one
    of its values cannot be guarded."""
    route, selection = _env.raw_guard(b"FASTPEFT_ROUTE"), selection_guards()
    if route is None or selection is None:
        return None
    return [routing.generation_guard(), route, *selection]


def may_settle(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` may be kept resolved (:class:`SettledCall`): it records no autograd, runs outside
    autocast, torch.compile and ``torch.func`` transforms, on a plain CPU or CUDA tensor that does not require grad."""
    if (type(x) is not torch.Tensor or torch.is_grad_enabled() or x.requires_grad or x.dim() == 0
            or under_func_transform()):
        return False
    if x.is_cpu:
        device_type = "cpu"
    elif x.is_cuda:
        device_type = "cuda"
    else:
        return False
    return not (torch.is_autocast_enabled(device_type) or torch.compiler.is_compiling())


def on_device(t: torch.Tensor, device: torch.device) -> bool:
    """Whether ``t`` is on ``device`` (a CPU tensor is asked without building its ``torch.device``: this runs on
    every settled call)."""
    return t.is_cpu if device.type == "cpu" else t.device == device


def settled_route(op: str, x2: torch.Tensor, weight, lora_A: Sequence[torch.Tensor]):
    """``(route, function, counted)`` of ``op`` for an evaluation call on ``x2`` ``(M, K)``
    (``Backend.settled_route``), or None where it is not settled."""
    return get_backend(x2, weight).settled_route(op, x2, weight, lora_A)


class SettledCall:
    """An evaluation call resolved once, for a caller that repeats it with new inputs: ``function(x2)`` runs the
    routes its backend takes for every call like it (``taken``: ``settled_route`` results, by op name) with the
    arguments other than ``x`` bound, so a repeat skips resolving (at decode sizes resolving cost as much as the
    product itself). :meth:`output` declines (returns None) a call whose dispatch could differ: one
    :func:`may_settle` refuses, another dtype, ``K`` or ``M`` bucket, a changed :func:`dispatch_state`, or a call due
    to measure a route again, or on another device. The caller checks that what it bound (its tensors, scalings) is
    unchanged."""

    __slots__ = ("state", "guards", "dtype", "device", "k", "m_low", "m_high", "taken", "function", "any_rows")

    def __init__(self, x2: torch.Tensor, taken: dict, function, any_rows: bool = False):
        m = routing.bucket(x2.shape[0])
        self.state, self.dtype, self.device, self.k, self.m_low, self.m_high = (
            dispatch_state(), x2.dtype, x2.device, x2.shape[1], m // 2 if m > 1 else 0, m)
        # the same state as guards, for a function C++ can serve (bind_native)
        self.guards = dispatch_guards() if hasattr(function, "bind_native") else None
        self.taken = routing.TakenRoutes({op: (found[0], found[2]) for op, found in taken.items()})
        self.function = function
        self.any_rows = any_rows  # function takes (..., K) itself (else (M, K), reshaped here)

    def bind_native(self, native, layer_guards: list):
        """``native`` (a ``fastpeft._C.SettledGemv``, or None: one is made with ``layer_guards``, the guards on the
        caller's state) with this call added where C++ can serve it under the conditions :meth:`output` checks (the
        dispatch state as guards); ``native`` as it was where this call's function has no such form or a route it
        takes awaits its confirming measurement (whose calls only :meth:`output` counts)."""
        if self.guards is None or self.taken.counted or self.device.type != "cpu":
            return native
        return self.function.bind_native(native, layer_guards, self.guards, self.dtype, self.k, self.m_low,
                                         self.m_high, self.taken.routes)

    def output(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The call's output for ``x`` ``(..., K)`` (``(..., N)``), or None where its dispatch could differ."""
        if not may_settle(x) or x.dtype is not self.dtype or x.shape[-1] != self.k or not on_device(x, self.device):
            return None
        if (not self.m_low < x.numel() // self.k <= self.m_high or dispatch_state() != self.state
                or self.taken.due()):
            return None
        as_given = self.any_rows or x.dim() == 2
        with kept_copies():  # nothing trains in this call
            y = self.function(x if as_given else x.reshape(-1, self.k))
        self.taken.served()
        return y if as_given else y.view(*x.shape[:-1], y.shape[-1])


def settled_lora_linear(x: torch.Tensor, weight, transposed: bool, bias: Optional[torch.Tensor],
                        lora_A: Sequence[torch.Tensor], lora_B: Sequence[torch.Tensor],
                        lora_bias: Sequence[Optional[torch.Tensor]], scaling: Sequence[float]) -> Optional[SettledCall]:
    """:func:`lora_linear` without dropout for calls like this one on ``x``, settled, or None where it is not
    settled (yet) or :func:`may_settle` refuses. ``weight`` (``(N, K)``, or ``(K, N)`` stored for
    ``transposed``, transposed per call) and the other tensors are bound as they are: their values are read per
    call."""
    if not may_settle(x):
        return None
    x2, _ = _flatten(x)
    w = weight.t() if transposed else weight
    backend = get_backend(x2, w)
    found = backend.settled_route("lora_forward", x2, w, lora_A)
    if found is None:
        return None
    forward = found[1]
    n = len(lora_A)
    rest = (bias, list(lora_A), list(lora_B), list(lora_bias), [float(s) for s in scaling], [0.0] * n, [0] * n)
    if transposed:
        function = lambda x2: forward(x2, weight.t(), *rest)[0]  # noqa: E731
    else:
        special = backend.settled_forward(found[0], weight, *rest[:5])
        if special is not None:
            function, more = special
            return SettledCall(x2, {"lora_forward": found, **more}, function, any_rows=True)
        function = lambda x2: forward(x2, weight, *rest)[0]  # noqa: E731
    return SettledCall(x2, {"lora_forward": found}, function)


class SettledTrainingCall:
    """A training call of :func:`lora_linear` (autograd recording, a frozen dense base, no autocast or
    torch.compile) resolved once, for a caller that repeats it with new inputs: the routes its backend takes for the
    forward and the backward of every call like it (``Backend.settled_training``) with the layer's tensors bound by
    identity (their values are read per call), so a repeat skips resolving both, which at decode sizes costs about as
    much as the adapter's own arithmetic. Dropout is drawn per call as the full path draws it (seeds from torch's
    generator). :meth:`output` declines (returns None) a call whose dispatch could differ: another dtype, ``K``,
    ``M`` bucket or device, ``x`` that requires grad where it did not (or the reverse), an adapter's or the base's
    ``requires_grad`` changed, autocast, torch.compile, a ``torch.func`` transform, a changed :func:`dispatch_state`,
    or a route due for its confirming measurement. The caller checks that what it bound (the layer's tensors,
    scalings, dropout modules) is unchanged."""

    __slots__ = ("state", "dtype", "device", "device_type", "k", "m_low", "m_high", "x_grad", "grad_A", "taken",
                 "forward", "backward", "native", "weight", "transposed", "bias", "tensors", "n", "scaling",
                 "dropout_p", "drawing", "zero_seeds")

    def __init__(self, x2: torch.Tensor, taken: dict, weight: torch.Tensor, transposed: bool,
                 bias: Optional[torch.Tensor], lora_A: list, lora_B: list, lora_bias: list, scaling: list,
                 dropout_p: list):
        m = routing.bucket(x2.shape[0])
        self.state, self.dtype, self.device, self.k, self.m_low, self.m_high = (
            dispatch_state(), x2.dtype, x2.device, x2.shape[1], m // 2 if m > 1 else 0, m)
        self.device_type = x2.device.type
        self.x_grad, self.grad_A = x2.requires_grad, any(A.requires_grad for A in lora_A)
        self.native = taken.get("native")
        self.taken = routing.TakenRoutes({op: (found[0], found[2]) for op, found in taken.items() if op != "native"})
        self.forward, self.backward = taken["lora_forward"][1], taken["lora_backward"][1]
        self.weight, self.transposed, self.bias = weight, transposed, bias
        self.tensors, self.n = (*lora_A, *lora_B, *lora_bias), len(lora_A)
        self.scaling, self.dropout_p = scaling, dropout_p
        self.drawing = any(p > 0 for p in dropout_p)
        self.zero_seeds = [0] * self.n

    def output(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The call's output for ``x`` ``(..., K)`` (``(..., N)``, recorded for autograd), or None where its
        dispatch could differ. Runs with grad enabled."""
        if (type(x) is not torch.Tensor or x.dtype is not self.dtype or x.dim() == 0 or x.shape[-1] != self.k
                or x.requires_grad is not self.x_grad or not on_device(x, self.device)):
            return None
        if (not self.m_low < x.numel() // self.k <= self.m_high or torch.is_autocast_enabled(self.device_type)
                or dispatch_state() != self.state or self.taken.due()):
            return None
        weight, bias, n = self.weight, self.bias, self.n
        if _call_mode(weight, bias) != "autograd":
            return None  # torch.compile, a torch.func transform or a trainable base: lora_linear's other modes
        tensors = self.tensors
        grad_A = False
        for A in tensors[:n]:
            grad_A = grad_A or A.requires_grad
        if grad_A is not self.grad_A:
            return None
        seeds = draw_seeds(n, self.dropout_p, True).tolist() if self.drawing else self.zero_seeds
        x2 = x if x.dim() == 2 else x.reshape(-1, self.k)
        w = weight.t() if self.transposed else weight
        y = None
        if self.native is not None:
            y = self.native(x2, w, bias, tensors[0], tensors[1], self.scaling[0], self.dropout_p[0], seeds[0])
        if y is None:
            y = LoRALinearFunction.apply(x2, w, bias, n, self.scaling, self.dropout_p, seeds, self, *tensors)
        self.taken.served()
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


def settled_lora_training(x: torch.Tensor, weight: torch.Tensor, transposed: bool, bias: Optional[torch.Tensor],
                          lora_A: Sequence[torch.Tensor], lora_B: Sequence[torch.Tensor],
                          lora_bias: Sequence[Optional[torch.Tensor]], scaling: Sequence[float],
                          dropout_p: Sequence[float]) -> Optional[SettledTrainingCall]:
    """:func:`lora_linear` for training calls like this one on ``x`` (grad enabled; ``dropout_p`` as the call applied
    it: zeros where no dropout module was in training), settled, or None where it is not settled (yet) or is not
    such a call. ``weight`` is a dense ``(N, K)`` tensor (``(K, N)`` stored for ``transposed``), bound with the
    other tensors as they are."""
    if (type(x) is not torch.Tensor or not torch.is_grad_enabled() or x.dim() == 0
            or not isinstance(weight, torch.Tensor) or torch.compiler.is_compiling()):
        return None
    x2, _ = _flatten(x)
    w = weight.t() if transposed else weight
    if not lora_A or torch.is_autocast_enabled(x2.device.type) or _call_mode(w, bias) != "autograd":
        return None
    backend = get_backend(x2, w)
    grads = routing.grads_key(x2.requires_grad, any(A.requires_grad for A in lora_A))
    ps = [float(p) for p in dropout_p]
    taken = backend.settled_training(x2, w, list(lora_A), list(lora_B), list(lora_bias), ps, grads)
    if taken is None:
        return None
    return SettledTrainingCall(x2, taken, weight, transposed, bias, list(lora_A), list(lora_B), list(lora_bias),
                               [float(s) for s in scaling], ps)


def add_lora_update(x: torch.Tensor, y: torch.Tensor, weight, lora_A: Sequence[torch.Tensor],
                    lora_B: Sequence[torch.Tensor], lora_bias: Sequence[Optional[torch.Tensor]],
                    scaling: Sequence[float]) -> torch.Tensor:
    """``y + sum_i s_i (x_i A_i^T B_i^T + b_i)``: PEFT's adapter terms without dropout (an evaluation call) added to
    a base output ``y`` computed elsewhere.

    Args:
        x: ``(M, K)``; y: ``(M, N)``; weight: the layer's base weight (selects the backend, as for
        :func:`lora_linear`); the adapters as for :func:`lora_linear`.
    Returns:
        ``(M, N)`` in ``y``'s dtype; ``y`` itself is updated in place where the backend's passes run. A call that
        records autograd for an adapter runs the reference's torch ops, which autograd differentiates.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*lora_A, *lora_B, *lora_bias)):
        n = len(lora_A)
        return reference.add_lora_terms(y, x, lora_A, lora_B, lora_bias, scaling, [0.0] * n, [0] * n)
    with kept_copies():  # nothing trains in this call
        return get_backend(x, weight).add_lora_(x, y, weight, list(lora_A), list(lora_B), list(lora_bias),
                                                [float(s) for s in scaling])


def base_linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x W^T + b`` for an evaluation call: ``x`` ``(M, K)`` that requires no grad -> ``(M, N)`` in ``x``'s dtype,
    by the backend's measured routes, nothing recorded for autograd."""
    if x.requires_grad or (bias is not None and bias.requires_grad and torch.is_grad_enabled()):
        raise ValueError("fastpeft.functional.base_linear records no autograd: call it on tensors without grad")
    return get_backend(x, weight).base_linear(x, weight, bias)


# ------------------------------------------------------------------------------------------------------------- IA3
def _ia3_forward(x, weight, bias, scale, is_feedforward):
    return get_backend(x, weight).ia3_forward(x, weight, bias, scale, is_feedforward)


def _ia3_backward(grad_y, x, weight, bias, scale, is_feedforward, needs_grad_x):
    return get_backend(grad_y, weight).ia3_backward(
        grad_y.contiguous(), x, weight, bias, scale, is_feedforward, needs_grad_x
    )


@torch.library.custom_op("fastpeft::ia3_linear", mutates_args=())
def ia3_linear_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: torch.Tensor, is_feedforward: bool
) -> torch.Tensor:
    """Fused IA3 forward on 2-D ``x`` (M, K); ``scale`` is ``(K,)`` if ``is_feedforward`` else ``(N,)``."""
    return _unalias([_ia3_forward(x, weight, bias, scale, is_feedforward)], [x, weight, bias, scale])[0]


@ia3_linear_op.register_fake
def _(x, weight, bias, scale, is_feedforward):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("fastpeft::ia3_linear_backward", mutates_args=())
def ia3_linear_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    scale: torch.Tensor,
    is_feedforward: bool,
    needs_grad_x: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of ``fastpeft::ia3_linear``: ``(dx or empty, dscale)``."""
    dx, dscale = _ia3_backward(grad_y, x, weight, bias, scale, is_feedforward, needs_grad_x)
    dx = dx if dx is not None else grad_y.new_empty(0)
    dx, dscale = _unalias([dx, dscale], [grad_y, x, weight, bias, scale])
    return dx, dscale


@ia3_linear_backward_op.register_fake
def _(grad_y, x, weight, bias, scale, is_feedforward, needs_grad_x):
    dx = x.new_empty(x.shape) if needs_grad_x else grad_y.new_empty(0)
    return dx, scale.new_empty(scale.shape)


def _ia3_setup_context(ctx, inputs, output):
    x, weight, bias, scale, is_feedforward = inputs
    ctx.is_feedforward = is_feedforward
    ctx.save_for_backward(x, weight, bias, scale)


def _ia3_setup_backward(ctx, grad_y):
    x, weight, bias, scale = ctx.saved_tensors
    needs_grad_x = ctx.needs_input_grad[0]
    dx, dscale = ia3_linear_backward_op(grad_y, x, weight, bias, scale, ctx.is_feedforward, needs_grad_x)
    grad_weight = grad_bias = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        # feedforward: z = (x * s) W^T + b; output scaling: y = (x W^T + b) * s, so dz = dy * s
        if ctx.is_feedforward:
            grad_weight, grad_bias = _base_grads(ctx, grad_y, x * scale.to(x.dtype), weight.dtype,
                                                     bias.dtype if bias is not None else None)
        else:
            grad_weight, grad_bias = _base_grads(ctx, grad_y * scale.to(grad_y.dtype), x, weight.dtype,
                                                     bias.dtype if bias is not None else None)
    return (dx if needs_grad_x else None), grad_weight, grad_bias, dscale, None


ia3_linear_op.register_autograd(_ia3_setup_backward, setup_context=_ia3_setup_context)


_CUSTOM_OPS = (lora_linear_op, lora_linear_backward_op, ia3_linear_op, ia3_linear_backward_op)


def compile_cache_tag(source: Optional[bytes] = None, schemas: Optional[Sequence[str]] = None) -> str:
    """The tag fastpeft adds to ``torch.compiler.config.cache_key_tag``: a digest of this module's source (the custom
    ops' fake implementations and registered autograd) and of the ops' schemas, by default the installed ones.

    torch's FX-graph and AOTAutograd caches key a graph by its text, which names a custom op but not its schema or
    the backward its registered autograd traces. Without the tag, a warm cache kept across a fastpeft upgrade could
    serve a compiled backward that calls ``fastpeft::lora_linear_backward`` with the previous version's arguments
    (an error) or with the previous version's gradient formula (wrong gradients). With it, such entries are missed
    and recompiled once."""
    digest = hashlib.sha256()
    if source is None:
        try:
            source = Path(__file__).read_bytes()
        except OSError:  # no readable source file (a zipped install): the schemas alone
            source = b""
    digest.update(source)
    for schema in (schemas if schemas is not None else [str(op._opoverload._schema) for op in _CUSTOM_OPS]):
        digest.update(schema.encode())
    return "fastpeft-" + digest.hexdigest()[:16]


def _tag_compile_caches() -> None:
    """Add :func:`compile_cache_tag` to torch's compile-cache key tag, keeping a tag the user set (comma-joined)."""
    config = getattr(getattr(torch, "compiler", None), "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):
        return  # a torch without the tag has none of the caches it keys either
    tag = compile_cache_tag()
    current = config.cache_key_tag or ""
    if tag not in current.split(","):
        config.cache_key_tag = f"{current},{tag}" if current else tag


_tag_compile_caches()


class IA3LinearFunction(torch.autograd.Function):
    """``fastpeft::ia3_linear`` for eager mode and for a ``QuantizedWeight`` base.

    Output scaling on a backend that keeps the base output (``Backend.ia3_keeps_base_output``, the CPU backend): forward
    saves ``z = x W^T + b`` instead of ``x``, as PEFT's own graph does, so backward needs no second GEMM (on a CPU
    the recomputation cost a whole forward: IA3 training ran at 0.8x PEFT). Otherwise ``x`` is saved and ``z``
    recomputed, which trades an ``(M, N)`` activation for a GEMM where GEMMs are cheap.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, is_feedforward):
        hold_weight(ctx, weight)
        ctx.is_feedforward = is_feedforward
        backend = get_backend(x, weight)
        if not is_feedforward and backend.ia3_keeps_base_output:
            y, z = backend.ia3_forward_keep_base(x, weight, bias, scale)
            ctx.backend = backend
            ctx.save_for_backward(None, bias, scale, z)
            return y
        ctx.backend = None
        ctx.save_for_backward(x, bias, scale, None)
        return backend.ia3_forward(x, weight, bias, scale, is_feedforward)

    @staticmethod
    def backward(ctx, grad_y):
        x, bias, scale, z = ctx.saved_tensors
        weight = held_weight(ctx)
        if ctx.backend is not None:
            dx, dscale = ctx.backend.ia3_backward_from_base(grad_y.contiguous(), z, weight, scale,
                                                            ctx.needs_input_grad[0])
        else:
            dx, dscale = _ia3_backward(grad_y, x, weight, bias, scale, ctx.is_feedforward, ctx.needs_input_grad[0])
        return dx, None, None, dscale, None


def ia3_linear(
    x: torch.Tensor, weight, bias: Optional[torch.Tensor], ia3_vectors: Sequence[torch.Tensor], is_feedforward: bool
) -> torch.Tensor:
    """PEFT's IA3 ``Linear`` forward, fused.

    Args:
        x: ``(..., K)``.
        weight: ``(N, K)`` tensor (any strides) or ``fastpeft.quant.QuantizedWeight``.
        ia3_vectors: the active adapters' ``ia3_l`` parameters, ``(1, K)`` (feedforward) or ``(N, 1)``; their
            product is the scale, differentiated by autograd back to each vector.
    Returns:
        ``(..., N)`` in ``x``'s dtype.
    """
    x2, lead = _flatten(x)
    scale = ia3_vectors[0].flatten()
    for vector in ia3_vectors[1:]:
        scale = scale * vector.flatten()
    x2, weight, bias, _ = _autocast(x2, weight, bias, [])
    mode = _call_mode(weight, bias)
    if mode == "custom_op":
        y = torch.ops.fastpeft.ia3_linear(x2, weight, bias, scale, is_feedforward)
    elif mode == "reference":
        y = reference.ia3_linear(x2, weight, bias, [scale], is_feedforward)
    elif mode == "inference":
        y = _ia3_forward(x2, weight, bias, scale, is_feedforward)
    else:
        y = IA3LinearFunction.apply(x2, weight, bias, scale, is_feedforward)
    return y.view(*lead, y.shape[-1])
