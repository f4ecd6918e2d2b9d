"""The module layer for bitsandbytes bases (QLoRA): fused twins of PEFT's bnb LoRA/IA3 layers.

PEFT builds ``peft.tuners.lora.bnb.Linear4bit`` / ``Linear8bitLt`` and ``peft.tuners.ia3.bnb.Linear4bit`` /
``Linear8bitLt`` around ``bitsandbytes.nn.Linear4bit`` / ``Linear8bitLt``. Their twins here subclass them (so merge,
unmerge, ``merge_and_unload``, save/load and state_dict keys stay PEFT's) and replace ``forward``: the base weight is
described by a ``fastpeft.quant.QuantizedWeight`` (no copy) and the whole layer, base product included, goes
through ``fastpeft.functional``. bitsandbytes' forward and matmul are never called (its AVX-512 serving kernel is
one measured route for bf16 products, on a tiled copy fastpeft keeps), so the CPU gradient bugs of bitsandbytes
0.50.2 (wrong input gradient through ``Linear4bit``, none under IA3) are not inherited, and the CPU inference repack
never happens. No dequantized weight is saved for backward: the autograd functions keep the ``QuantizedWeight``.

Dtypes follow bitsandbytes and PEFT: ``Linear4bit`` computes in its compute dtype (set from the first input, as
bitsandbytes' ``set_compute_type`` does), except where bitsandbytes' forward would serve the call in bf16
(``served_in_bf16``: evaluation of a CPU input without grad on an AVX512-BF16 CPU), and returns the input's dtype;
``Linear8bitLt`` computes in the input's
dtype. The int8 weight is used as ``int8 * SCB / 127`` whatever the layer's outlier ``threshold``: with
``threshold > 0`` bitsandbytes would instead run outlier input columns against the same dequantized columns in fp16,
so fastpeft's result is the same product without the int8 rounding of the activations (closer to the fp reference).
PEFT's IA3 bnb layers cast the input to fp32 and return fp32; the twins do the same.

``register_bnb_layers(registry, readers)`` adds these classes to ``fastpeft.layers.FUSED_LAYER_TYPES`` (used by
``fastpeft.accelerate``) and a base-weight reader to ``fastpeft.layers.BASE_WEIGHT_READERS`` so PEFT's generic
``lora.Linear`` wrapping a bitsandbytes base (``fastpeft.register`` / custom modules) is fused too. Importing this
module changes nothing: ``fastpeft.patching.register_optional_layers`` calls it.

Merging into a quantized base (PEFT's own code for LoRA: dequantize, add, requantize) rounds; PEFT warns. For the
generic ``lora.Linear`` over a bitsandbytes base, ``fastpeft.quant_merge`` does the same.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import dora, functional
from .layers import (
    BASE_WEIGHT_READERS,
    FUSED_LAYER_TYPES,
    SERVING_RULES,
    SERVING_SETTLERS,
    KeepsSettledCalls,
    _any_dropout,
    _has_hooks,
    adapter_arguments,
    check_input,
    direct_base_layer,
    layer_name,
    mixed_batch_forward,
    parameter,
    quantized_product,
    settled_lora_call,
    settled_served_call,
)
from .quant import QuantizedWeight, is_bnb_quantized

try:
    import bitsandbytes as bnb
    from peft.tuners.ia3 import bnb as _ia3_bnb
    from peft.tuners.lora import bnb as _lora_bnb
except Exception:  # bitsandbytes missing or broken: nothing to register
    bnb = None
    _ia3_bnb = _lora_bnb = None


def compute_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype bitsandbytes would compute ``base(x)`` in (and set its compute dtype from ``x`` on first use, as
    ``Linear4bit.forward`` does, so fused and unfused calls agree)."""
    if bnb is not None and isinstance(base, bnb.nn.Linear4bit):
        if not base.compute_type_is_set:
            base.set_compute_type(x)
            base.compute_type_is_set = True
        return base.compute_dtype or x.dtype
    return x.dtype


