"""The Triton backend's half for quantized bases (``fastpeft.quant.QuantizedWeight``: nf4, fp4, int8).

``fastpeft.backends.triton`` delegates here when ``weight`` is a ``QuantizedWeight``. Signatures and semantics are
the contract's (``fastpeft.backends.base``). The two large products, ``X deq(W)^T`` in forward and ``dY deq(W)`` in
backward, run by one of two routes (``fastpeft.routing``), timed on a GPU like every route:

- ``fused``: ``fastpeft.kernels.quant_matmul`` dequantizes inside the K loop and the LoRA up-projection rides in its
  epilogue (``pre @ upre``), so ``y`` and ``dx`` are written once and a dense copy of the weight is never made.
- ``compose``: ``fastpeft.kernels.dequant`` decodes the weight once per call into a buffer of the activations' dtype
  that is reused by every call of that dtype and device (grown to the largest weight), then the vendor GEMM (cuBLAS)
  multiplies and the epilogue terms are added in fp32 and rounded once. It wins where the product is compute-bound.

The LoRA forward has a third route on a GPU, ``bnb_native``: bitsandbytes' own CUDA 4-bit product (its GEMV and
GEMM kernels, or its decode and cuBLAS, as it chooses per shape) for the base, the composition's adapter terms
after it. ``compose`` and ``bnb_native`` add the adapters as the dense composition does
(``fastpeft.backends.compose``); ``fused`` carries the up-projection in its epilogue.

Under Triton's interpreter, where timings mean nothing, ``fused`` runs unless a route is pinned. The rank-``r``
pieces are small torch matmuls in every route.

Dropout masks come from ``fastpeft._philox`` (the canonical mask), regenerated in backward from the seed.
"""

from __future__ import annotations

import functools
import sys
from typing import Optional

import torch

from ... import routing as routes
from ..._philox import dropout_keep_mask
from ...quant import QuantizedWeight
from ...reference import adapter_inputs
from .. import compose

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _kernels():
    from ...kernels import quant_matmul  # imported lazily: Triton is optional

    return quant_matmul


# Dropout on the low-rank path: on CUDA the Triton engineer's small kernels (``fastpeft.kernels.lora``) apply the
# Philox mask per tile, so no (M, K) mask or dropped copy of x is materialized; elsewhere (the interpreter) torch
# ops with ``fastpeft._philox``'s mask. None = decide by device; tests force True to check the kernel path.
USE_LORA_KERNELS: Optional[bool] = None


def _lora_kernels(x: torch.Tensor):
    """``fastpeft.kernels.lora`` when the dropout path should use it, else None."""
    use = USE_LORA_KERNELS if USE_LORA_KERNELS is not None else x.device.type == "cuda"
    if not use:
        return None
    try:
        from ...kernels import lora
    except Exception:  # the dense Triton kernels are optional here: fall back to torch ops
        return None
    return lora


def supports(x: torch.Tensor, weight) -> bool:
    """A ``QuantizedWeight`` on a CUDA device (or CPU tensors under ``TRITON_INTERPRET=1``), 2-D float ``x``."""
    if not isinstance(weight, QuantizedWeight) or x.dtype not in _FLOATS or x.dim() != 2:
        return False
    if weight.dtype not in _FLOATS or x.device != weight.device:
        return False
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and _kernels().interpreting()


# The routes of the quantized ops (fastpeft.routing.ROUTES): decode tile by tile inside the product, or once into a
# reused buffer for the vendor GEMM.
ROUTES = ("fused", "compose")
# The LoRA forward's routes: those, and bitsandbytes' CUDA product where it serves the call (``_bnb_serves``).
FORWARD_ROUTES = ROUTES + ("bnb_native",)
_buffers: dict = {}  # (device, dtype) -> flat buffer holding the latest decoded weight of that dtype


