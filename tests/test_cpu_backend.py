"""The ``cpu`` backend (compiled extension ``fastpeft._C``) against the executable spec.

Every output and gradient (y, xa, dX, dA, dB, dbias; IA3 y, dX, dscale) is compared with ``ReferenceBackend`` and,
in fp32, with torch autograd through ``fastpeft.reference.lora_linear``. Tolerances: fp32 relative error <= 1e-5;
bf16/fp16 at most 2x the error that the reference computed in the same dtypes makes against an fp32 reference (plus
a tiny floor). The dropout mask must equal ``fastpeft._philox`` bit for bit, on every SIMD path this CPU runs.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch
from checks import CallCounter, assert_by_dtype_rule, assert_close, assert_within_2x, rel_err

from fastpeft import reference as spec
from fastpeft import routing as routes
from fastpeft._derived import kept_copies
from fastpeft._philox import dropout_keep_mask, philox_uniform
from fastpeft.backends.cpu import BACKEND as CPU
from fastpeft.backends.reference_backend import ReferenceBackend

AVAILABLE, REASON = CPU.availability()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"cpu backend unavailable: {REASON}")
REF = ReferenceBackend()

if AVAILABLE:
    from fastpeft import _C

    ISAS = list(_C.supported_isas())
else:
    ISAS = []

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(params=ISAS or ["none"])
def isa(request):
    """Run the test on every SIMD path this CPU supports (generic, avx2, avx512)."""
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa("auto")


# ------------------------------------------------------------------------------------------------ dropout mask
@pytest.mark.parametrize("seed,rows,cols,p", [(0, 3, 123, 0.1), (12345, 17, 2048, 0.5), (2**31 - 2, 5, 97, 0.1),
                                              (7, 1, 1, 0.3), (99, 4, 33, 0.9)])
def test_mask_matches_philox_spec(isa, seed, rows, cols, p):
    got = _C.keep_mask(seed, rows, cols, p)
    want = dropout_keep_mask(seed, rows, cols, p)
    assert torch.equal(got, want), f"{isa}: {(got != want).sum().item()} mask bits differ"


@pytest.mark.parametrize("offset0", [2**35 - 21, 3 * 2**35 + 5, 2**35 - 70, 2**35 - 8 * 17, 2**40 - 7])
def test_mask_high_counter_word(isa, offset0):
    """Counters (offset // 8) past 2**32 use the high Philox counter word; a vector of counters that straddles the
    wrap (offsets around 2**35) must carry. Unaligned starts and ends take the scalar calls or a cut block."""
    n, p, seed = 203, 0.4, 4242
    got = _C.keep_mask_at(seed, offset0, n, p)
    want = philox_uniform(seed, torch.arange(offset0, offset0 + n, dtype=torch.int64)) >= torch.tensor(
        p, dtype=torch.float32
    )
    assert torch.equal(got, want)


def test_mask_every_start_and_length(isa):
    """A range is drawn in vector blocks of Philox calls that start at the call holding its first element: starts
    at every position within a call, and lengths that end inside the first call, cut the first block, fill whole
    blocks (up to two AVX-512 blocks) or end one element past them, are each the spec's elements."""
    seed, p = 2024, 0.3
    spec = philox_uniform(seed, torch.arange(4096, dtype=torch.int64)) >= torch.tensor(p, dtype=torch.float32)
    for start in range(0, 17):
        for n in (1, 2, 7, 8, 9, 15, 16, 17, 31, 63, 64, 65, 127, 128, 129, 200, 255, 256, 257, 1000):
            got = _C.keep_mask_at(seed, start, n, p)
            assert torch.equal(got, spec[start:start + n]), f"{isa}: start {start}, {n} elements"


def test_mask_at_probabilities_equal_to_drawn_uniforms(isa):
    """The vector loop compares each 16-bit draw with the integer threshold ``ceil(p * 65536)``: ``p`` equal to
    uniforms the mask itself draws (ties keep), just above and below them, the ends 0 and 1, a tiny ``p``, and
    probabilities alternating between calls, bit-exact with the spec."""
    seed, n = 31337, 4099
    u = philox_uniform(seed, torch.arange(n, dtype=torch.int64))
    drawn = u.sort().values
    probabilities = [drawn[n // 2].item(), drawn[7].item(), drawn[-1].item(), 0.0, 1.0, 1e-10, 0.5]
    probabilities += [math.nextafter(drawn[n // 2].item(), 1.0), math.nextafter(drawn[7].item(), 0.0)]
    for p in probabilities + probabilities[::-1]:
        got = _C.keep_mask_at(seed, 0, n, p)
        want = u >= torch.tensor(p, dtype=torch.float32)
        assert torch.equal(got, want), f"{isa} p={p!r}: {(got != want).sum().item()} mask bits differ"


def test_dropout_scale_values():
    out = _C.dropout_scale(5, 9, 70, 0.25, 1 / 0.75)
    keep = dropout_keep_mask(5, 9, 70, 0.25)
    assert torch.equal(out, keep.float() * torch.tensor(1 / 0.75, dtype=torch.float32))


# ------------------------------------------------------------------------------------------------------- LoRA
def make_case(M, K, N, ranks, xdt, adt, bias, lora_bias, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    if layout == "strided":
        x = rnd(M, 2 * K)[:, ::2].to(xdt)  # column stride 2: the backend must not assume contiguity
    elif layout == "transposed":
        x = rnd(K, M).to(xdt).t()
    else:
        x = rnd(M, K).to(xdt)
    if layout == "transposed":
        W = rnd(K, N).to(xdt).t()  # fan_in_fan_out view
    elif layout == "row-slice":
        W = rnd(N, K + 5).to(xdt)[:, :K]  # row stride K + 5: a slice of a wider weight
    else:
        W = rnd(N, K).to(xdt)
    W = W / K**0.5
    b = rnd(N).to(xdt) if bias else None
    A = [(rnd(r, K) / K**0.5).to(adt) for r in ranks]
    B = [(rnd(N, r) / r**0.5).to(adt) for r in ranks]
    lb = [rnd(N).to(adt) if (lora_bias and i == len(ranks) - 1) else None for i in range(len(ranks))]
    scaling = [2.0 / (i + 1) for i in range(len(ranks))]
    return x, W, b, A, B, lb, scaling


def as_f32(t):
    return None if t is None else t.float()


CASES = [
    # id, M, K, N, ranks, bias, lora_bias, layout
    ("M1-r16", 1, 123, 97, [16], True, False, "contig"),
    ("M37-r1", 37, 123, 97, [1], False, False, "contig"),
    ("M64-r16-lorabias", 64, 256, 97, [16], True, True, "contig"),
    ("M33-two-adapters", 33, 123, 97, [13, 3], True, True, "contig"),  # total rank 16: lora_dy's outer kernel
    ("M29-strided-x", 29, 123, 97, [8], True, False, "strided"),
    ("M31-transposed", 31, 123, 97, [16], False, True, "transposed"),
    # M <= 16: the one-pass GEMV (CpuBackend.GEMV_MAX_M), except for a transposed weight
    ("M7-two-adapters-gemv", 7, 123, 97, [16, 3], True, True, "contig"),
    ("M16-strided-x-gemv", 16, 123, 97, [8], True, False, "strided"),
    ("M3-row-slice-W-gemv", 3, 123, 97, [4], True, True, "row-slice"),
    ("M5-transposed", 5, 123, 97, [4], False, True, "transposed"),
]
DTYPES = [("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16"), ("fp16", "fp32"), ("fp16", "fp16"),
          ("fp32", "bf16")]


def each_route(op):
    """Pin every route of ``op`` in turn (``fastpeft.routing.set_route``); the caller checks
    ``routes.last_route(op)`` to see whether the pinned route could serve the call (an ineligible pin is measured
    among the eligible routes instead)."""
    try:
        for route in routes.ROUTES[op]:
            routes.set_route(op, route)
            yield route
    finally:
        routes.set_route(op, None)


@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"drop{p}")
@pytest.mark.parametrize("xdt,adt", DTYPES, ids=[f"x{a}-A{b}" for a, b in DTYPES])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_lora_matches_reference(case, xdt, adt, p):
    """Every route of the forward and of the backward, pinned in turn, against the reference."""
    _, M, K, N, ranks, bias, lora_bias, layout = case
    x, W, b, A, B, lb, s = make_case(M, K, N, ranks, DT[xdt], DT[adt], bias, lora_bias, layout)
    ps = [p] * len(ranks)
    seeds = [1234 + 17 * i for i in range(len(ranks))]
    args = (A, B, lb, s, ps, seeds)
    f32 = ([as_f32(t) for t in A], [as_f32(t) for t in B], [as_f32(t) for t in lb], s, ps, seeds)

    exact = xdt == adt == "fp32"
    y_ref, xa_ref = REF.lora_forward(x, W, b, *args)
    y_o, xa_o = REF.lora_forward(x.float(), W.float(), as_f32(b), *f32)
    ran, downs = [], set()
    for route in each_route("lora_forward"):
        for down in each_route("lora_down"):  # the down-projection kernel of the routes that call _C.lora_xa
            routes._last.pop("lora_down", None)
            y, xa = CPU.lora_forward(x, W, b, *args)
            if routes.last_route("lora_forward") != route:
                continue
            ran.append(route)
            downs.add(routes.last_route("lora_down"))
            assert_by_dtype_rule(f"{route} ({down}): y", y, y_ref, y_o, all_fp32=exact)
            for i in range(len(ranks)):
                assert_by_dtype_rule(f"{route} ({down}): xa[{i}]", xa[i], xa_ref[i], xa_o[i], all_fp32=exact)
    ran = sorted(set(ran))
    # every kernel served some route: split where the adapter's input is bf16 (x, or x cast to bf16 adapters) without
    # dropout and oneDNN's bf16 kernel runs
    split = "bf16" in (xdt, adt) and p == 0 and _C.widened_mm_available()
    assert downs - {None} == {"rows", "transposed"} | ({"split"} if split else set()), downs
    expected = {"compose", "fused"} | ({"gemv"} if layout != "transposed" else set())
    expected |= {"compose_fp32", "fused_fp32"} if xdt != "fp32" else set()
    # fused_pairs: bf16 x and weight (make_case rounds W to x's dtype), where oneDNN has a bf16 block kernel.
    pairs = xdt == "bf16" and _C.widened_mm_available()
    expected |= {"fused_pairs"} if pairs else set()
    expected |= {"fused_pairs_x"} if pairs and layout != "transposed" else set()
    # split_pairs: bf16 x, one fp32 adapter, no dropout, where oneDNN has a bf16 block kernel.
    split = pairs and adt == "fp32" and len(ranks) == 1 and p == 0
    expected |= {"split_pairs"} if split else set()
    assert set(ran) == expected, f"forward routes run: {ran}"

    gy = torch.randn(M, N, generator=torch.Generator().manual_seed(9)).to(DT[xdt])
    ref = REF.lora_backward(gy, x, W, A, B, xa_ref, s, ps, seeds, True, True)
    ora = REF.lora_backward(gy.float(), x.float(), W.float(), f32[0], f32[1], [h.float() for h in xa_ref], s, ps,
                            seeds, True, True)
    ran, dy_kernels = [], set()
    for route in each_route("lora_backward"):
        for dy_kernel in each_route("lora_dy"):  # the dY pass's kernel of the routes that call _C.lora_dy_pass
            routes._last.pop("lora_dy", None)
            got = CPU.lora_backward(gy, x, W, A, B, xa_ref, s, ps, seeds, True, True)
            if routes.last_route("lora_backward") != route:
                continue
            ran.append(route)
            dy_kernels.add(routes.last_route("lora_dy"))
            what = f"{route} ({dy_kernel})"
            assert_by_dtype_rule(f"{what}: dx", got[0], ref[0], ora[0], all_fp32=exact)
            for i in range(len(ranks)):
                assert_by_dtype_rule(f"{what}: dA[{i}]", got[1][i], ref[1][i], ora[1][i], all_fp32=exact)
                assert_by_dtype_rule(f"{what}: dB[{i}]", got[2][i], ref[2][i], ora[2][i], all_fp32=exact)
                assert_by_dtype_rule(f"{what}: dbias[{i}]", got[3][i], ref[3][i], ora[3][i], all_fp32=exact)
            # Without the bias gradients asked, the same route gives the same other gradients; a bias gradient it
            # still returns is the same, and the composition skips them.
            lean = CPU.lora_backward(gy, x, W, A, B, xa_ref, s, ps, seeds, True, True, needs_grad_bias=False)
            assert routes.last_route("lora_backward") == route
            assert torch.equal(lean[0], got[0]), f"{what}: dx without the bias gradients"
            for i in range(len(ranks)):
                assert torch.equal(lean[1][i], got[1][i]) and torch.equal(lean[2][i], got[2][i]), what
                assert lean[3][i] is None or torch.equal(lean[3][i], got[3][i]), what
                assert lean[3][i] is None or route not in ("compose", "compose_fp32"), what
    # both dY kernels served some route where the total rank is one or two SIMD vectors (fused always calls the pass)
    assert dy_kernels - {None} == {"rows"} | ({"outer"} if _C.dy_outer_takes(sum(ranks)) else set()), dy_kernels
    expected = {"compose", "fused"} | ({"compose_fp32", "fused_fp32"} if xdt != "fp32" else set())
    expected |= {"small"} if (exact and len(ranks) == 1) else set()
    expected |= {"fused_pairs"} if pairs else set()
    expected |= {"gemv"} if layout != "transposed" else set()
    expected |= {"split_pairs"} if split else set()
    assert set(ran) == expected, f"backward routes run: {ran}"


@pytest.mark.skipif(_C is None or not _C.widened_mm_available(), reason="oneDNN has no bf16 block kernel here")
@pytest.mark.parametrize("M,K,N,r", [(0, 64, 32, 16), (1, 123, 97, 16), (37, 130, 70, 5), (200, 96, 260, 20)])
def test_split_pairs_route_every_gradient_subset(M, K, N, r):
    """``split_pairs`` pinned (fp32 ``A``, ``B`` and ``h`` split exactly into three bf16 parts): an empty batch, ranks
    below and past a vector, odd sizes, a bias and a ``lora_bias``; the forward and each subset of wanted gradients
    within the 2x rule of the reference run in bf16 (the fp32 outputs ``xa``, ``dA``, ``dB`` and the bias gradient
    are fp32 products of the bf16 activations, so the rule leaves them little room); the call takes the route."""
    x, W, b, A, B, lb, s = make_case(M, K, N, [r], torch.bfloat16, torch.float32, True, True, "contig", seed=M + r)
    ps, seeds = [0.0], [3]
    f32 = ([t.float() for t in A], [t.float() for t in B], [as_f32(t) for t in lb], s, ps, seeds)
    y_ref, xa_ref = REF.lora_forward(x, W, b, A, B, lb, s, ps, seeds)
    y_o, xa_o = REF.lora_forward(x.float(), W.float(), as_f32(b), *f32)
    gy = torch.randn(M, N, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    ref = REF.lora_backward(gy, x, W, A, B, xa_ref, s, ps, seeds, True, True)
    ora = REF.lora_backward(gy.float(), x.float(), W.float(), f32[0], f32[1], [h.float() for h in xa_ref], s, ps,
                            seeds, True, True)
    try:
        routes.set_route("lora_forward", "split_pairs")
        routes.set_route("lora_backward", "split_pairs")
        y, xa = CPU.lora_forward(x, W, b, A, B, lb, s, ps, seeds)
        assert routes.last_route("lora_forward") == "split_pairs"
        if M:
            assert_by_dtype_rule("y", y, y_ref, y_o, all_fp32=False)
            assert_by_dtype_rule("xa", xa[0], xa_ref[0], xa_o[0], all_fp32=False)
        for gx, ga in [(True, True), (True, False), (False, True), (False, False)]:
            got = CPU.lora_backward(gy, x if ga else None, W, A, B, xa[0:1], s, ps, seeds, gx, ga)
            assert routes.last_route("lora_backward") == "split_pairs"
            assert (got[0] is None) == (not gx) and (got[1][0] is None) == (not ga)
            named = [("dx", got[0], ref[0], ora[0]), ("dA", got[1][0], ref[1][0], ora[1][0]),
                     ("dB", got[2][0], ref[2][0], ora[2][0]), ("dbias", got[3][0], ref[3][0], ora[3][0])]
            for name, have, want, oracle in named:
                if have is None:
                    continue
                assert have.shape == want.shape and have.dtype == want.dtype, name
                if M:
                    assert_by_dtype_rule(f"{name} (dx={gx}, dA={ga})", have, want, oracle, all_fp32=False)
                else:
                    assert not have.any(), name
    finally:
        routes.set_route(None, None)


@pytest.mark.skipif(_C is None or not _C.widened_mm_available(), reason="oneDNN has no bf16 block kernel here")
@pytest.mark.parametrize("route", ["lora_down=split", "lora_forward=split_pairs"])
def test_split_down_takes_two_parts_only_in_an_inference_call(route):
    """In an inference call (``fastpeft.functional`` runs those under ``kept_copies``) ``h = x A^T`` only feeds a bf16
    output, and the split down-projection takes ``A``'s leading 16 bits (two parts); in any other call, where ``h``
    may be kept for ``dB``, all of its bits (three), with grad disabled too (an autograd Function's forward runs so).
    Both outputs within the 2x rule of the reference run in bf16; ``h`` equal to the kernel's with that many parts."""
    x, W, b, A, B, lb, s = make_case(150, 200, 90, [12], torch.bfloat16, torch.float32, True, False, "contig", seed=4)
    ps, seeds = [0.0], [3]
    f32 = ([t.float() for t in A], [t.float() for t in B], [as_f32(t) for t in lb], s, ps, seeds)
    y_ref, _ = REF.lora_forward(x, W, b, A, B, lb, s, ps, seeds)
    y_o, _ = REF.lora_forward(x.float(), W.float(), as_f32(b), *f32)
    op, name = route.split("=")
    try:
        routes.set_route(op, name)
        for inference, grad, parts in ((True, False, 2), (False, False, 3), (False, True, 3)):
            with torch.set_grad_enabled(grad), (kept_copies() if inference else contextlib.nullcontext()):
                y, xa = CPU.lora_forward(x, W, b, A, B, lb, s, ps, seeds)
            assert routes.last_route(op) == name
            assert torch.equal(xa[0], _C.lora_xa_split(x, A[0].float(), parts)), (inference, grad, parts)
            assert_by_dtype_rule(f"y (inference={inference}, grad={grad})", y, y_ref, y_o, all_fp32=False)
    finally:
        routes.set_route(None, None)
    assert not torch.equal(_C.lora_xa_split(x, A[0].float(), 2), _C.lora_xa_split(x, A[0].float(), 3))


def test_a_training_call_keeps_h_from_every_bit_of_A():
    """A training call through fastpeft's autograd Function (its forward runs with grad disabled) with the split
    down-projection keeps ``h`` from all three parts of an ``A`` whose values use all of fp32's mantissa: the
    ``lora_B`` gradient is the one of the three-part ``h``."""
    if _C is None or not _C.widened_mm_available():
        pytest.skip("oneDNN has no bf16 block kernel here")
    from fastpeft import functional

    x, W, b, A, B, lb, s = make_case(40, 64, 30, [8], torch.bfloat16, torch.float32, True, False, "contig", seed=6)
    A = [A[0].detach().clone().requires_grad_(True)]
    B = [B[0].detach().clone().requires_grad_(True)]
    assert not torch.equal(_C.lora_xa_split(x, A[0].detach(), 2), _C.lora_xa_split(x, A[0].detach(), 3))
    dy = torch.randn(40, 30, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    try:
        routes.set_route("lora_down", "split")
        routes.set_route("lora_forward", "fused")
        routes.set_route("lora_backward", "compose")
        functional.lora_linear(x, W, b, A, B, [None], s, [0.0], True).backward(dy)
    finally:
        routes.set_route(None, None)
    h = _C.lora_xa_split(x, A[0].detach(), 3)
    want = (dy.float().t() @ h * s[0])  # compose's dB: s (h^T dY)^T in fp32
    assert torch.allclose(B[0].grad, want, rtol=1e-6, atol=1e-6)
    h2 = _C.lora_xa_split(x, A[0].detach(), 2)
    assert not torch.allclose(B[0].grad, dy.float().t() @ h2 * s[0], rtol=1e-6, atol=1e-6), "the test is vacuous"


@pytest.mark.skipif(_C is None or not _C.widened_mm_available(), reason="oneDNN has no bf16 block kernel here")
def test_split_products_refuse_bad_operands_and_keep_nan(isa):
    """``_C.lora_xa_split`` / ``_C.lora_backward_split`` name the operand and the problem; a NaN in ``A`` reaches
    ``x A^T`` as NaN (its split keeps it NaN), and fp32 values past bf16's mantissa come back exactly (the split is
    each ISA's kernel: the ``isa`` fixture runs every one)."""
    x, A = torch.randn(5, 40).to(torch.bfloat16), torch.randn(3, 40)
    with pytest.raises(RuntimeError, match="lora_xa_split: x must be a 2-D bf16"):
        _C.lora_xa_split(x.float(), A)
    with pytest.raises(RuntimeError, match="lora_xa_split: A must be fp32"):
        _C.lora_xa_split(x, A.to(torch.bfloat16))
    dy, Bt, h = torch.randn(5, 7).to(torch.bfloat16), torch.randn(3, 7), torch.randn(5, 3)
    with pytest.raises(RuntimeError, match="lora_backward_split: h must be fp32 \\(5, 3\\)"):
        _C.lora_backward_split(dy, x, A, Bt, h[:4], 1.0)
    with pytest.raises(RuntimeError, match="lora_backward_split: x has 4 rows, grad_y 5"):
        _C.lora_backward_split(dy, x[:4], A, Bt, h, 1.0)
    bad = A.clone()
    bad[1, 7] = float("nan")
    got = _C.lora_xa_split(x, bad)
    assert got[:, 1].isnan().all() and not got[:, [0, 2]].isnan().any()
    # 24 significant bits, 8 per part: one row of x of ones gives each element back exactly; two parts keep the
    # leading 16 bits (each part rounded to nearest)
    fine = torch.tensor([[1.0 + 2.0 ** -12 + 2.0 ** -20], [-3.0 - 2.0 ** -10 - 2.0 ** -19], [2.0 ** -30]])
    ones = torch.ones(2, 1).to(torch.bfloat16)
    assert torch.equal(_C.lora_xa_split(ones, fine), fine.t().expand(2, 3))
    leading = torch.tensor([[1.0 + 2.0 ** -12, -3.0 - 2.0 ** -10, 2.0 ** -30]])
    assert torch.equal(_C.lora_xa_split(ones, fine, 2), leading.expand(2, 3))
    with pytest.raises(RuntimeError, match="lora_xa_split: parts must be 2 or 3, got 4"):
        _C.lora_xa_split(ones, fine, 4)


@pytest.mark.parametrize("needs_grad_x,needs_grad_A", [(True, False), (False, True), (False, False)])
def test_lora_backward_partial_grads(needs_grad_x, needs_grad_A):
    x, W, b, A, B, lb, s = make_case(19, 123, 97, [16], torch.bfloat16, torch.float32, True, False, "contig")
    ps, seeds = [0.1], [77]
    _, xa = REF.lora_forward(x, W, b, A, B, lb, s, ps, seeds)
    gy = torch.randn(19, 97).to(torch.bfloat16)
    got = CPU.lora_backward(gy, x if needs_grad_A else None, W, A, B, xa, s, ps, seeds, needs_grad_x, needs_grad_A)
    ref = REF.lora_backward(gy, x, W, A, B, xa, s, ps, seeds, True, True)
    assert (got[0] is None) == (not needs_grad_x)
    assert (got[1][0] is None) == (not needs_grad_A)
    if needs_grad_x:
        assert rel_err(got[0], ref[0]) < 1e-2
    if needs_grad_A:
        assert rel_err(got[1][0], ref[1][0]) < 1e-5
    assert rel_err(got[2][0], ref[2][0]) < 1e-5


@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"drop{p}")
def test_lora_matches_autograd(isa, p):
    """fp32 gradients against torch autograd through the spec (not a hand-written formula)."""
    x, W, b, A, B, lb, s = make_case(45, 123, 97, [16, 1], torch.float32, torch.float32, True, True, "contig", 3)
    ps, seeds = [p, p], [11, 22]
    leaves = [t.clone().requires_grad_(True) for t in [x] + A + B + [lb[1]]]
    xl, Al, Bl, lbl = leaves[0], leaves[1:3], leaves[3:5], [None, leaves[5]]
    y_ref = spec.lora_linear(xl, W, b, Al, Bl, lbl, s, ps, seeds)
    gy = torch.randn_like(y_ref)
    y_ref.backward(gy)

    y, xa = CPU.lora_forward(x, W, b, A, B, lb, s, ps, seeds)
    dx, dA, dB, dbias = CPU.lora_backward(gy, x, W, A, B, xa, s, ps, seeds, True, True)
    tol = 1e-5
    assert rel_err(y, y_ref.detach()) < tol, "y"
    assert rel_err(dx, xl.grad) < tol, "dx"
    for i in range(2):
        assert rel_err(dA[i], Al[i].grad) < tol, f"dA[{i}]"
        assert rel_err(dB[i], Bl[i].grad) < tol, f"dB[{i}]"
    assert rel_err(dbias[1], lbl[1].grad) < tol, "dbias"


@pytest.mark.parametrize("M", [23, 5], ids=["gemm", "gemv"])
@pytest.mark.parametrize("xdt", ["fp32", "bf16"])
def test_lora_every_isa_agrees(isa, xdt, M):
    """Each SIMD path (tails included: K=123, N=97) against the reference, both forward routes."""
    x, W, b, A, B, lb, s = make_case(M, 123, 97, [16, 5], DT[xdt], torch.float32, True, True, "contig", 5)
    ps, seeds = [0.1, 0.0], [5, 6]
    y, xa = CPU.lora_forward(x, W, b, A, B, lb, s, ps, seeds)
    y_ref, xa_ref = REF.lora_forward(x, W, b, A, B, lb, s, ps, seeds)
    tol = 1e-5 if xdt == "fp32" else 1e-2
    assert rel_err(y, y_ref) < tol
    assert rel_err(xa[0], xa_ref[0]) < 1e-5
    gy = torch.randn(M, 97).to(DT[xdt])
    got = CPU.lora_backward(gy, x, W, A, B, xa_ref, s, ps, seeds, True, True)
    ref = REF.lora_backward(gy, x, W, A, B, xa_ref, s, ps, seeds, True, True)
    assert rel_err(got[0], ref[0]) < tol
    for i in range(2):
        assert rel_err(got[1][i], ref[1][i]) < 1e-5
        assert rel_err(got[2][i], ref[2][i]) < 1e-5


# Around the expand kernel's panels (64 columns on avx512, 16 on avx2, 8 generic), its tails (vectors, then single
# columns) and its blocks of 4 and 32 rows.
EXPAND_SHAPES = [(1, 1, 1), (5, 15, 3), (37, 97, 16), (70, 130, 21), (4, 200, 16), (33, 64, 2)]


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_epilogue_and_dx_update_round_the_fp32_sum_once(isa, dtype):
    """``y += xs B^T + bias`` (``_C.lora_epilogue_``) and the dropout-free ``dx += g A`` (``_C.lora_dx_pass``), one
    kernel over panels of columns of the rank-rows matrix, on every SIMD path and on shapes around its panels, tails
    and row blocks: each output is the fp64 value rounded once to its dtype, up to the fp32 sum's error."""
    gen = torch.Generator().manual_seed(9)
    ulp = {"fp32": 2.0**-23, "bf16": 2.0**-8, "fp16": 2.0**-10}[dtype]
    for M, N, R in EXPAND_SHAPES:
        y = torch.randn(M, N, generator=gen).to(DT[dtype])
        xs, rows, bias = (torch.randn(M, R, generator=gen), torch.randn(R, N, generator=gen),
                          torch.randn(N, generator=gen))
        for label, want in (("epilogue", y.double() + xs.double() @ rows.double() + bias.double()),
                            ("dx", y.double() + xs.double() @ rows.double())):
            got = y.clone()
            if label == "epilogue":
                _C.lora_epilogue_(got, xs, rows, bias)
            else:
                _C.lora_dx_pass(got, None, rows, xs, 0.0, 0)
            bound = want.abs() * ulp + 1e-5 * (R + 2)  # one rounding to dtype, plus fp32 sums of R + 2 terms
            worst = ((got.double() - want).abs() - bound).max().item()
            assert worst <= 0, f"{isa} {label} M={M} N={N} R={R}: off by {worst:.3g} past the bound"


@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"drop{p}")
def test_adapter_gradients_over_many_rows_any_thread_count(isa, p):
    """dA and dB are column sums over every row, and with dropout dx is updated by the same column strips: past the
    1024-row chunks the masks are drawn in, the reference's values; with threads owning columns, not rows, the same
    bits for one thread and for two."""
    M = 1100
    x, W, b, A, B, lb, s = make_case(M, 131, 75, [6], torch.bfloat16, torch.float32, False, False, "contig", 7)
    ps, seeds = [p], [99]
    _, xa = REF.lora_forward(x, W, b, A, B, lb, s, ps, seeds)
    gy = torch.randn(M, 75, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    ref = REF.lora_backward(gy, x, W, A, B, xa, s, ps, seeds, True, True)
    threads = torch.get_num_threads()
    got = {}
    routes.set_route("lora_backward", "fused")
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got[n] = CPU.lora_backward(gy, x, W, A, B, xa, s, ps, seeds, True, True)
            assert routes.last_route("lora_backward") == "fused"
    finally:
        torch.set_num_threads(threads)
        routes.set_route("lora_backward", None)
    assert rel_err(got[1][0], ref[0]) < 1e-2  # dx in bf16 (with dropout: updated by the same column strips as dA)
    assert rel_err(got[1][1][0], ref[1][0]) < 1e-5
    assert rel_err(got[1][2][0], ref[2][0]) < 1e-5
    for i in range(3):
        assert torch.equal(got[1][i] if i == 0 else got[1][i][0], got[2][i] if i == 0 else got[2][i][0])


# -------------------------------------------------------------------------------------------------------- IA3
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "out"])
@pytest.mark.parametrize("xdt", ["fp32", "bf16"])
def test_ia3_matches_reference(xdt, feedforward):
    M, K, N = 21, 123, 97
    x = torch.randn(M, K).to(DT[xdt])
    W = (torch.randn(N, K) / K**0.5).to(DT[xdt])
    b = torch.randn(N).to(DT[xdt])
    scale = torch.rand(K if feedforward else N) + 0.5  # fp32 like PEFT's vectors
    y_ref = REF.ia3_forward(x, W, b, scale, feedforward)
    y_o = REF.ia3_forward(x.float(), W.float(), b.float(), scale, feedforward)
    exact = xdt == "fp32"
    low = set() if exact else {"compose_fp32"}
    ran = []
    for route in each_route("ia3_forward"):
        y = CPU.ia3_forward(x, W, b, scale, feedforward)
        if routes.last_route("ia3_forward") == route:
            ran.append(route)
            assert_by_dtype_rule(f"{route}: y", y, y_ref, y_o, all_fp32=exact)
    assert set(ran) == {"compose", "gemv"} | low, ran
    gy = torch.randn(M, N).to(DT[xdt])
    dx_r, ds_r = REF.ia3_backward(gy, x, W, b, scale, feedforward, True)
    dx_o, ds_o = REF.ia3_backward(gy.float(), x.float(), W.float(), b.float(), scale, feedforward, True)
    ran = []
    for route in each_route("ia3_backward"):
        dx, ds = CPU.ia3_backward(gy, x, W, b, scale, feedforward, True)
        if routes.last_route("ia3_backward") == route:
            ran.append(route)
            assert_by_dtype_rule(f"{route}: dx", dx, dx_r, dx_o, all_fp32=exact)
            assert_by_dtype_rule(f"{route}: dscale", ds, ds_r, ds_o, all_fp32=exact)
    assert set(ran) == {"compose"} | low, ran


@pytest.mark.parametrize("M", [13, 40], ids=["gemv", "gemm"])
@pytest.mark.parametrize("xdt", ["fp32", "bf16"])
def test_ia3_output_scaling_saves_base_output_not_x(xdt, M):
    """Through the autograd function: the CPU backend saves z = x W^T + b (as PEFT does) instead of x, and the
    gradients still equal the reference's (which recomputes z)."""
    from fastpeft import functional

    K, N = 77, 41
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, K, generator=g).to(DT[xdt]).requires_grad_(True)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(DT[xdt])
    b = torch.randn(N, generator=g).to(DT[xdt])
    vec = (torch.rand(N, 1, generator=g) + 0.5).requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = functional.ia3_linear(x, W, b, [vec], False)
    z = REF.ia3_forward(x.detach(), W, b, torch.ones(N), False)
    tol = 1e-5 if xdt == "fp32" else 1e-2
    assert any(t.shape == z.shape and t.dtype == z.dtype and rel_err(t, z) < tol for t in saved), (
        "z = x W^T + b was not saved")
    assert not any(t.data_ptr() == x.data_ptr() for t in saved), "x was saved although backward does not need it"
    gy = torch.randn(M, N, generator=g).to(DT[xdt])
    dx, dvec = torch.autograd.grad(y, [x, vec], gy)
    dx_r, ds_r = REF.ia3_backward(gy, x.detach(), W, b, vec.detach().flatten(), False, True)
    dx_o, ds_o = REF.ia3_backward(gy.float(), x.detach().float(), W.float(), b.float(), vec.detach().flatten(),
                                  False, True)
    exact = xdt == "fp32"
    assert_by_dtype_rule("y", y, REF.ia3_forward(x.detach(), W, b, vec.detach().flatten(), False),
                 REF.ia3_forward(x.detach().float(), W.float(), b.float(), vec.detach().flatten(), False),
                 all_fp32=exact)
    assert_by_dtype_rule("dx", dx, dx_r, dx_o, all_fp32=exact)
    assert_by_dtype_rule("dscale", dvec.flatten(), ds_r, ds_o, all_fp32=exact)


# ------------------------------------------------------------------------------------------------- dispatching
def test_auto_dispatch_picks_cpu():
    from fastpeft.backends import backend_info, get_backend

    info = backend_info()
    assert info["cpu"]["available"], info["cpu"]["reason"]
    x, W = torch.randn(2, 8), torch.randn(4, 8)
    assert get_backend(x, W).name in ("cpu",) or info["selected"] != "auto"
    # backend_info says what auto resolves to, per device
    assert info["auto"]["cpu"] == "cpu"
    if not torch.cuda.is_available():
        assert info["auto"]["cuda"] == "none: no CUDA device"


def test_supports():
    assert CPU.supports(torch.randn(2, 3), torch.randn(4, 3))
    assert not CPU.supports(torch.randn(2, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))


def test_native_lowp_gemm_query():
    assert isinstance(_C.native_lowp_gemm("bf16"), bool) and isinstance(_C.native_lowp_gemm("fp16"), bool)


# ------------------------------------------------------------------------------------- the widened bf16 product
WIDENED_SHAPES = [(1, 1, 1), (5, 29, 37), (3, 7, 2), (130, 65, 129), (65, 200, 64), (200, 130, 33), (2, 300, 16)]


@pytest.mark.skipif(not AVAILABLE or not _C.widened_mm_available(), reason="no oneDNN bf16 block kernel here")
@pytest.mark.parametrize("M,N,K", WIDENED_SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in WIDENED_SHAPES])
def test_widened_mm_is_the_fp32_product_of_the_bf16_operands(M, N, K):
    """``_C.widened_mm(a, b)`` against fp64 on the same bf16 values: each product is exact in fp32, so the only error
    is fp32 summation (odd K, tiles of 64 with partial ones, either operand rearranged, rows with a stride beyond
    K)."""
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    a = torch.randn(M, K + 3, generator=g).to(torch.bfloat16)[:, :K]
    b = torch.randn(N, K, generator=g).to(torch.bfloat16)
    exact = a.double() @ b.double().t()
    for interleave_a in (False, True):
        got = _C.widened_mm(a, b, interleave_a)
        assert got.dtype == torch.float32 and got.shape == (M, N)
        assert rel_err(got, exact) <= 1e-6 * max(1.0, K ** 0.5), f"interleave_a={interleave_a}"
    # Rounding x W^T to bf16 (what torch's bf16 GEMM returns) is ~1e-3 away: the check above can tell them apart.
    assert rel_err((a @ b.t()).float(), exact) > 1e-4 or K == 1


@pytest.mark.skipif(not AVAILABLE or not _C.widened_mm_available(), reason="no oneDNN bf16 block kernel here")
@pytest.mark.parametrize("M,N,K", WIDENED_SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in WIDENED_SHAPES])
def test_widened_mm_nn_is_the_fp32_product_of_the_bf16_operands(M, N, K):
    """``_C.widened_mm_nn(a, b)`` (``b`` ``(K, N)``, rows with a stride beyond N) against fp64 on the same values."""
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K + 1)
    a = torch.randn(M, K, generator=g).to(torch.bfloat16)
    b = torch.randn(K, N + 3, generator=g).to(torch.bfloat16)[:, :N]
    got = _C.widened_mm_nn(a, b)
    assert got.dtype == torch.float32 and got.shape == (M, N)
    exact = a.double() @ b.double()
    assert rel_err(got, exact) <= 1e-6 * max(1.0, K ** 0.5)
    assert rel_err((a @ b).float(), exact) > 1e-4 or K == 1


@pytest.mark.skipif(not AVAILABLE or not _C.widened_mm_available(), reason="no oneDNN bf16 block kernel here")
@pytest.mark.parametrize("rows", [(5, 7), (64, 1), (70, 130, 3), (1, 1)], ids=lambda r: "+".join(map(str, r)))
@pytest.mark.parametrize("K", [37, 64, 129])
def test_widened_mm_parts_is_each_part_times_b(rows, K):
    """``_C.widened_mm_parts([a_i], b, transposed_b)``: each part's product equals ``widened_mm`` /
    ``widened_mm_nn`` on that part alone, bit for bit (the same dot products; only the grouping of rows into tiles
    differs), for parts whose rows end inside a tile of 64, odd K, both layouts of b and rows with a stride beyond K."""
    g = torch.Generator().manual_seed(sum(rows) * 100 + K)
    N = 75
    parts = [torch.randn(m, K + 2, generator=g).to(torch.bfloat16)[:, :K] for m in rows]
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    for transposed, b in ((True, w), (False, w.t().contiguous())):
        got = _C.widened_mm_parts(parts, b, transposed)
        assert len(got) == len(parts)
        for a, c in zip(parts, got):
            want = _C.widened_mm(a, b, False) if transposed else _C.widened_mm_nn(a, b)
            assert c.dtype == torch.float32 and c.shape == (a.shape[0], N) and torch.equal(c, want)
    with pytest.raises(RuntimeError, match="widened_mm_parts: a is .* second dimensions"):
        _C.widened_mm_parts([parts[0], torch.ones(2, K + 1, dtype=torch.bfloat16)], w, True)
    with pytest.raises(RuntimeError, match="widened_mm_parts: give at least one a"):
        _C.widened_mm_parts([], w, True)


# ------------------------------------------------------------------------------ the one-pass product dY W (strips)
STRIP_SHAPES = [(1, 1, 1), (1, 37, 130), (3, 64, 65), (4, 129, 1), (7, 5, 200), (33, 96, 70)]


@pytest.mark.skipif(not AVAILABLE, reason="fastpeft._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("M,N,K", STRIP_SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in STRIP_SHAPES])
def test_strip_mm_is_the_fp32_product(M, N, K, dtype):
    """``_C.strip_mm(a, w)`` = ``a w`` in fp32 against fp64 on the same values (rows with strides beyond their
    lengths, partial column strips): the products are exact in fp32, the only error is fp32 summation."""
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    a = torch.randn(M, N + 2, generator=g).to(dtype)[:, :N]
    w = torch.randn(N, K + 5, generator=g).to(dtype)[:, :K]
    got = _C.strip_mm(a, w)
    assert got.dtype == torch.float32 and got.shape == (M, K)
    exact = a.double() @ w.double()
    assert rel_err(got, exact) <= 1e-6 * max(1.0, N ** 0.5)


@pytest.mark.skipif(not AVAILABLE, reason="fastpeft._C not built")
def test_strip_mm_rejects_what_it_cannot_multiply():
    with pytest.raises(RuntimeError, match="strip_mm: a is \\(2, 4\\) but w has 3 rows"):
        _C.strip_mm(torch.ones(2, 4), torch.ones(3, 5))
    with pytest.raises(RuntimeError, match="w needs unit column stride"):
        _C.strip_mm(torch.ones(2, 4), torch.ones(5, 4).t())
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        _C.strip_mm(torch.ones(2, 4, dtype=torch.float64), torch.ones(4, 5, dtype=torch.float64))


def test_widened_mm_rejects_what_it_cannot_multiply():
    if not _C.widened_mm_available():
        with pytest.raises(RuntimeError, match="no bf16 block kernel"):
            _C.widened_mm(torch.ones(2, 2, dtype=torch.bfloat16), torch.ones(2, 2, dtype=torch.bfloat16))
        return
    with pytest.raises(RuntimeError, match="widened_mm: a must be a 2-D bf16"):
        _C.widened_mm(torch.ones(2, 4), torch.ones(3, 4, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="widened_mm: b must be a 2-D bf16 .* unit column stride"):
        _C.widened_mm(torch.ones(2, 4, dtype=torch.bfloat16), torch.ones(4, 3, dtype=torch.bfloat16).t())
    with pytest.raises(RuntimeError, match="second dimensions"):
        _C.widened_mm(torch.ones(2, 4, dtype=torch.bfloat16), torch.ones(3, 5, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="widened_mm_nn: a is .* a's columns must match b's rows"):
        _C.widened_mm_nn(torch.ones(2, 4, dtype=torch.bfloat16), torch.ones(3, 4, dtype=torch.bfloat16))


@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("M,K,r", [(1, 300, 16), (5, 40, 24), (16, 300, 16), (37, 257, 16), (53, 513, 8),
                                   (18, 256, 130), (33, 31, 1)])
def test_down_projection_kernels_are_each_rows_fp32_dot(isa, transposed, dtype, p, M, K, r):
    """``_C.lora_xa`` by either kernel (``lora_down``'s routes): ``drop(x) A^T`` within fp32 summation error of the
    fp64 product of the dropped rows, ranks that fill no whole vector, more ranks than one sweep of the transposed
    kernel takes (130), K across its staged chunks (257, 513), row blocks with remainders, rows of x with a stride
    beyond K; each row's values do not depend on the rows that come with it."""
    dt = DT[dtype]
    g = torch.Generator().manual_seed(M * K + r)
    x = torch.randn(M, K + 5, generator=g).to(dt)[:, :K]
    A = torch.randn(r, K, generator=g)
    got = _C.lora_xa(x, A, p, 99, transposed)
    assert got.dtype == torch.float32 and got.shape == (M, r)
    keep = _C.dropout_scale(99, M, K, p, 1.0 / (1.0 - p)) if p > 0 else torch.ones(M, K)
    if p > 0 and M * K > 100:
        assert (keep == 0).any() and (keep != 0).any(), "the mask must keep some and drop some: test is vacuous"
    dropped = x.double() * keep.double()
    exact = dropped @ A.double().T
    bound = 4 * K * 2.0 ** -24 * (dropped.abs() @ A.double().abs().T) + 1e-30
    assert ((got.double() - exact).abs() <= bound).all()
    assert not torch.equal(got, torch.zeros_like(got))
    if p == 0 and M > 1:
        assert torch.equal(_C.lora_xa(x[M - 1:], A, 0.0, 0, transposed), got[M - 1:])


def test_down_projection_kernel_is_measured_kept_and_pinned(monkeypatch):
    """The cpu backend's ``x A^T`` (``lora_down``): the first call of a key times both kernels and keeps one; later
    calls of the key take the kept kernel without building a key, and give its bits; ``set_route`` and
    ``FASTPEFT_ROUTE`` pins take effect at once over a kept choice; another M bucket is another key, and so is bf16
    ``x`` in an inference call and in any other (``split`` multiplies two parts of ``A`` or three)."""
    from fastpeft.backends import cpu as cpu_backend

    monkeypatch.setenv("FASTPEFT_ROUTE_CACHE", "off")
    g = torch.Generator().manual_seed(5)
    x, A = torch.randn(40, 300, generator=g), torch.randn(16, 300, generator=g)
    bits = {name: _C.lora_xa(x, A, 0.2, 7, name == "transposed") for name in routes.ROUTES["lora_down"]}
    assert not torch.equal(bits["rows"], bits["transposed"]), "the kernels must differ in rounding: test is vacuous"
    routes.clear_choices()
    cpu_backend._down_settled.clear()
    try:
        _kept_and_pinned(monkeypatch, cpu_backend, x, A, bits)
    finally:
        routes.set_route("lora_down", None)
        routes.clear_choices()
        cpu_backend._down_settled.clear()


def _kept_and_pinned(monkeypatch, cpu_backend, x, A, bits):
    first = cpu_backend._lora_xa(x, A, 0.2, 7)
    chosen = [c for c in routes.routes() if c["op"] == "lora_down"]
    assert len(chosen) == 1 and set(chosen[0]["timings_ms"]) == {"rows", "transposed"}, chosen
    kept = chosen[0]["route"]
    assert torch.equal(first, bits[kept])
    keys = CallCounter(monkeypatch, cpu_backend, "_down_key")
    for _ in range(3):
        assert torch.equal(cpu_backend._lora_xa(x, A, 0.2, 7), bits[kept])
    assert keys.calls == 0, "a kept choice builds no key"
    other = "rows" if kept == "transposed" else "transposed"
    routes.set_route("lora_down", other)
    assert torch.equal(cpu_backend._lora_xa(x, A, 0.2, 7), bits[other])
    assert routes.last_route("lora_down") == other
    routes.set_route("lora_down", None)
    assert torch.equal(cpu_backend._lora_xa(x, A, 0.2, 7), bits[kept])
    monkeypatch.setenv("FASTPEFT_ROUTE", f"lora_down={other}")
    assert torch.equal(cpu_backend._lora_xa(x, A, 0.2, 7), bits[other])
    monkeypatch.delenv("FASTPEFT_ROUTE")
    assert torch.equal(cpu_backend._lora_xa(x, A, 0.2, 7), bits[kept])
    cpu_backend._lora_xa(x[:3], A, 0.2, 7)
    assert len([c for c in routes.routes() if c["op"] == "lora_down"]) == 2
    # bf16 x: split (exact products through oneDNN's bf16 kernel) is a candidate without dropout only
    xb = x.to(torch.bfloat16)
    for p, split in ((0.0, _C.widened_mm_available()), (0.2, False)):
        routes.clear_choices()
        got = cpu_backend._lora_xa(xb, A, p, 7)
        (row,) = [c for c in routes.routes() if c["op"] == "lora_down"]
        assert set(row["timings_ms"]) == {"rows", "transposed"} | ({"split"} if split else set()), row
        transposed = row["route"] == "transposed"
        want = _C.lora_xa_split(xb, A) if row["route"] == "split" else _C.lora_xa(xb, A, p, 7, transposed)
        assert torch.equal(got, want)
    if not _C.widened_mm_available():
        return
    # split multiplies two parts of A in an inference call (kept_copies) and three in any other, grad mode
    # regardless (an autograd Function's forward runs with grad disabled): each kind measures its own choice
    routes.clear_choices()
    cpu_backend._down_settled.clear()
    for inference, grad, parts in ((True, False, 2), (False, True, 3), (False, False, 3), (True, False, 2)):
        with torch.set_grad_enabled(grad), (kept_copies() if inference else contextlib.nullcontext()):
            got = cpu_backend._lora_xa(xb, A, 0.0, 7)
        (row,) = [c for c in routes.routes() if c["op"] == "lora_down" and c["grads"] == f"split parts={parts}"]
        assert routes.last_route("lora_down") == row["route"]
        want = (_C.lora_xa_split(xb, A, parts) if row["route"] == "split"
                else _C.lora_xa(xb, A, 0.0, 7, row["route"] == "transposed"))
        assert torch.equal(got, want), (inference, grad, row["route"])
    assert len([c for c in routes.routes() if c["op"] == "lora_down"]) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N", [(1, 37), (9, 64), (77, 575), (131, 2051)])
def test_dy_pass_kernels_every_isa(isa, dtype, M, N):
    """``lora_dy_pass`` (``g = (dY B) svec``, ``dB = svec (dY^T xa)``, the column sums) against the fp64 products by
    each of its kernels (``lora_dy``'s routes): the row and column passes for every rank, the sweep of outer products
    over column units (row blocks of 8 or 4 with tails) for total ranks of one and two vectors of the SIMD path. Each
    gives the same bits with one thread and two, g and dB the same with and without the column sums, a strided-row
    dY included; the sweep refuses a rank it does not take, and a call without dB."""
    vw = {"avx512": 16, "avx2": 8, "generic": 4}[isa]
    assert _C.dy_outer_takes(vw) and _C.dy_outer_takes(2 * vw) and not _C.dy_outer_takes(vw + 2)
    threads = torch.get_num_threads()
    try:
        for R, outer in ((vw, True), (vw, False), (2 * vw, True), (2 * vw, False), (vw + 2, False)):
            gen = torch.Generator().manual_seed(M * N + R)
            dy = torch.randn(M, N + 3, generator=gen)[:, :N].to(dtype)  # rows N + 3 apart
            B, xa = torch.randn(N, R, generator=gen), torch.randn(M, R, generator=gen)
            svec = torch.rand(R, generator=gen) + 0.5
            got = {}
            for n, colsum in ((1, True), (2, True), (2, False)):
                torch.set_num_threads(n)
                got[n, colsum] = _C.lora_dy_pass(dy, [B], xa, svec, True, colsum, outer)
            d64 = dy.double()
            g, dB, cs = got[1, True]
            what = f"R={R} {'outer' if outer else 'rows'}"
            assert_close(f"{what} g", g, (d64 @ B.double()) * svec.double(), 2e-6)
            assert_close(f"{what} dB", dB, (d64.t() @ xa.double()) * svec.double(), 2e-6)
            assert_close(f"{what} column sums", cs, d64.sum(0), 2e-6)
            for i in range(3):
                assert torch.equal(got[1, True][i], got[2, True][i]), f"{what}: output {i} differs with two threads"
            assert got[2, False][2] is None or got[2, False][2].numel() == 0
            for i in range(2):
                assert torch.equal(got[2, False][i], got[2, True][i]), f"{what}: output {i} moved with the column sums"
            # without dB the row pass alone: the same g, and the column sums
            g_only, no_dB, cs_only = _C.lora_dy_pass(dy, [B], xa, svec, False, True, False)
            assert no_dB is None or no_dB.numel() == 0
            if not outer:
                assert torch.equal(g_only, g) and torch.equal(cs_only, cs), what
        with pytest.raises(RuntimeError, match="lora_dy_pass: the outer-product kernel computes dB and takes a total "
                                               "rank of one or two vectors"):
            _C.lora_dy_pass(dy, [B], xa, svec, True, False, True)  # R = vw + 2
        with pytest.raises(RuntimeError, match="need_dB=0"):
            _C.lora_dy_pass(dy, [B[:, :vw]], xa[:, :vw].contiguous(), svec[:vw].contiguous(), False, False, True)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("M,K,N", [(1, 37, 29), (16, 130, 67), (77, 64, 200)])
def test_fused_backward_of_one_fp32_adapter_is_one_call_of_its_passes(monkeypatch, dtype, p, M, K, N):
    """The ``fused`` backward of one fp32 adapter with ``dY W`` in ``dY``'s dtype is one ``_C.lora_fused_backward``
    call: every output bit-equal to its passes called one by one (``lora_dy_pass``, torch's ``dY W``,
    ``lora_dx_pass``), a strided x and dY included, with and without dX and dA; ``dY``, ``W`` and ``x`` of different
    dtypes are refused by name."""
    from fastpeft.backends import cpu as cpu_backend

    g = torch.Generator().manual_seed(M + K + N)
    x = torch.randn(M, 2 * K, generator=g)[:, ::2].to(dtype)
    W = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    A, B = torch.randn(16, K, generator=g) / K ** 0.5, torch.randn(N, 16, generator=g)
    dy = torch.randn(N, M, generator=g).to(dtype).t()
    h = _C.lora_xa(x.contiguous(), A, p, 77)
    dyc = dy.contiguous()  # the backend's rows
    calls = CallCounter(monkeypatch, cpu_backend._C, "lora_fused_backward")
    kernels = cpu_backend._dy_routes(16, True)
    assert kernels == (("rows", "outer") if _C.dy_outer_takes(16) else ("rows",))
    routes.set_route("lora_backward", "fused")
    try:
        for kernel in kernels:  # the dY pass's kernel pinned in turn (op lora_dy)
            routes.set_route("lora_dy", kernel)
            g_, dB, colsum = _C.lora_dy_pass(dyc, [B], h, torch.full((16,), 1.5), True, True, kernel == "outer")
            dx = torch.mm(dyc, W)
            dA = _C.lora_dx_pass(dx, x.contiguous(), A, g_, p, 77, None, None)
            for needs_dx, needs_dA in ((True, True), (True, False), (False, True)):
                got = CPU.lora_backward(dy, x, W, [A], [B], [h], [1.5], [p], [77], needs_dx, needs_dA)
                assert routes.last_route("lora_backward") == "fused"
                assert routes.last_route("lora_dy") == kernel
                assert (got[0] is None) != needs_dx and (got[1][0] is None) != needs_dA
                if needs_dx:
                    assert torch.equal(got[0], dx), f"{kernel}: dx"
                if needs_dA:
                    assert torch.equal(got[1][0], dA), f"{kernel}: dA"
                assert torch.equal(got[2][0], dB), f"{kernel}: dB"
                assert torch.equal(got[3][0], colsum * 1.5), f"{kernel}: dbias"
            # Without a lora_bias to read them the column sums are not taken; the rest is unchanged.
            got = CPU.lora_backward(dy, x, W, [A], [B], [h], [1.5], [p], [77], True, True, needs_grad_bias=False)
            assert got[3][0] is None, "the bias gradient was computed though no lora_bias reads it"
            assert torch.equal(got[0], dx) and torch.equal(got[1][0], dA) and torch.equal(got[2][0], dB)
    finally:
        routes.set_route("lora_backward", None)
        routes.set_route("lora_dy", None)
    assert calls.calls == 4 * len(kernels)
    other = torch.float32 if dtype != torch.float32 else torch.bfloat16
    with pytest.raises(RuntimeError, match="lora_fused_backward: dy, W and x must have one dtype"):
        _C.lora_fused_backward(dy, W.to(other), x, A, B, h, 1.5, p, 77)


@pytest.mark.parametrize("route", ["compose", "fused", "small", "gemv"])
def test_adapters_of_different_16bit_dtypes_see_peft_cumulative_cast(route):
    """PEFT casts x cumulatively over the active adapters: with a bf16 then an fp16 adapter, the second sees
    fp16(bf16(x)), in backward as in forward. Each gradient is held to the 2x rule against an fp64 oracle built from
    exactly those inputs, the low-precision spec (autograd through ``fastpeft.reference``) setting the bar."""
    from fastpeft import functional

    g = torch.Generator().manual_seed(3)
    M, K, N, ranks = 33, 40, 24, (4, 6)
    x = torch.randn(M, K, generator=g)
    W, b = torch.randn(N, K, generator=g) / K ** 0.5, torch.randn(N, generator=g)
    dtypes = (torch.bfloat16, torch.float16)
    As = [(torch.randn(r, K, generator=g) / K ** 0.5).to(dt) for r, dt in zip(ranks, dtypes)]
    Bs = [torch.randn(N, r, generator=g).to(dt) for r, dt in zip(ranks, dtypes)]
    scaling, dy = [2.0, 0.5], torch.randn(M, N, generator=g)

    def grads(fn, dtype_of=lambda t: t):
        xl = x.clone().requires_grad_(True)
        Al = [dtype_of(a).detach().clone().requires_grad_(True) for a in As]
        Bl = [dtype_of(b_).detach().clone().requires_grad_(True) for b_ in Bs]
        fn(xl, Al, Bl).backward(dy)
        return [xl.grad] + [a.grad for a in Al] + [b_.grad for b_ in Bl]

    routes.set_route("lora_backward", route)
    try:
        ours = grads(lambda xl, Al, Bl: functional.lora_linear(xl, W, b, Al, Bl, [None, None], scaling, [0.0, 0.0],
                                                                training=True))
    finally:
        routes.set_route("lora_backward", None)
    low = grads(lambda xl, Al, Bl: spec.lora_linear(xl, W, b, Al, Bl, [None, None], scaling, [0.0, 0.0], [0, 0]))

    def oracle(xl, Al, Bl):  # fp64 on the inputs PEFT's adapters see: bf16(x), then fp16(bf16(x))
        x1 = xl + (xl.to(torch.bfloat16).double() - xl.double()).detach()
        x2 = xl + (xl.to(torch.bfloat16).to(torch.float16).double() - xl.double()).detach()
        y = xl.double() @ W.double().t() + b.double()
        for xi, A, B, s in zip((x1, x2), Al, Bl, scaling):
            y = y + (xi.double() @ A.t()) @ B.t() * s
        return y

    exact = grads(oracle, dtype_of=lambda t: t.double())
    for name, got, bar, want in zip(["dX", "dA0", "dA1", "dB0", "dB1"], ours, low, exact):
        assert_within_2x(f"{route}: {name}", got.double(), bar.double(), want)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_dense_gemv_rows_in_fours_and_tails(isa, dtype):
    """``_C.dense_lora_gemv`` reads weight rows four at a time where it can and one at a time for the rest (and for
    the tail of K): every count of leftover rows and columns, a row-sliced weight (row stride > K), and the bias and
    LoRA terms (ranks below, at and past a vector of every ISA, taken into the four-row dots where ``M * R`` fits the
    kernel's scratch and added per output where it does not: the last case), against an fp64 product rounded once to
    the input dtype."""
    dt = DT[dtype]
    gen = torch.Generator().manual_seed(7)
    for M, N, K, R in [(1, 1, 1, 3), (1, 3, 15, 3), (2, 4, 16, 3), (1, 5, 17, 3), (2, 97, 123, 3), (1, 8, 64, 3),
                       (3, 6, 33, 3), (1, 21, 40, 16), (2, 13, 50, 20), (1, 9, 30, 8), (1, 7, 64, 37),
                       (3, 9, 16, 37)]:
        wide = torch.randn(N, K + 5, generator=gen).to(dt)
        W = wide[:, 2:2 + K]  # unit column stride, row stride K + 5
        x = torch.randn(M, K, generator=gen).to(dt)
        bias = torch.randn(N, generator=gen)
        xs, B = torch.randn(M, R, generator=gen), torch.randn(N, R, generator=gen)
        got = _C.dense_lora_gemv(x, W, bias, xs, B, 0.5)
        want = x.double() @ W.double().T + bias.double() + 0.5 * xs.double() @ B.double().T
        assert got.dtype == dt and got.shape == (M, N)
        # one rounding to dt at the end (fp32: accumulation order only)
        tol = 1e-5 if dt == torch.float32 else 2 * torch.finfo(dt).eps
        err = rel_err(got.double(), want)
        assert err <= tol, f"M={M} N={N} K={K} {dtype}: relative error {err:.2e} > {tol:.1e}"


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_dense_gemv_with_the_down_projection_and_leading_dims(isa, dtype):
    """``_C.dense_lora_gemv(..., A=A)`` computes ``xs = x A^T`` itself: the same numbers as ``_C.lora_xa`` followed by
    the two-call form (bit for bit) on 1, 2 and 3 threads (the threads split A's rows, then the weight's: large
    enough weights for several threads, ranks below the thread count), for 0, 1 and several rows, ``x`` with leading
    dimensions (``(..., K)`` in, ``(..., N)`` out), a bias, and against an fp64 product rounded once; bad arguments
    are refused by name."""
    dt = DT[dtype]
    gen = torch.Generator().manual_seed(17)
    threads = torch.get_num_threads()
    for lead, N, K, r in [((1,), 5, 17, 3), ((1, 1), 48, 576, 16), ((2, 3), 97, 123, 4), ((0,), 6, 33, 2),
                          ((), 7, 19, 5), ((3,), 1, 1, 1), ((1,), 1000, 576, 16), ((1,), 301, 576, 1),
                          ((2,), 700, 200, 2)]:
        W = torch.randn(N, K, generator=gen).to(dt)
        x = torch.randn(*lead, K, generator=gen).to(dt)
        A, B = torch.randn(r, K, generator=gen), torch.randn(N, r, generator=gen)
        bias = torch.randn(N, generator=gen)
        x2 = x.reshape(-1, K)
        two_calls = _C.dense_lora_gemv(x2, W, bias, _C.lora_xa(x2, A, 0.0, 0), B, 0.5)
        try:
            for count in (1, 2, 3):
                torch.set_num_threads(count)
                got = _C.dense_lora_gemv(x, W, bias, None, B, 0.5, A)
                assert got.dtype == dt and got.shape == (*lead, N), (lead, got.shape)
                assert torch.equal(got.reshape(-1, N), two_calls), (lead, N, K, r, count)
        finally:
            torch.set_num_threads(threads)
        if x2.shape[0]:
            want = x2.double() @ W.double().T + bias.double() + 0.5 * (x2.double() @ A.double().T) @ B.double().T
            tol = 1e-5 if dt == torch.float32 else 2 * torch.finfo(dt).eps
            err = rel_err(got.reshape(-1, N).double(), want)
            assert err <= tol, f"{lead} N={N} K={K} {dtype}: relative error {err:.2e} > {tol:.1e}"
    x, W, A, B = torch.randn(2, 8).to(dt), torch.randn(4, 8).to(dt), torch.randn(3, 8), torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="A takes the place of xs"):
        _C.dense_lora_gemv(x, W, None, torch.zeros(2, 3), B, 1.0, A)
    with pytest.raises(RuntimeError, match="A takes the place of xs"):
        _C.dense_lora_gemv(x, W, None, None, None, 1.0, A)
    with pytest.raises(RuntimeError, match="A"):
        _C.dense_lora_gemv(x, W, None, None, B, 1.0, torch.randn(3, 7))
    with pytest.raises(RuntimeError, match="at least one dimension"):
        _C.dense_lora_gemv(torch.tensor(1.0).to(dt), W, None, None, None, 1.0)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_dense_gemv_prefetch_modes_change_no_number(isa, dtype):
    """``_C.dense_lora_gemv``'s ``prefetch`` (0 none, 1 non-temporal, 2 into L2) only requests memory: the three
    give bit-equal results, with weights tall enough that rows are requested ahead (at least 20 rows a thread), a
    row-sliced weight, the adapter term and a bias, against an fp64 product rounded once; any other value is
    refused by name."""
    dt = DT[dtype]
    gen = torch.Generator().manual_seed(23)
    for M, N, K in [(1, 97, 123), (2, 261, 64), (1, 44, 2048), (3, 23, 9)]:
        W = torch.randn(N, K + 3, generator=gen).to(dt)[:, 1:1 + K]
        x = torch.randn(M, K, generator=gen).to(dt)
        A, B, bias = torch.randn(4, K, generator=gen), torch.randn(N, 4, generator=gen), torch.randn(N, generator=gen)
        outs = [_C.dense_lora_gemv(x, W, bias, None, B, 0.5, A, mode) for mode in (0, 1, 2)]
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2]), (M, N, K, dtype)
        want = x.double() @ W.double().T + bias.double() + 0.5 * (x.double() @ A.double().T) @ B.double().T
        tol = 1e-5 if dt == torch.float32 else 2 * torch.finfo(dt).eps
        assert rel_err(outs[0].double(), want) <= tol, (M, N, K, dtype)
    with pytest.raises(RuntimeError, match="dense_lora_gemv: prefetch must be"):
        _C.dense_lora_gemv(x, W, None, None, None, 1.0, None, 3)


@pytest.mark.parametrize("xdt", ["fp32", "bf16"])
def test_gemv_prefetch_routes_pinned_through_the_forward(xdt):
    """Each route of ``gemv_prefetch`` pinned in turn under the forward's ``gemv`` route: the call takes it
    (``last_route``) and every route gives the same output, PEFT's within the dtype rule; unpinned, the choice is
    measured among the three and kept."""
    x, W, b, A, B, lb, s = make_case(2, 123, 97, [8], DT[xdt], torch.float32, True, False, "contig")
    ps, seeds = [0.0], [5]
    y_ref, _ = REF.lora_forward(x, W, b, A, B, lb, s, ps, seeds)
    y_o, _ = REF.lora_forward(x.float(), W.float(), as_f32(b), A, B, lb, s, ps, seeds)
    outputs = {}
    routes.set_route("lora_forward", "gemv")
    try:
        for route in each_route("gemv_prefetch"):
            y, _ = CPU.lora_forward(x, W, b, A, B, lb, s, ps, seeds)
            assert routes.last_route("gemv_prefetch") == route
            assert_by_dtype_rule(f"{route}: y", y, y_ref, y_o, all_fp32=xdt == "fp32")
            outputs[route] = y
        routes.clear_choices()
        y, _ = CPU.lora_forward(x, W, b, A, B, lb, s, ps, seeds)
        chosen = [row for row in routes.routes() if row["op"] == "gemv_prefetch"]
        assert len(chosen) == 1 and set(chosen[0]["timings_ms"]) == set(routes.ROUTES["gemv_prefetch"]), chosen
    finally:
        routes.set_route(None, None)
        routes.clear_choices()
    assert set(outputs) == set(routes.ROUTES["gemv_prefetch"])
    assert all(torch.equal(y, outputs["nta"]) for y in outputs.values()), "a prefetch hint changed a number"


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_stacked_transpose_every_shape_and_layout(isa, dtype):
    """``_C.stack_transposed``: 8 x 8 register tiles where they fit and element by element at every edge, rows a
    power of two apart (the cache-set case), a column-sliced and a transposed-view ``B``, several adapters stacked,
    against torch's own transpose (exact: it only moves values, widened to fp32)."""
    dt = DT[dtype]
    gen = torch.Generator().manual_seed(11)
    for N, r in [(1, 1), (7, 3), (8, 8), (9, 17), (33, 16), (2048, 16), (576, 64), (100, 7)]:
        B = torch.randn(N, r, generator=gen).to(dt).requires_grad_(True)
        assert torch.equal(_C.stack_transposed([B]), B.detach().float().t().contiguous()), (N, r)
        wide = torch.randn(N, r + 3, generator=gen).to(dt)
        sliced, viewed = wide[:, 1:1 + r], torch.randn(r, N, generator=gen).to(dt).t()
        want = torch.cat([t.float().t() for t in (B.detach(), sliced, viewed)], 0)
        assert torch.equal(_C.stack_transposed([B, sliced, viewed]), want), (N, r)
    with pytest.raises(RuntimeError, match="rows"):
        _C.stack_transposed([torch.zeros(4, 2), torch.zeros(5, 2)])


@pytest.mark.parametrize("ranks", [[8], [4, 3]], ids=["one-adapter", "two-adapters"])
def test_kept_b_transpose_follows_in_place_updates(ranks):
    """In inference calls the fused routes read each ``B^T`` from a copy kept across calls (``fastpeft._derived``):
    after an in-place update of ``B`` (an optimizer step) and after a new ``B`` tensor, forward and backward must use
    the new values."""
    routes.set_route("lora_forward", "fused")
    routes.set_route("lora_backward", "fused")
    try:
        x, W, b, A, B, lb, scaling = make_case(5, 33, 29, ranks, torch.float32, torch.float32, True, False, "contig")
        ps, seeds = [0.0] * len(ranks), [0] * len(ranks)
        dy = torch.randn(5, 29, generator=torch.Generator().manual_seed(3))
        for step in range(3):
            with kept_copies():  # an inference call: the kept B^T is read
                y, xa = CPU.lora_forward(x, W, b, A, B, lb, scaling, ps, seeds)
            assert routes.last_route("lora_forward") == "fused"
            y_ref, xa_ref = REF.lora_forward(x, W, b, A, B, lb, scaling, ps, seeds)
            assert rel_err(y, y_ref) <= 1e-5, f"step {step}: y"
            got = CPU.lora_backward(dy, x, W, A, B, xa, scaling, ps, seeds, True, True)
            assert routes.last_route("lora_backward") == "fused"
            want = REF.lora_backward(dy, x, W, A, B, xa_ref, scaling, ps, seeds, True, True)
            assert rel_err(got[0], want[0]) <= 1e-5, f"step {step}: dX"
            for i in range(len(ranks)):
                assert rel_err(got[1][i], want[1][i]) <= 1e-5, f"step {step}: dA[{i}]"
            if step == 0:
                with torch.no_grad():
                    B[0].mul_(-1.5).add_(0.25)  # in place: the version counter moves
            else:
                B[-1] = B[-1] * 0.5 + 1.0  # a new tensor
    finally:
        routes.set_route("lora_forward", None)
        routes.set_route("lora_backward", None)



def test_training_calls_never_read_kept_copies():
    """Outside inference calls (training) the fused routes derive ``B^T`` per call: a write the version counter does
    not see (FSDP2's all-gather into the same tensor, ``.data``) must still reach the next forward and backward."""
    routes.set_route("lora_forward", "fused")
    routes.set_route("lora_backward", "fused")
    try:
        x, W, b, A, B, lb, scaling = make_case(5, 33, 29, [8], torch.float32, torch.float32, True, False, "contig")
        ps, seeds = [0.0], [0]
        dy = torch.randn(5, 29, generator=torch.Generator().manual_seed(3))
        with kept_copies():
            CPU.lora_forward(x, W, b, A, B, lb, scaling, ps, seeds)  # a kept copy of B^T now exists
        B[0].data.mul_(-2.0)  # unseen by the version counter
        y, xa = CPU.lora_forward(x, W, b, A, B, lb, scaling, ps, seeds)
        y_ref, xa_ref = REF.lora_forward(x, W, b, A, B, lb, scaling, ps, seeds)
        assert rel_err(y, y_ref) <= 1e-5, "a training forward read a stale kept copy"
        got = CPU.lora_backward(dy, x, W, A, B, xa, scaling, ps, seeds, True, True)
        want = REF.lora_backward(dy, x, W, A, B, xa_ref, scaling, ps, seeds, True, True)
        assert rel_err(got[0], want[0]) <= 1e-5, "a training backward read a stale kept copy"
    finally:
        routes.set_route("lora_forward", None)
        routes.set_route("lora_backward", None)


def test_no_copy_is_kept_of_a_trainable_adapter():
    """Even in an inference call (an evaluation between training steps), ``B^T`` of a ``B`` that requires grad is
    derived per call: FSDP2 rewrites a training parameter's unsharded tensor without moving its version counter."""
    from fastpeft.backends.cpu import _bt_all

    B = torch.randn(29, 8, requires_grad=True)
    with kept_copies():
        first = _bt_all([B])
        B.data.mul_(-2.0)  # unseen by the version counter
        assert torch.equal(_bt_all([B]), B.detach().t()), "a kept copy of a trainable B was read"
    assert not torch.equal(first, B.detach().t())


# ------------------------------------------------------------------------------------ DoRA's column passes
@pytest.mark.parametrize("z_dt,out_dt,add_kind", [("bf16", "bf16", "none"), ("bf16", "bf16", "vector"),
                                                  ("fp32", "bf16", "rows-bf16"), ("fp16", "fp16", "rows-fp32"),
                                                  ("fp32", "fp32", "vector"), ("bf16", "fp32", "rows-bf16")])
def test_scale_columns_is_fp32_arithmetic_rounded_once(isa, z_dt, out_dt, add_kind):
    """``_C.scale_columns``: ``add + z * scale`` in fp64 rounded to the output dtype, on odd shapes and a row stride
    beyond N; within one rounding of the output dtype (and fp32 arithmetic's own error)."""
    g = torch.Generator().manual_seed(len(z_dt) * 7 + len(add_kind))
    M, N = 37, 53
    z = torch.randn(M, N + 5, generator=g).to(DT[z_dt])[:, :N]
    scale = torch.rand(N, generator=g) + 0.5
    add = {"none": None, "vector": torch.randn(N, generator=g),
           "rows-bf16": torch.randn(M, N, generator=g).to(torch.bfloat16),
           "rows-fp32": torch.randn(M, N, generator=g)}[add_kind]
    got = _C.scale_columns(z, scale, add, DT[out_dt])
    exact = z.double() * scale.double() + (0 if add is None else add.double())
    assert got.dtype == DT[out_dt] and got.shape == (M, N)
    ulp = {"fp32": 2.0 ** -23, "bf16": 2.0 ** -8, "fp16": 2.0 ** -11}[out_dt]
    assert ((got.double() - exact).abs() <= ulp * exact.abs() + 1e-6).all()
    assert torch.equal(got, exact.to(DT[out_dt])) or out_dt == "fp32"  # 16-bit: the fp64 value rounded once
    # Into rows of a larger buffer (a row stride beyond N): the same values there, nothing around them touched.
    buffer = torch.full((M + 2, N + 3), 7.0, dtype=DT[out_dt])
    into = _C.scale_columns(z, scale, add, DT[out_dt], buffer[1:M + 1, :N])
    assert into.data_ptr() == buffer[1, 0].data_ptr() and torch.equal(buffer[1:M + 1, :N], got)
    untouched = torch.ones_like(buffer, dtype=torch.bool)
    untouched[1:M + 1, :N] = False
    assert (buffer[untouched] == 7.0).all()


@pytest.mark.parametrize("a_dt,b_dt", [("bf16", "bf16"), ("bf16", "fp32"), ("fp16", "fp32"), ("fp32", "fp32")])
@pytest.mark.parametrize("M,N", [(1, 7), (37, 53), (130, 300)])
def test_column_dots_are_fp32_sums_of_exact_products(isa, a_dt, b_dt, M, N):
    g = torch.Generator().manual_seed(M + N)
    a = torch.randn(M, N + 2, generator=g).to(DT[a_dt])[:, :N]
    b = torch.randn(M, N, generator=g).to(DT[b_dt])
    got = _C.column_dots(a, b)
    exact = (a.double() * b.double()).sum(0)
    assert got.dtype == torch.float32 and got.shape == (N,)
    assert ((got.double() - exact).abs() <= 1e-6 * (a.double().abs() * b.double().abs()).sum(0) + 1e-9).all()


@pytest.mark.parametrize("dy_dt,z_dt", [("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16"), ("fp16", "fp32")])
@pytest.mark.parametrize("M,N", [(1, 7), (37, 53), (130, 300)])
@pytest.mark.parametrize("with_z,with_e", [(True, True), (True, False), (False, True)])
def test_dora_grad_prologue_is_column_dots_and_scale_columns_in_one_pass(isa, dy_dt, z_dt, M, N, with_z, with_e):
    """``_C.dora_grad_prologue``: the bits of ``column_dots(dy, z)`` and of ``scale_columns(dy, c)`` (and of ``dy``
    by ``c - 1`` below it) from one pass; ``dy`` rows with a stride beyond ``N``; and those passes are themselves
    within fp32 rounding of the fp64 values."""
    g = torch.Generator().manual_seed(M * N + with_e)
    dy = torch.randn(M, N + 3, generator=g).to(DT[dy_dt])[:, :N]
    z = torch.randn(M, N, generator=g).to(DT[z_dt]) if with_z else None
    scale = torch.rand(N, generator=g) + 0.5
    dots, ge = _C.dora_grad_prologue(dy, z, scale, with_e)
    assert ge.dtype == dy.dtype and ge.shape == ((2 if with_e else 1) * M, N)
    assert torch.equal(ge[:M], _C.scale_columns(dy, scale, None, dy.dtype, None))
    if with_e:
        assert torch.equal(ge[M:], _C.scale_columns(dy, scale - 1.0, None, dy.dtype, None))
        assert not torch.equal(ge[M:], ge[:M])
    if not with_z:
        assert dots.numel() == 0
        return
    assert torch.equal(dots, _C.column_dots(dy, z))
    exact = (dy.double() * z.double()).sum(0)
    assert ((dots.double() - exact).abs() <= 1e-6 * (dy.double().abs() * z.double().abs()).sum(0) + 1e-9).all()


@pytest.mark.parametrize("a_dt,b_dt,out_dt", [("none", "bf16", "bf16"), ("none", "fp32", "fp32"),
                                               ("bf16", "bf16", "bf16"), ("fp32", "bf16", "fp32"),
                                               ("fp16", "fp16", "fp16")])
@pytest.mark.parametrize("M,N,seed", [(1, 7, 3), (37, 1030, 11), (5, 4, 2**31 + 5)])
def test_masked_combine_is_the_canonical_mask_applied_in_fp32(isa, a_dt, b_dt, out_dt, M, N, seed):
    """``_C.masked_combine``: ``a + b * (kept where keep_scale keeps, else dropped)`` in fp64 rounded once to the
    output dtype (one rounding of it, fp32 arithmetic's error besides), the mask element ``(m, n)`` at offset
    ``m * N + n`` (``_C.dropout_scale``'s); a dropped coefficient of 0 writes +0 even over inf/NaN (a dropped copy of
    x); in place when ``out`` is ``a``; rows of ``b`` with a stride beyond ``N``."""
    g = torch.Generator().manual_seed(M * N)
    p = 0.3
    b = torch.randn(M, N + 3, generator=g).to(DT[b_dt])[:, :N]
    keep = _C.dropout_scale(seed, M, N, p, 1.0) != 0
    assert keep.any() and not keep.all(), "the mask must keep some and drop some: test is vacuous"
    if a_dt == "none":
        b[0, 0], b[-1, -1] = float("inf"), float("nan")
        got = _C.masked_combine(None, b, seed, p, 1.0, 0.0, None)
        want = b.masked_fill(~keep, 0)
        assert got.dtype == b.dtype and torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(), want.nan_to_num()) and not got.signbit()[~keep].any()
        return
    a = torch.randn(M, N, generator=g).to(DT[a_dt])
    kept, dropped = 0.4285714, -1.0
    exact = a.double() + b.double() * torch.where(keep, kept, dropped).double()
    out = a if DT[out_dt] == a.dtype else torch.empty(M, N, dtype=DT[out_dt])
    got = _C.masked_combine(a, b, seed, p, kept, dropped, out)
    assert got.data_ptr() == out.data_ptr() and got.dtype == DT[out_dt]
    ulp = {"fp32": 2.0 ** -22, "bf16": 2.0 ** -8, "fp16": 2.0 ** -10}[out_dt]
    assert ((got.double() - exact).abs() <= ulp * exact.abs() + 1e-6).all()


