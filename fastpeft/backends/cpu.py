"""The ``cpu`` backend: torch's GEMM (oneDNN / MKL) for the base product, the compiled extension ``fastpeft._C`` for
what no vendor GEMM does, and a measured choice between the ways to combine them.

Every op runs by one of its routes (``fastpeft.routing.ROUTES``), chosen by timing them once per route key on this
machine. The pieces the routes are built from:

- the base product ``x W^T + b``: torch's GEMM in ``x``'s dtype, or widened to fp32 and rounded once (the ``_fp32``
  routes, for CPUs without native bf16/fp16 GEMMs); for a bitsandbytes base (``fastpeft.quant.QuantizedWeight``):
  decoded into a reused buffer by ``_C.quant_dequantize_into`` then torch's GEMM (``compose``), decoded tile by tile
  inside the product (``_C.quant_linear``, ``fused``), or bitsandbytes' own AVX-512 kernel (``bnb_native``);
- ``_C.lora_xa``: ``drop_i(x_i) A_i^T`` in one pass over ``x``, the Philox mask (``fastpeft._philox``) regenerated
  on the fly, never stored, ``x`` widened in registers; by one of two kernels, ``A`` as stored or transposed, which
  op ``lora_down`` measures per key (``_lora_xa``);
- ``_C.lora_epilogue_``: ``y += sum_i s_i (xa_i B_i^T + b_i)`` in place, rounded once;
- ``_C.dense_lora_gemv`` / the GEMV of ``_C.quant_linear``: each weight row read (or decoded) once and dotted with
  every activation row, the adapter term fused (``gemv``);
- backward: ``_C.lora_dy_pass`` (``g_i = s_i dY B_i``, ``dB`` and the bias gradient) by one of two kernels, which op
  ``lora_dy`` measures per key (``_dy_pass``): ``g`` by a sweep over the rows of ``dY``, ``dB`` and the bias gradient
  by column strips (``rows``); or, where the total rank is one or two SIMD vectors, one sweep of outer products over
  units of ``dY``'s columns, each unit's share of ``g`` summed in unit order (``outer``); and ``_C.lora_dx_pass``
  (``dX += (g_i A_i) * mask_i / (1 - p_i)`` and
  ``dA_i = g_i^T drop_i(x)``; with dropout one sweep over column strips of ``x`` and ``dX`` that draws each strip's
  mask once for both). Column strips let threads own disjoint columns of ``dA``/``dB``: no per-thread partial sums;
  ``_C.strip_mm`` computes ``dY W`` the same way, the weight read once for every row of ``dY`` (``gemv``).

All accumulation is fp32; adapter arithmetic runs in the adapters' dtype (PEFT keeps them fp32 under a bf16 base), so
``xa``, ``dA`` and ``dB`` match the reference to fp32 rounding on every route.
"""

from __future__ import annotations

import os
import sys
import threading
from functools import partial
from typing import Optional

import torch

from .. import routing as routes
from .._derived import SHARED, kept_copies_allowed
from ..quant import QuantizedWeight
from ..reference import adapter_inputs
from . import compose
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


_lossless = compose.lossless



_F32 = torch.float32


def _weight_kind(weight) -> str:
    return weight.kind if isinstance(weight, QuantizedWeight) else "dense"


def _bt_all(lora_B) -> torch.Tensor:
    """Every adapter's ``B_i^T`` stacked, ``(sum r_i, N)`` contiguous fp32, the layout the C++ passes stream, made
    by one blocked C++ transpose (``_C.stack_transposed``). In inference calls it is kept across calls while the
    ``B_i`` are unchanged (``fastpeft._derived``)."""
    make = lambda: _C.stack_transposed(list(lora_B))  # noqa: E731
    if not kept_copies_allowed():  # a training call: parameters may change unseen by version counters
        return make()
    return SHARED.get_one(lora_B[0], make) if len(lora_B) == 1 else SHARED.get(list(lora_B), make)


# ------------------------------------------------------------------------------------------ base-product pieces
_buffers = threading.local()
# A decode buffer that this many decodes on its thread have not used is released: measurement decodes into buffers of
# every candidate's dtype (an fp32 one beside the bf16 one), and most are never used again by the chosen route.
BUFFER_IDLE_DECODES = 256


def _decoded(weight: QuantizedWeight, buffer_dtype: torch.dtype, round_to: torch.dtype) -> torch.Tensor:
    """``weight.dequantize().to(round_to)`` written into a reused ``(N, K)`` buffer of ``buffer_dtype`` (one per
    shape and dtype per thread: a quantized model holds one dense copy of each distinct projection shape in use,
    never one per layer; one that ``BUFFER_IDLE_DECODES`` decodes on the thread have not used is released at the next
    sweep, every ``BUFFER_IDLE_DECODES`` decodes). The caller must be done with it before the next call on this
    thread."""
    state = getattr(_buffers, "state", None)
    if state is None:
        state = _buffers.state = {"store": {}, "decodes": 0}
    store = state["store"]
    state["decodes"] = now = state["decodes"] + 1
    key = (weight.shape, buffer_dtype)
    entry = store.get(key)
    if entry is None:
        entry = store[key] = [torch.empty(weight.shape, dtype=buffer_dtype), now]
    entry[1] = now
    if now % BUFFER_IDLE_DECODES == 0:
        for idle in [k for k, (_, last) in store.items() if now - last >= BUFFER_IDLE_DECODES]:
            del store[idle]
    _C.quant_dequantize_into(_quant_args(weight, round_to), entry[0])
    return entry[0]


def _weight_as(weight, dtype: torch.dtype, round_to: torch.dtype) -> torch.Tensor:
    """The dense ``(N, K)`` weight in ``dtype`` for a torch GEMM, rounded to ``round_to`` (exact in ``dtype``)."""
    if isinstance(weight, QuantizedWeight):
        return _decoded(weight, dtype, round_to)
    if weight.dtype != round_to:
        weight = weight.to(round_to)
    return weight if weight.dtype == dtype else weight.to(dtype)


def _gemm_product(x, weight, bias, wide: bool) -> torch.Tensor:
    """``x W^T + b`` by torch's GEMM: in fp32, not yet rounded, when ``wide``, else in ``x``'s dtype. The bias is
    rounded to ``x``'s dtype first, as the reference adds it in that dtype."""
    dtype = _F32 if wide else x.dtype
    b = None if bias is None else bias.detach().to(x.dtype).to(dtype)
    return torch.nn.functional.linear(x if x.dtype == dtype else x.to(dtype), _weight_as(weight, dtype, x.dtype), b)


def _pairs_mm(a: torch.Tensor, b: torch.Tensor, interleave_a: bool = False) -> torch.Tensor:
    """``a b^T`` in fp32, not yet rounded, from bf16 ``a`` ``(M, K)`` and ``b`` ``(N, K)`` as they are: every product
    exact, fp32 sums (oneDNN's bf16 block kernel). ``b`` may have unit column stride (``_C.widened_mm``; with
    ``interleave_a`` the kernel rearranges ``a`` instead of tiles of ``b``) or be the transposed view of a row-major
    ``(K, N)`` matrix (``_C.widened_mm_nn`` on that matrix)."""
    a = a if a.stride(1) == 1 else a.contiguous()
    return _C.widened_mm(a, b, interleave_a) if b.stride(1) == 1 else _C.widened_mm_nn(a, b.t())


def _pairs_product(x, weight, bias, interleave_x: bool = False) -> torch.Tensor:
    """``x W^T + b`` in fp32, not yet rounded, by ``_pairs_mm``: ``_gemm_product(wide=True)``'s numbers up to the
    order of the sums, without the fp32 GEMM."""
    y = _pairs_mm(x, weight.detach(), interleave_x)
    return y if bias is None else y.add_(bias.detach().to(x.dtype).to(_F32))


def _pairs_eligible(x, weight, interleave_x: bool = False) -> bool:
    """``fused_pairs`` (``fused_pairs_x`` with ``interleave_x``) may serve this call (fastpeft.routing.ROUTE_LIMITS)."""
    if not (isinstance(weight, torch.Tensor) and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and weight.dim() == 2 and _C.widened_mm_available()):
        return False
    return weight.stride(1) == 1 if interleave_x else (weight.stride(1) == 1 or weight.stride(0) == 1)


