"""``torch.func`` transforms over fused layers (per-sample gradients, functional training loops): ``grad``, ``vmap``
and both together give PEFT's values, after the layers have kept calls resolved (evaluation calls, their C++
serving, training calls): under a transform every call runs the executable spec, whose torch operations the
transforms know, never the kernels (their operands are then wrappers without storage) or the eager Functions
(which have no functorch rules)."""

from __future__ import annotations

import pytest
import torch
from checks import assert_close
from model_helpers import MLP
from peft import IA3Config, LoraConfig
from test_peft_parity import FP32_TOL, twins

CONFIGS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False),
    "lora-two-adapters-dropout": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"],
                                                    init_lora_weights=False, lora_dropout=0.3),
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False,
                               use_dora=True),
    "ia3-feedforward": lambda: IA3Config(target_modules=["up", "down"], feedforward_modules=["down"]),
    "ia3-output": lambda: IA3Config(target_modules=["up", "down"], feedforward_modules=[]),
}


def build(config: str):
    extra = [("other", CONFIGS[config]())] if config == "lora-two-adapters-dropout" else ()
    reference, fused = twins(MLP, CONFIGS[config](), extra_adapters=extra)
    if extra:
        for model in (reference, fused):
            model.base_model.set_adapter(["default", "other"])
    return reference, fused


def settle(model, x):
    """Repeated calls of each kind, so that the fused layers keep them resolved (and C++ serves the evaluation
    ones): the transformed calls below must not take those."""
    model.train()
    for _ in range(3):
        model(x.clone().requires_grad_(True)).sum().backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        for _ in range(3):
            model(x[:1])
            model(x)


def trainable(model) -> dict:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def loss_of(model):
    def loss(params, x):
        return torch.func.functional_call(model, params, (x,)).square().sum()
    return loss


@pytest.mark.parametrize("config", list(CONFIGS))
def test_vmap_grad_and_per_sample_grads_match_peft(final_routes, config):
    reference, fused = build(config)
    x = torch.randn(5, 23)
    for model in (reference, fused):
        settle(model, x)
    results = {}
    for label, model in (("peft", reference), ("fastpeft", fused)):
        model.eval()
        with torch.no_grad():
            y = torch.func.vmap(lambda row, model=model: model(row[None]))(x)
        params = trainable(model)
        assert params, "nothing to differentiate"
        loss = loss_of(model)
        grads = torch.func.grad(loss)(params, x)
        per_sample = torch.func.vmap(lambda row, loss=loss, params=params: torch.func.grad(loss)(params, row[None]))(x)
        results[label] = (y, grads, per_sample)
    (want_y, want_grads, want_per), (y, grads, per) = results["peft"], results["fastpeft"]
    assert_close(f"{config}: vmapped y", y, want_y, FP32_TOL)
    assert grads.keys() == want_grads.keys() and per.keys() == want_per.keys()
    for name, want in want_grads.items():
        assert_close(f"{config}: grad {name}", grads[name], want, FP32_TOL)
        assert per[name].shape == (5, *want.shape)
        assert_close(f"{config}: per-sample grads {name}", per[name], want_per[name], FP32_TOL)
