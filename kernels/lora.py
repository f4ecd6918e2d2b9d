"""Fused LoRA forward and backward in Triton, with PEFT's dropout drawn in-kernel (never stored).

Formulas (adapter ``i``: ``A_i`` ``(r_i, K)``, ``B_i`` ``(N, r_i)``, scale ``s_i``, dropout ``p_i``, seed ``seed_i``;
``drop_i(X) = X * keep_i / (1 - p_i)`` with ``keep_i[m, k] = dropout_keep(seed_i, m*K + k, p_i)``, see
``fastpeft._philox``)::

    Y    = X W^T + bias + sum_i s_i (drop_i(X) A_i^T B_i^T + b_i)        XA_i = drop_i(X) A_i^T   (M, r_i), kept
    dX   = dY W + sum_i (G_i A_i) * keep_i / (1 - p_i)                     G_i  = s_i dY B_i        (M, r_i)
    dA_i = G_i^T drop_i(X)        dB_i = s_i dY^T XA_i        dbias_i = s_i sum_m dY

Kernel modes. The triton backend offers each as a route (``small`` as ``passes``, ``fused`` as ``fused_gemm``,
``split`` as ``split_gemm``, beside the plain ``compose``) and on a GPU takes the one measured fastest
(``fastpeft.routing``). The rule below (``mode="auto"``) applies when the kernels are called directly, and under
Triton's interpreter, where timings mean nothing:

- ``M < UNMEASURED_SMALL_M`` (decode, tiny batches): a tile of ``BLOCK_M`` >= 64 rows would be mostly padding,
  and the base matmul is a weight-bandwidth-bound GEMV that cuBLAS already does at the roofline. So ``"small"``:
  torch's matmul for the base, ``_down_proj_kernel`` for ``XA``, and one ``_lowrank_update_kernel`` epilogue pass
  that adds ``sum_i s_i XA_i B_i^T + b_i`` to ``Y`` in place (Y is ``M x N``, tiny here).
- no dropout and the concatenated padded rank ``<= MAX_FUSED_R`` (64): ``"fused"``: one launch of the fused GEMM;
  the down-projection shares the loaded X tiles in the K loop, the up-projection is in the epilogue, Y is written
  once, and the first column block writes ``XA``.
- otherwise (dropout on, or large ranks): ``"split"``: ``_down_proj_kernel`` computes ``XA`` once, generating each
  mask element once (fusing it would regenerate Philox numbers in every column block of the GEMM), then the GEMM
  applies ``XA B^T`` in its epilogue. ``mode="fused"`` forces in-loop dropout (tested, never auto-chosen).

Backward mirrors it: ``"fused"`` (rank <= 64 and at most one adapter with dropout) computes ``dY W`` and
``G = dY B`` from the same dY tiles and applies ``(G A) * mask`` in the epilogue; ``"split"`` computes ``G`` with
``_down_proj_kernel`` and adds each adapter's masked ``G_i A_i`` with ``_lowrank_update_kernel``.

Adapters may be in a dtype other than X's (PEFT keeps A/B in fp32 under a bf16 base): they are concatenated in
their common dtype (fp32 if they differ) and X tiles are cast to it before the low-rank dots (exact fp32 on the GPU
unless torch allows TF32).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._common import (
    MAX_FUSED_R,
    UNMEASURED_SMALL_M,
    cdiv,
    dot_precision,
    dropout_keep,
    exact_fp32,
    launch,
    launch_gemm,
    next_pow2,
)

# ------------------------------------------------------------------------------------------------------ kernels


@triton.jit(do_not_specialize=["seed"])
def _down_proj_kernel(
    a_ptr, dn_ptr, out_ptr,
    M, K, R, seed, p,
    stride_am, stride_ak, stride_dk, stride_dr, stride_om, stride_or,
    DROP: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out (M, R) fp32 = drop(a) (M, K) @ dn (K, R); mask offset m*K + k."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    rm = offs_m.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + offs_k).to(tl.int64)
        mask_k = rk < K
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        d = tl.load(dn_ptr + rk[:, None] * stride_dk + offs_r[None, :] * stride_dr,
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if DROP:
            keep = dropout_keep(seed, rm[:, None] * K + rk[None, :], p)
            a = tl.where(keep, a.to(tl.float32) / (1.0 - p), 0.0)
        acc = tl.dot(a.to(dn_ptr.dtype.element_ty), d, acc, input_precision=INPUT_PRECISION)
    tl.store(out_ptr + rm[:, None] * stride_om + offs_r[None, :] * stride_or, acc,
             mask=mask_m[:, None] & mask_r[None, :])


@triton.jit(do_not_specialize=["seed"])
def _lowrank_update_kernel(
    base_ptr, lhs_ptr, rhs_ptr, rscale_ptr, vbias_ptr, out_ptr,
    M, N, R, seed, p,
    stride_bm, stride_bn, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on,
    HAS_VBIAS: tl.constexpr, DROP: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out (M, N) = base + mask?((lhs (M, R) * rscale) @ rhs (R, N)) + vbias (N); mask offset m*N + n.

    ``out`` may alias ``base`` (each element is read then written by the same program)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rm = offs_m.to(tl.int64)
    rn = offs_n.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + offs_r
        mask_r = rr < R
        lhs = tl.load(lhs_ptr + rm[:, None] * stride_lm + rr[None, :] * stride_lr,
                      mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        rs = tl.load(rscale_ptr + rr, mask=mask_r, other=0.0)
        rhs = tl.load(rhs_ptr + rr[:, None] * stride_rr + rn[None, :] * stride_rn,
                      mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot((lhs * rs[None, :]).to(rhs_ptr.dtype.element_ty), rhs, acc, input_precision=INPUT_PRECISION)
    if DROP:
        keep = dropout_keep(seed, rm[:, None] * N + rn[None, :], p)
        acc = tl.where(keep, acc / (1.0 - p), 0.0)
    if HAS_VBIAS:
        acc += tl.load(vbias_ptr + rn, mask=mask_n, other=0.0)[None, :]
    mask_mn = mask_m[:, None] & mask_n[None, :]
    base = tl.load(base_ptr + rm[:, None] * stride_bm + rn[None, :] * stride_bn, mask=mask_mn, other=0.0)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on,
             (base.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=mask_mn)


@triton.jit(do_not_specialize=["seed"])
def _grad_a_kernel(
    g_ptr, x_ptr, out_ptr,
    M, K, R, seed, p,
    stride_gm, stride_gr, stride_xm, stride_xk, stride_or, stride_ok,
    DROP: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out (R, K) = g^T (R, M) @ drop(x) (M, K), reduced over M in fp32, in out's dtype; mask offset m*K + k."""
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_k = offs_k < K
    mask_r = offs_r < R
    rk = offs_k.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = (m0 + offs_m).to(tl.int64)
        mask_m = rm < M
        g = tl.load(g_ptr + rm[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if DROP:
            keep = dropout_keep(seed, rm[:, None] * K + rk[None, :], p)
            x = tl.where(keep, x.to(tl.float32) / (1.0 - p), 0.0)
        acc = tl.dot(tl.trans(g.to(out_ptr.dtype.element_ty)), x.to(out_ptr.dtype.element_ty), acc,
                     input_precision=INPUT_PRECISION)
    tl.store(out_ptr + offs_r[:, None] * stride_or + rk[None, :] * stride_ok, acc.to(out_ptr.dtype.element_ty),
             mask=mask_r[:, None] & mask_k[None, :])


# Fixed tiles for the small kernels (memory-bound or low-rank; not autotuned): (BLOCK_M, BLOCK_K/N, num_warps,
# num_stages). Three stages are Triton's default, which these launches always ran with.
SMALL_KERNEL_TILES = {"down_proj": (64, 64, 4, 3), "lowrank_update": (64, 64, 4, 3), "grad_a": (64, 64, 4, 3)}
# With exact fp32 dots (FMA code, see ``_common.EXACT_FP32_CONFIGS``) 64-wide tiles spill in down_proj and grad_a,
# and on sm_90 the dropout grad_a kept a value on an 8-byte stack at 3 stages (none at 2).
EXACT_FP32_SMALL_TILE = (32, 32, 4, 2)


def small_tile(kernel: str, dot_dtype: torch.dtype) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_K or BLOCK_N, num_warps, num_stages)`` of a small kernel whose dots run on ``dot_dtype``
    operands."""
    return EXACT_FP32_SMALL_TILE if exact_fp32(dot_dtype) else SMALL_KERNEL_TILES[kernel]


# ---------------------------------------------------------------------------------------------------- launchers


def down_proj(a: torch.Tensor, dn: torch.Tensor, seed: int = 0, p: float = 0.0) -> torch.Tensor:
    """``drop(a) @ dn`` as fp32 ``(M, R)``; ``a`` ``(M, K)`` any strides/dtype, ``dn`` ``(K, R)`` in the adapter
    dtype (``a`` is cast to it per tile)."""
    M, K = a.shape
    R = dn.shape[1]
    out = torch.empty((M, R), device=a.device, dtype=torch.float32)
    if M == 0 or R == 0:
        return out
    bm, bk, warps, stages = small_tile("down_proj", dn.dtype)
    br = min(next_pow2(R), 64)
    grid = (cdiv(M, bm), cdiv(R, br))
    launch(_down_proj_kernel, grid,
           (a, dn, out, M, K, R, int(seed), float(p), a.stride(0), a.stride(1), dn.stride(0), dn.stride(1),
            out.stride(0), out.stride(1)),
           dict(DROP=p > 0, INPUT_PRECISION=dot_precision(), BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=br, num_warps=warps,
                num_stages=stages))
    return out


def lowrank_update(base: torch.Tensor, lhs: torch.Tensor, rhs: torch.Tensor, rscale: torch.Tensor,
                   vbias: Optional[torch.Tensor] = None, seed: int = 0, p: float = 0.0,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out = base + mask((lhs * rscale) @ rhs) + vbias``: ``base`` ``(M, N)``, ``lhs`` fp32 ``(M, R)``, ``rhs``
    ``(R, N)`` in the adapter dtype, ``rscale`` fp32 ``(R,)``, ``vbias`` fp32 ``(N,)``. In place when ``out`` is
    ``base``."""
    M, N = base.shape
    R = lhs.shape[1]
    out = base if out is None else out
    bm, bn, warps, stages = small_tile("lowrank_update", rhs.dtype)
    grid = (cdiv(M, bm), cdiv(N, bn))
    launch(_lowrank_update_kernel, grid,
           (base, lhs, rhs, rscale, vbias if vbias is not None else rscale, out, M, N, R, int(seed), float(p),
            base.stride(0), base.stride(1), lhs.stride(0), lhs.stride(1), rhs.stride(0), rhs.stride(1),
            out.stride(0), out.stride(1)),
           dict(HAS_VBIAS=vbias is not None, DROP=p > 0, INPUT_PRECISION=dot_precision(), BLOCK_M=bm, BLOCK_N=bn,
                BLOCK_R=32, num_warps=warps, num_stages=stages))
    return out


def grad_a(g: torch.Tensor, x: torch.Tensor, dtype: torch.dtype, seed: int = 0, p: float = 0.0) -> torch.Tensor:
    """``g^T drop(x)`` as ``(R, K)`` in ``dtype``: ``g`` fp32 ``(M, R)``, ``x`` ``(M, K)`` any strides."""
    M, K = x.shape
    R = g.shape[1]
    out = torch.empty((R, K), device=x.device, dtype=dtype)
    if M == 0:
        return out.zero_()
    bm, bk, warps, stages = small_tile("grad_a", dtype)
    br = min(next_pow2(R), 64)
    grid = (cdiv(K, bk), cdiv(R, br))
    launch(_grad_a_kernel, grid,
           (g, x, out, M, K, R, int(seed), float(p), g.stride(0), g.stride(1), x.stride(0), x.stride(1),
            out.stride(0), out.stride(1)),
           dict(DROP=p > 0, INPUT_PRECISION=dot_precision(), BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=br, num_warps=warps,
                num_stages=stages))
    return out


def _adapter_dtype(lora_A: Sequence[torch.Tensor]) -> torch.dtype:
    dtypes = {A.dtype for A in lora_A}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _concat(lora_A, lora_B, scaling, dtype, device):
    """``A_cat`` ``(R, K)``, ``B_cat`` ``(N, R)`` in ``dtype``, per-column scales fp32 ``(R,)``, column offsets."""
    A_cat = torch.cat([A.to(dtype) for A in lora_A], 0)
    B_cat = torch.cat([B.to(dtype) for B in lora_B], 1)
    rscale = torch.cat([torch.full((A.shape[0],), float(s), dtype=torch.float32, device=device)
                        for A, s in zip(lora_A, scaling)])
    offsets = [0]
    for A in lora_A:
        offsets.append(offsets[-1] + A.shape[0])
    return A_cat, B_cat, rscale, offsets


def choose_forward_mode(M: int, total_r: int, dropout_p: Sequence[float]) -> str:
    """The dispatch rule of the module docstring: ``"small"``, ``"fused"`` or ``"split"``."""
    if M < UNMEASURED_SMALL_M:
        return "small"
    if max(dropout_p, default=0.0) == 0.0 and next_pow2(total_r) <= MAX_FUSED_R:
        return "fused"
    return "split"


def choose_backward_mode(M: int, total_r: int, dropout_p: Sequence[float]) -> str:
    if M < UNMEASURED_SMALL_M:
        return "small"
    if next_pow2(total_r) <= MAX_FUSED_R and sum(1 for p in dropout_p if p > 0) <= 1:
        return "fused"
    return "split"


def lora_forward(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds, mode: str = "auto",
                 config=None):
    """Fused LoRA forward. ``x`` ``(M, K)``, ``weight`` ``(N, K)`` (any strides), ``bias`` ``(N,)`` or None; adapter
    lists as in ``fastpeft.backends.base``. Returns ``y`` ``(M, N)`` in x's dtype and ``xa[i]`` ``(M, r_i)`` in
    ``A_i``'s dtype. ``mode``: ``"auto"`` (module docstring), ``"fused"``, ``"split"``, ``"small"``."""
    M, K = x.shape
    N = weight.shape[0]
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    n = len(lora_A)
    if n == 0:
        return torch.nn.functional.linear(x, weight, bias), []
    ad = _adapter_dtype(lora_A)
    A_cat, B_cat, rscale, offs = _concat(lora_A, lora_B, scaling, ad, x.device)
    R = A_cat.shape[0]
    # bias and every s_i * b_i fold into one fp32 vector added in the epilogue
    vbias = None
    if bias is not None or any(b is not None for b in lora_bias):
        vbias = torch.zeros(N, dtype=torch.float32, device=x.device)
        if bias is not None:
            vbias += bias.float()
        for b, s in zip(lora_bias, scaling):
            if b is not None:
                vbias += float(s) * b.float()
    if mode == "auto":
        mode = choose_forward_mode(M, R, dropout_p)
    any_drop = any(p > 0 for p in dropout_p)

    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if mode == "fused" and (not any_drop or n == 1):
        down = torch.empty((M, R), device=x.device, dtype=torch.float32)
        if M > 0:
            launch_gemm(x, weight.t(), y, bias=vbias, dn=A_cat.t(), up=B_cat.t(), rscale=rscale, down=down,
                        seed=seeds[0], p=dropout_p[0], drop_cols=K, drop_in=dropout_p[0] > 0, config=config)
    else:
        if any_drop:
            down = torch.cat([down_proj(x, A.to(ad).t(), seed, p) for A, seed, p in zip(lora_A, seeds, dropout_p)],
                             1)
        else:
            down = down_proj(x, A_cat.t())
        if M > 0:
            if mode == "small":
                base = x @ weight.t()  # the base GEMV/GEMM goes to cuBLAS (torch on the CPU interpreter)
                y = lowrank_update(base, down, B_cat.t(), rscale, vbias, out=y)
            else:
                pre = down * rscale  # (M, R) fp32: scaled once so the epilogue is a plain dot
                launch_gemm(x, weight.t(), y, bias=vbias, pre=pre, upre=B_cat.t(), config=config)
    xa = [down[:, offs[i]:offs[i + 1]].to(A.dtype) for i, A in enumerate(lora_A)]
    return y, xa


def lora_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x, needs_grad_A,
                  mode: str = "auto", config=None):
    """LoRA backward; arguments and results as ``Backend.lora_backward``: ``(dx, dA, dB, dbias)``.

    ``dx`` in grad_y's dtype, ``dA[i]``/``dB[i]``/``dbias[i]`` in the adapter's dtypes. The masks are regenerated
    from ``seeds``."""
    M, N = grad_y.shape
    n = len(lora_A)
    K = lora_A[0].shape[1] if n else weight.shape[1]
    ad = _adapter_dtype(lora_A) if n else grad_y.dtype
    W = weight if weight.dtype == grad_y.dtype else weight.to(grad_y.dtype)
    if n == 0:
        return ((grad_y @ W) if needs_grad_x else None), [], [], []
    A_cat, B_cat, rscale, offs = _concat(lora_A, lora_B, scaling, ad, grad_y.device)
    R = A_cat.shape[0]
    if mode == "auto":
        mode = choose_backward_mode(M, R, dropout_p)
    drops = [i for i, p in enumerate(dropout_p) if p > 0]

    grad_x = None
    if needs_grad_x and mode == "fused" and len(drops) <= 1:
        G = torch.empty((M, R), device=grad_y.device, dtype=torch.float32)
        if M > 0:
            j = drops[0] if drops else 0
            sel, rest = rscale, None
            if drops:
                # only the dropped adapter's columns take the in-epilogue mask: the others' scales are zeroed here
                # and their (unmasked) G A term is added afterwards, into an fp32 dX so nothing rounds in between
                sel = torch.zeros_like(rscale)
                sel[offs[j]:offs[j + 1]] = rscale[offs[j]:offs[j + 1]]
                # Whether any other adapter contributes is known on the host (its scaling): asking the device
                # would stall the CPU queue once per layer per step and break CUDA-graph capture.
                others = any(float(s) != 0.0 for i, s in enumerate(scaling) if i != j)
                rest = rscale - sel if others else None
            out_dtype = torch.float32 if rest is not None else grad_y.dtype
            grad_x = torch.empty((M, K), device=grad_y.device, dtype=out_dtype)
            launch_gemm(grad_y, W, grad_x, dn=B_cat, up=A_cat, rscale=sel, down=G, seed=seeds[j], p=dropout_p[j],
                        drop_cols=K, drop_out=bool(drops), config=config)
            if rest is not None:
                grad_x = lowrank_update(grad_x, G, A_cat, rest).to(grad_y.dtype)
        else:
            grad_x = torch.empty((M, K), device=grad_y.device, dtype=grad_y.dtype)
    else:
        G = down_proj(grad_y, B_cat)
        if needs_grad_x and M > 0:
            if not drops and mode != "small":
                grad_x = torch.empty((M, K), device=grad_y.device, dtype=grad_y.dtype)
                launch_gemm(grad_y, W, grad_x, pre=G * rscale, upre=A_cat, config=config)
            else:
                acc = (grad_y @ W).float()  # fp32 so several masked adapter terms add without rounding between
                undropped = rscale.clone()
                for i in drops:
                    sl = slice(offs[i], offs[i + 1])
                    undropped[sl] = 0
                    acc = lowrank_update(acc, G[:, sl], A_cat[sl], rscale[sl], seed=seeds[i], p=dropout_p[i])
                if len(drops) < n:
                    acc = lowrank_update(acc, G, A_cat, undropped)
                grad_x = acc.to(grad_y.dtype)
        elif needs_grad_x:
            grad_x = torch.zeros((M, K), device=grad_y.device, dtype=grad_y.dtype)

    grad_A, grad_B, grad_bias = [], [], []
    sums = {}
    for i, (A, B, h, s, p, seed) in enumerate(zip(lora_A, lora_B, xa, scaling, dropout_p, seeds)):
        g = G[:, offs[i]:offs[i + 1]] * float(s)  # (M, r_i) fp32: the gradient reaching XA_i
        if needs_grad_A:
            grad_A.append(grad_a(g, x, A.dtype, seed, p))
        else:
            grad_A.append(None)
        dy = grad_y.to(B.dtype)
        grad_B.append((dy.t() @ h.to(B.dtype)) * s)
        if B.dtype not in sums:
            sums[B.dtype] = dy.sum(0)
        grad_bias.append(sums[B.dtype] * s)
    return grad_x, grad_A, grad_B, grad_bias
