"""torch.compile: fastpeft's custom ops trace with ``fullgraph=True`` (no graph break), and a compiled patched model
equals eager in outputs and every adapter gradient.

``aot_eager`` runs the same tracing as inductor (Dynamo + AOTAutograd, fake tensors, the registered autograd of the
custom ops) without the C++ code generation that takes ~10 s per graph on these 2-core machines; one test runs the
full inductor pipeline on a single layer.
"""

from __future__ import annotations

import copy

import pytest
import torch
from checks import assert_close, assert_within_2x
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

import fastpeft
from fastpeft import reference
from fastpeft.layers import FusedIA3Linear, FusedLoraLinear


class RecordingBackend:
    """A torch.compile backend that records the ops of every captured graph, then runs it like ``aot_eager``."""

    def __init__(self):
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def calls(self, op: torch._ops.OpOverloadPacket) -> bool:
        """Whether a captured graph calls ``op`` (Dynamo records the packet, AOT the overload)."""
        targets = {node.target for gm in self.graphs for node in gm.graph.nodes if node.op == "call_function"}
        return op in targets or op.default in targets


def _lora_layer(dtype=torch.float32, K=37, N=29, r=5, lora_bias=False, dropout=0.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, N, bias=True)).to(dtype)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=10, target_modules=["0"], lora_dropout=dropout,
                                            lora_bias=lora_bias))
    fastpeft.accelerate(peft)
    layer = peft.base_model.model[0]
    assert type(layer) is FusedLoraLinear
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # PEFT initialises B to zero; make the adapter term count
    return layer


def _ia3_layer(is_feedforward: bool, K=37, N=29):
    from peft import IA3Config

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, N, bias=True))
    peft = get_peft_model(model, IA3Config(target_modules=["0"], feedforward_modules=["0"] if is_feedforward else []))
    fastpeft.accelerate(peft)
    layer = peft.base_model.model[0]
    assert type(layer) is FusedIA3Linear
    with torch.no_grad():
        layer.ia3_l["default"].uniform_(0.5, 1.5)
    return layer


def _grads(layer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}


def test_compile_cache_tag_follows_the_custom_ops_source_and_schemas():
    """torch keys its compile caches by graph text, which names ``fastpeft::lora_linear_backward`` but not its schema
    or the backward the registered autograd traces: fastpeft's tag (a digest of both) is in the key tag once, beside
    a tag the user set, and changes with either input."""
    from fastpeft import functional

    tag = functional.compile_cache_tag()
    assert tag.startswith("fastpeft-") and tag in torch.compiler.config.cache_key_tag.split(",")
    schemas = [str(op._opoverload._schema) for op in functional._CUSTOM_OPS]
    assert any("needs_grad_bias" in s for s in schemas)
    source = open(functional.__file__, "rb").read()
    assert functional.compile_cache_tag(source, schemas) == tag
    assert functional.compile_cache_tag(source + b"#", schemas) != tag
    changed = [s.replace(", bool needs_grad_bias", "") for s in schemas]
    assert changed != schemas and functional.compile_cache_tag(source, changed) != tag
    with torch.compiler.config.patch(cache_key_tag="users-tag"):
        functional._tag_compile_caches()
        functional._tag_compile_caches()
        assert torch.compiler.config.cache_key_tag == f"users-tag,{tag}"


