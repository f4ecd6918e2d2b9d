"""DoRA (``LoraConfig(use_dora=True)``): fastpeft means what PEFT's ``DoraLinearLayer`` means.

The op (``fastpeft.dora.dora_linear``) is checked against the executable spec (``fastpeft.reference.dora_linear``,
written as PEFT writes it) on every backend available here and every route pinned, dropout included (the spec is fed
the seed the op drew, so both apply the same mask). The module twins are checked against PEFT's own layers:
outputs, input gradient and the gradients of A, B and the magnitude, PEFT's files (merge/unmerge/unload: in
``test_peft_parity.test_merge_unmerge_disable_match_peft[dora]``).
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from checks import CallCounter, assert_close, assert_within_2x, rel_err
from model_helpers import MLP, Conv1DMLP
from peft import LoraConfig, PeftModel, get_peft_model
from test_peft_parity import (
    FP32_TOL,
    CountFusedCalls,
    compare_forward_backward,
    compare_low_precision,
    fused_layers,
    randomize_magnitude,
    trainable,
    twins,
)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastpeft
from fastpeft import dora, reference, routing
from fastpeft.backends import availability, get_backend, set_backend
from fastpeft.functional import draw_seeds

ROUTE_PAIRS = [(f, b) for f in ("compose", "fused") for b in ("compose", "fused")]
DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture
def clean_routes():
    yield
    routing.set_route("dora_forward", None)
    routing.set_route("dora_backward", None)
    routing.set_route("widened_product", None)
    set_backend(None)


def dora_twins(build, dtype=None, extra_adapters=(), **config):
    config = LoraConfig(use_dora=True, init_lora_weights=False, **config)
    peft_model, fused = twins(build, config, extra_adapters=extra_adapters, dtype=dtype)
    for model in (peft_model, fused):
        randomize_magnitude(model)
    return peft_model, fused


# ---------------------------------------------------------------------------------------------- the op vs the spec
def op_case(lead, K, N, r, dtype, adapter_dtype, transposed, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g).to(dtype)
    stored = torch.randn(K, N, generator=g) if transposed else torch.randn(N, K, generator=g)
    stored = (stored / math.sqrt(K)).to(dtype)
    weight = stored.t() if transposed else stored
    bias = (0.1 * torch.randn(N, generator=g)).to(dtype)
    A = (torch.randn(r, K, generator=g) / math.sqrt(K)).to(adapter_dtype)
    B = (0.5 * torch.randn(N, r, generator=g)).to(adapter_dtype)
    m = (0.5 + torch.rand(N, generator=g)).to(adapter_dtype)
    return x, weight, bias, A, B, m


def run_with_grads(fn, x, A, B, m, upstream_seed=11):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B, m)]
    y = fn(*leaves)
    gen = torch.Generator().manual_seed(upstream_seed)
    upstream = torch.randn(y.shape, generator=gen).to(y.dtype)
    grads = torch.autograd.grad(y, leaves, upstream)
    return [y.detach(), *grads]


def backends_here():
    names = []
    for name in ("reference", "cpu", "triton"):
        if availability(name)[0]:
            names.append(name)
    return names


def check_every_route_pair(backend, x, W, b, A, B, m, s, p, floor=1e-6):
    """``dora_linear`` in training on ``backend`` with each pinned pair of forward/backward routes against the spec fed
    the same seed: y, dX, dA, dB and dm; all fp32 within ``FP32_TOL``, else the 2x rule against the spec in fp32
    (plus ``floor``). Returns the spec's ``[y, dX, dA, dB, dm]``."""
    lead, K, N = tuple(x.shape[:-1]), x.shape[-1], W.shape[0]
    all_fp32 = all(t.dtype == torch.float32 for t in (x, A, B, m))

    def spec(xx, AA, BB, mm, f32=False):
        torch.manual_seed(3)
        seed = int(draw_seeds(1, [p], True)[0]) if p > 0 else 0
        cast = (lambda t: t.float()) if f32 else (lambda t: t)
        y = reference.dora_linear(cast(xx).reshape(-1, K), cast(W), cast(b), cast(AA), cast(BB), cast(mm), s, p, seed)
        return y.view(*lead, N)

    expected = run_with_grads(spec, x, A, B, m)
    expected32 = run_with_grads(lambda *t: spec(*t, f32=True), x, A, B, m)
    set_backend(backend)
    # With dropout, the second base product's routes too (pairs: a bf16 x and weight under fp32 adapters, on a CPU
    # whose oneDNN multiplies bf16 blocks).
    widened = ["widen"]
    if p > 0 and get_backend(x, W).widened_mm_eligible(x.reshape(-1, K), W) and A.dtype == torch.float32:
        widened += ["pairs", "pairs_x"]
    forwards = dora._forward_routes(get_backend(x, W), x.reshape(-1, K), W, A, p)
    backwards = dora._backward_routes(get_backend(x, W), x.reshape(-1, K), W, A, p, True)
    if p > 0 and backend == "cpu" and A.dtype == torch.float32 and (
            (x.dtype == W.dtype == torch.float32)
            or (x.dtype == torch.bfloat16
                and get_backend(x, W).widened_mm_eligible(x.reshape(-1, K), W.t(), interleave_a=False))):
        assert "stacked" in forwards and "stacked" in backwards, "the stacked routes were left out where they may run"
    assert set(ROUTE_PAIRS) <= set(itertools.product(forwards, backwards))
    # The stacked forward computes its second base product itself: no route of widened_product runs there; it runs
    # with the backend's one-pass epilogue and, as a backend without one would, with the three passes it replaces.
    # So does compose without dropout (its scaling pass, or the update and the scaling).
    combos = [(f, b, product) for f, b in itertools.product(forwards, backwards)
              for product in (widened if f != "stacked" else [None, "three passes"])
              + (["three passes"] if f == "compose" and p == 0 else [])]
    backend_class = type(get_backend(x, W))
    one_pass = backend_class.dora_epilogue
    for fwd, bwd, product in combos:
        routing.set_route("dora_forward", fwd)
        routing.set_route("dora_backward", bwd)
        routing.set_route("widened_product", product if product in widened else None)

        def fused(xx, AA, BB, mm):
            torch.manual_seed(3)
            return dora.dora_linear(xx, W, b, AA, BB, mm, s, p, training=True)

        backend_class.dora_epilogue = (lambda *args, **kwargs: None) if product == "three passes" else one_pass
        try:
            got = run_with_grads(fused, x, A, B, m)
        finally:
            backend_class.dora_epilogue = one_pass
        assert routing.last_route("dora_forward") == fwd and routing.last_route("dora_backward") == bwd
        if p > 0 and product in widened:
            assert routing.last_route("widened_product") == product
        for name, a, e, e32 in zip(("y", "dX", "dA", "dB", "dm"), got, expected, expected32):
            label = f"{backend} {fwd}/{bwd}/{product} {name}"
            assert a.dtype == e.dtype, f"{label}: dtype {a.dtype} != {e.dtype}"
            if all_fp32:
                assert_close(label, a, e, FP32_TOL)
            else:
                assert_within_2x(label, a.float(), e.float(), e32, floor)
    return expected


# (x dtype, adapter dtype, backends that run it): the Triton interpreter's tl.dot is wrong on bf16, fp16 stands in.
DTYPE_CASES = [("fp32", "fp32", None), ("bf16", "bf16", ("reference", "cpu")), ("bf16", "fp32", ("reference", "cpu")),
               ("fp16", "fp16", ("triton",))]
SHAPES = [("M5", (5,), False), ("2x3-3d", (2, 3), False), ("M5-fan_in_fan_out", (5,), True)]