@pytest.mark.parametrize("corrected", [False, True], ids=["in-place", "corrected"])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=lambda p: f"drop{p}")
@pytest.mark.parametrize("dt", ["bf16", "fp32"])
@pytest.mark.parametrize("with_x", [True, False], ids=["dA", "no-dA"])
def test_lora_backward_onto_adds_the_masked_adapter_term_to_a_given_product(dt, p, with_x, corrected):
    """``CpuBackend.lora_backward_onto``: ``acc += s (dY B) A * mask / (1 - p)`` in place (or, ``corrected=(e, out)``,
    ``acc`` only read and ``out`` = that plus ``(mask / (1 - p) - 1) * e``, rounded to ``out``'s dtype) and
    ``(dA, dB)`` = ``(s (dY B)^T drop(x), s dY^T xa)``, against fp64 sums with ``keep_scale``'s mask, odd shapes, a
    row stride of ``dY`` beyond N and ``acc`` as the rows of a larger product."""
    from fastpeft.backends.cpu import CpuBackend
    from fastpeft.dora import keep_scale

    g = torch.Generator().manual_seed(int(p * 100) + len(dt))
    M, K, N, r, s, seed = 13, 37, 29, 3, 0.7, 1234
    dy = torch.randn(M, N + 4, generator=g).to(DT[dt])[:, :N]
    x = torch.randn(M, K, generator=g).to(DT[dt])
    A, B = torch.randn(r, K, generator=g), torch.randn(N, r, generator=g)
    xa = torch.randn(M, r, generator=g)
    product = torch.randn(2 * M, K, generator=g)
    before = product.clone()
    backend = CpuBackend()
    e, out = torch.randn(M, K, generator=g), torch.empty(M, K, dtype=DT[dt])
    dA, dB = backend.lora_backward_onto(product[:M], dy, x if with_x else None, A, B, xa, s, p, seed,
                                        **({"corrected": (e, out)} if corrected else {}))
    mask = (keep_scale(backend, M, K, p, seed, "cpu") if p > 0 else torch.ones(M, K)).double()
    gB = dy.double() @ B.double() * s
    want_acc = before[:M].double() + (gB @ A.double()) * mask
    if corrected:
        want = want_acc + (mask - 1) * e.double()
        assert (out.double() - want).abs().max() <= (2.0 ** -8 if dt == "bf16" else 1e-5) * (1 + want.abs().max())
        if p > 0:
            assert torch.equal(product[:M], before[:M]), "acc was written"
    else:
        assert (product[:M].double() - want_acc).abs().max() <= 1e-5 * (1 + want_acc.abs().max())
    assert torch.equal(product[M:], before[M:]), "rows beyond acc were written"
    want_dB = s * dy.double().t() @ xa.double()
    assert dB.dtype == torch.float32 and (dB.double() - want_dB).abs().max() <= 1e-5 * (1 + want_dB.abs().max())
    if with_x:
        want_dA = gB.t() @ (x.double() * mask)
        assert dA.dtype == torch.float32 and (dA.double() - want_dA).abs().max() <= 1e-5 * (1 + want_dA.abs().max())
    else:
        assert dA is None


