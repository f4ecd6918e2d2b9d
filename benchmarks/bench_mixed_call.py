"""One mixed-adapter layer call at decode size, with warm caches and with caches as a decode step leaves them.

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/bench_mixed_call.py
    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/bench_mixed_call.py --dtypes fp32 --rows 8 --adapters 16

A fused LoRA layer (``fastpeft.bench``'s ``lora-mixed`` case: 2048 x 2048, r=16, fp32 adapters, sequence ``i``
using adapter ``i % adapters``) is called with ``adapter_names`` on ``rows`` sequences of one token, the route
``fused`` (the C++ pass) pinned. The base product is replaced by a copy of its result (the base layer's forward,
hooked so that the call runs it instead of fastpeft's base product), so only the adapter terms' work is timed:

- ``C``: the whole call (Python and ``_C.lora_mixed_``);
- ``noC``: the same with ``_C.lora_mixed_`` replaced by a no-op (the Python alone);
- ``pass``: ``_C.lora_mixed_`` alone, called directly on ``rows`` rows each with its own adapter;
- ``warm``: back-to-back calls; ``cold``: each call after writing a 64 MiB buffer, which evicts the caches as a
  decode step's base products do (every layer streams its weight).

Medians of ``--calls`` calls, in microseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastpeft
from fastpeft import mixed, routing
from fastpeft.bench import cases


class _NoMixedPass:
    """``fastpeft._C`` with ``lora_mixed_`` a no-op."""

    def __init__(self, ext):
        self._ext = ext

    def __getattr__(self, name):
        return (lambda *args: None) if name == "lora_mixed_" else getattr(self._ext, name)


def _median_us(fn, calls: int, flush) -> float:
    times = []
    for _ in range(calls):
        if flush is not None:
            flush.add_(1.0)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def measure(dtype: str, rows: int, adapters: int, calls: int) -> dict:
    case = cases.Case(kind="lora-mixed", shape="2048", K=2048, N=2048, M=rows, dtype=dtype, dropout=0.0,
                      mode="infer", adapters=adapters)
    x, dy = cases.make_inputs(case, torch.device("cpu"))
    built = cases.build(case, "fastpeft", torch.device("cpu"), x)
    prepare, run = cases.make_runner(built, "infer", x, dy, case.adapter_names())
    base = next(m for m in built.module.modules() if type(m) is torch.nn.Linear)
    y = base(x)
    base.forward = lambda inp: y.clone()
    base.register_forward_hook(lambda *args: None)  # a hooked base runs its own forward (the copy), not fastpeft's
    flush = torch.empty(64 * 2**20 // 4)
    ext = fastpeft._C
    extension = mixed._extension  # where the fused route finds fastpeft._C
    routing.set_route("lora_mixed_forward", "fused")
    result = {}
    try:
        prepare()
        run()
        for label, module in (("C", ext), ("noC", _NoMixedPass(ext))):
            mixed._extension = lambda module=module: module
            for cold in (False, True):
                result[f"{label} {'cold' if cold else 'warm'}"] = _median_us(run, calls, flush if cold else None)
    finally:
        mixed._extension = extension
        routing.set_route("lora_mixed_forward", None)
    n = min(rows, adapters)
    A = [torch.randn(16, 2048) for _ in range(n)]
    B = [torch.randn(2048, 16) for _ in range(n)]
    runs = torch.tensor([[m, m + 1, m % n] for m in range(rows)], dtype=torch.int64)
    ys = torch.randn(rows, 2048).to(x.dtype)
    xs = x.reshape(rows, 2048)
    one_pass = lambda: ext.lora_mixed_(ys, xs, runs, A, B, [None] * n, [1.0] * n)  # noqa: E731
    for cold in (False, True):
        result[f"pass {'cold' if cold else 'warm'}"] = _median_us(one_pass, calls, flush if cold else None)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    columns = ["C warm", "C cold", "noC warm", "noC cold", "pass warm", "pass cold"]
    print("| dtype | " + " | ".join(columns) + " |")
    print("| --- " * (len(columns) + 1) + "|")
    for dtype in args.dtypes:
        r = measure(dtype, args.rows, args.adapters, args.calls)
        print(f"| {dtype} | " + " | ".join(f"{r[c]:.0f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
