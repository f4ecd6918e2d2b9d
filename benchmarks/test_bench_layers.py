"""Layer benchmarks under pytest-benchmark: one group per case, one test per provider.

Ids read like ``lora-7b-qkvo-fp32-drop0.1-M512-fwd+bwd-peft``. The layers of a case are built once (module-level
cache) and shared by its providers' tests, as the CLI does.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from fastpeft.bench import cases as C


def _env_list(name, default, kind=str):
    return [kind(v) for v in os.environ.get(name, default).split(",") if v]


# the grid, widened by environment variables (see conftest.py)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SCALE = int(os.environ.get("FASTPEFT_BENCH_SCALE", "1" if DEVICE.type == "cuda" else "16"))
TOKENS = _env_list("FASTPEFT_BENCH_TOKENS", "16,512", int)
DTYPES = _env_list("FASTPEFT_BENCH_DTYPES", "fp32,bf16")
KINDS = _env_list("FASTPEFT_BENCH_KINDS", "lora,ia3,qlora-nf4")
SHAPES = _env_list("FASTPEFT_BENCH_SHAPES", "7b-qkvo")
MODES = _env_list("FASTPEFT_BENCH_MODES", "fwd,fwd+bwd")

pytest.importorskip("pytest_benchmark")

CASES = C.enumerate_cases(KINDS, SHAPES, TOKENS, DTYPES, [0.0, 0.1], MODES, SCALE)
# as in --quick, the reference backend (plain-torch Philox dropout, seconds per call) only when named
PROVIDERS = _env_list("FASTPEFT_BENCH_PROVIDERS", ",".join(
    p for p in C.default_providers(DEVICE) if p != "fastpeft-reference"))


def _id(case: C.Case) -> str:
    return f"{case.kind}-{case.shape}-{case.dtype}-drop{case.dropout:g}-M{case.M}-{case.mode}"


@functools.lru_cache(maxsize=1)  # one case's layers alive at a time: real shapes are large
def _built(case: C.Case):
    x, dy = C.make_inputs(case, DEVICE)
    builts, shared = {}, None
    for provider in PROVIDERS:
        built = C.build(case, provider, DEVICE, x, shared_base=shared)
        shared = built.module if provider == "base" else shared
        builts[provider] = built
    return x, dy, builts


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_layer(benchmark, case, provider):
    x, dy, builts = _built(case)
    built = builts[provider]
    prepare, run = C.make_runner(built, case.mode, x, dy)
    benchmark.group = _id(case)
    benchmark.extra_info.update(provider=provider, backend=built.backend, fused=built.fused, K=case.K, N=case.N)
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def timed():
        run()
        sync()

    with C.backend_restored():
        benchmark.pedantic(timed, setup=prepare, rounds=10 if DEVICE.type == "cpu" else 50, warmup_rounds=1,
                           iterations=1)
