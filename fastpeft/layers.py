"""The module layer: fused twins of PEFT's LoRA and IA3 layers. They hold parameters; the math is in
``fastpeft.functional``.

Each fused class subclasses PEFT's own layer class and only overrides ``forward``, so PEFT's API (merge, unmerge,
``set_adapter``, ``disable_adapter``, ``add_adapter``, ``delete_adapter``, ``save_pretrained``) and the state_dict
keys are PEFT's. ``fastpeft.accelerate`` turns a PEFT layer into its twin in place by switching its class: the same
object, the same parameters, the same names.

Where a call is outside what the fused path covers (adapters disabled or merged, a LoRA variant other than DoRA,
extra arguments for the base layer, hooks on the base layer), the fused layer runs PEFT's own forward: same meaning,
not fused. Mixed-adapter batches (``adapter_names``) go through ``mixed_batch_forward``; DoRA's math is in
``fastpeft.dora``.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from peft.tuners.ia3.layer import Linear as PeftIA3Linear
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from . import dora, functional, guards, mixed
from .quant import QuantizedWeight, is_bnb_quantized

try:
    from transformers.pytorch_utils import Conv1D
except Exception:  # transformers is optional for the functional layer
    Conv1D = None

# A reader returns ``(weight, bias)`` for the functional layer (``weight`` as ``(N, K)`` tensor or a
# ``QuantizedWeight``), or None when it does not know the base layer. ``register_bnb_layers`` appends the
# bitsandbytes one.
BaseWeightReader = Callable[[nn.Module, bool], Optional[tuple[object, Optional[torch.Tensor]]]]


_DENSE_BASE_TYPES = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


def parameter(module: nn.Module, name: str):
    """``getattr(module, name)`` for a parameter, by the module's ``_parameters`` dict when it is registered there
    (``nn.Module.__getattr__`` is a Python call: this runs several times per layer per decoded token). A parameter
    held elsewhere (a parametrization, a sharding wrapper's attribute) is read by ``getattr``."""
    params = module._parameters
    if name in params:
        return params[name]
    return getattr(module, name)


def read_dense_base(base: nn.Module, fan_in_fan_out: bool):
    """``nn.Linear`` (weight ``(N, K)``) and transformers ``Conv1D`` (weight stored ``(K, N)``) with plain tensors."""
    if type(base) not in _DENSE_BASE_TYPES:
        return None
    weight = parameter(base, "weight")
    if type(weight) not in (nn.Parameter, torch.Tensor):
        return None
    return (weight.t() if fan_in_fan_out else weight), parameter(base, "bias")


BASE_WEIGHT_READERS: list[BaseWeightReader] = [read_dense_base]

# Where a quantized base's own library fixes what a call means differently from fastpeft's default (bitsandbytes
# computes some calls in bf16 whatever the input dtype): ``rule(layer, x, base, weight, active)`` returns the
# layer's output for such a call, else None. ``fastpeft.layers_bnb.register_bnb_layers`` adds bitsandbytes' rule.
SERVING_RULES: list[Callable] = []
# ``settle(layer, x, base, weight, active)``: for a call a ``SERVING_RULES`` entry served, ``(call, arguments)``
# where the rule's output is kept resolved (``functional.SettledCall``, and the active adapters'
# ``adapter_arguments``), else None.
SERVING_SETTLERS: list[Callable] = []


def read_base_weight(base: nn.Module, fan_in_fan_out: bool):
    """``(weight, bias)`` for a base layer fastpeft can fuse, else None."""
    for reader in BASE_WEIGHT_READERS:
        found = reader(base, fan_in_fan_out)
        if found is not None:
            return found
    return None


def quantized_product(x: torch.Tensor, weight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x deq(W)^T + b`` through the functional layer, with a correct input gradient (bitsandbytes' own CPU matmul
    would give a wrong one). Routed as IA3 with a feedforward scale of exact ones: the product is unchanged and the
    backward's only extra work is an elementwise ``(M, K)`` reduction. (A LoRA call with zero adapters would be the
    natural route, but not every backend accepts empty adapter lists.)"""
    ones = torch.ones(1, weight.shape[1], dtype=x.dtype, device=x.device)
    return functional.ia3_linear(x, weight, bias, [ones], True)


def served_output(layer: nn.Module, x: torch.Tensor, weight, active: list) -> Optional[torch.Tensor]:
    """The layer's output by the first ``SERVING_RULES`` entry that claims this call, else None."""
    for rule in SERVING_RULES:
        y = rule(layer, x, direct_base_layer(layer), weight, active)
        if y is not None:
            return y
    return None


def quantized_base_only(layer: nn.Module, x: torch.Tensor, weight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The base alone for a layer over a quantized base with no adapter active (disabled or merged): by a
    ``SERVING_RULES`` entry where the base's library fixes the call's meaning, else :func:`quantized_product`."""
    y = served_output(layer, x, weight, [])
    return quantized_product(x, weight, bias) if y is None else y


def direct_base_layer(layer: nn.Module) -> nn.Module:
    """PEFT's ``get_base_layer()`` without its ``hasattr`` walk in the common case of one wrapping level."""
    base = layer._modules["base_layer"]
    return base if "base_layer" not in base._modules else layer.get_base_layer()


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def adapter_arguments(layer: nn.Module, active: list) -> tuple:
    """``(lora_A, lora_B, lora_bias, scaling, dropout_p)`` lists of a PEFT LoRA layer's ``active`` adapters
    (``dropout_p`` 0 for an adapter whose dropout module is in eval mode) and ``training`` (any of their dropout
    modules in training mode), as ``functional.lora_linear`` takes them. One pass over the adapters, by the
    submodule dicts (no ``nn.Module.__getattr__``): this runs per layer per token in decoding."""
    modules = layer._modules
    downs, ups, dropouts = (modules["lora_A"]._modules, modules["lora_B"]._modules,
                            modules["lora_dropout"]._modules)
    with_bias, scalings = layer.lora_bias, layer.scaling
    lora_A, lora_B, lora_bias, scaling, dropout_p = [], [], [], [], []
    training = False
    for name in active:
        up = ups[name]
        lora_A.append(parameter(downs[name], "weight"))
        lora_B.append(parameter(up, "weight"))
        # PEFT's forward calls lora_B as a module: a bias registered there is added whatever lora_bias says
        lora_bias.append(parameter(up, "bias") if "bias" in up._parameters or with_bias.get(name, False) else None)
        scaling.append(scalings[name])
        dropout = dropouts[name]
        # each adapter's own module decides whether it drops (PEFT calls it), not the others' modes
        dropout_p.append(dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0)
        training = training or dropout.training
    return lora_A, lora_B, lora_bias, scaling, dropout_p, training


def _any_dropout(layer: nn.Module, active: list) -> bool:
    return any(isinstance(d, nn.Dropout) and d.p > 0 and d.training for d in (layer.lora_dropout[n] for n in active))


def layer_name(module: nn.Module) -> str:
    """The module's name in its model (set by ``accelerate``) for error messages."""
    return getattr(module, "_fastpeft_name", None) or type(module).__name__


def check_input(module: nn.Module, x: torch.Tensor, weight, in_features: int) -> None:
    """Raise a clear error for an input the layer cannot take; autocast may change dtypes, so dtype is not checked
    under it. (Runs on every call: the module's name is looked up only for the message.)"""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fastpeft: module '{layer_name(module)}': input x must be a torch.Tensor, got "
                        f"{type(x).__name__}")
    if x.shape[-1] != in_features:
        raise ValueError(
            f"fastpeft: module '{layer_name(module)}': input x has {x.shape[-1]} features in its last dimension "
            f"(shape {tuple(x.shape)}), but the layer takes {in_features}"
        )
    device = weight.device
    if x.device != device:
        raise ValueError(f"fastpeft: module '{layer_name(module)}': input x is on {x.device}, but the layer's "
                         f"weight is on {device}")
    if isinstance(weight, torch.Tensor) and x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"fastpeft: module '{layer_name(module)}': input x has dtype {x.dtype}, but the base weight is "
            f"{weight.dtype}; cast the input (or the model) so they match"
        )


