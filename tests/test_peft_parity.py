"""fastpeft means exactly what PEFT means: outputs, gradients, API and files, with PEFT as the oracle.

Every case builds two identical models from one seed: one left to PEFT, one accelerated by fastpeft. Adapters are
initialised randomly (``init_lora_weights=False``) so that B is not zero and the adapter really contributes.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from checks import assert_close, assert_within_2x, rel_err
from model_helpers import FAMILIES, MLP, Conv1DMLP, run_transformer, tiny_transformer
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from torch import nn

import fastpeft
from fastpeft.layers import FusedIA3Linear, FusedLoraLinear

FP32_TOL = 1e-5


def randomize_ia3(model):
    """IA3 vectors start at 1; move them so the adapter matters."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.uniform_(0.5, 1.5)


def randomize_magnitude(model, seed=5):
    """DoRA's magnitude starts at the weight's norm (scale 1 everywhere): move it so a wrong norm shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.empty_like(param).uniform_(0.5, 1.5))


def twins(build, config, extra_adapters=(), seed=0, dtype=None):
    """``(peft_model, fastpeft_model)`` with the same base and adapter weights."""
    models = []
    for _ in range(2):
        torch.manual_seed(seed)
        base = build()
        if dtype is not None:
            base = base.to(dtype)
        torch.manual_seed(seed + 1)
        model = get_peft_model(base, copy.deepcopy(config))
        for name, cfg in extra_adapters:
            model.add_adapter(name, copy.deepcopy(cfg))
        if isinstance(config, IA3Config):
            torch.manual_seed(seed + 2)
            randomize_ia3(model)
        models.append(model)
    reference, fused = models
    fastpeft.accelerate(fused)
    return reference, fused


def fused_layers(model):
    return [m for m in model.modules() if isinstance(m, (FusedLoraLinear, FusedIA3Linear))]


def active_fused_layers(model):
    """Fused layers with at least one active adapter: exactly those that must call fastpeft's op."""
    def has_active(layer):
        params = layer.lora_A if isinstance(layer, FusedLoraLinear) else layer.ia3_l
        return any(name in params for name in layer.active_adapters)
    return [m for m in fused_layers(model) if has_active(m)]


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class CountFusedCalls:
    """Counts calls into fastpeft's functional ops, to prove the fused path ran (not PEFT's fallback forward)."""

    def __init__(self, monkeypatch=None):
        self.calls = 0

    def __enter__(self):
        import fastpeft.layers as layers_module

        self._module = layers_module.functional
        self._saved = (self._module.lora_linear, self._module.ia3_linear)
        self._dora = layers_module.dora
        self._saved_dora = self._dora.layer_forward

        def counted(fn):
            def wrapper(*args, **kwargs):
                self.calls += 1
                return fn(*args, **kwargs)
            return wrapper

        self._module.lora_linear, self._module.ia3_linear = map(counted, self._saved)
        self._dora.layer_forward = counted(self._saved_dora)
        return self

    def __exit__(self, *exc):
        self._module.lora_linear, self._module.ia3_linear = self._saved
        self._dora.layer_forward = self._saved_dora


def compare_forward_backward(reference, fused, make_input, run=lambda m, x: m(x), tol=FP32_TOL, label=""):
    """Eval-mode outputs, input gradient and every trainable parameter's gradient agree within ``tol``, and every
    fused layer really ran fastpeft's op."""
    reference.eval()
    fused.eval()
    x = make_input()
    outputs, grads = [], []
    for model in (reference, fused):
        xi = x.detach().clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        with CountFusedCalls() as counter:
            y = run(model, xi)
        if model is fused:
            assert counter.calls >= len(active_fused_layers(fused)) > 0, (
                f"{label}: fused path ran {counter.calls} times"
            )
        else:
            assert counter.calls == 0
        torch.manual_seed(123)
        upstream = torch.randn_like(y)
        (y * upstream).sum().backward()
        outputs.append(y.detach())
        grads.append({"input": xi.grad, **{n: p.grad for n, p in trainable(model).items()}})
    assert_close(f"{label} output", outputs[1], outputs[0], tol)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert grads[0][name] is not None, f"{label} PEFT gave no gradient for {name}"
        assert grads[1][name] is not None, f"{label} fastpeft gave no gradient for {name}"
        assert_close(f"{label} d{name}", grads[1][name], grads[0][name], tol)


