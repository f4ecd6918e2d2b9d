"""``fastpeft.report(model)``: which adapter layers run fused, by which backend and routes, and why not.

For every PEFT adapter layer of a model: its name, method, base layer type, whether fastpeft's fused forward serves
its calls and, if not, why (PEFT's own forward then runs: same meaning, not fused), the backend the dispatcher picks
for its weight on this machine, and the routes measured so far in this process for its shape
(``fastpeft.routing.routes``; a shape not yet called has none).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from . import dora, routing
from . import layers as _layers
from .backends import get_backend
from .patching import fusable, register_optional_layers
from .quant import is_bnb_quantized


@dataclass
class LayerReport:
    """One adapter layer. ``fused``: whether its calls take fastpeft's fused path; ``reason``: why not (empty when
    fused); ``backend``: the backend that serves it (``None`` when not fused); ``routes``: ``{op: route}`` measured so
    far for its shape and backend."""

    name: str
    method: str
    base: str
    fused: bool
    reason: str = ""
    backend: Optional[str] = None
    routes: dict = field(default_factory=dict)


@dataclass
class FusionReport:
    """The rows of ``report(model)``; ``str()`` gives a table and a one-line summary."""

    layers: list

    @property
    def fused(self) -> int:
        return sum(1 for row in self.layers if row.fused)

    def __str__(self) -> str:
        head = ("layer", "method", "base", "fused", "backend", "routes", "why not fused")
        rows = [(r.name, r.method, r.base, "yes" if r.fused else "no", r.backend or "-",
                 ", ".join(f"{op}={route}" for op, route in sorted(r.routes.items())) or "-", r.reason or "-")
                for r in self.layers]
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
        lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths)),
                 "-+-".join("-" * w for w in widths)]
        lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        lines.append(f"{self.fused} of {len(self.layers)} adapter layers run fused")
        return "\n".join(lines)


def _method(module) -> str:
    from peft.tuners.ia3.layer import IA3Layer
    from peft.tuners.lora.layer import LoraLayer

    if isinstance(module, LoraLayer):
        return "lora"
    if isinstance(module, IA3Layer):
        return "ia3"
    return type(module).__name__


def _why_not_fused(module) -> tuple[str, Optional[tuple]]:
    """``(reason, (weight, bias))``: an empty reason when the fused forward serves plain calls of ``module``."""
    if type(module) not in _layers.FUSED_LAYER_TYPES.values():
        ok, reason = fusable(module)
        return (reason if not ok else "not accelerated: call fastpeft.accelerate(model)"), None
    base = _layers.direct_base_layer(module)
    quantized = is_bnb_quantized(base)
    # Over a bitsandbytes base the twin still computes the base product itself (never bitsandbytes' CPU forward).
    own_base = " (base product by fastpeft)" if quantized else ""
    if module.disable_adapters:
        return "adapters disabled" + own_base, None
    if module.merged:
        return "adapters merged into the base weight" + own_base, None
    if getattr(module, "lora_variant", None):
        active = [name for name in module.active_adapters if name in module.lora_A]
        reason = dora.unfused_variant_reason(module, active)
        if reason is not None:
            return reason, None
    if _layers._has_hooks(base):
        return "forward hooks on the base layer", None
    found = _layers.read_base_weight(base, getattr(module, "fan_in_fan_out", False))
    if found is None:
        return f"base layer {type(base).__name__} is not supported", None
    return "", found


def _backend_of(module, weight) -> str:
    """The backend that serves a call with ``weight`` (a probe input with no rows in the compute dtype)."""
    dtype = weight.dtype if isinstance(weight, torch.Tensor) else getattr(
        _layers.direct_base_layer(module), "compute_dtype", None) or torch.float32
    probe = torch.empty(0, weight.shape[1], dtype=dtype, device=weight.device)
    return get_backend(probe, weight).name


def report(model: torch.nn.Module) -> FusionReport:
    """The fusion report of ``model`` (a ``peft.PeftModel`` or any module holding PEFT adapter layers)."""
    register_optional_layers()
    chosen: dict = {}
    for row in routing.routes():
        chosen.setdefault((row["backend"], row["n"], row["k"]), {})[row["op"]] = row["route"]
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        base = module.get_base_layer()
        reason, found = _why_not_fused(module)
        row = LayerReport(name=name, method=_method(module), base=type(base).__name__, fused=not reason,
                          reason=reason)
        if found is not None:
            weight = found[0]
            row.backend = _backend_of(module, weight)
            row.routes = dict(chosen.get((row.backend, int(weight.shape[0]), int(weight.shape[1])), {}))
        rows.append(row)
    return FusionReport(rows)
