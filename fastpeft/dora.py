"""DoRA (PEFT's ``LoraConfig(use_dora=True)``) without ever building the adapted weight.

PEFT's ``DoraLinearLayer`` normalizes each output row of ``W + s B A`` (an ``(N, K)`` weight it materializes every
call). With ``n_j = ||W_j + s (B A)_j||`` treated as a constant in backward (PEFT detaches it, as the DoRA paper
suggests) and ``c = m / n`` (``m`` the magnitude vector, ``(N,)``):

- dropout 0, or eval: ``y = b + c * (x W^T + s x A^T B^T)`` (PEFT reuses the base output);
- dropout ``p > 0`` in training: ``y = x W^T + b + (c - 1) * drop(x) W^T + c * s drop(x) A^T B^T``: a second base
  product, on the dropped input, is PEFT's meaning there.

The norm comes from small products only (fp32, tiny negative round-off clamped before the square root)::

    n_j^2 = ||W_j||^2 + 2 s B_j . (W A^T)_j + s^2 B_j (A A^T) B_j^T

``||W_j||^2`` is cached per base weight (``DoraCache``) while the weight's storage and version stay the same;
``W A^T`` is ``(N, r)`` and ``A A^T`` is ``(r, r)``.

Gradients, with ``z = (drop) x W^T + s h B^T`` the unscaled product (``h = drop(x) A^T``, ``(M, r)``), ``g = c * dY``
and ``e = (c - 1) * dY``::

    dm = sum_m dY * z / n
    dB = s g^T h,   dA = s (g B)^T drop(x)
    p = 0:  dX = g W + s (g B) A
    p > 0:  dX = dY W + (e W + s (g B) A) * mask / (1 - p)

Saved for backward: ``x`` (when ``A`` needs a gradient), ``h`` (``M x r``), ``z`` (``M x N``, when ``m`` needs a
gradient), ``c`` and ``n``. Never a mask, a dropped copy of ``x`` or anything ``N x K``; the mask is regenerated
from the seed (``fastpeft._philox``) by the backend's own masked pass.

Two routes per op (``fastpeft.routing.ROUTES``: ``dora_forward``, ``dora_backward``): ``compose`` (vendor GEMMs in
torch) and ``fused`` (the backend's LoRA op, by its own measured route, plus the DoRA epilogue), so every backend
(reference, cpu, triton, cuda) serves DoRA by construction. A bitsandbytes base (``QuantizedWeight``) runs the
``fused`` route: every product with ``W`` goes through the backend's quantized products, which decode it as they do
for LoRA.

Beside other active adapters (``stacked_linear``), PEFT lets each DoRA adapter scale the running sum of the adapters
before it; that path is torch ops under autograd (no dropout active), with the same norm.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import reference, routing
from .backends import get_backend
from .functional import _call_mode, _flatten, draw_seeds

_F32 = torch.float32


# ------------------------------------------------------------------------------------------------------- the norm
def row_sq_norms(weight) -> torch.Tensor:
    """``||W_j||^2`` for each row of ``weight`` ``(N, K)`` (any strides, any float dtype) as fp32 ``(N,)``; the
    reduction widens in place, with no fp32 copy of the weight. A ``QuantizedWeight`` is decoded once for it (what
    PEFT decodes every call); callers cache the result (``DoraCache``)."""
    if not isinstance(weight, torch.Tensor):
        weight = weight.dequantize()
    return torch.linalg.vector_norm(weight.detach(), dim=1, dtype=_F32).square_()


def weight_norm(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                weight_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``n_j = ||W_j + s (B A)_j||`` as fp32 ``(N,)``, detached, from ``weight`` ``(N, K)``, ``lora_A`` ``(r, K)``,
    ``lora_B`` ``(N, r)`` without forming ``B A``. ``weight_sq`` is ``row_sq_norms(weight)`` when the caller keeps
    it. ``W A^T`` runs in the weight's dtype (a narrower ``A`` is not widened into a copy of ``W``); a
    ``QuantizedWeight`` is decoded by the backend's product, in fp32."""
    A32 = lora_A.detach().to(_F32)
    B32 = lora_B.detach().to(_F32)
    if weight_sq is None:
        weight_sq = row_sq_norms(weight)
    if not isinstance(weight, torch.Tensor):
        wa = _base_product(A32, weight).t()
    elif weight.dtype == _F32:
        wa = torch.mm(weight.detach(), A32.t())
    else:
        wa = torch.mm(weight.detach(), lora_A.detach().to(weight.dtype).t()).to(_F32)
    cross = (B32 * wa).sum(1)
    quad = (torch.mm(B32, torch.mm(A32, A32.t())) * B32).sum(1)
    s = float(scaling)
    squared = weight_sq + (2.0 * s) * cross + (s * s) * quad
    return squared.clamp_min_(0.0).sqrt_()