LORA_CONFIGS = {
    "r8-a16": dict(r=8, lora_alpha=16),
    "r1-a1": dict(r=1, lora_alpha=1),
    "r5-rslora": dict(r=5, lora_alpha=7, use_rslora=True),
    "r4-lorabias": dict(r=4, lora_alpha=8, lora_bias=True),
    "r3-drop0.1-eval": dict(r=3, lora_alpha=6, lora_dropout=0.1),
}


@pytest.mark.parametrize("cfg_id", list(LORA_CONFIGS))
@pytest.mark.parametrize("batch_shape", [(1,), (3, 7)], ids=["M1", "3x7"])
def test_lora_mlp_matches_peft(cfg_id, batch_shape):
    config = LoraConfig(target_modules=["up", "down"], init_lora_weights=False, **LORA_CONFIGS[cfg_id])
    reference, fused = twins(MLP, config)
    assert len(fused_layers(fused)) == 4
    assert reference.state_dict().keys() == fused.state_dict().keys()
    compare_forward_backward(reference, fused, lambda: torch.randn(*batch_shape, 23), label=cfg_id)


def test_lora_conv1d_fan_in_fan_out_matches_peft():
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["fc", "proj"], fan_in_fan_out=True, init_lora_weights=False)
    reference, fused = twins(Conv1DMLP, config)
    assert len(fused_layers(fused)) == 2
    compare_forward_backward(reference, fused, lambda: torch.randn(2, 5, 19), label="conv1d")


def test_lora_mlp_no_bias_and_noncontiguous_input():
    config = LoraConfig(r=6, lora_alpha=3, target_modules=["up", "down"], init_lora_weights=False)
    reference, fused = twins(lambda: MLP(bias=False), config)
    compare_forward_backward(reference, fused, lambda: torch.randn(23, 9).t(), label="noncontig")


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_transformers_match_peft(family):
    torch.manual_seed(0)
    probe = tiny_transformer(family)
    targets = fastpeft.patching.default_lora_targets(probe)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                        fan_in_fan_out=(family == "gpt2"))
    reference, fused = twins(lambda: tiny_transformer(family), config)
    assert fused_layers(fused), f"{family}: no fused layer"
    assert not [n for n, m in fused.named_modules() if type(m).__module__.startswith("peft.tuners.lora.layer")
                and type(m).__name__ == "Linear"], f"{family}: a PEFT LoRA Linear was left unfused"
    assert reference.state_dict().keys() == fused.state_dict().keys()
    compare_forward_backward(reference, fused, lambda: torch.randn(2, 6, 32),
                             run=lambda m, x: run_transformer(m, family, x), label=family)


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5", "bert"])
def test_patch_targets_block_linears_not_head(family):
    torch.manual_seed(0)
    model = fastpeft.patch(tiny_transformer(family), r=2)
    names = [n for n, m in model.named_modules() if isinstance(m, FusedLoraLinear)]
    assert names, family
    assert not any("lm_head" in n or "pooler" in n for n in names), names
    linear_in_blocks = [n for n, m in model.get_base_model().named_modules()
                        if type(m).__name__ in ("Linear", "Conv1D") and any(p.isdigit() for p in n.split("."))
                        and not isinstance(m, FusedLoraLinear) and ".base_layer" not in n
                        and not any(k in n for k in ("lora_A", "lora_B"))]
    assert not linear_in_blocks, f"{family}: linears in blocks left without LoRA: {linear_in_blocks}"
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert not frozen, f"patch left base parameters trainable: {frozen}"


