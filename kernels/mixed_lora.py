"""Mixed-adapter LoRA in Triton: every row of ``Y`` gets its own adapter's update (SGMV-style shrink and expand).

For token rows grouped by adapter (``order``: the rows of adapter 0, then adapter 1, ...; a row of no adapter is
absent) and cut into blocks of at most ``BLOCK_M`` rows of one adapter::

    shrink:  XA[j, :]  = s_a * X[order[j], :] A_a^T              (fp32, j over the block's positions in ``order``)
    expand:  Y[order[j], :] += XA[j, :] B_a^T + s_a b_a          (in place, accumulated in fp32, Y rounded once)

Adapters are stacked (``stack_adapters``; the caller keeps the stack while the adapters are unchanged): ``A``
``(n, RP, K)`` and ``B^T`` ``(n, RP, N)`` in fp32, ranks zero-padded to ``RP`` (16 or 64). ``X`` tiles are widened
to fp32 before the dot (exact fp32 on the GPU unless torch allows TF32), as PEFT casts ``X`` to its fp32 adapters.
Each block is one program per column tile, so a decode batch (one row per sequence, each its own adapter) reads each
adapter's A and B once per row that uses it, and a prefill block of 64 rows of one adapter shares its tiles.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._common import cdiv, dot_precision, exact_fp32, launch, next_pow2

BLOCK_M = 64
BLOCK_K = 64
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 2
# The dots run on fp32 operands (the stacked adapters are fp32). Exact fp32 (``_common.dot_precision``) is FMA code:
# 64-wide K/N tiles then spill at rank 64 (4 warps on sm_80 and sm_90; 8 warps on sm_90 with 16-bit activations);
# 32-wide ones with 4 warps compile without stack for every dtype on both.
EXACT_FP32_BLOCK_KN = 32


def tiles() -> tuple[int, int, int]:
    """``(BLOCK_K, BLOCK_N, num_warps)`` of the launches: narrower K/N tiles when the fp32 dots are exact."""
    if exact_fp32(torch.float32):
        return EXACT_FP32_BLOCK_KN, EXACT_FP32_BLOCK_KN, NUM_WARPS
    return BLOCK_K, BLOCK_N, NUM_WARPS


# Padded ranks the launcher produces (the compile checks build exactly these).
RANK_TILES = (16, 64)


@triton.jit
def _block_rows(order_ptr, blk_adapter_ptr, blk_start_ptr, blk_len_ptr, BLOCK_M: tl.constexpr):
    """This program's block (axis 0): its adapter, its first position in ``order``, the positions ``0..BLOCK_M``,
    which of them hold a row, and those token rows (int64)."""
    pid = tl.program_id(0)
    adapter = tl.load(blk_adapter_ptr + pid).to(tl.int64)
    start = tl.load(blk_start_ptr + pid)
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < tl.load(blk_len_ptr + pid)
    rows = tl.load(order_ptr + start + offs_m, mask=row_ok, other=0).to(tl.int64)
    return adapter, start, offs_m, row_ok, rows


@triton.jit
def _mixed_shrink_kernel(
    x_ptr, a_ptr, scale_ptr, order_ptr, blk_adapter_ptr, blk_start_ptr, blk_len_ptr, xa_ptr,
    K,
    stride_xm, stride_an, stride_ar, stride_xam,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """xa[start + i, :] = s_a * x[order[start + i], :] @ A_a^T for the block's rows i < len (fp32)."""
    adapter, start, offs_m, row_ok, rows = _block_rows(order_ptr, blk_adapter_ptr, blk_start_ptr, blk_len_ptr,
                                                       BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    a_base = a_ptr + adapter * stride_an
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :], mask=row_ok[:, None] & k_ok[None, :],
                     other=0.0).to(tl.float32)
        at = tl.load(a_base + offs_r[None, :] * stride_ar + kk[:, None], mask=k_ok[:, None], other=0.0)
        acc += tl.dot(xt, at, input_precision=INPUT_PRECISION)
    acc = acc * tl.load(scale_ptr + adapter)
    out = xa_ptr + (start + offs_m)[:, None].to(tl.int64) * stride_xam + offs_r[None, :]
    tl.store(out, acc, mask=row_ok[:, None])


