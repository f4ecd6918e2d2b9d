"""Mixed-adapter batches (PEFT's ``adapter_names``): every row through its own adapter, with PEFT as the oracle.

Every case builds a PEFT model and its fastpeft twin from one seed, with adapters of different ranks, alphas, a
lora_bias and different target sets, and checks the fused output row by row against PEFT's mixed-batch output and
against that row's single-adapter run, on every route of every backend available on the CPU.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from checks import CallCounter, assert_close, assert_within_2x, require_triton_mode_for
from model_helpers import MLP, tiny_transformer
from peft import LoraConfig, get_peft_model

import fastpeft
from fastpeft import mixed, routing
from fastpeft._derived import DerivedTensors
from fastpeft.backends import availability, set_backend

FP32_TOL = 1e-5
OP = "lora_mixed_forward"


def triton_fp32_tol() -> float:
    """fp32 tolerance of the Triton mixed kernels: full fp32 dots unless torch's matmul is allowed TF32, which the
    kernels then use too (``fastpeft.kernels._common.dot_precision``)."""
    from fastpeft.kernels._common import dot_precision

    return 5e-3 if dot_precision() == "tf32" else FP32_TOL

# The routes each backend offers for the mixed op (fastpeft.routing.ROUTES["lora_mixed_forward"]).
BACKEND_ROUTES = [("reference", "compose"), ("cpu", "compose"), ("cpu", "fused"), ("triton", "compose"),
                  ("triton", "sgmv")]


@pytest.fixture
def pinned(request):
    """Force a backend and pin a mixed route for one test; restore automatic choice afterwards."""
    backend, route = request.param
    ok, why = availability(backend)
    if not ok:
        pytest.skip(f"backend {backend} not available: {why}")
    if backend == "triton":
        require_triton_mode_for("cpu")  # these cases use CPU tensors
    set_backend(backend)
    routing.set_route(OP, route)
    yield backend, route
    routing.set_route(OP, None)
    set_backend(None)


def build(width=37, hidden=29, dtype=None, base_dtype=None, dropout=0.0, seed=0):
    """An MLP with adapters ``a`` (r=8), ``b`` (r=3, lora_bias) on up/down and ``c`` (r=4) on ``up`` only."""
    torch.manual_seed(seed)
    model = MLP(width=width, hidden=hidden)
    if base_dtype is not None:
        model = model.to(base_dtype)  # before PEFT: adapters stay fp32 (PEFT's autocast_adapter_dtype)
    torch.manual_seed(seed + 1)
    configs = {
        "a": LoraConfig(r=8, lora_alpha=16, target_modules=["up", "down"], init_lora_weights=False,
                        lora_dropout=dropout),
        "b": LoraConfig(r=3, lora_alpha=5, target_modules=["up", "down"], init_lora_weights=False, lora_bias=True,
                        lora_dropout=dropout),
        "c": LoraConfig(r=4, lora_alpha=4, target_modules=["up"], init_lora_weights=False, lora_dropout=dropout),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(model, configs["a"], adapter_name="a")
        for name in ("b", "c"):
            model.add_adapter(name, configs[name])
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def twins(**kwargs):
    reference, fused = build(**kwargs), build(**kwargs)
    fastpeft.accelerate(fused)
    return reference, fused


NAMES = ["b", "__base__", "a", "b", "c", "a", "__base__"]  # unsorted, repeated, base rows, c only on some layers


def single_row_run(model, x_row, name):
    """The fused model on one row with one adapter active (or none for ``__base__``)."""
    if name == "__base__":
        with model.disable_adapter():
            return model(x_row)
    model.base_model.set_adapter(name)
    try:
        return model(x_row)
    finally:
        model.base_model.set_adapter("a")


@pytest.mark.parametrize("pinned", BACKEND_ROUTES, ids=[f"{b}-{r}" for b, r in BACKEND_ROUTES], indirect=True)
@pytest.mark.parametrize("shape", [(7, 37), (7, 5, 37)], ids=["2d", "3d-T5"])
def test_rows_match_peft_and_single_adapter_runs_fp32(pinned, shape):
    reference, fused = twins()
    torch.manual_seed(3)
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = reference(x, adapter_names=NAMES)
        actual = fused(x, adapter_names=NAMES)
        assert routing.last_route(OP) == pinned[1]
        assert_close("y", actual, expected, FP32_TOL)
        for row, name in enumerate(NAMES):
            assert_close(f"row {row} ({name})", actual[row : row + 1],
                         single_row_run(fused, x[row : row + 1], name), FP32_TOL)


CPU_ROUTES = [r for r in BACKEND_ROUTES if r[0] != "triton"]


@pytest.mark.parametrize("pinned", CPU_ROUTES, ids=[f"{b}-{r}" for b, r in CPU_ROUTES], indirect=True)
@pytest.mark.parametrize("adapters", ["fp32-adapters", "bf16-adapters"])
def test_bf16_by_the_tolerance_rule(pinned, adapters):
    """bf16 base with fp32 adapters (PEFT's default) and an all-bf16 model: at most 2x PEFT's own bf16 error
    against fp32 arithmetic on the same (bf16-rounded) weights."""
    kwargs = {"base_dtype": torch.bfloat16} if adapters == "fp32-adapters" else {"dtype": torch.bfloat16}
    reference, fused = twins(width=64, hidden=96, **kwargs)
    exact = copy.deepcopy(reference).float()
    torch.manual_seed(4)
    x = torch.randn(7, 3, 64)
    with torch.no_grad():
        fp32 = exact(x, adapter_names=NAMES)
        low = reference(x.bfloat16(), adapter_names=NAMES)
        actual = fused(x.bfloat16(), adapter_names=NAMES)
    assert routing.last_route(OP) == pinned[1]
    assert actual.dtype == low.dtype
    assert_within_2x("y", actual, low, fp32)


def test_measured_choice_then_in_place_calls_give_peft_output(monkeypatch, tmp_path):
    """Unpinned: the first call times every eligible route (each on its own copy of the base output), later calls
    run the kept route in place; both give PEFT's output."""
    monkeypatch.setenv("FASTPEFT_ROUTE_CACHE", str(tmp_path / "routes.json"))
    monkeypatch.delenv("FASTPEFT_ROUTE", raising=False)
    routing.clear_choices()
    reference, fused = twins()
    x = torch.randn(7, 2, 37)
    with torch.no_grad():
        expected = reference(x, adapter_names=NAMES)
        for _ in range(2):
            assert_close("y", fused(x, adapter_names=NAMES), expected, FP32_TOL)
    rows = [row for row in routing.routes() if row["op"] == OP]
    assert rows and all(row["source"] in ("measured", "only route") for row in rows)
    if availability("cpu")[0]:
        assert any(set(row["timings_ms"]) == {"compose", "fused"} for row in rows)
    routing.clear_choices()


@pytest.mark.parametrize("pinned", [("cpu", "fused"), ("triton", "sgmv")], ids=["cpu-fused", "triton-sgmv"],
                         indirect=True)
def test_adapters_changed_in_place_are_seen_by_the_next_call(pinned):
    """The kernels' fp32/transposed/stacked copies of the adapters are kept across calls; an in-place update of an
    adapter (an optimizer step, load_state_dict) must reach the next call."""
    reference, fused = twins()
    x = torch.randn(7, 37)
    with torch.no_grad():
        fused(x, adapter_names=NAMES)
        for model in (reference, fused):
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.mul_(1.5).add_(0.01)
        assert_close("y", fused(x, adapter_names=NAMES), reference(x, adapter_names=NAMES), FP32_TOL)


def test_cpu_pass_reads_adapters_of_any_dtype_and_keeps_no_copy(monkeypatch):
    """The C++ pass takes the adapters as PEFT holds them: fp32 read in place, fp16 converted inside the call; no copy
    of either is kept across calls."""
    monkeypatch.setattr(mixed, "_derived", DerivedTensors(max_bytes=2**20))
    x = torch.randn(7, 37)
    routing.set_route(OP, "fused")
    try:
        with torch.no_grad():
            exact, fused = twins()
            assert_close("y", fused(x, adapter_names=NAMES), exact(x, adapter_names=NAMES), FP32_TOL)
            assert routing.last_route(OP) == "fused"
            reference, fused = twins(dtype=torch.float16)
            for _ in range(2):
                assert_within_2x("y", fused(x.half(), adapter_names=NAMES), reference(x.half(), adapter_names=NAMES),
                                 exact(x, adapter_names=NAMES))
                assert routing.last_route(OP) == "fused"
    finally:
        routing.set_route(OP, None)
    assert not mixed._derived._entries, "the C++ route kept adapter copies"


def test_kept_copies_are_bounded_in_bytes():
    """``DerivedTensors`` keeps copies of frozen tensors up to its byte bound, least recently used dropped first, and
    derives a dropped one again (same value); trainable tensors are never kept."""
    cache = DerivedTensors(max_bytes=3 * 400)
    frozen = [torch.randn(100) for _ in range(4)]  # 400 bytes each
    made = []

    def doubled(t):
        made.append(t)
        return t * 2

    for t in frozen:
        torch.testing.assert_close(cache.get_one(t, lambda t=t: doubled(t)), t * 2)
    assert cache._bytes <= 3 * 400 and len(cache._entries) == 3
    made.clear()
    torch.testing.assert_close(cache.get_one(frozen[3], lambda: doubled(frozen[3])), frozen[3] * 2)
    assert not made, "a kept copy was derived again"
    torch.testing.assert_close(cache.get_one(frozen[0], lambda: doubled(frozen[0])), frozen[0] * 2)
    assert made == [frozen[0]], "the dropped copy was not derived again"
    frozen[3].mul_(3)  # an in-place change (version counter) invalidates its copy
    torch.testing.assert_close(cache.get_one(frozen[3], lambda: doubled(frozen[3])), frozen[3] * 2)
    trainable = torch.randn(100, requires_grad=True)
    cache.get_one(trainable, lambda: trainable.detach() * 2)
    assert all(trainable is not ref() for refs, *_ in cache._entries.values() for ref in refs)


def test_decode_rows_each_with_its_own_adapter_on_the_fused_route():
    """Decode shape: one token per sequence, every sequence its own adapter (16 adapters, ranks 4..19)."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(48, 40))
    names = [f"ad{i}" for i in range(16)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=3, target_modules=["0"],
                                                     init_lora_weights=False), adapter_name=names[0])
        for i, name in enumerate(names[1:], 1):
            peft_model.add_adapter(name, LoraConfig(r=4 + i, lora_alpha=2 + i, target_modules=["0"],
                                                    init_lora_weights=False))
    reference = peft_model.eval()
    fused = copy.deepcopy(reference)
    fastpeft.accelerate(fused)
    rows = names[::-1] + ["__base__", names[3]]
    x = torch.randn(len(rows), 1, 48)
    routing.set_route(OP, "fused")
    try:
        with torch.inference_mode():
            expected = reference(x, adapter_names=rows)
            actual = fused(x, adapter_names=rows)
        assert routing.last_route(OP) == "fused"
    finally:
        routing.set_route(OP, None)
    assert_close("y", actual, expected, FP32_TOL)


def test_training_gradients_equal_peft_mixed_batch_gradients():
    """Autograd through a mixed batch (dropout 0): every adapter used in the batch gets PEFT's gradient, adapters
    not in the batch none, and the input gets PEFT's gradient."""
    reference, fused = twins()
    names = ["b", "__base__", "a", "b", "a"]
    torch.manual_seed(5)
    x = torch.randn(5, 4, 37)
    grads = []
    for model in (reference, fused):
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)  # PEFT trains only the active adapter; train all three here
        xi = x.clone().requires_grad_(True)
        out = model(xi, adapter_names=names)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        params = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        grads.append((out.detach(), xi.grad, params))
    (y_ref, dx_ref, g_ref), (y, dx, g) = grads
    assert_close("y", y, y_ref, FP32_TOL)
    assert_close("dx", dx, dx_ref, FP32_TOL)
    assert set(g) == set(g_ref)
    for name, expected in g_ref.items():
        if expected is None:
            assert g[name] is None, name
        else:
            assert_close(name, g[name], expected, FP32_TOL)
    assert all(g[n] is None for n in g if ".c." in n), "adapter c is not in the batch"
    assert any(g[n] is not None for n in g if ".b." in n)


