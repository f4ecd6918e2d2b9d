"""``fastpeft.register(config)``: PEFT's ``get_peft_model`` builds fastpeft's fused layers directly through PEFT's
custom-module mechanism, and the model computes what plain PEFT computes."""

from __future__ import annotations

import copy

import pytest
import torch
from checks import assert_close
from model_helpers import MLP, Conv1DMLP
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.layer import LoraLayer

import fastpeft
from fastpeft.layers import FusedLoraLinear


def _outputs_and_grads(model, x):
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(torch.ones_like(y) + torch.arange(y.shape[-1], dtype=y.dtype))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("kwargs", [dict(), dict(use_rslora=True, lora_bias=True)], ids=["plain", "rslora+bias"])
def test_register_builds_fused_layers_matching_peft(kwargs):
    torch.manual_seed(0)
    base = MLP()
    config = dict(r=4, lora_alpha=12, target_modules=["up", "down"], **kwargs)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    fused_config = fastpeft.register(LoraConfig(**config))
    fused = get_peft_model(copy.deepcopy(base), fused_config)

    fused_layers = [m for m in fused.modules() if isinstance(m, LoraLayer)]
    assert len(fused_layers) == 4 and all(type(m) is FusedLoraLinear for m in fused_layers)
    assert all(type(m) is PeftLoraLinear for m in peft_model.modules() if isinstance(m, LoraLayer))
    # same initialisation stream is not guaranteed across classes: copy PEFT's adapter weights over
    with torch.no_grad():
        for (name, p), (name2, q) in zip(peft_model.named_parameters(), fused.named_parameters()):
            assert name == name2, "state_dict keys differ from PEFT's"
            if p.requires_grad:
                p.normal_(std=0.3)
                q.copy_(p)
    assert peft_model.state_dict().keys() == fused.state_dict().keys()
    x = torch.randn(3, 5, 23)
    y_ref, dx_ref, g_ref = _outputs_and_grads(peft_model, x)
    y, dx, g = _outputs_and_grads(fused, x)
    assert_close("y", y, y_ref, 1e-5)
    assert_close("dX", dx, dx_ref, 1e-5)
    assert g.keys() == g_ref.keys() and len(g) == (12 if kwargs else 8)
    for name in g_ref:
        assert_close(name, g[name], g_ref[name], 1e-5)


def test_register_conv1d_fan_in_fan_out_matches_peft():
    torch.manual_seed(0)
    base = Conv1DMLP()
    config = dict(r=3, lora_alpha=6, target_modules=["fc", "proj"], fan_in_fan_out=True)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    fused = get_peft_model(copy.deepcopy(base), fastpeft.register(LoraConfig(**config)))
    assert sum(type(m) is FusedLoraLinear for m in fused.modules()) == 2
    fused.load_state_dict(peft_model.state_dict())
    with torch.no_grad():
        for p, q in zip(peft_model.parameters(), fused.parameters()):
            if p.requires_grad:
                p.normal_(std=0.3)
                q.copy_(p)
    x = torch.randn(4, 19)
    y_ref, dx_ref, g_ref = _outputs_and_grads(peft_model, x)
    y, dx, g = _outputs_and_grads(fused, x)
    assert_close("y", y, y_ref, 1e-5)
    assert_close("dX", dx, dx_ref, 1e-5)
    for name in g_ref:
        assert_close(name, g[name], g_ref[name], 1e-5)


def test_register_save_and_load_round_trip(tmp_path):
    """A registered model saves in PEFT's format; reloading with a registered config gives fused layers again and the
    same output."""
    torch.manual_seed(0)
    base = MLP()
    fused = get_peft_model(copy.deepcopy(base), fastpeft.register(LoraConfig(r=2, target_modules=["up"])))
    with torch.no_grad():
        for n, p in fused.named_parameters():
            if "lora_B" in n:
                p.normal_()
    fused.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    x = torch.randn(6, 23)
    fused.eval()
    with torch.no_grad():
        expected = fused(x)
        assert_close("y (PEFT-loaded)", loaded(x), expected, 1e-6)  # PEFT's unfused math: rounding may differ
    reloaded = fastpeft.load_adapter(copy.deepcopy(base), str(tmp_path))
    assert sum(type(m) is FusedLoraLinear for m in reloaded.modules()) == 2
    with torch.no_grad():
        assert torch.equal(reloaded(x), expected)


def test_register_rejects_other_configs():
    with pytest.raises(TypeError, match="only LoraConfig"):
        fastpeft.register(IA3Config(target_modules=["up"]))
