"""PEFT LoRA/IA3 over bitsandbytes NF4/FP4/double-quant/int8 bases, after ``fastpeft.accelerate``.

The oracle is never bitsandbytes' matmul (bitsandbytes 0.50.2's CPU matmul gives wrong input gradients): it is a float32
computation from the dequantized weights (the tests' own 4-bit decoder ``quant_oracle.dequantize_4bit``, since
bitsandbytes' native CPU decode is wrong on AVX-512 hosts when a block straddles two rows; ``int8 * SCB / 127``) and
fp32 copies of the adapter parameters, differentiated by torch autograd. Checked: outputs, adapter gradients, input
gradients, that no dequantized weight is saved for backward, PEFT save/load round trip, merge/unmerge.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from checks import CallCounter, assert_close, rel_err  # noqa: E402
from quant_oracle import dequantize_4bit  # noqa: E402

import fastpeft  # noqa: E402
import fastpeft.layers_bnb as layers_bnb  # noqa: E402
import fastpeft.quant_merge as quant_merge  # noqa: E402
from fastpeft.layers import FusedLoraLinear  # noqa: E402
from fastpeft.quant import quantized_weight_of  # noqa: E402

K, H = 64, 96
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
BASES = [
    pytest.param(("nf4", False), id="nf4"),
    pytest.param(("fp4", False), id="fp4"),
    pytest.param(("nf4", True), id="nf4-nested=T"),
    pytest.param(("int8", False), id="int8"),
]


def _quant_linear(w: torch.Tensor, b: torch.Tensor, kind: str, nested: bool, dtype: torch.dtype) -> nn.Module:
    """A fresh, quantized bitsandbytes linear holding ``w`` (N, K) and ``b`` (never deep-copied)."""
    N, Kin = w.shape
    if kind == "int8":
        lin = bnb.nn.Linear8bitLt(Kin, N, bias=True, has_fp16_weights=False)
        lin.weight = bnb.nn.Int8Params(w.half(), requires_grad=False, has_fp16_weights=False)
        lin.bias = nn.Parameter(b.to(dtype))
        return lin.to("cpu")
    lin = bnb.nn.Linear4bit(Kin, N, bias=True, compute_dtype=dtype, compress_statistics=nested, quant_type=kind)
    lin.weight = bnb.nn.Params4bit(w.to(dtype), requires_grad=False, compress_statistics=nested, quant_type=kind,
                                   blocksize=64)
    lin.bias = nn.Parameter(b.to(dtype))
    return lin.to("cpu")


class MLP(nn.Module):
    def __init__(self, kind, nested, dtype, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.up = _quant_linear(torch.randn(H, K, generator=g) * 0.1, torch.randn(H, generator=g) * 0.1, kind,
                                nested, dtype)
        self.down = _quant_linear(torch.randn(K, H, generator=g) * 0.1, torch.randn(K, generator=g) * 0.1, kind,
                                  nested, dtype)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _dense(module) -> torch.Tensor:
    """fp32 dequantized base weight from an independent decoder (bitsandbytes' int8 one, the tests' own for 4-bit)."""
    w = module.weight
    if w.dtype == torch.int8:
        return bnb.functional.int8_vectorwise_dequant(w.data, w.SCB).float()
    return dequantize_4bit(w.data, w.quant_state).float()


def _mark_quantized(model, kind):
    """What transformers sets on a bitsandbytes-quantized model; PEFT then builds its bnb layer classes."""
    if kind == "int8":
        model.is_loaded_in_8bit = True
    else:
        model.is_loaded_in_4bit = True
    return model


def _lora_model(kind, nested, dtype, dropout=0.0, seed=0, peft_bnb_classes=True):
    """PEFT LoRA on the MLP: PEFT's bnb layer classes (``peft_bnb_classes``) or its generic ``lora.Linear`` around
    the bitsandbytes base (what PEFT builds when the model is not marked as quantized)."""
    model = MLP(kind, nested, dtype, seed)
    if peft_bnb_classes:
        _mark_quantized(model, kind)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], lora_dropout=dropout)
    pm = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in pm.named_parameters():
        if "lora_B" in name:  # nonzero B so the adapter contributes
            p.data = torch.randn(p.shape, generator=g) * 0.1
    return pm


def _lora_reference(pm, x):
    """fp32 forward from the dequantized weights; returns (y, x_ref, {param name: fp32 leaf})."""
    leaves = {n: p.detach().float().clone().requires_grad_(True) for n, p in pm.named_parameters() if p.requires_grad}
    xr = x.detach().float().clone().requires_grad_(True)

    def layer(name, inp):
        mod = dict(pm.named_modules())[f"base_model.model.{name}"]
        base = mod.get_base_layer()
        y = inp @ _dense(base).t() + base.bias.float()
        A = leaves[f"base_model.model.{name}.lora_A.default.weight"]
        B = leaves[f"base_model.model.{name}.lora_B.default.weight"]
        return y + (inp @ A.t() @ B.t()) * mod.scaling["default"]

    y = layer("down", torch.nn.functional.gelu(layer("up", xr)))
    return y, xr, leaves


@pytest.mark.parametrize("layer_class", ["peft-bnb", "generic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("base", BASES)
def test_lora_outputs_and_gradients(base, dtype, layer_class):
    kind, nested = base
    if kind == "int8" and dtype == torch.bfloat16:
        dtype = torch.float16  # Linear8bitLt's usual activation dtype
    tol = TOL.get(dtype, 2e-2)
    pm = _lora_model(kind, nested, dtype, peft_bnb_classes=layer_class == "peft-bnb")
    fastpeft.accelerate(pm, strict=True)
    fused = tuple(layers_bnb.FUSED_BNB_LAYER_TYPES.values()) if layer_class == "peft-bnb" else FusedLoraLinear
    assert isinstance(pm.base_model.model.up, fused)
    x = torch.randn(2, 5, K).to(dtype).requires_grad_(True)
    y = pm(x)
    assert y.dtype == dtype
    y_ref, xr, leaves = _lora_reference(pm, x)
    assert_close("y", y, y_ref, tol)
    gy = torch.randn(y.shape)
    y.backward(gy.to(dtype))
    y_ref.backward(gy)
    assert_close("dx", x.grad, xr.grad, tol)
    for name, p in pm.named_parameters():
        if p.requires_grad:
            assert_close(f"d{name}", p.grad, leaves[name].grad, tol)


def test_lora_dequantized_weight_never_saved():
    pm = _lora_model("nf4", True, torch.float32)
    fastpeft.accelerate(pm, strict=True)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    x = torch.randn(3, K, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = pm(x)
    assert shapes, "nothing saved at all?"
    for bad in [(H, K), (K, H)]:
        assert bad not in shapes, f"a dense {bad} weight was saved for backward: {shapes}"
    y.sum().backward()
    assert x.grad is not None


def test_lora_dropout_training_runs_and_matches_eval_without_dropout():
    pm = _lora_model("nf4", False, torch.float32, dropout=0.3)
    fastpeft.accelerate(pm, strict=True)
    x = torch.randn(4, K)
    pm.train()
    torch.manual_seed(0)
    y1 = pm(x)
    torch.manual_seed(0)
    y2 = pm(x)
    assert torch.equal(y1, y2), "dropout must be reproducible from torch's seed"
    # the fused path ran (twice: up and down) and applied the mask of the seeds it drew, as the spec does
    from fastpeft import functional
    from fastpeft.functional import draw_seeds
    from fastpeft.reference import apply_dropout

    calls = []
    real = functional.lora_linear
    functional.lora_linear = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        torch.manual_seed(0)
        y3 = pm(x)
    finally:
        functional.lora_linear = real
    assert len(calls) == 2 and torch.equal(y3, y1)
    torch.manual_seed(0)
    seeds = [int(draw_seeds(1, [0.3], True)[0]) for _ in range(2)]

    def layer(name, inp, seed):
        mod = dict(pm.named_modules())[f"base_model.model.{name}"]
        base = mod.get_base_layer()
        A, B = mod.lora_A["default"].weight.float(), mod.lora_B["default"].weight.float()
        low = apply_dropout(inp, 0.3, seed) @ A.t() @ B.t() * mod.scaling["default"]
        return inp @ _dense(base).t() + base.bias.float() + low

    with torch.no_grad():
        expected = layer("down", torch.nn.functional.gelu(layer("up", x, seeds[0])), seeds[1])
    assert_close("training y (dropout 0.3)", y1, expected, 1e-4)
    assert (y1 - pm.eval()(x)).abs().max() > 1e-3, "dropout must change the training output"
    pm.eval()
    # In evaluation the first layer's input has no grad: where bitsandbytes serves it in bf16, so does fastpeft.
    served = ("up",) if pm.base_model.model.up.get_base_layer().support_avx512bf16_for_cpu else ()
    leaves = {n: p.detach().float() for n, p in pm.named_parameters() if p.requires_grad}
    assert_close("eval y", pm(x), _served_reference(pm, x, leaves, served).detach(), 1e-2 if served else 1e-4)


def test_disabled_adapters_give_base_with_input_gradient():
    pm = _lora_model("fp4", False, torch.float32)
    fastpeft.accelerate(pm, strict=True)
    x = torch.randn(3, K, requires_grad=True)
    with pm.disable_adapter():
        y = pm(x)
    base = pm.base_model.model
    xr = x.detach().clone().requires_grad_(True)
    up, down = base.up.get_base_layer(), base.down.get_base_layer()
    yr = torch.nn.functional.gelu(xr @ _dense(up).t() + up.bias) @ _dense(down).t() + down.bias
    assert_close("y", y, yr, 1e-4)
    y.sum().backward()
    yr.sum().backward()
    assert_close("dx", x.grad, xr.grad, 1e-4)


@pytest.mark.parametrize("base", BASES)
def test_ia3_outputs_and_gradients(base):
    kind, nested = base
    dtype = torch.float16 if kind == "int8" else torch.bfloat16
    model = _mark_quantized(MLP(kind, nested, dtype), kind)
    pm = peft.get_peft_model(model, peft.IA3Config(target_modules=["up", "down"], feedforward_modules=["down"]))
    g = torch.Generator().manual_seed(5)
    for name, p in pm.named_parameters():
        if "ia3_l" in name:
            p.data = 1 + 0.2 * torch.randn(p.shape, generator=g)
    fastpeft.accelerate(pm, strict=True)
    x = torch.randn(2, 3, K).to(dtype).requires_grad_(True)
    y = pm(x)
    xr = x.detach().float().clone().requires_grad_(True)
    mods = dict(pm.named_modules())
    leaves = {n: p.detach().float().clone().requires_grad_(True) for n, p in pm.named_parameters() if p.requires_grad}
    upb, downb = mods["base_model.model.up"].get_base_layer(), mods["base_model.model.down"].get_base_layer()
    h = (xr @ _dense(upb).t() + upb.bias.float()) * leaves["base_model.model.up.ia3_l.default"].flatten()
    h = torch.nn.functional.gelu(h)
    yr = (h * leaves["base_model.model.down.ia3_l.default"].flatten()) @ _dense(downb).t() + downb.bias.float()
    assert_close("y", y, yr, 2e-2)
    gy = torch.randn(y.shape)
    y.backward(gy.to(y.dtype))
    yr.backward(gy)
    assert x.grad is not None, "IA3 over a quantized base must give an input gradient"
    assert_close("dx", x.grad, xr.grad, 2e-2)
    for name, p in pm.named_parameters():
        if p.requires_grad:
            assert_close(f"d{name}", p.grad, leaves[name].grad, 2e-2)


@pytest.mark.parametrize("base", [BASES[2], BASES[3]])
def test_save_pretrained_round_trip(tmp_path, base):
    kind, nested = base
    pm = _lora_model(kind, nested, torch.float32, seed=3)
    fastpeft.accelerate(pm, strict=True)
    x = torch.randn(3, K)
    with torch.no_grad():  # from_pretrained loads frozen adapters for evaluation: compare the same kind of call
        y = pm.eval()(x)
    pm.save_pretrained(str(tmp_path))
    fresh = peft.PeftModel.from_pretrained(_mark_quantized(MLP(kind, nested, torch.float32, seed=3), kind),
                                           str(tmp_path))
    fastpeft.accelerate(fresh, strict=True)
    assert isinstance(fresh.base_model.model.down, tuple(layers_bnb.FUSED_BNB_LAYER_TYPES.values()))
    assert_close("y after reload", fresh(x), y, 1e-6)


def _plain_reference(pm, x):
    """fp32 forward of the current (possibly merged) quantized bases alone."""
    base = pm.base_model.model
    up, down = base.up.get_base_layer(), base.down.get_base_layer()
    return torch.nn.functional.gelu(x @ _dense(up).t() + up.bias.float()) @ _dense(down).t() + down.bias.float()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_unmerge_and_unload(kind):
    pm = _lora_model(kind, kind == "nf4", torch.float32, seed=4)
    fastpeft.accelerate(pm, strict=True)
    up = pm.base_model.model.up
    x = torch.randn(3, K)
    w_before = _dense(up.get_base_layer())
    delta = up.get_delta_weight("default").detach()
    with pytest.warns(UserWarning, match="rounding"):
        pm.merge_adapter()
    assert up.merged
    # merge = requantize(deq(W) + s B A): within one quantization step of the exact sum
    w_merged = _dense(up.get_base_layer())
    assert_close("merged weight", w_merged, w_before + delta, 0.12)
    assert (w_merged - w_before).abs().sum() > 0
    # merged forward: the merged quantized bases alone, computed exactly
    assert_close("merged y", pm(x), _plain_reference(pm, x), 1e-4)
    with pytest.warns(UserWarning, match="rounding"):
        pm.unmerge_adapter()
    assert not up.merged
    assert_close("unmerged weight", _dense(up.get_base_layer()), w_before, 0.12)
    y_ref, _, _ = _lora_reference(pm, x)
    assert_close("unmerged y", pm(x), y_ref, 1e-4)
    with pytest.warns(UserWarning):
        unloaded = pm.merge_and_unload()
    assert isinstance(unloaded.up, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    assert quantized_weight_of(unloaded.up) is not None


def test_generic_lora_linear_over_bnb_base_is_fused():
    """PEFT's generic lora.Linear with a bitsandbytes base (custom-module route) reads the base via fastpeft."""
    from fastpeft.layers import read_base_weight

    fastpeft.patching.register_optional_layers()
    lin = _quant_linear(torch.randn(16, K) * 0.1, torch.zeros(16), "nf4", False, torch.float32)
    weight, bias = read_base_weight(lin, False)
    assert weight.kind == "nf4" and weight.shape == (16, K)
    assert read_base_weight(lin, True) is None


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_patch_on_qlora_model(method):
    """``fastpeft.patch`` on a model whose linears already are bitsandbytes layers (the QLoRA set-up)."""
    model = _mark_quantized(MLP("nf4", True, torch.bfloat16), "nf4")
    extra = {"feedforward_modules": ["down"]} if method == "ia3" else {}
    pm = fastpeft.patch(model, r=4, target_modules=["up", "down"], method=method, **extra)
    assert isinstance(pm.base_model.model.up, tuple(layers_bnb.FUSED_BNB_LAYER_TYPES.values()))
    x = torch.randn(2, K, dtype=torch.bfloat16, requires_grad=True)
    pm(x).float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in pm.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_quantized_for_generic_lora_linear(kind):
    """``quant_merge.merge_quantized`` / ``unmerge_quantized``: the quantized merge for PEFT's generic ``lora.Linear``
    over a bitsandbytes base (PEFT's own ``lora.Linear.merge`` would add to the packed bytes)."""
    pm = _lora_model(kind, False, torch.float32, seed=6, peft_bnb_classes=False)
    fastpeft.accelerate(pm, strict=True)
    up = pm.base_model.model.up
    assert isinstance(up, FusedLoraLinear)
    w_before = _dense(up.get_base_layer())
    delta = up.get_delta_weight("default").detach()
    with pytest.warns(UserWarning, match="rounding"):
        quant_merge.merge_quantized(up)
    assert up.merged and quantized_weight_of(up.get_base_layer()) is not None
    assert_close("merged weight", _dense(up.get_base_layer()), w_before + delta, 0.12)
    with pytest.warns(UserWarning, match="rounding"):
        quant_merge.unmerge_quantized(up)
    assert not up.merged
    assert_close("unmerged weight", _dense(up.get_base_layer()), w_before, 0.12)


