"""``make gpu-check``: everything that needs a CUDA GPU, in one call that fits a short device lease.

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/gpu_check.py            # on a machine with a CUDA GPU
    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/gpu_check.py --dry-run  # the same plan on the CPU, tiny shapes

On a CUDA machine it runs, in order, each step under its own time limit (7 minutes in all):

1. every ``gpu``-marked test (``pytest -m gpu tests``);
2. the layer timing grid: LLaMA-7B shapes (q/k/v/o and up), M 1, 16, 1024 and 4096, bf16, dropout 0 and 0.1, LoRA
   and QLoRA NF4, inference and training, providers base / PEFT / the plain composition / fastpeft (its measured
   routes) (``python -m fastpeft.bench``, CUDA events): 64 points, about the 180 s its step may take;
3. two host profiles of one 4096 x 4096 decode call (``benchmarks/host_profile.py``: inference, and a training step
   with dropout), where the GPU waits on the host;
4. writes the results into ``BENCHMARKS.md`` between the ``gpu-check`` markers of its measured-GPU section (GPU name,
   torch and triton versions, the commands, the pytest summary, the timing tables, the route choices and the host
   profiles), and everything into ``--out`` (six files: few enough for a lent machine's output folder).

Without a CUDA device it says so and exits 0 (nothing to measure). ``--dry-run`` runs the same steps on the CPU at a
tiny size (collecting the ``gpu`` tests instead of running them) and writes the section into ``--out`` only, so the
plan itself is tested in CI.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
# (step, seconds): a lent machine starts bare, so the build, the tests' compiles into a cold Triton cache, the grid
# and the profiles must all fit in one call of at most 600 s (BENCHMARKS.md's measured-GPU section has what each took)
LIMITS = {"tests": 150, "bench": 180, "profile": 45}
GPU_GRID = ["--device", "cuda", "--shapes", "7b-qkvo,7b-up", "--tokens", "1,16,1024,4096",
            "--dtypes", "bf16", "--kinds", "lora,qlora-nf4", "--modes", "infer,fwd+bwd", "--dropouts", "0,0.1",
            "--providers", "base,peft,compose,fastpeft", "--budget", "0.1", "--no-model", "--no-cost-model",
            "--no-progress", "--no-plots"]
# (name, host_profile.py arguments): a decode-sized call in inference and in training with dropout
PROFILES = [("infer", ["--mode", "infer"]), ("train", ["--mode", "fwd+bwd", "--dropout", "0.1"])]
GPU_PROFILE = ["--device", "cuda", "--shape", "7b-qkvo", "--tokens", "1", "--dtype", "bf16"]
DRY_PROFILE = ["--device", "cpu", "--shape", "7b-qkvo", "--scale", "64", "--tokens", "1", "--dtype", "fp32",
               "--calls", "20"]
DRY_GRID = ["--device", "cpu", "--scale", "64", "--shapes", "7b-qkvo", "--tokens", "1,16", "--dtypes", "fp32",
            "--kinds", "lora", "--modes", "infer,fwd+bwd", "--dropouts", "0,0.1", "--budget", "0.01",
            "--providers", "base,peft,compose,fastpeft", "--no-model", "--no-memory", "--no-cost-model",
            "--no-plots", "--no-progress", "--threads", "1"]


def _run(command: list, limit: int, log) -> tuple[int, str]:
    """Run ``command`` from the repo root with the repo kept off ``sys.path``; returns (exit status, output)."""
    env = dict(os.environ, PYTHONSAFEPATH="1")
    log.write(f"$ {' '.join(command)}\n")
    try:
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
        out, status = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        out, status = out + f"\n(stopped at the {limit} s limit)", 124
    log.write(out + "\n")
    log.flush()
    return status, out


def _pytest_summary(output: str) -> str:
    lines = [ln.strip("= ") for ln in output.splitlines() if re.search(r"\b(passed|failed|error|deselected)\b", ln)]
    return lines[-1] if lines else "(no pytest summary: see gpu-check.log)"


def section(device: str, versions: str, commands: list, test_summary: str, tables: str) -> str:
    """The measured-GPU section of BENCHMARKS.md, between the markers."""
    body = [BEGIN, "", f"Device: {device}; {versions}; {time.strftime('%Y-%m-%d')}.", "", "Commands:", "", "```bash"]
    body += [" ".join(c) for c in commands]
    body += ["```", "", f"`gpu`-marked tests: {test_summary}.", "", tables.strip(), "", END]
    return "\n".join(body)


def route_choices_table(path: str) -> str:
    """A markdown table of the route choices in the grid's ``routes.json``: op, sizes, dtypes, the route taken and
    every candidate's measured milliseconds (empty when the file is missing)."""
    import json

    if not os.path.exists(path):
        return ""
    with open(path) as handle:
        choices = json.load(handle)
    lines = ["Route choices (`routes.json`):", "",
             "| op | M bucket | N | K | dtypes | dropout | grads | route | how | candidates (ms) |",
             "| --- | ---: | ---: | ---: | --- | --- | --- | --- | --- | --- |"]
    for c in sorted(choices, key=lambda c: (c["op"], c["n"], c["k"], c["m_bucket"], c["dtypes"], str(c["dropout"]),
                                            str(c["grads"]))):
        timings = ", ".join(f"{route} {ms:.3g}" for route, ms in sorted(c["timings_ms"].items(), key=lambda t: t[1]))
        lines.append(f"| {c['op']} | {c['m_bucket']} | {c['n']} | {c['k']} | {c['dtypes']} | {c['dropout']} | "
                     f"{c['grads'] or '-'} | {c['route']} | {c['source']} | {timings} |")
    return "\n".join(lines)


