"""The plain composition of LoRA: the ``compose`` route that every backend offers, and fastpeft's floor.

The base product is the vendor GEMM's (the caller computes it: torch on the CPU, cuBLAS on a GPU); the adapter
terms are written here once, in torch, with two device-specific passes handed in by the backend for what torch
cannot do without a copy of ``x`` or a stored mask:

- ``down(x, A, p, seed)``: ``drop(x) A^T`` as fp32 ``(M, r)``, the dropout mask regenerated from ``seed``
  (``fastpeft._philox``) and ``x`` widened in registers (``x`` may be narrower than ``A``);
- ``masked(acc, x, A, g, p, seed)``: ``acc += (g A) * mask / (1 - p)`` in place (``acc`` ``(M, K)`` or None) and
  ``g^T drop(x)`` as fp32 ``(r, K)`` (None when ``x`` is None); ``g`` fp32 ``(M, r)``.

Semantics are the reference's (``fastpeft.reference``): adapter ``i`` sees ``x`` cast cumulatively to
``lora_A[i].dtype`` (PEFT's in-place cast), its products run in that dtype, several adapters are summed in fp32
and added to ``y`` with one rounding, and every gradient comes back in its parameter's dtype.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..reference import adapter_inputs

_F32 = torch.float32

DownPass = Callable[[torch.Tensor, torch.Tensor, float, int], torch.Tensor]
MaskedPass = Callable[[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor, torch.Tensor, float, int],
                      Optional[torch.Tensor]]


def lossless(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether casting ``src`` to ``dst`` is exact, so a pass may widen ``src`` in registers instead."""
    return src == dst or dst == _F32


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call where it is already ``dtype`` (a no-op ``.to`` still costs a dispatch: these
    functions run per layer call, and on a GPU at decode sizes the host's dispatches are the whole cost)."""
    return t if t.dtype == dtype else t.to(dtype)


_zeros: dict = {}  # (device, dtype) -> a 0-dim zero, the ignored input of a beta=0 addmm


def scaled_mm(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """``s * (a @ b)`` as one vendor GEMM call (``addmm`` with ``beta=0`` and ``alpha=s``; its input, a 0-dim zero, is
    never read): ``mm`` then ``mul_`` is two dispatches, and on a GPU at decode sizes each costs as much as the
    arithmetic."""
    key = (a.device, a.dtype)
    zero = _zeros.get(key)
    if zero is None:
        with torch.inference_mode(False):  # kept across calls: never an inference tensor
            zero = _zeros[key] = torch.zeros((), dtype=a.dtype, device=a.device)
    return torch.addmm(zero, a, b, beta=0, alpha=s)


def add_adapters(x, y, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds, down: DownPass,
                 widen_by_copy: bool = False):
    """``y += sum_i s_i (drop_i(x_i) A_i^T B_i^T + b_i)`` on the base output ``y`` (``(M, N)`` in ``x``'s dtype):
    ``x A^T`` by torch in the adapter's dtype (by ``down`` with dropout; where ``x`` is narrower than the adapter, by
    ``down`` too, no copy of ``x``, unless ``widen_by_copy``: then torch widens a copy, one vendor call instead of
    the pass's launch), the update by ``addmm_`` in ``y``'s dtype (several adapters: summed in fp32, ``y`` rounded
    once). Returns ``(y, xa)`` with ``xa[i]`` ``(M, r_i)`` in ``A_i``'s dtype. Records no autograd (the backends'
    contract): the operands are not detached."""
    xa_out, terms = [], []
    for xi, A, B, b, s, p, seed in zip(adapter_inputs(x, lora_A), lora_A, lora_B, lora_bias, scaling, dropout_p,
                                       seeds):
        if p == 0 and (xi.dtype == A.dtype or widen_by_copy):
            xa = torch.mm(as_dtype(xi, A.dtype), A.t())
        else:
            xa = as_dtype(down(xi, A, float(p), int(seed)), A.dtype)
        xa_out.append(xa)
        terms.append((xa, B, b, float(s)))
    if len(terms) == 1:
        xa, B, b, s = terms[0]
        y.addmm_(as_dtype(xa, y.dtype), as_dtype(B.t(), y.dtype), alpha=s)
        if b is not None:
            y.add_(as_dtype(b, y.dtype), alpha=s)
    elif terms:
        # One rounding of y for all adapters, as the reference sums them before its single cast.
        xs = torch.cat([(xa.to(_F32) * s) for xa, _, _, s in terms], 1)
        bt = torch.cat([B.t().to(_F32) for _, B, _, _ in terms], 0)
        update = torch.mm(xs, bt)
        for _, _, b, s in terms:
            if b is not None:
                update.add_(b.to(_F32), alpha=s)
        y = y.add_(update) if y.dtype == _F32 else (y.to(_F32) + update).to(y.dtype)
    return y, xa_out


def backward(dy, x, grad_x, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_A, masked: MaskedPass,
             widen_by_copy: bool = False, needs_grad_bias: bool = True):
    """The adapters' part of LoRA's backward around the base product ``grad_x = dY W`` (or None when ``dX`` is
    not wanted): ``g_i = s_i dY B_i``, ``dB_i = s_i dY^T h_i`` and ``db_i = s_i sum_m dY`` by torch in the
    adapter's dtype; ``dX += (g_i A_i) * mask_i`` and ``dA_i = g_i^T drop_i(x)`` by torch without dropout, by
    ``masked`` with it (or where ``x`` is narrower than ``A``, unless ``widen_by_copy``: then torch widens a copy of
    ``x`` for ``dA``, as in :func:`add_adapters`). Returns ``(dX, dA, dB, db)``; ``db_i`` None unless
    ``needs_grad_bias``."""
    acc = grad_x
    if grad_x is not None and len(lora_A) > 1 and grad_x.dtype != _F32:
        acc = grad_x.float()  # several adapters: carried in fp32 like the reference, rounded once
    widened: dict[torch.dtype, torch.Tensor] = {}
    grad_A: list[Optional[torch.Tensor]] = []
    grad_B, grad_bias = [], []
    inputs = adapter_inputs(x, lora_A) if needs_grad_A else iter(())
    for A, B, h, s, p, seed in zip(lora_A, lora_B, xa, scaling, dropout_p, seeds):
        if dy.dtype == B.dtype:
            d = dy
        else:
            d = widened.get(B.dtype)
            if d is None:
                d = widened[B.dtype] = dy.to(B.dtype)
        s = float(s)
        g = scaled_mm(d, B, s)
        # (h^T dY)^T: the products of dY^T h in the layout torch's autograd computes the composition's dB in, where
        # the vendor GEMM has r output rows rather than r output columns (BENCHMARKS.md times both). A transposed
        # view.
        grad_B.append(scaled_mm(as_dtype(h, B.dtype).t(), d, s).t())
        grad_bias.append(d.sum(0).mul_(s) if needs_grad_bias else None)
        xi = next(inputs) if needs_grad_A else None
        if p == 0:
            if acc is not None:
                acc.addmm_(as_dtype(g, acc.dtype), as_dtype(A, acc.dtype))
            if xi is None:
                grad_A.append(None)
            elif xi.dtype == A.dtype or widen_by_copy:
                grad_A.append(torch.mm(as_dtype(g, A.dtype).t(), as_dtype(xi, A.dtype)))
            else:  # x narrower than A: widened in registers by the pass, no copy of x
                grad_A.append(as_dtype(masked(None, xi, A, as_dtype(g, _F32), 0.0, 0), A.dtype))
            continue
        dA = masked(acc, xi, A, as_dtype(g, _F32), float(p), int(seed))
        grad_A.append(as_dtype(dA, A.dtype) if xi is not None else None)
    if acc is not None and acc is not grad_x:
        grad_x = acc.to(grad_x.dtype)
    return grad_x, grad_A, grad_B, grad_bias
