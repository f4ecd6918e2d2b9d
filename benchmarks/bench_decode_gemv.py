"""The decoding GEMV over weights that come from memory, as in a decode step: fastpeft's C++ GEMV (with and without
the adapter term) against torch's ``F.linear``, one token, a model's worth of distinct layers called in turn.

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/bench_decode_gemv.py
    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/bench_decode_gemv.py --shape 576 576 --layers 400 --dtype fp32

``--layers`` distinct ``(N, K)`` weights (default 200 of 1536 x 576, 354 MB in bf16: more than the caches hold) are
multiplied by one row of ``x`` in turn; each provider runs over all of them once per round, rounds interleaved
(``side_by_side.interleaved_medians``, one warm-up round); medians of ``--rounds`` in microseconds per layer, and the
bytes of the weight over that time.

- ``torch``: ``F.linear(x, W)``;
- ``gemv <hint>``: ``_C.dense_lora_gemv`` with no adapter (fastpeft's decoding GEMV, fp32 sums, one rounding), rows
  ahead requested with each of ``--prefetch``'s hints (the choices of ``gemv_prefetch``: ``nta``, ``l2``, ``none``);
- ``gemv+lora <hint>``: ``_C.dense_lora_gemv`` with a rank-16 fp32 adapter (PEFT's adapter dtype) and ``A`` given,
  ``x A^T`` computed in the same call, as a settled ``gemv`` decode call makes it.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import torch

from fastpeft.backends import cpu as cpu_backend

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from side_by_side import interleaved_medians  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PREFETCH = {"nta": 1, "l2": 2, "none": 0}  # dense_lora_gemv's prefetch argument per gemv_prefetch route


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[1536, 576], metavar=("N", "K"))
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefetch", nargs="+", choices=list(PREFETCH), default=list(PREFETCH))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ext = cpu_backend._C
    if ext is None:
        raise SystemExit("fastpeft._C is not built")
    (N, K), dtype = args.shape, DTYPES[args.dtype]
    weights = [torch.randn(N, K, dtype=dtype) for _ in range(args.layers)]
    downs = [torch.randn(args.rank, K) for _ in range(args.layers)]
    ups = [torch.randn(N, args.rank) for _ in range(args.layers)]
    x = torch.randn(1, K, dtype=dtype)

    def torch_linear():
        for W in weights:
            torch.nn.functional.linear(x, W)

    def gemv(mode):
        for W in weights:
            ext.dense_lora_gemv(x, W, None, None, None, 1.0, None, mode)

    def gemv_lora(mode):
        for W, A, B in zip(weights, downs, ups):
            ext.dense_lora_gemv(x, W, None, None, B, 2.0, A, mode)

    providers = {"torch": torch_linear}
    for name in args.prefetch:
        providers[f"gemv {name}"] = partial(gemv, PREFETCH[name])
        providers[f"gemv+lora {name}"] = partial(gemv_lora, PREFETCH[name])
    with torch.inference_mode():
        medians = interleaved_medians(providers, lambda run: run(), args.rounds, warmup=1)
    size = N * K * weights[0].element_size()
    print(f"{args.layers} layers of {N} x {K} {args.dtype} ({size / 1e6:.2f} MB each), {torch.get_num_threads()} "
          f"threads, ISA {ext.isa()}")
    print("| provider | us per layer | GB/s of weight |")
    print("| --- | --- | --- |")
    for name, ms in medians.items():
        us = ms * 1e3 / args.layers
        print(f"| {name} | {us:.1f} | {size / (us * 1e-6) / 1e9:.1f} |")


if __name__ == "__main__":
    main()