@triton.jit
def _mixed_expand_kernel(
    y_ptr, xa_ptr, bt_ptr, bias_ptr, order_ptr, blk_adapter_ptr, blk_start_ptr, blk_len_ptr,
    N,
    stride_ym, stride_xam, stride_bn, stride_br, stride_biasn,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[order[start + i], cols] += xa[start + i, :] @ Bt_a[:, cols] + bias_a[cols], in place."""
    pid_n = tl.program_id(1)
    adapter, start, offs_m, row_ok, rows = _block_rows(order_ptr, blk_adapter_ptr, blk_start_ptr, blk_len_ptr,
                                                       BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    xa = tl.load(xa_ptr + (start + offs_m)[:, None].to(tl.int64) * stride_xam + offs_r[None, :],
                 mask=row_ok[:, None], other=0.0)
    bt = tl.load(bt_ptr + adapter * stride_bn + offs_r[:, None] * stride_br + offs_n[None, :], mask=n_ok[None, :],
                 other=0.0)
    acc = tl.dot(xa, bt, input_precision=INPUT_PRECISION)
    acc += tl.load(bias_ptr + adapter * stride_biasn + offs_n, mask=n_ok, other=0.0)[None, :]
    y_tile = y_ptr + rows[:, None] * stride_ym + offs_n[None, :]
    ok = row_ok[:, None] & n_ok[None, :]
    y = tl.load(y_tile, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_tile, (y + acc).to(y_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------------- launchers
def rank_tile(max_rank: int) -> int:
    """The padded rank ``RP`` for adapters of rank up to ``max_rank`` (None above the largest tile)."""
    rp = next_pow2(max_rank)
    return next(t for t in RANK_TILES if t >= rp) if rp <= RANK_TILES[-1] else None


def stack_adapters(lora_A: Sequence[Optional[torch.Tensor]], lora_B, lora_bias, scaling, K: int, N: int,
                   device) -> tuple:
    """``(A (n, RP, K), Bt (n, RP, N), bias (n, N) scaled, scale (n,))`` fp32, ranks zero-padded; an adapter that is
    None (not held by the layer) stacks as zeros."""
    n = len(lora_A)
    rp = rank_tile(max([A.shape[0] for A in lora_A if A is not None] or [1]))
    with torch.no_grad():
        A_all = torch.zeros(n, rp, K, dtype=torch.float32, device=device)
        Bt_all = torch.zeros(n, rp, N, dtype=torch.float32, device=device)
        bias_all = torch.zeros(n, N, dtype=torch.float32, device=device)
        for i, (A, B, b, s) in enumerate(zip(lora_A, lora_B, lora_bias, scaling)):
            if A is None:
                continue
            A_all[i, : A.shape[0]] = A.detach().float()
            Bt_all[i, : A.shape[0]] = B.detach().float().t()
            if b is not None:
                bias_all[i] = b.detach().float() * float(s)
        scale = torch.tensor([float(s) for s in scaling], dtype=torch.float32, device=device)
    return A_all, Bt_all, bias_all, scale


def blocks_of(rows: Sequence[torch.Tensor], device) -> tuple:
    """``(order, blk_adapter, blk_start, blk_len)`` int32 on ``device``: the token rows of every adapter back to back
    (``rows[i]``: adapter ``i``'s rows) and blocks of at most ``BLOCK_M`` positions of one adapter."""
    adapters, starts, lens = [], [], []
    pos = 0
    for i, r in enumerate(rows):
        count = int(r.numel())
        for s in range(0, count, BLOCK_M):
            adapters.append(i)
            starts.append(pos + s)
            lens.append(min(BLOCK_M, count - s))
        pos += count
    order = (torch.cat(list(rows)) if rows else torch.empty(0, dtype=torch.int64)).to(device=device,
                                                                                      dtype=torch.int32)
    as_i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    return order, as_i32(adapters), as_i32(starts), as_i32(lens)


def mixed_lora_(y: torch.Tensor, x: torch.Tensor, blocks: tuple, A_all: torch.Tensor, Bt_all: torch.Tensor,
                bias_all: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``y[rows_i] += s_i (x[rows_i] A_i^T B_i^T + b_i)`` in place for every adapter ``i``.

    Args:
        y: ``(M, N)`` fp16/bf16/fp32, unit column stride (updated in place).
        x: ``(M, K)`` fp16/bf16/fp32.
        blocks: ``blocks_of(rows, device)`` for ``rows[i]``, adapter ``i``'s int64 token rows (disjoint).
        A_all, Bt_all, bias_all, scale: ``stack_adapters(...)`` of the adapters.
    Returns:
        ``y``.
    """
    K = x.shape[1]
    N = y.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    assert y.stride(-1) == 1, "y needs unit column stride (it is updated in place)"
    order, blk_adapter, blk_start, blk_len = blocks
    if blk_adapter.numel() == 0:
        return y
    rp = A_all.shape[1]
    block_k, block_n, warps = tiles()
    xa = torch.empty(order.numel(), rp, dtype=torch.float32, device=x.device)
    nb = blk_adapter.numel()
    launch(_mixed_shrink_kernel, (nb,),
           (x, A_all, scale, order, blk_adapter, blk_start, blk_len, xa, K,
            x.stride(0), A_all.stride(0), A_all.stride(1), xa.stride(0)),
           dict(INPUT_PRECISION=dot_precision(), BLOCK_M=BLOCK_M, BLOCK_K=block_k, BLOCK_R=rp, num_warps=warps,
                num_stages=NUM_STAGES))
    launch(_mixed_expand_kernel, (nb, cdiv(N, block_n)),
           (y, xa, Bt_all, bias_all, order, blk_adapter, blk_start, blk_len, N,
            y.stride(0), xa.stride(0), Bt_all.stride(0), Bt_all.stride(1), bias_all.stride(0)),
           dict(INPUT_PRECISION=dot_precision(), BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_R=rp, num_warps=warps,
                num_stages=NUM_STAGES))
    return y
