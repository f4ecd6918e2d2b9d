"""Evaluation calls kept resolved (``fastpeft.layers.SettledLayerCall``, ``functional.SettledLoraForward``): a
repeated no-grad call of a fused LoRA layer skips dispatch, and every change to the layer, the input or the dispatch
settings after it was settled gives PEFT's output again (the settled call declines and the full path runs)."""

from __future__ import annotations

import pytest
import torch
from checks import CallCounter, assert_close
from model_helpers import MLP, Conv1DMLP
from peft import LoraConfig
from test_peft_parity import FP32_TOL, twins
from torch import nn

import fastpeft
from fastpeft import functional
from fastpeft import routing as routes
from fastpeft.layers import FusedLoraLinear


def count_resolved(monkeypatch) -> CallCounter:
    """Counts calls that took the full path (``functional.lora_linear``) instead of a settled call."""
    return CallCounter(monkeypatch, functional, "lora_linear")


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, FusedLoraLinear)]


def outputs_agree(reference, fused, x, tol=FP32_TOL, label=""):
    """Two no-grad eval calls of each model (the first may settle, the second runs settled) give PEFT's output."""
    with torch.no_grad():
        want = reference(x)
        for attempt in range(2):
            assert_close(f"{label} call {attempt}", fused(x), want, tol)


def settle(reference, fused, rows: int) -> None:
    """Settle every layer on calls of ``rows`` rows; one-row calls are pinned to route ``gemv`` and must settle into
    the form C++ serves (``_C.SettledGemv``) and be served by it."""
    if rows == 1:
        routes.set_route("lora_forward", "gemv")
    for _ in range(2 if rows == 1 else 1):  # gemv's prefetch choice is made by the first call: the second settles
        outputs_agree(reference, fused, torch.randn(rows, 23), label="settling")
    layers = lora_layers(fused)
    assert layers and all(layer._fastpeft_settled is not None for layer in layers)
    if rows == 1:
        assert all(layer._fastpeft_native is not None and layer._fastpeft_native.served > 0 for layer in layers)


def mlp_twins(**config):
    config = dict(dict(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False), **config)
    reference, fused = twins(MLP, LoraConfig(**config), extra_adapters=[("other", LoraConfig(**config))])
    reference.eval()
    fused.eval()
    return reference, fused


def test_settled_call_names_the_route_and_the_choice_it_counts(monkeypatch):
    """``routing.settled_call`` names what ``take`` would take and the first measurement whose calls a settled caller
    counts (``TakenRoutes.served``) until the confirming measurement is due, which it leaves to ``run``."""
    monkeypatch.delenv("FASTPEFT_ROUTE", raising=False)
    monkeypatch.setattr(routes, "CONFIRM_AFTER_CALLS", 3)
    monkeypatch.setattr(routes, "CALL_ROUNDS", 2)
    routes.clear_choices()
    try:
        key = routes.make_key("lora_forward", "cpu", "dense", torch.float32, torch.float32, [torch.float32], 8, 64,
                              48, False, 4, 1)
        names = {"compose", "fused"}
        candidates = {name: (lambda name=name: name) for name in sorted(names)}
        before = routes.generation()
        assert routes.settled_call(key, names) is None, "nothing chosen yet"
        chosen = routes.run(key, candidates)
        assert routes.generation() != before, "a choice was made"
        assert routes.settled_call(key, {"gemv"}) is None, "the choice cannot serve this call"
        route, counted = routes.settled_call(key, names)
        assert route == chosen and counted is not None and counted.source == "measured"
        served = 0
        taken = routes.TakenRoutes({"lora_forward": (route, counted)})
        while not taken.due():
            taken.served()
            served += 1
        assert served == routes.CONFIRM_AFTER_CALLS - 1
        for _ in range(2 * routes.CALL_ROUNDS):  # the rotation's calls (one or two routes) take the full path
            if routes.routes()[0]["source"] != "measured":
                break
            assert routes.settled_call(key, names) is None, "the next call times a route in turn"
            routes.run(key, candidates)
        assert routes.routes()[0]["source"] == "measured in calls"
        route, counted = routes.settled_call(key, names)
        assert route in names and counted is None, "a confirmed choice counts nothing"
        other = ({"compose", "fused"} - {route}).pop()
        before = routes.generation()
        routes.set_route("lora_forward", other)
        assert routes.generation() != before and routes.settled_call(key, names) == (other, None)
        before = routes.generation()
        routes.clear_choices()
        assert routes.generation() != before
    finally:
        routes.set_route(None, None)
        routes.clear_choices()