def test_multiple_active_adapters_match_peft():
    first = LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False)
    second = LoraConfig(r=2, lora_alpha=3, target_modules=["up"], init_lora_weights=False, lora_bias=True)
    reference, fused = twins(MLP, first, extra_adapters=[("other", second)])
    for model in (reference, fused):
        model.base_model.set_adapter(["default", "other"])
    compare_forward_backward(reference, fused, lambda: torch.randn(4, 23), label="two adapters")
    for model in (reference, fused):
        model.set_adapter("other")
    compare_forward_backward(reference, fused, lambda: torch.randn(4, 23), label="other only")


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merge_unmerge_disable_match_peft(use_dora):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False, use_dora=use_dora)
    reference, fused = twins(MLP, config)
    for model in (reference, fused):
        randomize_magnitude(model)
    reference.eval(), fused.eval()
    x = torch.randn(5, 23)
    with torch.no_grad():
        adapted = reference(x)
        assert_close("unmerged", fused(x), adapted, FP32_TOL)
        fused.merge_adapter()
        assert all(m.merged for m in fused_layers(fused))
        assert_close("merged", fused(x), adapted, 1e-5)
        fused.unmerge_adapter()
        assert_close("unmerged again", fused(x), adapted, 1e-5)
        with fused.disable_adapter(), reference.disable_adapter():
            base_out = reference(x)
            assert_close("disabled", fused(x), base_out, FP32_TOL)
        assert rel_err(base_out, adapted) > 1e-3, "the adapter did not change the output: test is vacuous"
        merged_model = copy.deepcopy(fused).merge_and_unload()
        assert not any(isinstance(m, FusedLoraLinear) for m in merged_model.modules())
        assert_close("merge_and_unload", merged_model(x), adapted, 1e-5)
        assert_close("unload", copy.deepcopy(fused).unload()(x), base_out, FP32_TOL)


def test_delete_and_add_adapter_keep_working():
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False)
    reference, fused = twins(MLP, config, extra_adapters=[("b", config)])
    for model in (reference, fused):
        model.set_adapter("b")
        model.delete_adapter("default")
    compare_forward_backward(reference, fused, lambda: torch.randn(3, 23), label="after delete")
    assert reference.state_dict().keys() == fused.state_dict().keys()


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_ia3_mlp_matches_peft(feedforward):
    config = IA3Config(target_modules=["up", "down"], feedforward_modules=["down"] if feedforward else [])
    reference, fused = twins(MLP, config)
    assert len(fused_layers(fused)) == 4
    compare_forward_backward(reference, fused, lambda: torch.randn(3, 5, 23), label="ia3")


