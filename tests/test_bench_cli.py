"""The benchmark CLI: its arguments and the files it writes, on a tiny case. Timings are not checked (they are
whatever a shared machine gives); the shape of the output is."""

from __future__ import annotations

import csv
import os
import sys

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("peft")

from fastpeft.bench import __main__ as cli  # noqa: E402
from fastpeft.bench import report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--quick", "--scale", "256", "--shapes", "7b-qkvo", "--tokens", "1,16", "--dtypes", "fp32",
        "--kinds", "lora,ia3", "--modes", "fwd,bwd,fwd+bwd", "--dropouts", "0,0.1", "--budget", "0.005",
        "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert cli.main(TINY + ["--out", str(out)]) == 0
    return out


def _rows(out):
    with open(os.path.join(out, "results.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_csv_has_every_column_and_versions(tiny_run):
    rows = _rows(tiny_run)
    assert rows, "results.csv is empty"
    assert list(rows[0].keys()) == report.COLUMNS
    for column in ("machine", "device", "torch", "triton", "peft", "fastpeft"):
        assert rows[0][column], f"column {column} is empty"


def test_csv_has_base_peft_fastpeft_rows_for_every_layer_case(tiny_run):
    from fastpeft.bench.cases import available_backends

    rows = [r for r in _rows(tiny_run) if r["level"] == "layer" and r["metric"] == "time"]
    # --quick leaves out the (slow) reference backend unless --providers names it
    expected_backends = {f"fastpeft-{n}" for n in available_backends(torch.device("cpu"))} - {"fastpeft-reference"}
    cases = {(r["kind"], r["M"], r["dropout"], r["mode"]) for r in rows}
    # lora: 2 dropouts x 3 modes x 2 M; ia3 (no dropout): 3 modes x 2 M
    assert len(cases) == 2 * 3 * 2 + 3 * 2
    for case in cases:
        providers = {r["provider"] for r in rows if (r["kind"], r["M"], r["dropout"], r["mode"]) == case}
        assert {"base", "peft", "fastpeft"} <= providers, case
        assert expected_backends <= providers, "each available backend is a provider"
    assert all(float(r["value"]) > 0 and r["unit"] == "ms" for r in rows)
    for provider in expected_backends:
        assert {r["backend"] for r in rows if r["provider"] == provider} == {provider.split("-", 1)[1]}


def test_default_providers_list_every_available_backend():
    from fastpeft.bench.cases import available_backends, default_providers

    providers = default_providers(torch.device("cpu"))
    assert providers[:4] == ["base", "peft", "compose", "fastpeft"]
    assert "fastpeft-reference" in providers
    assert providers[4:] == [f"fastpeft-{n}" for n in available_backends(torch.device("cpu"))]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compose_provider_matches_peft(dtype):
    """The ``compose`` provider is the five-line composition over PEFT's own tensors: same output and gradients as
    PEFT's layer (dropout 0, so both are deterministic)."""
    from fastpeft.bench import cases as C

    case = C.Case(kind="lora", shape="2048", K=72, N=40, M=7, r=4, dtype=dtype, dropout=0.0, mode="fwd+bwd")
    device = torch.device("cpu")
    x, dy = C.make_inputs(case, device)
    peft_built = C.build(case, "peft", device, x)
    compose_built = C.build(case, "compose", device, x, shared_base=peft_built.module.get_base_layer())
    outs = []
    for built in (peft_built, compose_built):
        for p in built.params:
            p.grad = None
        xi = x.detach().clone().requires_grad_(True)
        y = built.module(xi)
        y.backward(dy)
        outs.append((y.detach().float(), xi.grad.float(), [p.grad.float() for p in built.params]))
    tol = 1e-5 if dtype == "fp32" else 2e-2
    (y0, dx0, g0), (y1, dx1, g1) = outs
    assert torch.allclose(y0, y1, rtol=tol, atol=tol), "compose output differs from PEFT's"
    assert torch.allclose(dx0, dx1, rtol=tol, atol=tol), "compose dX differs from PEFT's"
    assert len(g0) == len(g1) == 2
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=tol, atol=tol * 10), "compose adapter gradient differs from PEFT's"


@pytest.mark.parametrize("adapters", [1, 4, 16])
def test_mixed_case_rows_each_use_an_adapter_the_layer_holds(adapters):
    """A ``lora-mixed`` case's ``adapter_names`` name adapters its layers hold (a name the layer lacks would give
    its rows no adapter term, and the case would time the base alone), and fastpeft's output is PEFT's."""
    from fastpeft.bench import cases as C

    case = C.Case(kind="lora-mixed", shape="2048", K=64, N=40, M=16, r=4, dtype="fp32", dropout=0.0, mode="infer",
                  adapters=adapters)
    device = torch.device("cpu")
    x, dy = C.make_inputs(case, device)
    names = case.adapter_names()
    peft_built = C.build(case, "peft", device, x)
    fast_built = C.build(case, "fastpeft", device, x, shared_base=peft_built.module.get_base_layer())
    assert set(names) <= set(peft_built.module.lora_A), "every row's adapter is held"
    assert len(set(names)) == min(adapters, C.MIXED_SEQUENCES)
    outs = []
    for built in (peft_built, fast_built):
        built.select()
        built.module.eval()
        with torch.no_grad():
            outs.append(C.caller(built.module, names)(x.detach()))
    base = peft_built.module.get_base_layer()(x.detach())
    assert (outs[0] - base).abs().amax(-1).min() > 1e-3, "every row gets an adapter term"
    assert torch.allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_route_choices_name_the_routes_that_served_fastpeft(tiny_run):
    """routes.json lists the choices fastpeft made during the run, each with its op, route and how it was chosen;
    every measured choice carries the timing of the route it took, and that route was the fastest measured."""
    import json

    from fastpeft import routing

    with open(os.path.join(tiny_run, "routes.json")) as f:
        choices = json.load(f)
    ops = {c["op"] for c in choices}
    assert {"lora_forward", "lora_backward", "ia3_forward"} <= ops, ops
    for c in choices:
        assert c["route"] in routing.ROUTES[c["op"]], c
        if c["source"].startswith("measured"):
            assert c["timings_ms"][c["route"]] == min(c["timings_ms"].values()), c


def test_csv_has_memory_model_and_cost_model_rows(tiny_run):
    rows = _rows(tiny_run)
    metrics = {(r["level"], r["metric"]) for r in rows}
    for metric in ("saved_bytes", "saved_activation_bytes", "peak_bytes"):
        assert ("layer", metric) in metrics
    assert {("model", "tokens_per_s"), ("model", "peak_bytes")} <= metrics
    generate = {r["provider"] for r in rows if r["level"] == "model" and r["mode"] == "generate"}
    assert {"peft", "fastpeft", "merged"} <= generate
    model_rows = [r for r in rows if r["level"] == "cost-model"]
    assert model_rows and all("MODEL" in r["unit"] for r in model_rows)


def test_markdown_has_the_tables(tiny_run):
    text = open(os.path.join(tiny_run, "results.md")).read()
    for heading in ("## Layers", "### lora, fp32, dropout 0.0", "### lora, fp32, dropout 0.1", "### ia3, fp32",
                    "## Memory per layer", "## Model", "## GPU cost MODEL"):
        assert heading in text, heading
    assert "| base ms (q25-q75) | peft ms (q25-q75) | fastpeft ms (q25-q75)" in text
    assert "speed-up fastpeft vs peft" in text and "fastpeft / base" in text


def test_pngs_exist_and_are_valid(tiny_run):
    import matplotlib.image

    pngs = sorted(p for p in os.listdir(tiny_run) if p.endswith(".png"))
    assert pngs == ["overhead_fp32.png", "speedup_fp32.png"]
    for name in pngs:
        path = os.path.join(tiny_run, name)
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 400


def test_replot_rebuilds_outputs_from_the_csv(tiny_run):
    os.remove(os.path.join(tiny_run, "results.md"))
    assert cli.main(["--replot", str(tiny_run), "--no-plots"]) == 0
    assert "## Layers" in open(os.path.join(tiny_run, "results.md")).read()


def test_presets_and_overrides():
    quick = cli.resolve(cli.parser().parse_args(["--quick"]))
    assert quick.scale == 32 and quick.tokens == [1, 16, 512, 2048]
    full = cli.resolve(cli.parser().parse_args([]))
    assert full.scale == 1 and set(full.kinds) == {"lora", "ia3", "qlora-nf4", "qlora-int8", "dora"}
    mine = cli.resolve(cli.parser().parse_args(["--quick", "--scale", "4", "-M", "3,5", "--dtypes", "bf16"]))
    assert (mine.scale, mine.tokens, mine.dtypes) == (4, [3, 5], ["bf16"])


@pytest.mark.parametrize("argv", [["--kinds", "lora,vera"], ["--shapes", "70b"], ["--dtypes", "int4"],
                                  ["--modes", "sideways"], ["--scale", "0"], ["--tokens", "0"]])
def test_bad_arguments_exit_with_a_message(argv):
    with pytest.raises(SystemExit) as info:
        cli.resolve(cli.parser().parse_args(argv))
    assert info.value.code not in (0, None)


def test_case_grid_skips_meaningless_points():
    from fastpeft.bench.cases import enumerate_cases

    cases = enumerate_cases(["lora", "ia3", "qlora-nf4", "qlora-int8"], ["7b-up"], [1], ["fp32", "bf16"], [0.0, 0.1],
                            ["fwd"], scale=64)
    kinds = [(c.kind, c.dtype, c.dropout) for c in cases]
    assert ("ia3", "fp32", 0.1) not in kinds and ("qlora-int8", "fp32", 0.0) not in kinds
    assert ("qlora-nf4", "fp32", 0.0) in kinds and ("qlora-int8", "bf16", 0.1) in kinds
    assert all(c.K % 64 == 0 and c.N % 64 == 0 for c in cases)


def test_without_matplotlib_tables_are_written_and_the_install_is_named(tiny_run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    md = os.path.join(str(tiny_run), "results.md")
    os.remove(md)
    assert cli.main(["--replot", str(tiny_run)]) == 0
    assert os.path.exists(md)
    assert "pip install 'fastpeft[bench]'" in capsys.readouterr().err


def test_every_median_carries_its_spread_and_busy_timings_are_flagged(tiny_run, monkeypatch):
    """Each time cell is ``median (q25-q75)``; with every spread counted as too wide, each cell gets a ``*``, the
    tables open with the warning, and the terminal summary ends with it."""
    import re

    rows = report.read_csv(os.path.join(tiny_run, "results.csv"))
    layer = next(r for r in rows if r["level"] == "layer" and r["metric"] == "time" and r["provider"] == "fastpeft")
    cell = report._fmt_time(layer)
    assert re.fullmatch(r"[0-9.e+-]+ \([0-9.e+-]+-[0-9.e+-]+\)\*?", cell), cell
    monkeypatch.setattr(report, "unsteady", lambda median, q25, q75: True)
    path = os.path.join(tiny_run, "busy.md")
    report.write_markdown(path, rows, "test")
    text = open(path).read()
    times = sum(r["metric"] == "time" for r in rows)
    assert f"{times} of {times} timings are marked `*`" in text
    assert f"{report._fmt_time(layer)}" in text and report._fmt_time(layer).endswith("*")
    lines = report.summary(rows)
    assert any(line.startswith("lora fp32 fwd+bwd: fastpeft ") for line in lines), lines
    assert lines[-1].startswith(f"warning: {times} of {times} timings spread")
    monkeypatch.setattr(report, "unsteady", lambda median, q25, q75: False)
    assert "timings are marked" not in "\n".join(report._busy_note(rows))
    assert not report.summary(rows)[-1].startswith("warning")


FAULTS_AFTER = """
import resource, sys, torch
from fastpeft.bench.timing import steady_allocator
if sys.argv[1] == "steady":
    print(steady_allocator())
faults = []
for _ in range(8):  # 48 MiB: over glibc's largest dynamic mmap threshold (32 MiB), under the steady one (512 MiB)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(12 << 20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del t
# the last four: the heap's layout may make the first one or two allocations after the first fault in anew
print(min(faults[4:]), max(faults[4:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("allocator", ["default", "steady"])
def test_steady_allocator_serves_a_freed_large_block_again_without_page_faults(allocator):
    """With the bench's ``--allocator steady`` a large tensor allocated again after one was freed reuses the heap once
    the heap has settled; glibc's default maps it afresh each time and faults in every page (12288 of 4 KiB for
    48 MiB)."""
    import platform
    import subprocess

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    env = dict(os.environ, PYTHONSAFEPATH="1")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    done = subprocess.run([sys.executable, "-c", FAULTS_AFTER, allocator], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    fewest, most = map(int, done.stdout.strip().splitlines()[-1].split())
    if allocator == "steady":
        assert "mmap threshold 512 MiB" in done.stdout, done.stdout
        assert most < 1000, done.stdout
    else:
        assert fewest > 10000, done.stdout
