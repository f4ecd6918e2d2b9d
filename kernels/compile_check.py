"""Ahead-of-time compilation of every fastpeft Triton kernel for sm_80 and sm_90, without a GPU.

``specs(arch)`` lists every kernel variant the launchers can run (each flag combination, each autotune config of
that architecture, each dtype); ``compile_spec`` compiles one with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` and measures it: registers, stack and local (spill) bytes from Triton's
bundled ``cuobjdump --dump-resource-usage``, shared memory from the kernel metadata, and whether the PTX uses tensor
cores (``mma.sync`` on sm_80, ``wgmma`` on sm_90). Used by ``tests/test_triton_compile.py`` and by
``python -m fastpeft.kernels.report`` (which writes KERNELS.md).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import _common, lora, mixed_lora

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}
_TORCH_DT = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


@dataclass
class Spec:
    name: str          # kernel variant, e.g. "lora_fwd_fused"
    arch: int
    dtype: str
    config: str        # human-readable tile config
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    gemm: bool         # whether tensor cores are required


@dataclass
class Result:
    spec: Spec
    registers: int
    stack: int
    local: int
    shared: int
    tensor_cores: bool
    ptx_mma: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ fused GEMM variants
# name -> (flags, which pointer is in which dtype). "dt" means the input dtype, "f32" fp32.
GEMM_VARIANTS = {
    # LoRA forward, no dropout, ranks concatenated and fused into the K loop (auto-chosen for M >= 64)
    "lora_fwd_fused": dict(HAS_BIAS=True, FUSE_DOWN=True, STORE_DOWN=True),
    # same with dropout applied to the loaded X tiles (only under mode="fused")
    "lora_fwd_fused_dropin": dict(HAS_BIAS=True, FUSE_DOWN=True, DROP_IN=True, STORE_DOWN=True),
    # LoRA forward with XA precomputed by _down_proj_kernel (dropout or rank > 64)
    "lora_fwd_split": dict(HAS_BIAS=True, HAS_PRE=True),
    # LoRA dX: dY W with G = dY B from the same tiles and the masked (G A) in the epilogue
    "lora_dx_fused_dropout": dict(FUSE_DOWN=True, DROP_OUT=True, STORE_DOWN=True),
    "ia3_fwd_feedforward": dict(HAS_BIAS=True, IN_SCALE=True),
    "ia3_fwd_output": dict(HAS_BIAS=True, OUT_SCALE=True),
    "ia3_bwd_feedforward": dict(OUT_SCALE=True, COLSUM=True),
    "ia3_bwd_output_dscale": dict(HAS_BIAS=True, COLSUM=True, STORE_OUT=False),
    "ia3_bwd_output_dx": dict(IN_SCALE=True),
}
_FLAG_NAMES = ["HAS_BIAS", "FUSE_DOWN", "DROP_IN", "DROP_OUT", "HAS_PRE", "IN_SCALE", "OUT_SCALE", "COLSUM",
               "STORE_OUT", "STORE_DOWN"]
_F32_PTRS = {"rscale_ptr", "pre_ptr", "colsum_ptr", "down_ptr"}


def _jit(fn):
    """A compilable JITFunction even when the module was imported under TRITON_INTERPRET=1 (tests mix both)."""
    from triton.runtime.interpreter import InterpretedFunction

    return triton.JITFunction(fn.fn) if isinstance(fn, InterpretedFunction) else fn


def _signature(fn, dt: str, f32_ptrs: set, unit: dict, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs or name in unit:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in f32_ptrs else f"*{dt}"
        elif name == "p":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _tensor_cores_expected(dt: str) -> bool:
    """16-bit dots run on tensor cores; fp32 dots do only in TF32, which the launchers use only where torch's matmul
    is allowed TF32 too (``_common.dot_precision``), so by default fp32 variants are exact FMA code."""
    return dt != "fp32" or _common.dot_precision() == "tf32"


def _gemm_specs(arch: int, dt: str):
    fn = _jit(_common._fused_gemm_kernel)
    # contiguous row-major X and W (b = W^T): unit strides are specialised to 1 by the launcher, as here
    unit = {"stride_ak": 1, "stride_bk": 1, "stride_on": 1, "stride_sr": 1}
    for name, flags in GEMM_VARIANTS.items():
        torch_dt = getattr(torch, _TORCH_DT[dt])
        for config in _common.gemm_configs(arch, _common.exact_fp32(torch_dt)):
            if not _common.config_allowed(arch, config, flags):
                continue  # the autotuner prunes it for these flags: never launched, so not measured
            kw = _common.config_kwargs(config, torch_dt)
            warps, stages = kw.pop("num_warps"), kw.pop("num_stages")
            ce = {f: False for f in _FLAG_NAMES}
            ce["STORE_OUT"] = True
            ce.update(flags)
            # the widest fused rank the dispatcher allows (worst case for registers)
            ce.update(kw, BLOCK_R=_common.MAX_FUSED_R if ce["FUSE_DOWN"] else 16, BLOCK_RP=32,
                      INPUT_PRECISION=_common.dot_precision())
            ce.update(unit)
            f32 = set(_F32_PTRS)
            if name.startswith("lora"):
                f32.add("bias_ptr")  # the folded base + lora bias is fp32
            sig = _signature(fn, dt, f32, unit, ce)
            cfg = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{warps} s{stages}"
            yield Spec(name, arch, dt, cfg, fn, sig, ce, warps, stages, _tensor_cores_expected(dt))


def _small_specs(arch: int, dt: str):
    table = [
        ("lora_down_proj_dropout", lora._down_proj_kernel, "down_proj", {"DROP": True, "BLOCK_R": 64},
         {"out_ptr"}, {"stride_ak": 1, "stride_or": 1}),
        ("lora_update_dropout", lora._lowrank_update_kernel, "lowrank_update",
         {"DROP": True, "HAS_VBIAS": True, "BLOCK_R": 32}, {"lhs_ptr", "rscale_ptr", "vbias_ptr"},
         {"stride_bn": 1, "stride_on": 1}),
        ("lora_grad_a_dropout", lora._grad_a_kernel, "grad_a", {"DROP": True, "BLOCK_R": 64}, {"g_ptr"},
         {"stride_xk": 1, "stride_ok": 1}),
    ]
    for name, fn, tile, ce, f32, unit in table:
        fn = _jit(fn)
        bm, bk, warps = lora.small_tile(tile, getattr(torch, _TORCH_DT[dt]))
        ce = dict(ce, BLOCK_M=bm, INPUT_PRECISION=_common.dot_precision(),
                  **({"BLOCK_N": bk} if "BLOCK_N" in fn.arg_names else {"BLOCK_K": bk}))
        ce.update(unit)
        sig = _signature(fn, dt, f32, unit, ce)
        yield Spec(name, arch, dt, f"{bm}x{bk}x{ce['BLOCK_R']} w{warps}", fn, sig, ce, warps, 2,
                   _tensor_cores_expected(dt))


def _mixed_specs(arch: int, dt: str):
    """The mixed-adapter shrink and expand kernels as ``mixed_lora.mixed_lora_`` launches them: each padded rank
    tile, fp32 stacked adapters, int32 row tables."""
    tables = ("order_ptr", "blk_adapter_ptr", "blk_start_ptr", "blk_len_ptr")
    for name, fn, act in (("mixed_shrink", mixed_lora._mixed_shrink_kernel, "x_ptr"),
                          ("mixed_expand", mixed_lora._mixed_expand_kernel, "y_ptr")):
        fn = _jit(fn)
        for rp in mixed_lora.RANK_TILES:
            block_k, block_n, warps = mixed_lora.tiles()
            ce = {"BLOCK_M": mixed_lora.BLOCK_M, "BLOCK_R": rp, "INPUT_PRECISION": _common.dot_precision(),
                  **({"BLOCK_K": block_k} if "BLOCK_K" in fn.arg_names else {"BLOCK_N": block_n})}
            sig = {}
            for arg in fn.arg_names:
                if arg in ce:
                    sig[arg] = "constexpr"
                elif arg in tables:
                    sig[arg] = "*i32"
                elif arg.endswith("_ptr"):
                    sig[arg] = f"*{dt}" if arg == act else "*fp32"
                else:
                    sig[arg] = "i32"
            cfg = f"{mixed_lora.BLOCK_M}x{ce.get('BLOCK_K', ce.get('BLOCK_N'))}x{rp} w{warps} s{mixed_lora.NUM_STAGES}"
            # the dots are on the fp32 stacked adapters whatever the activations' dtype
            yield Spec(name, arch, dt, cfg, fn, sig, ce, warps, mixed_lora.NUM_STAGES, _tensor_cores_expected("fp32"))


def specs(arch: int):
    """Every (kernel variant, config, dtype) compiled for ``arch`` (80 or 90)."""
    out = []
    for dt in DTYPES:
        out.extend(_gemm_specs(arch, dt))
        out.extend(_small_specs(arch, dt))
        out.extend(_mixed_specs(arch, dt))
    return out


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    """``{"REG", "STACK", "SHARED", "LOCAL"}`` of the (single) kernel in ``cubin``, from ``cuobjdump``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(path)
    found = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    if "REG" not in found:
        raise RuntimeError(f"cuobjdump gave no resource usage:\n{text}")
    return found