@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"drop{p}")
@pytest.mark.parametrize("xdt,adt,only", DTYPE_CASES, ids=[f"x{a}-A{b}" for a, b, _ in DTYPE_CASES])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_op_matches_spec_on_every_backend_and_route(clean_routes, backend, shape, xdt, adt, only, p):
    """K=37, N=29, r=3; training mode (dropout drawn when p > 0); y, dX, dA, dB and dm for each pinned pair of
    forward/backward routes. fp32: within 1e-5 of the spec; low precision: the 2x rule against the spec in fp32."""
    if backend not in backends_here():
        pytest.skip(f"backend {backend} unavailable: {availability(backend)[1]}")
    if only is not None and backend not in only:
        pytest.skip(f"{xdt}/{adt} is not run on {backend}")
    _, lead, transposed = shape
    dtype, adapter_dtype = DT[xdt], DT[adt]
    x, W, b, A, B, m = op_case(lead, 37, 29, 3, dtype, adapter_dtype, transposed)
    s = 0.7
    expected = check_every_route_pair(backend, x, W, b, A, B, m, s, p, floor=1e-3)
    if p > 0:
        eval_out = dora.dora_linear(x, W, b, A, B, m, s, p, training=False)
        assert rel_err(eval_out.float(), expected[0].float()) > 1e-3, "dropout had no effect: test is vacuous"


@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"drop{p}")
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_op_in_several_row_blocks_matches_spec(clean_routes, backend, p):
    """bf16 x with fp32 adapters at M=300, K=N=1024, r=5: the epilogues and the compose route's widened GEMMs run
    in row blocks (256 rows of a 1024-wide activation, a partial last one); y, dX, dA, dB and dm for each pinned
    route pair by the 2x rule against the spec in fp32."""
    if backend not in backends_here():
        pytest.skip(f"backend {backend} unavailable: {availability(backend)[1]}")
    M, K, N, s = 300, 1024, 1024, 0.7
    assert dora._block_rows(torch.empty(M, K)) < M
    x, W, b, A, B, m = op_case((M,), K, N, 5, torch.bfloat16, torch.float32, transposed=False, seed=4)
    check_every_route_pair(backend, x, W, b, A, B, m, s, p)


def test_split_bf16_parts_sum_to_the_fp32_tensor():
    t = torch.randn(5, 77, generator=torch.Generator().manual_seed(2)) * torch.logspace(-3, 3, 77)
    parts = dora.split_bf16(t)
    assert parts.dtype == torch.bfloat16 and parts.shape == (15, 77)
    assert torch.equal(parts[:5].float() + parts[5:10].float() + parts[10:].float(), t)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_norm_of_a_bf16_weight_under_fp32_adapters_is_peft_fp32_norm(clean_routes, backend):
    """PEFT forms ``W + s B A`` in fp32 from the bf16 weight: every route of ``W A^T`` (``widen``, ``down``;
    ``pairs`` where the backend has the widened product) within 1e-6 of that norm in fp64. A ``W A^T`` taken in bf16
    (A rounded) misses it by far more here, where the adapter term is comparable to the weight's."""
    if backend not in backends_here():
        pytest.skip(f"backend {backend} unavailable: {availability(backend)[1]}")
    g = torch.Generator().manual_seed(8)
    N, K, r, s = 67, 130, 5, 1.7
    W = (0.05 * torch.randn(N, K, generator=g)).to(torch.bfloat16)
    A = torch.randn(r, K, generator=g) / K ** 0.5
    B = 0.05 * torch.randn(N, r, generator=g)
    expected = torch.linalg.norm(W.double() + s * (B.double() @ A.double()), dim=1)
    narrow = torch.mm(W, A.to(torch.bfloat16).t()).float()
    rounded = (dora.row_sq_norms(W) + 2 * s * (B * narrow).sum(1)
               + s * s * (B @ (A @ A.t()) * B).sum(1)).clamp_min(0).sqrt()
    assert rel_err(rounded, expected) > 1e-5, "the case cannot tell an A rounded to bf16 apart: test is vacuous"
    set_backend(backend)
    routes = ["widen", "down"] + (["pairs"] if get_backend(A, W).widened_mm_eligible(W, W) else [])
    assert backend != "cpu" or not fastpeft._C.widened_mm_available() or routes == ["widen", "down", "pairs"]
    for route in routes:
        routing.set_route("widened_product", route)
        got = dora.weight_norm(W, A, B, s)
        assert routing.last_route("widened_product") == route
        assert_close(f"{backend} {route} norm", got, expected, 1e-6)


@pytest.mark.parametrize("rows,cols,p", [(7, 37, 0.1), (1, 1, 0.5), (33, 130, 0.05)])
def test_keep_scale_drawn_by_the_cpu_mask_pass_is_the_masked_dx_pass(rows, cols, p):
    """The cpu backend draws ``mask / (1 - p)`` in one pass (``Backend.dropout_scale``); the reference backend has no
    such pass and reads it off its masked dX (a rank-1 all-ones adapter): bit for bit the same tensor."""
    if "cpu" not in backends_here():
        pytest.skip(f"backend cpu unavailable: {availability('cpu')[1]}")
    from fastpeft.backends import cpu
    from fastpeft.backends.reference_backend import ReferenceBackend

    got = dora.keep_scale(cpu.BACKEND, rows, cols, p, 1234 + rows, "cpu")
    want = dora.keep_scale(ReferenceBackend(), rows, cols, p, 1234 + rows, "cpu")
    assert ReferenceBackend().dropout_scale(rows, cols, p, 1, "cpu") is None
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert 0 < int((got == 0).sum()) < rows * cols or rows * cols == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_column_passes_are_the_torch_epilogues(dtype):
    """DoRA's column scaling and magnitude-gradient dots by the cpu backend's one-pass kernels equal the torch
    implementation they replace (fp32 arithmetic, one rounding), for every kind of ``add``."""
    if "cpu" not in backends_here():
        pytest.skip(f"backend cpu unavailable: {availability('cpu')[1]}")
    from fastpeft.backends import cpu

    torch.manual_seed(5)
    M, N = 33, 70
    z, dy = torch.randn(M, N).to(dtype), torch.randn(M, N).to(dtype)
    scale = torch.rand(N) + 0.5
    for add in (None, torch.randn(N), torch.randn(M, N).to(dtype)):
        got = dora._scaled(z, scale, dtype, add, cpu.BACKEND)
        want = dora._scaled(z, scale, dtype, add)
        assert got.dtype == dtype
        if dtype == torch.float32:
            assert_close("scaled", got, want, 1e-6)
        else:  # fp32 arithmetic may differ in its last bit (a fused multiply-add): at most one bf16 step apart
            assert ((got.float() - want.float()).abs() <= 2 ** -7 * want.float().abs()).all()
            assert (got == want).float().mean() > 0.99
    assert_close("column dots", dora._column_dots(dy, z, cpu.BACKEND), dora._column_dots(dy, z), 1e-5)


def test_norm_without_the_weight_matches_the_formed_weight():
    """``n_j^2 = ||W_j||^2 + 2 s B_j . (W A^T)_j + s^2 B_j A A^T B_j^T`` against ``||W + s B A||`` formed."""
    x, W, b, A, B, m = op_case((5,), 37, 29, 3, torch.float32, torch.float32, transposed=True)
    expected = torch.linalg.norm(W + 0.7 * (B @ A), dim=1)
    assert_close("norm", dora.weight_norm(W, A, B, 0.7), expected, 1e-6)
    # Round-off below zero is clamped, not a NaN: a row the adapter cancels exactly.
    W2 = torch.zeros(2, 4)
    A2 = torch.ones(1, 4)
    B2 = torch.zeros(2, 1)
    W2[0] = 1.0
    B2[0, 0] = -1.0
    norm = dora.weight_norm(W2, A2, B2, 1.0)
    assert torch.isfinite(norm).all() and norm[0].item() == pytest.approx(0.0, abs=1e-3)


# ------------------------------------------------------------------------------------------- the layers vs PEFT
@pytest.mark.parametrize("route", ["auto", "compose", "fused"])
@pytest.mark.parametrize("lead", [(4,), (2, 3)], ids=["2d", "3d"])
def test_dora_mlp_matches_peft(clean_routes, lead, route):
    peft_model, fused = dora_twins(MLP, r=3, lora_alpha=5, target_modules=["up", "down"])
    routing.set_route("dora_forward", route)
    routing.set_route("dora_backward", route)
    compare_forward_backward(peft_model, fused, lambda: torch.randn(*lead, 23), label=f"dora {route}")


