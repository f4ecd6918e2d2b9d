"""Model-level benchmark: a LLaMA-architecture model built from a ``LlamaConfig`` (random weights, nothing
downloaded), with LoRA on every projection of its blocks.

- training step: forward, causal-LM loss, backward, AdamW step on the adapter parameters; tokens per second and
  peak memory;
- generation: greedy decoding of a fixed number of new tokens (no early stop); tokens per second with the
  adapter unmerged (PEFT's layers, fastpeft's layers) and merged into the base weights (``merge_adapter``), the
  ceiling an unmerged adapter is compared with.

Each provider gets its own model built from the same seed, so all run the same arithmetic.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

import fastpeft

from .cases import DTYPES, scaled
from .memory import peak_bytes
from .timing import time_runners

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class ModelCase:
    scale: int
    layers: int
    batch: int
    seq: int
    new_tokens: int
    dtype: str
    dropout: float = 0.0
    r: int = 16

    def config(self):
        from transformers import LlamaConfig

        hidden = scaled(4096, self.scale)
        heads = max(1, hidden // 128)  # LLaMA's head_dim of 128 where the scaled width allows it
        return LlamaConfig(
            hidden_size=hidden, intermediate_size=scaled(11008, self.scale), num_hidden_layers=self.layers,
            num_attention_heads=heads, num_key_value_heads=heads, vocab_size=scaled(32000, self.scale),
            max_position_embeddings=max(256, self.seq + self.new_tokens), pad_token_id=0, bos_token_id=1,
            eos_token_id=2,
        )

    @property
    def label(self) -> str:
        cfg = self.config()
        return (f"llama h={cfg.hidden_size} ffn={cfg.intermediate_size} L={self.layers} vocab={cfg.vocab_size} "
                f"{self.dtype}")


def build_model(case: ModelCase, provider: str, device: torch.device, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(case.config()).to(device=device, dtype=DTYPES[case.dtype])
    torch.manual_seed(seed + 1)
    config = LoraConfig(r=case.r, lora_alpha=2 * case.r, lora_dropout=case.dropout, target_modules=TARGETS,
                        init_lora_weights=False)
    model = get_peft_model(model, config)
    if provider.startswith("fastpeft"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fastpeft.accelerate(model)
    backend = provider.split("-", 1)[1] if "-" in provider else None
    return model, (lambda: fastpeft.set_backend(backend))


def run(case: ModelCase, providers: list[str], device: torch.device, budget_s: float) -> list[dict]:
    """Rows (dicts) for the training step and for generation, one per provider and metric."""
    providers = [p for p in providers if p != "base"]  # a frozen model has no training step
    g = torch.Generator().manual_seed(3)
    vocab = case.config().vocab_size
    ids = torch.randint(3, vocab, (case.batch, case.seq), generator=g).to(device)
    rows: list[dict] = []
    models = {p: build_model(case, p, device) for p in providers}

    # ---- training step
    runners = []
    for provider, (model, select) in models.items():
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def prepare(select=select, opt=opt, model=model):
            select()
            model.train()
            opt.zero_grad(set_to_none=True)

        def step(model=model, opt=opt):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()

        runners.append((provider, prepare, step, lambda params=params: params))
    timings = time_runners(runners, device, budget_s)
    for provider, prepare, step, _ in runners:
        prepare()
        peak, how = peak_bytes(step, device)
        t = timings[provider]
        tokens = case.batch * case.seq
        rows.append(dict(provider=provider, mode="train-step", metric="time", value=t["median_ms"], unit="ms",
                         q25=t["q25_ms"], q75=t["q75_ms"], reps=t["reps"]))
        rows.append(dict(provider=provider, mode="train-step", metric="tokens_per_s",
                         value=tokens / (t["median_ms"] / 1e3), unit="tokens/s", reps=t["reps"]))
        rows.append(dict(provider=provider, mode="train-step", metric="peak_bytes", value=peak, unit=how))

    # ---- generation: unmerged per provider, then merged (the same merged weights whoever merges them)
    prompt = ids[:, : min(case.seq, 16)]

    def generate(model):
        with torch.no_grad():
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=case.new_tokens,
                           min_new_tokens=case.new_tokens, do_sample=False, pad_token_id=0)

    gen_runners = []
    for provider, (model, select) in models.items():
        gen_runners.append((provider, lambda select=select, model=model: (select(), model.eval()),
                            lambda model=model: generate(model), lambda: []))
    merged_model, merged_select = models[providers[0]]
    gen_timings = time_runners(gen_runners, device, budget_s)
    merged_model.merge_adapter()
    merged_timing = time_runners([("merged", lambda: (merged_select(), merged_model.eval()),
                                   lambda: generate(merged_model), lambda: [])], device, budget_s)
    merged_model.unmerge_adapter()
    gen_timings.update(merged_timing)
    new = case.batch * case.new_tokens
    for provider, t in gen_timings.items():
        rows.append(dict(provider=provider, mode="generate", metric="time", value=t["median_ms"], unit="ms",
                         q25=t["q25_ms"], q75=t["q75_ms"], reps=t["reps"]))
        rows.append(dict(provider=provider, mode="generate", metric="tokens_per_s",
                         value=new / (t["median_ms"] / 1e3), unit="new tokens/s", reps=t["reps"]))
    fastpeft.set_backend(None)
    return rows