def test_dropout_per_adapter_matches_the_reference_with_the_same_masks():
    """Training with dropout: each adapter's own Philox mask over its own sub-batch, seeds drawn from torch's
    generator; the output and every gradient equal the spec (``mixed.reference_mixed``) built from the same seeds."""
    _, fused = twins(dropout=0.3)
    fused.train()
    layer = fused.base_model.model.blocks[0]["up"]
    names = ["c", "a", "__base__", "a", "b"]
    torch.manual_seed(6)
    x = torch.randn(5, 3, 37, requires_grad=True)
    torch.manual_seed(7)
    actual = layer(x, adapter_names=names)
    actual.sum().backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    got_dx = x.grad.clone()
    layer.zero_grad()
    x.grad = None

    groups = mixed.row_groups(names)
    torch.manual_seed(7)
    adapters = mixed.collect_adapters(
        groups, {n: layer.lora_A[n].weight for n in groups.adapters},
        {n: layer.lora_B[n].weight for n in groups.adapters}, {"b": layer.lora_B["b"].bias}, layer.scaling,
        {n: 0.3 for n in groups.adapters}, training=True)
    assert all(s > 0 for s in adapters.seeds)
    expected = mixed.reference_mixed(x, layer.base_layer(x), names, adapters)
    expected.sum().backward()
    assert_close("y", actual, expected, FP32_TOL)
    assert_close("dx", got_dx, x.grad, FP32_TOL)
    for name, param in layer.named_parameters():
        if param.grad is not None:
            assert_close(name, got[name], param.grad, FP32_TOL)
    with torch.no_grad():
        fused.eval()
        assert (layer(x, adapter_names=names) - actual).abs().max() > 1e-3, "dropout changed nothing"