def test_dora_conv1d_fan_in_fan_out_matches_peft():
    peft_model, fused = dora_twins(Conv1DMLP, r=3, lora_alpha=4, target_modules=["fc", "proj"], fan_in_fan_out=True)
    compare_forward_backward(peft_model, fused, lambda: torch.randn(2, 5, 19), label="dora conv1d")


def test_dora_dropout_eval_matches_peft_and_training_matches_spec():
    """Dropout 0.1: eval outputs and gradients are PEFT's; in training the layer equals the spec fed the same seed
    (PEFT's nn.Dropout draws from another RNG, so it cannot be the oracle there)."""
    peft_model, fused = dora_twins(MLP, r=3, lora_alpha=5, lora_dropout=0.1, target_modules=["up", "down"])
    compare_forward_backward(peft_model, fused, lambda: torch.randn(6, 23), label="dora drop0.1 eval")
    fused.train()
    fused.zero_grad(set_to_none=True)
    layer = fused.base_model.model.blocks[0]["up"]
    x = torch.randn(6, 23)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    base = layer.base_layer
    x_leaf = x.clone().requires_grad_(True)
    torch.manual_seed(9)
    y = layer(x_leaf)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    got = [y.detach(), x_leaf.grad, A.grad, B.grad, m.grad]
    torch.manual_seed(9)
    seed = int(draw_seeds(1, [0.1], True)[0])
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B, m)]
    y_ref = reference.dora_linear(ref_leaves[0], base.weight, base.bias, *ref_leaves[1:], layer.scaling["default"],
                                  0.1, seed)
    (y_ref * upstream).sum().backward()
    expected = [y_ref.detach()] + [t.grad for t in ref_leaves]
    for name, a, e in zip(("y", "dX", "dA", "dB", "dm"), got, expected):
        assert_close(f"train drop0.1 {name}", a, e, FP32_TOL)
    assert rel_err(got[0], layer.eval()(x).detach()) > 1e-3, "dropout had no effect: test is vacuous"


def test_dora_training_layer_with_its_dropout_module_in_eval_matches_peft(monkeypatch):
    """A layer in training whose dropout module is in eval: PEFT's module drops nothing (and PEFT recomputes the
    base product of the undropped input), so outputs and gradients are PEFT's, with nothing random to tell apart."""
    peft_model, fused = dora_twins(MLP, r=3, lora_alpha=5, lora_dropout=0.3, target_modules=["up", "down"])
    calls = CallCounter(monkeypatch, dora, "layer_forward")
    x, upstream = torch.randn(6, 23), torch.randn(6, 11)
    results = []
    for model in (peft_model, fused):
        model.train()
        for layer in [m for m in model.modules() if hasattr(m, "lora_dropout")]:
            layer.lora_dropout["default"].eval()
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        (y * upstream).sum().backward()
        results.append([y.detach(), xi.grad] + [p.grad for p in trainable(model).values()])
    assert calls.calls == 4, "the fused DoRA path did not run"
    for i, (got, want) in enumerate(zip(results[1], results[0])):
        assert_close(f"tensor {i}", got, want, FP32_TOL)


@pytest.mark.parametrize("adapters", ["fp32", "bf16"])
def test_dora_bf16_within_2x_of_peft(adapters):
    """bf16 base, adapters in fp32 (PEFT's default) or bf16: fastpeft at most 2x as far from PEFT in fp32 as PEFT in
    bf16, for y, dX and the gradients of A, B and the magnitude."""
    dtype = torch.bfloat16
    config = LoraConfig(use_dora=True, init_lora_weights=False, r=4, lora_alpha=8, target_modules=["up", "down"])

    def build_peft(cast):
        torch.manual_seed(0)
        base = MLP(width=64, hidden=96).to(cast)
        torch.manual_seed(1)
        model = get_peft_model(base, copy.deepcopy(config), autocast_adapter_dtype=adapters == "fp32")
        randomize_magnitude(model)
        return model

    peft_model, fused = build_peft(dtype), build_peft(dtype)
    fastpeft.accelerate(fused)
    fp32_ref = build_peft(torch.float32)
    fp32_ref.load_state_dict({k: v.float() for k, v in peft_model.state_dict().items()})
    names = compare_low_precision(peft_model, fused, fp32_ref, torch.randn(33, 64), dtype)
    assert any("lora_magnitude_vector" in n for n in names)


@pytest.mark.parametrize("order", [("default", "plain", "dora2"), ("plain", "dora2", "default")],
                         ids=["dora-first", "lora-first"])
def test_dora_beside_other_adapters_matches_peft(order):
    """Several active adapters, two DoRA and one plain LoRA with a lora_bias: PEFT's meaning, where each DoRA adapter
    scales the sum of the adapters before it, in every order; outputs and every gradient."""
    plain = LoraConfig(r=2, lora_alpha=3, target_modules=["up"], init_lora_weights=False, lora_bias=True)
    second = LoraConfig(r=4, lora_alpha=3, target_modules=["up", "down"], init_lora_weights=False, use_dora=True)
    peft_model, fused = dora_twins(MLP, r=3, lora_alpha=5, target_modules=["up", "down"],
                                   extra_adapters=[("plain", plain), ("dora2", second)])
    for model in (peft_model, fused):
        randomize_magnitude(model, seed=6)
        model.base_model.set_adapter(list(order))
    compare_forward_backward(peft_model, fused, lambda: torch.randn(2, 3, 23), label=f"{order}")
    assert all(row.fused for row in fastpeft.report(fused).layers)


QUANT_CASES = [("nf4", torch.float32, 0.0), ("nf4", torch.bfloat16, 0.0), ("int8", torch.float32, 0.0),
               ("nf4", torch.float32, 0.1), ("nf4", torch.bfloat16, 0.1)]


@pytest.mark.parametrize("kind,dtype,p", QUANT_CASES,
                         ids=[f"{k}-{str(d).split('.')[-1]}-drop{p}" for k, d, p in QUANT_CASES])
def test_dora_over_bitsandbytes_matches_the_dequantized_spec(kind, dtype, p):
    """PEFT's bnb DoRA layers, fused: outputs and every gradient against the spec on the weights decoded by the
    project's own oracle (bitsandbytes' CPU matmul is no oracle), in training mode, dropout fed the same seeds.
    K=96 in the second layer: quantization blocks straddle its rows."""
    pytest.importorskip("bitsandbytes")
    from test_quant_layers import MLP as QuantMLP
    from test_quant_layers import K, _dense, _mark_quantized

    model = _mark_quantized(QuantMLP(kind, False, dtype), kind)
    config = LoraConfig(r=3, lora_alpha=5, target_modules=["up", "down"], use_dora=True, init_lora_weights=False,
                        lora_dropout=p)
    peft_model = get_peft_model(model, config)
    randomize_magnitude(peft_model)
    fastpeft.accelerate(peft_model, strict=True)
    peft_model.train()
    x = torch.randn(2, 5, K).to(dtype)
    leaves = {n: t.detach().float().clone().requires_grad_(True) for n, t in peft_model.named_parameters()
              if t.requires_grad}
    xi = x.clone().requires_grad_(True)
    torch.manual_seed(3)
    with CountFusedCalls() as counter:
        y = peft_model(xi)
    assert counter.calls == 2
    torch.manual_seed(3)
    seeds = [int(draw_seeds(1, [p], True)[0]) if p > 0 else 0 for _ in range(2)]
    xr = x.float().clone().requires_grad_(True)

    def spec(name, inp, seed):
        layer = dict(peft_model.named_modules())[f"base_model.model.{name}"]
        base = layer.get_base_layer()
        leaf = lambda part: leaves[f"base_model.model.{name}.{part}.default.weight"]  # noqa: E731
        out = reference.dora_linear(inp.reshape(-1, inp.shape[-1]), _dense(base), base.bias.float(), leaf("lora_A"),
                                    leaf("lora_B"), leaf("lora_magnitude_vector"), layer.scaling["default"], p, seed)
        return out.view(*inp.shape[:-1], -1)

    y_ref = spec("down", torch.nn.functional.gelu(spec("up", xr, seeds[0])), seeds[1])
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert_close("y", y.float(), y_ref, tol)
    upstream = torch.randn(y.shape)
    y.backward(upstream.to(dtype))
    y_ref.backward(upstream)
    assert_close("dX", xi.grad.float(), xr.grad, tol)
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            assert_close(f"d{name}", param.grad.float(), leaves[name].grad, tol)


