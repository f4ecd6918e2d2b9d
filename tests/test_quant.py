"""fastpeft.quant: its own dequantization is bit-equal to bitsandbytes' on every layout bitsandbytes produces.

The oracle is ``quant_oracle.dequantize_4bit``, a decode of bitsandbytes' format written in the tests, because
bitsandbytes' own CPU ``dequantize_4bit`` depends on the host: on AVX-512 CPUs its native kernel is wrong whenever a
quantization block straddles two rows (``K % blocksize != 0``). bitsandbytes' native result is compared as well
where it is right on every host: when every block lies inside one row.
"""

import copy

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

from quant_oracle import dequantize_4bit  # noqa: E402

from fastpeft.quant import QuantizedWeight, code_table, quantized_weight_of  # noqa: E402

SHAPES = [(64, 96), (33, 50), (7, 12)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("nested", [False, True], ids=["nested=F", "nested=T"])
@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_dequantize_4bit_bit_equal(kind, nested, blocksize, dtype):
    torch.manual_seed(0)
    for N, K in SHAPES:
        w = (torch.randn(N, K) * 0.3).to(dtype)
        packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=kind)
        ref = dequantize_4bit(packed, state)
        if K % blocksize == 0:  # no block straddles two rows: bitsandbytes' native decode is right here too
            assert torch.equal(F.dequantize_4bit(packed, state), ref), f"oracle vs bitsandbytes {kind} {N}x{K}"
        q = QuantizedWeight.from_quant_state(packed, state)
        assert q.kind == kind and q.shape == (N, K) and q.nested == nested and q.dtype == dtype
        assert q.data.data_ptr() == packed.data_ptr(), "the packed weight must not be copied"
        out = q.dequantize()
        assert out.dtype == ref.dtype and torch.equal(out, ref), f"{kind} {N}x{K}"
        assert torch.equal(q.dequantize(torch.float32), ref.float())


def test_dequantize_odd_k():
    # odd K: packed bytes straddle rows and blocks straddle rows
    torch.manual_seed(1)
    w = torch.randn(5, 23)
    packed, state = F.quantize_4bit(w, blocksize=32, compress_statistics=True, quant_type="nf4")
    assert torch.equal(QuantizedWeight.from_quant_state(packed, state).dequantize(), dequantize_4bit(packed, state))


def test_code_tables_match_bitsandbytes():
    for kind in ("nf4", "fp4"):
        assert torch.equal(code_table(kind), F.get_4bit_type(kind, device="cpu"))


@pytest.mark.parametrize("nested", [False, True], ids=["nested=F", "nested=T"])
def test_cpu_inference_repack_is_undone(nested):
    """bitsandbytes' first eval forward on some CPUs rewrites the weight into a tiled [N, K/2] layout with a
    bfloat16 absmax; fastpeft reads that layout too (codes unchanged, absmax as bitsandbytes rounded it)."""
    torch.manual_seed(2)
    packed, state = F.quantize_4bit(torch.randn(64, 128), blocksize=64, compress_statistics=nested, quant_type="nf4")
    before = QuantizedWeight.from_quant_state(packed, state)
    tiled, tiled_state = F._convert_weight_packed_for_cpu(packed.clone(), copy.deepcopy(state))
    assert tuple(tiled.shape) == (64, 64)
    after = QuantizedWeight.from_quant_state(tiled, tiled_state)
    assert torch.equal(after.codes(), before.codes())
    assert torch.equal(after.absmax, before.absmax_float().to(torch.bfloat16).float())
    assert not after.nested and after.dtype == torch.float32


def test_weight_of_a_layer_is_built_once_and_follows_a_repack():
    """A layer's QuantizedWeight is made once per weight (bitsandbytes' QuantState is unhashable, so the cache
    cannot be keyed by it), rebuilt when bitsandbytes swaps in new storage, and after bitsandbytes' CPU repack the
    kernel layout is the module's own tiled bytes (no second tiled copy)."""
    torch.manual_seed(4)
    lin = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").to("cpu")
    first = quantized_weight_of(lin)
    assert quantized_weight_of(lin) is first, "the QuantizedWeight (and what it derived) is rebuilt per call"
    state = copy.deepcopy(lin.weight.quant_state)
    tiled, tiled_state = F._convert_weight_packed_for_cpu(lin.weight.data.clone(), state)
    after = QuantizedWeight.from_quant_state(tiled, tiled_state)
    assert after is not first
    packed, absmax = after.cpu_kernel_layout()
    assert packed.data_ptr() == tiled.data_ptr() and absmax.data_ptr() == tiled_state.absmax.data_ptr()
    assert torch.equal(after.codes(), first.codes())


