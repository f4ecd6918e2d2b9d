"""``QuantizedWeight``: a bitsandbytes base weight described without copying it.

fastpeft never calls bitsandbytes' matmul (bitsandbytes 0.50.2's CPU matmul gives wrong input gradients under autograd
and repacks the weight in place). Instead every backend receives a ``QuantizedWeight`` that points at the packed storage
of a ``Linear4bit`` / ``Linear8bitLt`` and either dequantizes it with :meth:`QuantizedWeight.dequantize` (plain torch,
written here) or dequantizes inside its GEMM (``fastpeft.kernels.quant_matmul``).

Layouts (bitsandbytes 0.50.2, learned from its source, re-implemented here):

- **4-bit (nf4/fp4)**, canonical layout: the ``(N, K)`` weight flattened row-major into ``n = N*K`` values; value
  ``i`` is a 4-bit index into a 16-entry ``code`` table, stored in byte ``i // 2``: the **high** nibble for even
  ``i``, the low nibble for odd ``i``. Blocks of ``blocksize`` consecutive flattened values share one scale
  ``absmax[i // blocksize]`` (blocks may straddle rows). ``w[i] = (code[q[i]] * absmax[i // blocksize])`` computed
  in float32, then cast to ``dtype``.
- **double quantization** (``compress_statistics=True``): ``absmax`` is uint8 indices into a 256-entry
  ``nested_code`` table, with float32 ``nested_absmax`` per ``nested_blocksize`` (256) scales and a scalar
  ``nested_offset``: ``absmax[j] = nested_code[qa[j]] * nested_absmax[j // nested_blocksize] + nested_offset``
  (float32, in that order).
- **CPU inference repack**: the first eval forward of a CPU ``Linear4bit`` without grad rewrites the weight in place
  to a ``[N, K/2]`` tiled layout (32 rows x 2 columns per 64-nibble group, low nibbles first) with a bfloat16
  ``[K/blocksize, N]`` absmax and no double quantization. :meth:`from_param` undoes the tiling into fresh tensors
  (never touching the module); the bfloat16 absmax (already rounded by bitsandbytes) is kept as float32.
- **int8** (``Linear8bitLt``, ``has_fp16_weights=False``): ``data`` ``(N, K)`` int8 and row scales ``SCB``
  ``(N,)`` float32; ``w = data * SCB[:, None] * (1/127)`` in float32 (bitsandbytes multiplies by the float32
  constant ``7.874015718698502e-3``).
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

# bitsandbytes' tables, written out so fastpeft's own dequantization needs no bitsandbytes import.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit) listed in bit-pattern order, normalized by its max (12).
FP4_CODE = tuple(
    v / 12.0 for v in (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
)
INT8_INV_127 = 7.874015718698502e-3  # bitsandbytes' float32 reciprocal of 127
CPU_REPACK_BLOCK_N = 32

KINDS = ("nf4", "fp4", "int8")
# id(QuantState) -> (weak reference to it, stamp, QuantizedWeight). Keyed by id because bitsandbytes' QuantState
# defines __eq__ and so is unhashable: a WeakKeyDictionary cannot hold it.
_FROM_STATE: dict = {}


def code_table(kind: str, device=None) -> torch.Tensor:
    """The ``(16,)`` float32 code table of ``kind`` (``nf4`` or ``fp4``)."""
    values = {"nf4": NF4_CODE, "fp4": FP4_CODE}[kind]
    return torch.tensor(values, dtype=torch.float32, device=device)


@dataclass(eq=False)
class QuantizedWeight:
    """A quantized ``(N, K)`` base weight; tensors are views of the module's storage, never copies (except after
    undoing bitsandbytes' CPU inference repack).

    Fields:
      ``kind``: ``"nf4"``, ``"fp4"`` or ``"int8"``. ``shape``: ``(N, K)``. ``dtype``: dtype of :meth:`dequantize`
      (the dtype bitsandbytes dequantizes to: ``quant_state.dtype`` for 4-bit; float32 for int8, which is exact).
      ``data``: 4-bit: ``(ceil(N*K/2),)`` uint8 packed codes, canonical layout; int8: ``(N, K)`` int8.
      ``absmax``: 4-bit: ``(ceil(N*K/blocksize),)`` float32, or uint8 under double quantization; int8: ``(N,)``
      float32 ``SCB``. ``blocksize``: values per absmax (4-bit). ``code``: ``(16,)`` float32 (4-bit).
      ``nested_absmax`` ``(ceil(nblocks/nested_blocksize),)`` float32, ``nested_code`` ``(256,)`` float32,
      ``nested_offset`` float, ``nested_blocksize`` int: double quantization, else None.
    """

    kind: str
    shape: tuple[int, int]
    dtype: torch.dtype
    data: torch.Tensor
    absmax: torch.Tensor
    blocksize: int = 0
    code: Optional[torch.Tensor] = None
    nested_absmax: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    nested_offset: float = 0.0
    nested_blocksize: int = 0
    extra: dict = field(default_factory=dict)  # e.g. {"threshold": 6.0} for int8 outlier decomposition
    # Copies derived once from this weight and kept with it (e.g. the tiled layout of bitsandbytes' CPU kernel):
    # see ``cpu_kernel_layout``. Never part of the weight's meaning.
    derived: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"fastpeft: unknown quantized weight kind {self.kind!r}; expected one of {KINDS}")
        self.shape = (int(self.shape[0]), int(self.shape[1]))

    # ---------------------------------------------------------------------------------------------- properties
    @property
    def nested(self) -> bool:
        """True under double quantization of the 4-bit absmax."""
        return self.nested_absmax is not None

    @property
    def scb(self) -> torch.Tensor:
        """int8 row scales ``(N,)`` float32 (alias of ``absmax``)."""
        return self.absmax

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def __repr__(self) -> str:
        nested = f", nested(bs={self.nested_blocksize})" if self.nested else ""
        bs = f", blocksize={self.blocksize}" if self.kind != "int8" else ""
        return f"QuantizedWeight({self.kind}, shape={self.shape}, dtype={self.dtype}{bs}{nested}, device={self.device})"

    # ----------------------------------------------------------------------------------------- dequantization
    def absmax_float(self) -> torch.Tensor:
        """The per-block scales as float32 ``(nblocks,)`` (undoing double quantization; 4-bit only)."""
        if not self.nested:
            return self.absmax.float()
        idx = torch.arange(self.absmax.numel(), device=self.absmax.device) // self.nested_blocksize
        scales = self.nested_code[self.absmax.long()] * self.nested_absmax[idx]
        return scales + torch.tensor(self.nested_offset, dtype=torch.float32, device=scales.device)

    def codes(self) -> torch.Tensor:
        """The unpacked 4-bit indices as ``(N, K)`` uint8 (4-bit only)."""
        n = self.shape[0] * self.shape[1]
        packed = self.data.reshape(-1)
        return torch.stack((packed >> 4, packed & 0xF), dim=-1).reshape(-1)[:n].reshape(self.shape)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense ``(N, K)`` weight in ``dtype`` (default ``self.dtype``); bit-equal to bitsandbytes'
        ``dequantize_4bit`` / ``int8_vectorwise_dequant`` followed by the cast. Differentiable w.r.t. nothing."""
        N, K = self.shape
        if self.kind == "int8":
            w = self.data.float() * self.absmax.float().view(-1, 1) * INT8_INV_127
            return w.to(self.dtype).to(dtype or self.dtype)
        n = N * K
        values = self.code.to(self.data.device)[self.codes().reshape(-1).long()]  # float32
        scales = self.absmax_float()
        bs = self.blocksize
        pad = (-n) % bs
        if pad:
            values = torch.nn.functional.pad(values, (0, pad))
        w = (values.view(-1, bs) * scales.view(-1, 1)).reshape(-1)[:n].view(N, K)
        return w.to(self.dtype).to(dtype or self.dtype)

    def to(self, device) -> "QuantizedWeight":
        """A copy on ``device`` (tensors moved; used by tests and by the interpreter path), with none of this
        weight's ``derived`` copies (they live on this weight's device)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, data=move(self.data), absmax=move(self.absmax), code=move(self.code),
                       nested_absmax=move(self.nested_absmax), nested_code=move(self.nested_code), derived={})

    def cpu_kernel_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This 4-bit weight in the layout bitsandbytes' AVX-512 CPU kernel reads: ``(packed, absmax)`` with packed
        ``(N, K/2)`` uint8 tiled as ``_untile_cpu_repack`` undoes and absmax ``(K/blocksize, N)`` bfloat16. Made once
        and kept in ``derived`` (0.5 byte per weight plus the scales); needs ``K % blocksize == 0`` and
        ``N % 32 == 0``."""
        cached = self.derived.get("cpu_kernel_layout")
        if cached is None:
            N, K = self.shape
            if self.kind == "int8" or K % self.blocksize or N % CPU_REPACK_BLOCK_N or K % 2:
                raise ValueError(f"fastpeft: {self!r} has no bitsandbytes CPU kernel layout (needs a 4-bit weight, "
                                 f"K % blocksize == 0 and N % {CPU_REPACK_BLOCK_N} == 0)")
            absmax = self.absmax_float().reshape(N, K // self.blocksize).t().to(torch.bfloat16).contiguous()
            cached = (_tile_cpu_repack(self.codes(), N, K), absmax)
            self.derived["cpu_kernel_layout"] = cached
        return cached

    # ---------------------------------------------------------------------------------------- requantization
    def quantize_like(self, dense: torch.Tensor) -> "QuantizedWeight":
        """Quantize a dense ``(N, K)`` weight the way bitsandbytes quantized this one (same kind, blocksize,
        double quantization, dtype); used by merge. Rounds: merging into a quantized base is lossy."""
        if tuple(dense.shape) != self.shape:
            raise ValueError(f"fastpeft: quantize_like got shape {tuple(dense.shape)}, expected {self.shape}")
        if self.kind == "int8":
            import bitsandbytes.functional as bnbf

            cb, scb, _ = bnbf.int8_vectorwise_quant(dense.detach().to(torch.float16).contiguous())
            return replace(self, data=cb, absmax=scb, derived={})
        packed, state = quantize_4bit_bnb(dense.detach().to(self.dtype), self.blocksize, self.nested, self.kind)
        return QuantizedWeight.from_quant_state(packed, state)

    # ----------------------------------------------------------------------------------------- constructors
    @classmethod
    def from_quant_state(cls, data: torch.Tensor, state) -> "QuantizedWeight":
        """From a bitsandbytes packed 4-bit tensor and its ``QuantState`` (either layout; see module docstring).

        The result is kept with ``state`` (weakly) while ``data`` and the scales stay the same tensors, unchanged by
        in-place writes that torch counts (``copy_`` on the parameter), so a layer pays for undoing bitsandbytes' CPU
        repack, and for any ``derived`` copy, once, not per call. bitsandbytes replaces the tensors (new pointers)
        when it requantizes or repacks."""
        # ``data`` may be the parameter itself: its pointer and version counter are its data's, and reading them
        # costs less than ``param.data`` (a new tensor object per call).
        # bitsandbytes' Params4bit is a tensor subclass: each attribute read would go through __torch_function__
        # (per layer per call); these four are plain tensor facts.
        with torch._C.DisableTorchFunctionSubclass():
            stamp = (data.data_ptr(), data._version, state.absmax.data_ptr(), state.absmax._version,
                     bool(getattr(state, "packing_format_for_cpu", False)), tuple(state.shape), data.numel(),
                     data.element_size())
        return _kept(state, stamp, lambda: cls._from_quant_state(data.detach(), state))

    @classmethod
    def _from_quant_state(cls, data: torch.Tensor, state) -> "QuantizedWeight":
        N, K = int(state.shape[0]), int(state.shape[1])
        raw = data if data.dtype == torch.uint8 else data.view(torch.uint8)
        if getattr(state, "packing_format_for_cpu", False):
            packed = _untile_cpu_repack(raw, N, K)
            absmax = state.absmax.t().reshape(-1).float()  # [K/bs, N] bfloat16 -> flat float32
            weight = cls(kind=state.quant_type, shape=(N, K), dtype=getattr(state, "original_dtype", state.dtype),
                         data=packed, absmax=absmax, blocksize=int(state.blocksize),
                         code=code_table(state.quant_type, raw.device))
            # The module's own tiled bytes are what bitsandbytes' CPU kernel reads: no second tiled copy.
            weight.derived["cpu_kernel_layout"] = (raw.reshape(N, K // 2), state.absmax.contiguous())
            return weight
        kwargs = {}
        if getattr(state, "nested", False):
            kwargs = dict(nested_absmax=state.state2.absmax, nested_code=state.state2.code,
                          nested_offset=float(state.offset), nested_blocksize=int(state.state2.blocksize))
        return cls(kind=state.quant_type, shape=(N, K), dtype=state.dtype, data=raw.reshape(-1), absmax=state.absmax,
                   blocksize=int(state.blocksize), code=state.code.float(), **kwargs)

    @classmethod
    def from_param(cls, param, module=None) -> "QuantizedWeight":
        """From a ``bitsandbytes.nn.Params4bit`` (quantized) or ``Int8Params`` (quantized, int8 data)."""
        state = getattr(param, "quant_state", None)
        if state is None and module is not None:
            state = getattr(module, "quant_state", None)
        if state is not None:
            return cls.from_quant_state(param, state)
        if param.dtype == torch.int8:
            scb = getattr(param, "SCB", None)
            if scb is None and module is not None:
                scb = getattr(getattr(module, "state", None), "SCB", None)
            if scb is None:
                raise ValueError("fastpeft: int8 weight without SCB row scales")
            extra = {}
            if module is not None and getattr(getattr(module, "state", None), "threshold", 0.0):
                extra["threshold"] = float(module.state.threshold)
            with torch._C.DisableTorchFunctionSubclass():  # plain tensor facts of a tensor subclass, as above
                stamp = (param.data_ptr(), param._version, scb.data_ptr(), scb._version, tuple(param.shape),
                         tuple(extra.items()))
            return _kept(param, stamp,
                         lambda: cls(kind="int8", shape=tuple(param.shape), dtype=torch.float32, data=param.data,
                                     absmax=scb, extra=extra))
        raise ValueError(f"fastpeft: {type(param).__name__} of dtype {param.dtype} is not a quantized bitsandbytes "
                         "weight (not yet quantized? move the model to its device first)")

    @classmethod
    def from_bnb_linear(cls, module) -> "QuantizedWeight":
        """From a ``bitsandbytes.nn.Linear4bit`` or ``Linear8bitLt`` (quantized)."""
        return cls.from_param(module.weight, module)


def _kept(owner, stamp: tuple, make) -> "QuantizedWeight":
    """The ``QuantizedWeight`` kept with ``owner`` (a QuantState, or an int8 parameter) while ``stamp`` (pointers and
    version counters of its tensors) is unchanged, else ``make()``, kept from then on. The same object for the same
    stamp: callers may compare identities."""
    key = id(owner)
    cached = _FROM_STATE.get(key)
    if cached is not None and cached[0]() is owner and cached[1] == stamp:
        return cached[2]
    weight = make()
    try:
        ref = weakref.ref(owner, lambda dead, key=key: _forget_state(key, dead))
    except TypeError:  # an object that cannot be weakly referenced: no cache
        return weight
    _FROM_STATE[key] = (ref, stamp, weight)
    return weight


def _forget_state(key: int, dead_ref) -> None:
    """Drop the cached weight of a QuantState that was garbage-collected (unless the id already names a new one)."""
    cached = _FROM_STATE.get(key)
    if cached is not None and cached[0] is dead_ref:
        _FROM_STATE.pop(key, None)


def is_bnb_quantized(module) -> bool:
    """Whether ``module`` is a quantized bitsandbytes linear (``Linear4bit`` or ``Linear8bitLt`` with int8
    weights). Never imports bitsandbytes when it is not already loaded."""
    bnb = sys.modules.get("bitsandbytes")  # not an import statement: this runs per layer call
    if bnb is None:
        return False
    if isinstance(module, bnb.nn.Linear4bit):
        return (getattr(module.weight, "quant_state", None) is not None
                or getattr(module, "quant_state", None) is not None)
    if isinstance(module, bnb.nn.Linear8bitLt):
        return module.weight.dtype == torch.int8
    return False


def quantized_weight_of(module) -> Optional[QuantizedWeight]:
    """``QuantizedWeight`` of a quantized bitsandbytes linear, else None (for layers with a dense base)."""
    return QuantizedWeight.from_bnb_linear(module) if is_bnb_quantized(module) else None


def quantize_4bit_bnb(dense: torch.Tensor, blocksize: int, nested: bool, kind: str):
    """bitsandbytes' own 4-bit quantization (``(packed, QuantState)``), the reference for requantizing on merge."""
    import bitsandbytes.functional as bnbf

    return bnbf.quantize_4bit(dense.contiguous(), blocksize=blocksize, compress_statistics=nested, quant_type=kind)


def _untile_cpu_repack(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Undo bitsandbytes' CPU inference repack: ``[N, K/2]`` tiled bytes -> ``(N*K/2,)`` canonical bytes.

    Tiled layout: rows in groups of 32, for each group and each pair of columns ``(2c, 2c+1)`` one 32-byte chunk
    holding 64 nibbles ordered ``(row in group, column in pair)``; the first 32 of them in the low nibbles, the
    last 32 in the high nibbles.
    """
    B = CPU_REPACK_BLOCK_N
    chunks = packed.reshape(N // B, K // 2, B)  # 32 bytes per (row group, column pair)
    nibbles = torch.cat((chunks & 0xF, chunks >> 4), dim=-1)  # (N/B, K/2, 64): low nibbles first
    codes = nibbles.reshape(N // B, K // 2, B, 2).permute(0, 2, 1, 3).reshape(-1)  # row-major (N, K)
    return (codes[0::2] << 4) | codes[1::2]


def _tile_cpu_repack(codes: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The inverse of ``_untile_cpu_repack``: ``(N, K)`` 4-bit indices -> ``[N, K/2]`` tiled bytes."""
    B = CPU_REPACK_BLOCK_N
    groups = codes.reshape(N // B, B, K // 2, 2).permute(0, 2, 1, 3).reshape(-1, 2 * B)  # 64 nibbles per chunk
    return ((groups[:, B:] << 4) | groups[:, :B]).to(torch.uint8).reshape(N, K // 2)
