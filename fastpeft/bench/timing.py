"""Timing: CUDA through ``triton.testing.do_bench`` (CUDA events, medians); CPU through interleaved medians.

On a shared CPU the machine's speed drifts over seconds (other processes, frequency changes). Timing provider A
for a while, then B, would turn that drift into a difference between providers. Interleaving one run of each
provider per round (A, B, C, A, B, C, ...) spreads the drift over all of them, and the median discards the rounds
another process disturbed.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional, Sequence

import torch

# A timing whose middle half (q25-q75) spreads over more than this fraction of its median was taken on a busy
# machine: its ratios to other timings are not reliable.
UNSTEADY_SPREAD = 0.25


def unsteady(median: float, q25: float, q75: float) -> bool:
    """Whether a median with these quartiles is too spread to compare (see ``UNSTEADY_SPREAD``)."""
    return q75 - q25 > UNSTEADY_SPREAD * median


# (provider, prepare, run, grads): ``grads()`` lists the tensors whose .grad a run fills
Runner = tuple[str, Callable[[], None], Callable[[], None], Callable[[], list]]


def summarize(samples: Sequence[float]) -> dict:
    """Median and quartiles of per-run times in milliseconds."""
    ordered = sorted(samples)
    n = len(ordered)
    q = statistics.quantiles(ordered, n=4) if n >= 2 else [ordered[0]] * 3
    return {"median_ms": statistics.median(ordered), "q25_ms": q[0], "q75_ms": q[2], "reps": n}


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def steady_allocator(mmap_threshold: int = 512 << 20, trim_threshold: int = 1 << 30) -> str:
    """Fix glibc malloc's mmap and trim thresholds for this process (``mallopt``; what ``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_TRIM_THRESHOLD_`` set at start-up) and say what was done.

    By default glibc serves a block over its mmap threshold by a fresh ``mmap`` (page faults on first touch, every
    time) and raises that threshold to the size of each such block freed, and it returns the top of the heap to the
    system past the trim threshold. Which tensors of a step are faulted in afresh then depends on what the process
    allocated and freed before, not on the step: a provider's time depends on what ran before it in the process.
    Fixed thresholds serve every block below ``mmap_threshold`` from the heap and keep freed memory, so each
    provider's steps run without page faults whatever ran before them. The default threshold is above the largest
    tensor of the benchmarks' steps: a language model's logits and their gradient (a 49152-word vocabulary at 512
    tokens: 100 MB each) would otherwise be mapped and faulted in afresh, every step, in every provider."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return "allocator left as it is (not glibc)"
    try:
        libc = ctypes.CDLL("libc.so.6")
        done = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                       trim_threshold) == 1
    except (OSError, AttributeError) as exc:
        return f"allocator left as it is ({exc})"
    if not done:
        return "allocator left as it is (mallopt refused)"
    return f"glibc malloc: mmap threshold {mmap_threshold >> 20} MiB, trim threshold {trim_threshold >> 20} MiB"


def add_allocator_option(parser) -> None:
    """The benchmarks' ``--allocator {default,steady}`` option (an ``argparse`` parser); :func:`apply_allocator`
    acts on it."""
    parser.add_argument("--allocator", choices=("default", "steady"), default="default",
                        help="steady: fixed glibc malloc thresholds, so no provider's steps are faulted in afresh "
                             "because of what ran before them (fastpeft.bench.timing.steady_allocator)")


def apply_allocator(args) -> Optional[str]:
    """:func:`steady_allocator` where ``args.allocator`` asks for it: what was done, else None."""
    return steady_allocator() if args.allocator == "steady" else None


def warm_until_routes_confirmed(run_round: Callable[[], object], max_rounds: int = 400) -> int:
    """Run ``run_round`` while the route choices awaiting confirmation (``fastpeft.routing.unconfirmed``) keep
    getting closer to final, at most ``max_rounds`` times; returns the rounds run. A measured choice times its close
    routes in turn in real calls before it is final, and timed rounds that took those calls would time a mix of
    routes. Stops at the first round that brings no choice closer (choices of keys this case never calls)."""
    from fastpeft import routing

    left = routing.unconfirmed()
    rounds = 0
    while left and rounds < max_rounds:
        run_round()
        rounds += 1
        now = routing.unconfirmed()
        if now >= left:
            break
        left = now
    return rounds


def time_cpu_interleaved(runners: Sequence[Runner], budget_s: float = 0.5, min_reps: int = 5,
                         max_reps: int = 200, warmup: int = 2) -> dict[str, dict]:
    """Interleaved rounds, each running every provider once; ``prepare`` is untimed.

    The number of rounds is chosen from the last warm-up round's cost so one case takes about ``budget_s``: the
    first round of a case can include one-time work (fastpeft timing its routes for a new shape), which would leave
    the case with the minimum of rounds if its cost set their number. After the warm-up rounds, more run until
    fastpeft's route choices for the case are final (:func:`warm_until_routes_confirmed`).
    """
    def run_round():
        for _name, prepare, run, _grads in runners:
            prepare()
            run()

    t_round = 0.0
    for _ in range(max(1, warmup)):
        start = time.perf_counter()
        run_round()
        t_round = time.perf_counter() - start
    warm_until_routes_confirmed(run_round)
    reps = int(min(max_reps, max(min_reps, budget_s / max(t_round, 1e-9))))
    samples: dict[str, list[float]] = {r[0]: [] for r in runners}
    for _ in range(reps):
        for name, prepare, run, _grads in runners:
            prepare()
            start = time.perf_counter()
            run()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: summarize(s) for name, s in samples.items()}


def time_cuda(runners: Sequence[Runner], budget_s: float = 0.5) -> dict[str, dict]:
    """``triton.testing.do_bench`` per provider (it flushes the L2 cache between runs and times with CUDA events).

    ``prepare`` runs once; for ``bwd`` it built the graph that ``run`` differentiates (``run`` retains it, so it
    can be repeated). Gradients are reset to None by ``do_bench`` between runs, as ``prepare`` does on the CPU, so
    no accumulation kernel is timed. Falls back to CUDA events when Triton is missing.
    """
    results = {}
    rep_ms = max(25, int(budget_s * 1e3 / max(1, len(runners))))
    for name, prepare, run, grads in runners:
        prepare()
        fn = run
        try:
            from triton.testing import do_bench

            qs = do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, grad_to_none=grads(),
                          quantiles=[0.5, 0.25, 0.75])
            results[name] = {"median_ms": qs[0], "q25_ms": qs[1], "q75_ms": qs[2], "reps": -1}
        except ImportError:
            results[name] = _time_cuda_events(fn, reps=max(10, rep_ms))
    return results


def _time_cuda_events(fn: Callable[[], None], reps: int) -> dict:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return summarize(samples)


def time_runners(runners: Sequence[Runner], device: torch.device, budget_s: float) -> dict[str, dict]:
    if device.type == "cuda":
        return time_cuda(runners, budget_s)
    return time_cpu_interleaved(runners, budget_s)
