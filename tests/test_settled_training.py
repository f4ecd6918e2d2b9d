"""Training calls kept resolved (``fastpeft.layers.SettledLayerCall`` holding ``functional.SettledTrainingCall``):
a repeated grad-enabled call of a fused LoRA layer skips dispatch for its forward and its backward, gives PEFT's
outputs and gradients, draws dropout as the full path does, and declines (the full path runs) after any change to
the layer, the input, the gradients asked for or the dispatch settings."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from checks import FusedCallCounter, assert_close, assert_within_2x
from model_helpers import MLP, Conv1DMLP
from peft import LoraConfig, get_peft_model
from test_peft_parity import FP32_TOL, twins
from test_settled_calls import CHANGES, lora_layers
from torch import nn

import fastpeft
from fastpeft import routing as routes


def training_twins(build=MLP, **config):
    config = dict(dict(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False), **config)
    reference, fused = twins(build, LoraConfig(**config), extra_adapters=[("other", LoraConfig(**config))])
    return reference.train(), fused.train()


def adapter_grads(model) -> dict:
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def step(model, x, dy):
    """One forward and backward on fresh gradients: ``(y, dX or None, {trainable parameter: grad})``."""
    model.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(x.requires_grad)
    y = model(xi)
    y.backward(dy)
    return y.detach(), xi.grad, adapter_grads(model)


def steps_agree(reference, fused, x, label="", tol=FP32_TOL, dy=None):
    """A training step of each model (the fused one twice: the first may settle, the second runs settled) gives
    PEFT's output and every gradient."""
    dy = torch.randn(*x.shape[:-1], 11 if dy is None else dy) if not isinstance(dy, torch.Tensor) else dy
    want_y, want_dx, want_grads = step(reference, x, dy)
    assert want_grads, "nothing to compare: no parameter has a gradient"
    for attempt in range(2):
        y, dx, grads = step(fused, x, dy)
        assert y.dtype == want_y.dtype, f"{label} call {attempt}: y is {y.dtype}, PEFT's {want_y.dtype}"
        assert_close(f"{label} call {attempt}: y", y, want_y, tol)
        assert (dx is None) == (want_dx is None), f"{label}: dX computed where PEFT's is not (or the reverse)"
        if dx is not None:
            assert_close(f"{label} call {attempt}: dX", dx, want_dx, tol)
        assert grads.keys() == want_grads.keys(), label
        for name, want in want_grads.items():
            got = grads[name]
            assert (got is None) == (want is None), f"{label} call {attempt}: {name}"
            if want is not None:
                assert_close(f"{label} call {attempt}: {name}", got, want, tol)


def settled_layers(model):
    return [layer for layer in lora_layers(model) if layer._fastpeft_settled_training is not None]


def test_repeated_training_calls_run_settled_and_match_peft(final_routes, monkeypatch):
    reference, fused = training_twins()
    x = torch.randn(3, 5, 23, requires_grad=True)
    steps_agree(reference, fused, x, "settling")
    assert len(settled_layers(fused)) == len(lora_layers(fused)) == 4
    counter = FusedCallCounter(monkeypatch)
    for attempt in range(3):  # fresh inputs, the adapters changed by an optimizer between the steps
        steps_agree(reference, fused, torch.randn(3, 5, 23, requires_grad=True), f"step {attempt}")
        for model in (reference, fused):
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.sub_(0.01 * p.grad.sign())
    assert counter.full.calls == 0, "a settled training call took the full path"
    assert counter.settled == 3 * 2 * 4
    # another kind of call (no dX): its first backward makes the choice of its backward's key, so the second settles
    steps_agree(reference, fused, torch.randn(7, 23), "x without grad")
    assert counter.full.calls == 2 * 4
    steps_agree(reference, fused, torch.randn(7, 23), "x without grad, settled")
    assert counter.full.calls == 2 * 4