@pytest.mark.parametrize("which", ["cpu", "base-class"])
def test_lora_down_and_up_onto_are_fp32_products(which):
    """``Backend.lora_down`` (``x A^T`` in fp32) and ``Backend.lora_up_onto`` (``acc += scale h B^T + bias`` in place)
    on the cpu backend's C++ passes and as the base class computes them in torch (which the backends without such
    passes use): against fp64, a bf16 ``x`` with a row stride beyond K, ``acc`` as rows of a larger buffer."""
    from fastpeft.backends.base import Backend
    from fastpeft.backends.cpu import CpuBackend

    backend = CpuBackend() if which == "cpu" else Backend()
    g = torch.Generator().manual_seed(5)
    M, K, N, r = 37, 53, 29, 3
    x = torch.randn(M, K + 4, generator=g).to(torch.bfloat16)[:, :K]
    A, B, bias = torch.randn(r, K, generator=g), torch.randn(N, r, generator=g), torch.randn(N, generator=g)
    h = backend.lora_down(x, A)
    want_h = x.double() @ A.double().t()
    assert h.dtype == torch.float32 and h.shape == (M, r) and rel_err(h, want_h) <= 1e-6
    buffer = torch.randn(M + 3, N, generator=g)
    before = buffer.clone()
    out = backend.lora_up_onto(buffer[2:M + 2], h, B, 0.7, bias)
    assert out.data_ptr() == buffer[2].data_ptr()
    want = before[2:M + 2].double() + 0.7 * h.double() @ B.double().t() + bias.double()
    assert rel_err(buffer[2:M + 2], want) <= 1e-6
    assert torch.equal(buffer[:2], before[:2]) and torch.equal(buffer[M + 2:], before[M + 2:])


