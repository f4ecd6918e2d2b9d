"""The ``cpu`` backend's fused dequantization (``_C.quant_*``) for bitsandbytes bases.

Oracles: the tests' host-independent 4-bit decoder (``quant_oracle.dequantize_4bit``, bit-equal to bitsandbytes'
correct decode; its native AVX-512 one is wrong for blocks that straddle rows), ``int8_vectorwise_dequant``, and
fp32 matmuls against those dequantized weights (never bitsandbytes' CPU matmul, which is wrong under autograd).
Every SIMD path this CPU runs, both forward routes (the decoding GEMV for M <= 16 and the dequantized tiles for
larger M, with several tiles and a partial last one), odd shapes (K odd, so rows start mid-byte, and 4-bit blocks
that straddle rows), nested absmax, fp32/bf16/fp16 weights and activations.
"""

from __future__ import annotations

import pytest
import torch
from checks import assert_close, assert_within_2x
from quant_oracle import dequantize_4bit
from test_cpu_backend import (  # noqa: F401  (pytestmark: skip without the extension)
    AVAILABLE,
    DT,
    REF,
    each_route,
    pytestmark,
)
from test_cpu_backend import isa as isa  # noqa: F401  (the per-SIMD-path fixture, requested by name)

from fastpeft import reference
from fastpeft import routing as routes
from fastpeft.backends import cpu as cpu_backend
from fastpeft.backends.cpu import BACKEND as CPU
from fastpeft.backends.cpu import _bnb_cpu_kernel
from fastpeft.quant import QuantizedWeight, _untile_cpu_repack

bnb = pytest.importorskip("bitsandbytes")
bnbf = bnb.functional

if AVAILABLE:
    from fastpeft import _C
    from fastpeft.backends.cpu import _quant_args

KINDS = [("nf4", False), ("fp4", False), ("nf4", True), ("fp4", True), ("int8", False)]
KIND_IDS = [f"{k}{'-nested' if n else ''}" for k, n in KINDS]


