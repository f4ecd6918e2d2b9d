"""fastpeft inside the stacks users train with: ``transformers.Trainer``, activation checkpointing (reentrant and
not, with LoRA dropout active) and bf16 CPU autocast."""

from __future__ import annotations

import copy

import pytest
import torch
from checks import FusedCallCounter, assert_close, assert_within_2x
from model_helpers import MLP
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer
from torch.utils.checkpoint import checkpoint

import fastpeft
import fastpeft.functional as functional
from fastpeft.layers import FusedLoraLinear

VOCAB = 97


def _llama(layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config)


def _randomize_lora_B(model, std=0.2):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=std)


@pytest.fixture
def count_fused(monkeypatch):
    """Counts the fused LoRA calls (full path and settled training calls), so a test knows the fused path (not
    PEFT's fallback) ran."""
    return FusedCallCounter(monkeypatch)


# ------------------------------------------------------------------------------------------------------ Trainer
class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=10):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, VOCAB, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def test_trainer_trains_and_saves_peft_adapter(tmp_path, count_fused):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = fastpeft.patch(_llama(), r=4, lora_alpha=8, lora_dropout=0.1)
    _randomize_lora_B(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2,
                             learning_rate=5e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=_Rows())
    result = trainer.train()
    assert result.global_step == 4
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert count_fused.calls >= 4 * 14, "Trainer did not run the fused layers"
    lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(lora_layers) == 14 and all(type(m) is FusedLoraLinear for m in lora_layers)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p.detach(), before[n]), f"{n} was not trained"
        else:
            assert torch.equal(p.detach(), frozen[n]), f"frozen {n} changed"

    save_dir = tmp_path / "adapter"
    trainer.save_model(str(save_dir))
    assert (save_dir / "adapter_model.safetensors").is_file() and (save_dir / "adapter_config.json").is_file()
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(_llama(), str(save_dir))
    state = loaded.state_dict()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(state[n], p.detach()), f"{n}: saved adapter differs from the trained weights"
    ids = _Rows().ids[:2]
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert_close("logits (PEFT-loaded vs trained fastpeft)", loaded(input_ids=ids).logits,
                     model(input_ids=ids).logits, 1e-5)


# --------------------------------------------------------------------------------------- activation checkpointing
def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _mlp_with_dropout():
    torch.manual_seed(0)
    model = get_peft_model(MLP(), LoraConfig(r=3, lora_alpha=6, lora_dropout=0.3, target_modules=["up", "down"]))
    fastpeft.accelerate(model)
    _randomize_lora_B(model)
    return model.train()


def _mlp_forward(model, x, use_checkpoint, reentrant):
    inner = model.base_model.model
    for block in inner.blocks:
        def run(h, block=block):
            return h + block["down"](torch.relu(block["up"](h)))

        x = checkpoint(run, x, use_reentrant=reentrant) if use_checkpoint else run(x)
    return inner.head(x)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpoint_block_same_grads_with_dropout(reentrant, count_fused):
    """``torch.utils.checkpoint`` restores the RNG state before recomputing, so the recomputed forward draws the same
    dropout seeds and backward sees forward's masks: gradients equal the un-checkpointed run bit for bit."""
    model = _mlp_with_dropout()
    x = torch.randn(5, 7, 23)
    g = torch.randn(5, 7, 11)
    runs = {}
    for use_ckpt, seed in ((False, 11), (True, 11), (False, 12)):
        model.zero_grad()
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(seed)
        y = _mlp_forward(model, xi, use_ckpt, reentrant)
        y.backward(g)
        runs[(use_ckpt, seed)] = (y.detach(), xi.grad.clone(), _grads(model))
    (y0, dx0, g0), (y1, dx1, g1), (y2, _, g2) = runs[(False, 11)], runs[(True, 11)], runs[(False, 12)]
    assert count_fused.calls == 4 * 2 + 4 * 2  # 4 layers x 2 plain runs, x 2 for the checkpointed run (recompute)
    assert len(g0) == 8
    assert torch.equal(y1, y0)
    assert torch.equal(dx1, dx0), "dX differs under checkpointing"
    for name in g0:
        assert torch.equal(g1[name], g0[name]), f"{name}: checkpointed gradient differs (recompute drew another mask)"
    assert not torch.equal(y2, y0), "a different seed gives the same output: dropout is not active"
    assert any(not torch.equal(g2[n], g0[n]) for n in g0)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_enable_llama_with_dropout(reentrant):
    """transformers' ``gradient_checkpointing_enable`` on a patched LLaMA in training mode, lora_dropout=0.2."""
    torch.manual_seed(0)
    model = fastpeft.patch(_llama(layers=1), r=4, lora_alpha=8, lora_dropout=0.2)
    _randomize_lora_B(model)
    model.train()
    ids = torch.randint(0, VOCAB, (2, 9))

    def grads(seed):
        model.zero_grad()
        torch.manual_seed(seed)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), _grads(model)

    loss0, g0 = grads(5)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()  # reentrant checkpoint needs an input that requires grad
    assert model.base_model.model.model.gradient_checkpointing
    loss1, g1 = grads(5)
    model.gradient_checkpointing_disable()
    loss2, g2 = grads(6)
    assert len(g0) == 14 and g0.keys() == g1.keys()
    assert torch.equal(loss1, loss0)
    for name in g0:
        assert g0[name].abs().sum() > 0
        assert_close(name, g1[name], g0[name], 1e-6)
    assert not torch.equal(loss2, loss0), "dropout is not active: a different seed gives the same loss"


