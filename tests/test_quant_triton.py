"""fastpeft.kernels.quant_matmul and fastpeft.backends.triton.quantized: dequantize-in-the-K-loop GEMMs.

On the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``) against a float32 reference built from
``QuantizedWeight.dequantize()``; bf16 runs too (the launcher widens the bf16 operands to fp32 for the interpreter's
broken bf16 ``tl.dot``). The kernel's launches are compiled ahead of time for sm_80 and sm_90, and checked for
tensor-core instructions, spills, stack and shared memory, by ``tests/test_triton_compile.py`` (recorded launches).
Nothing here needs a GPU or is skipped on CPU CI; in a session on a CUDA machine (compiled Triton) the interpreter
cases skip and the ``gpu`` case runs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
bnb = pytest.importorskip("bitsandbytes")

from checks import assert_close, require_triton_mode_for  # noqa: E402

from fastpeft.backends.reference_backend import ReferenceBackend  # noqa: E402
from fastpeft.quant import QuantizedWeight  # noqa: E402

REF = ReferenceBackend()
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# dequantized weight rounded to the activation dtype + fp32 accumulation, vs an fp32 reference
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _kernels(interpret: bool):
    """``fastpeft.kernels.quant_matmul``, where this session's Triton mode is the wanted one (else the test skips)."""
    require_triton_mode_for("cpu" if interpret else "cuda")
    from fastpeft.kernels import quant_matmul

    return quant_matmul


@pytest.fixture
def qm():
    return _kernels(True)


def make_weight(kind, nested, blocksize, N, K, wdtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.2
    if kind == "int8":
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.half())
        return QuantizedWeight(kind="int8", shape=(N, K), dtype=torch.float32, data=cb, absmax=scb)
    packed, state = bnb.functional.quantize_4bit(w.to(wdtype), blocksize=blocksize, compress_statistics=nested,
                                                 quant_type=kind)
    return QuantizedWeight.from_quant_state(packed, state)


WEIGHTS = [
    pytest.param("nf4", False, 64, id="nf4-bs64"),  # row-aligned absmax path
    pytest.param("nf4", True, 32, id="nf4-nested=T-bs32"),  # per-element absmax path
    pytest.param("fp4", True, 128, id="fp4-nested=T-bs128"),
    pytest.param("int8", False, 0, id="int8"),
]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("kind,nested,blocksize", WEIGHTS)
def test_quant_matmul_forward_and_transposed(qm, kind, nested, blocksize, dtype):
    dt = DTYPES[dtype]
    for M, N, K in [(1, 40, 128), (37, 70, 192)]:
        q = make_weight(kind, nested, blocksize, N, K)
        W = q.dequantize().float()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(M, K, generator=g).to(dt)
        bias = torch.randn(N, generator=g).to(dt)
        y = qm.quant_matmul(x, q, bias=bias)
        assert y.dtype == dt and y.shape == (M, N)
        assert_close(f"y {M}x{N}x{K}", y, x.float() @ W.t() + bias.float(), TOL[dt])
        dy = torch.randn(M, N, generator=g).to(dt)
        dx = qm.quant_matmul(dy, q, transpose=True)
        assert dx.shape == (M, K)
        assert_close(f"dx {M}x{N}x{K}", dx, dy.float() @ W, TOL[dt])
        # strided (transposed-storage) activations
        xt = x.t().contiguous().t()
        assert_close("y strided x", qm.quant_matmul(xt, q), x.float() @ W.t(), TOL[dt])


def test_quant_matmul_odd_k_blocks_straddle_rows(qm):
    q = make_weight("nf4", True, 64, 9, 50)  # K odd multiple of nothing: bytes and blocks cross rows
    x = torch.randn(5, 50)
    assert_close("y", qm.quant_matmul(x, q), x @ q.dequantize().t(), 1e-5)
    dy = torch.randn(5, 9)
    assert_close("dx", qm.quant_matmul(dy, q, transpose=True), dy @ q.dequantize(), 1e-5)


def test_quant_matmul_weight_dtype_rounding(qm):
    """An fp16 quant_state dequantizes to fp16 first (as bitsandbytes does), then to the activation dtype. (fp16,
    not bf16: the 3.9 interpreter's fp32->bf16 cast does not round to nearest even, off by an ulp.)"""
    q = make_weight("nf4", False, 64, 32, 64, wdtype=torch.float16)
    assert q.dtype == torch.float16
    x = torch.randn(8, 64)
    assert_close("y", qm.quant_matmul(x, q), x @ q.dequantize().float().t(), 1e-5)