def test_calls_run_settled_while_their_route_awaits_confirmation(final_routes, monkeypatch):
    """A first measurement serves settled calls too, counted, and the calls that confirm it take the full path."""
    monkeypatch.setenv("FASTPEFT_ROUTE_CACHE", "off")  # (choices other tests stored would be read, not measured)
    monkeypatch.setattr(routes, "CONFIRM_AFTER_CALLS", 5)
    monkeypatch.setattr(routes, "CALL_ROUNDS", 2)
    # the gemv route's prefetch choice and the down-projection's kernel are choices of their own (made whenever
    # timing picks a route that uses them): pinned, only the forward's choices are made here
    routes.set_route("gemv_prefetch", "l2")
    routes.set_route("lora_down", "rows")
    reference, fused = mlp_twins()
    counter = count_resolved(monkeypatch)
    calls = 12
    for _ in range(calls):
        outputs_agree(reference, fused, torch.randn(6, 23), label="confirming")
    layers = len(lora_layers(fused))
    rows = routes.routes()
    assert {row["source"] for row in rows} == {"measured in calls"}
    rotation_calls = sum(len(row["timings_ms"]) for row in rows) * routes.CALL_ROUNDS
    # per layer: the measuring call and the rotation's calls; a choice made elsewhere (another layer's key) changes
    # the route generation and costs a layer one more resolution
    assert layers + rotation_calls <= counter.calls <= 3 * layers + rotation_calls < 2 * calls * layers


def test_repeated_evaluation_calls_run_settled_and_match_peft(final_routes, monkeypatch):
    reference, fused = mlp_twins()
    x = torch.randn(3, 5, 23)
    outputs_agree(reference, fused, x, label="settling")
    layers = lora_layers(fused)
    assert layers and all(layer._fastpeft_settled is not None for layer in layers)
    counter = count_resolved(monkeypatch)
    outputs_agree(reference, fused, torch.randn(3, 5, 23), label="settled")
    outputs_agree(reference, fused, torch.randn(2, 7, 23), label="same rows bucket")
    assert counter.calls == 0, "every call of the same dtype and rows bucket ran settled"
    outputs_agree(reference, fused, torch.randn(1, 23), label="one row")
    # Another rows bucket resolves again; a layer settled before a later layer's first choice was made (which
    # changes the route generation) resolves once more.
    assert len(layers) <= counter.calls <= 2 * len(layers)
    counter.calls = 0
    outputs_agree(reference, fused, torch.randn(1, 23), label="one row settled")
    assert counter.calls == 0
    with torch.enable_grad():
        x = torch.randn(4, 23, requires_grad=True)
        fused(x).sum().backward()
    assert x.grad is not None and counter.calls == len(layers), "a call that records autograd never runs settled"


def test_a_layer_keeps_settled_calls_per_rows_bucket(final_routes, monkeypatch):
    """A prompt's prefill and its decode steps alternate rows buckets: each keeps its own settled call."""
    reference, fused = mlp_twins()
    for rows in (16, 1, 16, 1):  # settle both
        outputs_agree(reference, fused, torch.randn(rows, 23), label=f"{rows} rows")
    counter = count_resolved(monkeypatch)
    for rows in (16, 1, 9, 1, 16):
        outputs_agree(reference, fused, torch.randn(rows, 23), label=f"{rows} rows")
    assert counter.calls == 0
    for rows in (2, 3, 5, 33, 70):  # more buckets than a layer keeps: the oldest are dropped
        outputs_agree(reference, fused, torch.randn(rows, 23), label=f"{rows} rows")
    assert max(len(layer._fastpeft_settled.calls) for layer in lora_layers(fused)) <= 4
    for model in (reference, fused):
        model.set_adapter("other")  # the layer changed: the kept calls for every bucket decline
    outputs_agree(reference, fused, torch.randn(1, 23), label="other adapter")
    assert all(len(layer._fastpeft_settled.calls) == 1 for layer in lora_layers(fused))


