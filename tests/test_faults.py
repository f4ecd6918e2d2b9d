"""Bad input and faults: property-based agreement with the reference spec (shapes, dtypes, strides, adapter
configs, NaN/inf), clear errors for wrong inputs and bad adapter files with the model left bit-for-bit unchanged, and
bit-exact save/load."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from checks import assert_close, assert_within_2x
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from model_helpers import MLP
from safetensors.torch import load_file, save_file

import fastpeft
from fastpeft import functional, reference
from fastpeft.functional import draw_seeds

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Derandomized: every run draws the same examples (the measured routes may differ between runs; the examples must
# not, or a run fails on an example no other run saw).
PROPERTY = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def _make_x(M, K, dtype, strided, g):
    if strided:  # a non-contiguous view: every other column of a wider tensor, rows transposed in memory
        x = torch.randn(2 * K, M, generator=g).t()[:, ::2]
    else:
        x = torch.randn(M, K, generator=g)
    return x.to(dtype)


@st.composite
def lora_cases(draw):
    n = draw(st.integers(1, 3))
    return dict(
        M=draw(st.sampled_from([1, 2, 7, 33])),
        K=draw(st.sampled_from([1, 5, 16, 37])),
        N=draw(st.sampled_from([1, 3, 16, 29])),
        dtype=draw(st.sampled_from(sorted(DTYPES))),
        strided=draw(st.booleans()),
        bias=draw(st.booleans()),
        ranks=[draw(st.integers(1, 6)) for _ in range(n)],
        alphas=[draw(st.sampled_from([1, 8, 16])) for _ in range(n)],
        rslora=[draw(st.booleans()) for _ in range(n)],
        lora_bias=[draw(st.booleans()) for _ in range(n)],
        dropout=[draw(st.sampled_from([0.0, 0.1, 0.5])) for _ in range(n)],
        training=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _lora_tensors(c, g):
    K, N = c["K"], c["N"]
    W = torch.randn(N, K, generator=g) / math.sqrt(K)
    b = torch.randn(N, generator=g) if c["bias"] else None
    As = [torch.randn(r, K, generator=g) / math.sqrt(K) for r in c["ranks"]]
    Bs = [torch.randn(N, r, generator=g) for r in c["ranks"]]
    bs = [torch.randn(N, generator=g) if lb else None for lb in c["lora_bias"]]
    scaling = [a / (math.sqrt(r) if rs else r) for a, r, rs in zip(c["alphas"], c["ranks"], c["rslora"])]
    return W, b, As, Bs, bs, scaling


def _run_lora(fn, x, W, b, As, Bs, bs, g_out):
    """Output and gradients of the trainable inputs (x and the adapter tensors; the base is frozen)."""
    x = x.detach().clone().requires_grad_(True)
    As = [t.detach().clone().requires_grad_(True) for t in As]
    Bs = [t.detach().clone().requires_grad_(True) for t in Bs]
    bs = [t.detach().clone().requires_grad_(True) if t is not None else None for t in bs]
    y = fn(x, W, b, As, Bs, bs)
    y.backward(g_out.to(y.dtype))
    grads = {"dX": x.grad}
    for i in range(len(As)):
        grads[f"dA{i}"], grads[f"dB{i}"] = As[i].grad, Bs[i].grad
        if bs[i] is not None:
            grads[f"dbias{i}"] = bs[i].grad
    return y.detach(), grads


# A case where the output is so small (K=1, a 7x1 dX) that one bf16 rounding of it is most of the error.
TINY_BF16 = dict(M=7, K=1, N=29, dtype="bf16", strided=True, bias=False, ranks=[1, 4, 6], alphas=[1, 8, 1],
                 rslora=[False] * 3, lora_bias=[False, True, True], dropout=[0.1, 0.5, 0.0], training=True, seed=9658)


def _rounding_floor(dtype: torch.dtype) -> float:
    """The 2x rule's floor: a result stored in ``dtype`` is rounded once more than the fp32 oracle, so an error of
    one unit roundoff (2**-8 for bf16, 2**-11 for fp16) is the dtype's, not the implementation's; 1e-3 at least."""
    return max(1e-3, torch.finfo(dtype).eps / 2)


@PROPERTY
@given(c=lora_cases())
@example(c=TINY_BF16)
def test_lora_linear_matches_reference(c):
    """Output and every gradient (dX, dA_i, dB_i, dbias_i) against the reference spec, dropout in training mode
    with the same seeds; low precision by the 2x rule against the fp32 reference."""
    g = torch.Generator().manual_seed(c["seed"])
    dtype = DTYPES[c["dtype"]]
    x = _make_x(c["M"], c["K"], dtype, c["strided"], g)
    W, b, As, Bs, bs, scaling = _lora_tensors(c, g)
    g_out = torch.randn(c["M"], c["N"], generator=g)
    ps = c["dropout"]
    used_ps = [p if c["training"] else 0.0 for p in ps]
    # the seeds the functional layer will draw: same torch RNG state, same draw
    torch.manual_seed(c["seed"])
    seeds = draw_seeds(len(As), used_ps, c["training"]).tolist()

    def fast(x_, W_, b_, As_, Bs_, bs_):
        torch.manual_seed(c["seed"])
        return functional.lora_linear(x_, W_, b_, As_, Bs_, bs_, scaling, ps, c["training"])

    def ref(x_, W_, b_, As_, Bs_, bs_):
        return reference.lora_linear(x_, W_, b_, As_, Bs_, bs_, scaling, used_ps, seeds)

    lp = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    y, grads = _run_lora(fast, x, lp(W), lp(b), As, Bs, bs, g_out)
    assert y.dtype == dtype and y.shape == (c["M"], c["N"])
    y_lp, grads_lp = _run_lora(ref, x, lp(W), lp(b), As, Bs, bs, g_out)
    assert grads.keys() == grads_lp.keys()
    if dtype == torch.float32:
        # Against an fp64 run, within 2x the fp32 reference's own error plus 1e-5: a rank-1 adapter's x A^T is one
        # short dot product, and where it cancels, any two summation orders differ by more than 1e-5 relative.
        f64 = lambda t: None if t is None else t.double()  # noqa: E731
        y64, grads64 = _run_lora(ref, x.double(), f64(W), f64(b), [f64(t) for t in As], [f64(t) for t in Bs],
                                 [f64(t) for t in bs], g_out.double())
        assert_within_2x("y", y, y_lp, y64, floor=1e-5)
        for name in grads_lp:
            assert_within_2x(name, grads[name], grads_lp[name], grads64[name], floor=1e-5)
        return
    y32, grads32 = _run_lora(ref, x.float(), W, b, As, Bs, bs, g_out)
    floor = _rounding_floor(dtype)
    assert_within_2x("y", y, y_lp, y32, floor=floor)
    for name in grads32:
        assert_within_2x(name, grads[name], grads_lp[name], grads32[name], floor=floor)


@PROPERTY
@given(M=st.sampled_from([1, 4, 19]), K=st.sampled_from([1, 6, 37]), N=st.sampled_from([1, 5, 29]),
       n=st.integers(1, 3), feedforward=st.booleans(), strided=st.booleans(), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_ia3_linear_matches_reference(M, K, N, n, feedforward, strided, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = _make_x(M, K, torch.float32, strided, g)
    W = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    vectors = [torch.rand((1, K) if feedforward else (N, 1), generator=g) + 0.5 for _ in range(n)]
    g_out = torch.randn(M, N, generator=g)
    results = []
    for fn in (functional.ia3_linear, reference.ia3_linear):
        xl = x.detach().clone().requires_grad_(True)
        vl = [v.clone().requires_grad_(True) for v in vectors]
        y = fn(xl, W, b, vl, feedforward)
        y.backward(g_out)
        results.append((y.detach(), xl.grad, [v.grad for v in vl]))
    (y, dx, dv), (yr, dxr, dvr) = results
    assert_close("y", y, yr, 1e-5)
    assert_close("dX", dx, dxr, 1e-5)
    for i in range(n):
        assert_close(f"dl{i}", dv[i], dvr[i], 1e-5)


@pytest.mark.parametrize("where", ["x", "weight", "lora_A"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_nan_inf_propagate_as_in_reference(where, value):
    g = torch.Generator().manual_seed(7)
    M, K, N, r = 5, 9, 6, 3
    x, W = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    A, B = torch.randn(r, K, generator=g), torch.randn(N, r, generator=g)
    {"x": x, "weight": W, "lora_A": A}[where][1, 2] = value
    args = (x, W, None, [A], [B], [None], [2.0], [0.0])
    y = functional.lora_linear(*args, training=False)
    yr = reference.lora_linear(*args, [0])
    assert torch.isnan(yr).any() or torch.isinf(yr).any(), "the test input did not produce a non-finite value"
    assert torch.equal(torch.isnan(y), torch.isnan(yr)), "NaN positions differ from the reference"
    assert torch.equal(torch.isposinf(y), torch.isposinf(yr)) and torch.equal(torch.isneginf(y), torch.isneginf(yr))
    finite = torch.isfinite(yr)
    assert_close("finite part", y[finite], yr[finite], 1e-5)
    # IA3 as well
    vec = torch.rand(1, K, generator=g) + 0.5
    y3 = functional.ia3_linear(x, W, None, [vec], True)
    y3r = reference.ia3_linear(x, W, None, [vec], True)
    assert torch.equal(torch.isnan(y3), torch.isnan(y3r)) and torch.equal(torch.isinf(y3), torch.isinf(y3r))


# ------------------------------------------------------------------------------------------------ wrong inputs
def _patched_mlp(seed=0):
    torch.manual_seed(seed)
    model = fastpeft.patch(MLP(), r=4, lora_alpha=8, target_modules=["up", "down"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    return model.eval()


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before, adapters):
    after = model.state_dict()
    assert after.keys() == before.keys(), f"keys changed: {set(after) ^ set(before)}"
    for k, v in before.items():
        assert torch.equal(after[k], v) and after[k].dtype == v.dtype, f"{k} changed"
    assert sorted(model.peft_config) == adapters


@pytest.mark.parametrize(
    "bad_input, error, words",
    [
        (lambda: torch.randn(3, 23, dtype=torch.float64), TypeError, ["dtype", "torch.float64"]),
        (lambda: torch.randn(3, 22), ValueError, ["22 features", "takes 23"]),
        (lambda: torch.randn(3, 23, device="meta"), ValueError, ["meta"]),
        (lambda: [[1.0] * 23], TypeError, ["torch.Tensor"]),
    ],
    ids=["dtype", "shape", "device", "not-a-tensor"],
)
def test_wrong_input_to_patched_layer(bad_input, error, words):
    model = _patched_mlp()
    layer = model.base_model.model.blocks[0]["up"]
    before = _snapshot(model)
    with pytest.raises(error) as info:
        layer(bad_input())
    message = str(info.value)
    assert "blocks.0.up" in message, f"error does not name the module: {message}"
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"
    _assert_unchanged(model, before, ["default"])


# ----------------------------------------------------------------------------------------------- bad adapter files
ST = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter")
    model = _patched_mlp(seed=1)
    fastpeft.save_pretrained(model, str(path))
    return path, model


def _copy_adapter(src, dst):
    os.makedirs(dst, exist_ok=True)
    for name in (ST, "adapter_config.json"):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as out:
            out.write(f.read())
    return dst


def _drop_tensor(d):
    t = load_file(os.path.join(d, ST))
    del t["base_model.model.blocks.1.down.lora_B.weight"]
    save_file(t, os.path.join(d, ST))


def _wrong_shape(d):
    t = load_file(os.path.join(d, ST))
    t["base_model.model.blocks.0.up.lora_A.weight"] = torch.zeros(4, 24)
    save_file(t, os.path.join(d, ST))


def _truncate(d):
    p = os.path.join(d, ST)
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) - 40])


def _corrupt_header(d):
    p = os.path.join(d, ST)
    data = bytearray(open(p, "rb").read())
    data[8:24] = b"\xff" * 16  # inside the JSON header
    open(p, "wb").write(bytes(data))


def _other_model_tensors(d):
    t = load_file(os.path.join(d, ST))
    t = {k.replace("blocks.1.down", "layers.1.mlp.down_proj"): v for k, v in t.items()}
    save_file(t, os.path.join(d, ST))


def _other_model_config(d):
    p = os.path.join(d, "adapter_config.json")
    cfg = json.load(open(p))
    cfg["r"] = 16  # an adapter of another rank: every tensor mismatches
    json.dump(cfg, open(p, "w"))


def _malformed_json(d):
    open(os.path.join(d, "adapter_config.json"), "w").write('{"peft_type": "LORA", "r": 4,')


def _not_peft_json(d):
    open(os.path.join(d, "adapter_config.json"), "w").write('{"model_type": "llama"}')


FAULTS = [
    (_drop_tensor, ["blocks.1.down.lora_B.weight", "missing"]),
    (_wrong_shape, ["blocks.0.up.lora_A.weight", "(4, 24)", "(4, 23)"]),
    (_truncate, ["truncated or corrupted"]),
    (_corrupt_header, ["truncated or corrupted"]),
    (_other_model_tensors, ["layers.1.mlp.down_proj", "another model"]),
    (_other_model_config, ["lora_A.weight", "has shape (4, ", "needs (16, "]),
    (_malformed_json, ["not valid JSON"]),
    (_not_peft_json, ["peft_type"]),
]


@pytest.mark.parametrize("into", ["peft-model", "plain-model"])
@pytest.mark.parametrize("fault, words", FAULTS, ids=[f.__name__.strip("_") for f, _ in FAULTS])
def test_bad_adapter_file_clear_error_model_unchanged(saved_adapter, tmp_path, fault, words, into):
    src, _ = saved_adapter
    d = _copy_adapter(str(src), str(tmp_path / "bad"))
    fault(d)
    if into == "peft-model":
        model = _patched_mlp(seed=2)
        adapters = ["default"]
    else:
        torch.manual_seed(2)
        model = MLP()
        adapters = None
    before = _snapshot(model)
    modules_before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        fastpeft.load_adapter(model, d, adapter_name="other" if into == "peft-model" else "default")
    message = str(info.value)
    for w in words:
        assert w in message, f"{w!r} not in error: {message}"
    if adapters is None:
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    else:
        _assert_unchanged(model, before, adapters)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules_before, "modules were replaced"


def test_save_load_bit_exact(saved_adapter, tmp_path, monkeypatch):
    # the two models compared bit for bit must take one route: no call of a choice's confirming rotation between them
    monkeypatch.setattr(fastpeft.routing, "CONFIRM_AFTER_CALLS", 0)
    src, trained = saved_adapter
    torch.manual_seed(2)
    loaded = fastpeft.load_adapter(MLP(), str(src), is_trainable=True)
    state, want = loaded.state_dict(), trained.state_dict()
    lora_keys = [k for k in want if "lora_" in k]
    assert len(lora_keys) == 8
    for k in lora_keys:
        assert torch.equal(state[k], want[k]) and state[k].dtype == want[k].dtype, k
    # and again through a second save: the file bytes of the tensors round-trip exactly
    fastpeft.save_pretrained(loaded, str(tmp_path / "again"))
    a, b = load_file(os.path.join(src, ST)), load_file(str(tmp_path / "again" / ST))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base_state = {k: v for k, v in want.items() if "lora_" not in k}
    # the base weights of the loaded model are its own (seed 2), the adapter's are the trained ones
    loaded_base = {k: v for k, v in state.items() if "lora_" not in k}
    assert loaded_base.keys() == base_state.keys()
    x = torch.randn(4, 23)
    trained_copy = copy.deepcopy(trained)
    trained_copy.load_state_dict(state)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), trained_copy(x))
