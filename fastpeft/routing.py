"""The route table (``fastpeft.routing``): every way each op can run, and the measured choice among them.

An op (``lora_forward``, ``lora_backward``, ``lora_mixed_forward``, ``lora_down``, ``lora_dy``, ``ia3_forward``,
``ia3_backward``, ``dora_forward``, ``dora_backward``, ``widened_product``) can run by several *routes* that compute
the same thing with different kernels. Which one is fastest depends on the machine (a CPU with AVX512-BF16 and AMX
runs bf16 GEMMs ~4x faster than fp32; one with AVX2 only runs them many times slower), on the shapes and on the
dtypes, so no threshold in the code decides it. The first call of a *route key* times every eligible route on the
real tensors, keeps the fastest, and reuses it for every later call with that key:

- the key (``RouteKey``): op, backend, weight kind (``dense``/``nf4``/``fp4``/``int8``), the dtypes of ``x``, the
  weight and the adapters, ``M`` rounded up to a power of two, ``N`` and ``K``, dropout on/off, the total rank
  rounded up to a power of two, the number of adapters and what backward must return (for ``lora_down``, how many
  parts of ``A`` its ``split`` route multiplies, which depends on whether the call is an inference call);
- the choice is kept in memory (so one process takes the same route for the same key) and in a small versioned
  JSON file (``FASTPEFT_ROUTE_CACHE``, default ``$XDG_CACHE_HOME/fastpeft/routes.json``; ``off`` keeps choices in
  memory only), filed under a fingerprint of this machine: CPU model and SIMD path (or GPU name), thread count, the
  versions of fastpeft, torch and bitsandbytes, and the build of fastpeft's compiled kernels. A different machine,
  version or build measures again;
- the first measurement times the candidates back to back, each run on the caches and allocator state the
  previous candidate left, and often while the process is still busy (loading a model, other threads starting):
  a route can win there and lose where the op really runs (between the other ops of a training step, which leave
  other data in the caches and other free memory behind). So a first choice serves this process only until its
  key's ``CONFIRM_AFTER_CALLS``-th call; from then on the key's real calls take the candidates that came within
  ``ROTATE_WITHIN`` of the fastest in turn (``CALL_ROUNDS`` rounds, each in its own shuffled order), each call
  timed as it runs, and the route with the lowest median over its calls is kept and written to the file. An op
  that a route of another op runs (``lora_down``, ``lora_dy``, ``widened_product``) is called many times over while
  that route is timed: those calls are not counted, and take the op's choice as it is.

Eligibility is a matter of correctness or limits, never speed (see ``ROUTE_LIMITS``); among eligible routes only
the clock decides. ``FASTPEFT_ROUTE`` or :func:`set_route` pins a route: ``FASTPEFT_ROUTE=compose`` pins it for
every op that has it, ``FASTPEFT_ROUTE=lora_forward=gemv,lora_backward=fused`` per op. A pinned route that is not
eligible for a call (``gemv`` for a transposed weight) is reported in :func:`routes` and the call is measured as
usual. :func:`routes` lists every choice made in this process, with the timings behind it.

A caller that repeats one kind of evaluation call (a fused layer at decode) may keep the route :func:`settled_call`
names and take it itself while :func:`generation` and ``FASTPEFT_ROUTE`` are unchanged, counting its calls toward a
first measurement's confirmation (:class:`TakenRoutes`; ``fastpeft.layers.SettledLayerCall``).

Every route of every op is tested against ``fastpeft.reference`` by pinning it, so a route changes speed, never
meaning (within the tolerance rules of the tests). Processes of one distributed job may choose different routes for
the same key (each measures its own machine); their results then differ by rounding only, never by more than the
tolerance rules allow, so data-parallel gradients still agree to that precision.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import random
import threading
import time
import warnings
import zlib
from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple, Optional

import torch

from . import _env, guards
from ._atomic import atomic_file, locked

CACHE_VERSION = 1

# What each route is; the backends implement them (fastpeft.backends.cpu: CpuBackend; fastpeft.backends.triton:
# TritonBackend, the routes marked "Triton"). ``compose`` (fastpeft.backends.compose) is every backend's floor.
ROUTES: dict[str, dict[str, str]] = {
    "lora_forward": {
        "compose": "vendor GEMM for x W^T in x's dtype (oneDNN/MKL on the CPU, cuBLAS on a GPU; a quantized weight "
                   "decoded into a reused buffer of x's dtype first); x A^T by the vendor GEMM in the adapter's dtype "
                   "(p = 0; x narrower than the adapter is widened in fastpeft's C++ pass on the CPU, as a torch copy "
                   "on a GPU) or by fastpeft's Philox pass (p > 0, no copy of x); y.addmm_(xa, B^T, alpha=s)",
        "compose_pass": "Triton: compose with x narrower than an adapter (bf16 x, fp32 A) widened in the registers of "
                        "fastpeft's down-projection kernel at p = 0 too: no copy of x, one kernel launch more",
        "compose_fp32": "compose with the base product and update in fp32 (x, W widened transiently), rounded once",
        "fused": "vendor GEMM in x's dtype, then one C++ pass over x for all adapters (dropout regenerated) and one "
                 "in-place C++ epilogue over y; a quantized weight decoded tile by tile inside the product",
        "fused_fp32": "fused with the base GEMM widened to fp32, rounded once after the adapter terms",
        "fused_pairs": "fused_fp32 with the fp32 base product from the bf16 x and weight as they are (every product "
                       "exact, fp32 sums: fastpeft._C.widened_mm or widened_mm_nn over oneDNN's bf16 block kernel), "
                       "y rounded once",
        "fused_pairs_x": "fused_pairs with the kernel rearranging x into bf16 pairs once and reading the weight in "
                         "place (fused_pairs rearranges the weight a tile at a time)",
        "decoded_fused": "a quantized weight decoded into a reused buffer of x's dtype and the vendor GEMM (compose's "
                         "base product), then fused's C++ passes for the adapters",
        "gemv": "one pass over the weight rows (decoded in registers for a quantized weight), every activation row, "
                "the adapter term and the biases added in the same pass",
        "bnb_native": "bitsandbytes' own 4-bit kernel for the base product, then the composition's adapter terms: on "
                      "the CPU its AVX-512 kernel (its tiled layout: the module's own after bitsandbytes repacked it, "
                      "else one copy made once); on a GPU its CUDA product (torch.ops.bitsandbytes.gemm_4bit: its "
                      "GEMV/GEMM kernels or its decode and cuBLAS, as it picks per shape) on the packed bytes",
        "bnb_native_fused": "bnb_native with the adapter terms by the C++ passes (fp32 update, y rounded once)",
        "split_pairs": "compose with x A^T from fp32 A split exactly into three bf16 parts (each holding the next 8 "
                       "significant bits), every product exact, fp32 sums, by oneDNN's bf16 block kernel (the bf16 "
                       "units' speed, AMX where the CPU has it)",
        "passes": "Triton: vendor GEMM for x W^T, fastpeft's down-projection kernel (dropout drawn in registers) and "
                  "one in-place low-rank epilogue kernel over y",
        "fused_gemm": "Triton: one fused GEMM; the down-projection shares the X tiles of the K loop, the "
                      "up-projection runs in the epilogue, y is written once",
        "split_gemm": "Triton: the down-projection kernel once (each mask element drawn once), then the GEMM with "
                      "x A^T B^T in its epilogue",
        "cuda_kernels": "cuBLAS for the base GEMM, fastpeft's CUDA kernels (fastpeft._cuda, csrc/cuda) for the "
                        "low-rank passes around it (dropout drawn in registers, the update added in place)",
    },
    "lora_backward": {
        "compose": "dY W by the vendor GEMM in dY's dtype (a quantized weight decoded into a reused buffer first); "
                   "dY B, dY^T h, g A and g^T x by vendor GEMMs in the adapter's dtype; the masked dX/dA pass (C++ on "
                   "the CPU, a Triton kernel on a GPU) when p > 0",
        "compose_pass": "Triton: compose with g^T x for x narrower than the adapter by fastpeft's dA kernel (x widened "
                        "in registers, no copy) at p = 0 too",
        "compose_fp32": "compose in fp32 (dY, W widened transiently)",
        "fused": "one C++ pass over dY (dY B, dB, the bias gradient), the vendor GEMM for dY W, one C++ pass over x "
                 "and dX (dA, dropout regenerated); on the triton backend, a quantized weight decoded tile by tile "
                 "inside dY W",
        "fused_fp32": "fused with dY W widened to fp32",
        "fused_pairs": "fused_fp32 with dY W in fp32 from the bf16 dY and weight as they are (every product exact, "
                       "fp32 sums: fastpeft._C.widened_mm_nn over oneDNN's bf16 block kernel), dX rounded once",
        "decoded_fused": "a quantized weight decoded into a reused buffer of dY's dtype and the vendor GEMM for dY W "
                         "(compose's), fused's C++ passes over dY and over x and dX for the adapters",
        "small": "one C++ call for the whole fp32 single-adapter backward",
        "gemv": "fused with dY W by one pass over the weight in column strips, every dY row at once "
                "(fastpeft._C.strip_mm: exact products of dY's dtype, fp32 sums), dX rounded once",
        "split_pairs": "dY W by the composition's GEMM; dY B, dY^T h, the bias gradient and g^T x with every fp32 "
                       "operand split exactly into three bf16 parts (exact products, fp32 sums, oneDNN's bf16 block "
                       "kernel); dX += g A as compose adds it",
        "passes": "Triton: dY W by the vendor GEMM, G = dY B by the down-projection kernel, the masked G A by the "
                  "low-rank kernel, dA by its kernel",
        "fused_gemm": "Triton: dY W and G = dY B from the same dY tiles, (G A) * mask in the GEMM's epilogue",
        "split_gemm": "Triton: G by the down-projection kernel, then the GEMM with G A in its epilogue (an adapter "
                      "with dropout by the low-rank kernel)",
        "cuda_kernels": "cuBLAS for dY W, dY B and dY^T h; fastpeft's CUDA kernels for the masked (g A) added to dX in "
                        "place and for dA (mask regenerated)",
    },
    "lora_update": {
        "compose": "adapter terms alone on a base output computed elsewhere (bitsandbytes' bf16 serving of an fp32 "
                   "layer): x A^T by the vendor GEMM in the adapter's dtype, y.addmm_(xa, B^T, alpha=s)",
        "fused": "the same by the C++ passes: x A^T over x once for all adapters, the in-place epilogue (fp32 update, "
                 "y rounded once)",
    },
    "lora_mixed_forward": {
        "compose": "mixed-adapter batch: per adapter a gather of its rows, x A^T and (.) B^T by torch in the adapter's "
                   "dtype, index_add_ into the base output",
        "fused": "mixed-adapter batch: one C++ pass over runs of rows sorted by adapter, shrink and expand per run, "
                 "the base output updated in place (fastpeft._C.lora_mixed_)",
        "sgmv": "Triton: mixed-adapter batch, one shrink kernel (each row by its own A) and one expand kernel (each "
                "row's y += s xa B^T in place), adapters indexed per row (fastpeft.kernels.mixed_lora)",
    },
    "gemv_prefetch": {
        "nta": "the decoding GEMV over a dense weight requests the rows four groups ahead with the non-temporal hint",
        "l2": "the same requests into L2 (prefetcht1): where a non-temporal request fills L1 alone, a far-ahead one is "
              "evicted before it is read",
        "none": "no software requests: the hardware prefetcher alone",
    },
    "lora_down": {
        "rows": "the cpu backend's x A^T pass (fastpeft._C.lora_xa) over blocks of four rows of x and four of A as "
                "A is stored: each rank a dot product of vector-width partial sums",
        "transposed": "the same pass over A transposed once per call, its ranks padded to whole vectors: one "
                      "accumulator of ranks per row, 16 rows (8 under AVX2) sharing each vector of A^T, each rank's "
                      "products summed in k order",
        "split": "bf16 x: A split exactly into three bf16 parts (two in an inference call, where h only feeds a bf16 "
                 "output), every product exact and the sums in fp32, by oneDNN's bf16 block kernel "
                 "(fastpeft._C.lora_xa_split, the down-projection of split_pairs)",
    },
    "lora_dy": {
        "rows": "the cpu backend's dY pass (fastpeft._C.lora_dy_pass) as a sweep over the rows of dY against B^T for "
                "g = s dY B, and a sweep of column strips for dB = s dY^T h and the bias gradient",
        "outer": "the same as one sweep of outer products over units of dY's columns: each dY element broadcast "
                 "against B's row (g) and against the row's s h (dB), B read where it lies; each unit's share of g "
                 "summed in unit order",
    },
    "ia3_forward": {
        "compose": "vendor GEMM in x's dtype (a quantized weight decoded into a reused buffer), scaling by torch",
        "compose_fp32": "compose with the GEMM in fp32",
        "gemv": "the one-pass GEMV for the base product",
        "fused": "a quantized weight decoded tile by tile inside the product",
        "bnb_native": "bitsandbytes' AVX-512 4-bit kernel for the base product",
        "fused_gemm": "Triton: the vector in the GEMM's prologue (feedforward) or epilogue",
        "cuda_kernels": "cuBLAS for the GEMM, fastpeft's CUDA column-scale kernel before or after it",
    },
    "ia3_backward": {
        "compose": "dY W by the vendor GEMM in dY's dtype (a quantized weight decoded into a reused buffer)",
        "compose_fp32": "compose with dY W in fp32",
        "fused": "a quantized weight decoded tile by tile inside dY W",
        "fused_gemm": "Triton: dY W with the vector and the reduction of its gradient in the GEMM's epilogue",
        "cuda_kernels": "cuBLAS for dY W, fastpeft's CUDA kernels for the column scale and the vector's gradient",
    },
    "dora_forward": {
        "compose": "DoRA (fastpeft.dora) by vendor GEMMs: x W^T, x A^T, addmm_ of the update, the scale m/n in an "
                   "fp32 epilogue; with dropout a second base product on drop(x) (mask from the backend's pass) by a "
                   "route of widened_product",
        "fused": "DoRA through the backend's LoRA forward (its own measured route) for x W^T + s x A^T B^T, then the "
                 "fp32 scaling epilogue; with dropout the second base product by a route of widened_product",
        "stacked": "with dropout: x and its dropped copy multiplied by W in one product over their 2M rows: fp32 x "
                   "and weight by the vendor GEMM over a transient (2M, K) copy (drop(x) written by the masked pass); "
                   "bf16 ones by one widened product of x and its kept elements (each tile of W rearranged once for "
                   "both; exact products, fp32 sums, 1 / (1 - p) after them); the adapter's update added to both "
                   "halves in fp32, the scaling and the rounding in one pass",
    },
    "widened_product": {
        "widen": "a GEMM in the wider dtype of a product PEFT runs there (fp32 adapters over a bf16 base: DoRA's "
                 "second base product on drop(x), and W A^T of its norm): the operands widened (the weight a block "
                 "of rows at a time)",
        "pairs": "the bf16 operands multiplied as they are, every product exact and the sums in fp32 (the same "
                 "numbers up to the order of the sums) by the C++ block product over oneDNN's bf16 kernel "
                 "(fastpeft._C.widened_mm); the dropout mask applied to x in bf16, 1 / (1 - p) after the sums; for "
                 "W A^T, A split exactly into three bf16 parts",
        "pairs_x": "pairs with the kernel rearranging the kept x into bf16 pairs and reading the weight in place",
        "down": "W A^T of the norm: the weight's rows through the backend's down-projection (the C++ x A^T pass on the "
                "cpu backend), fp32 arithmetic, the weight read in place",
    },
    "dora_backward": {
        "compose": "DoRA backward by vendor GEMMs on c dY (c = m/n): dX, dA, dB; with dropout dY W and the masked "
                   "((c - 1) dY) W + s (c dY B) A",
        "fused": "DoRA backward through the backend's LoRA backward on c dY (its own measured route); with dropout "
                 "one more vendor GEMM corrects dX by (mask / (1 - p) - 1) * ((c - 1) dY) W",
        "stacked": "with dropout: c dY and (c - 1) dY as the halves of one (2M, N) matrix multiplied by W in one "
                   "product (W read once for both: the vendor GEMM in fp32, the widened product for bf16, exact "
                   "products and fp32 sums), the adapter's masked dX term added to the fp32 c dY W by the backend's "
                   "passes, the dropout correction and the rounding in one masked pass",
    },
}

# Where a route may run at all. These are correctness conditions and hard limits, not speed thresholds.
ROUTE_LIMITS: dict[str, str] = {
    "compose_fp32 / fused_fp32": "x (or dY) in bf16/fp16: in fp32 they are compose / fused",
    "decoded_fused": "a quantized weight (for a dense one it is fused)",
    "gemv": "a dense weight of unit column stride (not a transposed fan_in_fan_out view), or (forward only) a "
            "quantized weight",
    "small": "dense fp32 dY, weight and adapters, one adapter whose A is contiguous",
    "split_pairs": "x (dY) in bf16, one adapter with fp32 A (and h), no dropout; the cpu backend where "
                   "fastpeft._C.widened_mm runs",
    "split (lora_down)": "x in bf16, no dropout; the cpu backend where fastpeft._C.widened_mm runs",
    "outer (lora_dy)": "dB wanted, and a total rank of one or two SIMD vectors of the CPU's code path "
                       "(fastpeft._C.dy_outer_takes: 16 or 32 under AVX-512, 8 or 16 under AVX2)",
    "nta / l2 / none (gemv_prefetch)": "the cpu backend's decoding GEMV over a dense weight (the gemv routes); the "
                                       "three compute the same numbers",
    "fused (IA3)": "a quantized weight (for a dense one it is compose)",
    "bnb_native": "forward only. CPU: bitsandbytes with its AVX-512 BF16 CPU kernel loaded; a 4-bit weight with "
                  "K % blocksize == 0 (that kernel decodes blocks that straddle two rows wrongly) and N % 32 == 0 "
                  "(its tiling); x in bf16 (it computes in bf16). GPU (triton backend): a 4-bit weight stored in x's "
                  "dtype or in fp32 (bitsandbytes decodes straight to x's dtype: one rounding, as fastpeft's decode "
                  "then), K % blocksize == 0, nested blocks of 256",
    "bnb_native_fused": "as bnb_native",
    "passes / split_gemm": "the triton backend (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)",
    "compose_pass": "the triton backend; x (dY) narrower than an fp32 adapter without dropout (elsewhere it is "
                    "compose)",
    "cuda_kernels": "offered by the triton backend's dense ops on CUDA tensors where the cuda backend is available "
                    "(the extension fastpeft._cuda built, an sm_80+ device); no quantized weight (it would decode the "
                    "whole weight per call)",
    "fused_gemm": "the triton backend; padded total rank <= 64 (MAX_FUSED_R, the epilogue's register tile); forward: "
                  "no dropout or one adapter; backward: dX wanted and at most one adapter with dropout",
    "fused / sgmv (mixed)": "no autograd recorded (training and torch.compile run compose); no dropout; x widens "
                            "to every adapter's dtype without rounding (fp32 adapters, or adapters in x's dtype); "
                            "sgmv: the triton backend, ranks <= 64",
    "dora_forward / dora_backward": "a dense base weight and one active adapter (several adapters with DoRA, a "
                                    "quantized base or autocast: PEFT's own forward)",
    "stacked (DoRA)": "dora_forward with dropout, dora_backward with dropout when dX is wanted: fp32 adapters and a "
                      "dense weight; x (dY) and the weight in fp32 (the forward on a backend with the one-pass DoRA "
                      "epilogue), or in bf16 with the weight or its transpose of unit column stride on a backend with "
                      "widened_mm; for the backward lora_backward_onto: cpu",
    "fused_pairs": "x (dY) and a dense weight in bf16, the weight or its transpose of unit column stride; the cpu "
                   "backend where fastpeft._C.widened_mm runs (as pairs)",
    "fused_pairs_x / pairs_x": "as fused_pairs / pairs, with a weight of unit column stride",
    "pairs": "the cpu backend where oneDNN has a bf16 block kernel for the CPU (AVX-512; AVX512-BF16 runs it "
             "natively); x and a dense weight in bf16 with unit column strides, widened to fp32 adapters",
    "unmeasured": "under Triton's interpreter timings mean nothing: the triton backend takes the kernel route its "
                  "shape would exercise (fastpeft.kernels.lora's mode rule) unless a route is pinned",
}

# Measurement bounds: each candidate runs once to warm up (and to prove it runs), then the candidates are timed in
# interleaved rounds (one run of each per round, so drift in the machine's load hits all alike) for TIMED_ROUNDS
# rounds or until MEASURE_BUDGET_S seconds have gone on the rounds, whichever comes first (at least one round);
# the median of each candidate's runs decides. Three sequential runs per candidate picked routes that lost by 20%
# at decode sizes on a shared 2-core machine. Each round runs the candidates in its own fixed shuffled order: a
# candidate that widens the weight to fp32 evicts the caches, and in one order every round the route after it was
# always timed cold and the one after a light route always warm.
TIMED_ROUNDS = 7
MEASURE_BUDGET_S = 0.5
# After the first timed round a candidate that took over PRUNE_FACTOR times the fastest, and at least PRUNE_MIN_S
# longer, is timed no more (its one sample stands for it): on a GPU some kernel routes run tens of times slower than
# the composition at large M (BENCHMARKS.md's route choices), and timing them every round spent the budget on them.
PRUNE_FACTOR = 5.0
PRUNE_MIN_S = 1e-3
# From a measured choice's CONFIRM_AFTER_CALLS-th call on, the key's real calls time the routes that came within
# ROTATE_WITHIN of the fastest in the first measurement, one route a call, CALL_ROUNDS calls each, and the lowest
# median is the choice the cache file keeps (CONFIRM_AFTER_CALLS = 0: the first measurement is final). Timed in
# isolation, a route can lose to one it beats inside a training step (BENCHMARKS.md); within ROTATE_WITHIN such a
# flip is plausible, and a route further behind costs its calls more than a flip could gain.
CONFIRM_AFTER_CALLS = 32
ROTATE_WITHIN = 2.0
CALL_ROUNDS = 7


class RouteKey(NamedTuple):
    """What a measured choice is valid for, within one machine fingerprint (hashable, cheap to build per call)."""

    op: str
    backend: str
    weight_kind: str
    dtypes: tuple  # (x, weight, adapters...) torch dtypes
    m_bucket: int
    n: int
    k: int
    dropout: bool
    rank_bucket: int
    adapters: int
    grads: str = ""  # backward: which gradients are wanted; IA3: which outputs; lora_down: split's parts

    def as_string(self) -> str:
        dtypes = "/".join(_dtype_name(d) for d in self.dtypes)
        return (f"{self.op}|{self.backend}|{self.weight_kind}|{dtypes}|M<={self.m_bucket}|N={self.n}|K={self.k}"
                f"|p>0={int(self.dropout)}|R<={self.rank_bucket}|n={self.adapters}|{self.grads}")


def bucket(value: int) -> int:
    """``value`` rounded up to a power of two (1 for 0)."""
    return 1 if value <= 1 else 1 << (int(value) - 1).bit_length()


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _dtype_name(dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype))


def make_key(op: str, backend: str, weight_kind: str, x_dtype, weight_dtype, adapter_dtypes, m: int, n: int, k: int,
             dropout: bool, total_rank: int, adapters: int, grads: str = "") -> RouteKey:
    """The ``RouteKey`` of one call (see the module docstring for what goes in it)."""
    return RouteKey(op, backend, weight_kind, (x_dtype, weight_dtype, *adapter_dtypes), bucket(m), int(n), int(k),
                    bool(dropout), bucket(total_rank), int(adapters), grads)


def grads_key(needs_grad_x: bool, needs_grad_A: bool) -> str:
    """A backward key's ``grads`` field: which of the input's and the adapters' ``lora_A`` gradients the call wants
    (``"dx"``, ``"dA"``, ``"dxdA"`` or ``""``)."""
    return ("dx" if needs_grad_x else "") + ("dA" if needs_grad_A else "")


def key_of_call(op: str, backend: str, weight_kind: str, x, weight, lora_A, dropout_p, grads: str = "") -> RouteKey:
    """The ``RouteKey`` of one call of ``op`` on ``x`` (M, K) and ``weight`` (N, K) with the adapters' ``lora_A``
    and ``dropout_p`` (empty for IA3). Runs twice per layer call: the one-adapter case builds no list."""
    N, K = weight.shape
    if len(lora_A) == 1:
        A = lora_A[0]
        return make_key(op, backend, weight_kind, x.dtype, weight.dtype, (A.dtype,), x.shape[0], N, K,
                        dropout_p[0] > 0, A.shape[0], 1, grads)
    return make_key(op, backend, weight_kind, x.dtype, weight.dtype, [A.dtype for A in lora_A], x.shape[0], N, K,
                    any(p > 0 for p in dropout_p), sum(A.shape[0] for A in lora_A), len(lora_A), grads)


class CallRotation:
    """The routes a first choice's key times in its real calls (see ``ROTATE_WITHIN``): ``CALL_ROUNDS`` rounds, each
    taking every route once in an order shuffled by the key and the round (deterministic), and each call's seconds.
    A scheduled route that a call cannot take is passed over by the first call that can take a later one."""

    __slots__ = ("schedule", "position", "samples", "failed")

    def __init__(self, key: RouteKey, routes: list):
        seed = zlib.crc32(key.as_string().encode())
        self.schedule: list[str] = []
        for round_number in range(CALL_ROUNDS):
            order = sorted(routes)
            random.Random(seed + round_number).shuffle(order)
            self.schedule.extend(order)
        self.position = 0
        self.samples: dict[str, list[float]] = {route: [] for route in routes}
        self.failed: dict[str, str] = {}  # route -> the error that took it out of the rotation

    def next_index(self, eligible) -> Optional[int]:
        """Where in the schedule the next call among ``eligible`` routes is, or None if no route left in it is."""
        for index in range(self.position, len(self.schedule)):
            route = self.schedule[index]
            if route in eligible and route not in self.failed:
                return index
        return None

    def fail(self, index: int, error: str) -> None:
        """The route at ``index`` raised in a call: it takes no further part (its samples dropped)."""
        route = self.schedule[index]
        self.failed[route] = error
        self.samples.pop(route, None)
        self.position = index + 1

    def record(self, index: int, seconds: float) -> None:
        self.samples[self.schedule[index]].append(seconds)
        self.position = index + 1

    @property
    def done(self) -> bool:
        return self.position >= len(self.schedule)

    def medians_ms(self) -> dict[str, float]:
        return {route: round(sorted(ts)[len(ts) // 2] * 1e3, 4) for route, ts in self.samples.items() if ts}


@dataclass
class Choice:
    route: str
    # "measured", then "measured in calls" (or "measured again": run(in_calls=False); "measured once": deterministic
    # algorithms); "cache file", "only route", "unmeasured"
    source: str
    timings_ms: dict[str, float]
    note: str = ""
    calls: int = 0  # calls served since a first measurement ("measured"), until its routes are timed in calls
    rotation: Optional[CallRotation] = None  # while the key's calls time the close routes in turn


_lock = threading.RLock()
_measuring = threading.local()  # .depth: how many measurements (_time_candidates) this thread is inside
_choices: dict[RouteKey, Choice] = {}
_pins: dict[str, str] = {}  # op -> route, from set_route
_file_state: dict[str, object] = {"loaded": False, "entries": {}}
_last: dict[str, str] = {}  # op -> the route the latest call ran (tests read it)
# Changes whenever a pin or a choice of this process changes (see ``generation``).
_generation = [0]


# --------------------------------------------------------------------------------------------------- pinning
def _env_pins() -> dict[str, str]:
    """``FASTPEFT_ROUTE`` parsed: ``{op: route}``, with ``"*"`` for a bare route name that applies to every op."""
    raw = os.environ.get("FASTPEFT_ROUTE", "").strip()
    if not raw or raw == "auto":
        return {}
    pins: dict[str, str] = {}
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        op, _, route = part.rpartition("=")
        op = op.strip() or "*"
        route = route.strip()
        if op != "*" and op not in ROUTES:
            raise ValueError(f"fastpeft: FASTPEFT_ROUTE names unknown op {op!r}; ops are {sorted(ROUTES)}")
        known = {r for table in ROUTES.values() for r in table} if op == "*" else set(ROUTES[op])
        if route not in known:
            raise ValueError(f"fastpeft: FASTPEFT_ROUTE asks for unknown route {route!r} for {op}; "
                             f"routes are {sorted(known)}")
        pins[op] = route
    return pins


_env_cache: dict[str, object] = {"raw": None, "pins": {}}


def _pinned(op: str) -> Optional[str]:
    if op in _pins:
        return _pins[op]
    raw = _env.read("FASTPEFT_ROUTE") or ""
    if raw != _env_cache["raw"]:  # parsed once per value: this runs on every call
        _env_cache["pins"] = _env_pins()
        _env_cache["raw"] = raw
    pins = _env_cache["pins"]
    route = pins.get(op) or pins.get("*")  # type: ignore[union-attr]
    if route is not None and route in ROUTES[op]:
        return route
    return None


def generation() -> int:
    """A number that changes whenever :func:`set_route` or :func:`clear_choices` runs or a choice is made (measured,
    read from the cache file, or the only route). Whoever keeps a route of :func:`settled_call` keeps this number
    with it and asks again once it differs (``FASTPEFT_ROUTE`` is read per call and must be compared too)."""
    return _generation[0]


def choice_state() -> tuple:
    """What every route choice depends on besides its key: :func:`generation` and ``FASTPEFT_ROUTE`` (read per call).
    A caller that keeps a route (:func:`settled_call`) keeps this with it; equal values mean the same choices."""
    return (_generation[0], _env.raw(b"FASTPEFT_ROUTE"))


def last_routes() -> dict:
    """The dict :func:`last_route` reads (op -> the route the latest call ran), for a caller outside Python that
    records the routes it takes in it."""
    return _last


def generation_guard() -> tuple:
    """A guard (``fastpeft.guards``) that :func:`generation` stays what it is now."""
    return (guards.ITEM_IS, _generation, 0, _generation[0])


def _changed() -> None:
    _generation[0] += 1


def set_route(op: Optional[str], route: Optional[str]) -> None:
    """Pin ``route`` for ``op`` (``op=None``: every op that has such a route); ``route=None`` or ``"auto"`` removes
    the pin. Raises ``ValueError`` for an unknown op or route."""
    with _lock:
        _changed()
        ops = list(ROUTES) if op is None else [op]
        for name in ops:
            if name not in ROUTES:
                raise ValueError(f"fastpeft: unknown op {name!r}; ops are {sorted(ROUTES)}")
        if route is None or route == "auto":
            for name in ops:
                _pins.pop(name, None)
            return
        if op is not None and route not in ROUTES[op]:
            raise ValueError(f"fastpeft: {op} has no route {route!r}; routes are {sorted(ROUTES[op])}")
        if op is None and not any(route in ROUTES[name] for name in ops):
            raise ValueError(f"fastpeft: no op has a route {route!r}")
        for name in ops:
            if route in ROUTES[name]:
                _pins[name] = route


def clear_choices() -> None:
    """Forget every choice made in this process (the cache file is left as it is)."""
    with _lock:
        _changed()
        _choices.clear()
        _last.clear()
        _file_state["loaded"] = False
        _file_state["entries"] = {}


def last_route(op: str) -> Optional[str]:
    """The route the latest call of ``op`` in this process ran (None before any)."""
    return _last.get(op)


# ------------------------------------------------------------------------------------------------ cache file
def cache_path() -> Optional[str]:
    """The route cache file, or None when ``FASTPEFT_ROUTE_CACHE=off``."""
    raw = os.environ.get("FASTPEFT_ROUTE_CACHE", "").strip()
    if raw.lower() in ("off", "0", "none"):
        return None
    if raw:
        return raw
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastpeft", "routes.json")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_fingerprint(device: str = "cpu") -> str:
    """What a measured choice is valid for: device model and SIMD path, threads, and package versions."""
    from . import __version__

    try:
        from importlib.metadata import version

        bnb = version("bitsandbytes")
    except Exception:
        bnb = "none"
    if device == "cuda" and torch.cuda.is_available():
        where = f"gpu={torch.cuda.get_device_name()}"
    else:
        try:
            from . import _C  # type: ignore[attr-defined]

            isa = _C.isa()
        except Exception:
            isa = "no-extension"
        where = f"cpu={_cpu_model()}|isa={isa}|threads={torch.get_num_threads()}"
    return f"{where}|fastpeft={__version__}|build={_build_stamp()}|torch={torch.__version__}|bitsandbytes={bnb}"


def _build_stamp() -> str:
    """Which build of fastpeft's compiled extensions measured a choice (size and modification time of each built
    file): choices timed with other kernels are measured again, even under the same version number."""
    stamps = []
    for name in ("_C", "_cuda"):
        try:
            module = importlib.import_module(f"fastpeft.{name}")
            stat = os.stat(module.__file__)
            stamps.append(f"{name}:{stat.st_size:x}.{int(stat.st_mtime):x}")
        except Exception:  # an extension that is not built has no stamp
            continue
    return ",".join(stamps) or "none"


def _load_file() -> dict:
    """The cache file's ``{fingerprint: {key string: {"route", "timings_ms"}}}``, read once per process (until
    ``clear_choices``); {} when there is none, when it cannot be read, or when it is damaged (see
    ``_read_cache_file``)."""
    if _file_state["loaded"]:
        return _file_state["entries"]  # type: ignore[return-value]
    path = cache_path()
    _file_state["entries"] = _read_cache_file(path) if path else {}
    _file_state["loaded"] = True
    return _file_state["entries"]  # type: ignore[return-value]


_warned_cache_files: set = set()


def _ignore_cache_file(path: str, why: str) -> dict:
    if path not in _warned_cache_files:
        _warned_cache_files.add(path)
        warnings.warn(f"fastpeft: ignoring the route cache {path!r} ({why}); routes are measured again and the file "
                      "is rewritten with the next choice", stacklevel=2)
    return {}


def _is_choice(entry) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("route"), str):
        return False
    timings = entry.get("timings_ms", {})
    return isinstance(timings, dict) and all(isinstance(t, (int, float)) for t in timings.values())


def _read_cache_file(path: str) -> dict:
    """The machines table of the cache file at ``path``, only well-formed route choices in it. A missing or
    unreadable file (a read-only or absent location) gives {} silently; a truncated or corrupt file, or one of
    another version, gives {} with one warning per process and path, and so does a file holding any malformed
    entry. Never raises, so a damaged cache cannot change what an op computes or make it fail."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except OSError:
        return {}
    except ValueError as exc:  # truncated, not JSON, not UTF-8
        return _ignore_cache_file(path, f"not valid JSON: {exc}")
    if not isinstance(data, dict):
        return _ignore_cache_file(path, f"a JSON {type(data).__name__}, not a route cache")
    if data.get("version") != CACHE_VERSION:
        return _ignore_cache_file(path, f"version {data.get('version')!r}, this fastpeft reads {CACHE_VERSION}")
    machines = data.get("machines", {})
    if not isinstance(machines, dict) or not all(
            isinstance(table, dict) and all(_is_choice(entry) for entry in table.values())
            for table in machines.values()):
        return _ignore_cache_file(path, "malformed entries")
    return machines