def _set_scale(model):
    for layer in lora_layers(model) or [m for m in model.modules() if hasattr(m, "set_scale")]:
        layer.set_scale("default", 0.3)


def _scaling_dict(model):
    for m in model.modules():
        if hasattr(m, "scaling") and "default" in getattr(m, "scaling", {}):
            m.scaling["default"] = -1.7


def _base_layers(model):
    return [m.base_layer for m in model.modules() if hasattr(m, "lora_A")]


def _replace_base_weight(model):
    torch.manual_seed(11)
    for base in _base_layers(model):
        base.weight = nn.Parameter(torch.randn_like(base.weight), requires_grad=False)


def _edit_base_weight(model):
    with torch.no_grad():
        for base in _base_layers(model):
            base.weight.mul_(-2.0)


def _replace_base_bias(model):
    for base in _base_layers(model):
        base.bias = nn.Parameter(torch.full_like(base.bias, 0.25), requires_grad=False)


def _hook_on_base(model):
    for base in _base_layers(model):
        base.register_forward_hook(lambda module, args, out: out * 3)


def _edit_adapter(model):
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B["default"].weight.add_(0.5)


def _replace_adapter(model):
    torch.manual_seed(12)
    for m in model.modules():
        if hasattr(m, "lora_A"):
            m.lora_A["default"].weight = nn.Parameter(torch.randn_like(m.lora_A["default"].weight))


def _add_adapter_and_activate_both(model):
    torch.manual_seed(13)
    model.add_adapter("third", LoraConfig(r=2, lora_alpha=3, target_modules=["up", "down"], init_lora_weights=False))
    model.base_model.set_adapter(["default", "third"])


def _delete_adapter(model):
    model.delete_adapter("other")


def _merge(model):
    model.merge_adapter()


def _merge_then_unmerge(model):
    model.merge_adapter()
    model.unmerge_adapter()


CHANGES = {
    "set_adapter": lambda model: model.set_adapter("other"),
    "set_scale": _set_scale,
    "scaling dict": _scaling_dict,
    "replaced base weight": _replace_base_weight,
    "base weight edited in place": _edit_base_weight,
    "replaced base bias": _replace_base_bias,
    "hook on the base layer": _hook_on_base,
    "adapter edited in place": _edit_adapter,
    "replaced adapter weight": _replace_adapter,
    "added adapter, both active": _add_adapter_and_activate_both,
    "deleted adapter": _delete_adapter,
    "merged": _merge,
    "merged and unmerged": _merge_then_unmerge,
}


def _lora_bias_added(model):
    for m in model.modules():
        if hasattr(m, "lora_B"):
            m.lora_B["default"].bias = nn.Parameter(torch.full((m.lora_B["default"].out_features,), 0.75))


def _another_dropout_module(model):
    for m in model.modules():
        if hasattr(m, "lora_dropout"):
            m.lora_dropout["default"] = nn.Dropout(0.4).eval()  # draws nothing, but is not the settled module


def _scaling_replaced(model):
    for m in model.modules():
        if hasattr(m, "scaling") and "default" in getattr(m, "scaling", {}):
            m.scaling = dict(m.scaling, default=2.5)


CHANGES.update({"lora_B bias added": _lora_bias_added, "another dropout module": _another_dropout_module,
                "scaling dict replaced": _scaling_replaced})


