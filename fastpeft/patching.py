"""Entry points that put fastpeft into a model: ``patch``, ``accelerate`` and ``register``."""

from __future__ import annotations

import difflib
import re
import warnings
from typing import Iterable, Optional, Union

from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from . import dora
from . import layers as _layers
from .quant import is_bnb_quantized

try:
    from transformers.pytorch_utils import Conv1D
except Exception:
    Conv1D = None

# Names of output heads that "every linear layer of the transformer blocks" must not include.
_HEAD_NAMES = {"lm_head", "embed_out", "score", "classifier", "qa_outputs", "output_projection", "pooler", "cls"}


def _linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D))


def _in_block(name: str) -> bool:
    """A module inside a stack of blocks has a numeric path component (``layers.0``, ``h.3``, ``block.1``)."""
    return any(part.isdigit() for part in name.split("."))


def default_lora_targets(model: nn.Module) -> list[str]:
    """Every linear layer (``nn.Linear``, ``Conv1D``, bitsandbytes linears) inside the transformer blocks, not the
    output head. Returns leaf names (``q_proj``) when those select exactly these modules, else full names."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_embeddings = get_out() if callable(get_out) else None
    chosen, others = [], []
    # An adapter layer's own linears (its base_layer, lora_A/lora_B) are not targets: adding a second adapter to a
    # PeftModel targets the layers its first one wraps.
    inside_adapters = {f"{name}." for name, m in model.named_modules() if isinstance(m, BaseTunerLayer) and name}
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside_adapters):
            continue
        if not _linear_like(module.get_base_layer() if isinstance(module, BaseTunerLayer) else module):
            continue
        parts = set(name.split("."))
        if module is out_embeddings or parts & _HEAD_NAMES or not _in_block(name):
            heads.add(name)
            others.append(name)
        else:
            chosen.append(name)
    if not chosen:
        raise ValueError(
            f"fastpeft.patch: found no linear layer inside transformer blocks of {type(model).__name__}; "
            f"pass target_modules explicitly"
        )
    leaves = sorted({name.rsplit(".", 1)[-1] for name in chosen})
    if any(name.rsplit(".", 1)[-1] in leaves for name in others):
        return chosen
    return leaves


def check_target_modules(model: nn.Module, target_modules: Union[str, Iterable[str]], caller: str) -> None:
    """Raise ``ValueError`` naming every ``target_modules`` entry that matches no module, with close names."""
    names = [name for name, _ in model.named_modules() if name]
    if isinstance(target_modules, str):
        if target_modules == "all-linear" or any(re.fullmatch(target_modules, n) for n in names):
            return
        raise ValueError(
            f"{caller}: target_modules regex {target_modules!r} matches no module of {type(model).__name__}"
        )
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        hints = {t: difflib.get_close_matches(t.rsplit(".", 1)[-1], leaves, n=4, cutoff=0.5) for t in missing}
        detail = "; ".join(f"{t!r} (close: {', '.join(h) if h else 'none'})" for t, h in hints.items())
        raise ValueError(f"{caller}: target_modules entries match no module of {type(model).__name__}: {detail}")


def _targeted(model: nn.Module, target_modules: Union[str, Iterable[str]]) -> list[nn.Module]:
    """The modules ``target_modules`` selects, as PEFT matches them (full regex, or a name / dotted suffix)."""
    named = [(name, module) for name, module in model.named_modules() if name]
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return [m for n, m in named if _linear_like(m) and _in_block(n)]
        return [m for n, m in named if re.fullmatch(target_modules, n)]
    return [m for n, m in named if any(n == t or n.endswith("." + t) for t in target_modules)]


# PEFT task types by the transformers auto-class family a model class belongs to, most specific first.
_TASK_MAPPINGS = (
    ("SEQ_CLS", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "ForSequenceClassification"),
    ("TOKEN_CLS", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "ForTokenClassification"),
    ("QUESTION_ANS", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "ForQuestionAnswering"),
    ("SEQ_2_SEQ_LM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", None),
    ("CAUSAL_LM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "ForCausalLM"),
)
# Task types whose PeftModel class trains and saves the model's head (``modules_to_save``).
_HEAD_TASKS = {"SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"}


def infer_task_type(model: nn.Module) -> Optional[str]:
    """PEFT's ``task_type`` for a transformers model class (``BertForSequenceClassification`` -> ``"SEQ_CLS"``,
    ``GPT2LMHeadModel`` -> ``"CAUSAL_LM"``), or None for a bare backbone or a model transformers does not know."""
    try:
        from transformers.models.auto import modeling_auto
    except Exception:
        modeling_auto = None
    name = type(model).__name__
    for task, mapping, suffix in _TASK_MAPPINGS:
        names = getattr(modeling_auto, mapping, {}) if modeling_auto is not None else {}
        known = {n for v in names.values() for n in ((v,) if isinstance(v, str) else v)}
        if name in known or (suffix is not None and name.endswith(suffix)):
            return task
    return None


def _check_head_is_trained(model: nn.Module, config) -> None:
    """A classifier patched from a config without ``task_type`` keeps its freshly initialised head frozen; say so."""
    task = infer_task_type(model)
    if task in _HEAD_TASKS and config.task_type is None and not config.modules_to_save:
        warnings.warn(
            f"fastpeft.patch: {type(model).__name__} is a {task} model but the config has no task_type, so its head "
            f"stays frozen and is not saved with the adapter; set task_type={task!r} (or modules_to_save) in the "
            f"config",
            stacklevel=3,
        )


_optional_layers_checked = False


def register_optional_layers() -> None:
    """Register the bitsandbytes twins and base reader (``fastpeft.layers_bnb.register_bnb_layers``) when
    bitsandbytes is installed. Explicit, and run by ``accelerate``, ``register``, ``fusable`` and ``report`` before
    they look at the registries, so every answer is the same before and after the first ``accelerate``. Importing
    bitsandbytes is slow, so ``import fastpeft`` does not do it; the check itself runs once per process (``fusable``
    asks for every layer of a model)."""
    global _optional_layers_checked
    if _optional_layers_checked:
        return
    _optional_layers_checked = True
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return
    try:
        from .layers_bnb import register_bnb_layers
    except Exception as exc:  # a broken bitsandbytes install must not break dense models
        warnings.warn(f"fastpeft: bitsandbytes is installed but its fused layers could not be loaded: {exc}",
                      stacklevel=3)
        return
    register_bnb_layers()


def fusable(module: nn.Module) -> tuple[bool, str]:
    """Whether ``accelerate`` can turn this PEFT layer into its fused twin, and why not."""
    register_optional_layers()
    if type(module) in _layers.FUSED_LAYER_TYPES.values():
        return True, ""
    if type(module) not in _layers.FUSED_LAYER_TYPES:
        return False, f"{type(module).__module__}.{type(module).__name__} has no fused twin"
    variants = getattr(module, "lora_variant", {})
    other = dora.non_dora_variants(module, list(variants))
    if other:
        return False, f"LoRA variant {', '.join(other)} is not fused"
    base = module.get_base_layer()
    if variants and _layers.FUSED_LAYER_TYPES[type(module)] is _layers.FusedLoraLinear and is_bnb_quantized(base):
        # PEFT's generic layer over a bitsandbytes base: its DoRA merge would add to the packed bytes
        return False, "DoRA on a quantized base under PEFT's generic lora.Linear is not fused"
    if _layers.FUSED_LAYER_TYPES[type(module)] in (_layers.FusedLoraLinear, _layers.FusedIA3Linear):
        if _layers.read_base_weight(base, getattr(module, "fan_in_fan_out", False)) is None:
            return False, f"base layer {type(base).__name__} is not supported"
    return True, ""


def accelerate(peft_model: nn.Module, strict: bool = False) -> nn.Module:
    """Turn, in place, every supported PEFT LoRA/IA3 layer of ``peft_model`` into its fused twin.

    Parameters, names and state_dict keys stay the same. Layers fastpeft does not support yet (Conv2d,
    Embedding, ...) stay as PEFT made them and are listed in one warning; with ``strict=True`` a ``TypeError`` is
    raised instead and nothing is changed. Calling it again is harmless (and fuses adapters added since).
    """
    register_optional_layers()
    plan, unsupported = [], []
    for name, module in peft_model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        ok, reason = fusable(module)
        if ok:
            plan.append((name, module))
        else:
            unsupported.append(f"{name}: {reason}")
    if not plan and not unsupported:
        raise TypeError(
            f"fastpeft.accelerate: {type(peft_model).__name__} has no PEFT adapter layers; build it with "
            f"peft.get_peft_model (or use fastpeft.patch)"
        )
    if unsupported and strict:
        raise TypeError("fastpeft.accelerate(strict=True): unsupported adapter layers:\n  " + "\n  ".join(unsupported))
    for name, module in plan:
        fused = _layers.FUSED_LAYER_TYPES.get(type(module), type(module))
        module.__class__ = fused
        module._fastpeft_name = name
    if unsupported:
        warnings.warn(
            "fastpeft.accelerate: these adapter layers keep PEFT's implementation:\n  " + "\n  ".join(unsupported),
            stacklevel=2,
        )
    return peft_model


def _ia3_defaults(model: nn.Module, target_modules, feedforward_modules):
    if target_modules is not None:
        return target_modules, feedforward_modules
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
    )

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in TARGETS:
        raise ValueError(
            f"fastpeft.patch(method='ia3'): no default IA3 targets for model type {model_type!r}; pass target_modules "
            f"and feedforward_modules"
        )
    return TARGETS[model_type], (feedforward_modules if feedforward_modules is not None else FEEDFORWARD[model_type])


def patch(
    model: nn.Module,
    r: Union[int, LoraConfig, IA3Config] = 8,
    lora_alpha: int = 8,
    lora_dropout: float = 0.0,
    target_modules: Optional[Union[str, list[str]]] = None,
    method: str = "lora",
    adapter_name: str = "default",
    **peft_kwargs,
) -> PeftModel:
    """Add LoRA (or IA3) adapters with fused layers to ``model`` and freeze everything else.

    ``target_modules=None`` targets every linear layer of the transformer blocks (LoRA) or PEFT's IA3 defaults for the
    model type. Extra keyword arguments go to ``peft.LoraConfig`` / ``peft.IA3Config`` (``use_rslora``,
    ``lora_bias``, ``fan_in_fan_out``, ``feedforward_modules``, ...). On a ``PeftModel`` the adapter is added beside
    the existing ones. Invalid arguments raise before the model is touched.

    As with ``peft.get_peft_model``, the second argument may be a ``LoraConfig`` or ``IA3Config`` instead of ``r``
    (``patch(model, LoraConfig(...))``); the config then says everything, and the other keyword arguments (except
    ``adapter_name``) must be left at their defaults.
    """
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    if isinstance(model, PeftModel) and adapter_name in model.peft_config:
        raise ValueError(
            f"fastpeft.patch: the model already has an adapter named {adapter_name!r}; pass another adapter_name to "
            f"add one beside it, or call fastpeft.accelerate(model) to fuse the adapters it has"
        )
    if isinstance(r, (LoraConfig, IA3Config)):
        defaults = (("lora_alpha", lora_alpha, 8), ("lora_dropout", lora_dropout, 0.0),
                    ("target_modules", target_modules, None), ("method", method, "lora"))
        given = sorted({name for name, value, default in defaults if value != default} | set(peft_kwargs))
        if given:
            raise ValueError(f"fastpeft.patch: got a {type(r).__name__} and keyword arguments {given}; put them in the "
                             f"config")
        if r.target_modules is not None:
            check_target_modules(inner, r.target_modules, "fastpeft.patch")
        if not isinstance(model, PeftModel):
            _check_head_is_trained(inner, r)
        return _add_and_fuse(model, r, adapter_name)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"fastpeft.patch: r must be a positive integer, got {r!r}")
    if not 0.0 <= float(lora_dropout) < 1.0:
        raise ValueError(f"fastpeft.patch: lora_dropout must be in [0, 1), got {lora_dropout!r}")
    method = method.lower()
    if not isinstance(model, PeftModel) and "task_type" not in peft_kwargs:
        peft_kwargs["task_type"] = infer_task_type(inner)
    if method == "lora":
        targets = target_modules if target_modules is not None else default_lora_targets(inner)
        check_target_modules(inner, targets, "fastpeft.patch")
        _default_fan_in_fan_out(inner, targets, peft_kwargs)
        config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                            **peft_kwargs)
    elif method == "ia3":
        targets, feedforward = _ia3_defaults(inner, target_modules, peft_kwargs.pop("feedforward_modules", None))
        check_target_modules(inner, targets, "fastpeft.patch")
        _default_fan_in_fan_out(inner, targets, peft_kwargs)
        config = IA3Config(target_modules=targets, feedforward_modules=feedforward, **peft_kwargs)
    elif method == "dora":
        raise ValueError("fastpeft.patch: DoRA is LoRA with use_dora=True, as in PEFT: pass method='lora' (the "
                         "default) and use_dora=True")
    else:
        raise ValueError(f"fastpeft.patch: method must be 'lora' or 'ia3', got {method!r}")
    return _add_and_fuse(model, config, adapter_name)


def _default_fan_in_fan_out(model: nn.Module, targets, peft_kwargs: dict) -> None:
    """``fan_in_fan_out=True`` when the caller left it unset and every target is a ``Conv1D`` (weight ``(K, N)``)."""
    if Conv1D is None or "fan_in_fan_out" in peft_kwargs:
        return
    chosen = _targeted(model, targets)
    if chosen and all(isinstance(m, Conv1D) for m in chosen):
        peft_kwargs["fan_in_fan_out"] = True


def _add_and_fuse(model: nn.Module, config, adapter_name: str) -> PeftModel:
    """``config``'s adapter added to ``model`` (beside the existing ones on a ``PeftModel``), then fused."""
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        model.set_adapter(adapter_name)
        peft_model = model
    else:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    accelerate(peft_model)
    return peft_model


def register(config: Union[LoraConfig, IA3Config]):
    """Register fastpeft's fused layers with PEFT's custom-module mechanism so ``get_peft_model(model, config)``
    builds them directly (LoRA over ``nn.Linear`` and ``Conv1D``). The mapping is not saved with the adapter:
    call ``register`` on the config again before loading. Returns the config."""
    register_optional_layers()  # a generic lora.Linear over a bitsandbytes base reads it through the bnb reader
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"fastpeft.register: only LoraConfig is supported by PEFT's custom modules, got {type(config).__name__}"
        )
    # PEFT's default dispatcher flips fan_in_fan_out on for Conv1D; custom modules skip that step, so each base
    # type is registered only under the config that describes its weight layout correctly.
    if config.fan_in_fan_out:
        if Conv1D is None:
            raise TypeError(
                "fastpeft.register: fan_in_fan_out=True needs transformers' Conv1D, which is not importable"
            )
        mapping = {Conv1D: _layers.FusedLoraLinear}
    else:
        mapping = {nn.Linear: _layers.FusedLoraLinear}
    config._register_custom_module(mapping)
    return config
