"""``make gpu-check``'s script: without a GPU it says so and exits 0; its dry run (the same plan on the CPU at a
tiny size, collecting the gpu tests instead of running them) finds the gpu tests, runs the timing grid and writes
the measured-GPU section between its markers."""

from __future__ import annotations

import os

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_check.py")


@pytest.fixture(scope="module")
def gpu_check(load_benchmark_script):
    return load_benchmark_script("gpu_check")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the real check would run")
def test_without_a_gpu_it_says_so_and_exits_0(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    assert "no CUDA device here" in capsys.readouterr().out
    assert not os.listdir(tmp_path)


def test_dry_run_runs_the_plan_and_writes_the_section(gpu_check, tmp_path):
    pytest.importorskip("matplotlib")
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "BENCHMARKS-gpu.md").read_text()
    assert text.count(gpu_check.BEGIN) == 1 and text.count(gpu_check.END) == 1
    summary = next(line for line in text.splitlines() if line.startswith("`gpu`-marked tests:"))
    collected = int(summary.split(":")[1].split("/")[0].split()[0])
    assert collected >= 10, summary
    assert "### lora, fp32, dropout 0.1" in text and "compose ms" in text and "fastpeft ms" in text
    assert "pytest -q -rfs -p no:cacheprovider -m gpu" in text and "-m fastpeft.bench --device cpu" in text
    for mode in ("infer", "fwd+bwd"):  # the host profiles: per-call times of every provider and the hot functions
        head = next(i for i, line in enumerate(text.splitlines()) if line.startswith("Host profile:") and mode in line)
        per_call = text.splitlines()[head + 2]
        assert all(f"{p} " in per_call for p in ("base", "peft", "fastpeft", "compose")), per_call
    assert text.count("| `") > 40, "the profiles' tables of functions"
    routes = [line for line in text.splitlines() if line.startswith("| lora_forward |")]
    assert routes and all(line.split("|")[8].strip() in line.split("|")[10] for line in routes), routes


def test_section_replaces_only_the_text_between_the_markers(gpu_check, tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"# head\n\n{gpu_check.BEGIN}\nold\n{gpu_check.END}\n\n## tail\n")
    gpu_check.write_section(str(path), f"{gpu_check.BEGIN}\nnew\n{gpu_check.END}")
    assert path.read_text() == f"# head\n\n{gpu_check.BEGIN}\nnew\n{gpu_check.END}\n\n## tail\n"
    repo_benchmarks = open(os.path.join(os.path.dirname(SCRIPT), os.pardir, "BENCHMARKS.md")).read()
    assert gpu_check.BEGIN in repo_benchmarks and gpu_check.END in repo_benchmarks


def test_lent_machine_script_parses_and_its_pins_exist(tmp_path):
    """``benchmarks/lent_gpu_check.sh`` (gpu-check on an offline lent machine): valid bash, the three packages it
    fetches are pinned in requirements-dev.txt, and without wheels it stops before installing anything."""
    import re
    import shutil
    import subprocess

    repo = os.path.dirname(os.path.dirname(SCRIPT))
    script = os.path.join(repo, "benchmarks", "lent_gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    with open(os.path.join(repo, "requirements-dev.txt")) as f:
        pinned = set(re.findall(r"^(peft|transformers|bitsandbytes)==\S+$", f.read(), re.M))
    assert pinned == {"peft", "transformers", "bitsandbytes"}
    copy = tmp_path / "repo"
    (copy / "benchmarks").mkdir(parents=True)
    shutil.copy(script, copy / "benchmarks")
    proc = subprocess.run(["bash", str(copy / "benchmarks" / "lent_gpu_check.sh")], capture_output=True, text=True,
                          env=dict(os.environ, OUT=str(tmp_path / "out")))
    assert proc.returncode == 2 and "no wheels in .whl/" in proc.stdout, proc.stdout + proc.stderr