@pytest.mark.parametrize("rows", [6, 1], ids=["6 rows", "1 row (C++)"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_settled_call_follows_a_change_to_the_layer(final_routes, change, rows):
    reference, fused = mlp_twins()
    settle(reference, fused, rows)
    for model in (reference, fused):
        CHANGES[change](model)
    outputs_agree(reference, fused, torch.randn(rows, 23), label=change)


@pytest.mark.parametrize("rows", [6, 1], ids=["6 rows", "1 row (C++)"])
def test_settled_call_follows_disabled_adapters_and_dtype(final_routes, rows):
    reference, fused = mlp_twins()
    x = torch.randn(rows, 23)
    settle(reference, fused, rows)
    with reference.disable_adapter(), fused.disable_adapter():
        outputs_agree(reference, fused, x, label="disabled")
    outputs_agree(reference, fused, x, label="enabled again")
    for model in (reference, fused):
        model.to(torch.bfloat16)  # the same Parameter objects, new data and dtype
    with torch.no_grad():
        want = reference(x.bfloat16()).float()
        for attempt in range(2):
            got = fused(x.bfloat16())
            assert got.dtype == torch.bfloat16
            assert_close(f"bf16 call {attempt}", got.float(), want, 2e-2)
        with pytest.raises(TypeError, match="dtype"):
            fused(x)  # an fp32 input for a bf16 layer: the full path's error, not a settled result


@pytest.mark.parametrize("rows", [16, 1], ids=["16 rows", "1 row (C++)"])
def test_settled_call_leaves_training_mode_dropout_to_the_full_path(final_routes, monkeypatch, rows):
    reference, fused = mlp_twins(lora_dropout=0.5)
    x = torch.randn(rows, 23)
    settle(reference, fused, rows)
    counter = count_resolved(monkeypatch)
    fused.train()
    with torch.no_grad():
        dropped = fused(x)
        eval_out = reference(x)
    assert counter.calls == len(lora_layers(fused)), "dropout in training is drawn by the full path"
    assert (dropped - eval_out).abs().max() > 1e-3, "dropout was applied"
    fused.eval()
    outputs_agree(reference, fused, x, label="eval again")


@pytest.mark.parametrize("rows", [16, 1], ids=["16 rows", "1 row (C++)"])
def test_settled_call_leaves_a_new_drawing_dropout_module_to_the_full_path(final_routes, monkeypatch, rows):
    """A layer's dropout module replaced by one in training mode (the model in eval): PEFT draws with it, so the
    settled calls decline and the full path draws."""
    reference, fused = mlp_twins()
    x = torch.randn(rows, 23)
    settle(reference, fused, rows)
    with torch.no_grad():
        eval_out = reference(x)
    for layer in lora_layers(fused):
        layer.lora_dropout["default"] = nn.Dropout(0.5)
    counter = count_resolved(monkeypatch)
    with torch.no_grad():
        dropped = fused(x)
    assert counter.calls == len(lora_layers(fused)), "dropout in training is drawn by the full path"
    assert (dropped - eval_out).abs().max() > 1e-3, "dropout was applied"


@pytest.mark.parametrize("rows", [6, 1], ids=["6 rows", "1 row (C++)"])
def test_settled_call_follows_pins_and_the_backend(final_routes, monkeypatch, rows):
    reference, fused = mlp_twins()
    x = torch.randn(rows, 23)
    settle(reference, fused, rows)
    for route in ("compose", "fused", "gemv"):
        routes.set_route("lora_forward", route)
        outputs_agree(reference, fused, x, label=f"pinned {route}")
        assert routes.last_route("lora_forward") == route
    routes.set_route(None, None)
    monkeypatch.setenv("FASTPEFT_ROUTE", "lora_forward=compose")
    outputs_agree(reference, fused, x, label="FASTPEFT_ROUTE")
    assert routes.last_route("lora_forward") == "compose"
    monkeypatch.setenv("FASTPEFT_ROUTE", "lora_forward=gemv")
    outputs_agree(reference, fused, x, label="FASTPEFT_ROUTE changed")
    assert routes.last_route("lora_forward") == "gemv"
    outputs_agree(reference, fused, x, label="settled under FASTPEFT_ROUTE")  # one row: served from C++
    monkeypatch.setenv("FASTPEFT_ROUTE", "lora_forward=compose")
    outputs_agree(reference, fused, x, label="FASTPEFT_ROUTE changed back")
    assert routes.last_route("lora_forward") == "compose"
    monkeypatch.delenv("FASTPEFT_ROUTE")
    settle(reference, fused, rows)  # then only the backend changes
    counter = count_resolved(monkeypatch)
    fastpeft.set_backend("reference")
    outputs_agree(reference, fused, x, label="reference backend")
    assert counter.calls == 2 * len(lora_layers(fused)), "the reference backend settles nothing"
    fastpeft.set_backend(None)
    monkeypatch.setenv("FASTPEFT_BACKEND", "reference")
    outputs_agree(reference, fused, x, label="FASTPEFT_BACKEND")
    assert counter.calls == 4 * len(lora_layers(fused))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_settled_gemv_is_one_call_and_reads_its_adapters_per_call(final_routes, monkeypatch, dtype):
    """Route ``gemv`` settled with one adapter and no ``lora_bias`` (``CpuBackend.settled_forward``): each layer call
    is one C++ call, served by the layer's ``_C.SettledGemv`` (no separate down-projection, no ``_C`` call from
    Python), for ``x`` with 1, 2 and 3 dimensions; a non-contiguous ``x`` (left to the Python path), adapters
    updated in place and adapters cast to bf16 (the route's own function then) all give PEFT's output (fp32: 1e-5;
    bf16: within 2x of PEFT's own error against an fp32 copy)."""
    import copy

    from checks import assert_within_2x

    from fastpeft import _C

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False)
    reference, fused = twins(MLP, config, dtype=dtype)
    reference.eval()
    fused.eval()
    oracle = copy.deepcopy(reference).float()
    routes.set_route("lora_forward", "gemv")
    layers = lora_layers(fused)

    def agree(x, label, all_fp32=dtype == torch.float32):
        with torch.no_grad():
            want, exact = reference(x), oracle(x.float())
            for attempt in range(2):  # the first call may settle
                got = fused(x)
                assert got.shape == want.shape and got.dtype == want.dtype, label
                if all_fp32:
                    assert_close(f"{label} call {attempt}", got, want, FP32_TOL)
                else:
                    assert_within_2x(f"{label} call {attempt}", got.double(), want.double(), exact.double())

    agree(torch.randn(1, 23).to(dtype), "settling")
    agree(torch.randn(1, 23).to(dtype), "settled")  # the prefetch choice made by the first call changed dispatch
    assert all(layer._fastpeft_native is not None for layer in layers)

    def served():
        return sum(layer._fastpeft_native.served for layer in layers)

    one_call, down = CallCounter(monkeypatch, _C, "dense_lora_gemv"), CallCounter(monkeypatch, _C, "lora_xa")
    before = served()
    for shape in [(23,), (1, 23), (1, 1, 23)]:
        agree(torch.randn(*shape).to(dtype), f"x {shape}")
    assert routes.last_route("lora_forward") == "gemv" and routes.last_route("gemv_prefetch") is not None
    assert down.calls == 0 and one_call.calls == 0, "no call from Python"
    assert served() - before == 2 * 3 * len(layers), "one C++ call per settled layer call"
    before = served()
    agree(torch.randn(1, 46).to(dtype)[:, ::2], "non-contiguous x")
    # the first layer's input is x (its call takes the Python path); the later layers' inputs are contiguous
    assert served() - before == 2 * (len(layers) - 1), "C++ serves contiguous x only"
    with torch.no_grad():
        for model in (reference, fused, oracle):
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    param.mul_(-0.5)  # an optimizer's in-place update: same tensors, new values
    agree(torch.randn(1, 23).to(dtype), "adapters updated in place")
    down.calls = 0
    for model in (reference, fused, oracle):
        for layer in model.modules():
            if hasattr(layer, "lora_A"):
                for adapter in (layer.lora_A["default"], layer.lora_B["default"]):
                    adapter.to(torch.bfloat16 if model is not oracle else torch.float32)
                    if model is oracle:  # the fp32 oracle of bf16 adapters: their rounded values
                        adapter.weight.data = adapter.weight.data.bfloat16().float()
    agree(torch.randn(1, 23).to(dtype), "bf16 adapters", all_fp32=False)
    assert down.calls > 0, "adapters the one call does not take go through the route's own function"


def test_settled_call_over_conv1d_and_bad_inputs(final_routes):
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["fc", "proj"], fan_in_fan_out=True,
                        init_lora_weights=False)
    reference, fused = twins(Conv1DMLP, config)
    reference.eval()
    fused.eval()
    outputs_agree(reference, fused, torch.randn(2, 4, 19), label="conv1d")
    assert all(layer._fastpeft_settled is not None for layer in lora_layers(fused))
    with torch.no_grad():
        for base in _base_layers(reference) + _base_layers(fused):
            base.weight.mul_(0.5)  # the transposed view is taken per call
    outputs_agree(reference, fused, torch.randn(2, 4, 19), label="conv1d edited")
    with torch.no_grad(), pytest.raises(ValueError, match="features"):
        fused(torch.randn(2, 4, 18))
    with torch.no_grad(), pytest.raises(TypeError, match="must be a torch.Tensor"):
        lora_layers(fused)[0](torch.randn(2, 4, 19).tolist())