def quantize(kind: str, nested: bool, N: int, K: int, wdtype: torch.dtype, seed: int, blocksize: int = 64):
    """``(QuantizedWeight, fp32 dense weight from the independent decoder)`` of a fresh random matrix."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * K**-0.5
    if kind == "int8":
        cb, scb, _ = bnbf.int8_vectorwise_quant(w.half())
        qw = QuantizedWeight(kind="int8", shape=(N, K), dtype=torch.float32, data=cb, absmax=scb)
        return qw, bnbf.int8_vectorwise_dequant(cb, scb).float()
    packed, state = bnbf.quantize_4bit(w.to(wdtype), blocksize=blocksize, compress_statistics=nested, quant_type=kind)
    dense = dequantize_4bit(packed, state)
    assert dense.dtype == wdtype
    return QuantizedWeight.from_quant_state(packed, state), dense.float()


# ------------------------------------------------------------------------------------------------ dequantization
@pytest.mark.parametrize("shape", [(64, 128), (37, 45), (5, 1), (3, 4096)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind,nested", KINDS, ids=KIND_IDS)
def test_dequantize_bit_equal_to_bitsandbytes(isa, kind, nested, shape):
    N, K = shape
    for wname in ("fp32", "bf16", "fp16"):
        qw, dense = quantize(kind, nested, N, K, DT[wname], seed=N * K)
        for xname, xdt in DT.items():
            got = _C.quant_dequantize(_quant_args(qw, xdt))
            want = dense.to(qw.dtype).to(xdt).float()
            assert torch.equal(got, want), (
                f"{isa} {kind} w={wname} x={xname}: {(got != want).sum().item()} of {got.numel()} values differ")
        if kind == "int8":
            break  # int8 dequantizes to fp32 whatever the layer's dtype


@pytest.mark.parametrize("shape", [(37, 45), (5, 1), (3, 4096), (40, 96)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind,nested", KINDS, ids=KIND_IDS)
def test_dequantize_into_16bit_buffers_bit_equal_to_bitsandbytes(isa, kind, nested, shape):
    """The compose routes' reused buffer is written in x's 16-bit dtype straight from the packed weight, blocks (and
    nested blocks) straddling rows included; a buffer of another dtype than the rounding gets round-to-nearest-even."""
    N, K = shape
    for wname in ("fp32", "bf16", "fp16"):
        qw, dense = quantize(kind, nested, N, K, DT[wname], seed=N * K + 1)
        for bufname in ("bf16", "fp16"):
            for round_name in (bufname, "fp32"):
                out = torch.full((N, K), float("nan"), dtype=DT[bufname])
                _C.quant_dequantize_into(_quant_args(qw, DT[round_name]), out)
                want = dense.to(qw.dtype).to(DT[round_name]).to(DT[bufname])
                assert torch.equal(out, want), (
                    f"{isa} {kind} w={wname} buffer={bufname} rounded to {round_name}: "
                    f"{(out != want).sum().item()} of {out.numel()} values differ")
        if kind == "int8":
            break


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_dequantize_blocksizes(isa, blocksize):
    qw, dense = quantize("nf4", True, 19, 300, torch.float32, seed=blocksize, blocksize=blocksize)
    assert torch.equal(_C.quant_dequantize(_quant_args(qw, torch.float32)), dense)
    out = torch.empty(19, 300, dtype=torch.bfloat16)
    _C.quant_dequantize_into(_quant_args(qw, torch.bfloat16), out)
    assert torch.equal(out, dense.to(torch.bfloat16))


def test_decode_buffers_idle_for_a_while_are_released(monkeypatch):
    """The compose routes' buffers are reused per (shape, dtype) on a thread; one that later decodes have not used
    (an fp32 buffer measurement made beside the bf16 one the chosen route uses) is released, the one in use is not,
    and a released buffer comes back, decoded right, when asked for again."""
    import threading

    monkeypatch.setattr(cpu_backend, "BUFFER_IDLE_DECODES", 4)
    qw, dense = quantize("nf4", True, 19, 64, torch.float32, seed=5)
    got = {}

    def decodes():  # a fresh thread: its own buffers, none left by other tests
        wide = cpu_backend._decoded(qw, torch.float32, torch.bfloat16)
        assert torch.equal(wide, dense.to(torch.bfloat16).float())
        narrow = [cpu_backend._decoded(qw, torch.bfloat16, torch.bfloat16) for _ in range(7)]  # a sweep at 8
        store = cpu_backend._buffers.state["store"]
        got["kept"] = sorted(str(dtype) for _, dtype in store)
        got["same"] = all(n.data_ptr() == narrow[0].data_ptr() for n in narrow)
        again = cpu_backend._decoded(qw, torch.float32, torch.bfloat16)
        got["again"] = torch.equal(again, dense.to(torch.bfloat16).float())

    worker = threading.Thread(target=decodes)
    worker.start()
    worker.join()
    assert got == {"kept": ["torch.bfloat16"], "same": True, "again": True}


# --------------------------------------------------------------------------------------------------- products
@pytest.mark.parametrize("M", [1, 7, 16, 17, 45])
@pytest.mark.parametrize("kind,nested", KINDS, ids=KIND_IDS)
def test_quant_linear_and_grad_x_routes(isa, kind, nested, M):
    """``x w^T + bias + xs B^T`` and ``dY w``: GEMV (M <= 16) and tiles (forced 16 rows: 3 tiles, last partial)."""
    N, K, R = 37, 45, 3
    qw, dense = quantize(kind, nested, N, K, torch.float32, seed=M)
    x, dy = torch.randn(M, K), torch.randn(M, N)
    bias, xs, B = torch.randn(N), torch.randn(M, R), torch.randn(N, R)
    want = x @ dense.t() + bias + 0.5 * (xs @ B.t())
    qa = _quant_args(qw, torch.float32)
    for gemv_rows, tile in [(16, 0), (0, 16), (0, 0)]:
        got = _C.quant_linear(x, qa, bias, xs, B, 0.5, gemv_rows, tile)
        assert_close(f"y (gemv_rows={gemv_rows}, tile={tile})", got, want, 1e-5)
    bare = _C.quant_linear(x, qa, None, None, None, 1.0, 16, 16)
    assert_close("y without bias and adapter", bare, x @ dense.t(), 1e-5)
    for tile in (16, 0):
        assert_close(f"dX (tile={tile})", _C.quant_grad_x(dy, qa, tile), dy @ dense, 1e-5)


def lora_case(M, K, N, ranks, xdt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(xdt)
    A = [(torch.randn(r, K, generator=g) * K**-0.5) for r in ranks]
    B = [(torch.randn(N, r, generator=g) * 0.5) for r in ranks]
    lb = [torch.randn(N, generator=g) * 0.1 if i == 0 else None for i in range(len(ranks))]
    bias = (torch.randn(N, generator=g) * 0.1).to(xdt)
    gy = torch.randn(M, N, generator=g).to(xdt)
    return x, A, B, lb, bias, gy


@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"drop{p}")
@pytest.mark.parametrize("xname", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("M", [1, 16, 40])
@pytest.mark.parametrize("kind,nested", KINDS, ids=KIND_IDS)
def test_lora_over_quantized_base_matches_reference(isa, kind, nested, M, xname, p):
    """The backend contract, forward and backward, vs the reference backend on the same ``QuantizedWeight``
    (fp32: 1e-5; bf16/fp16: within 2x the reference's own error against an fp32 run on the dequantized weight)."""
    xdt = DT[xname]
    N, K, ranks = 29, 53, (4, 2)
    qw, dense = quantize(kind, nested, N, K, torch.bfloat16 if xname == "bf16" else torch.float32, seed=M + 100)
    x, A, B, lb, bias, gy = lora_case(M, K, N, ranks, xdt, seed=M)
    s, ps, seeds = [0.5, 2.0], [p, 0.0], [11, 12]
    y_ref, xa_ref = REF.lora_forward(x, qw, bias, A, B, lb, s, ps, seeds)
    y_o, _ = REF.lora_forward(x.float(), dense.to(qw.dtype).to(xdt).float(), bias.float(), A, B, lb, s, ps, seeds)
    grads_ref = REF.lora_backward(gy, x, qw, A, B, xa_ref, s, ps, seeds, True, True)
    grads_o = REF.lora_backward(gy.float(), x.float(), dense.to(qw.dtype).to(xdt).float(), A, B, xa_ref, s, ps,
                                seeds, True, True)
    ran = []
    for route in each_route("lora_forward"):
        y, xa = CPU.lora_forward(x, qw, bias, A, B, lb, s, ps, seeds)
        if routes.last_route("lora_forward") != route:
            continue
        ran.append(route)
        assert y.dtype == xdt
        if xdt == torch.float32:
            assert_close(f"{route}: y", y, y_ref, 1e-5)
        else:
            assert_within_2x(f"{route}: y", y, y_ref, y_o)
        for i in range(len(ranks)):
            assert_close(f"{route}: xa[{i}]", xa[i], xa_ref[i], 1e-5 if xdt == torch.float32 else 1e-2)
    assert {"compose", "fused", "gemv", "decoded_fused"} <= set(ran), ran
    ran = []
    for route in each_route("lora_backward"):
        grads = CPU.lora_backward(gy, x, qw, A, B, xa_ref, s, ps, seeds, True, True)
        if routes.last_route("lora_backward") != route:
            continue
        ran.append(route)
        assert grads[0].dtype == xdt
        if xdt == torch.float32:
            assert_close(f"{route}: dX", grads[0], grads_ref[0], 1e-5)
        else:
            assert_within_2x(f"{route}: dX", grads[0], grads_ref[0], grads_o[0])
        for i in range(len(ranks)):
            assert_close(f"{route}: dA[{i}]", grads[1][i], grads_ref[1][i], 1e-5)
            assert_close(f"{route}: dB[{i}]", grads[2][i], grads_ref[2][i], 1e-5)
            assert_close(f"{route}: dbias[{i}]", grads[3][i], grads_ref[3][i], 1e-5)
    assert {"compose", "fused", "decoded_fused"} <= set(ran) and ("compose_fp32" in ran) == (xdt != torch.float32), ran


@pytest.mark.skipif(not AVAILABLE or _bnb_cpu_kernel() is None,
                    reason="bitsandbytes has no AVX-512 BF16 CPU kernel on this host (route bnb_native ineligible)")
@pytest.mark.parametrize("M", [1, 40])
@pytest.mark.parametrize("ranks", [(4,), (3, 5)], ids=["r4", "r3+5"])
@pytest.mark.parametrize("kind,nested", KINDS[:4], ids=KIND_IDS[:4])
def test_bnb_native_route_matches_reference(kind, nested, ranks, M):
    """bitsandbytes' own CPU kernel as the base product (bf16, K % blocksize == 0, N % 32 == 0), from the tiled copy
    fastpeft keeps with the weight, within 2x the reference's bf16 error, with either route's adapter terms."""
    N, K = 64, 192
    qw, dense = quantize(kind, nested, N, K, torch.bfloat16, seed=M + 7)
    x, A, B, lb, bias, _ = lora_case(M, K, N, ranks, torch.bfloat16, seed=M)
    s, ps, seeds = [0.5, 1.5][: len(ranks)], [0.0] * len(ranks), [0] * len(ranks)
    y_ref, xa_ref = REF.lora_forward(x, qw, bias, A, B, lb, s, ps, seeds)
    y_o, _ = REF.lora_forward(x.float(), dense.bfloat16().float(), bias.float(), A, B, lb, s, ps, seeds)
    ran = []
    for route in each_route("lora_forward"):
        if not route.startswith("bnb_native"):
            continue
        y, xa = CPU.lora_forward(x, qw, bias, A, B, lb, s, ps, seeds)
        assert routes.last_route("lora_forward") == route
        ran.append(route)
        assert_within_2x(f"{route}: y", y, y_ref, y_o)
        for i in range(len(ranks)):
            assert_close(f"{route}: xa[{i}]", xa[i], xa_ref[i], 1e-5)
    assert ran == ["bnb_native", "bnb_native_fused"], ran
    packed, absmax = qw.cpu_kernel_layout()
    assert torch.equal(_untile_cpu_repack(packed, N, K), qw.data.reshape(-1)), "tiling does not invert"
    assert qw.cpu_kernel_layout()[0] is packed, "the tiled copy is made again on every call"


@pytest.mark.skipif(not AVAILABLE or _bnb_cpu_kernel() is None or cpu_backend._direct_bnb_kernels() is None,
                    reason="bitsandbytes' CPU serving functions are not called directly on this host")
@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_direct_bnb_call_is_bitsandbytes_own_op(kind):
    """The ctypes call of bitsandbytes' serving function gives bit for bit what its registered op gives (a row-sliced
    input included): the shortcut skips the op's dispatch and wrapper, never changes the product."""
    N, K = 96, 256
    qw, _ = quantize(kind, False, N, K, torch.bfloat16, seed=3)
    packed, absmax = qw.cpu_kernel_layout()
    wide = torch.randn(5, K + 8).to(torch.bfloat16)
    for x in (wide[:, :K].contiguous(), wide[:, 4:4 + K], wide[:1, :K]):
        direct = _bnb_cpu_kernel()(x, packed, absmax, qw)
        via_op = torch.ops.bitsandbytes.gemv_4bit.default(x.contiguous(), packed, [N, K], absmax, qw.code,
                                                           qw.blocksize)
        assert torch.equal(direct, via_op), kind


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "out"])
@pytest.mark.parametrize("M", [3, 33])
@pytest.mark.parametrize("kind,nested", [("nf4", True), ("int8", False)], ids=["nf4-nested", "int8"])
def test_ia3_over_quantized_base_matches_reference(kind, nested, M, feedforward):
    N, K = 31, 47
    qw, _ = quantize(kind, nested, N, K, torch.float32, seed=M)
    g = torch.Generator().manual_seed(M)
    x, bias = torch.randn(M, K, generator=g), torch.randn(N, generator=g)
    scale = torch.rand(K if feedforward else N, generator=g) + 0.5
    gy = torch.randn(M, N, generator=g)
    want_y = REF.ia3_forward(x, qw, bias, scale, feedforward)
    want = REF.ia3_backward(gy, x, qw, bias, scale, feedforward, True)
    ran = []
    for route in each_route("ia3_forward"):
        y = CPU.ia3_forward(x, qw, bias, scale, feedforward)
        if routes.last_route("ia3_forward") == route:
            ran.append(route)
            assert_close(f"{route}: y", y, want_y, 1e-5)
    assert set(ran) == {"compose", "fused", "gemv"}, ran
    ran = []
    for route in each_route("ia3_backward"):
        got = CPU.ia3_backward(gy, x, qw, bias, scale, feedforward, True)
        if routes.last_route("ia3_backward") == route:
            ran.append(route)
            assert_close(f"{route}: dX", got[0], want[0], 1e-5)
            assert_close(f"{route}: dscale", got[1], want[1], 1e-5)
    assert set(ran) == {"compose", "fused"}, ran