def served_in_bf16(base: nn.Module, x: torch.Tensor) -> bool:
    """Whether bitsandbytes computes ``base(x)`` in bf16 whatever ``x``'s and the compute dtype: its
    ``Linear4bit.forward`` hands a CPU input without grad, in eval mode, on a CPU with AVX512-BF16
    (``support_avx512bf16_for_cpu``) to its serving kernel, which rounds ``x``, the scales and the product to bf16 and
    casts the result back. For such calls the fused layers compute the base product in bf16 too (by any of their
    routes), so that their outputs are PEFT's; training calls, and CPUs without AVX512-BF16, keep ``x``'s dtype."""
    return (x.dtype != torch.bfloat16 and not base.training and not x.requires_grad and x.is_cpu
            and bnb is not None and isinstance(base, bnb.nn.Linear4bit)
            and bool(getattr(base, "support_avx512bf16_for_cpu", False)))


def served_lora_forward(layer: nn.Module, x: torch.Tensor, base: nn.Module, qw: QuantizedWeight,
                        active: list) -> torch.Tensor:
    """PEFT's output for a call :func:`served_in_bf16` holds for: ``x`` ``(..., K)`` -> ``(..., N)`` in ``x``'s
    dtype, ``base(x) = (x W^T computed in bf16, cast to the compute dtype) + bias`` as bitsandbytes forms it, plus
    the active adapters' terms in their own dtype (``functional.add_lora_update``)."""
    x2 = x.reshape(-1, x.shape[-1])
    update = None
    if active:
        lora_A, lora_B, lora_bias, scaling, _, _ = adapter_arguments(layer, active)

        def update(x2, y):
            return functional.add_lora_update(x2, y, qw, lora_A, lora_B, lora_bias, scaling)

    y = _served(x2, lambda xb: functional.base_linear(xb, qw, None), parameter(base, "bias"),
                compute_dtype(base, x), update)
    return y.view(*x.shape[:-1], y.shape[-1])


def _served(x2: torch.Tensor, base_product, bias: Optional[torch.Tensor], dtype: torch.dtype, update) -> torch.Tensor:
    """bitsandbytes' serving meaning on ``x2`` ``(M, K)``: ``base_product`` of ``x2`` rounded to bf16, cast to the
    compute ``dtype``, plus ``bias`` in it, then in ``x2``'s dtype, with ``update(x2, y)`` (the adapter terms, or
    None) applied."""
    y = base_product(x2.to(torch.bfloat16)).to(dtype)
    if bias is not None:
        y = y + bias.to(dtype)
    if y.dtype != x2.dtype:
        y = y.to(x2.dtype)
    return y if update is None else update(x2, y)


def serving_rule(layer: nn.Module, x: torch.Tensor, base: nn.Module, weight, active: list):
    """``fastpeft.layers.SERVING_RULES`` entry: :func:`served_lora_forward` where :func:`served_in_bf16` holds."""
    if isinstance(weight, QuantizedWeight) and served_in_bf16(base, x):
        return served_lora_forward(layer, x, base, weight, active)
    return None


def settle_served(layer: nn.Module, x: torch.Tensor, base: nn.Module, weight, active: list):
    """``fastpeft.layers.SERVING_SETTLERS`` entry: for a call :func:`serving_rule` serves, ``(call, arguments)``
    with ``call`` a ``functional.SettledCall`` of :func:`served_lora_forward` (the base product's and the adapter
    update's settled routes), where both are settled."""
    if not (isinstance(weight, QuantizedWeight) and served_in_bf16(base, x) and functional.may_settle(x)):
        return None
    x2 = x.reshape(-1, x.shape[-1])
    taken = {"lora_forward": functional.settled_route("lora_forward", x2.to(torch.bfloat16), weight, [])}
    arguments = adapter_arguments(layer, active)
    if active:
        taken["lora_update"] = functional.settled_route("lora_update", x2, weight, arguments[0])
    if None in taken.values():
        return None
    base_forward = taken["lora_forward"][1]

    def base_product(xb):
        return base_forward(xb, weight, None, [], [], [], [], [], [])[0]

    update = None
    if active:
        add, (lora_A, lora_B, lora_bias, scaling, _, _) = taken["lora_update"][1], arguments
        scaling, zeros = [float(s) for s in scaling], [0.0] * len(lora_A)

        def update(x2, y):
            return add(x2, y, lora_A, lora_B, lora_bias, scaling, zeros, [0] * len(zeros))[0]

    bias, dtype = parameter(base, "bias"), compute_dtype(base, x)
    call = functional.SettledCall(x2, taken, lambda x2: _served(x2, base_product, bias, dtype, update))
    return call, arguments