def _tiled_product(x, weight: QuantizedWeight, bias32, xs, B, lora_scale, gemv: bool) -> torch.Tensor:
    """``x w^T + bias32 + lora_scale xs B^T`` in fp32 by ``_C.quant_linear``: the decoding GEMV (``gemv``) or ~1 MB
    decoded tiles handed to torch's GEMM."""
    x32 = x if (x.dtype == _F32 and x.is_contiguous()) else x.float().contiguous()
    return _C.quant_linear(x32, _quant_args(weight, x.dtype), bias32, xs, B, lora_scale,
                           x.shape[0] if gemv else 0, 0)


# gemv_prefetch's routes: how _C.dense_lora_gemv requests weight rows ahead (its ``prefetch`` argument).
_GEMV_PREFETCH = {"nta": 1, "l2": 2, "none": 0}


def _prefetch_key(weight) -> routes.RouteKey:
    """The route key of the GEMV's prefetch choice for a dense ``weight`` ``(N, K)``: the choice is about streaming
    the weight's rows, whatever the number of activation rows, so it is keyed (and measured) at one row."""
    N, K = weight.shape
    return routes.make_key("gemv_prefetch", "cpu", "dense", weight.dtype, weight.dtype, (), 1, N, K, False, 0, 0)


def _dense_gemv(x, weight, bias32, xs, B, lora_scale) -> torch.Tensor:
    """``x W^T + bias32 + lora_scale xs B^T`` by ``_C.dense_lora_gemv``, accumulated in fp32 and rounded once to
    ``x``'s dtype, with the choice of ``gemv_prefetch`` (measured on ``x``'s first row when not made yet)."""
    w = weight if weight.dtype == x.dtype else weight.detach().to(x.dtype)
    key = _prefetch_key(w)
    name = routes.take(key, _GEMV_PREFETCH)
    if name is None and x.shape[0] > 0:
        one, xs1 = x[:1], None if xs is None else xs[:1]
        routes.run(key, {route: partial(_C.dense_lora_gemv, one, w, bias32, xs1, B, lora_scale, None, mode)
                         for route, mode in _GEMV_PREFETCH.items()}, in_calls=False)  # a probe, not the call
        name = routes.last_route("gemv_prefetch")
    # (no rows: nothing was measured or is read; any hint serves)
    return _C.dense_lora_gemv(x, w, bias32, xs, B, lora_scale, None, _GEMV_PREFETCH[name or "nta"])


_bnb_kernel: dict[str, object] = {}


def _direct_bnb_kernels() -> Optional[dict]:
    """bitsandbytes' CPU serving functions of its own C library (``{"nf4": f, "fp4": f}``), called directly, or None.
    Only where its ``gemv_4bit`` CPU kernel would call them itself (it prefers a hub kernel when one is installed):
    the registered op's Python wrapper and dispatch cost about as much as the whole product of a decoding step."""
    ops = sys.modules.get("bitsandbytes.backends.cpu.ops")
    if ops is None or getattr(ops, "gemm_4bit_forward_kernel", "absent") is not None:
        return None
    lib = getattr(ops, "lib", None)
    functions = {kind: getattr(lib, f"gemv_4bit_inference_cpu_{kind}_bf16", None) for kind in ("nf4", "fp4")}
    return functions if all(functions.values()) else None


def _bnb_cpu_kernel():
    """bitsandbytes' AVX-512 BF16 4-bit CPU kernel as ``f(x, packed, absmax, weight) -> (M, N) bf16`` (``x``
    ``(M, K)`` bf16 with unit-stride rows), or None when bitsandbytes is not loaded or has no such kernel here. Never
    imports bitsandbytes itself."""
    if "op" not in _bnb_kernel:
        run = None
        if "bitsandbytes" in sys.modules:
            try:
                from bitsandbytes.functional import has_avx512bf16

                if has_avx512bf16():
                    run = _bnb_runner(torch.ops.bitsandbytes.gemv_4bit.default, _direct_bnb_kernels())
            except Exception:
                run = None
        _bnb_kernel["op"] = run
    return _bnb_kernel["op"]


def _bnb_runner(op, direct: Optional[dict]):
    """The call of :func:`_bnb_cpu_kernel`: the C functions through ctypes when ``direct``, else the torch op."""
    if direct is None:
        return lambda x, packed, absmax, w: op(x, packed, list(w.shape), absmax, w.code, int(w.blocksize))
    import ctypes

    i64, ptr = ctypes.c_int64, ctypes.c_void_p

    def run(x, packed, absmax, w):
        (M, K), N = x.shape, w.shape[0]
        y = torch.empty(M, N, dtype=torch.bfloat16)
        direct[w.kind](i64(M), i64(N), i64(K), ptr(x.data_ptr()), ptr(packed.data_ptr()), ptr(absmax.data_ptr()),
                       ptr(y.data_ptr()), i64(w.blocksize), i64(x.stride(0)), i64(N))
        return y

    return run


def _bnb_eligible(x, weight) -> bool:
    """``bnb_native`` may serve this call (fastpeft.routing.ROUTE_LIMITS)."""
    if not isinstance(weight, QuantizedWeight) or weight.kind == "int8" or x.dtype != torch.bfloat16:
        return False
    N, K = weight.shape
    return K % weight.blocksize == 0 and N % 32 == 0 and K % 2 == 0 and _bnb_cpu_kernel() is not None


# lora_forward's routes through bitsandbytes' kernel; with no adapters both are the kernel alone.
_BNB_ROUTES = ("bnb_native", "bnb_native_fused")


def _bnb_product(x, weight: QuantizedWeight, bias) -> torch.Tensor:
    """``x w^T + b`` in bf16 by bitsandbytes' CPU kernel, from the tiled copy kept with ``weight``."""
    packed, absmax = weight.cpu_kernel_layout()
    y = _bnb_cpu_kernel()(_rows(x), packed, absmax, weight)
    if bias is not None:
        y = y.add_(bias.detach().to(x.dtype))
    return y


def _base_product(route: str, x, weight, bias) -> torch.Tensor:
    """``x W^T + b`` in ``x``'s dtype by ``route`` (IA3's routes)."""
    if route in ("compose", "compose_fp32"):
        return _gemm_product(x, weight, bias, route == "compose_fp32").to(x.dtype)
    if route == "bnb_native":
        return _bnb_product(x, weight, bias)
    b32 = None if bias is None else bias.detach().to(x.dtype).float()
    if isinstance(weight, QuantizedWeight):
        return _tiled_product(x, weight, b32, None, None, 1.0, gemv=route == "gemv").to(x.dtype)
    return _dense_gemv(x, weight, b32, None, None, 1.0)


def _grad_product(route: str, dy, weight) -> torch.Tensor:
    """``dY W`` ``(M, K)`` by ``route``: in ``dY``'s dtype for ``compose``, fp32 (not yet rounded) for
    ``compose_fp32``, ``fused_pairs`` (``_pairs_mm``), ``gemv`` (``_C.strip_mm``) and ``fused`` (a quantized weight
    decoded tile by tile inside the product)."""
    if route == "fused" and isinstance(weight, QuantizedWeight):
        return _C.quant_grad_x(dy.float().contiguous(), _quant_args(weight, dy.dtype), 0)
    if route == "fused_pairs":
        return _pairs_mm(dy, weight.detach().t())
    if route == "gemv":  # the weight read once in column strips, exact products of dY's dtype, fp32 sums
        return _C.strip_mm(dy, _weight_as(weight, dy.dtype, dy.dtype))
    dtype = _F32 if route in ("compose_fp32", "fused_fp32") else dy.dtype
    return torch.mm(dy if dy.dtype == dtype else dy.to(dtype), _weight_as(weight, dtype, dy.dtype))


def _product_routes(x, weight, forward: bool) -> list[str]:
    """The eligible routes of a base product (IA3) for this call (fastpeft.routing.ROUTE_LIMITS)."""
    names = ["compose"]
    if x.dtype != _F32:
        names.append("compose_fp32")
    quantized = isinstance(weight, QuantizedWeight)
    if quantized:
        names.append("fused")
    if forward and (quantized or weight.stride(-1) == 1):
        names.append("gemv")
    if forward and _bnb_eligible(x, weight):
        names.append("bnb_native")
    return names


