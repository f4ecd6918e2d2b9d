"""Merging LoRA into a bitsandbytes-quantized base: dequantize, add ``s B A``, requantize the way bitsandbytes does.

Used by ``fastpeft.layers.FusedLoraLinear`` (PEFT's generic ``lora.Linear`` over a bitsandbytes base); it depends only
on ``fastpeft.quant`` and bitsandbytes, so the module layers can call it without importing each other. Rounds, as
PEFT's own bnb merge does, and warns.
"""

from __future__ import annotations

import warnings
from typing import Optional

import bitsandbytes as bnb
import torch
from torch import nn

from .quant import QuantizedWeight, quantized_weight_of


def _write_back(base: nn.Module, qw: QuantizedWeight, dense: torch.Tensor) -> None:
    """Requantize ``dense`` into ``base``'s bitsandbytes parameter the way bitsandbytes quantizes it."""
    weight = base.weight
    if qw.kind == "int8":
        new = bnb.nn.Int8Params(dense.to("cpu").to(torch.float16), requires_grad=False, has_fp16_weights=False)
        base.weight = new.to(weight.device)
        state = getattr(base, "state", None)
        if state is not None and hasattr(state, "reset_grads"):
            state.reset_grads()  # drop bitsandbytes' cached CB/SCB of the old weight, as PEFT's merge does
        return
    kwargs = {k: v for k, v in weight.__dict__.items() if k not in ("data", "quant_state", "bnb_quantized")}
    kwargs.pop("_is_hf_initialized", None)
    new = bnb.nn.Params4bit(dense.to("cpu").to(qw.dtype), requires_grad=False, **kwargs)
    base.weight = new.to(weight.device)


def merge_quantized(layer, adapter_names: Optional[list[str]] = None) -> None:
    """Merge LoRA adapters of a generic ``lora.Linear`` whose base is a bitsandbytes layer: dequantize, add
    ``s B A``, requantize (rounds, like PEFT's bnb merge; warns)."""
    base = layer.get_base_layer()
    names = adapter_names or [n for n in layer.active_adapters if n in layer.lora_A]
    warnings.warn("fastpeft: merging LoRA into a quantized base requantizes it; outputs change by rounding",
                  stacklevel=2)
    qw = quantized_weight_of(base)
    dense = qw.dequantize(torch.float32)
    for name in names:
        if name in layer.merged_adapters:
            continue
        dense = dense + layer.get_delta_weight(name).float()
        layer.merged_adapters.append(name)
    _write_back(base, qw, dense)


def unmerge_quantized(layer) -> None:
    """Undo :func:`merge_quantized` (dequantize, subtract, requantize; rounds again)."""
    base = layer.get_base_layer()
    warnings.warn("fastpeft: unmerging LoRA from a quantized base requantizes it; outputs change by rounding",
                  stacklevel=2)
    qw = quantized_weight_of(base)
    dense = qw.dequantize(torch.float32)
    while layer.merged_adapters:
        dense = dense - layer.get_delta_weight(layer.merged_adapters.pop()).float()
    _write_back(base, qw, dense)