def test_training_calls_over_conv1d_settle_and_match_peft(final_routes, monkeypatch):
    reference, fused = twins(Conv1DMLP, LoraConfig(r=3, lora_alpha=5, target_modules=["fc", "proj"],
                                                   fan_in_fan_out=True, init_lora_weights=False))
    reference.train()
    fused.train()
    x = torch.randn(6, 19, requires_grad=True)
    steps_agree(reference, fused, x, "settling", dy=19)
    counter = FusedCallCounter(monkeypatch)
    steps_agree(reference, fused, x, "settled", dy=19)
    assert counter.full.calls == 0 and counter.settled > 0


def _freeze_lora_A(model):
    for layer in lora_layers(model) or [m for m in model.modules() if hasattr(m, "lora_A")]:
        layer.lora_A["default"].weight.requires_grad_(False)


def _train_base_weight(model):
    for m in model.modules():
        if hasattr(m, "lora_A"):
            m.base_layer.weight.requires_grad_(True)


TRAINING_CHANGES = dict(CHANGES, **{
    "lora_A frozen": _freeze_lora_A,
    "base weight trainable": _train_base_weight,
    "model in eval": lambda model: model.eval(),
})


@pytest.mark.parametrize("change", list(TRAINING_CHANGES))
def test_settled_training_call_follows_a_change_to_the_layer(final_routes, monkeypatch, change):
    reference, fused = training_twins()
    x = torch.randn(6, 23, requires_grad=True)
    steps_agree(reference, fused, x, "settling")
    assert settled_layers(fused)
    for model in (reference, fused):
        TRAINING_CHANGES[change](model)
    counter = FusedCallCounter(monkeypatch)
    steps_agree(reference, fused, torch.randn(6, 23, requires_grad=True), change)
    if change == "lora_A frozen":  # no dA asked: another backward key, which the settled call must not serve
        assert counter.settled == 0


