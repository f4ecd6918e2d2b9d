"""LoRA over one layer through the public API: a frozen ``nn.Linear``, PEFT's LoRA over it, and
``fastpeft.patch`` over it, timed side by side in one process (interleaved rounds, medians, warm-up first).

    .venv/bin/python benchmarks/bench_patch_cpu.py                  # 512x2048x2048, r=16, 2 threads
    .venv/bin/python benchmarks/bench_patch_cpu.py --M 1 16 512 2048 --dtypes fp32 bf16

``fwd`` is a training-mode forward with autograd recording (``x`` requires grad, as inside a model); ``fwd+bwd``
adds the backward. All three share one frozen base layer (same tensors); dropout is live in both adapters.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

# The shared timing loop sits beside this script; named explicitly so the script also runs under PYTHONSAFEPATH.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from side_by_side import interleaved_medians  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(K, N, r, dtype, p):
    """The three models over one shared frozen ``nn.Linear``: separate copies of a 2048x2048 weight land in
    different memory (huge pages or not), which alone moved M=1 timings by ~0.1 ms, more than the adapter costs."""
    from peft import LoraConfig, get_peft_model

    import fastpeft

    torch.manual_seed(0)
    linear = nn.Linear(K, N).to(dtype)
    for param in linear.parameters():
        param.requires_grad_(False)
    config = dict(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["0"], init_lora_weights=False)
    torch.manual_seed(1)
    peft_model = get_peft_model(nn.Sequential(linear), LoraConfig(**config))
    torch.manual_seed(1)
    fast_model = fastpeft.patch(nn.Sequential(linear), **config)
    assert peft_model.base_model.model[0].base_layer is fast_model.base_model.model[0].base_layer is linear
    return {"base": nn.Sequential(linear).train(), "peft": peft_model.train(), "fastpeft": fast_model.train()}


def step(model, x, mode):
    y = model(x)
    if mode == "fwd+bwd":
        y.backward(torch.ones_like(y))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--M", type=int, nargs="+", default=[512])
    ap.add_argument("--K", type=int, default=2048)
    ap.add_argument("--N", type=int, default=2048)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import fastpeft

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fastpeft backends: "
          + ", ".join(k for k, v in fastpeft.backend_info().items() if isinstance(v, dict) and v.get("available")))
    print("| dtype | dropout | mode | M | base ms | peft ms | fastpeft ms | peft/base | fastpeft/base "
          "| fastpeft vs peft |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for dtype_name in args.dtypes:
        for p in args.dropout:
            models = build(args.K, args.N, args.r, DTYPES[dtype_name], p)
            for M in args.M:
                x = torch.randn(M, args.K, dtype=DTYPES[dtype_name], requires_grad=True)
                for mode in args.modes:
                    med = interleaved_medians(models, lambda model, x=x, mode=mode: step(model, x, mode), args.rounds)
                    print(f"| {dtype_name} | {p} | {mode} | {M} | {med['base']:.2f} | {med['peft']:.2f} | "
                          f"{med['fastpeft']:.2f} | {med['peft'] / med['base']:.3f} | "
                          f"{med['fastpeft'] / med['base']:.3f} | {med['peft'] / med['fastpeft']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
