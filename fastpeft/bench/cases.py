"""Layer-level benchmark cases: which layers, shapes and providers are compared, and how each one is built.

A *case* is one (kind, shape, M, dtype, dropout, mode) point. For each case every *provider* gets its own layer
built from the same seed, so the numbers compare the same arithmetic:

- ``base``: the frozen base layer alone (``nn.Linear``, or the bitsandbytes ``Linear4bit``/``Linear8bitLt``): the
  floor every adapter implementation pays;
- ``peft``: PEFT's own adapter layer around that base (``get_peft_model``);
- ``fastpeft``: the same PEFT layer after ``fastpeft.accelerate`` with the automatic backend choice;
- ``fastpeft-<name>``: the same, with ``fastpeft.set_backend(name)`` forced before each run;
- ``compose``: the plain composition anyone can write over PEFT's tensors, ``y = base(x);
  y.addmm_(drop(x) @ A^T, B^T, alpha=s)`` with the adapters cast to ``x``'s dtype (LoRA kinds only): fastpeft's
  floor, as PEFT is its reference; for the ``dora`` kind (PEFT's ``use_dora=True``) the same composition scaled by
  ``m / n`` with the norm taken without forming ``W + s B A`` (``ComposedDoRA``).

Kind ``lora-mixed``: a mixed-adapter batch (PEFT's ``adapter_names``) of ``MIXED_SEQUENCES`` sequences of
``M / MIXED_SEQUENCES`` tokens, sequence ``i`` through adapter ``i % adapters`` (``Case.adapters``, each of rank
``r``; with 8 sequences at most 8 are in a batch, the rest are held by the layer); decode is ``M = 8`` (one token
per sequence), prefill ``M = 512``.

Modes: ``infer`` (eval mode under ``torch.no_grad()``: serving; bitsandbytes then runs its own CPU kernels), ``fwd``
(training-mode forward, autograd recording), ``bwd`` and ``fwd+bwd``.

Dense bases are shared between providers (the base weight is never modified); quantized bases are built fresh per
provider from the same seed, never deep-copied (bitsandbytes repacks CPU 4-bit weights in place on first use).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

import fastpeft
from fastpeft import backends as _backends

# (name, K = in_features, N = out_features): projections of LLaMA-7B (hidden 4096, MLP 11008) and LLaMA-3-8B
# (MLP 14336). down_proj is the one IA3 treats as a feedforward module (scale on the input).
SHAPES = {
    "2048": (2048, 2048),
    "7b-qkvo": (4096, 4096),
    "7b-up": (4096, 11008),
    "7b-down": (11008, 4096),
    "8b-up": (4096, 14336),
    "8b-down": (14336, 4096),
}
KINDS = ("lora", "ia3", "qlora-nf4", "qlora-int8", "lora-mixed", "dora")
MIXED_SEQUENCES = 8
MIXED_ADAPTERS = (1, 4, 16, 64)
MODES = ("infer", "fwd", "bwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOKENS = (1, 16, 512, 2048)


@dataclass(frozen=True)
class Case:
    """One measured point. ``K``/``N`` are already divided by ``--scale``."""

    kind: str
    shape: str
    K: int
    N: int
    M: int
    dtype: str
    dropout: float
    mode: str
    r: int = 16
    adapters: int = 1  # lora-mixed: distinct adapters in the batch

    @property
    def quantized(self) -> bool:
        return self.kind.startswith("qlora")

    @property
    def label(self) -> str:
        mixed = f" adapters={self.adapters}" if self.kind == "lora-mixed" else ""
        return (f"{self.kind} {self.shape} {self.K}x{self.N} M={self.M}{mixed} {self.dtype} drop={self.dropout} "
                f"{self.mode}")

    def adapter_names(self) -> Optional[list]:
        """lora-mixed: the adapter of each sequence; None for the other kinds."""
        if self.kind != "lora-mixed":
            return None
        return [mixed_adapter_name(i % self.adapters) for i in range(MIXED_SEQUENCES)]


def mixed_adapter_name(i: int) -> str:
    """The name of a mixed batch's adapter ``i`` (``i = 0``: the one ``get_peft_model`` creates)."""
    return f"mix{i}"