def test_compile_cache_entries_are_keyed_by_the_fastpeft_tag():
    """The inductor pipeline's AOTAutograd cache serves a fused layer's compiled forward and backward again under the
    same fastpeft tag and misses it under another one (what a changed fastpeft sets), in a fresh cache directory."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    layer = _lora_layer()
    x = torch.randn(5, 37)

    def compile_and_step() -> dict:
        torch._dynamo.reset()
        counters.clear()
        xi = x.clone().requires_grad_(True)
        torch.compile(layer, fullgraph=True, backend="inductor")(xi).sum().backward()
        return dict(counters["aot_autograd"])

    with fresh_cache():
        assert compile_and_step().get("autograd_cache_saved") == 1
        assert compile_and_step().get("autograd_cache_hit") == 1
        with torch.compiler.config.patch(cache_key_tag="fastpeft-0000000000000000"):
            other = compile_and_step()
        assert other.get("autograd_cache_miss") == 1 and not other.get("autograd_cache_hit")
    torch._dynamo.reset()


@pytest.mark.parametrize("lora_bias", [False, True], ids=["bias=F", "bias=T"])
def test_lora_layer_fullgraph_no_graph_break(lora_bias):
    """The fused layer is captured in ONE graph that calls ``fastpeft::lora_linear``; output and gradients equal the
    reference spec on fresh data (3-D input, odd K/N)."""
    layer = _lora_layer(lora_bias=lora_bias)
    rec = RecordingBackend()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=rec)
    x = torch.randn(3, 7, 37, requires_grad=True)
    y = compiled(x)
    assert len(rec.graphs) == 1, f"expected one graph, got {len(rec.graphs)}"
    assert rec.calls(torch.ops.fastpeft.lora_linear), "fastpeft's op is not in the compiled graph"
    g = torch.randn_like(y)
    y.backward(g)
    got_dx, got = x.grad.clone(), _grads(layer)

    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    base = layer.base_layer
    params = [base.weight, base.bias, A, B] + ([layer.lora_B["default"].bias] if lora_bias else [])
    ref_params = [p.detach().clone().requires_grad_(True) for p in params]
    xr = x.detach().clone().requires_grad_(True)
    yr = reference.lora_linear(xr.reshape(-1, 37), ref_params[0], ref_params[1], [ref_params[2]], [ref_params[3]],
                               [ref_params[4] if lora_bias else None], [layer.scaling["default"]], [0.0], [0])
    yr.backward(g.reshape(-1, 29))
    assert_close("y", y.reshape(-1, 29), yr, 1e-6)
    assert_close("dX", got_dx, xr.grad, 1e-6)
    assert_close("dA", got["lora_A.default.weight"], ref_params[2].grad, 1e-6)
    assert_close("dB", got["lora_B.default.weight"], ref_params[3].grad, 1e-6)
    if lora_bias:
        assert_close("dbias", got["lora_B.default.bias"], ref_params[4].grad, 1e-6)


@pytest.mark.parametrize("is_feedforward", [False, True], ids=["out-scale", "feedforward"])
def test_ia3_layer_fullgraph_no_graph_break(is_feedforward):
    layer = _ia3_layer(is_feedforward)
    rec = RecordingBackend()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=rec)
    x = torch.randn(2, 5, 37, requires_grad=True)
    y = compiled(x)
    assert len(rec.graphs) == 1
    assert rec.calls(torch.ops.fastpeft.ia3_linear), "fastpeft's op is not in the compiled graph"
    g = torch.randn_like(y)
    y.backward(g)
    vec = layer.ia3_l["default"]
    xr = x.detach().clone().requires_grad_(True)
    vr = vec.detach().clone().requires_grad_(True)
    yr = reference.ia3_linear(xr.reshape(-1, 37), layer.base_layer.weight.detach(), layer.base_layer.bias.detach(),
                              [vr], is_feedforward)
    yr.backward(g.reshape(-1, 29))
    assert_close("y", y.reshape(-1, 29), yr, 1e-6)
    assert_close("dX", x.grad, xr.grad, 1e-6)
    assert_close("dl", vec.grad, vr.grad, 1e-6)


def test_lora_layer_inductor_bf16():
    """The full inductor pipeline (C++ codegen around the opaque custom op) on one bf16 layer, against eager."""
    layer = _lora_layer(dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    x = torch.randn(4, 37, dtype=torch.bfloat16, requires_grad=True)
    y = compiled(x)
    g = torch.randn_like(y)
    y.backward(g)
    got_dx, got = x.grad.clone(), _grads(layer)
    layer.zero_grad()
    x2 = x.detach().clone().requires_grad_(True)
    y2 = layer(x2)
    y2.backward(g)
    # The custom op is opaque to inductor, so the same kernels run: only inductor's own glue may reorder roundings.
    assert_close("y", y, y2, 1e-2)
    assert_close("dX", got_dx, x2.grad, 1e-2)
    for name, grad in _grads(layer).items():
        assert_close(name, got[name], grad, 1e-2)
    # Equal to eager is not enough: both must be right. The 2x rule against the fp32 spec, with the spec run in
    # bf16 (PEFT's meaning in bf16) setting the bar, plus one bf16 unit roundoff for the output's own rounding.
    base, A, B = layer.base_layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight

    def spec(dtype):
        params = [t.detach().to(dtype).requires_grad_(True) for t in (base.weight, base.bias, A, B)]
        xs = x.detach().to(dtype).requires_grad_(True)
        ys = reference.lora_linear(xs, params[0], params[1], [params[2]], [params[3]], [None],
                                   [layer.scaling["default"]], [0.0], [0])
        ys.backward(g.to(dtype))
        return ys, xs.grad, params[2].grad, params[3].grad

    exact, low = spec(torch.float32), spec(torch.bfloat16)
    ours = (y, got_dx, got["lora_A.default.weight"], got["lora_B.default.weight"])
    for name, mine, bar, want in zip(("y", "dX", "dA", "dB"), ours, low, exact):
        assert_within_2x(f"inductor {name}", mine.float(), bar.float(), want, floor=2.0 ** -8)


def test_dropout_training_compiles_and_matches_eager_with_same_seed():
    """In training mode with dropout the seed is drawn from torch's RNG inside the graph; the compiled layer with
    the same ``torch.manual_seed`` draws the same mask as eager (same output, same gradients)."""
    layer = _lora_layer(dropout=0.3).train()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 37)
    g = torch.randn(6, 29)
    runs = []
    for fn in (compiled, layer):
        layer.zero_grad()
        torch.manual_seed(1234)
        y = fn(x)
        y.backward(g)
        runs.append((y.detach(), _grads(layer)))
    (yc, gc), (ye, ge) = runs
    assert torch.equal(yc, ye), "compiled and eager drew different dropout masks"
    for name in ge:
        assert_close(name, gc[name], ge[name], 1e-6)
    # and the mask matters: a different seed gives a different output
    torch.manual_seed(4321)
    assert not torch.equal(layer(x).detach(), ye)


def _tiny_llama():
    """One block keeps Dynamo's trace short on 2 cores; every projection kind of a LLaMA block is still there."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    peft = fastpeft.patch(model, r=4, lora_alpha=8, lora_dropout=0.0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    return peft


