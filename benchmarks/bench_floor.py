"""The least an adapter outside the vendor GEMM can cost on this machine, next to what fastpeft's costs.

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/bench_floor.py
    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/bench_floor.py --dtypes fp32 bf16 --kinds lora dora dora-dropout \
        --M 512 --N 2048 --K 2048 --rounds 21

With the vendor GEMM doing a layer's base products (``y = x W^T`` forward, ``dX = dY W`` backward), a rank-r
adapter's forward+backward still has to move some whole tensors through memory outside those GEMMs, whatever
kernels do the arithmetic:

- LoRA (dropout 0): read ``x`` for ``x A^T``; read and write ``y`` for the update; read ``dY`` for ``g = dY B`` and
  ``dB``; read ``x`` for ``dA = g^T x``; read and write ``dX`` for ``dX += g A``.
- DoRA (dropout 0), besides: read ``W`` for the weight norm's cross term ``W A^T``; read the unscaled output for
  the magnitude's gradient; write the column-scaled ``dY`` that the backward's GEMM multiplies.
- DoRA with dropout (PEFT's meaning: a second base product on the dropped input): a third and a fourth GEMM (the
  dropped input's product and its backward), the dropped input written, the second product's output read in the
  forward and its gradient read in the backward, ``W`` and the scaled ``dY`` as above. The floor runs the second
  product in ``x``'s dtype, which is cheaper than PEFT's fp32 product where the layer is bf16: a lower bound.

Each provider runs one forward+backward of a ``(M, K) -> (M, N)`` layer per round, interleaved:

- ``frozen``: the frozen ``nn.Linear`` with autograd (the bench's ``base`` provider);
- ``floor``: the same GEMMs by hand, each whole-tensor move above done by the cheapest torch op that makes it
  (``sum`` for a read, ``mul_`` for a read and a write, ``mul`` for a read and a new tensor's write) at the point
  of the step where an adapter makes it; no adapter arithmetic, no Python layer, no autograd;
- ``floor onto`` (LoRA, DoRA): the same, with the update's output written first and the base GEMM accumulating
  onto it (``beta = 1``), so the update's read and write of ``y`` and ``dX`` become a write;
- ``fastpeft`` (and ``peft`` with ``--peft``): the bench's layers (``fastpeft.bench.cases``), routes measured first.

The faster floor and fastpeft are printed over ``frozen``. Where the floor over ``frozen`` exceeds a target ratio,
no adapter that leaves the base products to the vendor GEMM meets that target on this machine; where it does not,
the gap between the floor and ``fastpeft`` is what fastpeft leaves (its arithmetic among it: the floor does none).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from side_by_side import interleaved_times  # noqa: E402

from fastpeft.bench import cases  # noqa: E402
from fastpeft.bench.timing import summarize  # noqa: E402

# kind -> (the bench's case kind, dropout)
KINDS = {"lora": ("lora", 0.0), "dora": ("dora", 0.0), "dora-dropout": ("dora", 0.1)}
ONTO_KINDS = ("lora", "dora")


def floor_step(kind: str, x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor,
               onto: bool = False) -> Callable[[], tuple]:
    """One forward+backward of ``kind``'s least data movement around the base GEMMs (see the module docstring).
    ``onto``: the update's output written first (``zero_``) and the base GEMM accumulating onto it (``beta = 1``),
    which turns the update's read and write of ``y`` (LoRA) and of ``dX`` (LoRA, DoRA) into a write; not for
    ``dora-dropout``, whose second product's gradient is masked before it meets ``dX``.

    ``x`` (M, K), ``weight`` (N, K), ``dy`` (M, N), all of one dtype; nothing requires grad. The step returns
    ``(y, dX)`` (M, N) and (M, K): the frozen layer's output and input gradient (``dora-dropout``: each twice over,
    its "dropped" input being ``x`` itself), so a test can check that the floor runs the base products it claims."""
    wt = weight.t()
    M, N, K = x.shape[0], weight.shape[0], weight.shape[1]
    if kind == "lora" and onto:
        def step():
            x.sum()  # x A^T
            y = x.new_empty(M, N).zero_()  # s (x A^T) B^T
            y.addmm_(x, wt)
            dy.sum()  # g = s dY B, dB
            x.sum()  # dA = g^T x
            dx = x.new_empty(M, K).zero_()  # g A
            dx.addmm_(dy, weight)
            return y, dx
    elif kind == "lora":
        def step():
            x.sum()  # x A^T
            y = torch.mm(x, wt)
            y.mul_(1.0)  # y += s (x A^T) B^T
            dy.sum()  # g = s dY B, dB
            dx = torch.mm(dy, weight)
            x.sum()  # dA = g^T x
            dx.mul_(1.0)  # dX += g A
            return y, dx
    elif kind == "dora":
        def step():
            x.sum()  # x A^T
            weight.sum()  # the norm's cross term W A^T
            y = torch.mm(x, wt)
            y.mul_(1.0)  # y = c (y + s (x A^T) B^T)
            y.sum()  # the magnitude's gradient reads the unscaled output
            scaled_dy = dy.mul(1.0)  # c dY, and g, dB from it
            x.sum()  # dA
            if onto:
                dx = x.new_empty(M, K).zero_()  # g A
                dx.addmm_(scaled_dy, weight)
            else:
                dx = torch.mm(scaled_dy, weight)
                dx.mul_(1.0)  # dX += g A
            return y, dx
    elif kind == "dora-dropout":
        def step():
            dropped = x.mul(1.0)  # drop(x), and drop(x) A^T from it
            weight.sum()  # W A^T
            y = torch.mm(x, wt)
            second = torch.mm(dropped, wt)  # drop(x) W^T
            y.add_(second)  # y += (c - 1) drop(x) W^T + c s (drop(x) A^T) B^T
            second.sum()  # the magnitude's gradient
            scaled_dy = dy.mul(1.0)  # (c - 1) dY, g, dB
            dx = torch.mm(dy, weight)
            dx_dropped = torch.mm(scaled_dy, weight)
            x.sum()  # dA, the mask drawn again
            dx.add_(dx_dropped)  # dX += mask ((c - 1) dY W + g A)
            return y, dx
    else:
        raise ValueError(f"bench_floor: unknown kind {kind!r}; known: {sorted(KINDS)}")
    if onto and kind not in ONTO_KINDS:
        raise ValueError(f"bench_floor: no 'onto' floor for {kind!r}; it has one for {sorted(ONTO_KINDS)}")
    return step


def measure(kind: str, dtype: str, M: int, N: int, K: int, r: int, rounds: int, peft: bool) -> dict:
    """Timings (``summarize``) of ``frozen``, ``floor``, ``floor onto`` (``ONTO_KINDS``), ``fastpeft`` (and
    ``peft``) for one point."""
    case_kind, dropout = KINDS[kind]
    case = cases.Case(case_kind, f"{K}x{N}", K, N, M, dtype, dropout, "fwd+bwd", r)
    device = torch.device("cpu")
    x, dy = cases.make_inputs(case, device)
    runners = {}
    frozen = cases.build(case, "base", device, x)
    runners["frozen"] = cases.make_runner(frozen, "fwd+bwd", x, dy)
    weight = frozen.module.weight.detach()
    runners["floor"] = (lambda: None, floor_step(kind, x.detach(), weight, dy))
    if kind in ONTO_KINDS:
        runners["floor onto"] = (lambda: None, floor_step(kind, x.detach(), weight, dy, onto=True))
    for provider in ["fastpeft"] + (["peft"] if peft else []):
        built = cases.build(case, provider, device, x, shared_base=frozen.module)
        runners[provider] = cases.make_runner(built, "fwd+bwd", x, dy)
    with cases.backend_restored():
        # each runner is (prepare, run): prepare untimed
        times = interleaved_times(runners, lambda runner: runner[1](), rounds, warmup=3,
                                  prepare=lambda runner: runner[0]())
    return {name: summarize(ts) for name, ts in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", default=["lora", "dora", "dora-dropout"], choices=sorted(KINDS))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--M", type=int, default=512)
    parser.add_argument("--N", type=int, default=2048)
    parser.add_argument("--K", type=int, default=2048)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peft", action="store_true", help="time PEFT's layer too")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads; {args.M} x {args.K} -> {args.N}, r={args.r}, forward+backward; medians (and "
          f"quartiles) of {args.rounds} interleaved rounds, ms; ratios over the frozen layer's median")
    names = ["frozen", "floor", "floor onto", "fastpeft"] + (["peft"] if args.peft else [])
    print("| kind | dtype | " + " | ".join(names) + " | floor / frozen | fastpeft / frozen |")
    print("| --- | --- |" + " --- |" * (len(names) + 2))
    for kind in args.kinds:
        for dtype in args.dtypes:
            got = measure(kind, dtype, args.M, args.N, args.K, args.r, args.rounds, args.peft)
            base = got["frozen"]["median_ms"]
            cells = [f"{got[n]['median_ms']:.3f} ({got[n]['q25_ms']:.3f}-{got[n]['q75_ms']:.3f})" if n in got
                     else "-" for n in names]
            floor = min(got[n]["median_ms"] for n in ("floor", "floor onto") if n in got)
            ratios = [floor / base, got["fastpeft"]["median_ms"] / base]
            print(f"| {kind} | {dtype} | " + " | ".join(cells) + " | " + " | ".join(f"{v:.3f}" for v in ratios)
                  + " |", flush=True)


if __name__ == "__main__":
    main()
