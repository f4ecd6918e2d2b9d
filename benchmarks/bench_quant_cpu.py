"""QLoRA on the CPU, side by side in one process: the frozen bitsandbytes layer, PEFT's LoRA over it, and
``fastpeft.patch`` over it (interleaved rounds, medians, warm-up first).

    .venv/bin/python benchmarks/bench_quant_cpu.py                       # nf4, 512x2048x2048, r=16, 2 threads
    .venv/bin/python benchmarks/bench_quant_cpu.py --kinds nf4 fp4 int8 --M 1 16 512 --dtypes fp32 bf16

Modes:
  ``infer``    eval mode under ``torch.no_grad()``: what serving runs. bitsandbytes repacks its 4-bit weight on the
               first such call and then runs its own CPU kernels (its 4-bit GEMV at M=1); PEFT adds its adapter.
  ``fwd``      training-mode forward with autograd recording (``x`` requires grad, dropout live).
  ``fwd+bwd``  adds the backward.
Each provider gets its own bitsandbytes layer built from the same seed (bitsandbytes repacks weights in place, so
they are never shared). ``base`` is the bitsandbytes layer alone, always under its own code.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
from torch import nn

# The shared timing loop sits beside this script; named explicitly so the script also runs under PYTHONSAFEPATH.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from side_by_side import interleaved_medians  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def quantized_base(kind: str, K: int, N: int, dtype: torch.dtype, nested: bool) -> nn.Module:
    """``nn.Sequential`` holding one quantized bitsandbytes linear with seeded weights."""
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) * K ** -0.5
    if kind == "int8":
        lin = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False)
        lin.weight = bnb.nn.Int8Params(w.half(), requires_grad=False, has_fp16_weights=False)
    else:
        lin = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dtype, compress_statistics=nested, quant_type=kind)
        lin.weight = bnb.nn.Params4bit(w.to(dtype), requires_grad=False, compress_statistics=nested,
                                       quant_type=kind, blocksize=64)
    model = nn.Sequential(lin.to("cpu"))
    if kind == "int8":
        model.is_loaded_in_8bit = True
    else:
        model.is_loaded_in_4bit = True
    return model


def build(kind, K, N, r, dtype, p, nested):
    from peft import LoraConfig, get_peft_model

    import fastpeft

    config = dict(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["0"], init_lora_weights=False)
    torch.manual_seed(1)
    peft_model = get_peft_model(quantized_base(kind, K, N, dtype, nested), LoraConfig(**config))
    torch.manual_seed(1)
    fast_model = fastpeft.patch(quantized_base(kind, K, N, dtype, nested), **config)
    return {"base": quantized_base(kind, K, N, dtype, nested), "peft": peft_model, "fastpeft": fast_model}


def step(model, x, mode):
    if mode == "infer":
        with torch.no_grad():
            return model(x)
    y = model(x)
    if mode == "fwd+bwd":
        y.float().sum().backward()
    return y


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", nargs="+", default=["nf4"], choices=["nf4", "fp4", "int8"])
    ap.add_argument("--nested", type=int, default=1, help="double quantization of the 4-bit absmax (default 1)")
    ap.add_argument("--M", type=int, nargs="+", default=[1, 16, 512])
    ap.add_argument("--K", type=int, default=2048)
    ap.add_argument("--N", type=int, default=2048)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.0])
    ap.add_argument("--modes", nargs="+", default=["infer", "fwd", "fwd+bwd"])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    import fastpeft

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fastpeft cpu: "
          f"{fastpeft.backend_info()['cpu']}")
    print("| kind | dtype | dropout | mode | M | bnb base ms | peft ms | fastpeft ms | peft/base | fastpeft/base "
          "| fastpeft vs peft |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind in args.kinds:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            for p in args.dropout:
                models = build(kind, args.K, args.N, args.r, dtype, p, bool(args.nested))
                for mode in args.modes:
                    for model in models.values():
                        model.train(mode != "infer")
                    for M in args.M:
                        x = torch.randn(M, args.K, dtype=dtype, requires_grad=mode != "infer")
                        # warm-up includes bitsandbytes' one-time CPU repack in infer mode
                        run = lambda model, x=x, mode=mode: step(model, x, mode)  # noqa: E731
                        med = interleaved_medians(models, run, args.rounds)
                        print(f"| {kind} | {dtype_name} | {p} | {mode} | {M} | {med['base']:.3f} | "
                              f"{med['peft']:.3f} | {med['fastpeft']:.3f} | {med['peft'] / med['base']:.3f} | "
                              f"{med['fastpeft'] / med['base']:.3f} | {med['peft'] / med['fastpeft']:.2f}x |",
                              flush=True)


if __name__ == "__main__":
    main()
