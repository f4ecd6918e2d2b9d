"""The CPU extension's adapter passes timed one by one, for each activation dtype, optionally against another build
of the extension loaded into the same process.

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/bench_passes.py
    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/bench_passes.py --dtypes fp16 --isa avx2 \
        --against /tmp/old/fastpeft/_C.cpython-311-x86_64-linux-gnu.so

The passes (``x`` and ``dY`` ``(M, K)`` rows of the dtype, fp32 adapters of rank ``--r``, dropout 0.1 where named):

- ``dx expand``: ``dX += g A`` (``_C.lora_dx_pass`` without ``x``); ``dA strips``: ``dA = g^T x`` (without ``dX``);
  ``masked both``: both with dropout, the mask drawn once per strip;
- ``dy outer`` / ``dy rows``: ``g = s dY B`` and ``dB`` (``_C.lora_dy_pass``, each kernel);
- ``xa rows``: ``drop(x) A^T`` (``_C.lora_xa``); ``epilogue``: ``y += h B^T`` in place (``_C.lora_epilogue_``).

Each row gives the medians in microseconds (interleaved calls on the same tensors). ``--against`` takes the ``_C``
shared object of another checkout (built there with ``python setup.py build_ext --inplace``) with the same
functions: both builds are timed in the same rounds, and the last column says whether every output of the two
builds has the same bits (a change of code generation must not change them). ``--isa`` forces a SIMD path in both.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dy_pass import DTYPES, add_build_options, open_builds  # noqa: E402
from side_by_side import interleaved_medians  # noqa: E402

PASSES = ("dx expand", "dA strips", "masked both", "dy outer", "dy rows", "xa rows", "epilogue")
WARMUP_ROUNDS = 4


def _outputs(tensors) -> list:
    """The tensors a pass returned, without the empty places of outputs it was not asked for."""
    return [t for t in tensors if t is not None and t.numel()]


def pass_calls(module, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, g: torch.Tensor) -> dict:
    """``{pass: fn(dst)}``: each pass of ``module`` (a ``_C`` build) on ``x`` (M, K), ``A`` (r, K), ``B`` (K, r) and
    ``g`` (M, r); ``dst`` is the (M, K) tensor updated in place where the pass has one. Each returns its outputs."""
    r = A.shape[0]
    svec = torch.full((r,), 2.0)
    Bt = B.t().contiguous()

    def both(dst):
        return [module.lora_dx_pass(dst, x, A, g, 0.1, 7)]

    calls = {
        "dx expand": lambda dst: [module.lora_dx_pass(dst, None, A, g, 0.0, 0)],
        "dA strips": lambda dst: [module.lora_dx_pass(None, x, A, g, 0.0, 0)],
        "masked both": both,
        "dy rows": lambda dst: _outputs(module.lora_dy_pass(x, [B], g, svec, True, False, False)),
        "xa rows": lambda dst: [module.lora_xa(x, A, 0.1, 3)],
        "epilogue": lambda dst: [module.lora_epilogue_(dst, g, Bt, None)],
    }
    if module.dy_outer_takes(r):
        calls["dy outer"] = lambda dst: _outputs(module.lora_dy_pass(x, [B], g, svec, True, False, True))
    return {name: calls[name] for name in PASSES if name in calls}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="512x2048", help="M x K of x")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "fp16"], choices=sorted(DTYPES))
    add_build_options(parser, rounds=31)
    args = parser.parse_args(argv)
    from fastpeft import _C

    builds = open_builds(args)
    M, K = (int(v) for v in args.shape.lower().split("x"))
    print(f"{args.threads} threads, {M} x {K}, r={args.r}, SIMD path {_C.isa()}; medians of {args.rounds} "
          f"interleaved rounds after {WARMUP_ROUNDS} warm-up rounds, us")
    names = list(builds)
    print("| dtype | pass | " + " | ".join(names) + (" | this / other | same bits |" if args.against else " |"))
    print("| --- | --- |" + " --- |" * (len(names) + (2 if args.against else 0)))
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(args.r, K, generator=gen) * 0.02
    B = torch.randn(K, args.r, generator=gen) * 0.02
    g = torch.randn(M, args.r, generator=gen)
    try:
        for dtype in args.dtypes:
            x = torch.randn(M, K, generator=gen).to(DTYPES[dtype])
            dst = torch.randn(M, K, generator=gen).to(DTYPES[dtype])
            per_build = {name: pass_calls(module, x, A, B, g) for name, module in builds.items()}
            for pass_name in per_build[names[-1]]:
                if any(pass_name not in calls for calls in per_build.values()):
                    continue
                targets = {name: dst.clone() for name in names}
                calls = {name: functools.partial(per_build[name][pass_name], targets[name]) for name in names}
                got = {name: ms * 1e3 for name, ms in
                       interleaved_medians(calls, lambda call: call(), args.rounds, warmup=WARMUP_ROUNDS).items()}
                row = f"| {dtype} | {pass_name} | " + " | ".join(f"{got[n]:.1f}" for n in names)
                if args.against:
                    outs = {}
                    for name in names:  # one call on a fresh copy each, so in-place passes start alike
                        fresh = dst.clone()
                        outs[name] = [fresh] + _outputs(per_build[name][pass_name](fresh))
                    same = all(torch.equal(_bits(a), _bits(b)) for a, b in zip(*outs.values()))
                    row += f" | {got[names[1]] / got[names[0]]:.2f} | {'yes' if same else 'NO'}"
                print(row + " |", flush=True)
    finally:
        for module in builds.values():
            module.set_isa("auto")


if __name__ == "__main__":
    main()
