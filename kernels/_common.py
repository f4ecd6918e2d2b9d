"""Shared pieces of fastpeft's Triton kernels: the one fused GEMM kernel, its autotune configs, and launch helpers.

Every dense GEMM fastpeft runs (LoRA forward, LoRA ``dX``, IA3 forward and backward) is the same tiled kernel,
``_fused_gemm_kernel``, specialised by ``constexpr`` flags:

    out[m, n] = vout[n] * ( sum_k a'[m, k] b[k, n] + bias[n]
                            + mask?(m, n) * sum_r (down[m, r] rscale[r]) up[r, n]      # FUSE_DOWN
                            + sum_q pre[m, q] upre[q, n] )                               # HAS_PRE
    down[m, r] = sum_k drop?(a')[m, k] dn[k, r]        with a' = a * vin[k] (IN_SCALE)

The low-rank down-projection ``down`` reuses the ``a`` tiles the base GEMM already loaded (the fused LoRA kernel),
and the up-projection runs in the epilogue, so ``out`` is written once. ``COLSUM`` writes per-row-block partial
column sums of ``(acc + bias) * other`` (the IA3 vector gradients) instead of needing a second pass.

Dropout masks are never stored: element ``(m, c)`` keeps iff ``dropout_keep(seed, m * drop_cols + c, p)``: half
``o % 2`` of word ``(o // 2) % 4`` of ``tl.randint4x(seed, o // 8)`` for the element offset ``o`` (int64), as a
multiple of ``2**-16`` compared with ``p`` in fp32, which is ``fastpeft._philox`` bit for bit.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import _env


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` set before import)."""
    return _env.read("TRITON_INTERPRET") == "1"  # on every launch: a dict lookup, not os.environ.get


TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def dot_dtype(dtype: torch.dtype):
    """``tl.dot`` operand type for ``dtype``: its own, except bf16 under the 3.9 interpreter, whose bf16 dot is
    broken; there the (already bf16-rounded) operands are widened to fp32 exactly, which matches bf16 tensor cores'
    fp32 accumulation."""
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return TL_DTYPES[dtype]