def test_ia3_multiple_adapters_and_merge_match_peft():
    config = IA3Config(target_modules=["up", "down"], feedforward_modules=["down"])
    reference, fused = twins(MLP, config, extra_adapters=[("two", config)])
    randomize_ia3(reference), randomize_ia3(fused)
    fused.load_state_dict(reference.state_dict())
    for model in (reference, fused):
        model.base_model.set_adapter(["default", "two"])
    compare_forward_backward(reference, fused, lambda: torch.randn(4, 23), label="ia3 two")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = torch.randn(4, 23)
        expected = reference(x)
        fused.merge_adapter()
        assert_close("ia3 merged", fused(x), expected, 1e-5)
        fused.unmerge_adapter()
        assert_close("ia3 unmerged", fused(x), expected, 1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5", "bert"])
def test_ia3_transformers_match_peft(family):
    torch.manual_seed(0)
    patched = fastpeft.patch(tiny_transformer(family), method="ia3")
    config = patched.peft_config["default"]
    reference, fused = twins(lambda: tiny_transformer(family), config)
    assert fused_layers(fused)
    compare_forward_backward(reference, fused, lambda: torch.randn(2, 6, 32),
                             run=lambda m, x: run_transformer(m, family, x), label=f"ia3-{family}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_within_2x_of_peft(dtype):
    """bf16/fp16 base with PEFT's default fp32 adapters: fastpeft is at most 2x as far from an fp32 reference as
    PEFT in the same dtype."""
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["up", "down"], init_lora_weights=False)
    reference, fused = twins(lambda: MLP(width=64, hidden=96), config, dtype=dtype)
    torch.manual_seed(0)
    fp32_ref = get_peft_model(MLP(width=64, hidden=96), copy.deepcopy(config))
    fp32_ref.load_state_dict({k: v.float() for k, v in reference.state_dict().items()})
    compare_low_precision(reference, fused, fp32_ref, torch.randn(33, 64), dtype)


def compare_low_precision(reference, fused, fp32_ref, x, dtype):
    """Eval-mode output, input gradient and every trainable parameter's gradient of ``fused`` (in ``dtype``) within
    2x of ``reference``'s (PEFT in ``dtype``) distance to ``fp32_ref`` (PEFT in fp32). Returns the gradient names."""
    results = {}
    for label, model, xin in (("peft", reference, x.to(dtype)), ("fast", fused, x.to(dtype)), ("fp32", fp32_ref, x)):
        model.eval()
        xi = xin.clone().requires_grad_(True)
        y = model(xi)
        (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        results[label] = (y, xi.grad, {n: p.grad for n, p in trainable(model).items()})
    assert_within_2x("output", results["fast"][0].float(), results["peft"][0].float(), results["fp32"][0], 1e-3)
    assert_within_2x("dX", results["fast"][1].float(), results["peft"][1].float(), results["fp32"][1], 1e-3)
    for name in results["fp32"][2]:
        assert_within_2x(f"d{name}", results["fast"][2][name].float(), results["peft"][2][name].float(),
                         results["fp32"][2][name], 1e-3)
    return list(results["fp32"][2])


def test_training_mode_dropout_is_regenerated_in_backward():
    """In training with dropout, fastpeft's layer equals the reference spec fed the same Philox seeds, gradients
    included (PEFT's own dropout draws from a different RNG, so it cannot be the oracle here)."""
    from fastpeft.functional import draw_seeds
    from fastpeft.reference import lora_linear as reference_lora

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["up"], init_lora_weights=False)
    _, fused = twins(MLP, config)
    fused.train()
    layer = fused.base_model.model.blocks[0]["up"]
    x = torch.randn(6, 23, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    y.backward(torch.ones_like(y))
    torch.manual_seed(7)
    seeds = draw_seeds(1, [0.3], True).tolist()
    x_ref = x.detach().clone().requires_grad_(True)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    A_ref, B_ref = A.detach().clone().requires_grad_(True), B.detach().clone().requires_grad_(True)
    base = layer.base_layer
    y_ref = reference_lora(x_ref, base.weight, base.bias, [A_ref], [B_ref], [None], [2.0], [0.3], seeds)
    y_ref.backward(torch.ones_like(y_ref))
    assert_close("y", y, y_ref, FP32_TOL)
    assert_close("dX", x.grad, x_ref.grad, FP32_TOL)
    assert_close("dA", A.grad, A_ref.grad, FP32_TOL)
    assert_close("dB", B.grad, B_ref.grad, FP32_TOL)
    eval_out = layer.eval()(x.detach())
    assert rel_err(y.detach(), eval_out) > 1e-3, "dropout had no effect: test is vacuous"


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_fastpeft_save_then_peft_load_and_reverse(tmp_path, method):
    kwargs = dict(target_modules=["q_proj", "v_proj", "down_proj"])
    if method == "ia3":
        kwargs["feedforward_modules"] = ["down_proj"]
    else:
        kwargs["init_lora_weights"] = False
    torch.manual_seed(0)
    fused = fastpeft.patch(tiny_transformer("llama"), r=4, lora_alpha=8, method=method, **kwargs)
    randomize_ia3(fused)
    fused.eval()
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        expected = fused(ids).logits
    fastpeft.save_pretrained(fused, str(tmp_path / "a"))
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(tiny_transformer("llama"), str(tmp_path / "a")).eval()
    with torch.no_grad():
        assert_close("peft-loaded logits", loaded(ids).logits, expected, FP32_TOL)
    loaded.save_pretrained(str(tmp_path / "b"))
    torch.manual_seed(0)
    reloaded = fastpeft.load_adapter(tiny_transformer("llama"), str(tmp_path / "b")).eval()
    assert fused_layers(reloaded)
    with torch.no_grad():
        assert_close("fastpeft-loaded logits", reloaded(ids).logits, expected, FP32_TOL)
    assert fused.state_dict().keys() == reloaded.state_dict().keys()


def test_save_named_adapter_goes_to_path(tmp_path):
    torch.manual_seed(0)
    model = fastpeft.patch(MLP(), r=2, target_modules=["up"], adapter_name="mine", init_lora_weights=False)
    fastpeft.save_pretrained(model, str(tmp_path))
    assert (tmp_path / "mine" / "adapter_model.safetensors").exists()
    fastpeft.save_pretrained(model, str(tmp_path / "single"), adapter_name="mine")
    assert (tmp_path / "single" / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        fastpeft.save_pretrained(model, str(tmp_path / "x"), adapter_name="nope")


def test_accelerate_leaves_unsupported_layers_and_warns_once():
    def conv_net():  # LoRA on Conv2d has no fused twin
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))

    config = LoraConfig(r=2, target_modules=["0", "2"])
    torch.manual_seed(0)
    model = get_peft_model(conv_net(), config)
    with pytest.warns(UserWarning, match="keep PEFT's implementation") as record:
        fastpeft.accelerate(model)
    assert len([w for w in record if "fastpeft" in str(w.message)]) == 1
    assert not fused_layers(model)
    torch.manual_seed(0)
    model = get_peft_model(conv_net(), config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="strict=True"):
        fastpeft.accelerate(model, strict=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not fused_layers(model)


def test_accelerate_keeps_embedding_lora_unfused_and_rest_fused():
    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 23)
            self.mlp = MLP()

        def forward(self, ids):
            return self.mlp(self.emb(ids))

    torch.manual_seed(0)
    model = get_peft_model(WithEmbedding(), LoraConfig(r=2, target_modules=["emb", "up"]))
    with pytest.warns(UserWarning, match="emb"):
        fastpeft.accelerate(model)
    assert len(fused_layers(model)) == 2


def test_bad_arguments_raise_clear_errors_and_leave_model_untouched():
    torch.manual_seed(0)
    model = MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="r must be a positive integer"):
        fastpeft.patch(model, r=0)
    with pytest.raises(ValueError, match=r"'upp' \(close: up"):
        fastpeft.patch(model, r=2, target_modules=["upp", "down"])
    with pytest.raises(ValueError, match="method"):
        fastpeft.patch(model, r=2, method="prefix")
    assert not any(type(m).__module__.startswith("peft") for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(TypeError, match="no PEFT adapter layers"):
        fastpeft.accelerate(model)


def test_wrong_input_dtype_device_shape_name_the_module():
    torch.manual_seed(0)
    model = fastpeft.patch(MLP(), r=2, target_modules=["up"])
    with pytest.raises(TypeError, match=r"blocks\.0\.up.*dtype torch\.float64"):
        model(torch.randn(2, 23, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"blocks\.0\.up.*22 features"):
        model(torch.randn(2, 22))


def test_scaling_follows_rslora():
    torch.manual_seed(0)
    model = fastpeft.patch(MLP(), r=4, lora_alpha=8, target_modules=["up"], use_rslora=True)
    layer = next(m for m in model.modules() if isinstance(m, FusedLoraLinear))
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))


