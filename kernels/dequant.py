"""A quantized base weight decoded once into a dense buffer, for the vendor GEMM (cuBLAS) to multiply.

    out[n, k] = deq(W)[n, k]  rounded to W's dtype, then to out's dtype

with ``deq`` as in ``fastpeft.kernels.quant_matmul`` (same tile decoder, ``_dequant_tile``): NF4/FP4 nibbles looked up
in the code table and scaled by the (possibly double-quantized) absmax of their block, int8 ``q * SCB / 127``.
Memory-bound: each program decodes one ``BLOCK_N x BLOCK_K`` tile and writes it once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import TL_DTYPES, cdiv, launch
from .quant_matmul import _dequant_tile, weight_args

# (BLOCK_N, BLOCK_K, num_warps): 4 KB of output per program, enough to keep HBM busy and few registers for the gathers
TILE = (32, 128, 4)


@triton.jit
def _dequant_kernel(
    w_ptr, absmax_ptr, code_ptr, ncode_ptr, nabsmax_ptr, out_ptr,
    N, K, blocksize, nbs, noffset,
    stride_wn, stride_wk, stride_on, stride_ok,
    IS_INT8: tl.constexpr, NESTED: tl.constexpr, W_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out (N, K) = deq(W) in out's dtype; one tile per program (axis 0 over rows, axis 1 over columns)."""
    rn = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    # per-element absmax (ROW_ALIGNED=False): a tile may straddle absmax blocks and rows
    w = _dequant_tile(w_ptr, absmax_ptr, code_ptr, ncode_ptr, nabsmax_ptr, noffset,
                      rn[:, None], rk[None, :], mask, 0, N, K, blocksize, nbs, stride_wn, stride_wk,
                      IS_INT8, NESTED, W_DTYPE, False)
    tl.store(out_ptr + rn[:, None] * stride_on + rk[None, :] * stride_ok, w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(qw, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``deq(W)`` of ``qw`` (``fastpeft.quant.QuantizedWeight``, ``(N, K)``) as an ``(N, K)`` tensor of ``dtype``
    (fp16/bf16/fp32) on ``qw``'s device, written into ``out`` (``(N, K)``, any strides) when given."""
    N, K = qw.shape
    if out is None:
        out = torch.empty((N, K), dtype=dtype, device=qw.data.device)
    if out.shape != (N, K) or out.dtype != dtype:
        raise ValueError(f"fastpeft.dequantize: out is {tuple(out.shape)} {out.dtype}, wanted {(N, K)} {dtype}")
    if qw.kind != "int8" and N * K >= 2**31:
        raise ValueError(f"fastpeft.dequantize: 4-bit weight {qw.shape} has 2**31 or more values")
    if N == 0 or K == 0:
        return out
    ptrs, scalars, (swn, swk), is_int8 = weight_args(qw)
    bn, bk, warps = TILE
    grid = (cdiv(N, bn), cdiv(K, bk))
    launch(_dequant_kernel, grid,
           (*ptrs, out, N, K, scalars["blocksize"], scalars["nbs"], scalars["noffset"], swn, swk, out.stride(0),
            out.stride(1)),
           dict(IS_INT8=is_int8, NESTED=qw.nested, W_DTYPE=TL_DTYPES[qw.dtype], BLOCK_N=bn, BLOCK_K=bk,
                num_warps=warps))
    return out