_warned_unfused_mixed: set = set()


def _unfused_mixed_reason(layer: nn.Module, adapter_names, args, kwargs) -> str:
    """Why a mixed-adapter call of ``layer`` must run PEFT's own loop ("" when fastpeft fuses it)."""
    if args or kwargs:
        return f"extra arguments for the base layer ({', '.join(sorted(kwargs)) or 'positional'})"
    variants = sorted({type(layer.lora_variant[name]).__name__ for name in set(adapter_names)
                       if name in layer.lora_variant})
    if variants:
        return f"LoRA variant {', '.join(variants)} in the batch"
    return ""


def mixed_batch_forward(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict,
                        peft_forward: Callable[..., torch.Tensor]) -> torch.Tensor:
    """PEFT's mixed-adapter batch for a LoRA layer (``kwargs["adapter_names"]``: one adapter name, or ``"__base__"``,
    per row of ``x`` ``(B, ..., in_features)``): PEFT's checks and errors, the base product
    (:func:`mixed_base_output`), then each row's adapter term added by ``fastpeft.mixed``. Calls fastpeft cannot
    fuse run ``peft_forward`` (PEFT's layer forward), with one warning per layer type and reason."""
    adapter_names = kwargs["adapter_names"]
    settled = layer._fastpeft_settled_mixed
    if settled is not None and not args and len(kwargs) == 1 and not torch.is_grad_enabled():
        y = settled.output(layer, x, adapter_names)
        if y is not None:
            return y
    groups = mixed.row_groups(adapter_names)
    variants = layer.lora_variant
    if (args or len(kwargs) > 1 or len(x) != len(groups.names) or layer.merged_adapters
            or (variants and any(name in variants for name in groups.adapters))):
        # Something PEFT rejects or fastpeft does not fuse; the common call passes none of this.
        try:
            layer._check_forward_args(x, *args, **kwargs)  # PEFT's errors: length of adapter_names, merged, DoRA
        except ValueError as exc:
            raise ValueError(f"fastpeft: module '{layer_name(layer)}': {exc}") from exc
        others = {k: v for k, v in kwargs.items() if k != "adapter_names"}
        reason = _unfused_mixed_reason(layer, adapter_names, args, others)
        if reason:
            key = (type(layer).__name__, reason)
            if key not in _warned_unfused_mixed:
                _warned_unfused_mixed.add(key)
                warnings.warn(f"fastpeft: module '{layer_name(layer)}': mixed-adapter batch runs PEFT's own loop, "
                              f"not fused: {reason}", stacklevel=3)
            return peft_forward(x, *args, adapter_names=adapter_names, **others)
    if layer.disable_adapters:
        return layer.base_layer(x)
    result = mixed_base_output(layer, x)
    adapters = _mixed_adapters(layer, groups)
    y = mixed.add_mixed_lora_(x, result, groups, adapters)
    if not torch.is_grad_enabled():
        layer._keep_settled_mixed(SettledMixedLayerCall.of(layer, x, mixed.SettledMixedCall.of(x, y, groups, adapters)))
    return y