def _stamp(t: torch.Tensor):
    """What identifies a tensor's current values: the object, its storage, its version (bumped by every in-place
    write, optimizer steps included), its shape and dtype. None for inference tensors (no version counter)."""
    if t.is_inference():
        return None
    return (id(t), t.data_ptr(), t._version, tuple(t.shape), t.dtype)


class DoraCache:
    """One layer's cached DoRA values: ``||W_j||^2`` per base weight, the norm ``n`` per adapter, and the scale
    ``c = m / n`` per adapter while the magnitude needs no gradient (eval, ``torch.no_grad``, frozen adapters), as
    PEFT's optional DoRA caching does. Each entry is keyed by the stamps of the tensors it was computed from, so a
    change of ``W``, ``A``, ``B``, ``m`` or the scaling recomputes it. ``clear()`` after merge/unmerge.
    ``enabled=False`` computes every value afresh (graphs being compiled)."""

    def __init__(self, enabled: bool = True) -> None:
        self._entries: dict[str, tuple] = {}
        self._enabled = enabled

    def clear(self) -> None:
        self._entries.clear()

    def _get(self, key: str, stamp, compute, source: Optional[torch.Tensor] = None):
        """The value under ``key`` if it was computed for ``stamp`` (and from the very tensor ``source``, compared
        by identity: an ``id`` may be reused once its object is freed), else ``compute()`` stored. A stamp holding
        None (an inference tensor, which has no version counter) is never cached."""
        if not self._enabled or stamp is None or any(part is None for part in stamp):
            return compute()
        entry = self._entries.get(key)
        if entry is not None and entry[0] == stamp and entry[1] is source:
            return entry[2]
        value = compute()
        self._entries[key] = (stamp, source, value)
        return value

    def norm(self, name: str, weight_param: torch.Tensor, weight: torch.Tensor, lora_A, lora_B,
             scaling: float) -> torch.Tensor:
        """``weight_norm`` of adapter ``name``; ``weight`` is the ``(N, K)`` view of ``weight_param``."""
        if not self._enabled:
            return weight_norm(weight, lora_A, lora_B, scaling)
        w_stamp = _stamp(weight_param)
        layout = tuple(weight.stride()) if isinstance(weight, torch.Tensor) else weight.kind
        weight_sq = self._get("weight_sq", (w_stamp, layout), lambda: row_sq_norms(weight))
        stamp = (w_stamp, layout, _stamp(lora_A), _stamp(lora_B), float(scaling))
        return self._get(f"norm/{name}", stamp, lambda: weight_norm(weight, lora_A, lora_B, scaling, weight_sq))

    def scale(self, name: str, magnitude: torch.Tensor, norm: torch.Tensor) -> Optional[torch.Tensor]:
        """``m / n`` in fp32, cached while ``magnitude`` needs no gradient; None when it does (the autograd
        function forms it so that ``dm`` flows)."""
        if not self._enabled or (magnitude.requires_grad and torch.is_grad_enabled()):
            return None
        return self._get(f"scale/{name}", (_stamp(magnitude),), lambda: magnitude.detach().to(_F32) / norm, norm)


_UNCACHED = DoraCache(enabled=False)