_NOT_ALIGNED = {"seed", "p", "R", "RP"}


def _attrs(spec: Spec) -> dict:
    """``tt.divisibility=16`` where the JIT launcher would put it for LLaMA-like shapes (aligned pointers, sizes
    and strides multiple of 16): without it loads are neither vectorised nor pipelined, which is not what runs."""
    attrs = {}
    for i, name in enumerate(spec.fn.arg_names):
        kind = spec.signature[name]
        if kind == "constexpr" or name in _NOT_ALIGNED:
            continue
        attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def compile_spec(spec: Spec) -> Result:
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=_attrs(spec))
    k = triton.compile(src, target=GPUTarget("cuda", spec.arch, 32),
                       options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    ptx = k.asm["ptx"]
    usage = resource_usage(k.asm["cubin"])
    mma = {"mma.sync": ptx.count("mma.sync"), "wgmma": ptx.count("wgmma.mma_async")}
    tensor_cores = mma["wgmma"] > 0 if spec.arch >= 90 else mma["mma.sync"] > 0
    return Result(spec, usage["REG"], usage.get("STACK", 0), usage.get("LOCAL", 0),
                  int(k.metadata.shared) + usage.get("SHARED", 0), tensor_cores, mma)


# --------------------------------------------------------------------------------------------- parallel measure
def _specs_cached(arch: int):
    cache = _specs_cached.__dict__.setdefault("cache", {})
    if arch not in cache:
        cache[arch] = specs(arch)
    return cache[arch]


def _measure_one(key: tuple) -> tuple:
    """Worker: compile spec ``index`` of ``specs(arch)``; returns plain values (JIT functions do not pickle)."""
    arch, index = key
    r = compile_spec(_specs_cached(arch)[index])
    return r.registers, r.stack, r.local, r.shared, r.tensor_cores, r.ptx_mma


def measure_all(archs=(80, 90), workers: int | None = None) -> list[Result]:
    """Compile every spec of ``archs``, ``workers`` processes at a time (default: the CPU count, at most 4).

    Each compile is single-threaded LLVM + ptxas work of a few seconds, so the list of ~130 variants is dominated by
    how many run at once. Workers are spawned, not forked, so they start without the parent's threads.
    """
    import concurrent.futures
    import multiprocessing

    keys = [(arch, i) for arch in archs for i in range(len(_specs_cached(arch)))]
    workers = workers or min(4, os.cpu_count() or 1)
    if workers <= 1:
        values = [_measure_one(k) for k in keys]
    else:
        # Spawned workers inherit os.environ; a test session may have set TRITON_INTERPRET=1 for interpreter tests,
        # and the workers must import Triton in compile mode.
        saved = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "0"
        try:
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                values = list(pool.map(_measure_one, keys))
        finally:
            if saved is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = saved
    return [Result(_specs_cached(arch)[i], *v) for (arch, i), v in zip(keys, values)]