# -------------------------------------------------------------------------------------------------- bad input
def test_bad_quantized_weight_is_named():
    qw, _ = quantize("nf4", True, 8, 16, torch.float32, seed=0)
    good = list(_quant_args(qw, torch.float32))
    x = torch.randn(2, 16)
    cases = {
        "4-bit data": (3, qw.data[:10].contiguous()),                    # too few packed bytes
        "absmax needs": (4, qw.absmax[:1].contiguous()),                 # too few blocks
        "code table": (10, torch.zeros(8)),                             # wrong table size
        "nested_code": (6, torch.zeros(10)),                            # wrong nested table
        "kind": (0, 7),
    }
    for needle, (field, value) in cases.items():
        bad = list(good)
        bad[field] = value
        with pytest.raises(RuntimeError, match=needle):
            _C.quant_linear(x, tuple(bad), None, None, None, 1.0, 16, 0)
    with pytest.raises(RuntimeError, match="x must be contiguous fp32"):
        _C.quant_linear(torch.randn(2, 15), tuple(good), None, None, None, 1.0, 16, 0)
    with pytest.raises(RuntimeError, match="grad_y must be contiguous fp32"):
        _C.quant_grad_x(torch.randn(2, 16), tuple(good), 0)


@pytest.mark.parametrize("ranks", [(4,), (3, 5)], ids=["r4", "r3+5"])
@pytest.mark.parametrize("M", [1, 37])
@pytest.mark.parametrize("xname", ["fp32", "bf16", "fp16"])
def test_lora_update_every_route_matches_reference(xname, M, ranks, monkeypatch):
    """``lora_update`` (the adapter terms alone on a base output computed elsewhere, no dropout): every route against
    the reference's terms; and a measured call (every route timed, each on its own copy of ``y``) returns ``y``
    updated exactly once and leaves the caller's ``y`` as it was."""
    xdt = DT[xname]
    N, K = 80, 96
    qw, _ = quantize("nf4", False, N, K, torch.float32, seed=M)
    x, A, B, lb, _, y0 = lora_case(M, K, N, ranks, xdt, seed=M + 1)
    s = [0.5, 1.5][: len(ranks)]
    zeros = [0.0] * len(ranks)
    want = reference.add_lora_terms(y0.float(), x.float(), A, B, lb, s, zeros, [0] * len(ranks))
    want_low = reference.add_lora_terms(y0, x, A, B, lb, s, zeros, [0] * len(ranks))
    ran = []
    for route in each_route("lora_update"):
        y = y0.clone()
        got = CPU.add_lora_(x, y, qw, A, B, lb, s)
        assert routes.last_route("lora_update") == route
        ran.append(route)
        assert got.dtype == xdt
        assert_within_2x(f"{route}: y", got, want_low, want)
    assert ran == ["compose", "fused"], ran
    monkeypatch.setattr(routes, "CONFIRM_AFTER_CALLS", 0)
    routes.clear_choices()
    y = y0.clone()
    got = CPU.add_lora_(x, y, qw, A, B, lb, s)
    assert_within_2x("measured call: y", got, want_low, want)
    assert torch.equal(y, y0), "measuring the routes wrote into the caller's y"
    routes.clear_choices()