def _store_file(fingerprint: str, key: RouteKey, choice: Choice) -> None:
    """Merge one choice into the cache file. The read-modify-write runs under an advisory lock on a sibling
    ``.lock`` file, so processes sharing the file (the ranks of one job) all keep their choices; the new file is
    written to a temporary file and renamed over the old one, so a crash never leaves a half-written file. A damaged
    file is replaced by a fresh one; where the file cannot be written (a read-only location) the choice is kept in
    this process only, silently."""
    path = cache_path()
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with locked(path):
            _file_state["loaded"] = False
            entries = _load_file()
            entries.setdefault(fingerprint, {})[key.as_string()] = {"route": choice.route,
                                                                    "timings_ms": choice.timings_ms}
            with atomic_file(path, "w", durable=False, encoding="utf-8") as handle:
                json.dump({"version": CACHE_VERSION, "machines": entries}, handle, indent=1, sort_keys=True)
    except OSError:
        pass  # a read-only location: the choice still holds for this process


# ------------------------------------------------------------------------------------------------- choosing
def _sync(device: str) -> Callable[[], None]:
    """What brackets a timed run on ``device``: on CUDA a synchronization, so the clock sees the kernels and not
    only their launches."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _in_measurement() -> bool:
    """Whether this thread is timing some key's candidates (a route that runs an op of its own calls that op many
    times over while it is timed: those calls are not the inner key's real calls, and are not counted)."""
    return getattr(_measuring, "depth", 0) > 0


