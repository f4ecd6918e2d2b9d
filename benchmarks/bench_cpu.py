"""CPU LoRA: frozen nn.Linear vs PEFT vs the fastpeft ``cpu`` backend, side by side in one process.

    .venv/bin/python benchmarks/bench_cpu.py                       # the default grid (2 threads, 2048x2048, r=16)
    .venv/bin/python benchmarks/bench_cpu.py --M 512 --dtypes fp32 --reps 7 --csv bench-out/cpu.csv

Providers: ``base`` (frozen nn.Linear), ``peft`` (peft.get_peft_model LoRA over it), ``fastpeft`` (the same
adapter weights through ``fastpeft.backends.cpu`` wrapped in a small autograd.Function, so the numbers measure the
backend, independent of the module layer). Modes: ``fwd`` (train mode under no_grad, so dropout is live) and
``fwd+bwd`` (x and the adapter weights require grad; the base weight is frozen). Runs are interleaved
(base, peft, fastpeft, base, ...) after a warm-up, and medians are reported with the ratios to ``base``.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time

import torch

from fastpeft.backends.cpu import BACKEND


class CpuLoRA(torch.autograd.Function):
    """One adapter through the cpu backend; saves x, A, B, W and xa (M x r), never drop(x)."""

    @staticmethod
    def forward(ctx, x, A, B, weight, bias, scaling, p):
        seed = int(torch.randint(0, 2**31 - 1, ())) if p > 0 else 0
        y, xa = BACKEND.lora_forward(x, weight, bias, [A], [B], [None], [scaling], [p], [seed])
        ctx.save_for_backward(x, A, B, weight, xa[0])
        ctx.meta = (scaling, p, seed)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, A, B, W, xa = ctx.saved_tensors
        s, p, seed = ctx.meta
        dx, dA, dB, _ = BACKEND.lora_backward(
            gy, x, W, [A], [B], [xa], [s], [p], [seed], ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        return dx, dA[0], dB[0], None, None, None, None


class FastLoRA(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, A: torch.Tensor, B: torch.Tensor, scaling: float, p: float):
        super().__init__()
        self.base = base
        self.A = torch.nn.Parameter(A.detach().clone())
        self.B = torch.nn.Parameter(B.detach().clone())
        self.scaling, self.p = scaling, p

    def forward(self, x):
        p = self.p if self.training else 0.0
        return CpuLoRA.apply(x, self.A, self.B, self.base.weight, self.base.bias, self.scaling, p)


def build(K, N, r, dtype, p):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential()
    base.add_module("lin", torch.nn.Linear(K, N, dtype=dtype))
    base.requires_grad_(False)
    peft_model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(K, N, dtype=dtype)),
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], lora_dropout=p),
    )
    layer = peft_model.base_model.model[0]
    layer.base_layer.weight.data.copy_(base.lin.weight)
    layer.base_layer.bias.data.copy_(base.lin.bias)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)  # PEFT starts B at 0; make the update real
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    fast = FastLoRA(base.lin, A, B, layer.scaling["default"], p)
    for m in (base, peft_model, fast):
        m.train()
    return {"base": base, "peft": peft_model, "fastpeft": fast}


CLOCK = time.perf_counter


def time_once(model, x, gy, mode):
    t0 = CLOCK()
    if mode == "fwd":
        with torch.no_grad():
            model(x)
    else:
        x.grad = None
        model(x).backward(gy)
    return CLOCK() - t0


def run(M, K, N, r, dtype, p, mode, reps, warmup):
    models = build(K, N, r, dtype, p)
    x = torch.randn(M, K, dtype=dtype, requires_grad=(mode != "fwd"))
    gy = torch.randn(M, N, dtype=dtype)
    times = {name: [] for name in models}
    for _ in range(warmup):
        for model in models.values():
            time_once(model, x, gy, mode)
    for _ in range(reps):
        for name, model in models.items():  # interleaved: drift and other load hit every provider alike
            times[name].append(time_once(model, x, gy, mode))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--M", type=int, nargs="+", default=[1, 16, 512, 2048])
    ap.add_argument("--K", type=int, default=2048)
    ap.add_argument("--N", type=int, default=2048)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32", "fp16"])
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--reps", type=int, default=0, help="timed runs per provider (0: by shape, 5-30)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--csv", default="", help="append rows to this CSV file")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="wall: perf_counter; cpu: process CPU time of all threads (steadier on a shared machine, "
                    "but counts OpenMP spin-waiting)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time

    torch.set_num_threads(args.threads)
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
    print(f"# torch {torch.__version__}, {args.threads} threads, cpu isa {BACKEND.isa()}, K={args.K} N={args.N} "
          f"r={args.r}, clock={args.clock}")
    print(f"{'dtype':5} {'p':>4} {'mode':8} {'M':>5} {'base ms':>9} {'peft ms':>9} {'fast ms':>9} "
          f"{'peft/base':>9} {'fast/base':>9} {'peft/fast':>9}")
    rows = []
    for dname in args.dtypes:
        for p in args.dropout:
            for mode in args.modes:
                for M in args.M:
                    reps = args.reps or max(5, min(30, int(4e9 / (M * args.K * args.N * (3 if mode != "fwd" else 1)))))
                    t = run(M, args.K, args.N, args.r, dtypes[dname], p, mode, reps, warmup=2)
                    row = dict(clock=args.clock, dtype=dname, dropout=p, mode=mode, M=M, K=args.K, N=args.N, r=args.r,
                               threads=args.threads, reps=reps, base_ms=t["base"] * 1e3, peft_ms=t["peft"] * 1e3,
                               fastpeft_ms=t["fastpeft"] * 1e3)
                    rows.append(row)
                    print(f"{dname:5} {p:4.2f} {mode:8} {M:5d} {row['base_ms']:9.3f} {row['peft_ms']:9.3f} "
                          f"{row['fastpeft_ms']:9.3f} {t['peft'] / t['base']:9.3f} {t['fastpeft'] / t['base']:9.3f} "
                          f"{t['peft'] / t['fastpeft']:9.3f}", flush=True)
    if args.csv:
        os.makedirs(os.path.dirname(args.csv) or ".", exist_ok=True)
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