def _bnb_op(name: str):
    """``torch.ops.bitsandbytes.<name>`` where bitsandbytes is loaded (a weight that came from it has loaded it:
    nothing is imported here) and registers it, else None."""
    if sys.modules.get("bitsandbytes") is None or not hasattr(torch.ops.bitsandbytes, name):
        return None
    return getattr(torch.ops.bitsandbytes, name)


def decodes_in_one_rounding(weight_dtype: torch.dtype, dtype: torch.dtype) -> bool:
    """Whether decoding a 4-bit weight stored as ``weight_dtype`` straight into ``dtype`` (bitsandbytes' CUDA
    kernels: ``code * absmax`` in fp32, rounded once to ``dtype``) gives fastpeft's decoding, which rounds to the
    weight's dtype first and then to ``dtype``: where the two dtypes are one, or the weight's is fp32 (exact)."""
    return dtype == weight_dtype or weight_dtype == torch.float32


def _bnb_decoder(weight: QuantizedWeight, dtype: torch.dtype):
    """bitsandbytes' CUDA 4-bit decoder (``torch.ops.bitsandbytes.dequantize_4bit.out``) where it writes this
    weight's decoding bit for bit as fastpeft means it (``decodes_in_one_rounding``), else None. One launch from the
    host through torch's dispatcher, against a Triton launch's binding of every argument: at decode sizes on a GPU
    the launches are the cost."""
    if weight.kind == "int8" or not decodes_in_one_rounding(weight.dtype, dtype) or not weight.data.is_cuda:
        return None
    decode = _bnb_op("dequantize_4bit")
    return None if decode is None else decode.out


