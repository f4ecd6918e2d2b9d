"""What one adapted layer call costs at decode sizes, where the arithmetic is microseconds and the per-call Python
and dispatch decide: the frozen layer alone, PEFT's LoRA layer and fastpeft's, one token, eval mode, no grad.

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/bench_call_cost.py
    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/bench_call_cost.py --shapes 64x64 576x192 --dtypes fp32

Shapes are ``in x out``: 64x64 (arithmetic ~nothing: the call's fixed cost), and a SmolLM2-135M projection set
(576x576 q/o, 576x192 k/v, 576x1536 gate/up, 1536x576 down). LoRA r=16, fp32 adapters (PEFT's default), no bias on
the projections. Each cell is the median of ``--rounds`` rounds, each round timing ``--calls`` calls of one layer,
the three layers interleaved round by round.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from side_by_side import interleaved_medians  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def layers(in_features: int, out_features: int, dtype: torch.dtype) -> dict:
    """``{"frozen": nn.Linear, "peft": PEFT's lora.Linear, "fastpeft": its fused twin}``, same weights."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    import fastpeft

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(in_features, out_features, bias=False)

        def forward(self, x):
            return self.proj(x)

    out = {}
    for provider in ("peft", "fastpeft"):
        torch.manual_seed(0)
        model = get_peft_model(One().to(dtype), LoraConfig(r=16, lora_alpha=32, target_modules=["proj"],
                                                           init_lora_weights=False)).eval()
        if provider == "fastpeft":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fastpeft.accelerate(model, strict=True)
        out[provider] = model.base_model.model.proj
    out = {"frozen": out["peft"].base_layer, **out}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["64x64", "576x576", "576x192", "576x1536", "1536x576"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"one token, eval, no grad, LoRA r=16 fp32 adapters, {args.threads} threads, torch {torch.__version__}; "
          f"microseconds per call, medians of {args.rounds} interleaved rounds of {args.calls} calls")
    print("| dtype | in x out | frozen us | peft us | fastpeft us | peft - frozen | fastpeft - frozen |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for shape in args.shapes:
            in_features, out_features = (int(v) for v in shape.split("x"))
            x = torch.randn(1, 1, in_features, dtype=dtype)

            def run(layer, x=x, calls=args.calls):
                for _ in range(calls):
                    layer(x)

            with torch.no_grad():
                ms = interleaved_medians(layers(in_features, out_features, dtype), run, args.rounds)
            us = {name: value * 1e3 / args.calls for name, value in ms.items()}
            print(f"| {dtype_name} | {shape} | {us['frozen']:.1f} | {us['peft']:.1f} | {us['fastpeft']:.1f} | "
                  f"{us['peft'] - us['frozen']:+.1f} | {us['fastpeft'] - us['frozen']:+.1f} |", flush=True)


if __name__ == "__main__":
    main()