def test_parametrized_adapter_weight_is_never_settled(final_routes):
    from torch.nn.utils import parametrize

    reference, fused = mlp_twins()
    for model in (reference, fused):
        for layer in [m for m in model.modules() if hasattr(m, "lora_A")]:
            parametrize.register_parametrization(layer.lora_A["default"], "weight", _Doubled())
    outputs_agree(reference, fused, torch.randn(6, 23), label="parametrized")
    assert all(layer._fastpeft_settled is None for layer in lora_layers(fused))


class _Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


def test_settled_state_is_not_pickled(final_routes):
    import copy

    reference, fused = mlp_twins()
    outputs_agree(reference, fused, torch.randn(6, 23), label="before")
    settle(reference, fused, 1)
    twin = copy.deepcopy(fused)
    assert all(layer._fastpeft_settled is None and layer._fastpeft_native is None for layer in lora_layers(twin))
    outputs_agree(reference, twin, torch.randn(6, 23), label="deep copy")


@pytest.mark.gpu
def test_settled_calls_on_cuda_follow_the_device(final_routes, monkeypatch):
    """On a CUDA device repeated evaluation calls run settled (the triton backend's measured route, kept) and give
    PEFT's output; a model moved to the CPU and back keeps its parameters' objects, and its settled calls decline
    a call on another device instead of computing there."""
    reference, fused = mlp_twins()
    reference.cuda()
    fused.cuda()
    outputs_agree(reference, fused, torch.randn(3, 5, 23, device="cuda"), label="settling")
    layers = lora_layers(fused)
    assert layers and all(layer._fastpeft_settled is not None for layer in layers)
    counter = count_resolved(monkeypatch)
    outputs_agree(reference, fused, torch.randn(2, 7, 23, device="cuda"), label="settled")
    assert counter.calls == 0, "every call of the same dtype and rows bucket ran settled"
    reference.cpu()
    fused.cpu()
    outputs_agree(reference, fused, torch.randn(2, 7, 23), label="moved to the CPU")
    assert counter.calls >= len(layers), "the CUDA calls declined the CPU input"