@pytest.mark.parametrize("out_dt", ["bf16", "fp32"])
@pytest.mark.parametrize("M,K", [(1, 7), (13, 130), (70, 64)])
def test_lora_dx_pass_writes_the_masked_correction_in_the_same_sweep(isa, out_dt, M, K):
    """``_C.lora_dx_pass(dx, x, A, g, p, seed, extra, out)``: ``dx`` only read, ``out = dx + (g A) * mask / (1 - p)
    + (mask / (1 - p) - 1) * extra`` within one rounding of ``out``'s dtype of the fp64 value (whole and partial
    column strips, rows with strides beyond K), ``dA`` the same as without the correction."""
    g_ = torch.Generator().manual_seed(M * 131 + K)
    p, seed, r = 0.3, 77, 3
    acc = torch.randn(M, K + 2, generator=g_)[:, :K]
    e = torch.randn(M, K, generator=g_)
    g = torch.randn(M, r, generator=g_)
    A = torch.randn(r, K, generator=g_)
    x = torch.randn(M, K, generator=g_).to(torch.bfloat16)
    out = torch.empty(M, K + 1, dtype=DT[out_dt])[:, :K]
    before = acc.clone()
    dA = _C.lora_dx_pass(acc, x, A, g, p, seed, e, out)
    assert torch.equal(acc, before), "dx was written"
    mask = _C.dropout_scale(seed, M, K, p, 1.0 / (1.0 - p)).double()
    assert (mask == 0).any() and (mask != 0).any(), "the mask must keep some and drop some: test is vacuous"
    exact = before.double() + (g.double() @ A.double()) * mask + (mask - 1) * e.double()
    ulp = {"fp32": 2.0 ** -21, "bf16": 2.0 ** -8}[out_dt]
    assert ((out.double() - exact).abs() <= ulp * exact.abs() + 1e-5).all()
    assert torch.equal(dA, _C.lora_dx_pass(None, x, A, g, p, seed))
    with pytest.raises(RuntimeError, match="extra and out go together, with dx and p > 0"):
        _C.lora_dx_pass(acc, x, A, g, 0.0, seed, e, out)
    with pytest.raises(RuntimeError, match="extra must be fp32"):
        _C.lora_dx_pass(acc, x, A, g, p, seed, e.to(torch.bfloat16), out)