GENERATE_TARGETS = {"llama": (["q_proj", "v_proj", "up_proj"], ["k_proj", "down_proj"]),
                    "gpt2": (["c_attn", "c_fc"], ["c_proj"])}  # gpt2: transformers Conv1D bases


@pytest.mark.parametrize("family,beams", [("llama", 1), ("gpt2", 1), ("llama", 2)],
                         ids=["llama", "gpt2", "llama-beams2"])
def test_generate_with_kv_cache_gives_peft_tokens(family, beams):
    def make():
        torch.manual_seed(0)
        base = tiny_transformer(family)
        torch.manual_seed(1)
        first, second = GENERATE_TARGETS[family]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, target_modules=first,
                                                    init_lora_weights=False), adapter_name="x1")
            model.add_adapter("x2", LoraConfig(r=4, lora_alpha=16, target_modules=second, init_lora_weights=False))
        return model.eval()

    reference, fused = make(), make()
    fastpeft.accelerate(fused)
    ids = torch.randint(0, 97, (4, 6))
    names = ["x2", "__base__", "x1", "x2"]
    calls = []
    original = mixed.add_mixed_lora_

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    mixed.add_mixed_lora_ = counting
    try:
        with torch.no_grad():
            expected = reference.generate(input_ids=ids, adapter_names=names, max_new_tokens=6, do_sample=False,
                                          num_beams=beams)
            actual = fused.generate(input_ids=ids, adapter_names=names, max_new_tokens=6, do_sample=False,
                                    num_beams=beams)
    finally:
        mixed.add_mixed_lora_ = original
    assert calls, "the fused mixed path never ran"
    assert torch.equal(actual, expected)


