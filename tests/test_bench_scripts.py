"""Benchmark scripts that compare what fastpeft runs with a bound or another build.

``benchmarks/bench_floor.py``: its floor step runs the frozen layer's base products (so its time is the frozen
layer's GEMMs plus the data movement it names, not something cheaper), and the script prints one row per point
with the floor's and fastpeft's ratios over the frozen layer. ``benchmarks/bench_dy_pass.py``: a row per shape and
dtype with both kernels' times, their ratio and difference, the SIMD path it was asked for, and the path restored
after. ``benchmarks/bench_passes.py``: a row per pass and dtype, and its passes compute what they name."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def bench_floor(load_benchmark_script):
    return load_benchmark_script("bench_floor")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,onto", [("lora", False), ("lora", True), ("dora", False), ("dora", True),
                                       ("dora-dropout", False)])
def test_floor_step_computes_the_frozen_layers_products(bench_floor, kind, onto, dtype):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(37, 29, generator=gen).to(dtype)
    weight = torch.randn(45, 29, generator=gen).to(dtype)
    dy = torch.randn(37, 45, generator=gen).to(dtype)
    xg = x.clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(xg, weight)
    y_ref.backward(dy)
    copies = 2 if kind == "dora-dropout" else 1
    y, dx = bench_floor.floor_step(kind, x, weight, dy, onto)()
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(y, copies * y_ref.detach(), **tol)
    torch.testing.assert_close(dx, copies * xg.grad, **tol)


def test_unknown_kind_and_a_missing_onto_floor_are_refused_by_name(bench_floor):
    x, weight, dy = torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, 4)
    with pytest.raises(ValueError, match="unknown kind 'ia3'"):
        bench_floor.floor_step("ia3", x, weight, dy)
    with pytest.raises(ValueError, match="no 'onto' floor for 'dora-dropout'"):
        bench_floor.floor_step("dora-dropout", x, weight, dy, onto=True)


def test_measure_times_every_provider_in_every_round(bench_floor):
    got = bench_floor.measure("lora", "fp32", M=8, N=24, K=40, r=4, rounds=3, peft=True)
    assert sorted(got) == ["fastpeft", "floor", "floor onto", "frozen", "peft"]
    for name, timing in got.items():
        assert timing["reps"] == 3, name
        assert 0 < timing["q25_ms"] <= timing["median_ms"] <= timing["q75_ms"], (name, timing)


def test_script_prints_a_row_per_point_with_both_ratios(bench_floor, capsys):
    threads = torch.get_num_threads()
    try:
        bench_floor.main(["--kinds", "lora", "dora-dropout", "--dtypes", "fp32", "--M", "8", "--N", "24", "--K", "40",
                          "--r", "4", "--rounds", "3", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| lora |")
            or line.startswith("| dora-dropout |")]
    assert [row.split("|")[1].strip() for row in rows] == ["lora", "dora-dropout"], rows
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert all(len(c) == 8 for c in cells), cells
    assert cells[0][4] != "-" and cells[1][4] == "-", cells  # dora-dropout has no onto floor
    for c in cells:
        assert all(float(v) > 0 for v in c[6:]), c


def test_dy_pass_script_prints_a_row_per_point_and_restores_the_simd_path(load_benchmark_script, capsys):
    from fastpeft import _C

    script = load_benchmark_script("bench_dy_pass")
    before = _C.isa()
    threads = torch.get_num_threads()
    try:
        script.main(["--shapes", "3x40", "9x70", "--dtypes", "fp32", "bf16", "--rounds", "2", "--threads", "1",
                     "--isa", "generic", "--r", "8"])  # two vectors of the generic path: both kernels run
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "SIMD path generic" in out, out
    rows = [line for line in out.splitlines() if line.startswith(("| fp32 |", "| bf16 |"))]
    assert [tuple(c.strip() for c in row.strip("|").split("|")[:2]) for row in rows] == [
        ("fp32", "3 x 40"), ("fp32", "9 x 70"), ("bf16", "3 x 40"), ("bf16", "9 x 70")], rows
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert all(len(c) == 6 and float(c[2]) > 0 and float(c[3]) > 0 for c in cells), cells
    # outer / rows is the ratio of the two medians; the kernels agree to fp32 rounding
    assert all(abs(float(c[4]) - float(c[3]) / float(c[2])) <= 0.01 + 0.1 * float(c[4]) for c in cells), cells
    assert all(float(c[5]) < 1e-5 for c in cells), cells
    assert _C.isa() == before


def test_passes_script_prints_a_row_per_pass_and_restores_the_simd_path(load_benchmark_script, capsys):
    from fastpeft import _C

    script = load_benchmark_script("bench_passes")
    before = _C.isa()
    threads = torch.get_num_threads()
    try:
        script.main(["--shape", "9x70", "--dtypes", "fp32", "fp16", "--rounds", "2", "--threads", "1",
                     "--isa", "generic", "--r", "8"])  # two vectors of the generic path: the outer dY kernel runs
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "SIMD path generic" in out, out
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith(("| fp32 |", "| fp16 |"))]
    assert [(c[0], c[1]) for c in rows] == [(dt, name) for dt in ("fp32", "fp16") for name in script.PASSES], rows
    assert all(len(c) == 3 and float(c[2]) > 0 for c in rows), rows
    assert _C.isa() == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_passes_script_runs_the_products_it_names(load_benchmark_script, dtype):
    """Each timed pass against the same products in fp64 on widened inputs."""
    from fastpeft import _C

    script = load_benchmark_script("bench_passes")
    gen = torch.Generator().manual_seed(3)
    M, K, r = 13, 70, 5
    x = torch.randn(M, K, generator=gen).to(dtype)
    A, B, g = (torch.randn(*s, generator=gen) for s in ((r, K), (K, r), (M, r)))
    dst = torch.randn(M, K, generator=gen).to(dtype)
    calls = script.pass_calls(_C, x, A, B, g)
    x64, A64, B64, g64, d64 = (t.double() for t in (x, A, B, g, dst))
    want = {
        "dx expand": [d64 + g64 @ A64],
        "dA strips": [g64.t() @ x64],
        "dy rows": [2.0 * x64 @ B64, 2.0 * x64.t() @ g64],
        "epilogue": [d64 + g64 @ B64.t()],
    }
    if "dy outer" in calls:
        want["dy outer"] = want["dy rows"]
    for name, expected in want.items():
        target = dst.clone()
        got = calls[name](target)
        if name in ("dx expand", "epilogue"):
            got = [target]
        assert len(got) == len(expected), name
        for a, b in zip(got, expected):
            tol = 1e-5 if a.dtype == torch.float32 else 1e-2
            assert torch.allclose(a.double(), b, rtol=tol, atol=tol * b.abs().max().item()), name
    # the dropout passes against the mask the backend draws (fastpeft's Philox mask, scaled by 1 / (1 - p))
    mask = _C.dropout_scale(3, M, K, 0.1, 1 / 0.9).double()
    (h,) = calls["xa rows"](dst.clone())
    ref = (x64 * mask) @ A64.t()
    assert torch.allclose(h.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    mask = _C.dropout_scale(7, M, K, 0.1, 1 / 0.9).double()
    target = dst.clone()
    (dA,) = calls["masked both"](target)
    ref_dA, ref_dx = g64.t() @ (x64 * mask), d64 + (g64 @ A64) * mask
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(dA.double(), ref_dA, rtol=1e-5, atol=1e-5 * ref_dA.abs().max().item())
    assert torch.allclose(target.double(), ref_dx, rtol=tol, atol=tol * ref_dx.abs().max().item())