def test_quant_matmul_epilogues(qm):
    q = make_weight("nf4", True, 64, 48, 64)
    W = q.dequantize()
    x = torch.randn(6, 64)
    pre, upre = torch.randn(6, 5), torch.randn(5, 48)
    assert_close("pre", qm.quant_matmul(x, q, pre=pre, upre=upre), x @ W.t() + pre @ upre, 1e-5)
    vin, vout = torch.rand(64) + 0.5, torch.rand(48) + 0.5
    assert_close("vin", qm.quant_matmul(x, q, vin=vin), (x * vin) @ W.t(), 1e-5)
    assert_close("vout", qm.quant_matmul(x, q, vout=vout), (x @ W.t()) * vout, 1e-5)


# ------------------------------------------------------------------------------------------ backend functions
def _lora_case(q, dtype, ranks=(4, 3), p=(0.0, 0.25), lora_bias=(False, True)):
    N, K = q.shape
    g = torch.Generator().manual_seed(3)
    x = torch.randn(13, K, generator=g).to(dtype)
    As = [(torch.randn(r, K, generator=g) * 0.1) for r in ranks]
    Bs = [(torch.randn(N, r, generator=g) * 0.1) for r in ranks]
    bs = [torch.randn(N, generator=g) * 0.1 if b else None for b in lora_bias]
    return x, As, Bs, bs, [0.5, 2.0], list(p), [11, 12]


_QUANT_OPS = ("lora_forward", "lora_backward", "ia3_forward", "ia3_backward")


@pytest.fixture(params=["fused", "compose"])
def route(request):
    """Pins the quantized ops to one route: ``fused`` (decoded in the K loop) or ``compose`` (decoded once into the
    reused buffer, then torch's matmul)."""
    from fastpeft import routing

    for op in _QUANT_OPS:
        routing.set_route(op, request.param)
    yield request.param
    for op in _QUANT_OPS:
        routing.set_route(op, None)


def _ran(route: str, *ops: str) -> None:
    from fastpeft import routing

    for op in ops:
        assert routing.last_route(op) == route, (op, routing.last_route(op))


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_backend_lora_matches_reference(qm, route, kind, dtype):
    from fastpeft.backends.triton import quantized as triton_quant

    dt = DTYPES[dtype]
    q = make_weight(kind, True, 64, 40, 64)
    x, As, Bs, bs, s, p, seeds = _lora_case(q, dt)
    assert triton_quant.supports(x, q)
    bias = torch.randn(40).to(dt)
    y, xa = triton_quant.lora_forward(x, q, bias, As, Bs, bs, s, p, seeds)
    y_ref, xa_ref = REF.lora_forward(x.float(), q, bias.float(), As, Bs, bs, s, p, seeds)
    assert y.dtype == dt
    assert_close("y", y, y_ref, TOL[dt])
    for i in range(2):
        assert_close(f"xa{i}", xa[i], xa_ref[i], TOL[dt])
    gy = torch.randn_like(y)
    got = triton_quant.lora_backward(gy, x, q, As, Bs, xa, s, p, seeds, True, True)
    ref = REF.lora_backward(gy.float(), x.float(), q, As, Bs, xa_ref, s, p, seeds, True, True)
    assert got[0].dtype == dt
    assert_close("dx", got[0], ref[0], TOL[dt])
    for name, a, b in zip(("dA", "dB", "dbias"), got[1:], ref[1:]):
        for i in range(2):
            assert_close(f"{name}{i}", a[i], b[i], TOL[dt])
    _ran(route, "lora_forward", "lora_backward")


