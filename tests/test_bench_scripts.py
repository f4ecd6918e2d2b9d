"""Benchmark scripts that compare what fastpeft runs with a bound or another build.

``benchmarks/bench_floor.py``: its floor step runs the frozen layer's base products (so its time is the frozen
layer's GEMMs plus the data movement it names, not something cheaper), and the script prints one row per point
with the floor's and fastpeft's ratios over the frozen layer. ``benchmarks/bench_dy_pass.py``: a row per shape and
dtype with both kernels' times, their ratio and difference, the SIMD path it was asked for, and the path restored
after."""

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