def test_llama_compiled_matches_eager():
    """A patched tiny LLaMA (every block linear fused) compiled with fullgraph equals eager: loss, logits and every
    adapter gradient."""
    peft = _tiny_llama()
    peft.eval()
    fused = [m for m in peft.modules() if isinstance(m, FusedLoraLinear)]
    assert len(fused) == 7  # q, k, v, o, gate, up, down
    ids = torch.randint(0, 97, (2, 11))

    def step(fn, owner=peft):
        owner.zero_grad()
        out = fn(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in owner.named_parameters() if p.requires_grad}
        return out.loss.detach(), out.logits.detach(), grads

    loss_e, logits_e, grads_e = step(peft)
    # the eager fused model is PEFT's model: the same weights in PEFT's own layers give the same loss and gradients
    reference_model = copy.deepcopy(peft)
    for module in reference_model.modules():
        if isinstance(module, FusedLoraLinear):
            module.__class__ = PeftLoraLinear
    loss_r, logits_r, grads_r = step(reference_model, reference_model)
    assert_close("PEFT loss", loss_e, loss_r, 1e-5)
    assert_close("PEFT logits", logits_e, logits_r, 1e-5)
    for name in grads_r:
        assert_close(f"PEFT {name}", grads_e[name], grads_r[name], 1e-4)
    torch._dynamo.reset()
    compiled = torch.compile(peft, fullgraph=True, backend="aot_eager")
    loss_c, logits_c, grads_c = step(compiled)
    assert len(grads_e) == 14 and grads_e.keys() == grads_c.keys()
    assert_close("loss", loss_c, loss_e, 1e-5)
    assert_close("logits", logits_c, logits_e, 1e-5)
    for name in grads_e:
        assert grads_e[name].abs().sum() > 0, f"{name}: zero gradient, the test would be vacuous"
        assert_close(name, grads_c[name], grads_e[name], 1e-4)


def _make_base_trainable(layer):
    base = layer.get_base_layer()
    base.weight.requires_grad_(True)
    base.bias.requires_grad_(True)
    return base


def _compiled_vs_eager(layer, x, g, seed=99):
    """Run ``layer`` eager and compiled (fullgraph) from the same RNG state; return both (y, dX, grads)."""
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    runs = []
    for fn in (layer, compiled):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(seed)
        y = fn(xi)
        y.backward(g)
        grads = {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
        runs.append((y.detach(), xi.grad, grads))
    return runs


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["p=0", "p=0.2"])
def test_lora_compiled_gradients_reach_a_trainable_base(dropout):
    """Base weight and bias that require grad get the same gradients compiled as eager (no silent ``None``), and
    so do the input and both adapter matrices, with and without dropout."""
    layer = _lora_layer(dropout=dropout).train()
    _make_base_trainable(layer)
    x, g = torch.randn(2, 7, 37), torch.randn(2, 7, 29)
    (ye, dxe, ge), (yc, dxc, gc) = _compiled_vs_eager(layer, x, g)
    assert {"base_layer.weight", "base_layer.bias", "lora_A.default.weight", "lora_B.default.weight"} <= set(ge)
    assert_close("y", yc, ye, 1e-5)
    assert_close("dX", dxc, dxe, 1e-5)
    for name, grad in ge.items():
        assert grad is not None, f"eager {name}: no gradient"
        assert gc[name] is not None, f"compiled {name}: gradient is None"
        assert_close(name, gc[name], grad, 1e-5)


@pytest.mark.parametrize("is_feedforward", [False, True], ids=["output-scaled", "feedforward"])
def test_ia3_compiled_gradients_reach_a_trainable_base(is_feedforward):
    layer = _ia3_layer(is_feedforward).train()
    _make_base_trainable(layer)
    x, g = torch.randn(2, 7, 37), torch.randn(2, 7, 29)
    (ye, dxe, ge), (yc, dxc, gc) = _compiled_vs_eager(layer, x, g)
    assert {"base_layer.weight", "base_layer.bias", "ia3_l.default"} <= set(ge)
    assert_close("y", yc, ye, 1e-5)
    assert_close("dX", dxc, dxe, 1e-5)
    for name, grad in ge.items():
        assert gc[name] is not None, f"compiled {name}: gradient is None"
        assert_close(name, gc[name], grad, 1e-5)