@pytest.mark.parametrize("feedforward", [False, True], ids=["ff=F", "ff=T"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_backend_ia3_matches_reference(qm, route, feedforward, dtype):
    from fastpeft.backends.triton import quantized as triton_quant

    dt = DTYPES[dtype]
    q = make_weight("fp4", False, 64, 40, 64)
    x = torch.randn(9, 64).to(dt)
    bias = torch.randn(40).to(dt)
    scale = torch.rand(64 if feedforward else 40) + 0.5
    y = triton_quant.ia3_forward(x, q, bias, scale, feedforward)
    assert_close("y", y, REF.ia3_forward(x, q, bias, scale, feedforward), TOL[dt])
    gy = torch.randn_like(y)
    dx, dl = triton_quant.ia3_backward(gy, x, q, bias, scale, feedforward, True)
    dx_ref, dl_ref = REF.ia3_backward(gy, x, q, bias, scale, feedforward, True)
    assert_close("dx", dx, dx_ref, TOL[dt])
    assert_close("dscale", dl, dl_ref, TOL[dt])
    _ran(route, "ia3_forward", "ia3_backward")


# ------------------------------------------------------------------------------------ dequantize into a buffer
def _packed_weight(kind, nested, blocksize, N, K, wdtype, seed=0):
    """``(QuantizedWeight, oracle)``: the weight and its decoding by the tests' own decoder (tests/quant_oracle.py),
    never bitsandbytes' CPU kernels."""
    from quant_oracle import dequantize_4bit

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.2
    if kind == "int8":
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.half())
        q = QuantizedWeight(kind="int8", shape=(N, K), dtype=torch.float32, data=cb, absmax=scb)
        return q, cb.float() * scb.float()[:, None] / 127
    packed, state = bnb.functional.quantize_4bit(w.to(wdtype), blocksize=blocksize, compress_statistics=nested,
                                                 quant_type=kind)
    return QuantizedWeight.from_quant_state(packed, state), dequantize_4bit(packed, state)


DEQUANT_WEIGHTS = [
    pytest.param("nf4", True, 64, 40, 64, id="nf4-nested=T-bs64"),
    pytest.param("nf4", False, 64, 24, 80, id="nf4-bs64-K80"),  # blocks straddle rows (K % blocksize != 0)
    pytest.param("fp4", True, 128, 33, 96, id="fp4-nested=T-bs128-N33"),
    pytest.param("int8", False, 0, 40, 72, id="int8"),
]


def _dequant_module(interpret: bool):
    """``fastpeft.kernels.dequant``, where this session's Triton mode is the wanted one (else the test skips)."""
    _kernels(interpret)
    from fastpeft.kernels import dequant

    return dequant


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("kind,nested,blocksize,N,K", DEQUANT_WEIGHTS)
def test_dequantize_matches_the_oracle(qm, kind, nested, blocksize, N, K, dtype):
    """The dequantizing kernel writes the oracle's decoding, rounded to the weight's dtype and then to the compute
    dtype (as the K-loop kernel rounds it), into a caller's buffer: bit for bit, except int8 (fp32 roundoff of
    q * SCB / 127) and casts to bf16, which the 3.9 interpreter does not round to nearest even (an ulp off; fp16
    weights for that reason, as in test_quant_matmul_weight_dtype_rounding)."""
    dequant = _dequant_module(True)
    dt = DTYPES[dtype]
    for wdtype in ((torch.float32,) if kind == "int8" else (torch.float16, torch.float32)):
        q, expected = _packed_weight(kind, nested, blocksize, N, K, wdtype)
        expected = expected.to(q.dtype).to(dt)
        out = torch.full((N, K + 3), float("nan"), dtype=dt)[:, :K]  # a strided view: only (N, K) is written
        got = dequant.dequantize(q, dt, out=out)
        assert got.data_ptr() == out.data_ptr()
        if kind == "int8" or dt == torch.bfloat16:
            torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7 if dt == torch.bfloat16 else 2e-7,
                                       atol=0)
        else:
            assert torch.equal(got, expected), (got.float() - expected.float()).abs().max()


def test_compose_route_reuses_one_buffer_per_dtype(qm):
    from fastpeft.backends.triton import quantized as triton_quant

    _dequant_module(True)
    triton_quant._buffers.clear()
    small, _ = _packed_weight("nf4", True, 64, 16, 64, torch.float32)
    large, oracle = _packed_weight("nf4", True, 64, 40, 64, torch.float32, seed=1)
    first = triton_quant.dense_weight(large, torch.float16)
    ptr = first.data_ptr()
    assert torch.equal(first, oracle.to(torch.float16))
    again = triton_quant.dense_weight(small, torch.float16)
    assert again.data_ptr() == ptr and again.shape == (16, 64), "a smaller weight reuses the buffer"
    assert len(triton_quant._buffers) == 1
    triton_quant.dense_weight(small, torch.float32)
    assert len(triton_quant._buffers) == 2, "one buffer per compute dtype"


@pytest.mark.parametrize("stored,dtype", [("fp32", "bf16"), ("fp32", "fp16"), ("bf16", "bf16"), ("bf16", "fp32"),
                                          ("fp16", "bf16")])