def _saved_tensors(run):
    """Tensors autograd saves for backward while ``run()`` executes."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, saved


def test_dropout_saves_no_copy_of_the_input():
    """With dropout in training, nothing of X's size is saved beyond X itself (and frozen parameters, which cost no
    activation memory). PEFT, the control, saves drop(X): that shows the check can fail."""
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["up"], init_lora_weights=False)
    reference, fused = twins(lambda: MLP(width=96, hidden=40), config)
    x = torch.randn(64, 96, requires_grad=True)

    def big_copies(model):
        model.train()
        layer = model.base_model.model.blocks[0]["up"]
        params = {p.data_ptr() for p in layer.parameters()}
        _, saved = _saved_tensors(lambda: layer(x))
        return [tuple(t.shape) for t in saved
                if t.numel() >= x.numel() and t.data_ptr() != x.data_ptr() and t.data_ptr() not in params]

    assert big_copies(reference), "control: PEFT was expected to save drop(x)"
    assert big_copies(fused) == [], "fastpeft saved a tensor of X's size besides X"


def test_frozen_adapter_saves_no_input():
    """When no adapter weight needs a gradient (inference with grad on the input), X itself is not kept for dA."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["up"], init_lora_weights=False)
    _, fused = twins(MLP, config)
    layer = fused.base_model.model.blocks[0]["up"]
    for p in layer.parameters():
        p.requires_grad_(False)
    x = torch.randn(8, 23, requires_grad=True)
    _, saved = _saved_tensors(lambda: layer(x))
    assert not any(t.data_ptr() == x.data_ptr() for t in saved)