@pytest.mark.parametrize(
    "blocksize,bias,dtype",
    [(32, False, torch.float16), (128, True, torch.bfloat16), (256, False, torch.float32), (4096, True, torch.float32)],
    ids=["bs32-nobias-fp16", "bs128-bias-bf16", "bs256-nobias-fp32", "bs4096-bias-fp32"],
)
def test_lora_linear4bit_blocksizes_bias_compute_dtypes(blocksize, bias, dtype):
    g = torch.Generator().manual_seed(7)
    N = 48
    lin = bnb.nn.Linear4bit(K, N, bias=bias, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit((torch.randn(N, K, generator=g) * 0.1).to(dtype), requires_grad=False,
                                   compress_statistics=True, quant_type="nf4", blocksize=blocksize)
    if bias:
        lin.bias = nn.Parameter((torch.randn(N, generator=g) * 0.1).to(dtype))
    model = _mark_quantized(nn.Sequential(lin.to("cpu")), "nf4")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0"]))
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    fastpeft.accelerate(pm, strict=True)
    layer = pm.base_model.model[0]
    x = torch.randn(4, K, generator=g).to(dtype).requires_grad_(True)
    y = pm(x)
    W = _dense(layer.get_base_layer())
    xr = x.detach().float().requires_grad_(True)
    A = layer.lora_A["default"].weight.detach().float().requires_grad_(True)
    B = layer.lora_B["default"].weight.detach().float().requires_grad_(True)
    yr = xr @ W.t() + (xr @ A.t() @ B.t()) * layer.scaling["default"]
    if bias:
        yr = yr + layer.get_base_layer().bias.float()
    tol = TOL.get(dtype, 2e-2)
    assert_close("y", y, yr, tol)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy.to(dtype))
    yr.backward(gy)
    assert_close("dx", x.grad, xr.grad, tol)
    assert_close("dA", layer.lora_A["default"].weight.grad, A.grad, tol)
    assert_close("dB", layer.lora_B["default"].weight.grad, B.grad, tol)


