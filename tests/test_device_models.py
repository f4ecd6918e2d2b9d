"""Whole PEFT models accelerated by fastpeft against PEFT itself on the same device: a two-layer LLaMA with LoRA,
DoRA or IA3 in fp32 (outputs, the input gradient and every adapter gradient), and an MLP with PEFT's fp32 adapters
over a bf16 base (the 2x rule against PEFT in fp32). The ``cuda`` cases are marked ``gpu`` (collected everywhere,
run where a GPU exists) and take the automatic backend there (Triton); the ``cpu`` twin of each case runs
everywhere, so the comparison itself is exercised in CI."""

from __future__ import annotations

import copy

import pytest
import torch
from checks import assert_within_2x
from model_helpers import MLP, run_transformer, tiny_transformer
from peft import IA3Config, LoraConfig, get_peft_model
from test_peft_parity import FP32_TOL, compare_forward_backward, trainable, twins

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
CONFIGS = {
    "lora": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                       init_lora_weights=False),
    "dora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "gate_proj"], use_dora=True,
                       init_lora_weights=False),
    "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
}


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (none here)")
    return torch.device(name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", list(CONFIGS))
def test_llama_fp32_matches_peft_on_device(device, method):
    dev = _device(device)
    reference, fused = (m.to(dev) for m in twins(lambda: tiny_transformer("llama"), CONFIGS[method], seed=7))
    generator = torch.Generator().manual_seed(11)
    compare_forward_backward(reference, fused, lambda: torch.randn(2, 5, 32, generator=generator).to(dev),
                             run=lambda m, x: run_transformer(m, "llama", x), tol=FP32_TOL,
                             label=f"{method}-llama-{device}")


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_base_with_fp32_adapters_within_2x_of_peft_on_device(device):
    """PEFT keeps the adapters in fp32 over a bf16 base: fastpeft's output and gradients are at most twice as far
    from PEFT in fp32 as PEFT in bf16 is (floor 1e-3), on fresh random data with an odd number of rows."""
    dev = _device(device)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["up", "down"], init_lora_weights=False)
    reference, fused = (m.to(dev) for m in twins(lambda: MLP(width=64, hidden=96), config, seed=3,
                                                     dtype=torch.bfloat16))
    torch.manual_seed(3)
    exact = get_peft_model(MLP(width=64, hidden=96), copy.deepcopy(config)).to(dev)
    exact.load_state_dict({k: v.float() for k, v in reference.state_dict().items()})
    x = torch.randn(37, 64, generator=torch.Generator().manual_seed(5)).to(dev)
    results = {}
    for label, model, dtype in (("peft", reference, torch.bfloat16), ("fast", fused, torch.bfloat16),
                                ("fp32", exact, torch.float32)):
        model.eval()
        xi = x.to(dtype).requires_grad_(True)
        y = model(xi)
        (y.float() * torch.linspace(-1, 1, y.shape[-1], device=dev)).sum().backward()
        results[label] = (y.float(), xi.grad.float(), {n: p.grad.float() for n, p in trainable(model).items()})
    for i, name in ((0, "output"), (1, "dX")):
        assert_within_2x(f"{device} {name}", results["fast"][i], results["peft"][i], results["fp32"][i], 1e-3)
    assert results["fp32"][2], "no trainable parameters"
    for name, grad in results["fp32"][2].items():
        assert_within_2x(f"{device} d{name}", results["fast"][2][name], results["peft"][2][name], grad, 1e-3)
