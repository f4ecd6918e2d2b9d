"""The Triton backend against the reference backend and torch autograd, on CPU (Triton's interpreter) and CUDA.

On the CPU the kernels run under ``TRITON_INTERPRET=1``; the same comparisons run on a CUDA device in the tests
marked ``gpu`` (collected everywhere, skipped without one). ``@triton.jit`` decides interpreter or compiler when it
decorates, so conftest fixes one mode per session and a device whose tensors the session's mode cannot run is
skipped (``checks.require_triton_mode_for``). bf16 is not run in the interpreter (its ``tl.dot`` is
broken in Triton 3.9); ``tests/test_triton_compile.py`` compiles every kernel in bf16 for sm_80/sm_90 instead.

Tolerances follow the project's rule: at most 2x as far from an fp64 autograd reference as the reference backend in
the same precision, with a floor (fp32: 1e-5; tf32 on the GPU: 5e-3).
"""

from __future__ import annotations

import os

import pytest
import torch
from checks import assert_within_2x, require_triton_mode_for

triton = pytest.importorskip("triton")

from fastpeft import reference  # noqa: E402
from fastpeft._philox import dropout_keep_mask  # noqa: E402
from fastpeft.backends.reference_backend import ReferenceBackend  # noqa: E402

REF = ReferenceBackend()
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
DEVICES = [pytest.param("cpu", id="interp"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def kernels_for(request):
    """``(device, lora_module, ia3_module, backend)`` for a device whose tensors this session's Triton mode runs."""
    device = request.param
    require_triton_mode_for(device)
    from fastpeft.backends.triton import BACKEND
    from fastpeft.kernels import ia3, lora

    return device, lora, ia3, BACKEND


def check(name, got, ref_same_precision, exact, device, dtype):
    """The 2x rule: ``got`` vs the fp64 ``exact``, the reference backend's own error setting the bar."""
    # fp32 dots are exact fp32 on the GPU too (no silent TF32, see kernels/_common.dot_precision): the same floor
    assert_within_2x(name, got, ref_same_precision, exact, floor=1e-5 if dtype == torch.float32 else 5e-3)


# ---------------------------------------------------------------------------------------------------- LoRA cases
# (dtype, adapter dtype, ranks, M, dropout per adapter, mode, bias, lora_bias, strided x, fan_in_fan_out weight)
LORA_CASES = [
    ("fp32", None, (8,), 1, (0.0,), "auto", True, False, False, False),
    ("fp16", None, (8,), 1, (0.1,), "auto", True, True, True, True),
    ("fp32", None, (1,), 37, (0.1,), "fused", False, True, True, False),
    ("fp16", None, (16,), 37, (0.0,), "fused", True, True, False, True),
    ("fp32", None, (16, 1), 37, (0.1, 0.2), "split", True, False, True, False),
    ("fp16", None, (4, 8), 37, (0.0, 0.1), "fused", False, False, False, False),
    ("fp32", None, (8, 4), 37, (0.0, 0.0), "fused", True, True, False, True),
    ("fp16", None, (16,), 37, (0.1,), "small", True, False, False, False),
    ("fp16", "fp32", (8,), 37, (0.1,), "fused", True, True, True, False),
    ("fp32", None, (8,), 70, (0.0,), "auto", True, False, False, True),
    ("fp16", None, (8,), 70, (0.1,), "auto", False, True, False, False),
]


def _lora_id(case):
    dt, adt, rs, M, ps, mode, bias, lbias, strided, fifo = case
    parts = [dt + (f"/{adt}A" if adt else ""), "r" + "+".join(map(str, rs)), f"M{M}",
             "drop" + "+".join(str(p) for p in ps), mode]
    parts += [n for n, on in (("bias", bias), ("lbias", lbias), ("strided", strided), ("fifo", fifo)) if on]
    return "-".join(parts)


def _make_lora(case, device, seed=0):
    dt, adt, rs, M, ps, mode, bias, lbias, strided, fifo = case
    dtype = DTYPES[dt]
    adtype = DTYPES[adt] if adt else dtype
    K, N = 123, 97
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dtype=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    x = rnd(M, 2 * K)[:, ::2] if strided else rnd(M, K)  # strided: column stride 2
    W = rnd(K, N, scale=K ** -0.5).t() if fifo else rnd(N, K, scale=K ** -0.5)  # fifo: transposed view
    b = rnd(N) if bias else None
    A = [rnd(r, K, dtype=adtype, scale=K ** -0.5) for r in rs]
    B = [rnd(N, r, dtype=adtype, scale=r ** -0.5) for r in rs]
    lb = [rnd(N, dtype=adtype) if lbias else None for _ in rs]
    s = [2.0 / (i + 1) for i in range(len(rs))]
    seeds = [1234 + 7 * i for i in range(len(rs))]
    return dict(x=x, W=W, b=b, A=A, B=B, lb=lb, s=s, ps=list(ps), seeds=seeds, mode=mode)


def _autograd_lora(d, grad_y):
    """fp64 autograd through ``fastpeft.reference.lora_linear``: y, dX, dA, dB, dbias."""
    x = d["x"].double().requires_grad_()
    A = [a.double().requires_grad_() for a in d["A"]]
    B = [b.double().requires_grad_() for b in d["B"]]
    lb = [None if b is None else b.double().requires_grad_() for b in d["lb"]]
    y = reference.lora_linear(x, d["W"].double(), None if d["b"] is None else d["b"].double(), A, B, lb, d["s"],
                              d["ps"], d["seeds"])
    y.backward(grad_y.double())
    dbias = [grad_y.double().sum(0) * s for s in d["s"]]
    return y, x.grad, [a.grad for a in A], [b.grad for b in B], dbias


@pytest.mark.parametrize("case", LORA_CASES, ids=_lora_id)
def test_lora_forward_backward(kernels_for, case):
    device, lora, _, backend = kernels_for
    d = _make_lora(case, device)
    args = (d["x"], d["W"], d["b"], d["A"], d["B"], d["lb"], d["s"], d["ps"], d["seeds"])
    y, xa = lora.lora_forward(*args, mode=d["mode"])
    y_ref, xa_ref = REF.lora_forward(*args)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype).to(device)
    y64, dx64, dA64, dB64, db64 = _autograd_lora(d, grad_y)
    if d["mode"] == "auto":
        y_b, _ = backend.lora_forward(*args)
        if device == "cpu":
            # unmeasured in the interpreter: the backend takes the kernels' own automatic choice, bit for bit
            assert torch.equal(y_b, y), "backend.lora_forward differs from kernels.lora.lora_forward(mode='auto')"
        else:
            # on a GPU the backend takes its measured route, which may round differently: the 2x rule instead
            check("backend y", y_b, y_ref, y64, device, y_b.dtype)

    assert y.dtype == d["x"].dtype, "y dtype"
    check("y", y, y_ref, y64, device, y.dtype)
    for i, (h, h_ref) in enumerate(zip(xa, xa_ref)):
        assert h.dtype == d["A"][i].dtype, f"xa[{i}] dtype"
        x_i = reference.apply_dropout(d["x"].double(), d["ps"][i], d["seeds"][i])
        check(f"xa[{i}]", h, h_ref, x_i @ d["A"][i].double().t(), device, h.dtype)

    dx, dA, dB, dbias = lora.lora_backward(grad_y, d["x"], d["W"], d["A"], d["B"], xa_ref, d["s"], d["ps"],
                                           d["seeds"], True, True, mode=d["mode"])
    dx_r, dA_r, dB_r, dbias_r = REF.lora_backward(grad_y, d["x"], d["W"], d["A"], d["B"], xa_ref, d["s"], d["ps"],
                                                  d["seeds"], True, True)
    assert dx.dtype == grad_y.dtype, "dX dtype"
    check("dX", dx, dx_r, dx64, device, dx.dtype)
    for i in range(len(d["A"])):
        assert dA[i].dtype == d["A"][i].dtype and dB[i].dtype == d["B"][i].dtype, f"dA/dB[{i}] dtype"
        check(f"dA[{i}]", dA[i], dA_r[i], dA64[i], device, dA[i].dtype)
        check(f"dB[{i}]", dB[i], dB_r[i], dB64[i], device, dB[i].dtype)
        check(f"dbias[{i}]", dbias[i], dbias_r[i], db64[i], device, dbias[i].dtype)

    # without dX / dA requested (x may then be None)
    dx2, dA2, dB2, _ = lora.lora_backward(grad_y, None, d["W"], d["A"], d["B"], xa_ref, d["s"], d["ps"],
                                          d["seeds"], False, False, mode=d["mode"])
    assert dx2 is None and all(a is None for a in dA2), "dX/dA must be None when not requested"
    for i in range(len(d["A"])):
        check(f"dB[{i}] (no dX)", dB2[i], dB_r[i], dB64[i], device, dB2[i].dtype)


# ------------------------------------------------------------------------------------------------------ routes
def _cuda_kernels_serve(device: str) -> bool:
    """Whether the triton backend's dense ops offer the ``cuda_kernels`` route here: CUDA tensors with the cuda
    backend (the extension ``fastpeft._cuda``) available; never in the interpreter on CPU tensors."""
    from fastpeft.backends import availability

    return device == "cuda" and availability("cuda")[0]


ROUTE_CASES = [
    ("fp32", None, (4,), 5, (0.0,), "auto", True, False, False, False),
    ("fp16", "fp32", (4,), 9, (0.2,), "auto", True, True, True, False),
    ("fp32", None, (3, 5), 7, (0.0, 0.3), "auto", False, True, False, True),
    ("fp16", "fp32", (4,), 6, (0.0,), "auto", True, False, True, False),
]


@pytest.mark.parametrize("case", ROUTE_CASES, ids=_lora_id)
def test_every_route_matches_reference(kernels_for, case):
    """The triton backend's routes (``compose``, ``compose_pass``, ``passes``, ``split_gemm``, ``fused_gemm``), each
    pinned through ``fastpeft.routing``, against the fp64 reference: a route changes speed, never meaning.
    Ineligible pins (the fused GEMM forward with a dropped adapter among several; ``compose_pass`` where x is as
    wide as every adapter without dropout) are reported by ``last_route`` and skipped."""
    from fastpeft import routing

    device, _, _, backend = kernels_for
    d = _make_lora(case, device, seed=3)
    args = (d["x"], d["W"], d["b"], d["A"], d["B"], d["lb"], d["s"], d["ps"], d["seeds"])
    y_ref, xa_ref = REF.lora_forward(*args)
    grad_y = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(4)).to(y_ref.dtype).to(device)
    y64, dx64, dA64, dB64, db64 = _autograd_lora(d, grad_y)
    bwd = (grad_y, d["x"], d["W"], d["A"], d["B"], xa_ref, d["s"], d["ps"], d["seeds"], True, True)
    dx_r, dA_r, dB_r, db_r = REF.lora_backward(*bwd)
    ran = {"lora_forward": [], "lora_backward": []}
    try:
        for route in ("compose", "compose_pass", "passes", "split_gemm", "fused_gemm", "cuda_kernels"):
            routing.set_route("lora_forward", route)
            routing.set_route("lora_backward", route)
            y, xa = backend.lora_forward(*args)
            if routing.last_route("lora_forward") == route:
                ran["lora_forward"].append(route)
                assert y.dtype == d["x"].dtype
                check(f"{route}: y", y, y_ref, y64, device, y.dtype)
                for i, h in enumerate(xa):
                    assert h.dtype == d["A"][i].dtype, f"{route}: xa[{i}] dtype"
                    check(f"{route}: xa[{i}]", h, xa_ref[i], xa_ref[i].double(), device, h.dtype)
            dx, dA, dB, db = backend.lora_backward(*bwd)
            if routing.last_route("lora_backward") == route:
                ran["lora_backward"].append(route)
                check(f"{route}: dX", dx, dx_r, dx64, device, dx.dtype)
                for i in range(len(d["A"])):
                    check(f"{route}: dA[{i}]", dA[i], dA_r[i], dA64[i], device, dA[i].dtype)
                    check(f"{route}: dB[{i}]", dB[i], dB_r[i], dB64[i], device, dB[i].dtype)
                    check(f"{route}: dbias[{i}]", db[i], db_r[i], db64[i], device, db[i].dtype)
    finally:
        routing.set_route("lora_forward", None)
        routing.set_route("lora_backward", None)
    drops, n = sum(p > 0 for p in d["ps"]), len(d["ps"])
    fused_serves = {"lora_forward": drops == 0 or n == 1, "lora_backward": drops <= 1}
    # x narrower than an adapter without dropout: compose widens a copy of x, compose_pass widens it in the pass
    widened = any(A.dtype == torch.float32 != d["x"].dtype and p == 0 for A, p in zip(d["A"], d["ps"]))
    for op, names in ran.items():
        assert {"compose", "passes", "split_gemm"} <= set(names), (op, names)
        assert ("compose_pass" in names) == widened, (op, names)
        assert ("fused_gemm" in names) == fused_serves[op], (op, names)
        assert ("cuda_kernels" in names) == _cuda_kernels_serve(device), (op, names)