def dense_weight(weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """``deq(W)`` as an ``(N, K)`` view of the reused ``(device, dtype)`` buffer (grown when a larger weight comes),
    written by bitsandbytes' CUDA decoder where it decodes exactly as fastpeft does (``_bnb_decoder``), else by
    ``fastpeft.kernels.dequant``.

    The view is valid until the next call for the same device and dtype: the ops here use it at once, on the
    current stream, and never keep it."""
    N, K = weight.shape
    key = (weight.data.device, dtype)
    buf = _buffers.get(key)
    if buf is None or buf.numel() < N * K:
        buf = _buffers[key] = torch.empty(N * K, dtype=dtype, device=weight.data.device)
    out = buf[: N * K].view(N, K)
    decode = _bnb_decoder(weight, dtype)
    if decode is not None:
        absmax = weight.derived.get("absmax_f32")  # double quantization undone once per weight (exact, fp32)
        if absmax is None:
            absmax = weight.derived["absmax_f32"] = weight.absmax_float().contiguous()
        decode(weight.data, absmax, weight.blocksize, weight.kind, [N, K], dtype, out=out)
        return out
    from ...kernels import dequant

    return dequant.dequantize(weight, dtype, out=out)


def _product(route: str, a: torch.Tensor, weight: QuantizedWeight, *, transpose: bool = False, bias=None, vin=None,
             vout=None, pre=None, upre=None, out_dtype=None) -> torch.Tensor:
    """``fastpeft.kernels.quant_matmul.quant_matmul``'s product and epilogue (same arguments and meaning) by
    ``route``: that kernel (``"fused"``), or the decoded weight in the reused buffer times ``a`` by the vendor GEMM in
    ``a``'s dtype, the epilogue terms added in fp32 and the result rounded once (``"compose"``)."""
    if route == "fused":
        return _kernels().quant_matmul(a, weight, transpose=transpose, bias=bias, vin=vin, vout=vout, pre=pre,
                                       upre=upre, out_dtype=out_dtype)
    out_dtype = out_dtype or a.dtype
    if vin is not None:  # PEFT rounds (x * l) to l's dtype, then to x's dtype, before the base matmul
        a = (a.float() * vin.float()).to(vin.dtype).to(a.dtype)
    W = dense_weight(weight, a.dtype)
    base = a @ (W if transpose else W.t())
    if pre is None and bias is None and vout is None:
        return base if base.dtype == out_dtype else base.to(out_dtype)
    acc = base.float()
    if pre is not None:
        acc.addmm_(pre.float(), upre.float())
    if bias is not None:
        acc += bias.float()
    if vout is not None:  # PEFT: z = base(x) in x's dtype, then (z * l) cast back to z's dtype
        acc = acc.to(out_dtype).float() * vout.float()
    return acc.to(out_dtype)


def _routed(op: str, x: torch.Tensor, weight: QuantizedWeight, lora_A, dropout_p, grads: str, run,
            names=ROUTES):
    """``run(route)`` by the route ``fastpeft.routing`` takes for this call among ``names`` (``fused`` unmeasured off
    a GPU)."""
    key = routes.key_of_call(op, "triton", weight.kind, x, weight, lora_A, dropout_p, grads)
    return routes.run_named(key, names, run, x.device.type, unmeasured=None if x.is_cuda else "fused")


def _bnb_serves(x: torch.Tensor, weight: QuantizedWeight) -> bool:
    """Whether bitsandbytes' CUDA 4-bit product (``torch.ops.bitsandbytes.gemm_4bit``) computes this call's base
    product as fastpeft means it (``fastpeft.routing.ROUTE_LIMITS``): a 4-bit weight on a GPU that bitsandbytes
    decodes straight to x's dtype as fastpeft does (``decodes_in_one_rounding``), whole blocks per row,
    bitsandbytes' nested block of 256."""
    if (not x.is_cuda or weight.kind == "int8" or not decodes_in_one_rounding(weight.dtype, x.dtype)
            or weight.shape[1] % weight.blocksize):
        return False
    if weight.nested and weight.nested_blocksize != 256:
        return False
    return _bnb_op("gemm_4bit") is not None


def bnb_product(x: torch.Tensor, weight: QuantizedWeight, bias) -> torch.Tensor:
    """``x deq(W)^T + b`` ``(M, N)`` in x's dtype by bitsandbytes' CUDA 4-bit product, from the packed bytes as they
    are (where ``_bnb_serves``)."""
    extra = {}
    absmax = weight.absmax
    if weight.nested:
        offset = weight.derived.get("bnb_offset")
        if offset is None:
            offset = weight.derived["bnb_offset"] = torch.tensor(weight.nested_offset, dtype=torch.float32,
                                                                 device=weight.device)
        extra = dict(absmax_8bit=weight.absmax, absmax_code=weight.nested_code, absmax_offset=offset)
        absmax = weight.nested_absmax
    return _bnb_op("gemm_4bit").default(
        x, weight.data.view(-1, 1), list(weight.shape), absmax, weight.blocksize, weight.kind,
        bias=None if bias is None else bias.to(x.dtype), **extra)


def _keep_scale(seed: int, rows: int, cols: int, p: float, dtype, device) -> Optional[torch.Tensor]:
    if p <= 0:
        return None
    return dropout_keep_mask(seed, rows, cols, p, device=device).to(dtype) / (1.0 - p)


def _forward_routes(x: torch.Tensor, weight: QuantizedWeight) -> tuple:
    """The LoRA forward's routes for this call: ``FORWARD_ROUTES`` where bitsandbytes' product serves it."""
    return FORWARD_ROUTES if _bnb_serves(x, weight) else ROUTES


def lora_forward(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds):
    """``y = x deq(W)^T + b + sum_i s_i (drop_i(x_i) A_i^T B_i^T + b_i)`` and ``xa[i]`` (see the contract)."""
    return _routed("lora_forward", x, weight, lora_A, dropout_p, "", lambda route: _lora_forward(
        route, x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds), _forward_routes(x, weight))


def settled_forward(x, weight: QuantizedWeight, lora_A):
    """``(route, function, counted)`` of an evaluation call of ``lora_forward`` without dropout on ``x``, as
    ``Backend.settled_route`` says it, or None where the route is still to be measured (or off a GPU)."""
    if not x.is_cuda:
        return None
    zeros = [0.0] * len(lora_A)
    found = routes.settled_call(routes.key_of_call("lora_forward", "triton", weight.kind, x, weight, lora_A, zeros,
                                                   ""), _forward_routes(x, weight))
    if found is None:
        return None
    return found[0], functools.partial(_lora_forward, found[0]), found[1]


def _down(lk):
    """``compose.DownPass`` for the adapters of a quantized base: fastpeft's down-projection kernel (the mask drawn
    in registers) for an adapter with dropout where it runs, else torch (with ``fastpeft._philox``'s mask)."""

    def down(xi, A, p, seed):
        if p > 0 and lk is not None:
            return lk.down_proj(xi, A.t(), seed, p)
        xd = xi.to(A.dtype)
        keep = _keep_scale(seed, xd.shape[0], xd.shape[1], p, A.dtype, xd.device)
        return ((xd if keep is None else xd * keep) @ A.t()).float()

    return down


def _lora_forward(route, x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds):
    lk = _lora_kernels(x) if any(p > 0 for p in dropout_p) else None
    if route != "fused":
        # The base by the route's product, the adapters as the dense composition adds them (a copy of x widened
        # for fp32 adapters rather than one more kernel launch: at decode sizes the host's launches are the cost).
        y = bnb_product(x, weight, bias) if route == "bnb_native" else _product(route, x, weight, bias=bias)
        return compose.add_adapters(x, y, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds, _down(lk),
                                    widen_by_copy=True)
    xa, pre, upre = [], [], []
    extra_bias = None
    down = _down(lk)
    for xi, A, B, b, s, p, seed in zip(adapter_inputs(x, lora_A), lora_A, lora_B, lora_bias, scaling, dropout_p,
                                       seeds):
        h = compose.as_dtype(down(xi, A, float(p), int(seed)), A.dtype)
        xa.append(h)
        pre.append(h.float() * float(s))
        upre.append(B.t().float())
        if b is not None:
            term = b.float() * float(s)
            extra_bias = term if extra_bias is None else extra_bias + term
    fused_bias = bias
    if extra_bias is not None:
        fused_bias = extra_bias if bias is None else bias.float() + extra_bias
    if pre:
        pre_t = torch.cat(pre, dim=1)
        upre_t = torch.cat(upre, dim=0)
        # fp16/bf16 activations: the epilogue's (M, R) x (R, N) product runs in x's dtype on tensor cores
        if x.dtype != torch.float32:
            upre_t = upre_t.to(x.dtype)
        y = _product(route, x, weight, bias=fused_bias, pre=pre_t, upre=upre_t)
    else:
        y = _product(route, x, weight, bias=fused_bias)
    return y, xa


def lora_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x, needs_grad_A):
    """``(dx, dA, dB, dbias)``; ``dx = dY deq(W) + sum_i (g_i A_i) * mask_i / (1 - p_i)`` with ``g_i = s_i dY B_i``."""
    grads = routes.grads_key(needs_grad_x, needs_grad_A)
    return _routed("lora_backward", grad_y, weight, lora_A, dropout_p, grads, lambda route: _lora_backward(
        route, grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x, needs_grad_A))