EMPTY_BATCH_ROUTES = {
    "lora": {"lora_forward": ["compose", "fused", "gemv", "compose_fp32", "fused_fp32", "fused_pairs", "fused_pairs_x"],
             "lora_backward": ["compose", "fused", "small", "gemv", "compose_fp32", "fused_fp32", "fused_pairs"]},
    "dora": {"dora_forward": ["compose", "fused", "stacked"], "dora_backward": ["compose", "fused", "stacked"]},
}


@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"drop{p}")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_an_empty_batch_gives_zero_adapter_gradients_on_every_route(kind, dtype, p):
    """A training step on no rows (the upstream gradient an expanded empty tensor, as ``sum().backward()`` gives it):
    every pinned route returns an empty output and input gradient and all-zero adapter gradients (an empty tensor's
    data pointer is null and its strides arbitrary: the C++ passes must still write their zero sums)."""
    import torch.nn as nn
    from peft import LoraConfig, get_peft_model

    import fastpeft

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(37, 29).to(DT[dtype])),
                           LoraConfig(r=3, target_modules=["0"], lora_dropout=p, use_dora=kind == "dora",
                                      init_lora_weights=False))
    fastpeft.accelerate(model, strict=True)
    model.train()
    params = [t for t in model.parameters() if t.requires_grad]
    (fwd_op, forwards), (bwd_op, backwards) = EMPTY_BATCH_ROUTES[kind].items()
    try:
        for fwd in forwards:
            for bwd in backwards:
                routes.set_route(fwd_op, fwd)
                routes.set_route(bwd_op, bwd)
                for t in params:
                    t.grad = None
                x = torch.randn(0, 37, dtype=DT[dtype], requires_grad=True)
                y = model(x)
                y.float().sum().backward()
                assert y.shape == (0, 29) and x.grad.shape == (0, 37), f"{fwd}/{bwd}"
                for t in params:
                    assert t.grad is not None and not t.grad.any(), f"{fwd}/{bwd}: a nonzero gradient from no rows"
    finally:
        routes.set_route(fwd_op, None)
        routes.set_route(bwd_op, None)