# ------------------------------------------------------------------------------------------------------ dropout
def test_philox_spec_is_tritons_randint4x(kernels_for):
    """fastpeft._philox's four words per counter are Triton's own ``tl.randint4x`` (so the spec is not checked only
    against fastpeft's re-implementations of it), including counters past 2**32."""
    import triton
    import triton.language as tl

    from fastpeft._philox import philox_half, philox_words

    device = kernels_for[0]

    @triton.jit
    def words_kernel(out_ptr, counter_ptr, seed, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        c = tl.load(counter_ptr + offs, mask=mask, other=0)
        w0, w1, w2, w3 = tl.randint4x(seed, c)  # uint32: widening to int64 keeps the value
        tl.store(out_ptr + offs * 4 + 0, w0.to(tl.int64), mask=mask)
        tl.store(out_ptr + offs * 4 + 1, w1.to(tl.int64), mask=mask)
        tl.store(out_ptr + offs * 4 + 2, w2.to(tl.int64), mask=mask)
        tl.store(out_ptr + offs * 4 + 3, w3.to(tl.int64), mask=mask)

    counters = torch.tensor([0, 1, 2, 7, 1000, 2**32 - 1, 2**32, 2**32 + 3, 2**40 + 11], dtype=torch.int64)
    seed = 31337
    out = torch.zeros(counters.numel() * 4, dtype=torch.int64, device=device)
    words_kernel[(1,)](out, counters.to(device), seed, counters.numel(), BLOCK=16)
    want = torch.stack(philox_words(seed, counters), -1).reshape(-1)
    assert torch.equal(out.cpu(), want), "fastpeft._philox words differ from tl.randint4x"
    offsets = torch.arange(8 * 2**32 - 10, 8 * 2**32 + 10, dtype=torch.int64)
    words = torch.stack(philox_words(seed, offsets >> 3), -1).gather(-1, ((offsets >> 1) & 3)[:, None])[:, 0]
    assert torch.equal(philox_half(seed, offsets), torch.where(offsets % 2 == 0, words & 0xFFFF, words >> 16))


@pytest.mark.parametrize("mode", ["fused", "split", "small"])
def test_dropout_mask_exact_and_keep_rate(kernels_for, mode):
    """x = 1, A = I: xa = keep / (1 - p), so the kernel's mask is read back and compared bit for bit."""
    device, lora, _, _ = kernels_for
    M, K, N, p, seed = 40, 37, 16, 0.3, 98765
    x = torch.ones(M, K, device=device)
    A = [torch.eye(K, device=device)]
    B = [torch.zeros(N, K, device=device)]
    W = torch.zeros(N, K, device=device)
    _, xa = lora.lora_forward(x, W, None, A, B, [None], [1.0], [p], [seed], mode=mode)
    keep = xa[0] > 0
    expected = dropout_keep_mask(seed, M, K, p, device=device)
    assert torch.equal(keep, expected), f"mask differs from fastpeft._philox in {(keep != expected).sum()} places"
    kept = xa[0][keep]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p))), "kept values must be scaled by 1/(1-p)"
    n = M * K
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 5 * ((p * (1 - p) / n) ** 0.5), f"keep rate {rate:.4f} vs {1 - p}"
    _, xa2 = lora.lora_forward(x, W, None, A, B, [None], [1.0], [p], [seed], mode=mode)
    assert torch.equal(xa[0], xa2[0]), "same seed must give the same mask"
    _, xa3 = lora.lora_forward(x, W, None, A, B, [None], [1.0], [p], [seed + 1], mode=mode)
    assert not torch.equal(xa[0], xa3[0]), "another seed must give another mask"