def test_weight_of_a_layer_follows_an_in_place_write_to_its_parameter():
    """The cached QuantizedWeight is keyed by the parameter's pointer and version counter (read past bitsandbytes'
    tensor subclass): writing new codes into the same storage gives a weight that decodes them."""
    torch.manual_seed(5)
    lin = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").to("cpu")
    first = quantized_weight_of(lin)
    before = first.codes().clone()
    with torch.no_grad():
        lin.weight.copy_(lin.weight.flip(0))  # same storage, new bytes: only the version counter moves
    after = quantized_weight_of(lin)
    assert after is not first
    assert not torch.equal(after.codes(), before)
    assert torch.equal(after.dequantize(), dequantize_4bit(lin.weight.data, lin.weight.quant_state))


def test_int8_bit_equal():
    torch.manual_seed(3)
    lin = bnb.nn.Linear8bitLt(40, 24, has_fp16_weights=False, bias=True).to("cpu")
    q = quantized_weight_of(lin)
    assert q is not None and q.kind == "int8" and q.shape == (24, 40)
    assert q.data.data_ptr() == lin.weight.data.data_ptr()
    assert torch.equal(q.dequantize(), F.int8_vectorwise_dequant(lin.weight.data, lin.weight.SCB))


def test_linear4bit_module_and_dense_is_none():
    lin = bnb.nn.Linear4bit(64, 32, compress_statistics=True, quant_type="fp4").to("cpu")
    q = quantized_weight_of(lin)
    assert q.kind == "fp4" and q.shape == (32, 64) and q.nested
    assert torch.equal(q.dequantize(), dequantize_4bit(lin.weight.data, lin.weight.quant_state))
    assert quantized_weight_of(torch.nn.Linear(4, 4)) is None


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_quantize_like_roundtrip(kind):
    """Requantizing a dequantized weight reproduces it (the codes are fixed points of quantization)."""
    torch.manual_seed(4)
    w = torch.randn(32, 64)
    if kind == "int8":
        cb, scb, _ = F.int8_vectorwise_quant(w.half())
        q = QuantizedWeight(kind="int8", shape=(32, 64), dtype=torch.float32, data=cb, absmax=scb)
    else:
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=kind)
        q = QuantizedWeight.from_quant_state(packed, state)
    dense = q.dequantize()
    q2 = q.quantize_like(dense)
    assert q2.kind == q.kind and q2.shape == q.shape and q2.nested == q.nested
    torch.testing.assert_close(q2.dequantize(), dense, rtol=0.02, atol=0.02)
    # and a changed weight moves the quantized one
    q3 = q.quantize_like(dense + 0.5)
    assert (q3.dequantize() - dense).mean() > 0.3


def test_non_uint8_quant_storage():
    """Params4bit may store its packed bytes in another dtype (``quant_storage``, e.g. for FSDP): read as bytes."""
    torch.manual_seed(5)
    w = torch.randn(16, 64)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    q = QuantizedWeight.from_quant_state(packed, state)
    assert torch.equal(q.dequantize(), dequantize_4bit(packed, state))


@pytest.mark.parametrize("nested", [False, True], ids=["nested=F", "nested=T"])
@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_oracle_matches_bitsandbytes_pure_torch_decode(kind, nested):
    """The tests' decoder equals bitsandbytes' pure-torch decode (the one AVX2 hosts run) on straddling blocks."""
    from bitsandbytes.backends.default import ops as default_ops

    compute = getattr(default_ops._dequantize_4bit_compute, "__wrapped__", default_ops._dequantize_4bit_compute)
    torch.manual_seed(6)
    for N, K in [(64, 96), (5, 23), (33, 50)]:
        packed, state = F.quantize_4bit(torch.randn(N, K), blocksize=64, compress_statistics=nested, quant_type=kind)
        absmax = state.absmax
        if state.nested:
            absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        expected = compute(packed.reshape(-1), absmax.float(), state.code, state.blocksize, state.shape, state.dtype)
        assert torch.equal(dequantize_4bit(packed, state), expected), f"{kind} {N}x{K}"