def read_bnb_base(base: nn.Module, fan_in_fan_out: bool):
    """``(QuantizedWeight, bias)`` for a quantized bitsandbytes linear, else None (a ``BASE_WEIGHT_READERS``
    entry). The bias is cast to the layer's configured compute dtype, as bitsandbytes does."""
    if fan_in_fan_out or not is_bnb_quantized(base):
        return None
    bias = parameter(base, "bias")
    dtype = getattr(base, "compute_dtype", None)
    if bias is not None and dtype is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    return QuantizedWeight.from_bnb_linear(base), bias


class _FusedBnbLoraMixin(KeepsSettledCalls):
    """Forward shared by the LoRA twins; ``x`` ``(..., in_features)`` -> ``(..., out_features)`` in ``x``'s dtype.
    An evaluation call is kept resolved for the calls that repeat it (``KeepsSettledCalls``)."""

    _fastpeft_bnb_twin = True  # fastpeft.dora: DoRA runs over the decoded QuantizedWeight

    def merge(self, *args, **kwargs) -> None:
        dora.clear_cache(self)  # the base weight is rewritten: cached DoRA norms no longer hold
        return super().merge(*args, **kwargs)

    def unmerge(self) -> None:
        dora.clear_cache(self)
        return super().unmerge()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kwargs.get("adapter_names") is not None:  # the base layer's own (quantized) forward, adapters fused
            return mixed_batch_forward(self, x, args, kwargs, super().forward)
        y = self._settled_output(x, args, kwargs)
        if y is not None:
            return y
        base = direct_base_layer(self)
        downs = self._modules["lora_A"]._modules
        active = [name for name in self.active_adapters if name in downs]
        with_dora = bool(self.lora_variant) and any(name in self.lora_variant for name in active)
        if (args or kwargs or _has_hooks(base) or not is_bnb_quantized(base) or (with_dora and (
                dora.unfused_variant_reason(self, active) or not dora.dora_call_ok(self, None, x)))):
            return super().forward(x, *args, **kwargs)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            active = []
        elif self.merged:
            active = []
        qw = QuantizedWeight.from_bnb_linear(base)
        check_input(self, x, qw, self.in_features)
        if not (with_dora and active):
            served = serving_rule(self, x, base, qw, active)
            if served is not None:
                if not torch.is_grad_enabled():
                    self._keep_settled(settled_served_call(self, x, qw, active))
                return served
        dtype = compute_dtype(base, x)
        xc = x if x.dtype == dtype else x.to(dtype)  # (a no-op .to still costs a dispatch: this runs per token)
        bias = parameter(base, "bias")
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        if not active:
            y = quantized_product(xc, qw, bias)
        elif self.training and functional.capturing_cuda_graph(x) and _any_dropout(self, active):
            return super().forward(x, *args, **kwargs)  # torch's dropout is graph-safe, fastpeft's host seeds are not
        elif with_dora:
            y = dora.layer_forward(self, xc, active, qw, bias, base.weight, layer_name(self))
        else:
            arguments = adapter_arguments(self, active)
            y = functional.lora_linear(xc, qw, bias, *arguments)
            if xc is x and not torch.is_grad_enabled():  # (a call that converts x is not kept resolved)
                self._keep_settled(settled_lora_call(self, x, active, qw, bias, arguments))
        return y if y.dtype == x.dtype else y.to(x.dtype)


