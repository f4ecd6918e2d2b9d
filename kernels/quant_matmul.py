"""GEMMs over a quantized base weight that dequantize inside the K loop (never writing a dense weight).

One kernel, ``_quant_gemm_kernel``, two orientations (``TRANS_W``):

    forward   out[m, n] = vout[n] * ( sum_c a'[m, c] deq(W)[n, c] + bias[n] + sum_q pre[m, q] upre[q, n] )
    backward  out[m, n] =             sum_c a[m, c]  deq(W)[c, n]                + sum_q pre[m, q] upre[q, n]

with ``a' = (a * vin[c])`` rounded as PEFT's IA3 does (``IN_SCALE``). Forward is ``Y = X deq(W)^T + b`` (the base
layer), backward is ``dX = dY deq(W)``; the ``pre @ upre`` epilogue carries the LoRA up-projection (``pre`` the
scaled ``(M, r)`` down-projections, ``upre`` the concatenated ``B^T`` or ``A``), so ``out`` is written once.

``deq(W)`` is built tile by tile in registers from ``fastpeft.quant.QuantizedWeight``'s storage:

- nf4/fp4: value ``i = row * K + col`` of the flattened ``(N, K)`` weight is the high nibble (even ``i``) or low
  nibble (odd ``i``) of byte ``i // 2``, looked up in the 16-entry code table and scaled by ``absmax[i // blocksize]``
  (fp32); under double quantization ``absmax[j] = ncode[qa[j]] * nabsmax[j // nbs] + offset``.
- int8: ``q[row, col] * SCB[row] * (1/127)``.

The fp32 value is cast to the weight's own dtype (as bitsandbytes' dequantize does) and then to ``a``'s dtype for the
tensor-core ``tl.dot``; accumulation is fp32. The code table and absmax gathers hit L1: each ``BLOCK_C``-wide tile
row touches at most two absmax blocks.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import (
    EXACT_FP32_CONFIGS,
    INTERPRET_CONFIG,
    TL_DTYPES,
    add_low_rank_product,
    arch_of,
    autotuned,
    cdiv,
    config_kwargs,
    dot_dtype,
    dot_precision,
    exact_fp32,
    grouped_tile,
    interpreting,
    launch,
    next_pow2,
)

INT8_INV_127 = 7.874015718698502e-3


@triton.jit
def _dequant_tile(w_ptr, absmax_ptr, code_ptr, ncode_ptr, nabsmax_ptr, noffset,
                  rows, cols, mask, c0, N_w, K_w, blocksize, nbs, stride_wn, stride_wk,
                  IS_INT8: tl.constexpr, NESTED: tl.constexpr, W_DTYPE: tl.constexpr, ROW_ALIGNED: tl.constexpr):
    """deq(W)[rows, cols] (broadcast int64 index tensors) in ``W_DTYPE``; zero where ``mask`` is false.
    ``ROW_ALIGNED`` (forward orientation only): ``rows`` is ``(1, BLOCK_N)`` and all ``cols`` of the tile start at
    ``c0`` inside one absmax block."""
    if IS_INT8:
        q = tl.load(w_ptr + rows * stride_wn + cols * stride_wk, mask=mask, other=0)
        s = tl.load(absmax_ptr + rows, mask=mask, other=0.0)
        w = q.to(tl.float32) * s * 7.874015718698502e-3
    else:
        # int32 flat index: the launcher checks N * K < 2**31 (a 46k x 46k weight)
        i = rows.to(tl.int32) * K_w + cols.to(tl.int32)
        byte = tl.load(w_ptr + i // 2, mask=mask, other=0).to(tl.int32)
        nib = tl.where((i % 2) == 0, byte >> 4, byte & 0xF)
        v = tl.load(code_ptr + nib)
        if ROW_ALIGNED:
            # every absmax block lies inside one weight row and holds whole BLOCK_C-wide tiles: one scale per row
            blk = (rows.to(tl.int32) * K_w + c0) // blocksize
            smask = rows < N_w
        else:
            blk = i // blocksize
            smask = mask
        if NESTED:
            qa = tl.load(absmax_ptr + blk, mask=smask, other=0).to(tl.int32)
            s = tl.load(ncode_ptr + qa) * tl.load(nabsmax_ptr + blk // nbs, mask=smask, other=0.0) + noffset
        else:
            s = tl.load(absmax_ptr + blk, mask=smask, other=0.0)
        w = tl.where(mask, v * s, 0.0)
    return w.to(W_DTYPE)


@triton.jit
def _quant_gemm_kernel(
    # pointers: activations, quantized weight pieces, epilogue operands, output
    a_ptr, w_ptr, absmax_ptr, code_ptr, ncode_ptr, nabsmax_ptr,
    bias_ptr, vin_ptr, vout_ptr, pre_ptr, upre_ptr, out_ptr,
    # dimensions and quantization scalars; M_BUCKET (M rounded up to a power of two) is only the autotune key
    M, N, C, RP, Nw, K_w, blocksize, nbs, noffset, M_BUCKET,
    # strides
    stride_am, stride_ac, stride_wn, stride_wk, stride_pm, stride_pq, stride_qq, stride_qn, stride_om, stride_on,
    # meta-parameters
    IS_INT8: tl.constexpr, NESTED: tl.constexpr, W_DTYPE: tl.constexpr, TRANS_W: tl.constexpr,
    ROW_ALIGNED: tl.constexpr,
    HAS_BIAS: tl.constexpr, IN_SCALE: tl.constexpr, OUT_SCALE: tl.constexpr, HAS_PRE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_RP: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out (M, N) = a (M, C) @ deq(W)^T (or deq(W) if TRANS_W) + epilogue; see the module docstring."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rm = offs_m.to(tl.int64)  # int64: N * K overflows int32 for large weights
    rn = offs_n.to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # tl.zeros is a @jit function: see grouped_tile
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs_c
        mask_c = cc < C
        rc = cc.to(tl.int64)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rc[None, :] * stride_ac,
                    mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        if IN_SCALE:
            # PEFT rounds (x * l) to l's dtype, then to x's dtype, before the base matmul
            v = tl.load(vin_ptr + rc, mask=mask_c, other=0.0)
            a = (a.to(tl.float32) * v.to(tl.float32)[None, :]).to(vin_ptr.dtype.element_ty).to(a_ptr.dtype.element_ty)
        wmask = mask_c[:, None] & mask_n[None, :]
        if TRANS_W:  # b[c, n] = W[c, n]
            b = _dequant_tile(w_ptr, absmax_ptr, code_ptr, ncode_ptr, nabsmax_ptr, noffset,
                              rc[:, None], rn[None, :], wmask, c0, Nw, K_w, blocksize, nbs, stride_wn, stride_wk,
                              IS_INT8, NESTED, W_DTYPE, False)
        else:  # b[c, n] = W[n, c]
            b = _dequant_tile(w_ptr, absmax_ptr, code_ptr, ncode_ptr, nabsmax_ptr, noffset,
                              rn[None, :], rc[:, None], wmask, c0, Nw, K_w, blocksize, nbs, stride_wn, stride_wk,
                              IS_INT8, NESTED, W_DTYPE, ROW_ALIGNED)
        b = b.to(a_ptr.dtype.element_ty)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)

    if HAS_PRE:
        acc = add_low_rank_product(acc, pre_ptr, upre_ptr, rm, rn, mask_m, mask_n, RP,
                                   stride_pm, stride_pq, stride_qq, stride_qn, BLOCK_RP, DOT_DTYPE, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if OUT_SCALE:
        # PEFT: z = base(x) in x's dtype, then (z * l) cast back to z's dtype
        z = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        acc = z * tl.load(vout_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# ------------------------------------------------------------------------------------------------------ configs
# (BLOCK_M, BLOCK_N, BLOCK_C, num_warps, num_stages). The dequantized tile is built in registers from gathers
# (packed byte, code, absmax, nested absmax), which costs registers. 8 warps over a 64 x 128 tile and 2 stages keep
# both orientations at <= 182 registers with no stack on sm_90. On sm_80, where ptxas held these launches to 128
# registers, 64 x 128 x 32 (2 or 3 stages) and 128 x 64 kept 8-24 bytes of stack in the transposed (dX) and
# double-quantized launches, and 64 x 64 x 32 with 4 warps in the int8 dX and nested forward. A 16-deep C step with
# 3 stages on the 64 x 128 tile, and 8 warps on the 64 x 64 one, compile without stack for every recorded launch
# (tests/test_triton_compile.py compiles them and checks tensor-core instructions, spills, shared memory).
QUANT_CONFIGS = {
    80: [(64, 128, 16, 8, 3), (64, 64, 32, 8, 2)],
    90: [(64, 128, 64, 8, 2), (64, 64, 32, 4, 2)],
}
BLOCK_RP = 16


def quant_configs(arch: int, dtype: torch.dtype) -> list:
    """The autotune configs for activations of ``dtype`` on ``arch``. fp32 activations dot in exact fp32 unless
    torch allows TF32 (``_common.exact_fp32``): FMA code, whose operand tiles live in each thread's registers, so
    they take the fused GEMM's small exact-fp32 tiles (at 64 x 128 with 8 warps sm_90 compiled them to 255 registers
    and 392-440 bytes of stack)."""
    return EXACT_FP32_CONFIGS[arch] if exact_fp32(dtype) else QUANT_CONFIGS[arch]


def quant_config_kwargs(config, dtype: torch.dtype) -> dict:
    """Kernel meta-parameters for ``config``; fp32 activations halve BLOCK_C to keep shared memory the same."""
    return config_kwargs(config, dtype, k_name="BLOCK_C")


_AUTOTUNE_KEY = [  # M bucketed, as the fused GEMM's
    "M_BUCKET", "N", "C", "IS_INT8", "NESTED", "TRANS_W", "ROW_ALIGNED", "HAS_BIAS", "IN_SCALE", "OUT_SCALE", "HAS_PRE",
]


@functools.lru_cache(maxsize=None)
def _autotuned(arch: int, dtype: torch.dtype):
    return autotuned(_quant_gemm_kernel, {arch: quant_configs(arch, dtype)}, arch, dtype == torch.float32,
                     _AUTOTUNE_KEY, k_name="BLOCK_C")


def gpu_tiles(arch: int, named: dict) -> list[dict]:
    """What a GPU launch of ``_quant_gemm_kernel`` (arguments by name: ``named``) runs on ``arch`` in place of the
    interpreter's stand-ins: every autotune config, and the activations' own dtype for the dots (the interpreter
    widens bf16, see ``dot_dtype``). For a launch recorder."""
    dtype = named["a_ptr"].dtype
    return [dict(quant_config_kwargs(c, dtype), DOT_DTYPE=TL_DTYPES[dtype]) for c in quant_configs(arch, dtype)]


def weight_args(qw):
    """Pointer and scalar arguments describing a ``QuantizedWeight``; unused pointers get a valid dummy."""
    dummy = qw.absmax
    is_int8 = qw.kind == "int8"
    data = qw.data
    if is_int8:
        stride_wn, stride_wk = data.stride(0), data.stride(1)
    else:
        stride_wn, stride_wk = 0, 0
    ptrs = (data, qw.absmax, qw.code if qw.code is not None else dummy,
            qw.nested_code if qw.nested else dummy, qw.nested_absmax if qw.nested else dummy)
    scalars = dict(K_w=qw.shape[1], blocksize=max(qw.blocksize, 1), nbs=max(qw.nested_blocksize, 1),
                   noffset=float(qw.nested_offset))
    return ptrs, scalars, (stride_wn, stride_wk), is_int8


def quant_matmul(a: torch.Tensor, qw, *, transpose: bool = False, bias=None, vin=None, vout=None, pre=None,
                 upre=None, out_dtype=None, config=None) -> torch.Tensor:
    """``a @ deq(W)^T`` (``transpose=False``; ``a`` ``(M, K)`` -> ``(M, N)``) or ``a @ deq(W)`` (``transpose=True``;
    ``a`` ``(M, N)`` -> ``(M, K)``), with the fused epilogue terms given.

    ``a``: fp16/bf16/fp32, any strides. ``qw``: ``fastpeft.quant.QuantizedWeight`` on ``a``'s device. ``bias``
    ``(N,)`` any float dtype (added in fp32). ``vin`` ``(K,)`` IA3 input scale, ``vout`` ``(N,)`` IA3 output scale
    (forward only). ``pre`` ``(M, RP)`` and ``upre`` ``(RP, n_out)``: ``+ pre @ upre`` in ``upre``'s dtype.
    ``out_dtype`` defaults to ``a.dtype``. ``config`` (BLOCK_M, BLOCK_N, BLOCK_C, warps, stages) overrides tuning.
    """
    Nw, Kw = qw.shape
    M, C = a.shape
    if C != (Nw if transpose else Kw):
        raise ValueError(f"fastpeft.quant_matmul: a has {C} columns, weight is {qw.shape} (transpose={transpose})")
    if a.dtype not in TL_DTYPES or qw.dtype not in TL_DTYPES:
        raise TypeError(f"fastpeft.quant_matmul: unsupported dtypes a={a.dtype}, weight={qw.dtype}")
    if transpose and (vin is not None or vout is not None or bias is not None):
        raise ValueError("fastpeft.quant_matmul: bias and IA3 scales belong to the forward orientation")
    n_out = Kw if transpose else Nw
    out = torch.empty((M, n_out), dtype=out_dtype or a.dtype, device=a.device)
    if M == 0 or n_out == 0:
        return out
    ptrs, scalars, (swn, swk), is_int8 = weight_args(qw)
    RP = pre.shape[1] if pre is not None else 0
    args = (
        a, *ptrs,
        bias if bias is not None else out, vin if vin is not None else out, vout if vout is not None else out,
        pre if pre is not None else out, upre if upre is not None else out, out,
        M, n_out, C, RP, Nw, scalars["K_w"], scalars["blocksize"], scalars["nbs"], scalars["noffset"], next_pow2(M),
        a.stride(0), a.stride(1), swn, swk,
        *(pre.stride() if pre is not None else (0, 0)), *(upre.stride() if upre is not None else (0, 0)),
        out.stride(0), out.stride(1),
    )
    if not is_int8 and Nw * Kw >= 2**31:
        raise ValueError(f"fastpeft.quant_matmul: 4-bit weight {qw.shape} has 2**31 or more values")
    # blocksize >= 64 >= every BLOCK_C, so a row-aligned block holds whole tiles
    row_aligned = not transpose and not is_int8 and qw.blocksize >= 64 and Kw % qw.blocksize == 0
    flags = dict(IS_INT8=is_int8, NESTED=qw.nested, W_DTYPE=TL_DTYPES[qw.dtype], TRANS_W=bool(transpose),
                 ROW_ALIGNED=row_aligned,
                 HAS_BIAS=bias is not None, IN_SCALE=vin is not None, OUT_SCALE=vout is not None,
                 HAS_PRE=pre is not None, INPUT_PRECISION=dot_precision(),
                 DOT_DTYPE=dot_dtype(a.dtype),
                 BLOCK_RP=BLOCK_RP)
    if config is None and (interpreting() or a.device.type != "cuda"):
        config = INTERPRET_CONFIG
    if config is not None:
        kw = quant_config_kwargs(config, a.dtype)
        grid = (cdiv(M, kw["BLOCK_M"]) * cdiv(n_out, kw["BLOCK_N"]),)
        launch(_quant_gemm_kernel, grid, args, {**flags, **kw}, gpu_tiles if config is INTERPRET_CONFIG else None)
        return out
    kernel = _autotuned(arch_of(a.device), a.dtype)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(n_out, meta["BLOCK_N"]),)  # noqa: E731
    launch(kernel, grid, args, flags, gpu_tiles)
    return out
