"""bf16 x bf16 products with fp32 results: fastpeft's ``_C.widened_mm`` / ``widened_mm_nn`` against torch.

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/bench_widened_mm.py
    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/bench_widened_mm.py --M 1 16 512 --N 2048 --K 2048 --rounds 15

For ``a`` ``(M, K)`` and a weight ``W`` ``(N, K)``, both bf16, four ways to get ``a W^T`` (forward) and ``a W``
(``a`` ``(M, N)``, a backward's ``dY W``):

- ``pairs``: ``_C.widened_mm`` (``a W^T``; "a rearranged": ``interleave_a=True``) and ``_C.widened_mm_nn``
  (``a W``): every product exact, fp32 sums, fp32 result (oneDNN's bf16 block kernel);
- ``torch bf16``: ``torch.mm`` in bf16 (a bf16 result: rounded, not the same numbers);
- ``torch fp32``: ``torch.mm`` on fp32 copies made beforehand (the copies not timed): the fp32 GEMM PEFT runs when
  its fp32 adapters meet a bf16 base, and what ``pairs`` equals up to the order of the sums.

Runs are interleaved (one of each per round) after a warm-up; the table gives medians in microseconds.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from side_by_side import interleaved_medians  # noqa: E402


def _calls(ext, x, dy, W, W32) -> dict:
    """The seven timed calls for one ``M`` (the fp32 copies of ``x`` and ``dY`` made here, outside the timing)."""
    x32, dy32 = x.float(), dy.float()
    return {
        "nt pairs": lambda: ext.widened_mm(x, W),
        "nt pairs x": lambda: ext.widened_mm(x, W, True),
        "nt bf16": lambda: torch.mm(x, W.t()),
        "nt fp32": lambda: torch.mm(x32, W32.t()),
        "nn pairs": lambda: ext.widened_mm_nn(dy, W),
        "nn bf16": lambda: torch.mm(dy, W),
        "nn fp32": lambda: torch.mm(dy32, W32),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--M", type=int, nargs="+", default=[1, 16, 64, 512])
    parser.add_argument("--N", type=int, default=2048)
    parser.add_argument("--K", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from fastpeft import _C

    if not _C.widened_mm_available():
        raise SystemExit("fastpeft._C.widened_mm does not run on this CPU (oneDNN has no bf16 block kernel for it)")
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(args.N, args.K, generator=gen).to(torch.bfloat16)
    W32 = W.float()
    print(f"{args.threads} threads, N={args.N}, K={args.K}; medians of {args.rounds} interleaved rounds, microseconds")
    print("| M | a W^T pairs | a W^T pairs, a rearranged | a W^T torch bf16 | a W^T torch fp32 | a W pairs "
          "| a W torch bf16 | a W torch fp32 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for M in args.M:
        x = torch.randn(M, args.K, generator=gen).to(torch.bfloat16)
        dy = torch.randn(M, args.N, generator=gen).to(torch.bfloat16)
        medians_ms = interleaved_medians(_calls(_C, x, dy, W, W32), lambda call: call(), args.rounds, warmup=1)
        cells = " | ".join(f"{ms * 1e3:.0f}" for ms in medians_ms.values())
        print(f"| {M} | {cells} |")


if __name__ == "__main__":
    main()