class _FusedBnbIA3Mixin:
    """Forward shared by the IA3 twins. Like PEFT's bnb IA3 layers, a non-fp32 input is computed from ``x.float()``
    (then in the base's compute dtype) and the result is fp32."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        if args or kwargs or _has_hooks(base) or not is_bnb_quantized(base):
            return super().forward(x, *args, **kwargs)
        qw = QuantizedWeight.from_bnb_linear(base)
        check_input(self, x, qw, self.in_features)
        if self.disable_adapters:
            dtype = compute_dtype(base, x)
            bias = base.bias.to(dtype) if base.bias is not None else None
            return quantized_product(x.to(dtype), qw, bias).to(x.dtype)
        vectors = [self.ia3_l[name] for name in self.active_adapters if name in self.ia3_l]
        convert = not torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float32
        xf = x.float() if convert else x
        dtype = compute_dtype(base, xf)
        bias = base.bias.to(dtype) if base.bias is not None else None
        if not vectors:
            return quantized_product(xf.to(dtype), qw, bias).to(xf.dtype)
        return functional.ia3_linear(xf.to(dtype), qw, bias, vectors, self.is_feedforward).to(xf.dtype)


FUSED_BNB_LAYER_TYPES: dict[type, type] = {}
if _lora_bnb is not None:
    if hasattr(_lora_bnb, "Linear4bit"):

        class FusedLoraLinear4bit(_FusedBnbLoraMixin, _lora_bnb.Linear4bit):
            """PEFT's ``lora.bnb.Linear4bit`` (NF4/FP4 base) with a fused, dequantize-in-GEMM forward."""

        class FusedIA3Linear4bit(_FusedBnbIA3Mixin, _ia3_bnb.Linear4bit):
            """PEFT's ``ia3.bnb.Linear4bit`` with a fused forward."""

        FUSED_BNB_LAYER_TYPES[_lora_bnb.Linear4bit] = FusedLoraLinear4bit
        FUSED_BNB_LAYER_TYPES[_ia3_bnb.Linear4bit] = FusedIA3Linear4bit
    if hasattr(_lora_bnb, "Linear8bitLt"):

        class FusedLoraLinear8bitLt(_FusedBnbLoraMixin, _lora_bnb.Linear8bitLt):
            """PEFT's ``lora.bnb.Linear8bitLt`` (int8 base) with a fused forward."""

        class FusedIA3Linear8bitLt(_FusedBnbIA3Mixin, _ia3_bnb.Linear8bitLt):
            """PEFT's ``ia3.bnb.Linear8bitLt`` with a fused forward."""

        FUSED_BNB_LAYER_TYPES[_lora_bnb.Linear8bitLt] = FusedLoraLinear8bitLt
        FUSED_BNB_LAYER_TYPES[_ia3_bnb.Linear8bitLt] = FusedIA3Linear8bitLt


# ------------------------------------------------------------------------------------------------- registration
def register_bnb_layers(registry: Optional[dict] = None, readers: Optional[list] = None) -> dict:
    """Add PEFT's bnb layer classes -> fused twins to ``registry`` (default ``fastpeft.layers.FUSED_LAYER_TYPES``)
    and :func:`read_bnb_base` to ``readers`` (default ``fastpeft.layers.BASE_WEIGHT_READERS``). Idempotent."""
    registry = FUSED_LAYER_TYPES if registry is None else registry
    readers = BASE_WEIGHT_READERS if readers is None else readers
    registry.update(FUSED_BNB_LAYER_TYPES)
    if bnb is not None and read_bnb_base not in readers:
        readers.append(read_bnb_base)
    if bnb is not None and serving_rule not in SERVING_RULES:
        SERVING_RULES.append(serving_rule)
    if bnb is not None and settle_served not in SERVING_SETTLERS:
        SERVING_SETTLERS.append(settle_served)
    return registry
