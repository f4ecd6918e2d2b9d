"""The two C++ kernels of ``drop(x) A^T`` that routing op ``lora_down`` chooses between, side by side on every SIMD
path this CPU runs (``fastpeft._C.set_isa``): ``rows`` (blocks of four rows of x against A as stored, each rank a dot
product of vector-width partial sums) and ``transposed`` (A transposed once per call, one accumulator of ranks per
row, a block of rows sharing each vector of A^T).

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/bench_down_kernels.py
    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/bench_down_kernels.py --rows 1 16 512 --ks 2048 --ranks 16

Each line: medians over interleaved runs (rows, transposed, rows, ...) of ``_C.lora_xa`` on the same tensors, in
milliseconds, and rows / transposed (above 1: the transposed kernel is faster there). Which one a call takes is
measured per key where it runs; this table only shows where each wins on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from fastpeft import _C

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def interleaved_ms(fns, runs: int) -> list[float]:
    for fn in fns:  # warm-up
        fn()
    samples = [[] for _ in fns]
    for _ in range(runs):
        for fn, out in zip(fns, samples):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [statistics.median(s) * 1e3 for s in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 512])
    parser.add_argument("--ks", type=int, nargs="+", default=[576, 2048])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print("| isa | dtype | M | K | r | p | rows ms | transposed ms | rows / transposed |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    try:
        for isa in _C.supported_isas():
            _C.set_isa(isa)
            for dtype in args.dtypes:
                for M in args.rows:
                    for K in args.ks:
                        x = torch.randn(M, K, generator=gen).to(DTYPES[dtype])
                        for r in args.ranks:
                            A = torch.randn(r, K, generator=gen)
                            for p in args.dropouts:
                                rows, transposed = interleaved_ms(
                                    [partial(_C.lora_xa, x, A, p, 1, False), partial(_C.lora_xa, x, A, p, 1, True)],
                                    args.runs)
                                print(f"| {isa} | {dtype} | {M} | {K} | {r} | {p} | {rows:.4f} | {transposed:.4f} | "
                                      f"{rows / transposed:.2f} |", flush=True)
    finally:
        _C.set_isa("auto")


if __name__ == "__main__":
    main()