# ------------------------------------------------- several adapters with dropout, over bitsandbytes, under autocast
class PhiloxDropout(nn.Module):
    """PEFT's dropout module replaced by fastpeft's mask for ``seed`` over the input flattened to ``(M, K)``, so that
    PEFT's own layer code is the oracle in training with dropout (its ``nn.Dropout`` draws from another RNG)."""

    def __init__(self, p: float, seed: int):
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x):
        return reference.apply_dropout(x.reshape(-1, x.shape[-1]), self.p, self.seed).view(x.shape)


class TwoLinear(nn.Module):
    """in=72 -> 40 -> 72: 'first' holds several adapters, 'second' a lone DoRA adapter."""

    def __init__(self, k=72, n=40):
        super().__init__()
        self.first = nn.Linear(k, n)
        self.second = nn.Linear(n, k)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


SEVERAL_ORDERS = [("default", "plain", "dora2"), ("plain", "dora2", "default")]


def add_several_adapters(model):
    """DoRA ``default`` (r=3, dropout 0.1) on both layers; on 'first' also plain LoRA (r=8, dropout 0.2, lora_bias) and
    DoRA ``dora2`` (r=8, no dropout: it scales the running sum in PEFT's loop)."""
    model.add_adapter("plain", LoraConfig(r=8, lora_alpha=6, target_modules=["first"], init_lora_weights=False,
                                          lora_dropout=0.2, lora_bias=True))
    model.add_adapter("dora2", LoraConfig(r=8, lora_alpha=3, target_modules=["first"], init_lora_weights=False,
                                          use_dora=True))
    randomize_magnitude(model, seed=6)
    return model


def several_config():
    return LoraConfig(r=3, lora_alpha=5, target_modules=["first", "second"], use_dora=True, init_lora_weights=False,
                      lora_dropout=0.1)


def build_several(seed=0):
    torch.manual_seed(seed)
    base = TwoLinear()
    torch.manual_seed(seed + 1)
    return add_several_adapters(get_peft_model(base, several_config()))


def peft_layers(model):
    return [module for module in model.modules() if hasattr(module, "lora_dropout") and hasattr(module, "lora_A")]


def record_seeds(monkeypatch):
    """The dropout seeds fastpeft's DoRA layers draw, one list per call, in call order."""
    drawn = []
    real = dora.draw_seeds

    def recording(n, ps, training):
        seeds = real(n, ps, training)
        drawn.append([int(s) for s in seeds])
        return seeds

    monkeypatch.setattr(dora, "draw_seeds", recording)
    return drawn


def install_masks(model, drawn):
    """Give each PEFT layer of ``model`` with an active dropout (forward order; only those draw) the masks fastpeft
    drew for it: adapter ``i`` of the active ones gets seed ``i`` of the layer's draw; adapters without dropout keep
    PEFT's ``nn.Identity``."""
    def active_names(layer):
        return [name for name in layer.active_adapters if name in layer.lora_A]

    layers = [layer for layer in peft_layers(model)
              if any(isinstance(layer.lora_dropout[name], nn.Dropout) for name in active_names(layer))]
    assert len(drawn) == len(layers), f"{len(drawn)} seed draws for {len(layers)} layers with dropout"
    for layer, seeds in zip(layers, drawn):
        active = active_names(layer)
        assert len(seeds) == len(active)
        for name, seed in zip(active, seeds):
            dropout = layer.lora_dropout[name]
            if isinstance(dropout, nn.Dropout):
                layer.lora_dropout[name] = PhiloxDropout(dropout.p, seed)


def outputs_and_grads(model, x, upstream, context=None):
    """``(y, {'input': dX, parameter: grad})`` of one forward/backward of ``model`` on ``x``."""
    model.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(True)
    with context if context is not None else torch.autocast("cpu", enabled=False):
        y = model(xi)
    (y.float() * upstream).sum().backward()
    return y.detach(), {"input": xi.grad, **{n: p.grad for n, p in trainable(model).items()}}


def compare_by_dtype_rule(label, got, want, oracle=None):
    """Output and every gradient: with no ``oracle`` (all fp32) within ``FP32_TOL`` of PEFT, else by the 2x rule
    against the fp32 ``oracle`` with PEFT's low-precision run as the reference (and the low-precision floor the other
    DoRA tests use)."""
    (y, grads), (y_ref, ref_grads) = got, want
    assert y.dtype == y_ref.dtype, f"{label}: dtype {y.dtype} != {y_ref.dtype}"
    assert grads.keys() == ref_grads.keys()
    assert any("lora_magnitude_vector" in name for name in grads) and any("lora_B.plain.bias" in n for n in grads)
    y32, grads32 = oracle if oracle is not None else (None, {})
    for name in ["y"] + list(grads):
        a, e = (y, y_ref) if name == "y" else (grads[name], ref_grads[name])
        assert a is not None and e is not None, f"{label} d{name}: missing gradient"
        if oracle is None:
            assert_close(f"{label} d{name}", a, e, FP32_TOL)
        else:
            e32 = y32 if name == "y" else grads32[name]
            assert_within_2x(f"{label} d{name}", a.float(), e.float(), e32.float())


def run_fused(fused, x, upstream, monkeypatch, backend, route=None, context=None):
    """``(outputs_and_grads, seeds drawn)`` of ``fused`` (TwoLinear with DoRA) on ``backend`` with both DoRA ops
    pinned to ``route`` (None: left to the route table), after checking that both layers ran fastpeft's path and the
    pinned routes."""
    set_backend(backend)
    if route is not None:
        routing.set_route("dora_forward", route)
        routing.set_route("dora_backward", route)
    drawn = record_seeds(monkeypatch)
    torch.manual_seed(4)
    with CountFusedCalls() as counter:
        got = outputs_and_grads(fused, x, upstream, context)
    assert counter.calls == 2, f"fused path ran {counter.calls} times, not once per layer"
    if route is not None:
        assert routing.last_route("dora_forward") == route and routing.last_route("dora_backward") == route
    return got, drawn


