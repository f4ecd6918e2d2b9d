"""A base weight changed in place between a forward and its backward: the fused layers raise, as PEFT's graph does
(autograd's version check of the weight it saved), instead of returning gradients computed from the changed weight.
Every way a fused call keeps the frozen weight for its backward outside ``save_for_backward`` is covered: LoRA's
full path, its settled call, the settled call's C++ autograd node, IA3 with either scaling, DoRA with and without
dropout."""

from __future__ import annotations

import pytest
import torch
from model_helpers import MLP
from peft import IA3Config, LoraConfig
from test_peft_parity import twins
from test_settled_training import _count_native, step

from fastpeft import routing as routes

CHANGED = "modified by an inplace operation|modified in place after the forward"

CONFIGS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False),
    "lora-dropout": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False,
                                       lora_dropout=0.2),
    "ia3-feedforward": lambda: IA3Config(target_modules=["up", "down"], feedforward_modules=["down"]),
    "ia3-output": lambda: IA3Config(target_modules=["up", "down"], feedforward_modules=[]),
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False,
                               use_dora=True),
    "dora-dropout": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False,
                                       use_dora=True, lora_dropout=0.2),
}


def base_weights(model) -> list[torch.Tensor]:
    return [p for name, p in model.named_parameters() if name.endswith("base_layer.weight")]


def backward_after_a_change(model, x, change: bool):
    """Forward, then (with ``change``) every base weight changed in place, then the backward."""
    y = model(x)
    if change:
        with torch.no_grad():
            for weight in base_weights(model):
                weight.mul_(1.5)
    y.backward(torch.ones_like(y))


@pytest.mark.parametrize("calls", [1, 3], ids=["first call", "settled"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_a_changed_base_weight_raises_as_in_peft(final_routes, config, calls):
    reference, fused = twins(MLP, CONFIGS[config]())
    for model in (reference, fused):
        model.train()
        assert base_weights(model), "nothing to change"
        x = torch.randn(4, 23, requires_grad=True)
        for _ in range(calls - 1):  # earlier steps: a repeated call runs settled
            backward_after_a_change(model, x, change=False)
        with pytest.raises(RuntimeError, match=CHANGED):
            backward_after_a_change(model, x, change=True)
    # unchanged, the same steps go through
    backward_after_a_change(fused, torch.randn(4, 23, requires_grad=True), change=False)


@pytest.mark.parametrize("backward", ["small", "fused"])
def test_a_changed_base_weight_raises_in_the_cpp_training_node(final_routes, monkeypatch, backward):
    """The settled call's C++ autograd node keeps the weight outside its saved variables too."""
    routes.set_route("lora_forward", "gemv")
    routes.set_route("lora_backward", backward)
    _, fused = twins(MLP, CONFIGS["lora"]())
    fused.train()
    x, dy = torch.randn(1, 23, requires_grad=True), torch.randn(1, 11)
    for _ in range(2):
        step(fused, x, dy)
    native = _count_native(monkeypatch)
    with pytest.raises(RuntimeError, match=CHANGED):
        backward_after_a_change(fused, x, change=True)
    assert native, "the call did not run in C++"