def test_settled_training_call_follows_the_input(final_routes, monkeypatch):
    reference, fused = training_twins()
    steps_agree(reference, fused, torch.randn(6, 23, requires_grad=True), "settling")
    counter = FusedCallCounter(monkeypatch)
    steps_agree(reference, fused, torch.randn(6, 23), "x without grad")
    # Only the first layer's input lacks grad: its call takes the full path, its backward's key (no dX) is measured,
    # which changes the routes' generation, so the second step's four calls take the full path once and settle.
    assert counter.full.calls == 1 + 4, "a call settled with dX asked served one without"
    steps_agree(reference, fused, torch.randn(6, 23, requires_grad=True), "x with grad again")
    steps_agree(reference, fused, torch.randn(40, 23, requires_grad=True), "another rows bucket")
    steps_agree(reference, fused, torch.randn(2, 3, 23, requires_grad=True), "3-D x")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        steps_agree(reference, fused, torch.randn(6, 23, requires_grad=True), "autocast", tol=3e-2)
        x = torch.randn(6, 23, requires_grad=True)
        # one adapted layer each (the model's head is not adapted: its output is bf16 whatever the layers return)
        want, got = ([m for m in model.modules() if hasattr(m, "lora_A")][0](x) for model in (reference, fused))
        assert got.dtype == want.dtype == torch.bfloat16
        assert_close("autocast layer", got.float(), want.float(), 3e-2)
    for model in (reference, fused):
        model.to(torch.bfloat16)  # the same Parameter objects, new data and dtype
    x16 = torch.randn(6, 23, dtype=torch.bfloat16, requires_grad=True)
    steps_agree(reference, fused, x16, "bf16", tol=3e-2, dy=torch.randn(6, 11, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="dtype"):
        fused(torch.randn(6, 23, requires_grad=True))  # an fp32 input for a bf16 layer: the full path's error


def test_settled_training_call_follows_pins_and_the_backend(final_routes, monkeypatch):
    reference, fused = training_twins()
    x = torch.randn(6, 23, requires_grad=True)
    steps_agree(reference, fused, x, "settling")
    for route in ("compose", "fused"):
        routes.set_route("lora_backward", route)
        steps_agree(reference, fused, x, f"pinned {route}")
        assert routes.last_route("lora_backward") == route
    routes.set_route(None, None)
    monkeypatch.setenv("FASTPEFT_ROUTE", "lora_forward=compose")
    steps_agree(reference, fused, x, "FASTPEFT_ROUTE")
    assert routes.last_route("lora_forward") == "compose"
    monkeypatch.delenv("FASTPEFT_ROUTE")
    fastpeft.set_backend("reference")
    counter = FusedCallCounter(monkeypatch)
    steps_agree(reference, fused, x, "reference backend")
    assert counter.settled == 0, "a call settled on the cpu backend ran after set_backend('reference')"


def _settle_dropout_twins(p=0.3):
    reference, fused = training_twins(lora_dropout=p)
    x = torch.randn(6, 23, requires_grad=True)
    dy = torch.randn(6, 11)
    for _ in range(2):
        step(fused, x, dy)
    assert settled_layers(fused)
    return reference, fused, x, dy


def _unsettled_step(model, x, dy, seed):
    """A step by the full path (every layer's kept training call dropped first), after ``torch.manual_seed(seed)``."""
    for layer in lora_layers(model):
        layer._fastpeft_settled_training = None
    torch.manual_seed(seed)
    out = step(model, x, dy)
    for layer in lora_layers(model):
        layer._fastpeft_settled_training = None
    return out


def test_settled_training_call_draws_dropout_as_the_full_path(final_routes, monkeypatch):
    _, fused, x, dy = _settle_dropout_twins()
    torch.manual_seed(5)
    counter = FusedCallCounter(monkeypatch)
    y, dx, grads = step(fused, x, dy)
    assert counter.full.calls == 0 and counter.settled == 4
    y2, dx2, grads2 = _unsettled_step(fused, x, dy, 5)
    assert counter.full.calls == 4
    assert torch.equal(y, y2) and torch.equal(dx, dx2)
    for name in grads:
        assert torch.equal(grads[name], grads2[name]), name
    torch.manual_seed(6)
    assert not torch.equal(step(fused, x, dy)[0], y), "another seed drew the same masks: no dropout was applied"


@pytest.mark.parametrize("change", ["p changed", "module in eval", "module replaced"])
def test_settled_training_call_follows_the_dropout_module(final_routes, monkeypatch, change):
    reference, fused, x, dy = _settle_dropout_twins()
    for model in (reference, fused):
        for layer in [m for m in model.modules() if hasattr(m, "lora_dropout")]:
            dropout = layer.lora_dropout["default"]
            if change == "p changed":
                dropout.p = 0.6
            elif change == "module in eval":
                dropout.eval()
            else:
                layer.lora_dropout["default"] = nn.Dropout(0.6)
    counter = FusedCallCounter(monkeypatch)
    torch.manual_seed(8)
    y, dx, grads = step(fused, x, dy)
    assert counter.full.calls == 4, "the changed dropout was not drawn by the full path"
    y2, dx2, grads2 = _unsettled_step(fused, x, dy, 8)
    assert torch.equal(y, y2) and torch.equal(dx, dx2)
    if change == "module in eval":  # no dropout left: PEFT's outputs and gradients
        steps_agree(reference, fused, x, change, dy=dy)


def test_settled_training_backward_takes_the_full_method_where_its_route_does_not_fit(final_routes, monkeypatch):
    """Route ``small`` reads a contiguous ``lora_A``: a parameter whose data was replaced by a transposed copy
    (same object, so the layer still holds it) sends the settled backward to the full method."""
    routes.set_route("lora_backward", "small")
    reference, fused = training_twins()
    x = torch.randn(1, 23, requires_grad=True)
    steps_agree(reference, fused, x, "settling")
    assert routes.last_route("lora_backward") == "small"
    for model in (reference, fused):
        for layer in [m for m in model.modules() if hasattr(m, "lora_A")]:
            A = layer.lora_A["default"].weight
            A.data = A.data.t().contiguous().t()
            assert not A.is_contiguous()
    counter = FusedCallCounter(monkeypatch)
    step(fused, x, torch.randn(1, 11))
    assert counter.full.calls == 0 and counter.settled == 4, "the forward did not run settled"
    assert routes.last_route("lora_backward") != "small", "the backward took the pinned route it does not fit"
    steps_agree(reference, fused, x, "lora_A not contiguous")


def test_settled_training_calls_count_toward_their_routes_confirmation(monkeypatch):
    """A first choice is confirmed by timing its close routes in the calls of its key: settled training calls count
    those calls and leave the due ones to the full path, which times them; both ops end confirmed."""
    monkeypatch.delenv("FASTPEFT_ROUTE", raising=False)
    monkeypatch.setenv("FASTPEFT_ROUTE_CACHE", "off")
    monkeypatch.setattr(routes, "CONFIRM_AFTER_CALLS", 12)  # two layers share each key: 6 steps before the due call
    monkeypatch.setattr(routes, "CALL_ROUNDS", 1)
    routes.clear_choices()
    routes.set_route("gemv_prefetch", "none")  # (its probe's confirmation would change the routes' generation)
    routes.set_route("lora_down", "transposed")  # (so would the down-projection's; both serve a native call)
    routes.set_route("lora_dy", "rows")  # (and the dY pass's kernel, which the fused backward's native call takes)
    try:
        reference, fused = training_twins()
        x = torch.randn(6, 23, requires_grad=True)
        counter = FusedCallCounter(monkeypatch)
        for _ in range(40):
            step(fused, x, torch.randn(6, 11))
            if routes.unconfirmed() == 0:
                break
        assert routes.unconfirmed() == 0
        assert counter.settled > 0, "no call ran settled before its routes were due"
        sources = {(row["op"], row["source"]) for row in routes.routes()}
        assert {(op, source) for op, source in sources if op.startswith("lora_")} == {
            ("lora_forward", "measured in calls"), ("lora_backward", "measured in calls")}, sources
        step(fused, x, torch.randn(6, 11))  # (a confirmation changes the routes' generation: this call settles)
        full, settled = counter.full.calls, counter.settled
        steps_agree(reference, fused, torch.randn(6, 23, requires_grad=True), "confirmed")
        assert counter.full.calls == full and counter.settled == settled + 8, "a confirmed call took the full path"
    finally:
        routes.set_route(None, None)
        routes.clear_choices()


def test_settled_training_state_is_not_pickled_or_copied(final_routes):
    reference, fused = training_twins()
    x = torch.randn(6, 23, requires_grad=True)
    steps_agree(reference, fused, x, "settling")
    layer = settled_layers(fused)[0]
    assert "_fastpeft_settled_training" not in layer.__getstate__()
    copied = copy.deepcopy(fused)
    assert not settled_layers(copied)
    steps_agree(reference, copied, x, "deep copy")
    assert settled_layers(pickle.loads(pickle.dumps(fused))) == []


def test_a_model_with_settled_training_calls_compiles_in_one_graph(final_routes):
    """Layers holding settled training calls compile with ``fullgraph=True`` (the forward leaves them to eager
    calls), and the compiled training step gives PEFT's output and gradients."""
    from test_compile import RecordingBackend

    reference, fused = training_twins()
    x = torch.randn(6, 23, requires_grad=True)
    steps_agree(reference, fused, x, "settling")
    assert settled_layers(fused)
    torch._dynamo.reset()
    rec = RecordingBackend()
    compiled = torch.compile(fused, fullgraph=True, backend=rec)
    dy = torch.randn(6, 11)
    want_y, want_dx, want_grads = step(reference, x, dy)
    y, dx, _ = step(compiled, x, dy)
    grads = adapter_grads(fused)  # (the compiled module's names have a prefix)
    assert len(rec.graphs) == 1 and rec.calls(torch.ops.fastpeft.lora_linear), "one graph, fastpeft's op in it"
    assert_close("compiled y", y, want_y, FP32_TOL)
    assert_close("compiled dX", dx, want_dx, FP32_TOL)
    for name, want in want_grads.items():
        assert_close(f"compiled {name}", grads[name], want, FP32_TOL)
    torch._dynamo.reset()


def _count_native(monkeypatch) -> list:
    """Counts the calls served by ``_C.settled_lora_training`` (forward and backward in C++)."""
    from fastpeft.backends import cpu

    calls = []
    serve = cpu._C.settled_lora_training

    def counted(*args):
        calls.append(1)
        return serve(*args)

    monkeypatch.setattr(cpu._C, "settled_lora_training", counted)
    return calls


@pytest.mark.parametrize("forward", ["gemv", "compose", "fused"])
@pytest.mark.parametrize("backward", ["small", "fused", "compose", "gemv"])
@pytest.mark.parametrize("what", ["x with grad", "x without grad", "lora_B frozen", "lora_A frozen"])
def test_settled_training_in_cpp_matches_peft(final_routes, monkeypatch, forward, backward, what):
    """One fp32 adapter with each forward route and each backward route the C++ node runs: the settled call runs both
    directions in C++ and gives PEFT's output and every gradient, whichever gradients are asked."""
    routes.set_route("lora_forward", forward)
    routes.set_route("lora_backward", backward)
    reference, fused = training_twins()
    if what in ("lora_B frozen", "lora_A frozen"):
        for model in (reference, fused):
            for layer in [m for m in model.modules() if hasattr(m, "lora_A")]:
                (layer.lora_B if what == "lora_B frozen" else layer.lora_A)["default"].weight.requires_grad_(False)
    x = torch.randn(2, 3, 23, requires_grad=what != "x without grad")
    steps_agree(reference, fused, x, "settling")
    native = _count_native(monkeypatch)
    steps_agree(reference, fused, x, what)
    assert len(native) == 2 * 4, "the settled calls did not run in C++"


@pytest.mark.parametrize("forward", ["gemv", "compose", "fused"])
@pytest.mark.parametrize("backward", ["small", "fused", "compose"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("trained", ["x and adapters", "lora_B only"])
def test_settled_training_in_cpp_equals_the_python_routes(final_routes, monkeypatch, forward, backward, p, trained):
    """The C++ autograd node runs the same kernels and ATen calls as the Python routes: outputs, dropout masks and
    gradients are bit-equal to the same model's calls through the full path; also where its backward wants neither
    dX nor dA (an input without grad, ``lora_A`` frozen)."""
    routes.set_route("lora_forward", forward)
    routes.set_route("lora_backward", backward)
    _, fused = training_twins(lora_dropout=p)
    if trained == "lora_B only":
        for layer in lora_layers(fused):
            for A in layer.lora_A.values():
                A.weight.requires_grad_(False)
    x = torch.randn(5, 23, requires_grad=trained != "lora_B only")
    dy = torch.randn(5, 11)
    for _ in range(2):
        step(fused, x, dy)
    native = _count_native(monkeypatch)
    torch.manual_seed(3)
    y, dx, grads = step(fused, x, dy)
    assert len(native) == 4
    y2, dx2, grads2 = _unsettled_step(fused, x, dy, 3)
    assert len(native) == 4
    assert torch.equal(y, y2) and (dx is dx2 is None if trained == "lora_B only" else torch.equal(dx, dx2))
    assert grads and (trained != "lora_B only" or all("lora_B" in name for name in grads))
    for name in grads:
        assert torch.equal(grads[name], grads2[name]), name


def test_settled_training_in_cpp_leaves_an_adapter_it_cannot_read_to_python(final_routes, monkeypatch):
    """``lora_A``'s data replaced by a transposed copy (the same parameter object): the C++ call declines it and the
    settled call's Python routes serve it, with PEFT's results."""
    routes.set_route("lora_forward", "gemv")
    routes.set_route("lora_backward", "fused")
    reference, fused = training_twins()
    x = torch.randn(4, 23, requires_grad=True)
    steps_agree(reference, fused, x, "settling")
    for model in (reference, fused):
        for layer in [m for m in model.modules() if hasattr(m, "lora_A")]:
            A = layer.lora_A["default"].weight
            A.data = A.data.t().contiguous().t()
    native = _count_native(monkeypatch)
    counter = FusedCallCounter(monkeypatch)
    steps_agree(reference, fused, x, "lora_A not contiguous")
    assert not native and counter.full.calls == 0 and counter.settled == 8


def test_settled_training_call_declines_under_a_torch_func_transform(final_routes, monkeypatch):
    """Under ``torch.func.grad`` a settled call takes the full path, which runs the spec there (the fused autograd
    Functions have no functorch rules, the kernels cannot read the transform's wrappers), never the C++ node: PEFT's
    gradient."""
    routes.set_route("lora_forward", "gemv")
    routes.set_route("lora_backward", "small")
    reference, fused = training_twins()
    x = torch.randn(1, 23, requires_grad=True)
    steps_agree(reference, fused, x, "settling")
    native = _count_native(monkeypatch)
    counter = FusedCallCounter(monkeypatch)
    xi = torch.randn(1, 23)
    grads = [torch.func.grad(lambda xi, model=model: model(xi).square().sum())(xi) for model in (reference, fused)]
    assert_close("dX under torch.func.grad", grads[1], grads[0], FP32_TOL)
    assert not native and counter.settled == 0


def test_an_adapter_whose_dropout_module_is_in_eval_draws_nothing(final_routes):
    """Two active adapters, one dropout module put in eval mode: PEFT calls each adapter's own module, so that
    adapter's term is undropped while the other's is dropped; the same as that adapter having no dropout at all
    (equal seeds, equal bits), on the full path and on settled calls."""
    runs = []
    for other in ("eval", "identity"):
        _, fused = training_twins(lora_dropout=0.4)
        fused.base_model.set_adapter(["default", "other"])
        for layer in lora_layers(fused):
            if other == "eval":
                layer.lora_dropout["other"].eval()
            else:
                layer.lora_dropout["other"] = nn.Identity()
        x, dy = torch.randn(6, 23, requires_grad=True), torch.randn(6, 11)
        outs = []
        for seed in (21, 22, 21):  # the first call takes the full path, later ones are settled
            torch.manual_seed(seed)
            outs.append(step(fused, x, dy))
        runs.append(outs)
    for (y, dx, grads), (y2, dx2, grads2) in zip(*runs):
        assert torch.equal(y, y2) and torch.equal(dx, dx2)
        for name in grads:
            assert torch.equal(grads[name], grads2[name]), name
    assert not torch.equal(runs[0][0][0], runs[0][1][0]), "no dropout was drawn for the training adapter"


@pytest.mark.parametrize("kernel", ["rows", "outer"])
def test_settled_training_in_cpp_takes_the_dy_kernel_of_its_key(final_routes, monkeypatch, kernel):
    """With backward ``fused`` the C++ node runs the dY pass by the kernel op ``lora_dy`` settled for its key (its
    ``dy_outer`` argument): PEFT's output and gradients, and the same bits as the full path with that kernel, for a
    rank the outer-product kernel takes."""
    from fastpeft import _C

    rank = next((r for r in (16, 8, 4) if _C.dy_outer_takes(r)), None)
    assert rank is not None, "no rank of one SIMD vector: the outer-product kernel is unreachable"
    routes.set_route("lora_forward", "fused")
    routes.set_route("lora_backward", "fused")
    routes.set_route("lora_dy", kernel)
    reference, fused = training_twins(r=rank)
    x, dy = torch.randn(37, 23, requires_grad=True), torch.randn(37, 11)
    steps_agree(reference, fused, x, "settling", dy=dy)
    from fastpeft.backends import cpu

    taken = []
    serve = cpu._C.settled_lora_training

    def recorded(*args):
        taken.append(args[-1])  # dy_outer
        return serve(*args)

    monkeypatch.setattr(cpu._C, "settled_lora_training", recorded)
    torch.manual_seed(3)
    y, dx, grads = step(fused, x, dy)
    assert taken == [kernel == "outer"] * 4, taken
    y2, dx2, grads2 = _unsettled_step(fused, x, dy, 3)
    assert routes.last_route("lora_dy") == kernel
    assert torch.equal(y, y2) and torch.equal(dx, dx2)
    for name in grads:
        assert torch.equal(grads[name], grads2[name]), name
    steps_agree(reference, fused, x, kernel, dy=dy)


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("backward", ["fused", "compose", "gemv"])
@pytest.mark.parametrize("forward", ["gemv", "compose", "fused"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_settled_training_in_cpp_over_a_16bit_base(final_routes, monkeypatch, dtype, forward, backward, p):
    """A 16-bit base with PEFT's fp32 adapters: with each forward and backward route the C++ node runs and each of
    lora_down's kernels (``split`` for bf16 without dropout where oneDNN has its bf16 kernel), the settled call runs
    both directions in C++, gives the full path's bits for the same seeds, and PEFT's output and gradients within
    the 16-bit tolerance."""
    from fastpeft.backends import cpu

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False, lora_dropout=p)
    reference, fused = twins(MLP, config, extra_adapters=[("other", copy.deepcopy(config))], dtype=dtype)
    reference.train(), fused.train()
    adapter = next(m for m in fused.modules() if hasattr(m, "lora_A")).lora_A["default"].weight
    assert adapter.dtype == torch.float32, "PEFT's adapters over a 16-bit base are fp32: the case is not the one meant"
    # PEFT initializes them in the base's dtype: give them fp32's full mantissa, as training does, so that a kernel
    # reading fewer of A's bits (split's two parts against three) changes the bits compared below
    gen = torch.Generator().manual_seed(5)
    for (name, param), (_, twin) in zip(reference.named_parameters(), fused.named_parameters()):
        if "lora_A" in name:
            noise = torch.randn(param.shape, generator=gen) * 1e-3
            with torch.no_grad():
                param.add_(noise)
                twin.add_(noise)
    fp32_twin = get_peft_model(MLP(), copy.deepcopy(config), adapter_name="default")
    fp32_twin.add_adapter("other", copy.deepcopy(config))
    fp32_twin.load_state_dict({k: v.float() for k, v in reference.state_dict().items()})
    fp32_twin.train()
    x = torch.randn(6, 23, dtype=dtype, requires_grad=True)
    dy = torch.randn(6, 11, dtype=dtype)
    routes.set_route("lora_forward", forward)
    routes.set_route("lora_backward", backward)
    downs = ["rows", "transposed"]
    if dtype == torch.bfloat16 and p == 0 and cpu._C.widened_mm_available():
        downs.append("split")
    for down in downs:
        routes.set_route("lora_down", down)
        for _ in range(2):  # the first step after a pin takes the full path and settles
            step(fused, x, dy)
        native = _count_native(monkeypatch)
        torch.manual_seed(11)
        y, dx, grads = step(fused, x, dy)
        assert len(native) == 4, f"{down}: the settled calls did not run in C++"
        assert routes.last_route("lora_down") == down
        y2, dx2, grads2 = _unsettled_step(fused, x, dy, 11)
        assert len(native) == 4, "the full path ran in C++"
        assert torch.equal(y, y2) and torch.equal(dx, dx2), down
        for name in grads:
            assert torch.equal(grads[name], grads2[name]), f"{down}: {name}"
        if p == 0:  # PEFT's output and gradients by the low-precision rule (2x PEFT's own error in this dtype)
            want = step(reference, x, dy)
            oracle = step(fp32_twin, x.float(), dy.float())
            for what, got, ref, exact in zip(("y", "dX"), (y, dx), want[:2], oracle[:2]):
                assert_within_2x(f"{down}: {what}", got.float(), ref.float(), exact, 1e-3)
            for name, exact in oracle[2].items():
                assert_within_2x(f"{down}: {name}", grads[name].float(), want[2][name].float(), exact, 1e-3)