def mixed_base_output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The base layer's output for a mixed-adapter batch ``x`` ``(..., in_features)``. An evaluation call
    (``functional.may_settle``) on a plain dense base without hooks (:func:`_dense_base_for`) takes fastpeft's
    measured base product (``functional.base_linear``: at a few rows the decoding GEMV reads an fp32 weight faster
    than torch's GEMM), as the single-adapter path's fused forward does; any other call runs the base layer's own
    forward, with its errors."""
    found = _dense_base_for(layer, x) if functional.may_settle(x) else None
    if found is None:
        return layer.base_layer(x)
    y = functional.base_linear(x.reshape(-1, x.shape[-1]), *found)
    return y.view(*x.shape[:-1], y.shape[-1])


def _dense_base_for(layer: nn.Module, x: torch.Tensor):
    """``(weight (N, K), bias)`` of the layer's base for fastpeft's base product of ``x``: a dense base
    (``read_dense_base``) without hooks, on the CPU, of ``x``'s dtype and width; else None."""
    base = layer._modules["base_layer"]
    found = None if _has_hooks(base) else read_dense_base(base, layer.fan_in_fan_out)
    if found is None or x.dtype is not found[0].dtype or x.shape[-1] != found[0].shape[1] or not found[0].is_cpu:
        return None
    return found


def _mixed_adapters(layer: nn.Module, groups: mixed.RowGroups) -> mixed.MixedAdapters:
    """The layer's adapters in ``groups.adapters`` order (``mixed.MixedAdapters``): an adapter the layer does not
    hold gets None (its rows get nothing, as in PEFT); dropout seeds are drawn only in training with ``p > 0``."""
    names = groups.adapters
    downs = layer._modules["lora_A"]._modules
    held = [name for name in names if name in downs]
    lora_A, lora_B, lora_bias, scaling, dropout_p, training = adapter_arguments(layer, held)
    scaling = [float(s) for s in scaling]
    if len(held) < len(names):  # align with the batch's adapters: None for those this layer lacks
        at = {name: i for i, name in enumerate(held)}
        lora_A, lora_B, lora_bias, scaling, dropout_p = (
            [values[at[name]] if name in at else absent for name in names]
            for values, absent in ((lora_A, None), (lora_B, None), (lora_bias, None), (scaling, 0.0),
                                   (dropout_p, 0.0)))
    return mixed.MixedAdapters.of(lora_A, lora_B, lora_bias, scaling, dropout_p, training)


# Settled calls a layer keeps, for different dtypes or rows buckets (``SettledLayerCall``), or batch shapes
# (``SettledMixedLayerCall``).
SETTLED_CALLS_PER_LAYER = 4


class HeldAdapters:
    """What a settled call read of a layer's adapters: for each adapter name it used, the parameters (by identity),
    the scaling and the dropout module; the names the layer did not hold; the layer's adapter count.
    :meth:`unchanged` says whether the layer still holds exactly that, with nothing merged or disabled, no LoRA
    variant, and no dropout in training, or (``drawing``: a training call's adapters) each dropout module in the
    training mode and with the ``p`` it had."""

    __slots__ = ("records", "absent", "count", "drawing")

    def __init__(self, layer: nn.Module, names, lora_A, lora_B, lora_bias, scaling, drawing: bool = False):
        dropouts = layer._modules["lora_dropout"]._modules

        def dropout_state(dropout):
            may_drop = isinstance(dropout, nn.Dropout)
            return (may_drop, dropout.training, dropout.p) if may_drop else (False, None, None)

        self.records = tuple((name, A, B, b, s, dropouts[name], *dropout_state(dropouts[name]))
                             for name, A, B, b, s in zip(names, lora_A, lora_B, lora_bias, scaling) if A is not None)
        self.absent = tuple(name for name, A in zip(names, lora_A) if A is None)
        self.count = len(layer._modules["lora_A"]._modules)
        self.drawing = drawing

    def unchanged(self, layer: nn.Module) -> bool:
        modules = layer._modules
        downs = modules["lora_A"]._modules
        if (layer._disable_adapters or layer.merged_adapters or layer.lora_variant or len(downs) != self.count
                or any(name in downs for name in self.absent)):
            return False
        ups, dropouts, scalings = modules["lora_B"]._modules, modules["lora_dropout"]._modules, layer.scaling
        drawing = self.drawing
        for name, A, B, b, s, dropout, may_drop, training, p in self.records:
            down, up = downs.get(name), ups.get(name)
            if (down is None or up is None or down._parameters.get("weight") is not A
                    or up._parameters.get("weight") is not B or up._parameters.get("bias") is not b
                    or scalings.get(name) != s or dropouts.get(name) is not dropout):
                return False
            if may_drop and ((dropout.training is not training or dropout.p != p) if drawing
                             else (dropout.training and dropout.p > 0)):
                return False
        return True

    def guards(self, layer: nn.Module) -> list:
        """:meth:`unchanged` as guards (``fastpeft.guards``) on ``layer`` as it is now (where ``unchanged`` holds), for
        adapters held without ``drawing``."""
        if self.drawing:
            raise ValueError("fastpeft: a training call's adapters have no guard form (they are checked in Python)")
        modules = layer._modules
        downs, ups, dropouts = modules["lora_A"], modules["lora_B"], modules["lora_dropout"]
        found = [guards.item_is(modules, name) for name in ("lora_A", "lora_B", "lora_dropout")]
        found += [guards.attribute_falsy(layer, name) for name in ("_disable_adapters", "merged_adapters",
                                                                     "lora_variant")]
        found += [(guards.LENGTH_IS, downs._modules, None, self.count), guards.item_is(layer.__dict__, "scaling")]
        found += [(guards.LACKS, downs._modules, name, None) for name in self.absent]
        for name, A, B, b, s, dropout, may_drop, _, _ in self.records:
            down, up = downs._modules[name], ups._modules[name]
            found += [guards.item_is(downs._modules, name), (guards.ITEM_IS, down._parameters, "weight", A),
                      guards.item_is(ups._modules, name), (guards.ITEM_IS, up._parameters, "weight", B),
                      (guards.ITEM_IS, up._parameters, "bias", b), (guards.ITEM_EQUAL, layer.scaling, name, s),
                      (guards.ITEM_IS, dropouts._modules, name, dropout)]
            if may_drop:
                found.append((guards.NOT_DROPPING, dropout.__dict__, None, None))
        return found


def _joined(new, kept: tuple, same) -> tuple:
    """``(new, *kept)`` without the kept calls ``same(call, new)`` holds for, at most ``SETTLED_CALLS_PER_LAYER``."""
    return (new,) + tuple(call for call in kept if not same(call, new))[:SETTLED_CALLS_PER_LAYER - 1]


class SettledLayerCall:
    """A :class:`FusedLoraLinear`'s evaluation call resolved once (a ``functional.SettledCall``), with what it read
    from the layer. :meth:`output` serves a later call by it while the layer still holds the same base module, base
    weight (a dense one by identity, dtype and device; a quantized one as the same ``QuantizedWeight``, which
    bitsandbytes' in-place repack or requantization replaces) and bias, no hooks on the base, the same active
    adapters, and its adapters ``HeldAdapters.unchanged``; else it returns None and the call takes the full path
    (which may settle it again). Checking that costs a fraction of resolving the call."""

    __slots__ = ("calls", "base", "weight", "bias", "quantized", "compute_dtype", "active", "adapters")

    def __init__(self, call, base, weight, bias, quantized, compute_dtype, active, adapters):
        self.calls = (call,)  # one per dtype and rows bucket (a prompt's prefill, then its decode steps)
        self.base, self.weight, self.bias, self.quantized = base, weight, bias, quantized
        self.compute_dtype, self.active, self.adapters = compute_dtype, active, adapters

    @classmethod
    def of(cls, layer: nn.Module, active: list, weight, arguments: tuple, call,
           drawing: bool = False) -> Optional["SettledLayerCall"]:
        """``call`` (a ``functional.SettledCall``, a ``functional.SettledTrainingCall`` with ``drawing``, or None)
        kept with what ``layer`` holds now; ``weight`` is the call's base weight (tensor or ``QuantizedWeight``),
        ``arguments`` the active adapters' ``adapter_arguments``. None where ``call`` is None or the layer holds
        something this class cannot check."""
        if call is None or layer.lora_variant:
            return None
        base = layer._modules["base_layer"]
        params = base._parameters
        held = layer._active_adapter
        settled = cls(call, base, params.get("weight"), params.get("bias"),
                      None if isinstance(weight, torch.Tensor) else weight, getattr(base, "compute_dtype", None),
                      list(held) if isinstance(held, list) else held,
                      HeldAdapters(layer, active, *arguments[:4], drawing=drawing))
        # A weight held outside the parameter dicts (a parametrization computes it per read) never matches: such a
        # layer is not kept settled.
        return settled if settled.holds(layer) else None

    def output(self, layer: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``layer(x)`` by a settled call for ``x``, or None where the layer is not what they were settled for or
        none serves ``x``."""
        if not self.holds(layer):
            return None
        for call in self.calls:
            y = call.output(x)
            if y is not None:
                return y
        return None

    def joined(self, kept: Optional["SettledLayerCall"], layer: nn.Module) -> "SettledLayerCall":
        """This settled call with the calls of ``kept`` for other dtypes or rows buckets, where ``kept`` still holds
        for ``layer`` (then both describe the same layer state)."""
        if kept is not None and kept is not self and kept.holds(layer):
            self.calls = _joined(self.calls[0], kept.calls,
                                 lambda a, b: (a.dtype, a.m_high) == (b.dtype, b.m_high))
        return self

    def holds(self, layer: nn.Module) -> bool:
        """Whether ``layer`` still holds what this call was settled with (see the class docstring)."""
        base = layer._modules["base_layer"]
        params = base._parameters
        weight = params.get("weight")
        if (base is not self.base or weight is None or weight is not self.weight or params.get("bias") is not self.bias
                or base._forward_hooks or base._forward_pre_hooks or layer._active_adapter != self.active):
            return False
        if self.quantized is None:
            call = self.calls[0]
            if weight.dtype is not call.dtype or not functional.on_device(weight, call.device):
                return False
        elif (base.training or getattr(base, "compute_dtype", None) is not self.compute_dtype
              or not is_bnb_quantized(base) or QuantizedWeight.from_bnb_linear(base) is not self.quantized):
            return False
        return self.adapters.unchanged(layer)

    def native(self, layer: nn.Module):
        """A ``fastpeft._C.SettledGemv`` serving this call's settled calls that C++ can serve (``SettledCall
        .bind_native``) under :meth:`holds` as guards, or None where none can be served so. ``layer`` holds what this
        call was settled with (:meth:`of` and :meth:`joined` keep only such calls)."""
        if self.quantized is not None or self.weight is None:
            return None
        base = layer._modules["base_layer"]
        layer_guards = [
            guards.item_is(layer._modules, "base_layer"),
            (guards.ITEM_IS, base._parameters, "weight", self.weight),
            (guards.ITEM_IS, base._parameters, "bias", self.bias),
            guards.attribute_falsy(base, "_forward_hooks"),
            guards.attribute_falsy(base, "_forward_pre_hooks"),
            guards.attribute_equal(layer, "_active_adapter", self.active),
            *self.adapters.guards(layer),
        ]
        native = None
        for call in self.calls:
            native = call.bind_native(native, layer_guards)
        return native


class SettledMixedLayerCall:
    """A layer's mixed-adapter calls without autograd resolved once (``mixed.SettledMixedCall``, one per batch shape
    and ``adapter_names`` list), each with the adapters of its batch as the layer held them (``HeldAdapters``: the
    batches of different lists use different adapters), and the base product settled as a call with no adapters
    (``base``, a ``SettledLayerCall``, where :func:`mixed_base_output` takes fastpeft's base product and it
    settles). :meth:`output` runs the base product and a settled pass while that call's adapters and the settled base
    product are unchanged, else returns None."""

    __slots__ = ("calls", "base")

    def __init__(self, calls: tuple, base: Optional[SettledLayerCall]):
        self.calls = calls  # ((SettledMixedCall, HeldAdapters), ...)
        self.base = base

    @classmethod
    def of(cls, layer: nn.Module, x: torch.Tensor, call) -> Optional["SettledMixedLayerCall"]:
        """``call`` (the ``mixed.SettledMixedCall`` of the evaluation call on ``x`` just made, or None) kept with
        the adapters it read and the base product settled for ``x``."""
        if call is None or layer.lora_variant:
            return None
        held = call.adapters
        adapters = HeldAdapters(layer, call.groups.adapters, held.lora_A, held.lora_B, held.lora_bias, held.scaling)
        if not adapters.unchanged(layer):
            return None
        return cls(((call, adapters),), _settled_base_product(layer, x))

    def output(self, layer: nn.Module, x: torch.Tensor, adapter_names) -> Optional[torch.Tensor]:
        for call, adapters in self.calls:
            if call.serves(x, adapter_names):
                if not adapters.unchanged(layer):
                    return None
                if self.base is None:  # the base layer's own forward, or a base product not settled
                    return call.add_(x, mixed_base_output(layer, x))
                y = self.base.output(layer, x)
                # None: the base changed, or its settled products serve other rows buckets; the full path settles
                # this call again
                return None if y is None else call.add_(x, y)
        return None

    def joined(self, kept: Optional["SettledMixedLayerCall"], layer: nn.Module) -> "SettledMixedLayerCall":
        """This settled call with the calls of ``kept`` for other shapes or lists whose adapters are unchanged, and
        its settled base products for other dtypes or rows buckets."""
        if kept is not None and kept is not self:
            still = tuple(pair for pair in kept.calls if pair[1].unchanged(layer))
            self.calls = _joined(self.calls[0], still, lambda a, b: (a[0].dtype, a[0].shape, a[0].groups) == (
                b[0].dtype, b[0].shape, b[0].groups))
            if self.base is None:
                self.base = kept.base if kept.base is not None and kept.base.holds(layer) else None
            else:
                self.base = self.base.joined(kept.base, layer)
        return self


def _settled_base_product(layer: nn.Module, x: torch.Tensor) -> Optional[SettledLayerCall]:
    """:func:`mixed_base_output`'s fastpeft base product for calls like the one on ``x``, settled as a layer call
    with no adapters (checked against the layer's base module, weight, bias and hooks), or None where the base
    layer's own forward serves it or the product is not settled."""
    found = _dense_base_for(layer, x)
    return None if found is None else settled_lora_call(layer, x, [], *found, adapter_arguments(layer, []))


def settled_lora_call(layer, x, active, weight, bias, arguments) -> Optional[SettledLayerCall]:
    """The layer's call of ``functional.lora_linear`` settled (``SettledLayerCall``), where it can be: no dropout
    drawn, and a base bias read as the parameter itself (a quantized base's bias cast to its compute dtype is a
    copy made per call)."""
    lora_A, lora_B, lora_bias, scaling, dropout_p, training = arguments
    params = layer._modules["base_layer"]._parameters
    if (training and any(dropout_p)) or bias is not params.get("bias"):
        return None
    transposed = False
    if isinstance(weight, torch.Tensor):  # bind the parameter itself, whose data a later call reads as it is then
        weight, transposed = params.get("weight"), layer.fan_in_fan_out
        if weight is None:
            return None
    call = functional.settled_lora_linear(x, weight, transposed, bias, lora_A, lora_B, lora_bias, scaling)
    return SettledLayerCall.of(layer, active, weight, arguments, call)


def settled_training_call(layer, x, active, weight, bias, arguments) -> Optional[SettledLayerCall]:
    """The layer's training call of ``functional.lora_linear`` (grad enabled) settled, where it can be: a dense base
    weight and bias read as the parameters themselves, the dropout the call applied drawn per call."""
    lora_A, lora_B, lora_bias, scaling, dropout_p, _ = arguments  # (p is 0 where an adapter's module is in eval)
    params = layer._modules["base_layer"]._parameters
    if not isinstance(weight, torch.Tensor) or bias is not params.get("bias") or params.get("weight") is None:
        return None
    call = functional.settled_lora_training(x, params["weight"], layer.fan_in_fan_out, bias, lora_A, lora_B,
                                            lora_bias, scaling, dropout_p)
    return SettledLayerCall.of(layer, active, params["weight"], arguments, call, drawing=True)


def settled_served_call(layer, x, weight, active) -> Optional[SettledLayerCall]:
    """The layer's call served by a ``SERVING_SETTLERS`` entry, settled, where one settles it."""
    for settle in SERVING_SETTLERS:
        found = settle(layer, x, direct_base_layer(layer), weight, active)
        if found is not None:
            call, arguments = found
            return SettledLayerCall.of(layer, active, weight, arguments, call)
    return None


class KeepsSettledCalls:
    """Mixin of the fused LoRA layers: the layer's latest evaluation call, and its latest training call, kept
    resolved (``SettledLayerCall``) for the calls that repeat them. Dispatch state of this process: never pickled or
    deep-copied."""

    # class defaults: reading them never reaches nn.Module.__getattr__
    _fastpeft_settled: Optional[SettledLayerCall] = None
    _fastpeft_settled_training: Optional[SettledLayerCall] = None
    _fastpeft_settled_mixed: Optional[SettledMixedLayerCall] = None
    _fastpeft_native = None  # the kept calls C++ serves (SettledLayerCall.native)

    def __getstate__(self):
        state = super().__getstate__()
        for name in ("_fastpeft_settled", "_fastpeft_settled_training", "_fastpeft_settled_mixed",
                     "_fastpeft_native"):
            state.pop(name, None)
        return state

    def _keep_settled(self, settled: Optional[SettledLayerCall]) -> None:
        """Keep a call the full path just settled, with the kept ones for other dtypes and rows buckets."""
        if settled is not None:
            self._fastpeft_settled = settled = settled.joined(self._fastpeft_settled, self)
            self._fastpeft_native = settled.native(self)

    def _keep_settled_training(self, settled: Optional[SettledLayerCall]) -> None:
        """Keep a training call the full path just settled, with the kept ones for other dtypes and rows buckets."""
        if settled is not None:
            self._fastpeft_settled_training = settled.joined(self._fastpeft_settled_training, self)

    def _keep_settled_mixed(self, settled: Optional[SettledMixedLayerCall]) -> None:
        if settled is not None:
            self._fastpeft_settled_mixed = settled.joined(self._fastpeft_settled_mixed, self)

    def _settled_output(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        """``self(x)`` by the kept call (evaluation or training, by whether grad is enabled) where it serves this
        one, else None."""
        settled = self._fastpeft_settled_training if torch.is_grad_enabled() else self._fastpeft_settled
        if settled is None or args or kwargs:
            return None
        return settled.output(self, x)


class FusedLoraLinear(KeepsSettledCalls, PeftLoraLinear):
    """PEFT's ``lora.Linear`` (over ``nn.Linear``, transformers ``Conv1D`` or a quantized base) with a fused forward.

    ``forward(x)``: ``x`` is ``(..., in_features)`` in the base weight's dtype; returns ``(..., out_features)``.
    Over a bitsandbytes base, ``merge``/``unmerge`` dequantize, add and requantize (PEFT's generic class would add
    the delta to the packed bytes). An evaluation call is kept resolved (``KeepsSettledCalls``) for the calls that
    repeat it.
    """

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        from .quant import is_bnb_quantized

        if is_bnb_quantized(self.get_base_layer()):
            from .quant_merge import merge_quantized

            return merge_quantized(self, adapter_names)
        dora.clear_cache(self)
        return super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge(self) -> None:
        from .quant import is_bnb_quantized

        if self.merged and is_bnb_quantized(self.get_base_layer()):
            from .quant_merge import unmerge_quantized

            return unmerge_quantized(self)
        dora.clear_cache(self)
        return super().unmerge()

    def _fused_call(self, x, args, kwargs):
        """``(active adapters, weight, bias)`` for ``functional.lora_linear``, or None when PEFT's own forward must
        run. Disabled or merged adapters leave a quantized base to fastpeft's product (no active adapters) and a
        dense one to PEFT's forward, which is the base layer's."""
        if args or kwargs:
            return None
        base = direct_base_layer(self)
        if _has_hooks(base):
            return None
        found = read_base_weight(base, self.fan_in_fan_out)
        if found is None:
            return None
        if self.disable_adapters or self.merged:
            if isinstance(found[0], torch.Tensor):
                return None
            if self.disable_adapters and self.merged:
                self.unmerge()  # as PEFT's forward does; it rewrites the quantized weight
                found = read_base_weight(base, self.fan_in_fan_out)
            return [], found[0], found[1]
        downs = self._modules["lora_A"]._modules
        active = [name for name in self.active_adapters if name in downs]
        if self.lora_variant and any(name in self.lora_variant for name in active) and (
                dora.unfused_variant_reason(self, active) is not None):
            return None
        return active, found[0], found[1]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        native = self._fastpeft_native
        if native is not None and not (args or kwargs or torch.compiler.is_compiling()):
            y = native(x)  # None where a condition of the settled calls fails: the path below checks them again
            if y is not None:
                return y
        if kwargs.get("adapter_names") is not None:
            return mixed_batch_forward(self, x, args, kwargs, super().forward)
        y = self._settled_output(x, args, kwargs)
        if y is not None:
            return y
        call = self._fused_call(x, args, kwargs)
        if call is None:
            return super().forward(x, *args, **kwargs)
        active, weight, bias = call
        check_input(self, x, weight, self.in_features)
        if not active:
            if isinstance(weight, torch.Tensor):
                return self.base_layer(x)
            return quantized_base_only(self, x, weight, bias)
        if self.training and functional.capturing_cuda_graph(x) and _any_dropout(self, active):
            return super().forward(x, *args, **kwargs)  # torch's dropout is graph-safe, fastpeft's host seeds are not
        if self.lora_variant and any(name in self.lora_variant for name in active):
            if not dora.dora_call_ok(self, weight, x):
                return super().forward(x)
            return dora.layer_forward(self, x, active, weight, bias, direct_base_layer(self).weight, layer_name(self))
        if SERVING_RULES and not isinstance(weight, torch.Tensor):
            y = served_output(self, x, weight, active)
            if y is not None:
                if not torch.is_grad_enabled():
                    self._keep_settled(settled_served_call(self, x, weight, active))
                return y
        arguments = adapter_arguments(self, active)
        y = functional.lora_linear(x, weight, bias, *arguments)
        if not torch.is_grad_enabled():
            self._keep_settled(settled_lora_call(self, x, active, weight, bias, arguments))
        else:
            self._keep_settled_training(settled_training_call(self, x, active, weight, bias, arguments))
        return y


class FusedIA3Linear(PeftIA3Linear):
    """PEFT's ``ia3.Linear`` with a fused forward: the input scale in the GEMM prologue (feedforward modules) or the
    output scale in its epilogue.

    ``forward(x)``: ``x`` is ``(..., in_features)``; returns ``(..., out_features)``.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = direct_base_layer(self)
        found = None
        if not (args or kwargs or self.disable_adapters or self.merged or _has_hooks(base)):
            found = read_base_weight(base, self.fan_in_fan_out)
        if found is None:
            return super().forward(x, *args, **kwargs)
        weight, bias = found
        check_input(self, x, weight, self.in_features)
        vectors = [self.ia3_l[name] for name in self.active_adapters if name in self.ia3_l]
        if not vectors:
            return self.base_layer(x)
        return functional.ia3_linear(x, weight, bias, vectors, self.is_feedforward)


# PEFT layer class -> fused twin. ``fastpeft.layers_bnb.register_bnb_layers`` adds PEFT's bitsandbytes layer
# classes (``fastpeft.patching.register_optional_layers`` calls it where bitsandbytes is installed).
FUSED_LAYER_TYPES: dict[type, type] = {
    PeftLoraLinear: FusedLoraLinear,
    PeftIA3Linear: FusedIA3Linear,
}