# ------------------------------------------------------------------------------------------------- bf16 autocast
def test_bf16_cpu_autocast_matches_peft():
    """An fp32 patched LLaMA under ``torch.autocast('cpu', bfloat16)``: output dtype as PEFT's, logits and adapter
    gradients within 2x PEFT's own bf16 error against the fp32 run."""
    torch.manual_seed(0)
    peft_model = get_peft_model(_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    _randomize_lora_B(peft_model)
    fused = fastpeft.accelerate(copy.deepcopy(peft_model))
    assert any(type(m) is FusedLoraLinear for m in fused.modules())
    ids = torch.randint(0, VOCAB, (2, 13))

    def run(model, autocast):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits, _grads(model)

    ref_logits, ref_grads = run(peft_model, False)
    peft_logits, peft_grads = run(peft_model, True)
    fast_logits, fast_grads = run(fused, True)
    assert fast_logits.dtype == peft_logits.dtype
    assert_within_2x("logits", fast_logits, peft_logits, ref_logits)
    assert len(ref_grads) == 28 and fast_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert fast_grads[name].dtype == torch.float32, f"{name}: gradient dtype {fast_grads[name].dtype}"
        assert_within_2x(name, fast_grads[name], peft_grads[name], ref_grads[name], floor=1e-3)


def _dropout_pair(device="cpu"):
    """PEFT's LoRA MLP and its fused twin with the same weights, dropout 0.2, in training mode."""
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["up", "down"], init_lora_weights=False)
    torch.manual_seed(0)
    reference = get_peft_model(MLP(), copy.deepcopy(config)).to(device)
    fused = fastpeft.accelerate(copy.deepcopy(reference))
    return reference.train(), fused.train()


def test_dropout_under_cuda_graph_capture_falls_back_to_torch_dropout(monkeypatch):
    """Under CUDA graph capture fastpeft's host-drawn dropout seeds would be baked into the graph (one mask on every
    replay): the fused layers then run PEFT's forward, whose torch dropout is graph-safe, so with the same torch RNG
    state the output is PEFT's exactly; the functional op refuses instead of replaying one mask. (Checked here with
    the capture flag forced; the gpu-marked test below captures a real graph.)"""
    reference, fused = _dropout_pair()
    monkeypatch.setattr(functional, "capturing_cuda_graph", lambda x: True)
    called = []
    monkeypatch.setattr(functional, "lora_linear", lambda *a, **k: called.append(1))
    x = torch.randn(5, 23)
    torch.manual_seed(7)
    y_ref = reference(x)
    torch.manual_seed(7)
    y = fused(x)
    assert not called, "the fused op ran under capture with dropout"
    assert torch.equal(y, y_ref)
    monkeypatch.undo()
    monkeypatch.setattr(functional, "capturing_cuda_graph", lambda x: True)
    A, B = torch.randn(4, 23), torch.randn(11, 4)
    with pytest.raises(RuntimeError, match="CUDA graph is being captured would replay one dropout mask"):
        functional.lora_linear(x, torch.randn(11, 23), None, [A], [B], [None], [2.0], [0.2], training=True)
    # no dropout, or eval: nothing to replay, the fused op runs
    y0 = functional.lora_linear(x, torch.randn(11, 23), None, [A], [B], [None], [2.0], [0.2], training=False)
    assert y0.shape == (5, 11)


@pytest.mark.gpu
def test_dropout_masks_differ_between_cuda_graph_replays():
    _, fused = _dropout_pair("cuda")
    static_x = torch.randn(8, 23, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            fused(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_y = fused(static_x)
    graph.replay()
    first = static_y.clone()
    graph.replay()
    assert torch.isfinite(static_y).all() and not torch.equal(first, static_y), "one dropout mask replayed"
