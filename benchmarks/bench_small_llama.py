"""A SmolLM2-135M-shaped LLaMA (random weights, nothing downloaded): what LoRA costs over the frozen model, in a
training step and in greedy decoding, for PEFT and for fastpeft.

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/bench_small_llama.py                 # fp32 and bf16
    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/bench_small_llama.py --dtypes bf16 --rounds 30

Shape: hidden 576, intermediate 1536, 9 attention heads and 3 key/value heads, 30 layers (``--layers``), vocabulary
49152; LoRA r=16, alpha 32, dropout 0.05 on all seven projections.

- ``train-step``: forward, causal-LM loss, backward, AdamW on the adapters, for ``--batch`` x ``--seq`` tokens. The
  frozen row is the same model without adapters, every weight frozen, backward to the input embeddings (the work a
  frozen base costs inside adapter training).
- ``decode``: greedy generation of ``--new-tokens`` tokens (no early stop) from a 16-token prompt, eval mode, adapters
  unmerged; the frozen row is the model without adapters.
- ``layer-sweep``: each of the model's adapted projections called once on one token, in the model's order, eval
  mode, no grad (the projections alone, without attention and norms, caches as cold as the weights' stream makes
  them); the frozen row calls the frozen model's projections. The overhead columns are then microseconds a call.

All models are built from one seed and timed in interleaved rounds; the ms columns are medians over the rounds. The
overhead columns are paired: in each round a model's time over the frozen model's of the same round, minus 1, and
the median of that over the rounds (the host's speed changes between rounds cancel in each ratio). The last columns
divide fastpeft's paired overhead by PEFT's: the ratio of the two medians, and the quartiles of the ratio taken round
by round (how much one run can move it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from side_by_side import interleaved_times, paired_overheads  # noqa: E402

from fastpeft.bench.timing import add_allocator_option, apply_allocator  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(args, dtype, provider):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import fastpeft

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    if provider == "frozen":
        model.requires_grad_(False)
        return model
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                             init_lora_weights=False))
    if provider == "fastpeft":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fastpeft.accelerate(model, strict=True)
    return model


def _projections(model) -> list:
    """The model's LoRA target projections in call order (the adapted layers, or the frozen model's nn.Linear)."""
    from peft import PeftModel

    llama = model.base_model.model if isinstance(model, PeftModel) else model
    out = []
    for block in llama.model.layers:
        for name in TARGETS:
            attention = name in ("q_proj", "k_proj", "v_proj", "o_proj")
            out.append(getattr(block.self_attn if attention else block.mlp, name))
    return out


def make_step(models, opts, ids):
    """One training step of the model it is given: the frozen model backpropagates to its input embeddings, the
    adapted ones to their adapters and take an AdamW step."""
    embed = models["frozen"].get_input_embeddings()
    optimizer_of = {id(models[p]): opts[p] for p in opts}

    def step(model):
        model.train()
        if id(model) not in optimizer_of:
            embeds = embed(ids).detach().requires_grad_(True)
            model(inputs_embeds=embeds, labels=ids).loss.backward()
            return
        opt = optimizer_of[id(model)]
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["train-step", "decode"],
                        choices=["train-step", "decode", "layer-sweep"])
    add_allocator_option(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    allocator = apply_allocator(args)
    if allocator is not None:
        print(allocator)
    ids = torch.randint(3, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(3))
    prompt = ids[:1, :16]
    print(f"SmolLM2-135M-shaped LLaMA, {args.layers} layers, r=16 on {len(TARGETS)} projections, dropout 0.05, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| dtype | mode | frozen ms | peft ms | fastpeft ms | peft overhead | fastpeft overhead | fastpeft/peft "
          "overhead | per-round quartiles |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.dtypes:
        dtype = DTYPES[name]
        models = {p: build(args, dtype, p) for p in ("frozen", "peft", "fastpeft")}
        opts = {p: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4)
                for p, m in models.items() if p != "frozen"}

        step = make_step(models, opts, ids)

        def decode(model):
            model.eval()
            with torch.no_grad():
                model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                               max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                               pad_token_id=0)

        projections = {id(m): _projections(m) for m in models.values()}
        inputs = {width: torch.randn(1, 1, width, dtype=dtype) for width in (576, 1536)}

        def sweep(model, projections=projections, inputs=inputs):
            # (eval mode is set before timing: the walk over a PEFT model's modules costs milliseconds)
            with torch.no_grad():
                for layer in projections[id(model)]:
                    layer(inputs[layer.in_features])

        for mode in args.modes:
            run = {"train-step": step, "decode": decode, "layer-sweep": sweep}[mode]
            if mode == "layer-sweep":
                for model in models.values():
                    model.eval()
            times = interleaved_times(models, run, args.rounds)
            if mode == "layer-sweep":
                t = {p: statistics.median(ts) for p, ts in times.items()}
                calls = len(projections[id(models["frozen"])])
                over = {p: (t[p] - t["frozen"]) / calls * 1e3 for p in ("peft", "fastpeft")}
                print(f"| {name} | {mode} | {t['frozen']:.2f} | {t['peft']:.2f} | {t['fastpeft']:.2f} "
                      f"| {over['peft']:+.1f} us a call | {over['fastpeft']:+.1f} us a call | | |", flush=True)
                continue
            t = {p: statistics.median(ts) for p, ts in times.items()}
            paired = paired_overheads(times, "frozen")
            over = {p: statistics.median(paired[p]) for p in ("peft", "fastpeft")}
            ratio = over["fastpeft"] / over["peft"] if over["peft"] > 0 else float("nan")
            per_round = [f / q for f, q in zip(paired["fastpeft"], paired["peft"]) if q > 0]
            q1, _, q3 = statistics.quantiles(per_round, n=4) if len(per_round) >= 2 else (float("nan"),) * 3
            print(f"| {name} | {mode} | {t['frozen']:.1f} | {t['peft']:.1f} | {t['fastpeft']:.1f} | "
                  f"{over['peft']:+.1%} | {over['fastpeft']:+.1%} | {ratio:.2f} | {q1:.2f}-{q3:.2f} |", flush=True)


if __name__ == "__main__":
    main()
