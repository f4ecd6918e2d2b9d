"""DoRA (``LoraConfig(use_dora=True)``) as an op: ``fastpeft.dora.dora_linear`` means what PEFT's
``DoraLinearLayer`` means.

The op is checked against the executable spec (``fastpeft.reference.dora_linear``, written as PEFT writes it) on
every backend available here and every route pinned, dropout included (the spec is fed the seed the op drew, so both
apply the same mask).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close, assert_within_2x, rel_err

from fastpeft import dora, reference, routing
from fastpeft.backends import availability, set_backend
from fastpeft.functional import draw_seeds

FP32_TOL = 1e-5
ROUTE_PAIRS = [(f, b) for f in ("compose", "fused") for b in ("compose", "fused")]
DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture
def clean_routes():
    yield
    routing.set_route("dora_forward", None)
    routing.set_route("dora_backward", None)
    set_backend(None)


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

    def spec(xx, AA, BB, mm, f32=False):
        torch.manual_seed(3)
        seed = int(draw_seeds(1, [p], True)[0]) if p > 0 else 0
        cast = (lambda t: t.float()) if f32 else (lambda t: t)
        x2 = cast(xx).reshape(-1, 37)
        y = reference.dora_linear(x2, cast(W), cast(b), cast(AA), cast(BB), cast(mm), s, p, seed)
        return y.view(*lead, 29)

    expected = run_with_grads(spec, x, A, B, m)
    expected32 = run_with_grads(lambda *t: spec(*t, f32=True), x, A, B, m)
    set_backend(backend)
    for fwd, bwd in ROUTE_PAIRS:
        routing.set_route("dora_forward", fwd)
        routing.set_route("dora_backward", bwd)

        def fused(xx, AA, BB, mm):
            torch.manual_seed(3)
            return dora.dora_linear(xx, W, b, AA, BB, mm, s, p, training=True)

        got = run_with_grads(fused, x, A, B, m)
        assert routing.last_route("dora_forward") == fwd and routing.last_route("dora_backward") == bwd
        for name, a, e, e32 in zip(("y", "dX", "dA", "dB", "dm"), got, expected, expected32):
            label = f"{backend} {fwd}/{bwd} {name}"
            assert a.dtype == e.dtype, f"{label}: dtype {a.dtype} != {e.dtype}"
            if dtype == torch.float32 and adapter_dtype == torch.float32:
                assert_close(label, a, e, FP32_TOL)
            else:
                assert_within_2x(label, a.float(), e.float(), e32, 1e-3)
    if p > 0:
        eval_out = dora.dora_linear(x, W, b, A, B, m, s, p, training=False)
        assert rel_err(eval_out.float(), expected[0].float()) > 1e-3, "dropout had no effect: test is vacuous"


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