class _Raises:
    """An object whose truth value and equality raise."""

    def __bool__(self):
        raise RuntimeError("no truth value")

    def __eq__(self, other):
        raise RuntimeError("no equality")

    __hash__ = object.__hash__


def test_guards_read_in_cpp_mean_what_python_says():
    """Each guard kind (``fastpeft.guards``) read by ``_C.guards_hold`` gives the answer of ``guards.holds`` and the
    one written here, for lookups that find, miss or raise; a list holds only when each of its guards does."""
    from types import SimpleNamespace

    from fastpeft import _C
    from fastpeft import guards as g

    obj, other, odd = SimpleNamespace(a=1, empty=[], full=[0], nan=float("nan")), object(), _Raises()
    table = {"obj": obj, "zero": 0, "one": 1.0, "odd": odd, "none": None}
    drop, still, off = nn.Dropout(0.3), nn.Dropout(0.0), nn.Dropout(0.3).eval()
    cases = [
        ((g.ITEM_IS, table, "obj", obj), True), ((g.ITEM_IS, table, "obj", other), False),
        ((g.ITEM_IS, table, "missing", None), True), ((g.ITEM_IS, table, "none", None), True),
        ((g.ITEM_IS, [obj], 0, obj), True), ((g.ITEM_IS, [obj], 3, None), True), ((g.ITEM_IS, [obj], 3, obj), False),
        ((g.ITEM_EQUAL, table, "one", 1), True), ((g.ITEM_EQUAL, table, "one", 1.5), False),
        ((g.ITEM_EQUAL, table, "missing", 0), False), ((g.ITEM_EQUAL, table, "odd", 1), False),
        ((g.ITEM_EQUAL, table, "odd", odd), True),  # the object itself: equal without asking it
        ((g.ITEM_FALSY, table, "zero", None), True), ((g.ITEM_FALSY, table, "one", None), False),
        ((g.ITEM_FALSY, table, "missing", None), True), ((g.ITEM_FALSY, table, "odd", None), False),
        ((g.ATTR_IS, obj, "a", 1), True), ((g.ATTR_IS, obj, "a", 2), False), ((g.ATTR_IS, obj, "b", None), False),
        ((g.ATTR_FALSY, obj, "empty", None), True), ((g.ATTR_FALSY, obj, "full", None), False),
        ((g.ATTR_FALSY, obj, "b", None), False), ((g.ATTR_FALSY, SimpleNamespace(x=odd), "x", None), False),
        ((g.ATTR_EQUAL, obj, "a", 1.0), True), ((g.ATTR_EQUAL, obj, "a", 2), False),
        ((g.ATTR_EQUAL, obj, "b", None), False), ((g.ATTR_EQUAL, obj, "nan", obj.nan), True),
        ((g.ATTR_EQUAL, obj, "nan", float("nan")), False),
        ((g.LENGTH_IS, table, None, 5), True), ((g.LENGTH_IS, table, None, 4), False),
        ((g.LENGTH_IS, obj, None, 0), False),
        ((g.LACKS, table, "missing", None), True), ((g.LACKS, table, "obj", None), False),
        ((g.LACKS, obj, "a", None), False),
        ((g.NOT_DROPPING, off.__dict__, None, None), True), ((g.NOT_DROPPING, still.__dict__, None, None), True),
        ((g.NOT_DROPPING, drop.__dict__, None, None), False), ((g.NOT_DROPPING, {"training": True}, None, None), False),
        ((g.NOT_DROPPING, {}, None, None), True), ((g.NOT_DROPPING, {"training": odd, "p": 0}, None, None), False),
    ]
    for guard, expected in cases:
        assert g.holds(guard) is expected, guard
        assert _C.guards_hold([guard]) is expected, guard
    holding = [guard for guard, expected in cases if expected]
    assert _C.guards_hold(holding) and _C.guards_hold([])
    for guard, expected in cases:
        if not expected:
            assert not _C.guards_hold(holding[:3] + [guard] + holding[3:]), guard
    with pytest.raises(RuntimeError, match="guard is"):
        _C.guards_hold([(g.ITEM_IS, table, "obj")])
    with pytest.raises(RuntimeError, match="unknown guard kind"):
        _C.guards_hold([(99, table, "obj", obj)])


