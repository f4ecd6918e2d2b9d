"""Timing shared by the side-by-side scripts: every provider runs the same step in interleaved rounds (so drift in
machine load hits all of them alike), after warm-up, and the medians are compared (or, with ``paired_overheads``,
each round's times with the base's of the same round)."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

from fastpeft.bench.timing import warm_until_routes_confirmed


def interleaved_times(models: dict, run: Callable, rounds: int, warmup: int = 2,
                      prepare: Optional[Callable] = None) -> dict:
    """``{name: [milliseconds of run(model) in each round]}``: every round runs every model once, in the given order
    on even rounds and reversed on odd ones (a drift within a round then hits the first and the last alike). The
    warm-up rounds go on until fastpeft's route choices are final. ``prepare(model)``, if given, runs untimed before
    each ``run(model)``."""
    def run_round():
        for model in models.values():
            if prepare is not None:
                prepare(model)
            run(model)

    for _ in range(warmup):
        run_round()
    warm_until_routes_confirmed(run_round)
    times = {name: [] for name in models}
    order = list(models.items())
    for i in range(rounds):
        for name, model in (order if i % 2 == 0 else order[::-1]):
            if prepare is not None:
                prepare(model)
            start = time.perf_counter()
            run(model)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def interleaved_medians(models: dict, run: Callable, rounds: int, warmup: int = 2) -> dict:
    """``{name: median milliseconds of run(model)}`` over :func:`interleaved_times`' rounds."""
    return {name: statistics.median(ts) for name, ts in interleaved_times(models, run, rounds, warmup).items()}


def paired_overheads(times: dict, base: str) -> dict:
    """``{name: [t_name / t_base - 1 for each round]}`` for every name but ``base``: each round's times compared with
    the base's in the same round, so a host that changes speed between rounds moves both sides of each ratio."""
    return {name: [t / b - 1.0 for t, b in zip(ts, times[base])] for name, ts in times.items() if name != base}
