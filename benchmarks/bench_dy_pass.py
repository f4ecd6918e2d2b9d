"""The backward's dY pass (``_C.lora_dy_pass``: ``g = s dY B``, ``dB``) timed across shapes by each of its two
kernels (the routes of op ``lora_dy``: ``rows``, and ``outer`` where the rank is one or two SIMD vectors), optionally
against another build of the extension loaded into the same process.

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/bench_dy_pass.py
    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/bench_dy_pass.py --isa avx2 \
        --against /tmp/old/fastpeft/_C.cpython-311-x86_64-linux-gnu.so

Each row gives the medians in microseconds of every kernel (interleaved calls on the same tensors), ``outer / rows``
and the largest relative difference between the kernels' outputs. ``--against`` takes the ``_C`` shared object of
another checkout (built there with ``python setup.py build_ext --inplace``) whose ``lora_dy_pass`` has this one's
arguments: its kernels are timed in the same rounds, so a kernel change is timed without a second process or a host
drift between two runs. ``--isa`` forces a SIMD path in both builds.
"""

from __future__ import annotations

import argparse
import functools
import importlib.machinery
import importlib.util
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from side_by_side import interleaved_medians  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = ["1x2048", "16x2048", "64x2048", "512x2048", "512x576", "512x1536", "512x192"]
WARMUP_ROUNDS = 4


def load_build(path: str):
    """The extension module in ``path`` (a ``_C`` shared object), loaded under its own name beside fastpeft's."""
    loader = importlib.machinery.ExtensionFileLoader("_C", path)
    spec = importlib.util.spec_from_loader("_C", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def add_build_options(parser: argparse.ArgumentParser, rounds: int) -> None:
    """The options of a script that times a pass of ``_C``: rank, rounds, threads, SIMD path, another build."""
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--isa", default="auto", help="avx512, avx2, generic or auto (both builds)")
    parser.add_argument("--against", help="another build's _C shared object to time beside this one")


def open_builds(args) -> dict:
    """``{"this build": _C}``, after ``{"other build": ...}`` with ``--against``; each on the SIMD path ``--isa``
    (give it back with ``set_isa("auto")``), torch on ``--threads`` threads."""
    from fastpeft import _C

    torch.set_num_threads(args.threads)
    builds = {"this build": _C}
    if args.against:
        builds = {"other build": load_build(args.against), "this build": _C}
    for module in builds.values():
        module.set_isa(args.isa)
    return builds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="M x N of dY")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    add_build_options(parser, rounds=36)
    args = parser.parse_args(argv)
    from fastpeft import _C

    builds = open_builds(args)
    outer = _C.dy_outer_takes(args.r)
    print(f"{args.threads} threads, r={args.r}, SIMD path {_C.isa()}, outer-product kernel for this rank: {outer}; "
          f"medians of {args.rounds} interleaved rounds after {WARMUP_ROUNDS} warm-up rounds, us")
    kernels = ("rows", "outer") if outer else ("rows",)
    names = [f"{build}: {kernel}" if args.against else kernel for build in builds for kernel in kernels]
    extra = " | outer / rows | max rel diff |" if outer else " |"
    print("| dtype | M x N | " + " | ".join(names) + extra)
    print("| --- | --- |" + " --- |" * (len(names) + (2 if outer else 0)))
    gen = torch.Generator().manual_seed(0)
    for dtype, shape in itertools.product(args.dtypes, args.shapes):
        M, N = (int(v) for v in shape.lower().split("x"))
        dy = torch.randn(M, N, generator=gen).to(DTYPES[dtype])
        B = torch.randn(N, args.r, generator=gen)
        xa, svec = torch.randn(M, args.r, generator=gen), torch.rand(args.r, generator=gen)
        operands = (dy, [B], xa, svec, True, False)
        calls = {name: functools.partial(module.lora_dy_pass, *operands, kernel == "outer")
                 for name, (module, kernel) in zip(names, itertools.product(builds.values(), kernels))}
        medians_ms = interleaved_medians(calls, lambda call: call(), args.rounds, warmup=WARMUP_ROUNDS)
        got = {name: ms * 1e3 for name, ms in medians_ms.items()}
        row = f"| {dtype} | {M} x {N} | " + " | ".join(f"{got[n]:.1f}" for n in names)
        if outer:
            rows_name, outer_name = names[-2], names[-1]  # this build's kernels
            outs = {name: calls[name]() for name in (rows_name, outer_name)}
            diff = max(((outs[outer_name][i] - outs[rows_name][i]).abs().max()
                        / outs[rows_name][i].abs().max().clamp_min(1e-30)).item() for i in range(2))
            row += f" | {got[outer_name] / got[rows_name]:.2f} | {diff:.1e}"
        print(row + " |", flush=True)
    for module in builds.values():
        module.set_isa("auto")


if __name__ == "__main__":
    main()