def test_a_layer_served_from_cpp_compiles_in_one_graph(final_routes):
    """A model whose layers hold a ``_C.SettledGemv`` (settled eager one-row calls) compiles with ``fullgraph=True``
    (the forward leaves the C++ object to eager calls), and the compiled model gives PEFT's output."""
    from test_compile import RecordingBackend

    reference, fused = mlp_twins()
    settle(reference, fused, 1)
    torch._dynamo.reset()
    rec = RecordingBackend()
    compiled = torch.compile(fused, fullgraph=True, backend=rec)
    x = torch.randn(1, 23)
    with torch.no_grad():
        assert_close("compiled", compiled(x), reference(x), FP32_TOL)
    assert len(rec.graphs) == 1 and rec.calls(torch.ops.fastpeft.lora_linear), "one graph, fastpeft's op in it"
    torch._dynamo.reset()


def test_a_model_with_calls_served_from_cpp_is_freed(final_routes):
    """A layer's ``_C.SettledGemv`` holds the layer's own dicts (its guards) and the layer holds it: the garbage
    collector sees that cycle, so a model dropped after decoding frees its weights."""
    import gc
    import weakref

    reference, fused = mlp_twins()
    settle(reference, fused, 1)
    layer = lora_layers(fused)[0]
    kept = [weakref.ref(t) for t in (layer.base_layer.weight, layer.lora_A["default"].weight)]
    kept.append(weakref.ref(layer))
    del layer, fused
    gc.collect()
    assert all(ref() is None for ref in kept), "the model outlived its last reference"
