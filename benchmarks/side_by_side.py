"""Timing shared by the side-by-side scripts: every provider runs the same step in interleaved rounds (so drift in
machine load hits all of them alike), after warm-up, and the medians are compared."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_medians(models: dict, run: Callable, rounds: int, warmup: int = 2) -> dict:
    """``{name: median milliseconds of run(model)}``, rounds interleaved across ``models``."""
    for _ in range(warmup):
        for model in models.values():
            run(model)
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            run(model)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