# ------------------------------------------------------------------------------------ kernel ops kept per call kind
# lora_down and lora_dy are kernel choices inside routes, called per layer per step: a call whose choice is made takes
# it from a dict keyed by the few values its route key is made of, and builds no route key (at decode sizes that
# costs about as much as the pass). Entries: local key -> (routes.choice_state(), TakenRoutes, route).


def _is_current(found: Optional[tuple]) -> bool:
    """Whether a kept entry stands: kept, and the choices it was taken from unchanged since."""
    return found is not None and found[0] == routes.choice_state()


def _kept_kernel(kept: dict, local: tuple) -> Optional[str]:
    """The route ``kept[local]`` names while the choices it was taken from stand and no confirming measurement is
    due, the call counted toward it; else None (the caller runs :func:`routes.run`)."""
    found = kept.get(local)
    if not _is_current(found) or found[1].due():
        return None
    found[1].served()
    return found[2]


def _keep_kernel(kept: dict, local: tuple, op: str, key: routes.RouteKey, eligible) -> None:
    """Keep under ``local`` the route of ``key`` among ``eligible`` that later calls may take themselves
    (:func:`routes.settled_call`); nothing kept (and an older entry dropped) where the next call must go through
    :func:`routes.run`."""
    settled = routes.settled_call(key, eligible)
    if settled is None:
        kept.pop(local, None)
    else:
        kept[local] = (routes.choice_state(), routes.TakenRoutes({op: settled}), settled[0])


# ---------------------------------------------------------------------------------------------------- lora_down
_DOWN_ROUTES = ("rows", "transposed", "split")

# (x dtype, M bucket, K, rank, dropout on, split parts) -> the kept lora_down choice (_kept_kernel).
_down_settled: dict = {}


def _down_parts(x: torch.Tensor, A32: torch.Tensor, p: float) -> int:
    """How many bf16 parts of ``A`` route ``split`` would multiply for this call (``_split_parts``), 0 where it may
    not serve the call (``_down_routes``)."""
    return _split_parts() if _split_pairs_eligible(x, [A32], [p]) else 0


def _down_key(x: torch.Tensor, A: torch.Tensor, p: float) -> routes.RouteKey:
    """``lora_down``'s key: x's dtype, ``M`` bucket and ``K``, the rank and whether it drops (``N`` is 0); for bf16
    ``x`` without dropout also the parts ``split`` would take, since outside an inference call it multiplies a third
    more (its measured choice is not the one of an inference call)."""
    parts = _down_parts(x, A, p)
    return routes.make_key("lora_down", "cpu", "dense", x.dtype, x.dtype, (A.dtype,), x.shape[0], 0, x.shape[1],
                           p > 0, A.shape[0], 1, f"split parts={parts}" if parts else "")


def _down_routes(x: torch.Tensor, A32: torch.Tensor, p: float) -> tuple:
    """The ``lora_down`` routes that may serve ``x``: ``split`` where ``split_pairs`` may (bf16 ``x``, no dropout,
    oneDNN's bf16 block kernel)."""
    return _DOWN_ROUTES if _split_pairs_eligible(x, [A32], [p]) else _DOWN_ROUTES[:2]


def _split_parts() -> int:
    """How many bf16 parts ``_C.lora_xa_split`` splits ``A`` into for this call: two (its leading 16 bits, ``h``
    within ~2^-16 of exact, a third fewer products) in an inference call (``fastpeft.functional`` runs those under
    ``kept_copies``), where ``h`` only feeds the update of a bf16 output that rounds to 8 bits; three (all of fp32's
    bits) in every other call, whose ``h`` may be kept for ``dB``. Grad mode cannot tell them apart: an autograd
    Function runs its forward with grad disabled."""
    return 2 if kept_copies_allowed() else 3