OPCHECK_CASES = {
    "one-adapter": dict(n=1, biases=(False,), p=(0.0,)),
    "two-adapters-bias-drop": dict(n=2, biases=(False, True), p=(0.1, 0.0)),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_lora_ops_pass_opcheck(case):
    spec = OPCHECK_CASES[case]
    torch.manual_seed(0)
    K, N, M = 13, 11, 5
    x = torch.randn(M, K, requires_grad=True)
    W, b = torch.randn(N, K), torch.randn(N)
    ranks = [3, 2][: spec["n"]]
    As = [torch.randn(r, K, requires_grad=True) for r in ranks]
    Bs = [torch.randn(N, r, requires_grad=True) for r in ranks]
    biases = [torch.randn(N, requires_grad=True) if has else torch.empty(0) for has in spec["biases"]]
    seeds = torch.tensor([11, 12][: spec["n"]])
    scaling = [0.5, 2.0][: spec["n"]]
    torch.library.opcheck(torch.ops.fastpeft.lora_linear.default,
                          (x, W, b, As, Bs, biases, scaling, list(spec["p"]), seeds))
    y = torch.randn(M, N)
    xa = [torch.randn(M, r) for r in ranks]
    # the backward op is not itself differentiable (no double backward), so its inputs carry no grad
    torch.library.opcheck(torch.ops.fastpeft.lora_linear_backward.default,
                          (y, x.detach(), W, [a.detach() for a in As], [b_.detach() for b_ in Bs], xa, scaling,
                           list(spec["p"]), seeds, True, True, any(spec["biases"])))


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "out"])
def test_ia3_ops_pass_opcheck(feedforward):
    torch.manual_seed(0)
    K, N, M = 13, 11, 5
    x, W, b = torch.randn(M, K, requires_grad=True), torch.randn(N, K), torch.randn(N)
    scale = torch.randn(K if feedforward else N, requires_grad=True)
    torch.library.opcheck(torch.ops.fastpeft.ia3_linear.default, (x, W, b, scale, feedforward))
    torch.library.opcheck(torch.ops.fastpeft.ia3_linear_backward.default,
                          (torch.randn(M, N), x.detach(), W, b, scale.detach(), feedforward, True))