@pytest.mark.parametrize("out_dt", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("M,N,R", [(1, 5, 1), (7, 130, 16), (13, 64, 3), (70, 257, 8)])
def test_dora_epilogue_is_the_three_steps_in_fp32(isa, out_dt, M, N, R):
    """``_C.dora_epilogue``: ``z += k h B^T`` in place (or into ``z_out``, ``z`` only read) and
    ``round(base + bias + s h B^T + f z)`` (without ``base``: ``round(f z + bias)``), against the same arithmetic in
    fp64 (fp32 sums of R + 3 terms, one rounding to the output dtype), for whole panels, tail columns and row blocks
    of every size, with and without a bias, ``z``, ``base`` and ``z_out`` as rows of wider buffers."""
    gen = torch.Generator().manual_seed(M * 1000 + N)
    z_wide, base_wide = torch.randn(M, N + 3, generator=gen), torch.randn(M, N + 5, generator=gen)
    z, base = z_wide[:, 1:1 + N], base_wide[:, :N]
    out_wide = torch.full((M, N + 2), float("nan"))
    h, B = torch.randn(M, R, generator=gen), torch.randn(N, R, generator=gen)
    f, bias = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    k, s = 0.9, 1.7
    outside = (z_wide[:, 0].clone(), z_wide[:, N + 1:].clone())
    for b, with_base, z_out in itertools.product((None, bias), (True, False), (None, out_wide[:, 2:])):
        z0 = z.clone()
        u = h.double() @ B.double().T
        want_z = z0.double() + k * u
        want = f.double() * want_z + (0 if b is None else b.double())
        if with_base:
            want = want + base.double() + s * u
        got = _C.dora_epilogue(z, base if with_base else None, h, _C.stack_transposed([B]), k, s, f, b,
                               DT[out_dt], z_out)
        assert got.dtype == DT[out_dt] and got.shape == (M, N)
        if z_out is None:
            assert_close(f"{isa} z", z, want_z, 1e-6 * (R + 2))
        else:
            assert torch.equal(z, z0), "z was written though z_out was given"
            assert_close(f"{isa} z_out", z_out, want_z, 1e-6 * (R + 2))
            assert out_wide[:, :2].isnan().all(), "z_out's neighbours"
        ulp = 1e-6 * (R + 4) if out_dt == "fp32" else 2 * torch.finfo(DT[out_dt]).eps
        worst = ((got.double() - want).abs() - want.abs() * ulp - 1e-6 * (R + 4)).max().item()
        assert worst <= 0, f"{isa} {out_dt} M={M} N={N} R={R}: off by {worst:.3g} past one rounding"
        z.copy_(z0)
    assert torch.equal(z_wide[:, 0], outside[0]) and torch.equal(z_wide[:, N + 1:], outside[1]), "z's neighbours"
    with pytest.raises(RuntimeError, match="base must be fp32"):
        _C.dora_epilogue(z, base.bfloat16(), h, _C.stack_transposed([B]), k, s, f, None, torch.bfloat16)
    with pytest.raises(RuntimeError, match="z_out must be fp32"):
        _C.dora_epilogue(z, base, h, _C.stack_transposed([B]), k, s, f, None, torch.bfloat16, z.bfloat16())
    with pytest.raises(RuntimeError, match="h must be fp32"):
        _C.dora_epilogue(z, base, h.double(), _C.stack_transposed([B]), k, s, f, None, torch.bfloat16)


def test_column_passes_reject_what_they_cannot_read():
    with pytest.raises(RuntimeError, match="scale must be contiguous fp32 of shape \\[3\\]"):
        _C.scale_columns(torch.ones(2, 3), torch.ones(4), None, torch.float32)
    with pytest.raises(RuntimeError, match="add must be \\(3\\) or \\(2, 3\\)"):
        _C.scale_columns(torch.ones(2, 3), torch.ones(3), torch.ones(3, 3), torch.float32)
    with pytest.raises(RuntimeError, match="z needs unit column stride"):
        _C.scale_columns(torch.ones(3, 2).t(), torch.ones(3), None, torch.float32)
    with pytest.raises(RuntimeError, match="scale_columns: out must be \\(2, 3\\) of the output dtype"):
        _C.scale_columns(torch.ones(2, 3), torch.ones(3), None, torch.float32, torch.empty(2, 3, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="column_dots: a .* and b .* differ"):
        _C.column_dots(torch.ones(2, 3), torch.ones(3, 3))
    with pytest.raises(RuntimeError, match="masked_combine: a .* and b .* differ"):
        _C.masked_combine(torch.ones(2, 3), torch.ones(3, 3), 0, 0.5, 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match="out needs unit column stride"):
        _C.masked_combine(None, torch.ones(2, 3), 0, 0.5, 1.0, 0.0, torch.ones(3, 2).t())