def _time_candidates(candidates: dict[str, Callable[[], object]], device: str = "cpu"):
    """``(median seconds per route, last result per route, errors)`` over interleaved rounds after one warm-up run
    of each candidate; a candidate that raises is dropped (its error kept), one far slower than the fastest after
    the first round is timed no more (``PRUNE_FACTOR``). On CUDA each run is bracketed by synchronizations, so the
    clock sees the kernels and not only their launches."""
    _measuring.depth = getattr(_measuring, "depth", 0) + 1
    try:
        return _timed_candidates(candidates, device)
    finally:
        _measuring.depth -= 1


def _timed_candidates(candidates: dict[str, Callable[[], object]], device: str):
    sync = _sync(device)
    results: dict[str, object] = {}
    errors: list[str] = []
    live = {}
    for route, fn in candidates.items():
        try:
            results[route] = fn()
        except Exception as exc:  # a route that cannot serve this call is not chosen; the others still can
            errors.append(f"{route}: {type(exc).__name__}: {exc}")
            continue
        live[route] = fn
    samples: dict[str, list[float]] = {route: [] for route in live}
    spent = 0.0
    for round_number in range(TIMED_ROUNDS):
        order = list(live.items())
        random.Random(round_number).shuffle(order)  # the same orders in every measurement: deterministic
        for route, fn in order:
            sync()
            start = time.perf_counter()
            results[route] = fn()
            sync()
            elapsed = time.perf_counter() - start
            samples[route].append(elapsed)
            spent += elapsed
        if spent > MEASURE_BUDGET_S:
            break
        if round_number == 0 and live:
            fastest = min(ts[0] for ts in samples.values())
            live = {route: fn for route, fn in live.items()
                    if not (samples[route][0] > PRUNE_FACTOR * fastest and samples[route][0] - fastest > PRUNE_MIN_S)}
    medians = {route: sorted(ts)[len(ts) // 2] for route, ts in samples.items()}
    return medians, results, errors


def run(key: RouteKey, candidates: dict[str, Callable[[], object]], device: str = "cpu",
        unmeasured: Optional[str] = None, in_calls: bool = True):
    """Run the op by its chosen route and return the route's result.

    ``candidates`` maps each route eligible for this call to a zero-argument function computing the op's result
    (pure: no input is modified). A pinned route runs when eligible; else the choice for ``key`` (memory, then the
    cache file); else every candidate is timed now and the fastest kept. A candidate that raises during measurement
    is dropped from the choice (its error is kept in the table). From a first choice's ``CONFIRM_AFTER_CALLS``-th
    call on, each call takes the next route of the choice's rotation instead, timed (see ``ROTATE_WITHIN``).
    ``in_calls=False`` is for candidates that are a side measurement rather than the call's own work (a one-row
    probe of a choice the call then uses): timing them inside real calls would add their time to whatever route of
    another op runs around them, so the due call times every candidate back to back once more instead.

    ``unmeasured`` names the route to take without timing, for calls whose speed means nothing (Triton's
    interpreter running GPU kernels on the CPU, where tests pin every route in turn); it is kept in memory only."""
    if not candidates:
        raise RuntimeError(f"fastpeft: no route is eligible for {key.as_string()}")
    pinned = _pinned(key.op)
    if pinned is not None and pinned in candidates:
        _last[key.op] = pinned
        return candidates[pinned]()
    if unmeasured is not None and unmeasured in candidates:
        _last[key.op] = unmeasured
        with _lock:
            if key not in _choices:
                _choices[key] = Choice(unmeasured, "unmeasured", {}, "speed is not measured here")
                _changed()
        return candidates[unmeasured]()
    choice = _choices.get(key)
    if choice is not None and choice.source == "measured" and CONFIRM_AFTER_CALLS:
        due = _due(choice)
        _count(choice)
        # (a CUDA graph being captured records this call once, and a timed call would synchronize inside it)
        if due and not (device == "cuda" and torch.cuda.is_current_stream_capturing()):
            with _lock:
                if _choices.get(key) is choice and choice.source == "measured":
                    deterministic = _deterministic()
                    if not in_calls and not deterministic:
                        return _measure(key, candidates, device, choice.note, again=True)
                    index = None if deterministic else _rotation(key, choice).next_index(candidates)
                    if index is not None:
                        return _timed_call(key, choice, index, candidates, device)
                    choice = _confirm(key, choice, device)
    if choice is None or choice.route not in candidates:
        with _lock:
            choice = _choices.get(key)
            if choice is None or choice.route not in candidates:
                return _choose(key, candidates, device, pinned)
    _last[key.op] = choice.route
    return candidates[choice.route]()


class EligibleRoutes:
    """The routes of an op (``table``) that may serve one call, as :func:`take` asks about them (``route in ...``):
    only the asked route's conditions are checked, so a call whose route is settled skips the others' and builds no
    candidate (at decode sizes that bookkeeping is a visible share of the call). Iterating yields every eligible
    route, in the table's order."""

    __slots__ = ("table", "check", "args")

    def __init__(self, table: dict, check, args: tuple) -> None:
        self.table, self.check, self.args = table, check, args

    def __contains__(self, route: str) -> bool:
        return route in self.table and self.check(route, *self.args)

    def __iter__(self):
        return (route for route in self.table if self.check(route, *self.args))


def run_named(key: RouteKey, names, runner: Callable[[str], object], device: str = "cpu",
              unmeasured: Optional[str] = None):
    """``runner(route)`` for the route of ``key`` among ``names`` (asked with ``in``, iterated for the candidates):
    at once when the route is pinned or chosen already (no candidate built), else through :func:`run` (``device``
    and ``unmeasured`` as there)."""
    if unmeasured is None:
        route = take(key, names)
        if route is not None:
            return runner(route)
    return run(key, {name: partial(runner, name) for name in names}, device, unmeasured=unmeasured)


def run_table(key: RouteKey, table: dict, eligible, args: tuple, conditions: tuple, device: str = "cpu",
              unmeasured: Optional[str] = None):
    """Run the op of ``key`` by one of the routes in ``table`` (name -> function of ``args``), those for which
    ``eligible(name, *conditions)`` holds (only the taken route's conditions checked where it is chosen already):
    :func:`run_named` over them."""
    return run_named(key, EligibleRoutes(table, eligible, conditions), lambda route: table[route](*args), device,
                     unmeasured)


def run_in_place(key: RouteKey, updaters: dict[str, Callable[[torch.Tensor], object]], target: torch.Tensor,
                 device: str = "cpu", unmeasured: Optional[str] = None):
    """``run`` for an op whose routes update ``target`` in place: ``updaters[route](t)`` updates ``t`` and returns
    the op's result. A route taken without measuring (pinned, chosen already, or ``unmeasured``) updates ``target``
    itself, and so does a call that times a route for a first choice's key (:func:`rotating`); a measurement runs
    every candidate several times, each on its own copy of ``target``."""
    route = settled(key, updaters) or unmeasured or rotating(key, updaters)
    if route is not None:
        update = updaters[route]
        candidates = {route: lambda: update(target)}
    else:
        candidates = {name: (lambda update=update: update(target.clone())) for name, update in updaters.items()}
    return run(key, candidates, device=device, unmeasured=unmeasured)


def _decided(key: RouteKey, eligible, some: bool = False) -> tuple:
    """``(route, choice)``: the route ``run`` would take for ``key`` among the ``eligible`` route names without
    measuring (a pin, else a choice already made in this process; None when ``run`` must measure) and the measured
    choice whose calls it counts toward the confirming measurement (None if none is counted). ``some``: ``eligible``
    is a subset of the call's candidates, so a pin outside it may still serve the call and ``run`` must decide."""
    pinned = _pinned(key.op)
    if pinned is not None:
        if pinned in eligible:
            return pinned, None
        if some:
            return None, None
    choice = _choices.get(key)
    if choice is None or choice.route not in eligible:
        return None, None
    if choice.source == "measured" and CONFIRM_AFTER_CALLS:
        if _due(choice):
            return None, None  # the next run times a route of the rotation: run decides which
        return choice.route, choice
    return choice.route, None


def settled(key: RouteKey, eligible) -> Optional[str]:
    """The route ``run`` would take for ``key`` among the ``eligible`` route names without measuring (a pin, or a
    choice already made in this process), else None. Lets an op whose routes update a tensor in place skip the
    copies that only measurement needs; the call is not counted (``run`` counts it)."""
    return _decided(key, eligible)[0]


def take(key: RouteKey, eligible) -> Optional[str]:
    """:func:`settled` for ``eligible`` routes that may be only some of the call's candidates, with the call counted
    as ``run`` counts it (towards the confirming measurement), so an op can run the route itself and skip building
    every candidate (a cost comparable to a decode-sized product). None when ``run`` must decide this call (a pin
    outside ``eligible`` included)."""
    route, counted = _decided(key, eligible, some=True)
    if route is None:
        return None
    if counted is not None:
        _count(counted)
    _last[key.op] = route
    return route


def settled_call(key: RouteKey, eligible) -> Optional[tuple[str, Optional[Choice]]]:
    """``(route, counted)`` for a caller that keeps the route of ``key`` among the ``eligible`` route names and takes
    it itself in later calls, as long as :func:`generation` and ``FASTPEFT_ROUTE`` stay as they are: the route
    :func:`take` would name, and the measured choice whose calls count toward its confirming measurement (None when
    none is counted: a pin, or a choice that will not be timed again). Such a caller counts each call it serves
    (:class:`TakenRoutes`). None where ``run`` must decide the next call. Nothing is counted here."""
    route, counted = _decided(key, eligible)
    return None if route is None else (route, counted)


class TakenRoutes:
    """The routes a caller keeps and takes itself for one kind of call: ``found`` maps each op to
    :func:`settled_call`'s ``(route, counted)``. Before each call it serves, the caller asks :meth:`due` (a counted
    first measurement is due for its confirming measurement, which only :func:`run` makes: the call must take the
    full path); after it, :meth:`served` counts the call as :func:`take` counts it and records the routes for
    :func:`last_route`."""

    __slots__ = ("routes", "counted")

    def __init__(self, found: dict):
        self.routes = {op: route for op, (route, _) in found.items()}
        self.counted = tuple(counted for _, counted in found.values() if counted is not None)

    def due(self) -> bool:
        for choice in self.counted:  # (a loop, not any(): this runs per settled call, almost always over nothing)
            if _due(choice):
                return True
        return False

    def served(self) -> None:
        for choice in self.counted:
            _count(choice)
        _last.update(self.routes)


def rotating(key: RouteKey, eligible) -> Optional[str]:
    """The route the next call of ``key`` times for its first choice's confirmation when that call is due (see
    ``ROTATE_WITHIN``), else None. ``run`` takes that route when it is offered, so an op whose routes update a tensor
    in place offers that one alone and lets it update the tensor itself."""
    if _pinned(key.op) is not None:
        return None
    choice = _choices.get(key)
    if choice is None or choice.source != "measured" or not CONFIRM_AFTER_CALLS:
        return None
    if not _due(choice) or _deterministic():
        return None
    with _lock:
        rotation = _rotation(key, choice)
        index = rotation.next_index(eligible)
        return None if index is None else rotation.schedule[index]


def _due(choice: Choice) -> bool:
    """Whether the next call of a first measurement's key (``"measured"``) is one its confirmation times (never a
    call made while some key's candidates are timed: see :func:`_in_measurement`)."""
    return choice.calls + 1 >= CONFIRM_AFTER_CALLS and not _in_measurement()


def _count(choice: Choice) -> None:
    """Count a real call of a first measurement's key toward its confirmation (calls inside a measurement are not
    the key's real calls)."""
    if not _in_measurement():
        choice.calls += 1


def _deterministic() -> bool:
    """Under ``torch.use_deterministic_algorithms(True)`` a first choice is kept without a rotation: every later call
    of its key takes the same route, so equal calls give equal bits within the process."""
    return torch.are_deterministic_algorithms_enabled()


def _rotation(key: RouteKey, choice: Choice) -> CallRotation:
    """The rotation of a first choice, started at its first due call over the routes within ``ROTATE_WITHIN``."""
    if choice.rotation is None:
        choice.rotation = CallRotation(key, _close_routes(choice))
    return choice.rotation


def _close_routes(choice: Choice) -> list:
    """The routes of a first measurement within ``ROTATE_WITHIN`` of its fastest: those its rotation times."""
    fastest = min(choice.timings_ms.values())
    return [route for route, ms in choice.timings_ms.items() if ms <= ROTATE_WITHIN * fastest]


def _timed_call(key: RouteKey, choice: Choice, index: int, candidates, device: str):
    """A real call of ``key`` by the route at ``index`` of its rotation, timed; the rotation's last call confirms."""
    rotation = choice.rotation
    route = rotation.schedule[index]
    sync = _sync(device)
    sync()
    start = time.perf_counter()
    try:
        result = candidates[route]()
    except Exception as exc:  # a route that ran in the first measurement fails on this call: the call takes the
        if route == choice.route or choice.route not in candidates:  # first choice, the rotation goes on without it
            raise
        rotation.fail(index, f"{route}: {type(exc).__name__}: {exc}")
        route = choice.route
        result = candidates[route]()
    else:
        sync()
        rotation.record(index, time.perf_counter() - start)
    _last[key.op] = route
    if rotation.done:
        _confirm(key, choice, device)
    return result


def _confirm(key: RouteKey, choice: Choice, device: str) -> Choice:
    """Keep the route of lowest median over the rotation's calls, written to the cache file with those medians; the
    first choice where no call was timed (deterministic algorithms, or no call could take a route of the rotation)."""
    timings = choice.rotation.medians_ms() if choice.rotation is not None else {}
    if timings:
        first = ", ".join(f"{route} {ms}" for route, ms in choice.timings_ms.items())
        failed = list(choice.rotation.failed.values())
        note = "; ".join(filter(None, [choice.note, f"first measurement (ms): {first}", *failed]))
        confirmed = Choice(min(timings, key=timings.get), "measured in calls", timings, note)
    else:
        confirmed = Choice(choice.route, "measured once", dict(choice.timings_ms), choice.note)
    _choices[key] = confirmed
    _changed()
    _store_file(machine_fingerprint(device), key, confirmed)
    return confirmed


def _choose(key: RouteKey, candidates, device: str, pinned: Optional[str]):
    note = f"pinned {pinned!r} is not eligible here" if pinned is not None else ""
    if len(candidates) == 1:
        (route, fn), = candidates.items()
        _choices[key] = Choice(route, "only route", {}, note)
        _changed()
        _last[key.op] = route
        return fn()
    fingerprint = machine_fingerprint(device)
    stored = _load_file().get(fingerprint, {}).get(key.as_string())
    if stored and stored.get("route") in candidates:
        _choices[key] = Choice(stored["route"], "cache file", dict(stored.get("timings_ms", {})), note)
        _changed()
        _last[key.op] = stored["route"]
        return candidates[stored["route"]]()
    return _measure(key, candidates, device, note)


def _measure(key: RouteKey, candidates, device: str, note: str, again: bool = False):
    """Time the candidates and keep the fastest for ``key``; written to the cache file when it is measured
    ``again`` (``run(in_calls=False)``'s confirmation) or ``CONFIRM_AFTER_CALLS`` is 0 (else the choice confirmed in
    calls is, :func:`_timed_call`)."""
    medians, results, errors = _time_candidates(candidates, device)
    timings = {route: round(seconds * 1e3, 4) for route, seconds in medians.items()}
    if not timings:
        raise RuntimeError(f"fastpeft: every route failed for {key.as_string()}: " + "; ".join(errors))
    best = min(timings, key=timings.get)
    note = "; ".join(filter(None, [note] + errors))
    choice = Choice(best, "measured again" if again else "measured", timings, note)
    _choices[key] = choice
    _changed()
    if again or not CONFIRM_AFTER_CALLS:
        _store_file(machine_fingerprint(device), key, choice)
    _last[key.op] = best
    return results[best]


def unconfirmed() -> int:
    """How many more calls the choices of this process that await confirmation need before they are final: the rest
    of their first ``CONFIRM_AFTER_CALLS`` calls and of their rotations (a rotation not started yet counted as every
    route of the first measurement within ``ROTATE_WITHIN``). 0 when every choice is final. A benchmark warms up
    until this stops falling, so its timed calls are not calls of a rotation."""
    if not CONFIRM_AFTER_CALLS or _deterministic():
        return 0
    total = 0
    with _lock:
        for choice in _choices.values():
            if choice.source != "measured":
                continue
            total += max(0, CONFIRM_AFTER_CALLS - 1 - choice.calls)  # the last of them is a rotation call
            if choice.rotation is not None:
                total += len(choice.rotation.schedule) - choice.rotation.position
            else:
                total += CALL_ROUNDS * len(_close_routes(choice))
    return total


def routes() -> list[dict]:
    """Every choice made in this process: ``[{key fields..., "route", "source", "timings_ms", "note"}]``, and the
    pins in force under ``"pins"`` of each row's op."""
    rows = []
    with _lock:
        for key, choice in _choices.items():
            row = key._asdict()
            row["dtypes"] = "/".join(_dtype_name(d) for d in key.dtypes)
            row.update(route=choice.route, source=choice.source, timings_ms=dict(choice.timings_ms),
                       note=choice.note, pinned=_pinned(key.op))
            rows.append(row)
    return rows


def route_table() -> dict[str, dict[str, str]]:
    """The routes of every op and what each does (``ROUTES``), plus where each may run (``ROUTE_LIMITS``)."""
    return {"routes": {op: dict(table) for op, table in ROUTES.items()}, "limits": dict(ROUTE_LIMITS)}