def test_trainable_base_gets_the_same_gradients_as_peft():
    """A user may unfreeze a base layer; its weight and bias must then get PEFT's gradients, not none."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False)
    reference, fused = twins(MLP, config)
    for model in (reference, fused):
        for name, param in model.named_parameters():
            if "blocks.0.up.base_layer" in name:
                param.requires_grad_(True)
    compare_forward_backward(reference, fused, lambda: torch.randn(5, 23), label="trainable base")


def test_patch_takes_a_peft_config_like_get_peft_model():
    """``patch(model, LoraConfig(...))`` builds what ``get_peft_model`` builds from that config, fused; a config with
    keyword arguments beside it is refused before the model is touched."""
    config = dict(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False)
    torch.manual_seed(0)
    fused = fastpeft.patch(MLP(), LoraConfig(**config))
    torch.manual_seed(0)
    reference = get_peft_model(MLP(), LoraConfig(**config))
    assert fused.peft_config["default"].r == 4 and fused.peft_config["default"].lora_alpha == 8
    assert sum(isinstance(m, FusedLoraLinear) for m in fused.modules()) == 4
    compare_forward_backward(reference, fused, lambda: torch.randn(3, 23), label="patch(config)")
    ia3 = fastpeft.patch(MLP(), IA3Config(target_modules=["up"], feedforward_modules=[]))
    assert type(ia3.peft_config["default"]).__name__ == "IA3Config"
    model = MLP()
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match=r"keyword arguments \['lora_dropout'\]; put them in the config"):
        fastpeft.patch(model, LoraConfig(**config), lora_dropout=0.1)
    with pytest.raises(ValueError, match="match no module"):
        fastpeft.patch(model, LoraConfig(r=2, target_modules=["nope"]))
    assert [n for n, _ in model.named_modules()] == before, "a refused patch must leave the model as it was"


def test_patching_twice_says_what_to_do_and_a_new_name_adds_an_adapter():
    torch.manual_seed(0)
    model = fastpeft.patch(tiny_transformer("llama"), r=2)
    targets = sorted(model.peft_config["default"].target_modules)
    with pytest.raises(ValueError, match="already has an adapter named 'default'.*adapter_name.*accelerate"):
        fastpeft.patch(model, r=2)
    fastpeft.patch(model, r=3, adapter_name="second")
    assert sorted(model.peft_config["second"].target_modules) == targets, "the second adapter targets the first's"
    layers = [m for m in model.modules() if isinstance(m, FusedLoraLinear)]
    assert layers and all(set(m.lora_A) == {"default", "second"} for m in layers)


def test_patch_infers_task_type_so_a_classifier_head_is_trained_and_saved(tmp_path):
    """A ``...ForSequenceClassification`` patched without ``task_type`` trains and saves its head as PEFT does with
    ``task_type="SEQ_CLS"``; a config without it gets a warning that the head stays frozen."""
    import transformers as tf

    config = tf.BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64, vocab_size=97, num_labels=3)
    torch.manual_seed(0)
    model = fastpeft.patch(tf.BertForSequenceClassification(config), r=4)
    assert model.peft_config["default"].task_type == "SEQ_CLS"
    head = [n for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    assert head, "the classifier head must be trainable"
    ids = torch.randint(0, 97, (2, 5))
    out = model(input_ids=ids, labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in head)
    fastpeft.save_pretrained(model, str(tmp_path))
    from safetensors.torch import load_file

    assert any("classifier" in key for key in load_file(str(tmp_path / "adapter_model.safetensors")))
    assert fastpeft.patching.infer_task_type(tiny_transformer("llama")) == "CAUSAL_LM"
    assert fastpeft.patching.infer_task_type(tiny_transformer("t5")) == "SEQ_2_SEQ_LM"
    assert fastpeft.patching.infer_task_type(tiny_transformer("bert")) is None
    with pytest.warns(UserWarning, match="SEQ_CLS model but the config has no task_type"):
        fastpeft.patch(tf.BertForSequenceClassification(config), LoraConfig(r=2, target_modules=["query"]))


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_patch_on_gpt2_sets_fan_in_fan_out_without_peft_warning(method):
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fastpeft.patch(tiny_transformer("gpt2"), r=4, method=method)
    assert model.peft_config["default"].fan_in_fan_out is True
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)], [str(w.message) for w in caught]
    assert fused_layers(model)
    # an explicit choice is the user's: PEFT's own warning and switch then apply
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        fastpeft.patch(tiny_transformer("gpt2"), r=4, method=method, fan_in_fan_out=False)


def test_patch_method_dora_points_at_use_dora():
    model = MLP()
    with pytest.raises(ValueError, match="use_dora=True"):
        fastpeft.patch(model, r=2, method="dora", target_modules=["up"])


class _Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


def test_parametrized_and_replaced_adapter_weights_are_read_as_peft_reads_them():
    """The layers read adapter and base parameters through the modules' parameter dicts; a weight held elsewhere (a
    ``torch.nn.utils.parametrize`` parametrization, which removes it from ``_parameters``) or a parameter replaced
    by assignment must still be the one PEFT's forward uses."""
    from torch.nn.utils import parametrize

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False)
    reference, fused = twins(MLP, config)
    for model in (reference, fused):
        lora_layers = [m for name, m in model.named_modules() if name.endswith(("up", "down")) and hasattr(m, "lora_A")]
        assert len(lora_layers) == 4
        for layer in lora_layers[:2]:
            parametrize.register_parametrization(layer.lora_A["default"], "weight", _Doubled())
        for layer in lora_layers[2:]:
            torch.manual_seed(9)
            layer.lora_B["default"].weight = nn.Parameter(torch.randn_like(layer.lora_B["default"].weight))
    compare_forward_backward(reference, fused, lambda: torch.randn(5, 23), label="parametrized")