def torch_allows_tf32() -> bool:
    """Whether torch's own CUDA fp32 matmul may use TF32: ``torch.backends.cuda.matmul.fp32_precision == "tf32"``,
    or, where that newer setting was never made, the legacy ``allow_tf32`` (read second: torch refuses to read the
    legacy flag once the new one was set)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision != "none":
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def dot_precision() -> str:
    """``tl.dot``'s ``input_precision`` for fp32 operands (16-bit operands ignore it): full fp32 (``"ieee"``), as
    torch's own fp32 matmul computes by default and so as PEFT's fp32 adapters mean; TF32 only where the user allowed
    it for torch's matmul too (``torch_allows_tf32``). Triton's own default would be TF32."""
    return "tf32" if torch_allows_tf32() else "ieee"


def exact_fp32(*dtypes: torch.dtype) -> bool:
    """Whether a launch with dot operands in ``dtypes`` runs some dot on fp32 operands in full precision: FMA code
    instead of tensor cores, which needs the small ``EXACT_FP32_CONFIGS`` tiles to keep its registers."""
    return dot_precision() == "ieee" and torch.float32 in dtypes


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids, in Python (``triton.cdiv`` from the host goes through Triton's JIT
    wrapper: microseconds per call)."""
    return -(-a // b)


def next_pow2(n: int, floor: int = 16) -> int:
    """Smallest power of two >= max(n, floor): ``tl.dot`` needs every dimension >= 16. (In Python: calling
    ``triton.next_power_of_2`` from the host goes through Triton's JIT wrapper, microseconds per launch.)"""
    n = int(n)
    return max(floor, 1 if n <= 1 else 1 << (n - 1).bit_length())


# --------------------------------------------------------------------------------------------------- the kernel
@triton.jit
def dropout_keep(seed, offsets, p):
    """The keep mask of non-negative int64 element ``offsets``: the 16-bit half ``offsets % 2`` (0: low) of word
    ``(offsets // 2) % 4`` of the Philox call on counter ``offsets // 8`` (eight neighbouring elements share one call
    in fastpeft's mask specification), as the uniform ``h * 2**-16`` compared with ``p`` in fp32. Each element still
    runs its own call here: the GPU kernels gain nothing in rounds, they only draw the same mask as the CPU passes,
    which do share the call."""
    w0, w1, w2, w3 = tl.randint4x(seed, offsets // 8)
    # Range compares on o % 8 pick the word: selecting by a word index costs the fused GEMM registers (stack at r=64).
    word = offsets % 8
    w = tl.where(word < 2, w0, tl.where(word < 4, w1, tl.where(word < 6, w2, w3)))
    half = tl.where(offsets % 2 == 0, w & 0xFFFF, w >> 16)
    return half.to(tl.float32) * 1.52587890625e-05 >= p


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of program ``pid`` over an ``(M, N)`` output in grouped order: ``GROUP_M`` row blocks
    share each column block of the right operand while it is hot in L2. (Plain arithmetic, not ``tl.cdiv``: a
    ``@triton.jit`` of Triton's own that the interpreter refuses when Triton was imported in the other mode.)"""
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def add_low_rank_product(acc, pre_ptr, upre_ptr, rm, rn, mask_m, mask_n, RP,
                         stride_pm, stride_pq, stride_qq, stride_qn,
                         BLOCK_RP: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``acc (BLOCK_M, BLOCK_N) + pre[rm, :RP] @ upre[:RP, rn]`` in ``BLOCK_RP`` slices: the LoRA up-projection of
    precomputed (scaled) down-projections, ``pre`` rounded to ``upre``'s dtype as PEFT's ``lora_B`` input is."""
    offs_q = tl.arange(0, BLOCK_RP)
    for q0 in range(0, RP, BLOCK_RP):
        qq = q0 + offs_q
        pre = tl.load(pre_ptr + rm[:, None] * stride_pm + qq[None, :] * stride_pq,
                      mask=mask_m[:, None] & (qq[None, :] < RP), other=0.0)
        uq = tl.load(upre_ptr + qq[:, None] * stride_qq + rn[None, :] * stride_qn,
                     mask=(qq[:, None] < RP) & mask_n[None, :], other=0.0)
        acc = tl.dot(pre.to(upre_ptr.dtype.element_ty).to(DOT_DTYPE), uq.to(DOT_DTYPE), acc,
                     input_precision=INPUT_PRECISION)
    return acc


# The dropout seed changes every call: specializing on it (seed == 1, seed % 16 == 0) would compile new variants.
@triton.jit(do_not_specialize=["seed"])
def _fused_gemm_kernel(
    # pointers: main operands, low-rank operands, IA3 vectors, outputs
    a_ptr, b_ptr, bias_ptr,
    dn_ptr, up_ptr, rscale_ptr,
    pre_ptr, upre_ptr,
    vin_ptr, vout_ptr,
    other_ptr, colsum_ptr,
    out_ptr, down_ptr,
    # dimensions and the dropout draw; M_BUCKET (M rounded up to a power of two) is only the autotune key
    M, N, K, R, RP, seed, p, drop_cols, M_BUCKET,
    # strides
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_dk, stride_dr, stride_ur, stride_un,
    stride_pm, stride_pq, stride_qq, stride_qn,
    stride_xm, stride_xn, stride_om, stride_on, stride_sm, stride_sr,
    # meta-parameters
    HAS_BIAS: tl.constexpr, FUSE_DOWN: tl.constexpr, DROP_IN: tl.constexpr, DROP_OUT: tl.constexpr,
    HAS_PRE: tl.constexpr, IN_SCALE: tl.constexpr, OUT_SCALE: tl.constexpr, COLSUM: tl.constexpr,
    STORE_OUT: tl.constexpr, STORE_DOWN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_RP: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out (M, N) = a (M, K) @ b (K, N) + epilogue terms; see the module docstring. fp32 accumulation; fp32 dots
    in ``INPUT_PRECISION`` (``dot_precision()``)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rm = offs_m.to(tl.int64)  # int64: M * K overflows int32 at long contexts
    rn = offs_n.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    down = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # pointer tiles are built once and advanced by BLOCK_K: rebuilding 64-bit addresses every step costs the
    # registers the accumulators need
    a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + rn[None, :] * stride_bn
    d_ptrs = dn_ptr + offs_k[:, None] * stride_dk + offs_r[None, :] * stride_dr
    v_ptrs = vin_ptr + offs_k
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if IN_SCALE:
            # PEFT rounds (x * l) to l's dtype, then to x's dtype, before the base matmul
            v = tl.load(v_ptrs, mask=mask_k, other=0.0)
            a = (a.to(tl.float32) * v.to(tl.float32)[None, :]).to(vin_ptr.dtype.element_ty).to(a_ptr.dtype.element_ty)
            v_ptrs += BLOCK_K
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if FUSE_DOWN:
            d = tl.load(d_ptrs, mask=mask_k[:, None] & (offs_r[None, :] < R), other=0.0)
            if DROP_IN:
                rk = (k0 + offs_k).to(tl.int64)
                keep = dropout_keep(seed, rm[:, None] * drop_cols + rk[None, :], p)
                ad = tl.where(keep, a.to(tl.float32) / (1.0 - p), 0.0)
                down = tl.dot(ad.to(dn_ptr.dtype.element_ty), d, down, input_precision=INPUT_PRECISION)
            else:
                down = tl.dot(a.to(dn_ptr.dtype.element_ty), d, down, input_precision=INPUT_PRECISION)
            d_ptrs += BLOCK_K * stride_dk
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if FUSE_DOWN:
        if STORE_DOWN:
            # every column block computed the same rows of `down`; the first one writes them
            first = (offs_r * 0 + pid_n) == 0
            tl.store(down_ptr + rm[:, None] * stride_sm + offs_r[None, :] * stride_sr, down,
                     mask=mask_m[:, None] & ((offs_r < R) & first)[None, :])
        rs = tl.load(rscale_ptr + offs_r, mask=offs_r < R, other=0.0)
        u = tl.load(up_ptr + offs_r[:, None] * stride_ur + rn[None, :] * stride_un,
                    mask=(offs_r[:, None] < R) & mask_n[None, :], other=0.0)
        low = tl.dot((down * rs[None, :]).to(up_ptr.dtype.element_ty), u, input_precision=INPUT_PRECISION)
        if DROP_OUT:
            keep = dropout_keep(seed, rm[:, None] * drop_cols + rn[None, :], p)
            low = tl.where(keep, low / (1.0 - p), 0.0)
        acc += low
    if HAS_PRE:
        acc = add_low_rank_product(acc, pre_ptr, upre_ptr, rm, rn, mask_m, mask_n, RP,
                                   stride_pm, stride_pq, stride_qq, stride_qn,
                                   BLOCK_RP, upre_ptr.dtype.element_ty, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask_mn = mask_m[:, None] & mask_n[None, :]
    if COLSUM:
        other = tl.load(other_ptr + rm[:, None] * stride_xm + rn[None, :] * stride_xn, mask=mask_mn, other=0.0)
        tl.store(colsum_ptr + pid_m.to(tl.int64) * N + rn, tl.sum(acc * other.to(tl.float32), axis=0), mask=mask_n)
    if OUT_SCALE:
        acc = acc * tl.load(vout_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if STORE_OUT:
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
                 mask=mask_mn)


# ---------------------------------------------------------------------------------------------------- launching
# While set, a callable ``(kernel, args, kwargs, gpu_tiles) -> bool`` shown every launch before it runs
# (``fastpeft.kernels.compile_check.LaunchRecorder``): the compile checks compile the specializations of the launches
# that really run. None by default, so a launch pays one None check for it.
RECORDER = None


def launch(kernel, grid, args: tuple, kwargs: dict, gpu_tiles=None) -> None:
    """``kernel[grid](*args, **kwargs)`` (``kernel`` a ``@triton.jit`` function or its autotuner), shown to
    ``RECORDER`` first when one is set; the launch is skipped when the recorder returns False (a recording run
    wants the specializations, not the numbers).

    ``gpu_tiles(arch, named)`` (called by a recorder only; ``named``: the arguments by name): the keyword arguments
    that replace this launch's tile on a GPU of ``arch``, one dict per autotune config, where this launch runs the
    interpreter's stand-in tile (or is autotuned: then ``kwargs`` has no tile)."""
    if RECORDER is not None and not RECORDER(kernel, args, kwargs, gpu_tiles):
        return
    kernel[grid](*args, **kwargs)


# ------------------------------------------------------------------------------------------------------ configs
# (BLOCK_M, BLOCK_N, BLOCK_K for 16-bit inputs, num_warps, num_stages); fp32 inputs halve BLOCK_K so that the
# pipelined tiles take the same shared memory. Chosen to fit 163 KB (sm_80) / 227 KB (sm_90) with the fused
# low-rank tiles (BLOCK_R <= 64) and to compile without spills (tests/test_triton_compile.py checks both).
GEMM_CONFIGS = {
    # sm_80's second tile is 64x64: at 64x128 with 4 warps the fused low-rank accumulator pushed LoRA forward to 255
    # registers and an 8-byte stack
    80: [(128, 128, 32, 8, 3), (64, 64, 32, 4, 4)],
    90: [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 64, 32, 4, 3)],
}
# The one tile of the in-GEMM dropout variants (see ``config_allowed``).
DROPOUT_TILE = {80: (64, 64, 32, 4, 4), 90: (64, 64, 32, 4, 3)}
GROUP_M = 8
# Largest padded low-rank width fused into the base GEMM's K loop. Every column block recomputes the (BLOCK_M,
# BLOCK_R) down-projection, costing BLOCK_R / BLOCK_N extra tensor-core work: at 64 / 128 that is still cheaper than
# a second pass over X, beyond it the separate down-projection kernel wins (and registers run out).
MAX_FUSED_R = 64
INTERPRET_CONFIG = (32, 32, 32, 4, 1)


class _FixedStandIn(tuple):
    """A tile config with ``INTERPRET_CONFIG``'s values that stands, under the interpreter, for the first config of
    the GPU's table (``gpu_config``) rather than for the autotuner's pick: a distinct object, so a launch recorder
    can tell the two apart."""


INTERPRET_FIXED_CONFIG = _FixedStandIn(INTERPRET_CONFIG)
# Where routes are not measured (direct kernel calls, the interpreter), calls with fewer rows than this take the
# torch-GEMM modes: a tile of BLOCK_M >= 64 rows would be mostly padding.
UNMEASURED_SMALL_M = 64
# Launches with exact fp32 dots (``exact_fp32``): FMA code holds its operands and accumulators in each thread's
# registers, and of the tiles tried (64x64 with 8 warps, 32x64, 64x32, 32x32) only 32x32 compiles without stack for
# every variant with the fused rank-64 down-projection on sm_80 and sm_90. On sm_90 the in-loop dropout variant at
# rank 8 (strides not multiples of 16) kept a value on an 8-byte stack at 2 stages and none at 3.
EXACT_FP32_CONFIGS = {80: [(32, 32, 32, 4, 2)], 90: [(32, 32, 32, 4, 3)]}


def gemm_configs(arch: int, exact: bool) -> list:
    """The autotune configs of the fused GEMM for ``arch``; ``exact``: the launch has exact fp32 dots."""
    return EXACT_FP32_CONFIGS[arch] if exact else GEMM_CONFIGS[arch]


def block_k(config, dtype: torch.dtype) -> int:
    return config[2] // 2 if dtype == torch.float32 else config[2]


def pruned(configs: list, keep) -> list:
    """The configs for which ``keep(config)`` holds, or the last one if none does (the autotuner needs one)."""
    return [c for c in configs if keep(c)] or configs[-1:]


def config_kwargs(config, dtype: torch.dtype, k_name: str = "BLOCK_K") -> dict:
    """Kernel meta-parameters of a ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` config; fp32 operands
    halve the reduction tile (``k_name``) so the pipelined tiles take the same shared memory."""
    bm, bn, _, warps, stages = config
    return {"BLOCK_M": bm, "BLOCK_N": bn, k_name: block_k(config, dtype), "GROUP_M": GROUP_M,
            "num_warps": warps, "num_stages": stages}


def autotuned(kernel, configs_by_arch: dict, arch: int, fp32: bool, key: list, k_name: str = "BLOCK_K",
              allowed=None):
    """``kernel`` wrapped in ``triton.autotune`` over ``configs_by_arch[arch]``, keyed on ``key``;
    ``allowed(arch, config, flags)`` prunes configs per launch (those that would spill for its flags)."""
    dtype = torch.float32 if fp32 else torch.float16
    configs, table = [], {}
    for config in configs_by_arch[arch]:
        kw = config_kwargs(config, dtype, k_name)
        warps, stages = kw.pop("num_warps"), kw.pop("num_stages")
        configs.append(triton.Config(kw, num_warps=warps, num_stages=stages))
        table[id(configs[-1])] = config
    def early_prune(configs, named_args, **flags):
        kept = pruned(configs, lambda c: allowed is None or allowed(arch, table[id(c)], flags))
        # Timing configs inside a CUDA graph capture would record the timing launches into the graph: a key first
        # met while capturing takes its first allowed config untimed, and keeps it (run once before capturing to
        # tune it).
        return kept[:1] if capturing_cuda_graph() else kept

    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": early_prune})(kernel)


def capturing_cuda_graph() -> bool:
    """Whether the current CUDA stream is being captured into a graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# Tuned per M bucket, not per exact M: each new token count (every step under dynamic padding) would otherwise
# benchmark every config again.
_AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "HAS_BIAS", "FUSE_DOWN", "DROP_IN", "DROP_OUT", "HAS_PRE", "IN_SCALE",
                 "OUT_SCALE", "COLSUM", "STORE_OUT", "BLOCK_R"]


def _dropout_in_gemm(flags: dict) -> bool:
    """The variants that draw Philox dropout inside the GEMM (in the K loop, or on the fused dX epilogue)."""
    return bool(flags.get("FUSE_DOWN") and (flags.get("DROP_IN") or flags.get("DROP_OUT")))


def config_allowed(arch: int, config: tuple, flags: dict) -> bool:
    """Whether the autotuner may run ``config`` for this flag combination (tests/test_triton_compile.py compiles
    exactly the allowed pairs and asserts no spills).

    The Philox state of in-GEMM dropout competes with the accumulators for registers: at 128x128 (and at 64x128
    with a 64-deep K step) those variants compiled to 255 registers and 8 to 1240 bytes of stack on both
    architectures. They run the small ``DROPOUT_TILE`` only; the other variants keep the large tiles (on sm_90 the
    small tile is reserved for dropout, so it is not tuned for them).
    """
    if tuple(config) in EXACT_FP32_CONFIGS[arch]:
        return True  # the only tile of the exact-fp32 table, for every variant
    if _dropout_in_gemm(flags):
        return tuple(config) == DROPOUT_TILE[arch]
    return arch < 90 or tuple(config) != DROPOUT_TILE[arch]


@functools.lru_cache(maxsize=None)
def _autotuned(arch: int, fp32: bool, exact: bool):
    """The GEMM kernel autotuned over this architecture's configs (``exact``: those for exact fp32 dots), keyed on
    shape and flags; configs that would spill for the launch's flags are pruned before tuning."""
    return autotuned(_fused_gemm_kernel, {arch: gemm_configs(arch, exact)}, arch, fp32, _AUTOTUNE_KEY,
                     allowed=config_allowed)


def arch_of(device: torch.device) -> int:
    """80 for Ampere and Ada, 90 for Hopper and newer (config table row)."""
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def _gemm_dot_dtypes(named: dict) -> list:
    """The dtypes of the dot operands of a fused-GEMM launch whose arguments by name are ``named``."""
    dtypes = [named["a_ptr"].dtype]
    if named["FUSE_DOWN"]:
        dtypes += [named["dn_ptr"].dtype, named["up_ptr"].dtype]
    if named["HAS_PRE"]:
        dtypes.append(named["upre_ptr"].dtype)
    return dtypes


def gemm_gpu_tiles(arch: int, named: dict) -> list[dict]:
    """The tiles an autotuned fused-GEMM launch (arguments by name: ``named``) may run on ``arch``: the configs the
    autotuner keeps for its flags, as keyword arguments (a launch recorder compiles each)."""
    a_dtype = named["a_ptr"].dtype
    configs = gemm_configs(arch, exact_fp32(*_gemm_dot_dtypes(named)))
    return [config_kwargs(c, a_dtype) for c in pruned(configs, lambda c: config_allowed(arch, c, named))]


def gemm_first_gpu_tile(arch: int, named: dict) -> list[dict]:
    """The tile ``gpu_config`` gives a fused-GEMM launch on ``arch``: the first config of its table."""
    a_dtype = named["a_ptr"].dtype
    return [config_kwargs(gemm_configs(arch, exact_fp32(*_gemm_dot_dtypes(named)))[0], a_dtype)]


def _strides2(t, swap=False):
    if t is None:
        return 0, 0
    s0, s1 = t.stride(0), t.stride(1)
    return (s1, s0) if swap else (s0, s1)


def launch_gemm(a, b, out, *, bias=None, dn=None, up=None, rscale=None, down=None, pre=None, upre=None, vin=None,
                vout=None, other=None, colsum=None, seed=0, p=0.0, drop_cols=0, drop_in=False, drop_out=False,
                store_out=True, config=None):
    """Launch ``_fused_gemm_kernel``: ``out (M, N) = a (M, K) @ b (K, N)`` plus the terms given.

    ``a``, ``b`` are 2-D views of any strides in the same dtype (``b`` is usually ``W.t()``); ``dn`` ``(K, R)`` and
    ``up`` ``(R, N)`` are in the adapter compute dtype, ``rscale`` ``(R,)`` fp32, ``down`` an fp32 ``(M, R)`` buffer
    (or None), ``pre`` fp32 ``(M, RP)`` and ``upre`` ``(RP, N)``; ``vin`` ``(K,)``, ``vout`` ``(N,)``; ``other``
    ``(M, N)`` with ``colsum`` an fp32 ``(cdiv(M, BLOCK_M), N)`` buffer. ``config`` overrides the autotuner.
    Returns the ``BLOCK_M`` used (needed to size ``colsum``: pass ``config`` when ``colsum`` is given).
    """
    M, K = a.shape
    N = b.shape[1]
    fuse = dn is not None
    R = dn.shape[1] if fuse else 0
    RP = pre.shape[1] if pre is not None else 0
    dummy = out if out is not None else a
    args = (
        a, b, bias if bias is not None else dummy,
        dn if fuse else dummy, up if fuse else dummy, rscale if fuse else dummy,
        pre if pre is not None else dummy, upre if upre is not None else dummy,
        vin if vin is not None else dummy, vout if vout is not None else dummy,
        other if other is not None else dummy, colsum if colsum is not None else dummy,
        out if out is not None else dummy, down if down is not None else dummy,
        M, N, K, R, RP, int(seed), float(p), int(drop_cols), next_pow2(M),
        *_strides2(a), *_strides2(b),
        *_strides2(dn), *_strides2(up),
        *_strides2(pre), *_strides2(upre),
        *_strides2(other), *_strides2(out), *_strides2(down),
    )
    flags = dict(
        HAS_BIAS=bias is not None, FUSE_DOWN=fuse, DROP_IN=bool(drop_in), DROP_OUT=bool(drop_out),
        HAS_PRE=pre is not None, IN_SCALE=vin is not None, OUT_SCALE=vout is not None, COLSUM=colsum is not None,
        STORE_OUT=bool(store_out), STORE_DOWN=down is not None, INPUT_PRECISION=dot_precision(),
        BLOCK_R=next_pow2(R), BLOCK_RP=32,
    )
    if config is None and interpreting():
        config = INTERPRET_CONFIG
    if config is not None:
        kw = config_kwargs(config, a.dtype)
        grid = (cdiv(M, kw["BLOCK_M"]) * cdiv(N, kw["BLOCK_N"]),)
        # the interpreter's stand-in tiles are recorded as the tiles a GPU would run there
        tiles = gemm_gpu_tiles if config is INTERPRET_CONFIG else (
            gemm_first_gpu_tile if config is INTERPRET_FIXED_CONFIG else None)
        launch(_fused_gemm_kernel, grid, args, {**flags, **kw}, tiles)
        return kw["BLOCK_M"]
    exact = exact_fp32(a.dtype, *(t.dtype for t in (dn, up, upre) if t is not None))
    kernel = _autotuned(arch_of(a.device), a.dtype == torch.float32, exact)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    launch(kernel, grid, args, flags, gemm_gpu_tiles)
    return None


def gpu_config(a: torch.Tensor, *dtypes: torch.dtype):
    """A fixed config for launches whose output size depends on BLOCK_M (the COLSUM partials); ``dtypes``: the
    other dot operands' dtypes besides ``a``'s."""
    if interpreting() or a.device.type != "cuda":
        return INTERPRET_FIXED_CONFIG
    return gemm_configs(arch_of(a.device), exact_fp32(a.dtype, *dtypes))[0]
