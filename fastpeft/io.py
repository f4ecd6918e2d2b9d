"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

``load_adapter`` reads and checks everything (config, every tensor's presence, shape and dtype against the model)
before it touches the model, so a bad file raises a clear error and leaves the model exactly as it was.
``save_pretrained`` replaces the adapter directory as a whole (``fastpeft._atomic.replace_directory``), so a crash
mid-save leaves the previous adapter as it was.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from peft import PeftConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from torch import nn

from ._atomic import replace_directory
from .patching import accelerate

CONFIG_NAME = "adapter_config.json"
# PEFT's model card: updated in place by PeftModel.save_pretrained, so the save starts from the existing one.
_MODEL_CARD = "README.md"
_ADAPTER_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_magnitude_vector", ".ia3_l")


def save_pretrained(model: PeftModel, path: str, adapter_name: Optional[str] = None) -> None:
    """Write the adapter(s) of a PEFT model with fused layers in PEFT's format (``PeftModel.from_pretrained`` reads
    it). ``adapter_name=None`` saves every adapter (PEFT puts non-default ones in sub-folders); a name saves only that
    one, at ``path`` itself.

    The save is atomic as a whole: the files are written into a temporary directory beside ``path`` and swapped in at
    the end, so a crash, a full disk or an error at any point leaves the previous contents of ``path`` byte for byte,
    and a reader sees the old set of files or the new one, never a mix (where ``path`` cannot be swapped, a mount point
    or a read-only parent, its files are replaced one by one, each atomically, with a warning). Files in ``path`` that
    the save does not write (a README, tokenizer files, other folders) are kept, as an in-place save would keep them;
    PEFT updates an existing ``README.md`` model card as it does in place."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"fastpeft.save_pretrained: expected a peft.PeftModel, got {type(model).__name__}")
    if os.path.isfile(path):
        raise ValueError(f"fastpeft.save_pretrained: {path!r} is a file; the adapter goes into a directory")
    if adapter_name is None:
        replace_directory(path, model.save_pretrained, seed=(_MODEL_CARD,))
        return
    if adapter_name not in model.peft_config:
        raise ValueError(
            f"fastpeft.save_pretrained: no adapter named {adapter_name!r}; the model has {sorted(model.peft_config)}"
        )
    # PEFT writes a non-default adapter into path/<name>; a single named adapter belongs at path itself.
    config = model.peft_config[adapter_name]
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(model, adapter_name=adapter_name)

    def write(directory: str) -> None:
        save_file({k: v.detach().contiguous() for k, v in state.items()},
                  os.path.join(directory, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        inference_mode = config.inference_mode
        config.inference_mode = True
        try:
            config.save_pretrained(directory)
        finally:
            config.inference_mode = inference_mode

    replace_directory(path, write)


def _read_config(path: str) -> PeftConfig:
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"fastpeft.load_adapter: {path!r} is not a directory")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"fastpeft.load_adapter: {config_file!r} is missing")
    try:
        with open(config_file) as handle:
            raw = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"fastpeft.load_adapter: {config_file!r} is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or "peft_type" not in raw:
        raise ValueError(f"fastpeft.load_adapter: {config_file!r} has no 'peft_type'; it is not a PEFT adapter config")
    try:
        return PeftConfig.from_pretrained(path)
    except Exception as exc:
        raise ValueError(f"fastpeft.load_adapter: {config_file!r} is malformed ({type(exc).__name__}: {exc})") from exc


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    st_file = os.path.join(path, SAFETENSORS_WEIGHTS_NAME)
    if os.path.isfile(st_file):
        from safetensors.torch import load_file

        try:
            return load_file(st_file)
        except Exception as exc:
            raise ValueError(
                f"fastpeft.load_adapter: {st_file!r} is truncated or corrupted ({type(exc).__name__}: {exc})"
            ) from exc
    bin_file = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(bin_file):
        try:
            return torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(
                f"fastpeft.load_adapter: {bin_file!r} cannot be read ({type(exc).__name__}: {exc})"
            ) from exc
    raise FileNotFoundError(f"fastpeft.load_adapter: no {SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME} in {path!r}")


def _features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a base or PEFT layer."""
    if isinstance(module, BaseTunerLayer):
        return module.in_features, module.out_features
    from peft.tuners.tuners_utils import _get_in_out_features

    return _get_in_out_features(module)


def _expected_shapes(config: PeftConfig, module: nn.Module, module_key: str, is_feedforward) -> dict[str, tuple]:
    in_f, out_f = _features(module)
    if in_f is None:
        return {}
    peft_type = str(config.peft_type).split(".")[-1].upper()
    if peft_type == "LORA":
        r = config.r
        for pattern, value in (config.rank_pattern or {}).items():
            if module_key == pattern or module_key.endswith("." + pattern):
                r = value
        return {".lora_A.weight": (r, in_f), ".lora_B.weight": (out_f, r), ".lora_B.bias": (out_f,),
                ".lora_magnitude_vector": (out_f,)}  # DoRA's magnitude, one per output feature
    if peft_type == "IA3":
        return {".ia3_l": (1, in_f) if is_feedforward(module_key) else (out_f, 1)}
    return {}


def check_adapter_fits(model: nn.Module, config: PeftConfig, tensors: dict[str, torch.Tensor], path: str) -> None:
    """Raise ``ValueError`` naming the first tensor that has no module to go to or the wrong shape."""
    root = model.get_base_model() if isinstance(model, PeftModel) else model
    modules = dict(root.named_modules())
    feedforward = getattr(config, "feedforward_modules", None) or []

    def is_feedforward(key):
        if isinstance(feedforward, str):
            import re

            return re.fullmatch(feedforward, key) is not None
        return any(key == f or key.endswith("." + f) for f in feedforward)

    for name, tensor in tensors.items():
        suffix = next((s for s in _ADAPTER_SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            continue  # other PEFT tensors (modules_to_save, embeddings) are checked by PEFT itself
        key = name[: -len(suffix)]
        key = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
        module = modules.get(key)
        if module is None:
            raise ValueError(
                f"fastpeft.load_adapter: tensor {name!r} in {path!r} belongs to module {key!r}, which "
                f"{type(root).__name__} does not have (is the adapter for another model?)"
            )
        expected = _expected_shapes(config, module, key, is_feedforward).get(suffix)
        if expected is not None and tuple(tensor.shape) != expected:
            raise ValueError(
                f"fastpeft.load_adapter: tensor {name!r} has shape {tuple(tensor.shape)}, but module {key!r} needs "
                f"{expected}"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"fastpeft.load_adapter: tensor {name!r} has non-float dtype {tensor.dtype}")
    peft_type = str(config.peft_type).split(".")[-1].upper()
    required = {"LORA": (".lora_A.weight", ".lora_B.weight"), "IA3": (".ia3_l",)}.get(peft_type, ())
    layers_in_file = {n[: -len(s)] for n in tensors for s in required if n.endswith(s)}
    for layer in sorted(layers_in_file):
        for suffix in required:
            if layer + suffix not in tensors:
                raise ValueError(f"fastpeft.load_adapter: tensor {layer + suffix!r} is missing from {path!r}")
    if required and not layers_in_file:
        raise ValueError(f"fastpeft.load_adapter: {path!r} holds no {peft_type} adapter tensors")


def load_adapter(model: nn.Module, path: str, adapter_name: str = "default", is_trainable: bool = False) -> PeftModel:
    """Load a PEFT adapter directory into ``model`` (a plain model or a ``PeftModel``) with fused layers.

    Everything is checked before the model changes; on any error the model is left as it was. Returns the
    ``PeftModel`` (for a plain model, a new wrapper around it, as ``PeftModel.from_pretrained`` does).
    """
    config = _read_config(path)
    tensors = _read_tensors(path)
    check_adapter_fits(model, config, tensors, path)
    if isinstance(model, PeftModel):
        if adapter_name in model.peft_config:
            raise ValueError(f"fastpeft.load_adapter: the model already has an adapter named {adapter_name!r}")
        try:
            model.load_adapter(path, adapter_name=adapter_name, is_trainable=is_trainable)
        except Exception:
            if adapter_name in model.peft_config:
                model.delete_adapter(adapter_name)
            raise
        peft_model = model
    else:
        peft_model = PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=is_trainable)
    accelerate(peft_model)
    return peft_model