def test_one_rounding_rule_says_when_a_direct_decode_is_fastpeft_s(stored, dtype):
    """``decodes_in_one_rounding`` (where bitsandbytes' CUDA decoder and product may serve) holds exactly where
    decoding straight to the compute dtype gives fastpeft's decoding, which rounds to the stored dtype first."""
    from fastpeft.backends.triton import quantized as triton_quant

    q, oracle = _packed_weight("nf4", True, 64, 64, 256, DTYPES[stored])
    exact = (q.code[q.codes().reshape(-1).long()] * q.absmax_float().repeat_interleave(q.blocksize)).view(64, 256)
    assert torch.equal(exact.to(DTYPES[stored]), oracle), "code * absmax in fp32 is the tests' decoder's value"
    direct = exact.to(DTYPES[dtype])  # one rounding, as bitsandbytes' CUDA decoder writes it
    same = torch.equal(q.dequantize(DTYPES[dtype]), direct)
    assert same == triton_quant.decodes_in_one_rounding(DTYPES[stored], DTYPES[dtype]), (stored, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("stored", ["bf16", "fp32"])
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_compose_route_on_gpu_matches_reference(kind, stored):
    """On a CUDA device: the compiled dequantizing kernel and the compose route's buffer (bitsandbytes' CUDA decoder
    for a 4-bit weight stored in the activations' dtype or in fp32) hold the oracle's decoding bit for bit, and the
    routes of the LoRA
    forward (``compose``, and for 4-bit ``bnb_native``: bitsandbytes' CUDA product) and the compose backward match
    the reference backend, bf16 activations."""
    from fastpeft import routing
    from fastpeft.backends.triton import quantized as triton_quant

    dequant = _dequant_module(False)
    dt = torch.bfloat16
    if kind == "int8" and stored == "fp32":
        pytest.skip("an int8 weight has one stored dtype")
    q, oracle = _packed_weight(kind, True, 64, 256, 512, DTYPES[stored])
    qc = q.to("cuda")
    got = dequant.dequantize(qc, dt)
    assert torch.equal(got.cpu(), oracle.to(q.dtype).to(dt))
    if kind != "int8":
        import bitsandbytes  # noqa: F401  (registers the decoder the buffer uses)

        assert triton_quant._bnb_decoder(qc, dt) is not None
        assert torch.equal(triton_quant.dense_weight(qc, dt).cpu(), oracle.to(q.dtype).to(dt))
    x = torch.randn(300, 512, device="cuda", dtype=dt)
    As = [torch.randn(16, 512, device="cuda") * 0.1]
    Bs = [torch.randn(256, 16, device="cuda") * 0.1]
    args = (As, Bs, [None], [0.5], [0.0], [7])
    y_ref, _ = REF.lora_forward(x.float(), qc, None, *args)
    forward_routes = ("compose", "bnb_native") if kind != "int8" else ("compose",)
    try:
        for route in forward_routes:
            routing.set_route("lora_forward", route)
            for rows in (x, x[:1]):  # bitsandbytes' product picks its GEMV for one row
                y, xa = triton_quant.lora_forward(rows, qc, None, *args)
                assert_close(f"{route}: y (M={rows.shape[0]})", y, y_ref[: rows.shape[0]], TOL[dt])
                _ran(route, "lora_forward")
        routing.set_route("lora_backward", "compose")
        y, xa = triton_quant.lora_forward(x, qc, None, *args)
        gy = torch.randn_like(y)
        dx = triton_quant.lora_backward(gy, x, qc, As, Bs, xa, [0.5], [0.0], [7], True, True)[0]
        dx_ref = REF.lora_backward(gy.float(), x.float(), qc, As, Bs, xa, [0.5], [0.0], [7], True, True)[0]
        assert_close("dx", dx, dx_ref, TOL[dt])
        _ran("compose", "lora_backward")
    finally:
        for op in _QUANT_OPS:
            routing.set_route(op, None)


def test_supports():
    from fastpeft.backends.triton import quantized as triton_quant

    q = make_weight("nf4", False, 64, 8, 64)
    assert not triton_quant.supports(torch.randn(2, 64), torch.randn(8, 64))
    assert not triton_quant.supports(torch.randn(2, 64, dtype=torch.float64), q)


def test_peft_qlora_model_runs_on_triton_backend(qm, monkeypatch):
    """A PEFT LoRA model over an NF4 base with ``set_backend("triton")`` goes through the dequantizing kernel in
    both directions and matches the reference backend."""
    import peft
    from torch import nn

    import fastpeft

    calls = []
    real = qm.quant_matmul

    def counting(*args, **kwargs):
        calls.append(kwargs.get("transpose", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(qm, "quant_matmul", counting)

    def build():
        torch.manual_seed(0)
        lin = bnb.nn.Linear4bit(64, 48, bias=True, compute_dtype=torch.float32, compress_statistics=True,
                                quant_type="nf4")
        lin.weight = bnb.nn.Params4bit(torch.randn(48, 64) * 0.1, requires_grad=False, compress_statistics=True,
                                       quant_type="nf4")
        model = nn.Sequential(lin.to("cpu"))
        model.is_loaded_in_4bit = True
        pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["0"], lora_dropout=0.0))
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.data = torch.randn(p.shape) * 0.1
        return fastpeft.accelerate(pm, strict=True)

    x = torch.randn(5, 64)
    results = {}
    for backend in ("reference", "triton"):
        fastpeft.set_backend(backend)
        try:
            pm = build()
            xb = x.clone().requires_grad_(True)
            y = pm(xb)
            y.sum().backward()
            grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
            results[backend] = (y.detach(), xb.grad, grads)
        finally:
            fastpeft.set_backend(None)
    assert True in calls and False in calls, f"the dequantizing kernel was not used both ways: {calls}"
    (y_r, dx_r, g_r), (y_t, dx_t, g_t) = results["reference"], results["triton"]
    assert_close("y", y_t, y_r, 1e-5)
    assert_close("dx", dx_t, dx_r, 1e-5)
    for name in g_r:
        assert_close(name, g_t[name], g_r[name], 1e-5)


_DROPOUT_KERNELS_SCRIPT = r"""
import sys, torch, bitsandbytes as bnb
from fastpeft.backends.triton import quantized as triton_quant
from fastpeft.backends.reference_backend import ReferenceBackend
from fastpeft.quant import QuantizedWeight
triton_quant.USE_LORA_KERNELS = True  # the CUDA route: masks applied per tile by fastpeft.kernels.lora
REF = ReferenceBackend()
torch.manual_seed(0)
q = QuantizedWeight.from_quant_state(*bnb.functional.quantize_4bit(
    torch.randn(40, 64) * 0.2, blocksize=64, compress_statistics=True, quant_type="nf4"))
x = torch.randn(13, 64)
As = [torch.randn(4, 64) * 0.1, torch.randn(3, 64) * 0.1]
Bs = [torch.randn(40, 4) * 0.1, torch.randn(40, 3) * 0.1]
s, p, seeds = [0.5, 2.0], [0.25, 0.1], [11, 12]
y, xa = triton_quant.lora_forward(x, q, None, As, Bs, [None, None], s, p, seeds)
yr, xar = REF.lora_forward(x, q, None, As, Bs, [None, None], s, p, seeds)
gy = torch.randn_like(y)
got = triton_quant.lora_backward(gy, x, q, As, Bs, xa, s, p, seeds, True, True)
ref = REF.lora_backward(gy, x, q, As, Bs, xar, s, p, seeds, True, True)
rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
errs = [rel(y, yr), rel(got[0], ref[0])] + [rel(a, b) for i in (1, 2) for a, b in zip(got[i], ref[i])]
print("MAXERR", max(errs))
"""


def test_dropout_through_lora_kernels_matches_reference():
    """With dropout, CUDA runs use fastpeft.kernels.lora's per-tile Philox masks (down_proj, grad_a, lowrank_update)
    instead of a materialized (M, K) mask. Checked under the interpreter in a fresh process (those kernels call
    Triton's @jit library helpers, which the interpreter refuses when triton was imported before
    TRITON_INTERPRET=1, as can happen in a mixed test session)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _DROPOUT_KERNELS_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = float(next(ln for ln in proc.stdout.splitlines() if ln.startswith("MAXERR")).split()[1])
    assert err < 1e-5, f"max relative error {err:.2e}"


def test_cuda_backend_leaves_quantized_weights_to_the_dequantizing_kernels():
    """The ``cuda`` backend's kernels take dense weights and would dequantize a whole quantized weight on every call
    (an int64 index tensor of N x K x 8 bytes); it declines quantized weights, so under ``auto`` they go to the
    Triton backend's dequantizing kernels. Checked on a stand-in CUDA input, since ``supports`` only reads
    attributes."""
    import types

    from fastpeft.backends.cuda import CudaBackend

    x = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, dim=lambda: 2,
                              layout=torch.strided, shape=(4, 64))
    assert not CudaBackend().supports(x, make_weight("nf4", True, 64, 16, 64))
    assert not CudaBackend().supports(x, make_weight("int8", False, 0, 16, 64))
