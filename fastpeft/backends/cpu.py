"""The ``cpu`` backend: torch's own GEMM for the base matmul, the compiled extension ``fastpeft._C`` for the rest.

PEFT adds several full passes over the activations around the base GEMM (materialise ``drop(x)`` and its mask, cast
``x`` to the adapter dtype, a second ``(M, N)`` result and an add). Here each adapter costs one sweep over ``x``
(forward), one in-place sweep over ``y``, and in backward one sweep over ``dY`` and one over ``x``/``dX``; the
Philox dropout mask (``fastpeft._philox``) is regenerated on the fly inside those sweeps and never stored.

Forward, per adapter ``i`` (``x_i`` = ``x`` cast to ``A_i``'s dtype, cumulatively, as PEFT does)::

    y    = x W^T + bias                                  (torch: oneDNN / MKL)
    xa_i = drop_i(x_i) A_i^T                             (_C.lora_xa: one pass over x, fp32 accumulation)
    y   += sum_i s_i (xa_i B_i^T + b_i)                  (_C.lora_epilogue_: in place, rounded once)

Backward (``g_i = s_i dY B_i``)::

    g, dB, db = one pass over dY                         (_C.lora_dy_pass)
    dX  = dY W                                           (torch)
    dX += (g_i A_i) * mask_i / (1 - p_i);  dA_i = g_i^T drop_i(x)   (_C.lora_dx_pass: one pass over x and dX)

Quantized bases (``fastpeft.quant.QuantizedWeight``: bitsandbytes NF4/FP4 with or without double quantization,
int8) never exist as a whole dense matrix: ``_C.quant_linear`` decodes ~1 MB tiles of weight rows into a
cache-resident fp32 buffer and hands each to torch's GEMM (the tile's LoRA term added while it is hot), or, for
M <= 16, runs a decoding GEMV that dequantizes one row into L1 and dots it with every activation row, the LoRA
up-projection and biases added in the same pass. ``dX = dY W`` goes tile by tile the same way (``_C.quant_grad_x``).
Decoded values are bit-equal to bitsandbytes' dequantization, rounded to the weight's dtype and then ``x``'s,
as the reference does.

Decoding shapes (M <= ``CpuBackend.GEMV_MAX_M`` = 16) with a dense weight of unit column stride use the same
one-pass GEMV (``_C.dense_lora_gemv``: each weight row read once, bf16/fp16 rows widened in registers, the LoRA
term fused): torch's own ``x W^T`` at M = 2..16 costs 1.1-2.7x more than the GEMV with the adapter on this CPU.
The fp32 single-adapter backward there is one call (``_C.lora_small_backward``), as each torch call from Python
costs microseconds that add up to more than the adapter's arithmetic.

Adapter matrices are converted to contiguous fp32 (they are ``r x K``: tiny); activations stay in their dtype and
are widened in registers. All accumulation is fp32.

Base GEMMs in bf16/fp16 on a CPU without native low-precision GEMM (no AVX512-BF16/AMX): torch's kernels there are
far slower than its fp32 GEMM (measured on the 2-core AVX2 EPYC these numbers come from, 1 thread, 2048x2048:
``x @ W^T`` at M=512 422 ms in bf16 vs 56 ms widened to fp32, conversions included; ``dY @ W`` 300x slower in bf16),
so the backend widens ``x``/``dY`` and ``W`` to fp32 for the GEMM (transient copies, nothing saved) and rounds the
result once, after the adapter terms are added: one rounding where the reference has two. Forward shapes below
M = 3 that miss the one-pass GEMV (a transposed ``fan_in_fan_out`` weight) keep torch's low-precision GEMV, which is
cheaper than widening ``W``. ``FASTPEFT_CPU_LOWP_GEMM`` = ``native`` / ``fp32`` overrides the choice.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..quant import QuantizedWeight
from .base import Backend

try:
    from .. import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # the extension is optional: report why, never fail the import
    _C = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def _apply_isa_request(requested: str) -> Optional[str]:
    """Force the extension's SIMD path from ``FASTPEFT_CPU_ISA`` (``generic``, ``avx2``, ``avx512``; ``auto`` or unset:
    chosen from cpuid). Returns why the backend is unavailable when the request cannot be honoured, else None; a bad
    request never silently falls back to another path."""
    if _C is None or requested in ("", "auto"):
        return None
    try:
        _C.set_isa(requested)  # the extension knows the names and checks the CPU
    except RuntimeError as exc:
        return f"FASTPEFT_CPU_ISA={requested!r}: {exc}; this CPU runs {', '.join(_C.supported_isas())}"
    return None


_ISA_ERROR = _apply_isa_request(os.environ.get("FASTPEFT_CPU_ISA", "auto").strip().lower())

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _f32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as contiguous fp32 for the kernels, which only read its data (contiguous fp32 tensors pass as they are:
    each torch call costs microseconds, which add up at decode sizes)."""
    if t.dtype == torch.float32 and t.is_contiguous():
        return t
    return t.detach().to(torch.float32).contiguous()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit-stride rows (the kernels take any row stride, so slices of a wider buffer are not copied)."""
    if t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] <= 1):
        return t
    return t.contiguous()


_FP32_ROUTE_MIN_M = 3  # forward rows from which widening W to fp32 beats torch's low-precision GEMV (measured)


def _fp32_gemm(dtype: torch.dtype, rows: int, backward: bool) -> bool:
    """Whether to run a base GEMM with ``rows`` activation rows of ``dtype`` in fp32 (see the module docstring)."""
    if dtype == torch.float32:
        return False
    mode = os.environ.get("FASTPEFT_CPU_LOWP_GEMM", "auto").strip().lower()
    if mode == "native":
        return False
    if mode != "fp32" and _C.native_lowp_gemm("bf16" if dtype == torch.bfloat16 else "fp16"):
        return False
    return mode == "fp32" or backward or rows >= _FP32_ROUTE_MIN_M


_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # csrc/cpu/kernels.h: DType


def _quant_args(weight: QuantizedWeight, dtype: torch.dtype) -> tuple:
    """The tuple ``_C.quant_*`` take for ``weight`` (csrc/cpu/ops.cpp: parse_quant), dequantizing to
    ``weight.dtype`` and then ``dtype`` as the reference's ``dequantize().to(dtype)`` does. No tensor is copied
    (bitsandbytes' storage is contiguous)."""
    N, K = weight.shape
    if weight.kind == "int8":
        return (1, N, K, weight.data.contiguous(), weight.absmax.float().contiguous(), None, None, 0.0, 0, 0, None,
                0, _DTYPE_CODES[dtype])
    nested = weight.nested
    return (0, N, K, weight.data.reshape(-1).contiguous(), weight.absmax.contiguous(),
            weight.nested_absmax.float().contiguous() if nested else None,
            weight.nested_code.float().contiguous() if nested else None,
            float(weight.nested_offset), int(weight.nested_blocksize), int(weight.blocksize),
            weight.code.float().contiguous(), _DTYPE_CODES[weight.dtype], _DTYPE_CODES[dtype])


def _lossless(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether casting ``src`` to ``dst`` is exact, so the kernels may widen ``src`` in registers instead."""
    return src == dst or dst == torch.float32


class CpuBackend(Backend):
    name = "cpu"

    def availability(self):
        if _C is None:
            return False, (
                f"the C++ extension fastpeft._C is not built ({_IMPORT_ERROR}); build with "
                "pip install --no-build-isolation -e . or unset FASTPEFT_SKIP_CPU_BUILD"
            )
        if _ISA_ERROR is not None:
            return False, _ISA_ERROR
        return True, ""

    def isa(self) -> str:
        """The SIMD code path the extension runs (``avx512``, ``avx2`` or ``generic``): chosen from cpuid unless
        ``FASTPEFT_CPU_ISA`` forces one."""
        return _C.isa() if _C is not None else "unavailable"

    def supports(self, x, weight):
        if x.device.type != "cpu" or x.dtype not in _FLOATS:
            return False
        if isinstance(weight, torch.Tensor):
            return weight.device.type == "cpu" and weight.layout == torch.strided and weight.dtype in _FLOATS
        # A QuantizedWeight (fastpeft.quant): dequantized inside the products by _C.quant_*.
        return getattr(weight, "device", None) is not None and weight.device.type == "cpu"

    # ----------------------------------------------------------------------------------------------------- LoRA
    def lora_forward(self, x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds):
        if isinstance(weight, QuantizedWeight) or (x.shape[0] <= self.GEMV_MAX_M and weight.stride(-1) == 1):
            return self._one_pass_forward(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds)
        y = _torch_product(x, weight, bias)
        wide = y.dtype != x.dtype  # widened to fp32: rounded once, after the adapter terms
        if not lora_A:
            return (y.to(x.dtype) if wide else y), []
        if y.dtype == torch.float32 and all(A.dtype == B.dtype == torch.float32 for A, B in zip(lora_A, lora_B)):
            xa = self._fp32_update(x, y, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds)
            return (y.to(x.dtype) if wide else y), xa
        xa_out, xs, B32, bias_sum, _ = self._down_projections(x, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds)
        bt = torch.cat([B.t() for B in B32], 0).contiguous()
        y = _rows(y)
        _C.lora_epilogue_(y, xs, bt, None if bias_sum is None else bias_sum.contiguous())
        return (y.to(x.dtype) if wide else y), xa_out

    @staticmethod
    def _down_projections(x, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds, fold_single_scale=False):
        """Every adapter's ``xa_i = drop_i(x_i) A_i^T`` (in ``A_i``'s dtype, returned for backward) and what the
        output needs from them: ``xs`` = the scaled ``xa_i`` side by side (M, R) fp32, the ``B_i`` as fp32
        ``(N, r_i)``, ``sum_i s_i b_i`` (fp32, or None) and the factor still to apply to ``xs B^T``: 1, or with
        ``fold_single_scale`` and one adapter its scaling, left unapplied for the kernel (one torch call less)."""
        xa_out, xs_cols, B32 = [], [], []
        bias_sum = None
        xi = x
        fold = fold_single_scale and len(lora_A) == 1
        for A, B, b, s, p, seed in zip(lora_A, lora_B, lora_bias, scaling, dropout_p, seeds):
            if not _lossless(xi.dtype, A.dtype):
                xi = xi.to(A.dtype)  # a narrowing step of PEFT's cumulative cast: rounding must happen as there
            xa32 = _C.lora_xa(_rows(xi), _f32(A), float(p), int(seed))
            xa_out.append(xa32 if A.dtype == torch.float32 else xa32.to(A.dtype))
            xs_cols.append(xa32 * float(s) if (s != 1 and not fold) else xa32)
            B32.append(B if B.dtype == torch.float32 else B.detach().to(torch.float32))
            if b is not None:
                term = b.detach().to(torch.float32) * float(s)
                bias_sum = term if bias_sum is None else bias_sum + term
        xs = xs_cols[0].contiguous() if len(xs_cols) == 1 else torch.cat(xs_cols, 1)
        return xa_out, xs, B32, bias_sum, (float(scaling[0]) if fold else 1.0)

    # Rows up to which the forward runs the one-pass GEMV (weight rows decoded or read once, dotted with every
    # activation row, LoRA term fused) rather than a GEMM. Measured at 2048x2048, 2 threads, fp32: the dense GEMV
    # with the adapter beats torch's x W^T alone at every M <= 16 (M=1 0.32 vs 0.49 ms, M=4 0.85 vs 2.07 ms,
    # M=16 2.16 vs 2.38 ms); for nf4 M=16 the GEMV took 2.9 ms, dequantized tiles + GEMM 3.5 ms.
    GEMV_MAX_M = 16

    def _one_pass_forward(self, x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds):
        """The base product and the adapters' up-projections and biases in one C++ call (``_one_pass``), fp32
        throughout, rounded once to ``x``'s dtype."""
        total_bias = None if bias is None else bias.detach().to(x.dtype).float()  # the reference adds it in x's dtype
        xs = B = None
        xa_out = []
        lora_scale = 1.0
        if lora_A:
            xa_out, xs, B32, bias_sum, lora_scale = self._down_projections(
                x, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds, fold_single_scale=True)
            B = (B32[0] if len(B32) == 1 else torch.cat(B32, 1)).contiguous()
            if bias_sum is not None:
                total_bias = bias_sum if total_bias is None else total_bias + bias_sum
        return self._one_pass(x, weight, total_bias, xs, B, lora_scale).to(x.dtype), xa_out

    def _one_pass(self, x, weight, bias32, xs, B, lora_scale):
        """``x W^T + bias32 + lora_scale xs B^T`` in fp32 by one C++ call: ``_C.quant_linear`` for a bitsandbytes
        base (dequantized inside the product, never whole), ``_C.dense_lora_gemv`` for a dense weight at
        decode-sized M. ``bias32``, ``xs``, ``B``: fp32 or None."""
        x32 = x if (x.dtype == torch.float32 and x.is_contiguous()) else x.float().contiguous()
        bias32 = None if bias32 is None else bias32.contiguous()
        if isinstance(weight, QuantizedWeight):
            return _C.quant_linear(x32, _quant_args(weight, x.dtype), bias32, xs, B, lora_scale, self.GEMV_MAX_M, 0)
        return _C.dense_lora_gemv(x32, weight if weight.dtype == x.dtype else weight.detach().to(x.dtype), bias32,
                                  xs, B, lora_scale)

    @staticmethod
    def _fp32_update(x, y, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds):
        """fp32 output and fp32 adapters: ``y += s (xa B^T + b)`` in place by BLAS, which reads ``B`` transposed
        where it lies (no per-call copy of ``B^T``, which cost as much as the whole update at decode sizes)."""
        xa_out = []
        xi = x
        for A, B, b, s, p, seed in zip(lora_A, lora_B, lora_bias, scaling, dropout_p, seeds):
            xi = xi.to(A.dtype)
            xa32 = _C.lora_xa(_rows(xi), A.detach().contiguous(), float(p), int(seed))
            xa_out.append(xa32)
            y.addmm_(xa32, B.detach().t(), alpha=float(s))
            if b is not None:
                y.add_(b.detach(), alpha=float(s))
        return xa_out

    # Below this many rows the one-pass dY kernel saves nothing, and the per-call copies it needs (B^T, the
    # concatenated xa and scales) cost more than BLAS reading the small operands where they lie.
    SMALL_M = 16

    def _small_fp32_backward(self, dy, x, W, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x,
                             needs_grad_A):
        """fp32 ``dY`` and adapters, M <= SMALL_M: rank-r products by BLAS, the masked ``dX``/``dA`` pass in C++."""
        if len(lora_A) == 1 and lora_A[0].is_contiguous():
            dx, dA, dB, db = _C.lora_small_backward(dy, W, x if needs_grad_A else None, lora_A[0], lora_B[0], xa[0],
                                                    float(scaling[0]), float(dropout_p[0]), int(seeds[0]),
                                                    needs_grad_x)
            return (dx if needs_grad_x else None), [dA if needs_grad_A else None], [dB], [db]
        acc = torch.mm(dy, W) if needs_grad_x else None
        colsum = dy.sum(0)
        grad_A, grad_B, grad_bias = [], [], []
        # No .detach(): backward runs without grad mode, and the kernels only read data.
        for A, B, h, s, p, seed in zip(lora_A, lora_B, xa, scaling, dropout_p, seeds):
            g = torch.mm(dy, B).mul_(float(s))
            grad_B.append(torch.mm(dy.t(), h).mul_(float(s)))
            grad_bias.append(colsum * float(s))
            if p == 0:  # no mask to regenerate: two rank-r BLAS products beat the pass (M=16: 0.05 vs 0.15 ms)
                if acc is not None:
                    acc.addmm_(g, A)
                grad_A.append(torch.mm(g.t(), x) if needs_grad_A else None)
                continue
            xi = _rows(x) if needs_grad_A else None
            dA = _C.lora_dx_pass(acc, xi, _f32(A), g, float(p), int(seed))
            grad_A.append(dA if needs_grad_A else None)
        return acc, grad_A, grad_B, grad_bias

    def lora_backward(
        self, grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x, needs_grad_A
    ):
        if (not isinstance(weight, QuantizedWeight) and grad_y.shape[0] <= self.SMALL_M
                and grad_y.dtype == weight.dtype == torch.float32
                and all(A.dtype == B.dtype == torch.float32 for A, B in zip(lora_A, lora_B))):
            return self._small_fp32_backward(_rows(grad_y), x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds,
                                             needs_grad_x, needs_grad_A)
        dy = _rows(grad_y)
        ranks = [A.shape[0] for A in lora_A]
        bt = torch.cat([B.detach().t().to(torch.float32) for B in lora_B], 0).contiguous()
        xa32 = torch.cat([h.detach().to(torch.float32) for h in xa], 1).contiguous()
        svec = torch.cat([torch.full((r,), float(s), dtype=torch.float32) for r, s in zip(ranks, scaling)])
        g, db, colsum = _C.lora_dy_pass(dy, bt, xa32, svec, True, True)

        grad_x = None
        acc = None
        if needs_grad_x:
            product = _dy_times_w(dy, weight)
            if product.dtype != dy.dtype:  # fp32 product of a low-precision dY: carried, rounded once at the end
                acc = product
                grad_x = torch.empty(0, dtype=dy.dtype)  # only its dtype is used below
            else:
                grad_x = product
                # Several adapters in low precision: carry dX in fp32 like the reference, round once at the end.
                acc = grad_x.float() if (len(lora_A) > 1 and grad_x.dtype != torch.float32) else grad_x
        grad_A: list[Optional[torch.Tensor]] = []
        grad_B: list[torch.Tensor] = []
        grad_bias: list[torch.Tensor] = []
        off = 0
        for A, B, r, s, p, seed in zip(lora_A, lora_B, ranks, scaling, dropout_p, seeds):
            grad_B.append((db if len(ranks) == 1 else db[:, off : off + r].contiguous()).to(B.dtype))
            grad_bias.append((colsum * float(s)).to(B.dtype))
            xi = None
            if needs_grad_A:
                xi = _rows(x if _lossless(x.dtype, A.dtype) else x.to(A.dtype))
            if needs_grad_x or needs_grad_A:
                dA = _C.lora_dx_pass(acc, xi, _f32(A), g[:, off : off + r], float(p), int(seed))
            grad_A.append(dA.to(A.dtype) if needs_grad_A else None)
            off += r
        if acc is not None and acc is not grad_x:
            grad_x = acc.to(grad_x.dtype)
        return grad_x, grad_A, grad_B, grad_bias

    # ------------------------------------------------------------------------------------------------------ IA3
    def _base_product(self, x, weight, bias):
        """``x W^T + b`` in ``x``'s dtype, by the fastest route here: the one-pass call at M <= GEMV_MAX_M or for a
        bitsandbytes base, else torch's GEMM (widened for bf16/fp16 without native support, rounded once). The bias
        is rounded to ``x``'s dtype first, as the reference adds it."""
        if isinstance(weight, QuantizedWeight) or (x.shape[0] <= self.GEMV_MAX_M and weight.stride(-1) == 1):
            b32 = None if bias is None else bias.detach().to(x.dtype).float()
            return self._one_pass(x, weight, b32, None, None, 1.0).to(x.dtype)
        return _torch_product(x, weight, bias).to(x.dtype)

    def ia3_forward(self, x, weight, bias, scale, is_feedforward):
        if is_feedforward:
            return self._base_product((x.to(scale.dtype) * scale).to(x.dtype), weight, bias)
        # In place: torch computes z * scale in the promoted dtype and rounds into z, the reference's
        # (z * scale).to(z.dtype) without a second (M, N) tensor (no autograd here: nothing keeps z).
        return self._base_product(x, weight, bias).mul_(scale)

    # A second GEMM costs a whole forward on a CPU: keep z = x W^T + b for backward (base.Backend).
    ia3_keeps_base_output = True

    def ia3_forward_keep_base(self, x, weight, bias, scale):
        """Output scaling: ``(y, z)`` with ``z = x W^T + b`` in ``x``'s dtype and ``y = (z * scale).to(z.dtype)``."""
        z = self._base_product(x, weight, bias)
        return (z * scale).to(z.dtype), z

    def ia3_backward_from_base(self, grad_y, z, weight, scale, needs_grad_x):
        """The reference's output-scaling backward with the saved ``z``: ``dscale = sum_m dY * z`` and
        ``dX = ((dY * scale) in z's dtype) W``."""
        grad_scale = (grad_y.to(scale.dtype) * z.to(scale.dtype)).sum(0)
        grad_x = None
        if needs_grad_x:
            grad_x = _dy_times_w((grad_y.to(scale.dtype) * scale).to(z.dtype), weight).to(z.dtype)
        return grad_x, grad_scale

    def ia3_backward(self, grad_y, x, weight, bias, scale, is_feedforward, needs_grad_x):
        """The reference's formulas (``ReferenceBackend.ia3_backward``) with this backend's products: no dense
        weight is built for a bitsandbytes base. Output scaling gets here only from the custom op (torch.compile),
        which saves ``x``: ``z`` is recomputed."""
        if not is_feedforward:
            return self.ia3_backward_from_base(grad_y, self._base_product(x, weight, bias), weight, scale,
                                               needs_grad_x)
        grad_scaled = _dy_times_w(grad_y, weight).to(x.dtype)  # (M, K), the gradient reaching x * l
        grad_scale = (grad_scaled.to(scale.dtype) * x.to(scale.dtype)).sum(0)
        grad_x = (grad_scaled.to(scale.dtype) * scale).to(x.dtype) if needs_grad_x else None
        return grad_x, grad_scale


def _torch_product(x, weight, bias):
    """``x W^T + b`` by torch's GEMM: in fp32, not yet rounded, when ``_fp32_gemm`` widens ``x``'s dtype, else in
    ``x``'s dtype. The bias is rounded to ``x``'s dtype first, as the reference adds it in that dtype."""
    if _fp32_gemm(x.dtype, x.shape[0], backward=False):
        b32 = None if bias is None else bias.to(x.dtype).float()
        return torch.nn.functional.linear(x.float(), weight.float(), b32)
    return torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _dy_times_w(dy, weight):
    """``dY W`` (M, K): fp32 (not yet rounded) for a bitsandbytes base (dequantized tile by tile inside the product,
    never whole) or when ``_fp32_gemm`` widens ``dY``'s dtype; else torch's GEMM in ``dY``'s dtype."""
    if isinstance(weight, QuantizedWeight):
        return _C.quant_grad_x(dy.float().contiguous(), _quant_args(weight, dy.dtype), 0)
    if _fp32_gemm(dy.dtype, dy.shape[0], backward=True):
        return torch.mm(dy.float(), weight.float())
    return torch.mm(dy, weight.to(dy.dtype))


BACKEND = CpuBackend()
