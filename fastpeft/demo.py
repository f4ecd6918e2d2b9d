"""``make demo``: train LoRA adapters on a small LLaMA-architecture model three ways and print what each costs.

The model is built from a ``LlamaConfig`` with random weights (nothing is downloaded). The synthetic task is
next-token prediction on sequences that count upward modulo a small period (``t[i+1] = t[i] + step``), which a
LoRA adapter on a random base learns in a few dozen steps. Rows:

- ``base (frozen)``: the model without adapters, all weights frozen, forward + backward to the input embeddings
  (the work a frozen base costs inside adapter training);
- ``peft``: PEFT's LoRA layers (r, dropout as given);
- ``fastpeft``: the same adapters after ``fastpeft.patch`` (same initial weights as ``peft``).

Memory: on CUDA the peak allocated bytes; on the CPU, torch has no allocator peak, so the table reports the bytes
of activations saved for backward (unique storages seen by ``saved_tensors_hooks``), the part adapters change.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastpeft
from fastpeft.backends import BACKEND_NAMES
from fastpeft.bench import timing as bench_timing


def build_model(args, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads // 2,
        max_position_embeddings=args.seq_len,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(args.device, dtype=args.dtype)


def make_batch(args, generator):
    start = torch.randint(0, args.vocab, (args.batch, 1), generator=generator)
    step = torch.randint(1, 4, (args.batch, 1), generator=generator)
    positions = torch.arange(args.seq_len).unsqueeze(0)
    return ((start + step * positions) % args.vocab).to(args.device)


class SavedBytes:
    """Unique bytes of tensors autograd saves for backward, inside the context."""

    def __init__(self):
        self.storages = {}

    def __enter__(self):
        def pack(tensor):
            storage = tensor.untyped_storage()
            self.storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def total(self):
        return sum(self.storages.values())


def train(name, model, args, trainable: bool):
    generator = torch.Generator().manual_seed(1234)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr) if params else None
    model.train()
    step_times, losses, memory = [], [], 0
    embed = model.get_input_embeddings()
    for _ in range(args.steps):
        ids = make_batch(args, generator)
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with SavedBytes() as saved:
            if trainable:
                loss = model(input_ids=ids, labels=ids).loss
            else:
                embeds = embed(ids).detach().requires_grad_(True)
                loss = model(inputs_embeds=embeds, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
            memory = max(memory, torch.cuda.max_memory_allocated())
        else:
            memory = max(memory, saved.total)
        step_times.append(time.perf_counter() - start)
        losses.append(loss.item())
    timed = step_times[args.warmup:] or step_times
    median = statistics.median(timed)
    q25, _, q75 = statistics.quantiles(timed, n=4) if len(timed) >= 2 else (median, median, median)
    return {
        "name": name, "step_ms": median * 1e3, "q25_ms": q25 * 1e3, "q75_ms": q75 * 1e3,
        "tokens_per_s": args.batch * args.seq_len / median, "memory_mb": memory / 2**20, "first_loss": losses[0],
        "final_loss": statistics.fmean(losses[-5:]),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)

    from peft import LoraConfig, get_peft_model

    print(f"fastpeft {fastpeft.__version__} demo: LLaMA-architecture model, hidden {args.hidden}, {args.layers} "
          f"layers, {args.batch}x{args.seq_len} tokens/step, LoRA r={args.r} dropout={args.dropout}, "
          f"{args.dtype}, {args.device}, {torch.get_num_threads()} threads")
    info = fastpeft.backend_info()
    print("backends: " + ", ".join(f"{k}={'yes' if info[k]['available'] else 'no'}" for k in BACKEND_NAMES)
          + f"; auto picks {info['auto']['cpu']} for CPU tensors")

    base = build_model(args, seed=0)
    for p in base.parameters():
        p.requires_grad_(False)
    rows = [train("base (frozen)", base, args, trainable=False)]
    del base

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(1)
    peft_model = get_peft_model(build_model(args, seed=0), LoraConfig(
        r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout, target_modules=targets))
    torch.manual_seed(1)
    fast_model = fastpeft.patch(build_model(args, seed=0), r=args.r, lora_alpha=2 * args.r,
                                lora_dropout=args.dropout, target_modules=targets)
    rows.append(train("peft", peft_model, args, trainable=True))
    rows.append(train("fastpeft", fast_model, args, trainable=True))

    mem_label = "peak MB" if args.device == "cuda" else "saved-for-bwd MB"
    header = (f"| {'provider':<14} | {'step ms':>8} | {'q25-q75 ms':>13} | {'tokens/s':>9} | {mem_label:>16} "
              f"| {'first loss':>10} | {'final loss':>10} |")
    print()
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for row in rows:
        spread = f"{row['q25_ms']:.1f}-{row['q75_ms']:.1f}"
        print(f"| {row['name']:<14} | {row['step_ms']:>8.1f} | {spread:>13} | {row['tokens_per_s']:>9.0f} "
              f"| {row['memory_mb']:>16.1f} | {row['first_loss']:>10.3f} | {row['final_loss']:>10.3f} |")
    base_ms, peft_ms, fast_ms = rows[0]["step_ms"], rows[1]["step_ms"], rows[2]["step_ms"]
    print(f"\nadapter overhead over the frozen base: peft {peft_ms / base_ms:.2f}x, fastpeft {fast_ms / base_ms:.2f}x; "
          f"fastpeft step is {peft_ms / fast_ms:.2f}x PEFT's speed")
    busy = [row["name"] for row in rows if bench_timing.unsteady(row["step_ms"], row["q25_ms"], row["q75_ms"])]
    if busy:
        print(f"warning: the step times of {', '.join(busy)} spread over more than "
              f"{bench_timing.UNSTEADY_SPREAD:.0%} of their median: the machine was busy, so these ratios are not "
              f"reliable; rerun on a quiet machine, or with --threads 1")
    print("(both adapters start from the same weights; their losses differ only through the dropout RNG)")
    return rows


if __name__ == "__main__":
    main()