def test_inference_mode_then_autograd_reuse_the_cached_grouping():
    reference, fused = twins()
    x = torch.randn(7, 2, 37)
    with torch.inference_mode():
        first = fused(x, adapter_names=NAMES)
    xi = x.clone().requires_grad_(True)
    second = fused(xi, adapter_names=NAMES)
    second.sum().backward()
    assert xi.grad is not None
    with torch.no_grad():
        assert_close("y", first, reference(x, adapter_names=NAMES), FP32_TOL)


def test_torch_compile_gives_peft_output():
    reference, fused = twins()
    layer = fused.base_model.model.blocks[0]["up"]
    peft_layer = reference.base_model.model.blocks[0]["up"]
    compiled = torch.compile(lambda t: layer(t, adapter_names=NAMES), backend="aot_eager")
    x = torch.randn(7, 3, 37)
    with torch.no_grad():
        assert_close("y", compiled(x), peft_layer(x, adapter_names=NAMES), FP32_TOL)


def test_rows_are_grouped_once_per_list_and_planned_once_per_shape():
    names = ["q", "__base__", "p", "q"]
    groups = mixed.row_groups(names)
    assert mixed.row_groups(list(names)) is groups
    assert groups.adapters == ("q", "p") and groups.batch_rows == ((0, 3), (2,))
    plan = groups.plan(3, torch.device("cpu"))
    assert groups.plan(3, torch.device("cpu")) is plan
    for T in range(4, 20):  # prompts of many lengths: only the most recent plans are kept
        assert groups.plan(T, torch.device("cpu")).rows[1].tolist() == list(range(2 * T, 3 * T))
    assert len(groups._plans) == mixed._PLANS_PER_GROUPS
    assert plan.rows[0].tolist() == [0, 1, 2, 9, 10, 11] and plan.rows[1].tolist() == [6, 7, 8]
    assert plan.runs.tolist() == [[0, 3, 0], [9, 12, 0], [6, 9, 1]]
    from fastpeft.kernels.mixed_lora import blocks_of

    order, adapter, start, count = blocks_of(plan.rows, torch.device("cpu"))
    assert order.tolist() == [0, 1, 2, 9, 10, 11, 6, 7, 8]
    assert (adapter.tolist(), start.tolist(), count.tolist()) == ([0, 1], [0, 6], [6, 3])


# ------------------------------------------------------------------------------------------------------ errors
def test_wrong_length_names_the_module_and_the_argument():
    _, fused = twins()
    with pytest.raises(ValueError, match=r"module '.*'.*Length of `adapter_names`"):
        fused.base_model.model.blocks[0]["up"](torch.randn(3, 37), adapter_names=["a", "b"])