def write_section(path: str, text: str) -> None:
    """Replace the text between the markers in ``path`` (or append the section when the markers are missing)."""
    from fastpeft._atomic import atomic_file

    old = open(path).read() if os.path.exists(path) else ""
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END):]
    else:
        new = old.rstrip() + "\n\n" + text + "\n"
    with atomic_file(path, "w") as handle:
        handle.write(new)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the plan on the CPU at a tiny size")
    parser.add_argument("--out", default=os.path.join(REPO, "gpu-out"), help="directory for the log and results")
    args = parser.parse_args(argv)

    import torch
    import triton

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here, so there is nothing to measure (run it where `nvidia-smi` works; "
              "--dry-run runs the plan on the CPU)")
        return 0
    os.makedirs(args.out, exist_ok=True)
    device = "CPU dry run" if args.dry_run else torch.cuda.get_device_name(0)
    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    py = sys.executable
    tests = [py, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider", "-m", "gpu", "tests"]
    if args.dry_run:
        tests.insert(-1, "--collect-only")
    bench_out = os.path.join(args.out, "bench")
    bench = [py, "-m", "fastpeft.bench", *(DRY_GRID if args.dry_run else GPU_GRID), "--out", bench_out]
    with open(os.path.join(args.out, "gpu-check.log"), "w") as log:
        print(f"gpu-check: {device}; {versions}")
        status_tests, out_tests = _run(tests, LIMITS["tests"], log)
        summary = _pytest_summary(out_tests)
        print(f"gpu-check: gpu tests: {summary}")
        status_bench, _ = _run(bench, LIMITS["bench"], log)
        results_md = os.path.join(bench_out, "results.md")
        if not os.path.exists(results_md) and os.path.exists(os.path.join(bench_out, "results.csv")):
            # stopped at its limit: the CSV holds every finished case (written after each), tabulate those
            _run([py, "-m", "fastpeft.bench", "--replot", bench_out, "--no-plots"], 60, log)
        tables = open(results_md).read().split("## Layers", 1)[-1] if os.path.exists(results_md) else \
            "(the timing grid wrote no results: see gpu-check.log)"
        tables += "\n\n" + route_choices_table(os.path.join(bench_out, "routes.json"))
        commands = [["python", *tests[1:]], ["python", *bench[1:]]]
        for name, extra in PROFILES:
            path = os.path.join(args.out, f"host-profile-{name}.md")
            profile = [py, os.path.join(REPO, "benchmarks", "host_profile.py"),
                       *(DRY_PROFILE if args.dry_run else GPU_PROFILE), *extra, "--out", path]
            commands.append(["python", os.path.relpath(profile[1], REPO), *profile[2:-2]])
            status_profile, _ = _run(profile, LIMITS["profile"], log)
            text = open(path).read() if status_profile == 0 and os.path.exists(path) else \
                f"(host profile {name} failed with exit status {status_profile}: see gpu-check.log)"
            tables += "\n\n" + text.replace("# Host profile", "Host profile", 1)
        print(f"gpu-check: timing grid exit status {status_bench}; tables in {results_md}")
    text = section(device, versions, commands, summary, tables)
    target = os.path.join(args.out, "BENCHMARKS-gpu.md") if args.dry_run else os.path.join(REPO, "BENCHMARKS.md")
    write_section(target, text)
    print(f"gpu-check: wrote {target}")
    # collect-only exits 5 when no test is selected: a dry run must find the gpu tests
    return 0 if status_bench == 0 and status_tests == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