# ---------------------------------------------------------------------------------------------------------- IA3
IA3_CASES = [("fp32", True, 70, False, True), ("fp16", False, 70, True, False), ("fp32", False, 1, False, True),
             ("fp16", True, 70, True, True), ("fp32", True, 3, True, False)]


@pytest.mark.parametrize("case", IA3_CASES,
                         ids=lambda c: f"{c[0]}-{'ff' if c[1] else 'out'}-M{c[2]}" + ("-strided" if c[3] else "")
                         + ("-bias" if c[4] else ""))
def test_ia3_forward_backward(kernels_for, case):
    device, _, ia3, backend = kernels_for
    dt, ff, M, strided, bias = case
    dtype = DTYPES[dt]
    K, N = 123, 97
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, 2 * K, generator=g)[:, ::2] if strided else torch.randn(M, K, generator=g)
    x = x.to(dtype).to(device)
    W = (torch.randn(K, N, generator=g) * K ** -0.5).to(dtype).to(device).t()  # fan_in_fan_out-style view
    b = torch.randn(N, generator=g).to(dtype).to(device) if bias else None
    scale = (torch.rand(K if ff else N, generator=g) + 0.5).to(device)  # fp32 vectors under a low-precision base
    y_ref = REF.ia3_forward(x, W, b, scale, ff)
    grad_y = torch.randn(M, N, generator=g).to(dtype).to(device)
    x64 = x.double().requires_grad_()
    s64 = scale.double().requires_grad_()
    y64 = reference.ia3_linear(x64, W.double(), None if b is None else b.double(), [s64], ff)
    y64.backward(grad_y.double())
    dx_r, ds_r = REF.ia3_backward(grad_y, x, W, b, scale, ff, True)
    from fastpeft import routing

    try:
        for route in (None, "compose", "fused_gemm") + (("cuda_kernels",) if _cuda_kernels_serve(device) else ()):
            # None: the backend's own choice
            for op in ("ia3_forward", "ia3_backward"):
                routing.set_route(op, route)
            name = route or "auto"
            y = backend.ia3_forward(x, W, b, scale, ff)
            assert route is None or routing.last_route("ia3_forward") == route
            check(f"{name}: y", y, y_ref, y64, device, dtype)
            dx, ds = backend.ia3_backward(grad_y, x, W, b, scale, ff, True)
            assert route is None or routing.last_route("ia3_backward") == route
            assert dx.dtype == x.dtype and ds.dtype == scale.dtype and ds.shape == scale.shape, f"{name}: dtypes"
            check(f"{name}: dX", dx, dx_r, x64.grad, device, dtype)
            check(f"{name}: dscale", ds, ds_r, s64.grad, device, dtype)
            dx2, ds2 = backend.ia3_backward(grad_y, x, W, b, scale, ff, False)
            assert dx2 is None, f"{name}: dX must be None when not requested"
            check(f"{name}: dscale (no dX)", ds2, ds_r, s64.grad, device, dtype)
    finally:
        for op in ("ia3_forward", "ia3_backward"):
            routing.set_route(op, None)