def test_unknown_adapter_is_peft_error():
    _, fused = twins()
    with pytest.raises(ValueError, match="non-existing adapter"):
        fused(torch.randn(2, 37), adapter_names=["a", "nope"])


def test_merged_adapters_cannot_be_mixed():
    _, fused = twins()
    fused.base_model.model.blocks[0]["up"].merge(adapter_names=["a"])
    with pytest.raises(ValueError, match="merged adapters"):
        fused(torch.randn(2, 37), adapter_names=["a", "b"])


def test_dora_adapter_in_the_batch_is_peft_error():
    _, fused = twins()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused.add_adapter("d", LoraConfig(r=2, target_modules=["up"], use_dora=True, init_lora_weights=False))
    with pytest.raises(ValueError, match="DoRA"):
        fused(torch.randn(2, 37), adapter_names=["a", "d"])


def test_extra_base_arguments_run_peft_loop_with_one_warning(monkeypatch):
    _, fused = twins()
    layer = fused.base_model.model.blocks[0]["up"]
    monkeypatch.setattr("fastpeft.layers._warned_unfused_mixed", set())
    ran = []
    peft_class = next(c for c in type(layer).__mro__ if c.__module__.startswith("peft."))
    monkeypatch.setattr(peft_class, "forward", lambda self, x, *a, **k: ran.append(k) or x[..., :29])
    with pytest.warns(UserWarning, match="not fused: extra arguments"):
        layer(torch.randn(2, 37), adapter_names=["a", "b"], scale=2)
    assert ran and ran[0]["adapter_names"] == ["a", "b"]


def test_cpu_kernel_rejects_runs_out_of_bounds():
    from fastpeft.backends import cpu

    if not cpu.BACKEND.availability()[0]:
        pytest.skip("the C++ extension is not built")
    y, x = torch.zeros(2, 5), torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="out of bounds"):
        cpu._C.lora_mixed_(y, x, torch.tensor([[0, 3, 0]]), [torch.zeros(2, 3)], [torch.zeros(5, 2)], [None], [1.0])
    with pytest.raises(RuntimeError, match=r"B\[0\] must be \(5, 2\)"):
        cpu._C.lora_mixed_(y, x, torch.tensor([[0, 2, 0]]), [torch.zeros(2, 3)], [torch.zeros(2, 5)], [None], [1.0])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)], ids=["interp", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_sgmv_kernels(dtype, device):
    """The Triton shrink/expand kernels directly: odd K and N, ranks 3/8/5, an adapter absent from the layer, one
    adapter with more rows than a block (split into several blocks), unsorted rows. fp32 within 1e-5 (the dots run
    in full fp32, ``kernels._common.dot_precision``; 5e-3 only where torch's matmul is allowed TF32, which the
    kernels then use too); fp16 within 2x the error of the same update rounded into y in fp16 by torch."""
    ok, why = availability("triton")
    if not ok:
        pytest.skip(why)
    require_triton_mode_for(device)
    from fastpeft.kernels import mixed_lora

    torch.manual_seed(8)
    M, K, N = 150, 37, 29
    x = torch.randn(M, K).to(dtype)
    y = torch.randn(M, N).to(dtype)
    ranks = [3, None, 8, 5]
    A = [None if r is None else torch.randn(r, K) for r in ranks]
    B = [None if r is None else torch.randn(N, r) for r in ranks]
    bias = [None, None, torch.randn(N), None]
    scaling = [0.5, 0.0, 2.0, 1.25]
    perm = torch.randperm(M)
    rows = [perm[:100].sort().values, perm[100:110].sort().values, perm[110:140].sort().values, perm[140:145]]
    assert any(r.numel() > mixed_lora.BLOCK_M for r in rows)
    exact = y.double().clone()
    low = y.clone()
    for Ai, Bi, bi, s, r in zip(A, B, bias, scaling, rows):
        if Ai is None:
            continue
        update = (x[r].double() @ Ai.double().t() @ Bi.double().t() + (0 if bi is None else bi.double())) * s
        exact[r] += update
        low[r] += update.to(dtype)
    dev = torch.device(device)
    to = lambda ts: [None if t is None else t.to(dev) for t in ts]  # noqa: E731
    stacked = mixed_lora.stack_adapters(to(A), to(B), to(bias), scaling, K, N, dev)
    actual = mixed_lora.mixed_lora_(y.to(dev), x.to(dev), mixed_lora.blocks_of(to(rows), dev), *stacked).cpu()
    if dtype == torch.float32:
        assert_close("y", actual, exact, triton_fp32_tol())
    else:
        assert_within_2x("y", actual, low, exact)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_bitsandbytes_base_rows_get_their_adapter_terms(kind):
    """A bitsandbytes base through the fused bnb twin: the base output is bitsandbytes' own (the same call PEFT
    makes), so the fused output minus that base output must be each row's adapter term, computed here in fp64 from
    the adapter parameters (bitsandbytes' CPU matmul is never the oracle)."""
    pytest.importorskip("bitsandbytes")
    import test_quant_layers as quant_tests

    import fastpeft.layers_bnb as layers_bnb

    dtype = torch.float32 if kind == "nf4" else torch.float16
    model = quant_tests._mark_quantized(quant_tests.MLP(kind, False, dtype), kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["up"], init_lora_weights=False),
                            adapter_name="p")
        pm.add_adapter("q", LoraConfig(r=3, lora_alpha=5, target_modules=["up"], init_lora_weights=False))
    pm.eval()
    fastpeft.accelerate(pm, strict=True)
    layer = pm.base_model.model.up
    assert isinstance(layer, tuple(layers_bnb.FUSED_BNB_LAYER_TYPES.values()))
    names = ["q", "__base__", "p", "q"]
    x = torch.randn(4, 3, quant_tests.K).to(dtype)
    routing.clear_choices()
    with torch.no_grad():
        base = layer.get_base_layer()(x)
        actual = layer(x, adapter_names=names)
    assert routing.last_route(OP) is not None, "the fused mixed path never ran"
    expected = base.double().clone()
    for row, name in enumerate(names):
        if name != "__base__":
            A, B = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
            expected[row] += (x[row].double() @ A.t() @ B.t()) * layer.scaling[name]
    assert_close("y", actual, expected, FP32_TOL if dtype == torch.float32 else 2e-3)