def _down_by(route: str, x: torch.Tensor, A32: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    if route == "split":
        return _C.lora_xa_split(x, A32, _split_parts())
    return _C.lora_xa(x, A32, p, seed, route == "transposed")


def _lora_xa(x: torch.Tensor, A32: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``drop(x) A32^T`` (``x`` ``(M, K)`` rows, ``A32`` fp32 ``(r, K)`` -> fp32 ``(M, r)``: the products exact in
    fp32, the sums fp32) by the kernel op ``lora_down`` measured for this key: ``_C.lora_xa`` over ``A`` as stored
    (``rows``) or transposed (``transposed``), or ``_C.lora_xa_split`` (``split``); they sum in different orders."""
    local = (x.dtype, routes.bucket(x.shape[0]), x.shape[1], A32.shape[0], p > 0, _down_parts(x, A32, p))
    route = _kept_kernel(_down_settled, local)
    if route is not None:
        return _down_by(route, x, A32, p, seed)
    key = _down_key(x, A32, p)
    eligible = _down_routes(x, A32, p)
    out = routes.run(key, {route: partial(_down_by, route, x, A32, p, seed) for route in eligible})
    _keep_kernel(_down_settled, local, "lora_down", key, eligible)
    return out


# ------------------------------------------------------------------------------------------------------ lora_dy
_DY_ROUTES = ("rows", "outer")

# (dY dtype, M bucket, N, adapters' dtypes, total rank, adapters) -> the kept lora_dy choice (_kept_kernel).
_dy_settled: dict = {}


def _dy_routes(rank: int, need_dB: bool) -> tuple:
    """The ``lora_dy`` kernels that may serve a call: ``outer`` computes ``dB`` and takes a total rank of one or two
    SIMD vectors of this CPU's code path (``_C.dy_outer_takes``)."""
    return _DY_ROUTES if need_dB and _C.dy_outer_takes(rank) else _DY_ROUTES[:1]


def _dy_key(dtype, M: int, N: int, lora_B) -> routes.RouteKey:
    """``lora_dy``'s key: dY's dtype, ``M`` bucket and ``N``, the adapters' dtypes, total rank and count (``K`` is 0).
    Not whether the bias gradient is wanted: a call's ``g`` and ``dB`` do not depend on it."""
    rank = sum(B.shape[1] for B in lora_B)
    return routes.make_key("lora_dy", "cpu", "dense", dtype, dtype, tuple(B.dtype for B in lora_B), M, N, 0, False,
                           rank, len(lora_B))


def _dy_taken(dtype, M: int, N: int, lora_B, eligible: tuple) -> Optional[str]:
    """The ``lora_dy`` kernel among ``eligible`` that a call takes without measuring (a pin, or a choice made in this
    process, kept by :func:`_keep_kernel` first where it is not kept yet), the call counted toward the choice's
    confirmation; None where :func:`routes.run` must decide the call (no choice yet, or one due for its confirming
    measurement)."""
    local = (dtype, routes.bucket(M), N, tuple(B.dtype for B in lora_B), sum(B.shape[1] for B in lora_B),
             len(lora_B))
    if not _is_current(_dy_settled.get(local)):  # (a kept choice that is only due stays kept)
        _keep_kernel(_dy_settled, local, "lora_dy", _dy_key(dtype, M, N, lora_B), eligible)
    return _kept_kernel(_dy_settled, local)


def _dy_pass(dy: torch.Tensor, lora_B, xa32: torch.Tensor, svec: torch.Tensor, need_dB: bool, need_colsum: bool):
    """``_C.lora_dy_pass`` (``dy`` ``(M, N)`` rows, ``lora_B`` the ``B_i`` ``(N, r_i)``, ``xa32`` ``(M, R)`` fp32,
    ``svec`` ``(R,)`` fp32 -> ``g`` ``(M, R)``, ``dB`` ``(N, R)`` or None, the column sums ``(N,)`` or None, all
    fp32) by the kernel op ``lora_dy`` measured for this key: ``rows`` or ``outer``; they sum in different orders."""
    M, N = dy.shape
    eligible = _dy_routes(xa32.shape[1], need_dB)
    kernel = _dy_taken(dy.dtype, M, N, lora_B, eligible)
    if kernel is not None:
        return _C.lora_dy_pass(dy, lora_B, xa32, svec, need_dB, need_colsum, kernel == "outer")
    return routes.run(_dy_key(dy.dtype, M, N, lora_B),
                      {route: partial(_C.lora_dy_pass, dy, lora_B, xa32, svec, need_dB, need_colsum, route == "outer")
                       for route in eligible})


# ------------------------------------------------------------------------------------------------ LoRA forward
def _down_projections(x, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds, fold_single_scale=False):
    """Every adapter's ``xa_i = drop_i(x_i) A_i^T`` (in ``A_i``'s dtype, returned for backward) by ``_C.lora_xa``,
    and what the output needs from them: ``xs`` = the scaled ``xa_i`` side by side (M, R) fp32, the ``B_i`` as fp32
    ``(N, r_i)``, ``sum_i s_i b_i`` (fp32, or None) and the factor still to apply to ``xs B^T``: 1, or with
    ``fold_single_scale`` and one adapter its scaling, left unapplied for the kernel (one torch call less)."""
    if len(lora_A) == 1:  # the common case without the loop's lists (this runs per layer per decoded token)
        A, B, b, s = lora_A[0], lora_B[0], lora_bias[0], scaling[0]
        xi = x if (x.dtype == A.dtype or A.dtype == _F32) else x.to(A.dtype)  # as adapter_inputs casts
        xa32 = _lora_xa(_rows(xi), _f32(A), float(dropout_p[0]), int(seeds[0]))
        bias_sum = None if b is None else b.detach().to(_F32) * float(s)
        xs = xa32 if (fold_single_scale or s == 1) else xa32 * float(s)
        return ([xa32 if A.dtype == _F32 else xa32.to(A.dtype)], xs, [_f32(B)], bias_sum,
                float(s) if fold_single_scale else 1.0)
    xa_out, xs_cols, B32 = [], [], []
    bias_sum = None
    for xi, A, B, b, s, p, seed in zip(adapter_inputs(x, lora_A), lora_A, lora_B, lora_bias, scaling, dropout_p,
                                       seeds):
        xa32 = _lora_xa(_rows(xi), _f32(A), float(p), int(seed))
        xa_out.append(xa32 if A.dtype == _F32 else xa32.to(A.dtype))
        xs_cols.append(xa32 * float(s) if s != 1 else xa32)
        B32.append(_f32(B))
        if b is not None:
            term = b.detach().to(_F32) * float(s)
            bias_sum = term if bias_sum is None else bias_sum + term
    xs = torch.cat(xs_cols, 1) if xs_cols else None  # lora_xa's results are contiguous
    return xa_out, xs, B32, bias_sum, 1.0


def _forward_compose(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds, wide=False):
    """Route ``compose`` (``compose_fp32`` with ``wide``): torch's GEMM for the base, then ``_add_adapters``."""
    y, xa_out = _add_adapters(x, _gemm_product(x, weight, bias, wide), lora_A, lora_B, lora_bias, scaling, dropout_p,
                              seeds)
    return (y.to(x.dtype) if wide else y), xa_out


def _cpu_down(xi, A, p, seed):
    """``compose.DownPass`` on the CPU: ``_C.lora_xa`` (mask regenerated, ``x`` widened in registers)."""
    return _lora_xa(_rows(xi), _f32(A), p, seed)


def _cpu_masked(acc, xi, A, g32, p, seed):
    """``compose.MaskedPass`` on the CPU: ``_C.lora_dx_pass`` (``dX`` updated in place, ``dA`` returned)."""
    return _C.lora_dx_pass(acc, None if xi is None else _rows(xi), _f32(A), _rows(g32), p, seed)


def _add_adapters(x, y, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds):
    """The composition's adapter terms (``fastpeft.backends.compose.add_adapters``) with the CPU's passes."""
    return compose.add_adapters(x, y, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds, _cpu_down)


def _forward_fused(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds, wide=False, pairs=None):
    """Route ``fused`` (``fused_fp32`` with ``wide``; ``fused_pairs`` / ``fused_pairs_x`` with ``pairs`` "w" / "x",
    the operand the kernel rearranges): the base by torch's GEMM (by ``_pairs_product`` for ``pairs``; a quantized
    weight decoded tile by tile inside ``_C.quant_linear``), then ``_C.lora_xa`` and the in-place
    ``_C.lora_epilogue_``."""
    if isinstance(weight, QuantizedWeight):
        return _forward_one_pass(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds, gemv=False)
    base = _pairs_product(x, weight, bias, pairs == "x") if pairs else _gemm_product(x, weight, bias, wide)
    y, xa_out = _add_adapters_fused(x, base, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds)
    return (y.to(x.dtype) if wide or pairs else y), xa_out


def _forward_decoded_fused(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds):
    """Route ``decoded_fused`` (a quantized weight): the composition's base product (the weight decoded into a reused
    buffer of ``x``'s dtype, torch's GEMM), then the C++ adapter passes of ``fused``."""
    return _add_adapters_fused(x, _gemm_product(x, weight, bias, False), lora_A, lora_B, lora_bias, scaling,
                               dropout_p, seeds)


def _add_adapters_fused(x, y, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds):
    """The adapter terms added to the base output ``y`` by the C++ passes: ``_C.lora_xa`` over ``x`` (dropout
    regenerated, no copy of ``x``) and the in-place ``_C.lora_epilogue_`` (fp32 update, ``y`` rounded once).
    Returns ``(y, xa)``."""
    if not lora_A:
        return y, []
    xa_out, xs, _, bias_sum, _ = _down_projections(x, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds)
    y = _rows(y)
    _C.lora_epilogue_(y, xs, _bt_all(lora_B), None if bias_sum is None else bias_sum.contiguous())
    return y, xa_out


def _split_down(xi, A, p, seed):
    """``compose.DownPass`` of ``split_pairs`` (``p`` is 0 there): ``_C.lora_xa_split``, ``A`` split into bf16 parts
    (``_split_parts``), exact products and fp32 sums on the bf16 units."""
    return _C.lora_xa_split(_rows(xi), _f32(A), _split_parts())


def _forward_split_pairs(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds):
    """Route ``split_pairs`` (bf16 ``x``, one fp32 adapter, no dropout): ``compose`` with ``x A^T`` by
    ``_C.lora_xa_split``."""
    return compose.add_adapters(x, _gemm_product(x, weight, bias, False), lora_A, lora_B, lora_bias, scaling,
                                dropout_p, seeds, _split_down)


# lora_update's routes: each adds the adapter terms to a base output in place and returns (y, xa).
_UPDATE_ROUTES = {"compose": _add_adapters, "fused": _add_adapters_fused}


def _forward_one_pass(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds, gemv=True):
    """Routes ``gemv`` (and ``fused`` for a quantized weight, tiles instead of the GEMV): base product, adapters'
    up-projections and biases in one C++ call, fp32 throughout, rounded once to ``x``'s dtype."""
    total_bias = None if bias is None else _bias_as_reference_adds(bias, x.dtype)
    xs = B = None
    xa_out = []
    lora_scale = 1.0
    if lora_A:
        xa_out, xs, B32, bias_sum, lora_scale = _down_projections(
            x, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds, fold_single_scale=True)
        B = B32[0] if len(B32) == 1 else torch.cat(B32, 1)  # _f32 made each contiguous
        if bias_sum is not None:
            total_bias = bias_sum if total_bias is None else total_bias + bias_sum
    if isinstance(weight, QuantizedWeight):
        y = _tiled_product(x, weight, total_bias, xs, B, lora_scale, gemv=gemv)
    else:
        y = _dense_gemv(x, weight, total_bias, xs, B, lora_scale)
    return (y if y.dtype == x.dtype else y.to(x.dtype)), xa_out


def _settled_gemv(weight, bias, A, B, scaling, prefetch, x):
    """Route ``gemv`` of a settled call with one adapter and no ``lora_bias`` (``CpuBackend.settled_forward``): the
    down-projection, the base product and the update in one ``_C.dense_lora_gemv`` call (``prefetch``: the settled
    ``gemv_prefetch`` argument); ``x`` ``(..., K)``, ``y`` ``(..., N)`` in ``x``'s dtype. The route's own function
    where an adapter is not contiguous fp32 (PEFT's default), the weight not of ``x``'s dtype or ``x`` not
    contiguous."""
    if (A.dtype is _F32 and B.dtype is _F32 and weight.dtype is x.dtype and A.is_contiguous()
            and B.is_contiguous() and x.is_contiguous()):
        return _C.dense_lora_gemv(x, weight, None if bias is None else _bias_as_reference_adds(bias, x.dtype), None,
                                  B, scaling, A, prefetch)
    x2 = x.reshape(-1, x.shape[-1])
    y = _forward_one_pass(x2, weight, bias, [A], [B], [None], [scaling], [0.0], [0])[0]
    return y.view(*x.shape[:-1], y.shape[-1])


class SettledGemvFunction(partial):
    """:func:`_settled_gemv` with everything but ``x`` bound (a ``partial``: called at its speed), which can also
    hand the same calls to ``_C.SettledGemv`` (:meth:`bind_native`), which serves them without running Python."""

    def bind_native(self, native, layer_guards: list, guards: list, dtype: torch.dtype, k: int, m_low: int,
                    m_high: int, taken: dict):
        """``native`` (a ``_C.SettledGemv``; None: a new one over ``layer_guards``) serving the calls on ``x`` of
        ``dtype`` and ``K = k`` with ``m_low < M <= m_high`` rows too, under ``guards`` (the dispatch state they
        were settled under), recording the routes ``taken`` (op -> route); ``native`` as given where the weight is
        not of ``dtype`` (:func:`_settled_gemv` would take the route's own function)."""
        weight, bias, A, B, scaling, prefetch = self.args
        if weight.dtype != dtype:
            return native
        if native is None:
            native = _C.SettledGemv(layer_guards, routes.last_routes())
        native.add(guards, weight, bias, A, B, scaling, prefetch, k, m_low, m_high, taken)
        return native


def _bias_as_reference_adds(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The base bias ``(N,)`` as contiguous fp32 holding the values of ``bias`` rounded to ``dtype``: the reference
    adds it in ``x``'s dtype. An fp32 bias of an fp32 layer passes as it is (the kernels only read it)."""
    if bias.dtype != dtype:
        return bias.detach().to(dtype).float().contiguous()
    if dtype == _F32:
        return bias if bias.is_contiguous() else bias.detach().contiguous()
    return bias.detach().float().contiguous()


def _forward_bnb(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds, fused=False):
    """Routes ``bnb_native`` (the composition's adapter terms) and ``bnb_native_fused`` (the C++ adapter passes):
    bitsandbytes' CPU kernel for the base product."""
    add = _add_adapters_fused if fused else _add_adapters
    return add(x, _bnb_product(x, weight, bias), lora_A, lora_B, lora_bias, scaling, dropout_p, seeds)


# ----------------------------------------------------------------------------------------------- LoRA backward
def _backward_compose(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x, needs_grad_A,
                      needs_grad_bias=True, wide=False):
    """Route ``compose`` (``compose_fp32`` with ``wide``): ``dY W`` by torch's GEMM (``wide``: in fp32, rounded
    once), then ``fastpeft.backends.compose.backward`` with the CPU's masked pass."""
    grad_x = _grad_product("compose_fp32" if wide else "compose", dy, weight) if needs_grad_x else None
    grad_x, grad_A, grad_B, grad_bias = compose.backward(dy, x, grad_x, lora_A, lora_B, xa, scaling, dropout_p, seeds,
                                                         needs_grad_A, _cpu_masked, needs_grad_bias=needs_grad_bias)
    if wide and grad_x is not None:
        grad_x = grad_x.to(dy.dtype)
    return grad_x, grad_A, grad_B, grad_bias


def _backward_fused(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x, needs_grad_A,
                    needs_grad_bias=True, wide=False, product="fused"):
    """Route ``fused`` (``fused_fp32`` with ``wide``): ``_C.lora_dy_pass`` over ``dY``, ``dY W`` by torch's GEMM (a
    quantized weight decoded tile by tile; ``decoded_fused``, ``product="compose"``: decoded into a reused buffer
    first, as the composition does; ``fused_pairs``, ``product="fused_pairs"``: ``_pairs_mm``; ``gemv``,
    ``product="gemv"``: ``_C.strip_mm``), ``_C.lora_dx_pass`` over ``x`` and ``dX``."""
    if (product == "fused" and not wide and len(lora_A) == 1 and isinstance(weight, torch.Tensor)
            and weight.dtype == dy.dtype and _all_fp32([lora_A[0], lora_B[0], xa[0]])):
        # One fp32 adapter and dY W in dY's dtype: the sequence below in one C++ call (_C.lora_fused_backward), once
        # the dY pass's kernel is settled (until then the sequence below measures it).
        kernel = _dy_taken(dy.dtype, dy.shape[0], dy.shape[1], lora_B, _dy_routes(lora_A[0].shape[0], True))
        if kernel is not None:
            dx, dA, dB, db = _C.lora_fused_backward(dy, weight.detach() if needs_grad_x else None,
                                                    _rows(x) if needs_grad_A else None, _f32(lora_A[0]),
                                                    lora_B[0].detach(), _f32(xa[0]), float(scaling[0]),
                                                    float(dropout_p[0]), int(seeds[0]), needs_grad_bias,
                                                    kernel == "outer")
            return (dx if needs_grad_x else None), [dA if needs_grad_A else None], [dB], [db]
    ranks = [A.shape[0] for A in lora_A]
    single = len(lora_A) == 1
    xa32 = _f32(xa[0]) if single else torch.cat([h.detach().to(_F32) for h in xa], 1).contiguous()
    g, db, colsum = _dy_pass(dy, list(lora_B), xa32, _scale_vector(ranks, scaling), True, needs_grad_bias)

    grad_x = None
    acc = None
    if needs_grad_x:
        product = _grad_product("fused_fp32" if wide else product, dy, weight)
        if product.dtype != dy.dtype:  # fp32 product of a low-precision dY: carried, rounded once at the end
            acc = product
            grad_x = torch.empty(0, dtype=dy.dtype)  # only its dtype is used below
        else:
            grad_x = product
            # Several adapters in low precision: carry dX in fp32 like the reference, round once at the end.
            acc = grad_x.float() if (len(lora_A) > 1 and grad_x.dtype != _F32) else grad_x
    grad_A: list[Optional[torch.Tensor]] = []
    grad_B: list[torch.Tensor] = []
    grad_bias: list[Optional[torch.Tensor]] = []
    off = 0
    inputs = adapter_inputs(x, lora_A) if needs_grad_A else iter(())
    for A, B, r, s, p, seed in zip(lora_A, lora_B, ranks, scaling, dropout_p, seeds):
        grad_B.append((db if single else db[:, off : off + r].contiguous()).to(B.dtype))
        grad_bias.append((colsum * float(s)).to(B.dtype) if needs_grad_bias else None)
        xi = _rows(next(inputs)) if needs_grad_A else None
        if needs_grad_x or needs_grad_A:
            dA = _C.lora_dx_pass(acc, xi, _f32(A), g if single else g[:, off : off + r], float(p), int(seed))
        grad_A.append(dA.to(A.dtype) if needs_grad_A else None)
        off += r
    if acc is not None and acc is not grad_x:
        grad_x = acc.to(grad_x.dtype)
    return grad_x, grad_A, grad_B, grad_bias


def _backward_split_pairs(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x, needs_grad_A,
                          needs_grad_bias=True):
    """Route ``split_pairs`` (bf16 ``dY``, one fp32 adapter, no dropout): ``dY W`` by the composition's GEMM;
    ``g = s dY B``, ``dB``, the bias gradient and ``dA = g^T x`` by ``_C.lora_backward_split`` (every fp32 operand
    split exactly into three bf16 parts: exact products, fp32 sums, on the bf16 units); ``dX += g A`` as the
    composition adds it (``addmm_`` in ``dX``'s dtype)."""
    A32 = _f32(lora_A[0])
    g, dA, dB, db = _C.lora_backward_split(dy, _rows(x) if needs_grad_A else None, A32, _bt_all(lora_B),
                                           _f32(xa[0]), float(scaling[0]))
    grad_x = None
    if needs_grad_x:
        grad_x = _grad_product("compose", dy, weight)
        grad_x.addmm_(g.to(grad_x.dtype), A32.to(grad_x.dtype))
    return grad_x, [dA if needs_grad_A else None], [dB.to(lora_B[0].dtype)], [db.to(lora_B[0].dtype)]


def _split_pairs_eligible(a, lora_A, dropout_p, more=()) -> bool:
    """``split_pairs``: ``a`` (``x`` or ``dY``) bf16, one adapter whose ``A`` (and ``more``) is fp32, no dropout, and
    oneDNN's bf16 block kernel on this CPU (``_C.widened_mm``)."""
    return (a.dtype == torch.bfloat16 and len(lora_A) == 1 and dropout_p[0] == 0
            and _all_fp32([lora_A[0], *more]) and _C.widened_mm_available())


_SCALE_VECTORS: dict[tuple, torch.Tensor] = {}


def _scale_vector(ranks, scaling) -> torch.Tensor:
    """``(sum r_i,)`` fp32: each adapter's scaling repeated over its rank (kept per distinct value: read only)."""
    key = (tuple(ranks), tuple(map(float, scaling)))
    vec = _SCALE_VECTORS.get(key)
    if vec is None:
        vec = torch.cat([torch.full((r,), s, dtype=_F32) for r, s in zip(*key)])
        if len(_SCALE_VECTORS) < 1024:
            _SCALE_VECTORS[key] = vec
    return vec


def _backward_small(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x, needs_grad_A,
                    needs_grad_bias=True):
    """Route ``small``: the whole fp32 single-adapter backward in one C++ call (each torch call from Python costs
    microseconds, as much as the adapter's arithmetic at decode sizes)."""
    dx, dA, dB, db = _C.lora_small_backward(dy, weight, x if needs_grad_A else None, lora_A[0], lora_B[0], xa[0],
                                            float(scaling[0]), float(dropout_p[0]), int(seeds[0]), needs_grad_x,
                                            needs_grad_bias)
    return (dx if needs_grad_x else None), [dA if needs_grad_A else None], [dB], [db]


def _all_fp32(tensors) -> bool:
    return all(t.dtype == _F32 for t in tensors)


# The routes of lora_forward and lora_backward (fastpeft.routing.ROUTES), in the order they are measured, and the
# conditions under which each may serve a call (fastpeft.routing.ROUTE_LIMITS).
_FORWARD_ROUTES = {
    "compose": _forward_compose,
    "fused": _forward_fused,
    "compose_fp32": partial(_forward_compose, wide=True),
    "fused_fp32": partial(_forward_fused, wide=True),
    "fused_pairs": partial(_forward_fused, pairs="w"),
    "fused_pairs_x": partial(_forward_fused, pairs="x"),
    "decoded_fused": _forward_decoded_fused,
    "gemv": _forward_one_pass,
    "bnb_native": _forward_bnb,
    "bnb_native_fused": partial(_forward_bnb, fused=True),
    "split_pairs": _forward_split_pairs,
}


def _shared_eligible(route: str, a, weight) -> Optional[bool]:
    """The conditions of the routes lora_forward and lora_backward share (``a`` is ``x`` or ``dY``); None for a route
    of one of them only."""
    if route in ("compose", "fused"):
        return True
    if route == "compose_fp32":
        return a.dtype != _F32
    quantized = isinstance(weight, QuantizedWeight)
    if route == "fused_fp32":
        return a.dtype != _F32 and not quantized
    if route in ("fused_pairs", "fused_pairs_x"):
        return _pairs_eligible(a, weight, route == "fused_pairs_x")
    if route == "decoded_fused":
        return quantized
    return None


def _forward_eligible(route: str, x, weight, lora_A, dropout_p) -> bool:
    shared = _shared_eligible(route, x, weight)
    if shared is not None:
        return shared and (route != "decoded_fused" or bool(lora_A))
    if route == "split_pairs":
        return bool(lora_A) and _split_pairs_eligible(x, lora_A, dropout_p)
    if route == "gemv":
        return isinstance(weight, QuantizedWeight) or weight.stride(-1) == 1
    return route in _BNB_ROUTES and _bnb_eligible(x, weight)


_BACKWARD_ROUTES = {
    "compose": _backward_compose,
    "fused": _backward_fused,
    "compose_fp32": partial(_backward_compose, wide=True),
    "fused_fp32": partial(_backward_fused, wide=True),
    "fused_pairs": partial(_backward_fused, product="fused_pairs"),
    "decoded_fused": partial(_backward_fused, product="compose"),
    "small": _backward_small,
    "gemv": partial(_backward_fused, product="gemv"),
    "split_pairs": _backward_split_pairs,
}


def _backward_eligible(route: str, dy, weight, lora_A, lora_B, xa, dropout_p) -> bool:
    shared = _shared_eligible(route, dy, weight)
    if shared is not None:
        return shared
    if route == "split_pairs":
        return _split_pairs_eligible(dy, lora_A, dropout_p, (xa[0],))
    if route == "gemv":
        return not isinstance(weight, QuantizedWeight) and weight.stride(-1) == 1
    return (route == "small" and not isinstance(weight, QuantizedWeight) and len(lora_A) == 1
            and lora_A[0].is_contiguous() and _all_fp32([dy, weight, lora_A[0], lora_B[0], xa[0]]))


# The routes _C.settled_lora_training runs in its autograd node (its ``forward_route`` and ``backward`` arguments).
_NATIVE_FORWARD = {"gemv": 0, "compose": 1, "fused": 2}
_NATIVE_BACKWARD = {"small": 0, "fused": 1, "compose": 2, "gemv": 3}


def _native_fits(x_dtype, weight, A, B) -> bool:
    """Whether ``_C.settled_lora_training`` takes these tensors: fp32 adapters, ``A`` contiguous, the weight of
    ``x``'s dtype (fp32, bf16 or fp16) and unit column stride."""
    return (weight.dtype is x_dtype and A.dtype is _F32 and B.dtype is _F32 and A.is_contiguous()
            and weight.stride(1) == 1)


def _native_training(forward, prefetch, backward, down, dy_outer, x, weight, bias, A, B, scaling, dropout_p,
                     seed) -> Optional[torch.Tensor]:
    """A settled training call with one fp32 adapter over a weight of ``x``'s dtype, forward route ``gemv``,
    ``compose`` or ``fused`` and backward route ``small`` (fp32), ``fused``, ``compose`` or ``gemv``, both directions
    in C++ by the routes' own kernels (``_C.settled_lora_training``; ``x A^T`` by ``lora_down``'s settled kernel where
    the route calls it, ``down`` its index in ``_DOWN_ROUTES``; the dY pass by ``lora_dy``'s): ``x`` ``(M, K)`` ->
    ``y`` ``(M, N)`` recorded for autograd, or None where this call's tensors do not fit it (a parameter's data
    replaced by another dtype or layout since it settled)."""
    if _native_fits(x.dtype, weight, A, B):
        return _C.settled_lora_training(x, A, B, weight, bias, scaling, dropout_p, seed, prefetch, backward, down,
                                        forward, dy_outer)
    return None


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
        if not x.is_cpu or x.dtype not in _FLOATS:
            return False
        if isinstance(weight, torch.Tensor):
            return weight.is_cpu and weight.layout == torch.strided and weight.dtype in _FLOATS
        # A QuantizedWeight (fastpeft.quant): dequantized inside the products by _C.quant_*.
        return getattr(weight, "device", None) is not None and weight.device.type == "cpu"

    @staticmethod
    def _key(op, x, weight, lora_A, dropout_p, grads=""):
        return routes.key_of_call(op, "cpu", _weight_kind(weight), x, weight, lora_A, dropout_p, grads)

    def dropout_scale(self, rows, cols, p, seed, device):
        if torch.device(device).type != "cpu":
            return None
        return _C.dropout_scale(int(seed), int(rows), int(cols), float(p), 1.0 / (1.0 - float(p)))

    def dropout_combine(self, a, b, p, seed, kept, dropped, out=None):
        operands = [t for t in (a, b, out) if t is not None]
        if not all(t.is_cpu and t.dim() == 2 and t.dtype in _DTYPE_CODES and t.shape == b.shape for t in operands):
            return None
        if out is not None and out.stride(-1) != 1:
            return None
        return _C.masked_combine(None if a is None else _rows(a), _rows(b), int(seed), float(p), float(kept),
                                 float(dropped), out)

    def scale_columns(self, z, scale, dtype, add=None, out=None):
        if add is not None:  # one fp32 row for every m, or (M, N) rows of an activation dtype
            if not (add.is_cpu and (add.dtype == _F32 if add.dim() == 1 else add.dtype in _DTYPE_CODES)):
                return None
            add = add.contiguous() if add.dim() == 1 else _rows(add)
        if not (z.is_cpu and z.dim() == 2 and z.dtype in _DTYPE_CODES and dtype in _DTYPE_CODES
                and scale.is_cpu and scale.dtype == _F32):
            return None
        if out is not None and not (out.is_cpu and out.dtype == dtype and out.shape == z.shape and out.stride(-1) == 1):
            return None
        return _C.scale_columns(_rows(z), scale.contiguous(), add, dtype, out)

    def column_dots(self, a, b):
        if not (a.is_cpu and b.is_cpu and a.dim() == 2 and a.dtype in _DTYPE_CODES and b.dtype in _DTYPE_CODES):
            return None
        return _C.column_dots(_rows(a), _rows(b))

    def dora_grad_prologue(self, dy, z, scale, with_e):
        if not (dy.is_cpu and dy.dim() == 2 and dy.dtype in _DTYPE_CODES and scale.is_cpu and scale.dtype == _F32
                and (z is None or (z.is_cpu and z.dtype in _DTYPE_CODES and z.shape == dy.shape))):
            return None
        dots, ge = _C.dora_grad_prologue(_rows(dy), None if z is None else _rows(z), scale.contiguous(), with_e)
        return (dots if z is not None else None), ge

    # ---------------------------------------------------------------------------------------- widened products
    def widened_mm_eligible(self, a, b, interleave_a=True):
        # fused_pairs(_x)'s conditions, with a of unit column stride as _C.widened_mm(_nn) reads it.
        return (_C is not None and a.is_cpu and b.is_cpu and a.dim() == 2 and a.stride(1) == 1
                and _pairs_eligible(a, b, interleave_x=interleave_a))

    def widened_mm(self, a, b, interleave_a=False):
        if interleave_a and b.stride(1) != 1:
            raise ValueError("fastpeft cpu backend: widened_mm(interleave_a=True) needs b of unit column stride")
        return _pairs_mm(a, b, interleave_a)  # b of unit column stride, or the transposed view of a row-major matrix

    def widened_mm_parts(self, parts, b):
        # each tile of b rearranged once for every part (a tile of rows never spans two parts)
        if b.stride(1) == 1:
            return _C.widened_mm_parts(list(parts), b, True)
        return _C.widened_mm_parts(list(parts), b.t(), False)

    def lora_down(self, x, lora_A):
        if not (x.is_cpu and x.dim() == 2 and x.dtype in _DTYPE_CODES):
            return super().lora_down(x, lora_A)
        return _lora_xa(_rows(x), _f32(lora_A), 0.0, 0)

    def lora_up_onto(self, acc, h, lora_B, scale, bias=None):
        if not (acc.is_cpu and acc.dim() == 2 and acc.dtype in _DTYPE_CODES and acc.stride(1) == 1):
            return super().lora_up_onto(acc, h, lora_B, scale, bias)
        _C.lora_epilogue_(acc, _f32(h * scale), _bt_all([lora_B]), None if bias is None else _f32(bias))
        return acc

    def dora_epilogue(self, z, base, h, lora_B, k, s, f, bias, dtype, z_out=None):
        if not (dtype in _DTYPE_CODES and f.is_cpu and f.dtype == _F32
                and all(t.is_cpu and t.dtype == _F32 and t.dim() == 2 and t.stride(1) == 1
                        for t in (z, h) + tuple(t for t in (base, z_out) if t is not None))):
            return None
        return _C.dora_epilogue(z, base, h, _bt_all([lora_B]), float(k), float(s), f.contiguous(),
                                None if bias is None else _f32(bias), dtype, z_out)

    def lora_backward_onto(self, acc, dy, x, lora_A, lora_B, xa, scaling, dropout_p, seed, corrected=None):
        if not (acc.is_cpu and acc.dtype == _F32 and acc.dim() == 2 and acc.stride(1) == 1 and dy.is_cpu
                and dy.dtype in _DTYPE_CODES and (x is None or x.dtype in _DTYPE_CODES)):
            return None
        if corrected is not None and not all(t.is_cpu and t.dim() == 2 and t.shape == acc.shape and t.stride(1) == 1
                                             for t in corrected):
            return None
        r = lora_A.shape[0]
        if dy.dtype == _F32:  # dY B and dY^T xa by the vendor GEMM, as the composition takes them; no widening
            g = compose.scaled_mm(dy, _f32(lora_B), scaling)
            dB = compose.scaled_mm(_f32(xa).t(), dy, scaling).t()
        else:
            g, dB, _ = _dy_pass(_rows(dy), [lora_B], _f32(xa), _scale_vector([r], [scaling]), True, False)
        xr, A32 = None if x is None else _rows(x), _f32(lora_A)
        if corrected is None or dropout_p == 0:
            dA = _C.lora_dx_pass(acc, xr, A32, g, float(dropout_p), int(seed))
            if corrected is not None:  # no mask: the correction's term is zero
                corrected[1].copy_(acc)
        else:  # the term, the correction and the rounding in the same column strips as dA, one mask draw
            e, out = corrected
            dA = _C.lora_dx_pass(acc, xr, A32, g, float(dropout_p), int(seed), e if e.dtype == _F32 else e.float(),
                                 out)
        return (dA if x is not None else None), dB

    # ----------------------------------------------------------------------------------------------------- LoRA
    def lora_forward(self, x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds):
        args = (x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds)
        key = self._key("lora_forward", x, weight, lora_A, dropout_p)
        return routes.run_table(key, _FORWARD_ROUTES, _forward_eligible, args, (x, weight, lora_A, dropout_p))

    def settled_route(self, op, x, weight, lora_A):
        key = self._key(op, x, weight, lora_A, [0.0] * len(lora_A))
        if op == "lora_forward":
            table = _FORWARD_ROUTES
            eligible = routes.EligibleRoutes(table, _forward_eligible, (x, weight, lora_A, [0.0] * len(lora_A)))
        elif op == "lora_update":
            table = eligible = _UPDATE_ROUTES
        else:
            return None
        found = routes.settled_call(key, eligible)
        return None if found is None else (found[0], table[found[0]], found[1])

    def settled_forward(self, route, weight, bias, lora_A, lora_B, lora_bias, scaling):
        if route != "gemv" or not isinstance(weight, torch.Tensor) or len(lora_A) != 1 or lora_bias[0] is not None:
            return None
        prefetch = routes.settled_call(_prefetch_key(weight), _GEMV_PREFETCH)
        if prefetch is None:  # its first calls are measured on the route's own path
            return None
        function = SettledGemvFunction(_settled_gemv, weight, bias, lora_A[0], lora_B[0], float(scaling[0]),
                                       _GEMV_PREFETCH[prefetch[0]])
        return function, {"gemv_prefetch": (prefetch[0], None, prefetch[1])}

    def settled_training(self, x, weight, lora_A, lora_B, lora_bias, dropout_p, grads):
        conditions = (x, weight, lora_A, dropout_p)
        forward = routes.settled_call(self._key("lora_forward", *conditions),
                                      routes.EligibleRoutes(_FORWARD_ROUTES, _forward_eligible, conditions))
        # dY (M, N) has x's dtype and rows: the backward's key is read off x (its routes' conditions per call)
        backward = routes.settled_call(self._key("lora_backward", *conditions, grads), _BACKWARD_ROUTES)
        if forward is None or backward is None:
            return None
        taken = {"lora_forward": (forward[0], partial(self._taken_forward, forward[0]), forward[1]),
                 "lora_backward": (backward[0], partial(self._taken_backward, backward[0], grads), backward[1])}
        if (forward[0] in _NATIVE_FORWARD and backward[0] in _NATIVE_BACKWARD and len(lora_A) == 1
                and lora_bias[0] is None and _native_fits(x.dtype, weight, lora_A[0], lora_B[0])):
            # The kernel choices the routes take, each settled first (their first calls are measured on the route's
            # own path): the GEMV's prefetch for gemv, lora_down's kernel where the route runs it (compose over fp32
            # x: with dropout only), the dY pass's kernel for the fused backward.
            kernels = {}
            if forward[0] == "gemv":
                kernels["gemv_prefetch"] = routes.settled_call(_prefetch_key(weight), _GEMV_PREFETCH)
            if forward[0] != "compose" or dropout_p[0] > 0 or x.dtype != _F32:
                kernels["lora_down"] = routes.settled_call(_down_key(x, lora_A[0], dropout_p[0]),
                                                           _down_routes(x, lora_A[0], dropout_p[0]))
            if backward[0] in ("fused", "gemv"):
                kernels["lora_dy"] = routes.settled_call(_dy_key(x.dtype, x.shape[0], weight.shape[0], lora_B),
                                                         _dy_routes(lora_A[0].shape[0], True))
            if all(found is not None for found in kernels.values()):
                taken.update({op: (found[0], None, found[1]) for op, found in kernels.items()})
                prefetch, down, dy = kernels.get("gemv_prefetch"), kernels.get("lora_down"), kernels.get("lora_dy")
                taken["native"] = partial(_native_training, _NATIVE_FORWARD[forward[0]],
                                          _GEMV_PREFETCH[prefetch[0]] if prefetch else 0,
                                          _NATIVE_BACKWARD[backward[0]], _DOWN_ROUTES.index(down[0]) if down else 0,
                                          bool(dy) and dy[0] == "outer")
        return taken

    def _taken_forward(self, route, x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds):
        """``lora_forward`` by ``route`` where its conditions hold for this call, else by the full method."""
        if _forward_eligible(route, x, weight, lora_A, dropout_p):
            return _FORWARD_ROUTES[route](x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds)
        return self.lora_forward(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds)

    def _taken_backward(self, route, grads, grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds,
                        needs_grad_x, needs_grad_A, needs_grad_bias=True):
        """``lora_backward`` by ``route`` where this call wants the ``grads`` it was settled for and the route's
        conditions hold, else by the full method."""
        dy = _rows(grad_y)
        if (routes.grads_key(needs_grad_x, needs_grad_A) == grads
                and _backward_eligible(route, dy, weight, lora_A, lora_B, xa, dropout_p)):
            return _BACKWARD_ROUTES[route](dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x,
                                           needs_grad_A, needs_grad_bias)
        return self.lora_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x,
                                  needs_grad_A, needs_grad_bias)

    def base_linear(self, x, weight, bias):
        # The LoRA forward's routes with no adapters: the same measured choice of base product, without IA3's scaling
        # of x by ones. Where that choice is bitsandbytes' serving kernel (both bnb routes are the bare kernel here),
        # it is called at once, past the layers of calls of lora_forward's table: at decode sizes those are a visible
        # share of the call.
        if _bnb_eligible(x, weight) and routes.take(self._key("lora_forward", x, weight, (), ()), _BNB_ROUTES):
            return _bnb_product(x, weight, bias)
        return self.lora_forward(x, weight, bias, [], [], [], [], [], [])[0]

    def add_lora_(self, x, y, weight, lora_A, lora_B, lora_bias, scaling):
        zeros, seeds = [0.0] * len(lora_A), [0] * len(lora_A)
        key = self._key("lora_update", x, weight, lora_A, zeros)
        route = routes.take(key, _UPDATE_ROUTES)
        if route is not None:  # settled: update y itself, no candidates built
            return _UPDATE_ROUTES[route](x, y, lora_A, lora_B, lora_bias, scaling, zeros, seeds)[0]
        updaters = {name: (lambda out, add=add: add(x, out, lora_A, lora_B, lora_bias, scaling, zeros, seeds)[0])
                    for name, add in _UPDATE_ROUTES.items()}
        return routes.run_in_place(key, updaters, y)

    def lora_backward(
        self, grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x, needs_grad_A,
        needs_grad_bias=True,
    ):
        dy = _rows(grad_y)
        args = (dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x, needs_grad_A,
                needs_grad_bias)
        grads = routes.grads_key(needs_grad_x, needs_grad_A)
        key = self._key("lora_backward", dy, weight, lora_A, dropout_p, grads)
        return routes.run_table(key, _BACKWARD_ROUTES, _backward_eligible, args,
                                (dy, weight, lora_A, lora_B, xa, dropout_p))

    # ------------------------------------------------------------------------------------------------------ IA3
    def _product(self, op_outputs, x, weight, bias, compute):
        """Run ``compute(route)`` by the chosen route of ``ia3_forward`` for this call."""
        candidates = {name: (lambda name=name: compute(name)) for name in _product_routes(x, weight, forward=True)}
        return routes.run(self._key("ia3_forward", x, weight, [], [], op_outputs), candidates)

    def ia3_forward(self, x, weight, bias, scale, is_feedforward):
        if is_feedforward:
            scaled = (x.to(scale.dtype) * scale).to(x.dtype)
            return self._product("ff", scaled, weight, bias, lambda route: _base_product(route, scaled, weight, bias))
        # In place: torch computes z * scale in the promoted dtype and rounds into z, the reference's
        # (z * scale).to(z.dtype) without a second (M, N) tensor (no autograd here: nothing keeps z).
        return self._product("out", x, weight, bias, lambda route: _base_product(route, x, weight, bias).mul_(scale))

    # A second GEMM costs a whole forward on a CPU: keep z = x W^T + b for backward (base.Backend).
    ia3_keeps_base_output = True

    def ia3_forward_keep_base(self, x, weight, bias, scale):
        """Output scaling: ``(y, z)`` with ``z = x W^T + b`` in ``x``'s dtype and ``y = (z * scale).to(z.dtype)``."""

        def compute(route):
            z = _base_product(route, x, weight, bias)
            return (z * scale).to(z.dtype), z

        return self._product("out+z", x, weight, bias, compute)

    def _grad(self, dy, weight, compute):
        """Run ``compute(route)`` by the chosen route of ``ia3_backward`` for this call."""
        names = _product_routes(dy, weight, forward=False)
        candidates = {name: (lambda name=name: compute(name)) for name in names}
        return routes.run(self._key("ia3_backward", dy, weight, [], [], "dx"), candidates)

    def ia3_backward_from_base(self, grad_y, z, weight, scale, needs_grad_x):
        """The reference's output-scaling backward with the saved ``z``: ``dscale = sum_m dY * z`` and
        ``dX = ((dY * scale) in z's dtype) W``."""
        grad_scale = (grad_y.to(scale.dtype) * z.to(scale.dtype)).sum(0)
        grad_x = None
        if needs_grad_x:
            scaled = (grad_y.to(scale.dtype) * scale).to(z.dtype)
            grad_x = self._grad(scaled, weight, lambda route: _grad_product(route, scaled, weight).to(z.dtype))
        return grad_x, grad_scale

    def ia3_backward(self, grad_y, x, weight, bias, scale, is_feedforward, needs_grad_x):
        """The reference's formulas (``ReferenceBackend.ia3_backward``) with this backend's products: no dense
        weight is built for a bitsandbytes base. Output scaling gets here only from the custom op (torch.compile),
        which saves ``x``: ``z`` is recomputed."""
        if not is_feedforward:
            z = self._product("out-z", x, weight, bias, lambda route: _base_product(route, x, weight, bias))
            return self.ia3_backward_from_base(grad_y, z, weight, scale, needs_grad_x)
        grad_scaled = self._grad(grad_y, weight, lambda route: _grad_product(route, grad_y, weight).to(x.dtype))
        grad_scale = (grad_scaled.to(scale.dtype) * x.to(scale.dtype)).sum(0)
        grad_x = (grad_scaled.to(scale.dtype) * scale).to(x.dtype) if needs_grad_x else None
        return grad_x, grad_scale


BACKEND = CpuBackend()