def scaled(dim: int, scale: int) -> int:
    """``dim / scale`` rounded up to a multiple of 64 (bitsandbytes' 4-bit blocks and the CPU repack need it)."""
    return max(64, -(-dim // scale // 64) * 64)


def available_backends(device: torch.device) -> list[str]:
    """fastpeft backends usable here for tensors on ``device``. Triton on CPU tensors means its interpreter, which
    is orders of magnitude slower than any real kernel, so it is listed only when asked for by name."""
    info = fastpeft.backend_info()
    names = [n for n in _backends.BACKEND_NAMES if info.get(n, {}).get("available")]
    if device.type != "cuda":
        names = [n for n in names if n not in ("triton", "cuda")]
    return names


def default_providers(device: torch.device) -> list[str]:
    return ["base", "peft", "compose", "fastpeft"] + [f"fastpeft-{n}" for n in available_backends(device)]


class ComposedLoRA(nn.Module):
    """The five-line composition over a PEFT LoRA layer's own tensors (one adapter): the base layer as it is, then
    ``y.addmm_(drop(x) @ A^T, B^T, alpha=s)`` with ``A``, ``B`` cast to ``x``'s dtype. Gradients reach ``A``/``B``
    through the casts."""

    def __init__(self, peft_layer: nn.Module, adapter: str = "default"):
        super().__init__()
        self.base = peft_layer.get_base_layer()
        self.lora_A = peft_layer.lora_A[adapter].weight
        self.lora_B = peft_layer.lora_B[adapter].weight
        self.dropout = peft_layer.lora_dropout[adapter]
        self.scaling = float(peft_layer.scaling[adapter])

    def forward(self, x):
        y = self.base(x)
        xa = self.dropout(x) @ self.lora_A.to(x.dtype).t()
        return y.addmm_(xa, self.lora_B.to(x.dtype).t(), alpha=self.scaling)


class ComposedDoRA(ComposedLoRA):
    """DoRA's composition over a PEFT DoRA layer's tensors (one adapter, bias-free base as built here), in torch:
    ``c = m / n`` with ``n`` from ``fastpeft.dora.weight_norm`` (no ``N x K`` weight), then PEFT's formula,
    ``c * (base(x) + s x A^T B^T)`` or, with dropout in training, ``base(x) + (c - 1) drop(x) W^T + c s drop(x)
    A^T B^T``."""

    def __init__(self, peft_layer: nn.Module, adapter: str = "default"):
        super().__init__(peft_layer, adapter)
        self.magnitude = peft_layer.lora_magnitude_vector[adapter].weight

    def forward(self, x):
        from fastpeft.dora import weight_norm

        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        c = (self.magnitude / weight_norm(self.base.weight, A, B, self.scaling)).to(x.dtype)
        y = self.base(x)
        if isinstance(self.dropout, nn.Identity) or not self.dropout.training:
            return (y + (x @ A.t()) @ B.t() * self.scaling) * c
        xd = self.dropout(x)
        return y + (c - 1) * self.base(xd) + c * ((xd @ A.t()) @ B.t() * self.scaling)


class _Holder(nn.Module):
    """A one-layer model PEFT can wrap: ``get_peft_model`` needs a parent module to replace ``proj`` in."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def _make_base(case: Case, device: torch.device, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    dtype = DTYPES[case.dtype]
    if case.kind == "qlora-nf4":
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(case.K, case.N, bias=False, compute_dtype=dtype, quant_type="nf4")
        return layer.to(device)  # moving quantizes
    if case.kind == "qlora-int8":
        import bitsandbytes as bnb

        layer = bnb.nn.Linear8bitLt(case.K, case.N, bias=False, has_fp16_weights=False)
        return layer.to(device)
    layer = nn.Linear(case.K, case.N, bias=False, device=device, dtype=dtype)
    layer.requires_grad_(False)
    return layer


def _wrap(case: Case, base: nn.Module, seed: int) -> nn.Module:
    """PEFT's adapter layer around ``base`` (random B for LoRA so the adapter's arithmetic is not trivially zero)."""
    from peft import IA3Config, LoraConfig, get_peft_model

    torch.manual_seed(seed + 1)
    if case.kind == "ia3":
        config = IA3Config(target_modules=["proj"], feedforward_modules=["proj"] if "down" in case.shape else [])
    else:
        config = LoraConfig(r=case.r, lora_alpha=2 * case.r, lora_dropout=case.dropout, target_modules=["proj"],
                            init_lora_weights=False, use_dora=case.kind == "dora")
    mixed = case.kind == "lora-mixed"
    model = get_peft_model(_Holder(base), config, adapter_name=mixed_adapter_name(0) if mixed else "default")
    for i in range(1, case.adapters if mixed else 1):
        model.add_adapter(mixed_adapter_name(i), copy.deepcopy(config))
    model.train()
    return model


@dataclass
class Built:
    """A provider's layer, ready to run: ``select()`` is called (outside the timed region) before each run."""

    provider: str
    module: nn.Module
    model: Optional[nn.Module]  # the PeftModel holding it (None for base)
    select: Callable[[], None]
    fused: bool
    backend: str
    params: list = field(default_factory=list)


def _select_backend(name: Optional[str]) -> Callable[[], None]:
    return lambda: fastpeft.set_backend(name)


def _served_by(module: nn.Module, x: torch.Tensor) -> str:
    """The fastpeft backend the dispatcher picks for this layer's calls (for the CSV's ``backend`` column)."""
    try:
        base = module.get_base_layer()
        from fastpeft.quant import quantized_weight_of

        weight = quantized_weight_of(base) or base.weight
        return _backends.get_backend(x, weight).name
    except Exception:
        return "?"


def build(case: Case, provider: str, device: torch.device, x: torch.Tensor, seed: int = 0,
          shared_base: Optional[nn.Module] = None) -> Built:
    """Build ``provider``'s layer for ``case``. ``shared_base`` is reused for dense bases."""
    base = shared_base if (shared_base is not None and not case.quantized) else _make_base(case, device, seed)
    if provider == "base":
        base.requires_grad_(False)
        return Built(provider, base, None, _select_backend(None), False, "")
    model = _wrap(case, base, seed)
    layer = model.base_model.model.proj
    if case.kind == "lora-mixed":
        model.base_model.set_adapter([mixed_adapter_name(0)])
    params = [p for p in layer.parameters() if p.requires_grad]
    if provider == "peft":
        return Built(provider, layer, model, _select_backend(None), False, "", params)
    if provider == "compose":
        if case.kind == "ia3":
            raise ValueError("the compose provider is LoRA's composition; IA3 has none")
        composed = ComposedDoRA(layer) if case.kind == "dora" else ComposedLoRA(layer)
        return Built(provider, composed, model, _select_backend(None), False, "torch", params)
    if not provider.startswith("fastpeft"):
        raise ValueError(f"unknown provider {provider!r}")
    backend_name = provider.split("-", 1)[1] if "-" in provider else None
    cls_before = type(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unfused quantized layer is reported in the CSV's `fused` column
        fastpeft.accelerate(model)
    layer = model.base_model.model.proj
    fused = type(layer) is not cls_before
    select = _select_backend(backend_name)
    select()
    served = (backend_name or _served_by(layer, x)) if fused else "peft (not fused)"
    fastpeft.set_backend(None)
    return Built(provider, layer, model, select, fused, served, params)


@contextlib.contextmanager
def backend_restored():
    """Leave the process on the automatic backend choice whatever a provider forced."""
    try:
        yield
    finally:
        fastpeft.set_backend(None)


def make_inputs(case: Case, device: torch.device, seed: int = 0):
    """``x`` (M, K) requiring grad (a layer inside a network receives a differentiable input) and ``dy`` (M, N)."""
    g = torch.Generator(device="cpu").manual_seed(seed + 2)
    dtype = DTYPES[case.dtype]
    x = torch.randn(case.M, case.K, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    dy = torch.randn(case.M, case.N, generator=g).to(device=device, dtype=dtype)
    return x, dy


def caller(layer: nn.Module, names: Optional[list]):
    """``layer`` as the runners call it: ``x`` ``(M, K)`` -> ``(M, N)``; a mixed batch reshapes ``x`` into
    sequences and passes ``adapter_names`` (the frozen base takes the flat batch as it is)."""
    if names is None or not hasattr(layer, "lora_A"):
        return layer
    return lambda x: layer(x.view(len(names), -1, x.shape[-1]), adapter_names=names).flatten(0, 1)


def make_runner(built: Built, mode: str, x: torch.Tensor, dy: torch.Tensor, names: Optional[list] = None):
    """``(prepare, run)`` for one provider and mode. ``prepare`` (untimed) selects the backend, clears gradients
    and, for ``bwd``, runs the forward whose graph ``run`` then differentiates. ``names``: a mixed batch's
    ``adapter_names``."""
    module = built.module
    layer = caller(module, names)
    state: dict = {}

    def clear():
        built.select()
        x.grad = None
        for p in built.params:
            p.grad = None
        state.clear()

    if mode == "infer":
        def prepare():
            clear()
            module.eval()

        def run():
            with torch.no_grad():
                state["y"] = layer(x.detach())  # bitsandbytes runs its serving kernels only for inputs without grad
    elif mode == "fwd":
        def prepare():
            clear()
            module.train()

        def run():
            state["y"] = layer(x)
    elif mode == "bwd":
        def prepare():
            clear()
            module.train()
            state["y"] = layer(x)

        def run():
            state["y"].backward(dy, retain_graph=True)  # repeatable on CUDA, where prepare runs once
    elif mode == "fwd+bwd":
        def prepare():
            clear()
            module.train()

        def run():
            layer(x).backward(dy)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return prepare, run


def enumerate_cases(kinds, shapes, tokens, dtypes, dropouts, modes, scale: int, r: int = 16) -> list[Case]:
    """The cross product, minus points with no meaning: IA3 has no dropout; an int8 base computes in its own
    dtype, so fp32 int8 rows are skipped (a 4-bit base computes in its ``compute_dtype``, fp32 included). A mixed
    batch needs whole sequences (``M`` a multiple of ``MIXED_SEQUENCES``) and runs once per adapter count."""
    cases = []
    for kind in kinds:
        for shape in shapes:
            K, N = SHAPES[shape]
            for dtype in dtypes:
                if kind == "qlora-int8" and dtype == "fp32":
                    continue
                for dropout in dropouts:
                    if kind == "ia3" and dropout:
                        continue
                    for mode in modes:
                        for M in tokens:
                            if kind != "lora-mixed":
                                cases.append(Case(kind, shape, scaled(K, scale), scaled(N, scale), M, dtype,
                                                  dropout, mode, r))
                                continue
                            if M % MIXED_SEQUENCES:
                                continue  # whole sequences only
                            cases.extend(Case(kind, shape, scaled(K, scale), scaled(N, scale), M, dtype, dropout,
                                              mode, r, n) for n in MIXED_ADAPTERS)
    return cases