def data(seed):
    """``(x, upstream)``: M=13 rows of 72 features and the upstream gradient of TwoLinear's output."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(13, 72, generator=g), torch.randn(13, 72, generator=g)


def cast_bases(model, dtype):
    for layer in peft_layers(model):
        layer.base_layer.to(dtype)
    return model


SEVERAL_DTYPES = {"fp32": (torch.float32, False), "bf16-base": (torch.bfloat16, False),
                  "bf16-all": (torch.bfloat16, True)}


@pytest.mark.parametrize("order", SEVERAL_ORDERS, ids=["dora-first", "lora-first"])
@pytest.mark.parametrize("dtype_id", list(SEVERAL_DTYPES))
@pytest.mark.parametrize("route", ["compose", "fused"])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_dora_beside_other_adapters_with_dropout_in_training_matches_peft(clean_routes, monkeypatch, backend, route,
                                                                          dtype_id, order):
    """Training with dropout on 'first' (DoRA 0.1, LoRA 0.2, DoRA without dropout) and on the lone DoRA 'second':
    fastpeft's fused layers against PEFT's own layers fed the same Philox masks, M=13, y and every gradient (x, A, B,
    lora_bias, magnitude); every pinned route, every backend here (bf16 not on Triton's interpreter)."""
    if backend not in backends_here():
        pytest.skip(f"backend {backend} unavailable: {availability(backend)[1]}")
    dtype, all_low = SEVERAL_DTYPES[dtype_id]
    if dtype != torch.float32 and backend == "triton":
        pytest.skip("the Triton interpreter's bf16 tl.dot is wrong")
    peft32 = build_several()
    peft_lp = copy.deepcopy(peft32)
    peft_lp = peft_lp.to(dtype) if all_low else cast_bases(peft_lp, dtype)
    fused = copy.deepcopy(peft_lp)
    fastpeft.accelerate(fused, strict=True)
    for model in (peft32, peft_lp, fused):
        model.base_model.set_adapter(list(order))
        model.train()
    assert all(row.fused for row in fastpeft.report(fused).layers), fastpeft.report(fused).layers
    x, upstream = data(21)
    got, drawn = run_fused(fused, x.to(dtype), upstream, monkeypatch, backend, route)
    for model in (peft32, peft_lp):
        install_masks(model, drawn)
    want = outputs_and_grads(peft_lp, x.to(dtype), upstream)
    oracle = outputs_and_grads(peft32, x, upstream) if dtype != torch.float32 else None
    compare_by_dtype_rule(f"{backend} {route} {dtype_id}", got, want, oracle)
    fused.eval()
    with torch.no_grad():
        assert rel_err(got[0].float(), fused(x.to(dtype)).float()) > 1e-2, "dropout had no effect: test is vacuous"


def test_dora_beside_other_adapters_with_dropout_and_a_trainable_base_matches_peft(clean_routes, monkeypatch):
    """With the base weights trainable the stacked path runs the spec's torch ops (dropout by the same Philox masks):
    y and every gradient, the base's weights and biases included, equal PEFT's fed the same masks."""
    peft_model = build_several()
    fused = copy.deepcopy(peft_model)
    fastpeft.accelerate(fused, strict=True)
    for model in (peft_model, fused):
        model.base_model.set_adapter(list(SEVERAL_ORDERS[0]))
        model.train()
        for layer in peft_layers(model):
            layer.base_layer.requires_grad_(True)
    x, upstream = data(24)
    got, drawn = run_fused(fused, x, upstream, monkeypatch, "cpu" if "cpu" in backends_here() else "reference")
    install_masks(peft_model, drawn)
    want = outputs_and_grads(peft_model, x, upstream)
    assert sum("base_layer" in name for name in want[1]) == 4
    compare_by_dtype_rule("trainable base", got, want)


def test_dora_beside_another_adapter_with_dropout_over_conv1d_matches_peft(clean_routes, monkeypatch):
    """transformers' Conv1D (``fan_in_fan_out``, the weight a transposed view): DoRA and a LoRA adapter with dropout
    on 'fc', DoRA alone on 'proj', in training; y and every gradient equal PEFT's fed the same masks."""
    torch.manual_seed(0)
    peft_model = get_peft_model(Conv1DMLP(), LoraConfig(r=3, lora_alpha=5, target_modules=["fc", "proj"],
                                                        use_dora=True, init_lora_weights=False, lora_dropout=0.1,
                                                        fan_in_fan_out=True))
    peft_model.add_adapter("plain", LoraConfig(r=2, target_modules=["fc"], init_lora_weights=False, lora_dropout=0.2,
                                               fan_in_fan_out=True, lora_bias=True))
    randomize_magnitude(peft_model)
    fused = copy.deepcopy(peft_model)
    fastpeft.accelerate(fused, strict=True)
    for model in (peft_model, fused):
        model.base_model.set_adapter(["default", "plain"])
        model.train()
    g = torch.Generator().manual_seed(25)
    x, upstream = torch.randn(2, 5, 19, generator=g), torch.randn(2, 5, 19, generator=g)
    got, drawn = run_fused(fused, x, upstream, monkeypatch, "cpu" if "cpu" in backends_here() else "reference")
    install_masks(peft_model, drawn)
    compare_by_dtype_rule("conv1d", got, outputs_and_grads(peft_model, x, upstream))


AUTOCAST_CASES = [("eval", False), ("train-drop", True)]


@pytest.mark.parametrize("mode,training", AUTOCAST_CASES, ids=[c[0] for c in AUTOCAST_CASES])
@pytest.mark.parametrize("route", ["compose", "fused"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_dora_under_autocast_matches_peft(clean_routes, monkeypatch, backend, route, mode, training):
    """fp32 model under ``torch.autocast("cpu", dtype=torch.bfloat16)``, several adapters on 'first' and a lone DoRA
    adapter on 'second': fastpeft fused, its output bf16 as PEFT's, and within 2x of PEFT-without-autocast (fp32) as
    PEFT under autocast is, for y and every gradient; in eval and in training with dropout (the same masks)."""
    if backend not in backends_here():
        pytest.skip(f"backend {backend} unavailable: {availability(backend)[1]}")
    peft32 = build_several()
    peft_ac = copy.deepcopy(peft32)
    fused = copy.deepcopy(peft32)
    fastpeft.accelerate(fused, strict=True)
    for model in (peft32, peft_ac, fused):
        model.base_model.set_adapter(list(SEVERAL_ORDERS[0]))
        model.train(training)
    x, upstream = data(22)
    got, drawn = run_fused(fused, x, upstream, monkeypatch, backend, route, torch.autocast("cpu", dtype=torch.bfloat16))
    if training:
        for model in (peft32, peft_ac):
            install_masks(model, drawn)
    want = outputs_and_grads(peft_ac, x, upstream, torch.autocast("cpu", dtype=torch.bfloat16))
    assert want[0].dtype == torch.bfloat16
    oracle = outputs_and_grads(peft32, x, upstream)
    compare_by_dtype_rule(f"autocast {backend} {route} {mode}", got, want, oracle)


BNB_SEVERAL = [("nf4", torch.float32, 0.1, False), ("nf4", torch.bfloat16, 0.1, False),
               ("int8", torch.float32, 0.1, False), ("nf4", torch.float32, 0.0, False),
               ("nf4", torch.float32, 0.1, True), ("int8", torch.float32, 0.0, True)]


def quantized_two_linear(kind, dtype):
    """``(model, decoded)``: TwoLinear with bitsandbytes bases (72 -> 40 -> 72: 4-bit blocks of 64 straddle rows) and
    its fp32 twin over the weights decoded by the tests' own oracle (bitsandbytes' CPU matmul is no oracle)."""
    from test_quant_layers import _dense, _mark_quantized, _quant_linear

    g = torch.Generator().manual_seed(0)
    model, decoded = TwoLinear(), TwoLinear()
    for name, (n, k) in (("first", (40, 72)), ("second", (72, 40))):
        w, b = torch.randn(n, k, generator=g) * 0.1, torch.randn(n, generator=g) * 0.1
        layer = _quant_linear(w, b, kind, False, dtype)
        dense = getattr(decoded, name)
        with torch.no_grad():
            dense.weight.copy_(_dense(layer))
            dense.bias.copy_(layer.bias.float())
        setattr(model, name, layer)
    return _mark_quantized(model, kind), decoded


@pytest.mark.parametrize("kind,dtype,p,autocast", BNB_SEVERAL,
                         ids=[f"{k}-{str(d).split('.')[-1]}-drop{p}" + ("-autocast" if a else "")
                              for k, d, p, a in BNB_SEVERAL])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_several_dora_adapters_over_bitsandbytes_match_peft_on_the_decoded_weights(clean_routes, monkeypatch, backend,
                                                                                   kind, dtype, p, autocast):
    """PEFT's bnb layers with two DoRA adapters and a LoRA one on 'first', a lone DoRA adapter on 'second', fused,
    in training (dropout fed the same masks): y and every gradient against PEFT's dense layers over the decoded
    weights; fp32 within ``FP32_TOL``, bf16 by the 2x rule against them in fp32 (PEFT's dense layers over bf16 bases,
    or under the same ``torch.autocast("cpu", bfloat16)``, as the reference)."""
    pytest.importorskip("bitsandbytes")
    if backend not in backends_here():
        pytest.skip(f"backend {backend} unavailable: {availability(backend)[1]}")
    qmodel, decoded = quantized_two_linear(kind, dtype)
    config = several_config()
    config.lora_dropout = p
    torch.manual_seed(1)
    fused = add_several_adapters(get_peft_model(qmodel, config))
    fastpeft.accelerate(fused, strict=True)
    peft32 = add_several_adapters(get_peft_model(decoded, copy.deepcopy(config)))
    adapter_state = {k: v for k, v in fused.state_dict().items() if "lora_" in k}
    assert all(v.dtype == torch.float32 for v in adapter_state.values())
    missing = peft32.load_state_dict(adapter_state, strict=False)
    assert not missing.unexpected_keys
    low = dtype != torch.float32 or autocast
    peft_lp = cast_bases(copy.deepcopy(peft32), dtype) if low else peft32
    for model in (peft32, peft_lp, fused):
        model.base_model.set_adapter(list(SEVERAL_ORDERS[0]))
        model.train()
    assert all(row.fused for row in fastpeft.report(fused).layers), fastpeft.report(fused).layers
    x, upstream = data(23)
    context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else (lambda: None)
    got, drawn = run_fused(fused, x.to(dtype), upstream, monkeypatch, backend, context=context())
    for model in {id(peft32): peft32, id(peft_lp): peft_lp}.values():
        install_masks(model, drawn)
    want = outputs_and_grads(peft_lp, x.to(dtype), upstream, context())
    if autocast:  # PEFT's bnb layers return x's dtype under autocast (bitsandbytes casts back), its dense ones bf16
        assert got[0].dtype == x.dtype
        want = (want[0].to(x.dtype), want[1])
    oracle = outputs_and_grads(peft32, x, upstream) if low else None
    compare_by_dtype_rule(f"{kind} {backend}", got, want, oracle)


def test_dora_on_a_quantized_base_under_peft_generic_layer_stays_peft_and_says_why():
    """PEFT's generic lora.Linear around a bitsandbytes base (a model not marked as quantized) keeps PEFT's layer
    whole: its DoRA merge would add to the packed bytes, and accelerate names the reason."""
    bnb = pytest.importorskip("bitsandbytes")
    lin = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.randn(32, 64) * 0.1, requires_grad=False, quant_type="nf4", blocksize=64)
    peft_model = get_peft_model(nn.Sequential(lin.to("cpu")), LoraConfig(r=2, target_modules=["0"], use_dora=True))
    layer = peft_model.base_model.model[0]
    kind = type(layer)
    with pytest.warns(UserWarning, match="DoRA on a quantized base under PEFT's generic lora.Linear is not fused"):
        fastpeft.accelerate(peft_model)
    assert type(layer) is kind


def test_accelerate_fuses_dora_layers_without_warning(recwarn):
    torch.manual_seed(0)
    model = get_peft_model(MLP(), LoraConfig(r=2, target_modules=["up", "down"], use_dora=True))
    fastpeft.accelerate(model, strict=True)
    assert len(fused_layers(model)) == 4
    assert not [w for w in recwarn if "not fused" in str(w.message)]


@pytest.mark.parametrize("how", ["compiled-fullgraph", "trainable-base"])
def test_dora_compiled_or_with_a_trainable_base_matches_peft(how):
    """Under torch.compile (one graph, no break) and with a trainable base weight (autograd reaches W and b), the
    layer computes PEFT's DoRA: outputs and every gradient, the base's included."""
    peft_model, fused = dora_twins(lambda: nn.Sequential(nn.Linear(37, 29)), r=3, lora_alpha=5, target_modules=["0"])
    layers = [model.base_model.model[0] for model in (peft_model, fused)]
    run = lambda layer, x: layer(x)  # noqa: E731
    if how == "trainable-base":
        for layer in layers:
            layer.base_layer.requires_grad_(True)
    else:
        torch._dynamo.reset()
        compiled = torch.compile(layers[1], fullgraph=True, backend="eager")
        run = lambda layer, x: compiled(x) if layer is layers[1] else layer(x)  # noqa: E731
    x = torch.randn(3, 5, 37)
    results = []
    for layer in layers:
        xi = x.clone().requires_grad_(True)
        y = run(layer, xi)
        (y * torch.linspace(-1, 1, 29)).sum().backward()
        results.append([y.detach(), xi.grad] + [p.grad for p in layer.parameters() if p.requires_grad])
    assert len(results[0]) == len(results[1]) == (7 if how == "trainable-base" else 5)
    for i, (a, e) in enumerate(zip(results[1], results[0])):
        assert_close(f"{how} output/grad {i}", a, e, FP32_TOL)


# ------------------------------------------------------------------------------------------ nothing N x K per call
class RecordSizes(TorchDispatchMode):
    """The largest number of elements of any tensor an op allocated (views of existing storage, such as the
    transposed weight, allocate nothing and are not counted)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        existing = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in existing:
                self.largest = max(self.largest, t.numel())
                self.sizes.append(t.numel())
        return out

    def at_least(self, elements: int) -> int:
        """How many allocated tensors had at least ``elements`` elements."""
        return sum(size >= elements for size in self.sizes)


@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"drop{p}")
@pytest.mark.parametrize("route", ["compose", "fused"])
def test_no_n_by_k_tensor_per_call_and_peft_as_control(clean_routes, route, p):
    """M=5 < N=29 < K=37: every activation-sized tensor is smaller than N x K, so a tensor of N*K elements can only be
    the adapted weight. PEFT's forward forms it (the control that proves the check can fail); fastpeft's forward
    and backward, training with dropout included, never do."""
    N, K = 29, 37
    peft_layer, fused_layer = (
        get_peft_model(nn.Sequential(nn.Linear(K, N)),
                       LoraConfig(r=3, target_modules=["0"], use_dora=True, lora_dropout=p, init_lora_weights=False))
        for _ in range(2))
    fastpeft.accelerate(fused_layer)
    routing.set_route("dora_forward", route)
    routing.set_route("dora_backward", route)
    x = torch.randn(5, K, requires_grad=True)
    for model, must_form in ((peft_layer, True), (fused_layer, False)):
        model.train()
        with RecordSizes() as rec:
            model(x).sum().backward()
        if must_form:
            assert rec.largest >= N * K, "control: PEFT's DoRA formed no N x K weight, so the check proves nothing"
        else:
            assert rec.largest < N * K, f"fastpeft formed a tensor of {rec.largest} elements (N x K = {N * K})"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_stacked_routes_form_no_n_by_k_tensor_and_ran(dtype):
    """The stacked forward and backward (a bf16 or fp32 base, PEFT's fp32 adapters, dropout): their (2M, K) and
    (2M, N) operands and products stay below N x K at M=5 < N=29 < K=37, they are the routes that ran, and nothing
    saved holds the transient (2M, N) product."""
    N, K = 29, 37
    layer = get_peft_model(nn.Sequential(nn.Linear(K, N).to(dtype)),
                           LoraConfig(r=3, target_modules=["0"], use_dora=True, lora_dropout=0.1,
                                      init_lora_weights=False))
    fastpeft.accelerate(layer)
    x = torch.randn(5, K, dtype=dtype, requires_grad=True)
    if "stacked" not in dora._backward_routes(get_backend(x, layer.base_model.model[0].base_layer.weight), x,
                                              layer.base_model.model[0].base_layer.weight,
                                              layer.base_model.model[0].lora_A["default"].weight, 0.1, True):
        assert dtype == torch.bfloat16, "the fp32 stacked route runs on every CPU"
        pytest.skip("no widened bf16 product on this CPU: the stacked route cannot run")
    routing.set_route("dora_forward", "stacked")
    routing.set_route("dora_backward", "stacked")
    saved_bytes = []

    def pack(t):
        saved_bytes.append(t.untyped_storage().nbytes())
        return t

    try:
        layer.train()
        with RecordSizes() as rec, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x)
        y.float().sum().backward()
        assert routing.last_route("dora_forward") == "stacked" and routing.last_route("dora_backward") == "stacked"
    finally:
        routing.set_route("dora_forward", None)
        routing.set_route("dora_backward", None)
    assert rec.largest < N * K, f"fastpeft formed a tensor of {rec.largest} elements (N x K = {N * K})"
    # z is saved as its own (M, N) fp32, not as a view holding the whole (2M, N) product alive.
    assert saved_bytes and max(saved_bytes) < 2 * 5 * N * 4, f"saved storages of {sorted(saved_bytes)} bytes"
    assert x.grad is not None and torch.isfinite(x.grad).all()


def several_on_one_linear(K, N, p, build=None, quantized_kind=None):
    """PEFT model over one linear layer (``build()``, default ``nn.Linear(K, N)``; marked as loaded in
    ``quantized_kind`` so PEFT builds its bitsandbytes layers) holding DoRA ``default``, plain LoRA ``plain`` and DoRA
    ``dora2``, all active, each with dropout ``p``; in training mode."""
    from test_quant_layers import _mark_quantized

    torch.manual_seed(0)
    base = nn.Sequential(build() if build is not None else nn.Linear(K, N))
    if quantized_kind is not None:
        _mark_quantized(base, quantized_kind)
    model = get_peft_model(base,
                           LoraConfig(r=3, target_modules=["0"], use_dora=True, init_lora_weights=False,
                                      lora_dropout=p))
    model.add_adapter("plain", LoraConfig(r=2, target_modules=["0"], init_lora_weights=False, lora_dropout=p))
    model.add_adapter("dora2", LoraConfig(r=4, target_modules=["0"], init_lora_weights=False, use_dora=True,
                                          lora_dropout=p))
    model.base_model.set_adapter(["default", "plain", "dora2"])
    return model.train()


@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"drop{p}")
def test_no_n_by_k_tensor_beside_other_adapters(p):
    """DoRA beside other adapters, in training, with and without dropout: the stacked path (products on dropped inputs
    included) forms no N x K tensor, forward or backward; PEFT does."""
    N, K = 29, 37
    models = [several_on_one_linear(K, N, p) for _ in range(2)]
    fastpeft.accelerate(models[1])
    x = torch.randn(5, K, requires_grad=True)
    largest = []
    for model in models:
        with CountFusedCalls() as counter, RecordSizes() as rec:
            model(x).sum().backward()
        assert counter.calls == (1 if model is models[1] else 0)
        largest.append(rec.largest)
    assert largest[0] >= N * K, "control: PEFT's DoRA formed no N x K weight, so the check proves nothing"
    assert largest[1] < N * K, f"fastpeft formed a tensor of {largest[1]} elements (N x K = {N * K})"


def test_no_n_by_k_tensor_per_call_for_several_dora_adapters_over_bitsandbytes(clean_routes, monkeypatch):
    """Several DoRA adapters over an nf4 base, in training with dropout, on the CPU backend with every op on its
    ``fused`` route (the quantized weight decoded tile by tile inside the products; K=4096 makes a tile, 2**18
    elements, a quarter of the weight): after the first call (which decodes the weight once for the cached
    ``||W_j||^2``) a call, forward and backward, allocates nothing N x K; PEFT's forward dequantizes and forms
    ``W + s B A`` every call."""
    pytest.importorskip("bitsandbytes")
    if "cpu" not in backends_here():
        pytest.skip(f"backend cpu unavailable: {availability('cpu')[1]}")
    from test_quant_layers import _quant_linear

    monkeypatch.setenv("FASTPEFT_ROUTE", "fused")
    N, K = 256, 4096
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(N, K, generator=g) * 0.1, torch.randn(N, generator=g) * 0.1
    models = [several_on_one_linear(K, N, 0.1, build=lambda: _quant_linear(w, b, "nf4", False, torch.float32),
                                    quantized_kind="nf4") for _ in range(2)]
    assert type(models[0].base_model.model[0]).__module__ == "peft.tuners.lora.bnb"
    set_backend("cpu")
    fastpeft.accelerate(models[1], strict=True)
    x = torch.randn(5, K, requires_grad=True)
    models[1](x).sum().backward()  # the first call: cached norms, the backend's decode buffer
    with CountFusedCalls() as counter, RecordSizes() as rec:
        models[1](x).sum().backward()
    assert counter.calls == 1
    assert rec.largest < N * K, f"fastpeft formed a tensor of {rec.largest} elements (N x K = {N * K})"
    with torch.no_grad(), RecordSizes() as control:
        models[0](x)
    assert control.largest >= N * K, "control: PEFT's DoRA formed no N x K weight, so the check proves nothing"


@pytest.mark.parametrize("route", ["compose", "fused"])
@pytest.mark.parametrize("adapters", ["lone", "several"])
def test_no_n_by_k_tensor_under_autocast_beyond_the_base_layers_own_cast(monkeypatch, adapters, route):
    """Under ``torch.autocast("cpu", bfloat16)`` the frozen base layer itself casts its weight (one N x K tensor per
    call, what ``F.linear`` does under autocast). fastpeft's DoRA layer, in training with dropout, allocates no more
    N x K tensors than that, forward and backward; PEFT's allocates more (it forms ``W + s B A``). Every op is pinned
    to ``route``: the backend's LoRA op also has bf16 routes that widen the weight to fp32 (``compose_fp32``,
    ``fused_fp32``), a LoRA speed choice of their own."""
    monkeypatch.setenv("FASTPEFT_ROUTE", route)
    N, K = 29, 37
    if adapters == "several":
        models = [several_on_one_linear(K, N, 0.1) for _ in range(2)]
    else:
        models = [get_peft_model(nn.Sequential(nn.Linear(K, N)),
                                 LoraConfig(r=3, target_modules=["0"], use_dora=True, init_lora_weights=False,
                                            lora_dropout=0.1)).train() for _ in range(2)]
    fastpeft.accelerate(models[1])
    x = torch.randn(5, K, requires_grad=True)
    counts = []
    for module in (models[0].base_model.model[0].base_layer, models[0], models[1]):
        with CountFusedCalls() as counter, RecordSizes() as rec:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = module(x)
            y.float().sum().backward()
        assert counter.calls == (1 if module is models[1] else 0)
        counts.append(rec.at_least(N * K))
    base, peft_count, fast = counts
    assert base >= 1, "control: the base layer under autocast cast no weight, so the bound proves nothing"
    assert peft_count > base, "control: PEFT's DoRA formed no N x K weight, so the check proves nothing"
    assert fast <= base, f"fastpeft allocated {fast} N x K tensors, the base layer alone {base}"


def fp32_allocations_of_at_least(elements: int, fn) -> int:
    """How many fp32-sized buffers of ``elements`` or more the CPU allocator handed out while ``fn()`` ran (torch's
    profiler memory events: they include the temporaries torch's kernels allocate internally, which a dispatch mode
    does not see)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(event.cpu_memory_usage >= 4 * elements for event in prof.events()
               if event.name in ("aten::empty", "aten::empty_strided"))


def test_bf16_epilogues_are_exact_and_form_no_fp32_m_by_n_temporary():
    """The DoRA epilogues on bf16 ``(M, N)`` tensors, M=300 (a partial last block): ``c * z (+ b)``, ``L + (c - 1) z``
    and ``c * dY`` equal torch's fp32 expression rounded once, bit for bit, and ``sum_m dY z`` equals the fp32 sum;
    none allocates an fp32 tensor of M x N elements, where the plain expressions (the control) allocate several."""
    g = torch.Generator().manual_seed(0)
    M, N = 300, 2048
    z, L, dy = (torch.randn(M, N, generator=g).bfloat16() for _ in range(3))
    scale, bias = torch.rand(N, generator=g) + 0.5, torch.randn(N, generator=g)
    bf16 = torch.bfloat16
    cases = {
        "c z": (lambda: dora._scaled(z, scale, bf16), lambda: torch.mul(z, scale).to(bf16)),
        "c z + b": (lambda: dora._scaled(z, scale, bf16, bias), lambda: torch.addcmul(bias, z, scale).to(bf16)),
        "L + (c - 1) z": (lambda: dora._scaled(z, scale - 1, bf16, L), lambda: torch.addcmul(L, z, scale - 1).to(bf16)),
    }
    for name, (fused, plain) in cases.items():
        assert torch.equal(fused(), plain()), name
        assert fp32_allocations_of_at_least(M * N, plain) >= 1, f"control {name}: the check proves nothing"
        assert fp32_allocations_of_at_least(M * N, fused) == 0, name
    plain_dots = lambda: torch.mul(dy.float(), z).sum(0)  # noqa: E731
    assert_close("sum dY z", dora._column_dots(dy, z), plain_dots(), 1e-6)
    assert fp32_allocations_of_at_least(M * N, plain_dots) >= 2
    assert fp32_allocations_of_at_least(M * N, lambda: dora._column_dots(dy, z)) == 0


# -------------------------------------------------------------------------------------------------- caching
def test_norm_and_scale_are_cached_and_recomputed_when_a_tensor_changes(monkeypatch):
    peft_model, fused = dora_twins(MLP, r=3, lora_alpha=5, target_modules=["up"])
    peft_model.eval(), fused.eval()
    calls = {"norm": 0, "weight_sq": 0}
    real_norm, real_sq = dora.weight_norm, dora.row_sq_norms

    def counted(key, fn):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(dora, "weight_norm", counted("norm", real_norm))
    monkeypatch.setattr(dora, "row_sq_norms", counted("weight_sq", real_sq))
    x = torch.randn(3, 23)

    def check(label):
        with torch.no_grad():
            assert_close(label, fused(x), peft_model(x), FP32_TOL)

    check("first")
    assert calls == {"norm": 2, "weight_sq": 2}  # two DoRA layers
    check("cached")
    assert calls == {"norm": 2, "weight_sq": 2}
    for model in (peft_model, fused):  # an optimizer-like in-place step on A, then on m, then on W
        with torch.no_grad():
            model.base_model.model.blocks[0]["up"].lora_A["default"].weight.mul_(1.1)
    check("after A changed")
    assert calls == {"norm": 3, "weight_sq": 2}
    for model in (peft_model, fused):
        with torch.no_grad():
            model.base_model.model.blocks[0]["up"].lora_magnitude_vector["default"].weight.mul_(0.9)
    check("after m changed")
    for model in (peft_model, fused):
        with torch.no_grad():
            model.base_model.model.blocks[1]["up"].base_layer.weight.add_(0.05)
    check("after W changed")
    assert calls == {"norm": 4, "weight_sq": 3}
    with torch.inference_mode():
        assert_close("inference_mode", fused(x), peft_model(x), FP32_TOL)


@pytest.mark.parametrize("adapters", ["lone", "several"])
def test_training_after_an_inference_mode_call_matches_peft(adapters):
    """Norms cached under ``torch.inference_mode`` are inference tensors, which autograd cannot save: a training call
    afterwards (evaluation in the middle of training) recomputes them and gives PEFT's outputs and gradients."""
    extra = [("plain", LoraConfig(r=2, lora_alpha=3, target_modules=["up"], init_lora_weights=False))]
    peft_model, fused = dora_twins(MLP, r=3, lora_alpha=5, target_modules=["up", "down"],
                                   extra_adapters=extra if adapters == "several" else ())
    if adapters == "several":
        for model in (peft_model, fused):
            model.base_model.set_adapter(["default", "plain"])
    x = torch.randn(4, 23)
    fused.eval()
    with torch.inference_mode():
        assert_close("inference_mode", fused(x), peft_model.eval()(x), FP32_TOL)
    compare_forward_backward(peft_model, fused, lambda: x, label=f"after inference_mode ({adapters})")


def test_cached_scale_follows_a_recomputed_norm_even_at_a_reused_address():
    """The scale is keyed by the norm tensor itself, not its ``id``: a new norm (A or B changed) gives a new scale."""
    cache = dora.DoraCache()
    m = torch.full((3,), 2.0)
    with torch.no_grad():
        first = cache.scale("a", m, torch.ones(3))  # that norm is freed right away; the next may reuse its id
        second = cache.scale("a", m, torch.full((3,), 4.0))
    assert torch.equal(first, torch.full((3,), 2.0)) and torch.equal(second, torch.full((3,), 0.5))
    norm = torch.full((3,), 4.0)
    with torch.no_grad():
        assert cache.scale("a", m, norm) is cache.scale("a", m, norm)
        m.mul_(2.0)
        assert torch.equal(cache.scale("a", m, norm), torch.ones(3))


# ------------------------------------------------------------------------------------- merge, files, patch, errors
def test_dora_files_round_trip_through_peft(tmp_path):
    torch.manual_seed(0)
    fused = fastpeft.patch(MLP(), r=3, lora_alpha=5, target_modules=["up", "down"], use_dora=True,
                           init_lora_weights=False)
    randomize_magnitude(fused)
    assert len(fused_layers(fused)) == 4
    fused.eval()
    x = torch.randn(4, 23)
    with torch.no_grad():
        expected = fused(x)
    fastpeft.save_pretrained(fused, str(tmp_path / "a"))
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(MLP(), str(tmp_path / "a")).eval()
    with torch.no_grad():
        assert_close("peft-loaded", loaded(x), expected, FP32_TOL)
    loaded.save_pretrained(str(tmp_path / "b"))
    torch.manual_seed(0)
    reloaded = fastpeft.load_adapter(MLP(), str(tmp_path / "b")).eval()
    assert len(fused_layers(reloaded)) == 4
    with torch.no_grad():
        assert_close("fastpeft-loaded", reloaded(x), expected, FP32_TOL)


def test_dora_file_with_a_wrong_magnitude_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = fastpeft.patch(MLP(), r=2, target_modules=["up"], use_dora=True)
    fastpeft.save_pretrained(model, str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("lora_magnitude_vector"))
    tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"lora_magnitude_vector.*shape \(36,\).*needs \(37,\)"):
        fastpeft.load_adapter(MLP(), str(tmp_path))


def test_bad_dora_inputs_name_the_module_and_the_tensor():
    torch.manual_seed(0)
    model = fastpeft.patch(MLP(), r=2, target_modules=["up"], use_dora=True)
    with pytest.raises(ValueError, match=r"blocks\.0\.up.*22 features"):
        model(torch.randn(2, 22))
    with pytest.raises(TypeError, match=r"blocks\.0\.up.*dtype torch\.float64"):
        model(torch.randn(2, 23, dtype=torch.float64))
    layer = model.base_model.model.blocks[0]["up"]
    layer.lora_magnitude_vector["default"].weight = nn.Parameter(torch.ones(5))
    with pytest.raises(ValueError, match=r"blocks\.0\.up.*DoRA tensor magnitude has shape \(5,\).*needs \(37,\)"):
        model(torch.randn(2, 23))
    W = torch.randn(29, 37)
    with pytest.raises(ValueError, match=r"DoRA tensor lora_B has shape \(28, 3\)"):
        dora.dora_linear(torch.randn(2, 37), W, None, torch.randn(3, 37), torch.randn(28, 3), torch.ones(29), 1.0,
                         0.0, training=False)


@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"drop{p}")
def test_bench_dora_providers_compute_peft_dora(p):
    """The bench's dora kind: PEFT's DoRA layer, the torch composition and fastpeft give the same eval output, so the
    timings compare the same arithmetic."""
    from fastpeft.bench import cases as C

    case = C.Case("dora", "2048", 64, 64, 5, "fp32", p, "infer", r=4)
    x, _ = C.make_inputs(case, torch.device("cpu"))
    shared = C.build(case, "base", torch.device("cpu"), x).module
    outputs = {}
    for provider in ("peft", "compose", "fastpeft"):
        built = C.build(case, provider, torch.device("cpu"), x, shared_base=shared)
        randomize_magnitude(built.model)
        built.model.eval()
        with torch.no_grad():
            outputs[provider] = built.module(x)
    assert C.build(case, "fastpeft", torch.device("cpu"), x, shared_base=shared).fused
    assert_close("compose", outputs["compose"], outputs["peft"], FP32_TOL)
    assert_close("fastpeft", outputs["fastpeft"], outputs["peft"], FP32_TOL)