def _densified(model: nn.Module) -> nn.Module:
    """``model`` with every bitsandbytes linear replaced, in place, by an fp32 ``nn.Linear`` of its dequantized
    weight (the oracle's decoder, not bitsandbytes')."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                dense = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                dense.weight.data = _dense(child)
                if child.bias is not None:
                    dense.bias.data = child.bias.detach().float()
                setattr(parent, child_name, dense)
    return model


def test_merged_and_disabled_qlora_model_never_runs_bitsandbytes_forward(tmp_path, monkeypatch):
    """A QLoRA LLaMA (``BitsAndBytesConfig``, an MLP width of 344 that bitsandbytes' CPU kernel rejects) with adapters
    disabled or merged runs fastpeft's own quantized product: bitsandbytes' forward is never called and the logits
    are those of the dequantized model."""
    import copy

    import transformers as tf

    config = tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=344, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(str(tmp_path))
    quantization = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    quantized = tf.LlamaForCausalLM.from_pretrained(str(tmp_path), quantization_config=quantization)
    model = fastpeft.patch(quantized, r=4, init_lora_weights=False)
    for module in model.modules():  # as on a CPU without AVX512-BF16: bitsandbytes' meaning is then fp32
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    calls = []
    for cls in (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt):
        original = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, *a, _f=original, **k: calls.append(self) or _f(self, *a, **k))
    ids = torch.randint(0, 97, (2, 5))
    with model.disable_adapter():
        disabled = model(input_ids=ids).logits
    disabled_ref = _densified(copy.deepcopy(model).unload())(input_ids=ids).logits
    with pytest.warns(UserWarning, match="rounding"):
        model.merge_adapter()
    merged = model(input_ids=ids).logits
    assert not calls, f"bitsandbytes' forward ran on {len(calls)} calls"
    report = fastpeft.report(model)
    assert all("merged" in row.reason and "base product by fastpeft" in row.reason for row in report.layers)
    merged_ref = _densified(copy.deepcopy(model).unload())(input_ids=ids).logits
    assert_close("disabled logits", disabled, disabled_ref, 1e-4)
    assert_close("merged logits", merged, merged_ref, 1e-4)
    assert (merged - disabled).abs().max() > 1e-3, "the merged adapter must change the logits"


def test_bnb_registration_is_explicit_and_fusable_answers_the_same_before_accelerate():
    """Importing ``fastpeft.layers_bnb`` changes no registry; ``fusable`` (and so ``report``) registers the
    bitsandbytes twins itself, so its answer on a PEFT bnb layer does not depend on whether ``accelerate`` ran."""
    import subprocess
    import sys

    code = (
        "import fastpeft.layers as L, torch, peft\n"
        "before = (dict(L.FUSED_LAYER_TYPES), list(L.BASE_WEIGHT_READERS))\n"
        "import fastpeft.layers_bnb\n"
        "assert (dict(L.FUSED_LAYER_TYPES), list(L.BASE_WEIGHT_READERS)) == before, 'import registered'\n"
        "import bitsandbytes as bnb\n"
        "from fastpeft.patching import fusable\n"
        "lin = bnb.nn.Linear4bit(64, 16, compute_dtype=torch.float32, quant_type='nf4')\n"
        "lin.weight = bnb.nn.Params4bit(torch.randn(16, 64), requires_grad=False, quant_type='nf4').to('cpu')\n"
        "model = torch.nn.Sequential(lin)\n"
        "model.is_loaded_in_4bit = True\n"
        "layer = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=['0'])).base_model.model[0]\n"
        "assert type(layer).__name__ == 'Linear4bit' and type(layer).__module__ == 'peft.tuners.lora.bnb'\n"
        "print(fusable(layer))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "(True, '')", proc.stdout


def _served_reference(pm, x, leaves, served=("up", "down")):
    """What bitsandbytes' CPU serving kernel makes of an fp32 call (eval, input without grad) to the layers in
    ``served``: the base product from ``x`` rounded to bf16 and the weight rounded to bf16, the product rounded to
    bf16, then the bias and PEFT's fp32 adapter terms. Other layers: fp32 products. Differentiable in the adapter
    ``leaves``."""
    def layer(name, inp):
        mod = dict(pm.named_modules())[f"base_model.model.{name}"]
        base = mod.get_base_layer()
        if name in served:
            product = (inp.detach().bfloat16().float() @ _dense(base).bfloat16().float().t()).bfloat16().float()
        else:
            product = inp @ _dense(base).t()
        y = product + base.bias.float()
        A = leaves[f"base_model.model.{name}.lora_A.default.weight"]
        B = leaves[f"base_model.model.{name}.lora_B.default.weight"]
        return y + (inp @ A.t() @ B.t()) * mod.scaling["default"]

    return layer("down", torch.nn.functional.gelu(layer("up", x)))


@pytest.mark.parametrize("layer_class", ["peft-bnb", "generic"])
@pytest.mark.parametrize("base", BASES[:3])
def test_fp32_evaluation_computes_the_base_in_bf16_where_bitsandbytes_does(base, layer_class):
    """Where bitsandbytes serves a 4-bit layer with its CPU kernel (eval, input without grad, a CPU with
    AVX512-BF16: forced here by the layer's own flag, so every host runs the test), that kernel computes in bf16
    whatever the compute dtype, and PEFT's output carries that rounding: the fused layers compute the base product in
    bf16 there too, and keep fp32 in training and for inputs that require grad."""
    kind, nested = base
    pm = _lora_model(kind, nested, torch.float32, peft_bnb_classes=layer_class == "peft-bnb")
    fastpeft.accelerate(pm, strict=True)
    for module in pm.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True
    x = torch.randn(3, 7, K)
    leaves = {n: p.detach().float().clone().requires_grad_(True) for n, p in pm.named_parameters() if p.requires_grad}
    pm.eval()
    with torch.no_grad():
        y = pm(x)
    want = _served_reference(pm, x, leaves)
    # bf16-level tolerance: bitsandbytes' kernel (one of the routes where it is loaded) also rounds the scales to
    # bf16, 3.5e-3 relative error per layer on its own against the product of bf16-rounded weights.
    served_tol = 1e-2
    assert_close("y (eval, served in bf16)", y, want.detach(), served_tol)
    y_fp32, _, _ = _lora_reference(pm, x)
    assert rel_err(y, y_fp32.detach()) > 1e-4, "the eval output kept fp32 products: not bitsandbytes' meaning"

    # Only the base product is rounded: with B = 0 and no bias the first layer's output is bf16-exact.
    up = pm.base_model.model.up
    with torch.no_grad():
        saved_B, saved_bias = up.lora_B["default"].weight.clone(), up.get_base_layer().bias.clone()
        up.lora_B["default"].weight.zero_()
        up.get_base_layer().bias.zero_()
        z = up(x)
        assert torch.equal(z, z.bfloat16().float()), "the served base product was not rounded to bf16"
        up.lora_B["default"].weight.copy_(saved_B)
        up.get_base_layer().bias.copy_(saved_bias)

    if layer_class == "peft-bnb":  # (the generic class hands disabled adapters to PEFT's forward)
        # Disabled adapters: the base alone, served in bf16 as bitsandbytes' forward would be.
        no_adapters = {n: (torch.zeros_like(t) if "lora_B" in n else t) for n, t in leaves.items()}
        with pm.disable_adapter(), torch.no_grad():
            assert_close("y (adapters disabled)", pm(x), _served_reference(pm, x, no_adapters).detach(), served_tol)

    # Evaluation that records autograd for the adapters: the first layer's input has no grad and is served, the
    # second one's input carries the first adapters' grad (bitsandbytes would not serve it); gradients through both.
    y = pm(x)
    want = _served_reference(pm, x, leaves, served=("up",))
    assert_close("y (eval, grad enabled)", y, want.detach(), served_tol)
    gy = torch.randn(y.shape)
    y.backward(gy)
    want.backward(gy)
    for name, p in pm.named_parameters():
        if p.requires_grad:
            assert_close(f"d{name}", p.grad, leaves[name].grad, served_tol)

    # Training calls and inputs that require grad keep fp32 products.
    pm.train()
    assert_close("y (train)", pm(x), y_fp32.detach(), TOL[torch.float32])
    pm.eval()
    assert_close("y (eval, x requires grad)", pm(x.clone().requires_grad_(True)), y_fp32.detach(), TOL[torch.float32])


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_generic_class_with_disabled_or_merged_adapters_never_runs_bitsandbytes_forward(kind, monkeypatch):
    """PEFT's generic ``lora.Linear`` over a bitsandbytes base with adapters disabled or merged: the base product is
    fastpeft's (bitsandbytes' forward never runs: its CPU matmul gives a wrong input gradient, and on AVX-512 hosts
    it repacks the weight in place), with the dequantized base's output and input gradient; disabling a merged model
    unmerges it first, as PEFT's forward does; evaluation calls follow bitsandbytes' bf16 serving rule."""
    pm = _lora_model(kind, kind == "nf4", torch.float32, seed=5, peft_bnb_classes=False)
    fastpeft.accelerate(pm, strict=True)
    up = pm.base_model.model.up
    assert type(up) is FusedLoraLinear
    calls = []
    for cls in (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt):
        original = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, *a, _f=original, **k: calls.append(self) or _f(self, *a, **k))
    x = torch.randn(3, K, requires_grad=True)
    with pm.disable_adapter():
        y = pm(x)
    xr = x.detach().clone().requires_grad_(True)
    want = _plain_reference(pm, xr)
    assert_close("disabled y", y, want, 1e-4)
    gy = torch.randn(y.shape)
    y.backward(gy)
    want.backward(gy)
    assert_close("disabled dx", x.grad, xr.grad, 1e-4)

    with pytest.warns(UserWarning, match="rounding"):
        pm.merge_adapter()
    assert_close("merged y", pm(x), _plain_reference(pm, x), 1e-4)
    with pytest.warns(UserWarning, match="rounding"), pm.disable_adapter():
        pm(x)
    assert not up.merged, "disabling merged adapters must unmerge them first"

    if kind == "nf4":  # an evaluation call of the bases alone, where bitsandbytes would serve it in bf16
        for module in pm.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = True
        leaves = {n: (torch.zeros_like(p) if "lora_B" in n else p.detach().float())
                  for n, p in pm.named_parameters() if p.requires_grad}
        pm.eval()
        with pm.disable_adapter(), torch.no_grad():
            assert_close("disabled y (eval, served in bf16)", pm(x), _served_reference(pm, x, leaves).detach(), 1e-2)
    assert not calls, f"bitsandbytes' forward ran on {len(calls)} calls"


def _requantize_in_place(base: nn.Module, factor: float) -> None:
    """Quantize ``factor`` times the base's weight into the same parameter object (new data, new scales)."""
    weight = base.weight
    dense = _dense(base) * factor
    if weight.dtype == torch.int8:
        codes, scales, _ = bnb.functional.int8_vectorwise_quant(dense.half())
        weight.data, weight.SCB = codes, scales
        return
    state = weight.quant_state
    packed, weight.quant_state = bnb.functional.quantize_4bit(dense.to(state.dtype), blocksize=state.blocksize,
                                                              compress_statistics=state.nested,
                                                              quant_type=state.quant_type)
    weight.data = packed


@pytest.mark.parametrize("served", [True, False], ids=["served-in-bf16", "fp32-products"])
@pytest.mark.parametrize("layer_class", ["peft-bnb", "generic"])
@pytest.mark.parametrize("base", [BASES[0], BASES[3]])
def test_repeated_evaluation_calls_run_settled_and_follow_the_base(base, layer_class, served, monkeypatch):
    """Repeated no-grad calls of a QLoRA layer run settled (``fastpeft.layers.SettledLayerCall``) and give the
    oracle's output, also after the quantized weight is rewritten (merge and unmerge requantize it), an adapter is
    edited, the base is put in training mode, or the input requires grad (bitsandbytes serves neither in bf16)."""
    from fastpeft import routing

    kind, nested = base
    if served and kind == "int8":
        pytest.skip("bitsandbytes serves only 4-bit layers in bf16")
    monkeypatch.delenv("FASTPEFT_ROUTE", raising=False)
    monkeypatch.setattr(routing, "CONFIRM_AFTER_CALLS", 0)  # the first choice is final: calls settle at once
    routing.clear_choices()
    pm = _lora_model(kind, nested, torch.float32, seed=6, peft_bnb_classes=layer_class == "peft-bnb")
    fastpeft.accelerate(pm, strict=True)
    for module in pm.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = served
    pm.eval()
    layers = [m for m in pm.modules() if hasattr(m, "_fastpeft_settled")]
    assert len(layers) == 2

    def oracle(x):
        if served and not x.requires_grad:
            leaves = {n: p.detach().float() for n, p in pm.named_parameters() if p.requires_grad}
            return _served_reference(pm, x, leaves).detach(), 1e-2
        return _lora_reference(pm, x)[0].detach(), TOL[torch.float32]

    def check(label, rows=5):
        for attempt in range(2):  # the first call may settle, the second runs settled
            x = torch.randn(rows, K)
            want, tol = oracle(x)
            with torch.no_grad():
                assert_close(f"{label} call {attempt}", pm(x), want, tol)

    check("first calls")
    assert all(layer._fastpeft_settled is not None for layer in layers)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    check("adapter edited")
    with pytest.warns(UserWarning):
        pm.merge_adapter()
    with pytest.warns(UserWarning):
        pm.unmerge_adapter()  # both replace the quantized weight
    check("requantized")
    for layer in layers:  # new values in the same parameter, as bitsandbytes' in-place CPU repack writes them
        _requantize_in_place(layer.get_base_layer(), 1.5)
    check("rewritten in place")
    for layer in layers:
        layer.get_base_layer().train()
    x = torch.randn(5, K)
    with torch.no_grad():
        assert_close("base in training", pm(x), _lora_reference(pm, x)[0].detach(), TOL[torch.float32])
    for layer in layers:
        layer.get_base_layer().eval()
    check("base in eval again")
    x = torch.randn(5, K, requires_grad=True)
    if served:  # (under no_grad the second layer's input does not require grad: served)
        leaves = {n: p.detach().float() for n, p in pm.named_parameters() if p.requires_grad}
        want, tol = _served_reference(pm, x, leaves, served=("down",)).detach(), 1e-2
    else:
        want, tol = _lora_reference(pm, x)[0].detach(), TOL[torch.float32]
    with torch.no_grad():
        assert_close("x requires grad", pm(x), want, tol)
    check("one row", rows=1)
    routing.clear_choices()


@pytest.mark.gpu
@pytest.mark.parametrize("base", [BASES[0], BASES[2]])
def test_qlora_on_gpu_runs_settled_on_every_route(base, monkeypatch):
    """bf16 QLoRA (PEFT's bitsandbytes classes) on a CUDA device: repeated evaluation calls at decode and prefill
    sizes run settled on the measured route and match the fp32 oracle, and so does each forward route pinned in turn
    (``bnb_native``, bitsandbytes' own CUDA product, where the layer's K is whole blocks); a training step's input
    gradient too."""
    from fastpeft import routing
    from fastpeft.backends.triton import quantized as triton_quant

    kind, nested = base
    monkeypatch.delenv("FASTPEFT_ROUTE", raising=False)
    monkeypatch.setattr(routing, "CONFIRM_AFTER_CALLS", 0)  # the first choice is final: calls settle at once
    routing.clear_choices()
    pm = _lora_model(kind, nested, torch.bfloat16, seed=7).to("cuda")
    fastpeft.accelerate(pm, strict=True)
    pm.eval()
    layers = [m for m in pm.modules() if hasattr(m, "_fastpeft_settled")]
    assert len(layers) == 2
    tol = TOL[torch.bfloat16]
    try:
        for rows in (1, 1, 33, 33):  # the first call of each rows bucket settles, the second runs settled
            x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                assert_close(f"M={rows}", pm(x), _lora_reference(pm, x)[0].detach(), tol)
        assert all(layer._fastpeft_settled is not None for layer in layers)
        products = CallCounter(monkeypatch, triton_quant, "bnb_product")
        for route in ("compose", "bnb_native", "fused"):
            routing.set_route("lora_forward", route)
            for rows in (1, 33):
                x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
                with torch.no_grad():
                    assert_close(f"{route} M={rows}", pm(x), _lora_reference(pm, x)[0].detach(), tol)
            if route != "bnb_native":
                assert routing.last_route("lora_forward") == route
        # bnb_native serves the up projection (K = 64: whole blocks per row); the down one (K = 96) is measured
        # among the other routes
        assert products.calls == 2
        routing.set_route("lora_forward", None)
        pm.train()
        x = torch.randn(9, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        pm(x).float().sum().backward()
        y_ref, x_ref, _ = _lora_reference(pm, x)
        y_ref.sum().backward()
        assert_close("dx", x.grad, x_ref.grad, tol)
    finally:
        routing.set_route(None, None)
        routing.clear_choices()