# ---------------------------------------------------------------------------------------------------- dropout
def keep_scale(backend, rows: int, cols: int, p: float, seed: int, device) -> torch.Tensor:
    """``mask / (1 - p)`` as fp32 ``(rows, cols)``, the mask of ``fastpeft._philox`` for ``seed``, drawn by the
    backend's own masked dX pass: the LoRA backward of a rank-1 all-ones adapter over a zero base and
    ``dY = 1`` is exactly ``dX = mask / (1 - p)``. Transient; never saved."""
    ones = torch.ones(rows, 1, dtype=_F32, device=device)
    zero_base = torch.zeros(1, cols, dtype=_F32, device=device)
    ones_a = torch.ones(1, cols, dtype=_F32, device=device)
    ones_b = torch.ones(1, 1, dtype=_F32, device=device)
    h = torch.zeros(rows, 1, dtype=_F32, device=device)
    dx, _, _, _ = backend.lora_backward(ones, None, zero_base, [ones_a], [ones_b], [h], [1.0], [float(p)],
                                        [int(seed)], True, False)
    return dx


def _dropped(xi: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """``drop(x)`` from ``x`` and ``keep_scale``, in ``x``'s dtype (transient)."""
    return xi * ks if xi.dtype == _F32 else (xi.to(_F32) * ks).to(xi.dtype)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


# ---------------------------------------------------------------------------------------------------- forward
WIDEN_BLOCK_ELEMENTS = 1 << 20  # rows of W widened at a time when the product runs in a wider dtype (4 MB in fp32)


def _base_product(a: torch.Tensor, weight) -> torch.Tensor:
    """``a W^T`` ``(M, N)`` in ``a``'s dtype, as PEFT's ``F.linear(drop(x), W.to(x.dtype))`` with ``x`` in the
    adapter's dtype. A dense weight narrower than ``a`` (bf16 base, fp32 adapters) is widened a block of rows at a
    time, never whole: at most ``WIDEN_BLOCK_ELEMENTS`` elements and half of its rows. A ``QuantizedWeight`` goes
    through the backend's IA3 product with a scale of ones (decoded as the backend decodes, nothing kept)."""
    if not isinstance(weight, torch.Tensor):
        ones = torch.ones(a.shape[1], dtype=a.dtype, device=a.device)
        return get_backend(a, weight).ia3_forward(a.contiguous(), weight, None, ones, True)
    weight = weight.detach()
    if weight.dtype == a.dtype:
        return torch.mm(a, weight.t())
    N, K = weight.shape
    rows = max(1, min((N + 1) // 2, WIDEN_BLOCK_ELEMENTS // max(K, 1)))
    out = a.new_empty(a.shape[0], N)
    for start in range(0, N, rows):
        block = weight[start:start + rows].to(a.dtype)
        torch.mm(a, block.t(), out=out[:, start:start + rows])
    return out


def _lora_part(route, backend, x, weight, bias, A, B, s, p, seed, xd_a):
    """``(L, h)``: ``L = x W^T + bias + s drop(x) A^T B^T`` in ``x``'s dtype and ``h = drop(x_a) A^T`` in ``A``'s
    dtype; ``xd_a`` is ``drop(x)`` in ``A``'s dtype when ``p > 0`` (compose only)."""
    if route == "fused":
        y, xa = backend.lora_forward(x, weight, bias, [A], [B], [None], [s], [p], [seed])
        return y, xa[0]
    xin = xd_a if p > 0 else _cast(x, A.dtype)
    h = torch.mm(xin, A.detach().t())
    y = F.linear(x, weight.detach(), None if bias is None else bias.detach())
    y.addmm_(_cast(h, y.dtype), _cast(B.detach().t(), y.dtype), alpha=s)
    return y, h


def _forward(route, backend, x, weight, bias, A, B, scale, s, p, seed):
    """``(y, h, z)`` of the DoRA forward (module docstring) for 2-D ``x`` ``(M, K)``; ``scale`` fp32 ``(N,)``."""
    if p == 0:
        z, h = _lora_part(route, backend, x, weight, None, A, B, s, 0.0, 0, None)
        # One pass each, widened in the kernel (type promotion with the fp32 scale), rounded once by the caller.
        y = torch.mul(z, scale) if bias is None else torch.addcmul(bias.detach().to(_F32), z, scale)
        return _cast(y, x.dtype), h, z
    ks = keep_scale(backend, x.shape[0], x.shape[1], p, seed, x.device)
    xd_a = _dropped(_cast(x, A.dtype), ks)
    L, h = _lora_part(route, backend, x, weight, bias, A, B, s, p, seed, xd_a)
    del ks
    z = _base_product(xd_a, weight)  # the second base product, on drop(x)
    del xd_a
    z.addmm_(_cast(h, z.dtype), _cast(B.detach().t(), z.dtype), alpha=s)
    y = torch.addcmul(L, z, scale - 1.0)  # widened to fp32 in the kernel
    return _cast(y, x.dtype), h, z


# --------------------------------------------------------------------------------------------------- backward
def _backward_compose(backend, dy, x, weight, A, B, h, scale, s, p, seed, needs_dx, needs_dA):
    """``(dX, dA, dB)`` by vendor GEMMs (formulas: module docstring)."""
    g = _cast(torch.mul(dy, scale), dy.dtype)
    ga = _cast(g, B.dtype)
    gB = torch.mm(ga, B.detach()).mul_(s)
    dB = torch.mm(ga.t(), _cast(h, B.dtype)).mul_(s)
    ks = keep_scale(backend, dy.shape[0], weight.shape[1], p, seed, dy.device) if p > 0 and (needs_dx or needs_dA) \
        else None
    dA = None
    if needs_dA:
        xa = _cast(x, A.dtype)
        dA = torch.mm(gB.t(), xa if ks is None else _dropped(xa, ks))
    dx = None
    if needs_dx:
        W = weight.detach()
        if ks is None:
            dx = torch.mm(g, W).addmm_(_cast(gB, g.dtype), _cast(A.detach(), g.dtype))
        else:
            e = _cast(torch.mul(dy, scale - 1.0), dy.dtype)
            inner = torch.mm(e, W).to(_F32).addmm_(gB.to(_F32), A.detach().to(_F32))
            dx = _cast(torch.mm(dy, W).to(_F32).addcmul_(inner, ks), dy.dtype)
    return dx, dA, dB


def _backward_fused(backend, dy, x, weight, A, B, h, scale, s, p, seed, needs_dx, needs_dA):
    """``(dX, dA, dB)`` by the backend's LoRA backward on ``g = c * dY`` (its own measured route); with dropout,
    ``dX`` is then corrected from ``g W`` to ``dY W + e W * mask / (1 - p)``, i.e. ``+ (mask / (1 - p) - 1) * e W``."""
    g = _cast(torch.mul(dy, scale), dy.dtype)
    dx, dA, dB, _ = backend.lora_backward(g.contiguous(), x if needs_dA else None, weight, [A], [B], [h], [s], [p],
                                          [seed], needs_dx, needs_dA)
    if needs_dx and p > 0:
        e = _cast(torch.mul(dy, scale - 1.0), dy.dtype)
        ks = keep_scale(backend, dy.shape[0], weight.shape[1], p, seed, dy.device).sub_(1.0)
        dx = _cast(dx.to(_F32).addcmul_(_grad_product(backend, e, weight).to(_F32), ks), dy.dtype)
    return dx, dA[0], dB[0]


def _grad_product(backend, dy: torch.Tensor, weight) -> torch.Tensor:
    """``dY W`` ``(M, K)`` in ``dY``'s dtype; a ``QuantizedWeight`` through the backend's LoRA backward with a
    zero rank-1 adapter (its base product decodes the weight as the backend decodes; not every backend takes an
    empty adapter list)."""
    if isinstance(weight, torch.Tensor):
        return torch.mm(dy, weight.detach())
    zeros_a = torch.zeros(1, weight.shape[1], dtype=dy.dtype, device=dy.device)
    zeros_b = torch.zeros(weight.shape[0], 1, dtype=dy.dtype, device=dy.device)
    h = torch.zeros(dy.shape[0], 1, dtype=dy.dtype, device=dy.device)
    dx, _, _, _ = backend.lora_backward(dy.contiguous(), None, weight, [zeros_a], [zeros_b], [h], [0.0], [0.0], [0],
                                        True, False)
    return dx


_BACKWARDS = {"compose": _backward_compose, "fused": _backward_fused}


def _routes_for(weight) -> tuple[str, ...]:
    """``compose`` is torch's dense GEMMs: a ``QuantizedWeight`` runs ``fused`` (the backend decodes it)."""
    return ("compose", "fused") if isinstance(weight, torch.Tensor) else ("fused",)


def _route_key(op, backend, x, weight, A, p, grads=""):
    kind = "dense" if isinstance(weight, torch.Tensor) else weight.kind
    return routing.key_of_call(op, backend.name, kind, x, weight, [A], [p], grads)


def _unmeasured(backend) -> Optional[str]:
    """Under Triton's interpreter timings mean nothing: the fused route exercises the kernels."""
    return None if backend.timings_mean_something() else "fused"


class DoraLinearFunction(torch.autograd.Function):
    """DoRA forward/backward on 2-D ``x`` for a frozen base, dense or a ``QuantizedWeight`` (PEFT's set-up); formulas
    in the module docstring.

    Inputs that get gradients: ``x``, ``lora_A``, ``lora_B``, ``magnitude``. ``norm`` is fp32 ``(N,)`` and constant.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, magnitude, weight, bias, norm, scaling, dropout_p, seed):
        backend = get_backend(x, weight)
        scale = magnitude.detach().to(_F32) / norm
        candidates = {route: (lambda route=route: _forward(route, backend, x, weight, bias, lora_A, lora_B, scale,
                                                             scaling, dropout_p, seed))
                      for route in _routes_for(weight)}
        key = _route_key("dora_forward", backend, x, weight, lora_A, dropout_p)
        y, h, z = routing.run(key, candidates, x.device.type, unmeasured=_unmeasured(backend))
        _, needs_dA, _, needs_dm = ctx.needs_input_grad[:4]
        ctx.backend, ctx.weight = backend, weight
        ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        ctx.save_for_backward(x if needs_dA else None, lora_A, lora_B, h, z if needs_dm else None, scale, norm,
                              magnitude)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, A, B, h, z, scale, norm, magnitude = ctx.saved_tensors
        needs_dx, needs_dA, needs_dB, needs_dm = ctx.needs_input_grad[:4]
        backend = ctx.backend
        dy = grad_y.contiguous()
        dm = None
        if needs_dm:
            dm = (torch.mul(dy.to(_F32), z).sum(0) / norm).to(magnitude.dtype)
        dx = dA = dB = None
        if needs_dx or needs_dA or needs_dB:
            grads = ("dx" if needs_dx else "") + ("dA" if needs_dA else "")
            candidates = {route: (lambda fn=fn: fn(backend, dy, x, ctx.weight, A, B, h, scale, ctx.scaling,
                                                   ctx.dropout_p, ctx.seed, needs_dx, needs_dA))
                          for route, fn in _BACKWARDS.items() if route in _routes_for(ctx.weight)}
            key = _route_key("dora_backward", backend, dy, ctx.weight, A, ctx.dropout_p, grads)
            dx, dA, dB = routing.run(key, candidates, dy.device.type, unmeasured=_unmeasured(backend))
            dA = None if dA is None or not needs_dA else _cast(dA, A.dtype)
            dB = _cast(dB, B.dtype) if needs_dB else None
        return dx, dA, dB, dm, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------- public API
def check_tensors(where: str, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                  magnitude: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the module (``where``), the tensor and the problem for DoRA tensors that do not
    fit the ``(N, K)`` base weight: ``lora_A`` ``(r, K)``, ``lora_B`` ``(N, r)``, ``magnitude`` ``(N,)``."""
    N, K = weight.shape
    r = lora_A.shape[0] if lora_A.dim() == 2 else -1
    for name, tensor, expected in (("lora_A", lora_A, (r, K)), ("lora_B", lora_B, (N, r)),
                                   ("magnitude", magnitude, (N,))):
        if tuple(tensor.shape) != expected or r < 1:
            raise ValueError(f"fastpeft: module '{where}': DoRA tensor {name} has shape {tuple(tensor.shape)}, but a "
                             f"base weight of shape ({N}, {K}) with lora_A of rank {r} needs {expected}")
        if not tensor.is_floating_point():
            raise ValueError(f"fastpeft: module '{where}': DoRA tensor {name} has dtype {tensor.dtype}; it must be "
                             f"a floating-point tensor")


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float,
    training: bool,
    norm: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    where: str = "dora_linear",
) -> torch.Tensor:
    """PEFT's DoRA ``Linear`` forward (one adapter), without building ``W + s B A``.

    Args:
        x: ``(..., K)``, fp16/bf16/fp32, ``weight``'s dtype.
        weight: ``(N, K)`` dense tensor, any strides (a transposed view for ``fan_in_fan_out``).
        bias: ``(N,)`` or None.
        lora_A, lora_B, magnitude: ``(r, K)``, ``(N, r)``, ``(N,)``, any float dtype (PEFT keeps them in fp32 under
            a bf16 base by default); the adapter sees ``x`` cast to ``lora_A``'s dtype, as PEFT's does.
        scaling: ``lora_alpha / r`` (or ``/ sqrt(r)``); dropout_p: applied only when ``training``.
        norm: fp32 ``(N,)`` ``weight_norm(...)`` when the caller caches it (``DoraCache``), else computed here.
        scale: fp32 ``(N,)`` ``magnitude / norm`` when the caller caches it; used only where no gradient flows.
        where: the module's name, for error messages.
    Returns:
        ``(..., N)`` in ``x``'s dtype.
    """
    check_tensors(where, weight, lora_A, lora_B, magnitude)
    x2, lead = _flatten(x)
    p = float(dropout_p) if training else 0.0
    s = float(scaling)
    if norm is None:
        norm = weight_norm(weight, lora_A, lora_B, s)
    mode = _call_mode(weight, bias)
    seed = int(draw_seeds(1, [p], training)[0]) if p > 0 else 0
    if mode in ("custom_op", "reference") and p == 0:
        # A trainable base, or a graph being compiled: PEFT's formula in torch ops under autograd (traceable, and
        # still no W + s B A), the norm a constant as PEFT makes it.
        y = stacked_linear(x2, weight, bias, [(lora_A, lora_B, None, s, magnitude, norm)])
    elif mode in ("custom_op", "reference"):
        # The same with dropout: the executable spec, which regenerates the mask from the seed as the op does.
        y = reference.dora_linear(x2, weight, bias, lora_A, lora_B, magnitude, s, p, seed)
    elif mode == "inference":
        backend = get_backend(x2, weight)
        if scale is None:
            scale = magnitude.detach().to(_F32) / norm
        y = routing.run(_route_key("dora_forward", backend, x2, weight, lora_A, p),
                        {route: (lambda route=route: _forward(route, backend, x2, weight, bias, lora_A, lora_B, scale,
                                                                s, p, seed)[0])
                         for route in _routes_for(weight)},
                        x2.device.type, unmeasured=_unmeasured(backend))
    else:
        y = DoraLinearFunction.apply(x2, lora_A, lora_B, magnitude, weight, bias, norm, s, p, seed)
    return y if len(lead) == 1 else y.view(*lead, y.shape[-1])


# ------------------------------------------------------------------------------------------------ module layer
def _is_dora(variant) -> bool:
    from peft.tuners.lora.variants import DoraLinearVariant

    return isinstance(variant, DoraLinearVariant) or variant is DoraLinearVariant


def non_dora_variants(layer, names) -> list[str]:
    """The class names of the LoRA variants other than DoRA among adapters ``names`` of a PEFT LoRA layer."""
    variants = getattr(layer, "lora_variant", {})
    return sorted({type(variants[name]).__name__ for name in names if name in variants
                   and not _is_dora(variants[name])})


def unfused_variant_reason(layer, active, quantized: bool = False) -> Optional[str]:
    """Why a PEFT LoRA layer's LoRA variants keep its call on PEFT's own forward, or None when fastpeft serves it:
    fastpeft serves DoRA alone, or, over a dense base (``quantized`` False), beside other adapters when no dropout
    is active. (Autocast is decided per call: ``dora_call_ok``.)"""
    if not any(name in layer.lora_variant for name in active):
        return None
    other = non_dora_variants(layer, active)
    if other:
        return f"LoRA variant {', '.join(other)} is not fused"
    if len(active) > 1 and quantized:
        return "DoRA beside other active adapters over a quantized base is not fused"
    if len(active) > 1 and layer.training and any(_dropout_p(layer, name) > 0 for name in active):
        return "DoRA beside other active adapters with dropout in training is not fused"
    return None


def _dropout_p(layer, name: str) -> float:
    dropout = layer.lora_dropout[name]
    return float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0


def dora_call_ok(layer, weight, x) -> bool:
    """Whether the active DoRA adapters of ``layer`` can run fused for input ``x``: no autocast (PEFT's forward
    decides the dtypes there), and a dense base unless ``layer`` is a bitsandbytes twin (they pass the decoded
    ``QuantizedWeight``; PEFT's generic layer over such a base keeps its own forward)."""
    if torch.is_autocast_enabled(x.device.type):
        return False
    return isinstance(weight, torch.Tensor) or getattr(layer, "_fastpeft_bnb_twin", False)


def stacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], adapters) -> torch.Tensor:
    """PEFT's ``lora.Linear.forward`` over several active adapters, DoRA among them, with no dropout active, in torch
    ops differentiated by autograd: each DoRA adapter scales the sum so far (PEFT's ``base_result`` is the running
    result there) and its norm comes from ``weight_norm``, never from ``W + s B A``.

    ``x``: ``(..., K)``; ``weight``: ``(N, K)``; ``adapters``: in PEFT's order, ``(A (r, K), B (N, r), lora_bias (N,)
    or None, scaling, magnitude (N,) or None, norm fp32 (N,) or None)``, magnitude and norm None for plain LoRA.
    Returns ``(..., N)`` in the base output's dtype."""
    result = F.linear(x, weight, bias)
    out_dtype = result.dtype
    for xi, (A, B, lora_bias, s, magnitude, norm) in zip(reference.adapter_inputs(x, [a[0] for a in adapters]),
                                                         adapters):
        lora = F.linear(F.linear(xi.to(A.dtype), A), B, lora_bias)
        if magnitude is None:
            result = result + lora * s
            continue
        c = magnitude.to(_F32) / norm
        base_result = result if bias is None else result - bias
        result = result + (c - 1) * base_result + c * lora * s
    return result.to(out_dtype)