# ------------------------------------------------------------------------------------------------------ backend
def test_backend_availability_and_supports(kernels_for):
    device, _, _, backend = kernels_for
    ok, reason = backend.availability()
    assert ok, reason
    x = torch.randn(4, 8, device=device)
    assert backend.supports(x, torch.randn(3, 8, device=device))
    assert not backend.supports(x, object()), "an unknown quantized weight kind must be declined"
    if device == "cpu":
        old = os.environ["TRITON_INTERPRET"]
        os.environ["TRITON_INTERPRET"] = "0"
        try:
            assert not backend.supports(x, torch.randn(3, 8)), "CPU tensors need TRITON_INTERPRET=1"
            if not torch.cuda.is_available():
                ok, reason = backend.availability()
                assert not ok and "TRITON_INTERPRET" in reason, reason
        finally:
            os.environ["TRITON_INTERPRET"] = old


@pytest.mark.gpu
def test_layers_on_a_second_gpu_launch_there():
    """With cuda:0 current, a call whose tensors live on the last GPU runs there and matches the reference."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    require_triton_mode_for("cuda")
    from fastpeft.backends.triton import BACKEND

    device = f"cuda:{torch.cuda.device_count() - 1}"
    d = _make_lora(ROUTE_CASES[0], device, seed=5)
    args = (d["x"], d["W"], d["b"], d["A"], d["B"], d["lb"], d["s"], d["ps"], d["seeds"])
    with torch.cuda.device(0):
        y, _ = BACKEND.lora_forward(*args)
    y_ref, _ = REF.lora_forward(*args)
    assert y.device == torch.device(device)
    assert torch.allclose(y, y_ref, rtol=5e-3, atol=5e-3)
