"""``fastpeft.report``: every adapter layer listed with whether it runs fused, its backend and routes, and why not."""

from __future__ import annotations

import torch
from model_helpers import MLP
from peft import LoraConfig, get_peft_model
from test_peft_parity import CountFusedCalls

import fastpeft
from fastpeft import routing


def _model(**config):
    torch.manual_seed(0)
    return get_peft_model(MLP(), LoraConfig(r=4, target_modules=["up", "down"], **config))


def test_fused_layers_show_backend_and_measured_routes(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTPEFT_ROUTE_CACHE", "off")
    routing.clear_choices()
    model = fastpeft.accelerate(_model())
    before = fastpeft.report(model)
    assert [r.name.rsplit(".", 2)[-2:] for r in before.layers] == [["0", "up"], ["0", "down"], ["1", "up"],
                                                                   ["1", "down"]]
    assert all(r.fused and r.method == "lora" and r.base == "Linear" and r.backend == "cpu" for r in before.layers)
    assert all(r.routes == {} for r in before.layers), "no call made yet: nothing measured"
    model(torch.randn(5, 23)).sum().backward()
    after = fastpeft.report(model)
    for row in after.layers:
        # the decoding GEMV's prefetch choice is listed where the forward runs it
        gemv = row.routes.get("lora_forward") == "gemv"
        assert set(row.routes) == {"lora_forward", "lora_backward"} | ({"gemv_prefetch"} if gemv else set()), row
        assert row.routes["lora_forward"] in routing.ROUTES["lora_forward"]
    text = str(after)
    assert "4 of 4 adapter layers run fused" in text and "lora_forward=" in text


def test_reasons_for_layers_that_fall_back():
    model = _model()
    plain = fastpeft.report(model)
    assert not any(r.fused for r in plain.layers)
    assert all("fastpeft.accelerate" in r.reason for r in plain.layers)
    fastpeft.accelerate(model)
    with model.disable_adapter():
        assert all(r.reason == "adapters disabled" for r in fastpeft.report(model).layers)
    model.merge_adapter()
    assert all("merged" in r.reason for r in fastpeft.report(model).layers)
    model.unmerge_adapter()
    handle = model.base_model.model.blocks[0]["up"].base_layer.register_forward_hook(lambda *a: None)
    rows = {r.name.removeprefix("base_model.model."): r for r in fastpeft.report(model).layers}
    assert rows["blocks.0.up"].reason == "forward hooks on the base layer" and rows["blocks.1.up"].fused
    handle.remove()
    assert fastpeft.report(model).fused == 4


def test_dora_layers_beside_a_training_dropout_adapter_are_reported_fused_and_run_fused():
    model = _model(use_dora=True)
    fastpeft.accelerate(model)
    assert "4 of 4 adapter layers run fused" in str(fastpeft.report(model))
    model.add_adapter("plain", LoraConfig(r=2, target_modules=["up"], lora_dropout=0.1))
    model.base_model.set_adapter(["default", "plain"])
    fastpeft.accelerate(model)
    model.train()
    assert "4 of 4 adapter layers run fused" in str(fastpeft.report(model))
    with CountFusedCalls() as counter:
        model(torch.randn(3, 23)).sum().backward()
    assert counter.calls == 4
    model.eval()
    assert "4 of 4 adapter layers run fused" in str(fastpeft.report(model))