@pytest.mark.parametrize("kind,nested", [("nf4", True), ("fp4", False), ("int8", False)])
def test_base_linear_every_route_matches_reference(kind, nested):
    """The base product alone (``functional.base_linear``: the LoRA forward's routes with no adapters), every route
    where it can serve, against the reference; refused for an input that requires grad."""
    from fastpeft import functional

    N, K = 96, 128
    qw, dense = quantize(kind, nested, N, K, torch.float32, seed=5)
    g = torch.Generator().manual_seed(6)
    x, bias = torch.randn(9, K, generator=g).to(torch.bfloat16), torch.randn(N, generator=g).to(torch.bfloat16)
    want = REF.lora_forward(x, qw, bias, [], [], [], [], [], [])[0]
    want_o = x.float() @ dense.t() + bias.float()
    ran = []
    for route in each_route("lora_forward"):
        y = functional.base_linear(x, qw, bias)
        if routes.last_route("lora_forward") != route:
            continue  # not eligible here (bnb_native without bitsandbytes' kernel, int8; the Triton routes)
        ran.append(route)
        assert_within_2x(f"{route}: y", y, want, want_o)
    assert {"compose", "fused", "gemv"} <= set(ran), ran
    with pytest.raises(ValueError, match="no autograd"):
        functional.base_linear(x.float().requires_grad_(True), qw, bias)