def layer_forward(layer, x: torch.Tensor, active: list, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  weight_param: torch.Tensor, where: str) -> torch.Tensor:
    """The forward of PEFT LoRA layer ``layer`` whose active adapters ``active`` include DoRA: ``dora_linear`` for a
    lone DoRA adapter, ``stacked_linear`` beside others. ``weight`` is the ``(N, K)`` view of the base layer's
    ``weight_param``; ``where`` names the layer in errors. The layer's ``DoraCache`` keeps the norms (and, with no
    gradient wanted for a magnitude, the lone adapter's scale) while the tensors they come from are unchanged."""
    if torch.compiler.is_compiling():
        # A graph being compiled computes the norms in the graph: the cache's stamps are Python-side state.
        cache = _UNCACHED
    else:
        cache = layer.__dict__.get("_fastpeft_dora_cache")
        if cache is None:
            cache = layer.__dict__["_fastpeft_dora_cache"] = DoraCache()
    if len(active) > 1:
        adapters = []
        for name in active:
            A, up = layer.lora_A[name].weight, layer.lora_B[name]
            magnitude = norm = None
            if name in layer.lora_variant:
                magnitude = layer.lora_magnitude_vector[name].weight
                check_tensors(where, weight, A, up.weight, magnitude)
                norm = cache.norm(name, weight_param, weight, A, up.weight, layer.scaling[name])
            adapters.append((A, up.weight, up.bias if layer.lora_bias[name] else None, layer.scaling[name],
                             magnitude, norm))
        return stacked_linear(x, weight, bias, adapters)
    name = active[0]
    A = layer.lora_A[name].weight
    B = layer.lora_B[name].weight
    magnitude = layer.lora_magnitude_vector[name].weight
    scaling = layer.scaling[name]
    # PEFT's rule: the dropped input (and a second base product) only for a real dropout module in training.
    p = _dropout_p(layer, name) if layer.training else 0.0
    check_tensors(where, weight, A, B, magnitude)
    norm = cache.norm(name, weight_param, weight, A, B, scaling)
    return dora_linear(x, weight, bias, A, B, magnitude, scaling, p, training=layer.training, norm=norm,
                       scale=cache.scale(name, magnitude, norm), where=where)


def clear_cache(layer) -> None:
    """Forget a layer's cached DoRA values (after merge/unmerge rewrote its base weight)."""
    cache = layer.__dict__.get("_fastpeft_dora_cache")
    if cache is not None:
        cache.clear()