def _lora_backward(route, grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x,
                   needs_grad_A):
    grad_A, grad_B, grad_bias = [], [], []
    pre, upre, dropped_terms = [], [], []
    lk = _lora_kernels(grad_y) if any(p > 0 for p in dropout_p) else None
    inputs = adapter_inputs(x, lora_A) if needs_grad_A else iter(())
    for A, B, h, s, p, seed in zip(lora_A, lora_B, xa, scaling, dropout_p, seeds):
        xi = next(inputs) if needs_grad_A else None  # the forward's input of this adapter (PEFT's cumulative cast)
        dy = grad_y.to(B.dtype)
        grad_B.append((dy.t() @ h) * s)
        grad_bias.append(dy.sum(0) * s)
        g = (dy @ B) * s
        if p > 0 and lk is not None:
            # the mask is regenerated per tile inside the kernels; nothing (M, K) is materialized for it
            if needs_grad_A:
                grad_A.append(lk.grad_a(g.float(), xi, A.dtype, int(seed), float(p)))
            else:
                grad_A.append(None)
            if needs_grad_x:
                dropped_terms.append((g.float().contiguous(), A, int(seed), float(p)))
            continue
        keep = _keep_scale(int(seed), g.shape[0], A.shape[1], float(p), A.dtype, g.device)
        if needs_grad_A:
            xd = xi.to(A.dtype)
            grad_A.append(g.t() @ (xd if keep is None else xd * keep))
        else:
            grad_A.append(None)
        if needs_grad_x:
            if keep is None:
                pre.append(g.float())
                upre.append(A.float())
            else:
                dropped_terms.append((g @ A) * keep)  # the mask is elementwise on (M, K): not an epilogue GEMM
    grad_x = None
    if needs_grad_x:
        if pre:
            upre_t = torch.cat(upre, dim=0)
            if grad_y.dtype != torch.float32:
                upre_t = upre_t.to(grad_y.dtype)
            out_dtype = torch.float32 if dropped_terms else grad_y.dtype
            grad_x = _product(route, grad_y, weight, transpose=True, pre=torch.cat(pre, dim=1), upre=upre_t,
                              out_dtype=out_dtype)
        else:
            grad_x = _product(route, grad_y, weight, transpose=True,
                              out_dtype=torch.float32 if dropped_terms else grad_y.dtype)
        if dropped_terms:
            for term in dropped_terms:
                if isinstance(term, tuple):  # (g, A, seed, p): grad_x += mask(g A) / (1 - p), in place
                    g32, A, seed, p = term
                    ones = torch.ones(A.shape[0], dtype=torch.float32, device=A.device)
                    lk.lowrank_update(grad_x, g32, A, ones, seed=seed, p=p, out=grad_x)
                else:
                    grad_x = grad_x + term.float()
            grad_x = grad_x.to(grad_y.dtype)
    return grad_x, grad_A, grad_B, grad_bias