def _isas():
    from fastpeft.backends import cpu

    return cpu._C.supported_isas() if cpu._C is not None else []


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("tokens", [40, 1], ids=["runs", "decode"])
def test_cpu_pass_on_every_simd_path(isa, dtype, tokens):
    """``_C.lora_mixed_`` on each SIMD path of this CPU, activations of every dtype with fp32 adapters, against the
    compose route: runs longer than one chunk of rows, and decode (one token per row: rows whose rank is a multiple
    of the vector width are expanded from B directly, ranks 8 and 16 cover every width, rank 3 none)."""
    from fastpeft.backends import cpu

    torch.manual_seed(9)
    K, N = 37, 29
    names = ["u", "__base__", "v", "u", "w", "v", "w"]
    ranks = {"u": 3, "v": 8, "w": 16}
    weights = {n: (torch.randn(r, K), torch.randn(N, r), torch.randn(N)) for n, r in ranks.items()}
    groups = mixed.row_groups(names)
    adapters = mixed.collect_adapters(groups, {n: w[0] for n, w in weights.items()},
                                      {n: w[1] for n, w in weights.items()},
                                      {"v": weights["v"][2], "w": weights["w"][2]}, {"u": 0.7, "v": 1.5, "w": 0.3},
                                      {}, training=False)
    x = torch.randn(len(names) * tokens, K).to(dtype)
    y = torch.randn(len(names) * tokens, N).to(dtype)
    plan = groups.plan(tokens, x.device)
    present = [0, 1, 2]
    expected = mixed._compose(x.float(), y.float().clone(), plan, adapters, present)
    cpu._C.set_isa(isa)
    try:
        actual = mixed._fused_cpu(x, y.clone(), plan, adapters, present)
    finally:
        cpu._C.set_isa("auto")
    if dtype == torch.float32:
        assert_close("y", actual, expected, FP32_TOL)
    else:
        assert_within_2x("y", actual, mixed._compose(x, y.clone(), plan, adapters, present), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("route", ["compose", "sgmv"])
def test_cuda_model_rows_match_peft(route):
    """On a GPU: the fused twins on CUDA tensors (the triton backend's routes) against PEFT, within 1e-5 (5e-3 where
    torch's matmul is allowed TF32, which the sgmv kernels then use too)."""
    require_triton_mode_for("cuda")
    reference, fused = (m.cuda() for m in twins())
    x = torch.randn(7, 5, 37, device="cuda")
    set_backend("triton")
    routing.set_route(OP, route)
    try:
        with torch.no_grad():
            expected = reference(x, adapter_names=NAMES)
            actual = fused(x, adapter_names=NAMES)
        assert routing.last_route(OP) == route
    finally:
        routing.set_route(OP, None)
        set_backend(None)
    assert_close("y", actual, expected, triton_fp32_tol())


def test_outputs_stay_right_through_the_confirming_measurement(monkeypatch):
    """The mixed routes update the base output in place once a route is settled; the calls in which the route table
    times a key's routes in turn must not run an in-place route several times (each call equals PEFT's)."""
    monkeypatch.setattr(routing, "CONFIRM_AFTER_CALLS", 3)
    monkeypatch.setattr(routing, "CALL_ROUNDS", 2)
    monkeypatch.setenv("FASTPEFT_ROUTE_CACHE", "off")
    monkeypatch.delenv("FASTPEFT_ROUTE", raising=False)
    routing.clear_choices()
    reference, fused = twins()
    x = torch.randn(7, 37)
    with torch.no_grad():
        want = reference(x, adapter_names=NAMES)
        for call in range(8):
            assert_close(f"y, call {call}", fused(x, adapter_names=NAMES), want, FP32_TOL)
    sources = {row["source"] for row in routing.routes() if row["op"] == OP}
    assert sources == {"measured in calls"}, sources
    routing.clear_choices()


def count_full_calls(monkeypatch) -> CallCounter:
    """Counts mixed calls that took the full path (``mixed.add_mixed_lora_``) instead of a settled call."""
    return CallCounter(monkeypatch, mixed, "add_mixed_lora_")


def _mixed_layers(model):
    return [m for m in model.modules() if hasattr(m, "_fastpeft_settled_mixed")]


def _agree(reference, fused, x, names, label, exact=None):
    """Two calls of ``fused`` (the first may settle, the second runs settled) give PEFT's output: within
    ``FP32_TOL``, or for a low-precision ``x`` by the tolerance rule against ``exact`` (an fp32 copy of
    ``reference``)."""
    with torch.no_grad():
        want = reference(x, adapter_names=names)
        for attempt in range(2):
            actual = fused(x, adapter_names=names)
            if exact is None:
                assert_close(f"{label} call {attempt}", actual, want, FP32_TOL)
            else:
                assert_within_2x(f"{label} call {attempt}", actual, want, exact(x.float(), adapter_names=names))


# lora_forward's CPU routes without adapters (the base product of a mixed evaluation call), by dtype.
BASE_PRODUCT_ROUTES = [("fp32", r) for r in ("compose", "fused", "gemv")] + [
    ("bf16", r) for r in ("compose", "fused", "compose_fp32", "fused_fp32", "fused_pairs", "fused_pairs_x", "gemv")]


@pytest.mark.parametrize("dtype,route", BASE_PRODUCT_ROUTES, ids=[f"{d}-{r}" for d, r in BASE_PRODUCT_ROUTES])
def test_evaluation_base_product_by_every_route_follows_the_base(dtype, route):
    """A mixed evaluation call over a dense base computes the base product by fastpeft's routes (each forced here),
    settled after its first call; replacing the base weight, editing its bias in place or hooking the base layer
    afterwards gives PEFT's output again (a hooked base runs its own forward, hook included)."""
    set_backend("cpu")
    routing.set_route("lora_forward", route)
    routing.set_route(OP, "fused")
    try:
        kwargs = {} if dtype == "fp32" else {"base_dtype": torch.bfloat16}
        reference, fused = twins(width=64, hidden=96, **kwargs)
        exact = copy.deepcopy(reference).float()
        torch.manual_seed(5)
        x = torch.randn(7, 64).to(torch.float32 if dtype == "fp32" else torch.bfloat16)

        def agree(label):
            _agree(reference, fused, x, NAMES, label, None if dtype == "fp32" else exact)

        own_forward = []
        for layer in _mixed_layers(fused):  # counts the base layers' own forwards, which fastpeft's product skips
            base = layer.base_layer
            base.forward = lambda inp, base=base: own_forward.append(1) or torch.nn.Linear.forward(base, inp)
        routing.clear_choices()
        agree("first")
        assert not own_forward, "the base product is fastpeft's, not the base layer's forward"
        assert routing.last_route("lora_forward") == route
        assert all(layer._fastpeft_settled_mixed.base is not None for layer in _mixed_layers(fused))

        def each_base(fn):
            for model in (reference, fused, exact):
                for name, module in model.named_modules():
                    if name.endswith(("up.base_layer", "down.base_layer")):
                        fn(name, module)

        torch.manual_seed(6)
        weights = {}

        def replace(name, base):
            weights.setdefault(name, torch.randn_like(base.weight, dtype=torch.float32))
            base.weight = torch.nn.Parameter(weights[name].to(base.weight.dtype), requires_grad=False)

        each_base(replace)
        agree("base weight replaced")
        assert all(layer._fastpeft_settled_mixed.base.holds(layer) for layer in _mixed_layers(fused)), (
            "the changed base is settled again")
        each_base(lambda name, base: base.bias.detach().add_(0.5))  # in place: the same parameter, a new version
        agree("bias edited in place")
        seen = []
        handles = []
        each_base(lambda name, base: handles.append(base.register_forward_hook(lambda *_: seen.append(1))))
        agree("hooked base")
        assert seen, "a hooked base runs its own forward"
        for handle in handles:
            handle.remove()
        agree("hooks removed")
    finally:
        routing.set_route("lora_forward", None)
        routing.set_route(OP, None)
        set_backend(None)


@pytest.fixture
def pinned_base_product():
    """Pin the route of the base products (``lora_forward`` without adapters) too: a new measured choice is a changed
    dispatch for every settled call, and a test that counts the calls repeating one must not measure between them."""
    routing.set_route("lora_forward", "compose")
    yield
    routing.set_route("lora_forward", None)


@pytest.mark.parametrize("pinned", [("cpu", "fused"), ("cpu", "compose")], ids=["fused", "compose"], indirect=True)
@pytest.mark.usefixtures("pinned_base_product")
def test_repeated_mixed_calls_run_settled_and_follow_changes(pinned, monkeypatch):
    """A repeated evaluation call with the same ``adapter_names`` and shape runs settled (the base product, then the
    route's pass, nothing resolved); every change to the adapters of the batch afterwards gives PEFT's output."""
    reference, fused = twins()
    _agree(reference, fused, torch.randn(7, 37), NAMES, "settling")
    _agree(reference, fused, torch.randn(7, 5, 37), NAMES, "prefill shape")
    assert all(layer._fastpeft_settled_mixed is not None for layer in _mixed_layers(fused))
    counter = count_full_calls(monkeypatch)
    _agree(reference, fused, torch.randn(7, 37), NAMES, "settled")
    _agree(reference, fused, torch.randn(7, 5, 37), list(NAMES), "settled, an equal list")
    assert counter.calls == 0, "both shapes of this names list run settled"
    _agree(reference, fused, torch.randn(3, 37), ["c", "a", "c"], "another names list")
    assert counter.calls == len(_mixed_layers(fused)), "another list resolves once, then runs settled"

    def change(label, mutate):
        for model in (reference, fused):
            mutate(model)
        _agree(reference, fused, torch.randn(7, 37), NAMES, label)

    def edit(model):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B.a" in name:
                    param.add_(0.3)

    def scale(model):
        for layer in model.modules():
            if hasattr(layer, "scaling") and "b" in getattr(layer, "scaling", {}):
                layer.scaling["b"] = -2.5

    def replace(model):
        torch.manual_seed(21)
        for layer in model.modules():
            if hasattr(layer, "lora_A") and "a" in layer.lora_A:
                layer.lora_A["a"].weight = torch.nn.Parameter(torch.randn_like(layer.lora_A["a"].weight))

    def readd_c_everywhere(model):  # "c" was absent from the down layers
        model.delete_adapter("c")
        torch.manual_seed(22)
        model.add_adapter("c", LoraConfig(r=2, lora_alpha=6, target_modules=["up", "down"], init_lora_weights=False))
        model.eval()

    for label, mutate in (("edited in place", edit), ("scaling", scale), ("replaced weight", replace),
                          ("c added where it was absent", readd_c_everywhere)):
        change(label, mutate)
    x = torch.randn(7, 37)
    with torch.no_grad(), reference.disable_adapter(), fused.disable_adapter():
        assert_close("disabled", fused(x, adapter_names=NAMES), reference(x, adapter_names=NAMES), FP32_TOL)
    _agree(reference, fused, x, NAMES, "enabled again")
    fused.base_model.model.blocks[0]["up"].merge(adapter_names=["a"])
    with torch.no_grad(), pytest.raises(ValueError, match="merged adapters"):
        fused(x, adapter_names=NAMES)


def test_settled_mixed_call_leaves_training_dropout_to_the_full_path(monkeypatch):
    """(PEFT's model refuses ``adapter_names`` in training mode; a layer called directly takes them.)"""
    reference, fused = twins(dropout=0.5)
    layer = fused.base_model.model.blocks[0]["up"]
    x = torch.randn(7, 37)
    with torch.no_grad():
        want = reference.base_model.model.blocks[0]["up"](x, adapter_names=NAMES)
        for attempt in range(2):
            assert_close(f"eval call {attempt}", layer(x, adapter_names=NAMES), want, FP32_TOL)
        assert layer._fastpeft_settled_mixed is not None
        counter = count_full_calls(monkeypatch)
        layer.train()
        dropped = layer(x, adapter_names=NAMES)
    assert counter.calls == 1, "dropout in training is drawn by the full path"
    assert (dropped - want).abs().max() > 1e-3