def ia3_forward(x, weight, bias, scale, is_feedforward):
    """Feedforward: ``((x * l).to(x.dtype)) deq(W)^T + b``; else ``((x deq(W)^T + b) * l).to(x.dtype)``."""
    def run(route):
        if is_feedforward:
            return _product(route, x, weight, bias=bias, vin=scale)
        return _product(route, x, weight, bias=bias, vout=scale)

    return _routed("ia3_forward", x, weight, [], [], "ff" if is_feedforward else "out", run)


def ia3_backward(grad_y, x, weight, bias, scale, is_feedforward, needs_grad_x):
    """``(dx, dscale)``; formulas in ``fastpeft.functional``. The non-feedforward ``z = x deq(W)^T + b`` is
    recomputed by the base product rather than saved."""
    def run(route):
        if is_feedforward:
            grad_scaled = _product(route, grad_y, weight, transpose=True)  # (M, K): gradient reaching (x * l)
            grad_scale = (grad_scaled.to(scale.dtype) * x.to(scale.dtype)).sum(0)
            grad_x = (grad_scaled.to(scale.dtype) * scale).to(x.dtype) if needs_grad_x else None
            return grad_x, grad_scale
        z = _product(route, x, weight, bias=bias)
        grad_scale = (grad_y.to(scale.dtype) * z.to(scale.dtype)).sum(0)
        grad_x = None
        if needs_grad_x:
            grad_x = _product(route, (grad_y.to(scale.dtype) * scale).to(x.dtype), weight, transpose=True)
        return grad_x, grad_scale

    grads = ("ff" if is_feedforward else "out") + ("+dx" if needs_grad_x else "")
    return _routed("ia3_backward", grad_y, weight, [], [], grads, run)
