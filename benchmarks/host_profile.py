"""Where the host time of one layer call goes: PEFT against fastpeft on one bench case, then a profile of fastpeft's.

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/host_profile.py --device cuda --shape 7b-qkvo --tokens 1 \
        --dtype bf16 --mode infer --out host-profile.md

At decode sizes a GPU waits on the host: the layer's time is the Python and launch work of each call. This script
builds the bench's providers for one case (``fastpeft.bench.cases``), times ``calls`` back-to-back calls of each
(one device synchronization at the end, so queued kernels count once), and profiles fastpeft's calls with cProfile:
the functions with the most time of their own and the fastpeft functions with the most time under them. The
markdown it writes is for reading, not for parsing. ``gpu_check.py`` runs it on a GPU; on the CPU it runs as is.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time


def _per_call_ms(run, prepare, calls: int, sync) -> float:
    """Median over five rounds of ``calls`` back-to-back runs, per call, in milliseconds."""
    rounds = []
    for _ in range(5):
        prepare()
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            run()
        sync()
        rounds.append((time.perf_counter() - start) / calls * 1e3)
    return sorted(rounds)[2]


def _top(stats: pstats.Stats, key: str, limit: int, keep) -> list[str]:
    """The ``limit`` rows of ``stats`` with the most ``key`` time among functions ``keep(filename)`` accepts."""
    entries = []
    for (filename, line, name), (_, calls, own, cumulative, _) in stats.stats.items():
        if keep(filename):
            entries.append((own if key == "own" else cumulative, calls, own, cumulative, filename, line, name))
    entries.sort(reverse=True)
    rows = []
    for _, calls, own, cumulative, filename, line, name in entries[:limit]:
        where = filename.split("site-packages/")[-1]
        for root in ("/fastpeft/", "/kernels/"):
            if root in where:
                where = root.strip("/") + "/" + where.split(root, 1)[1]
        rows.append(f"| `{name}` | {where}:{line} | {calls} | {own * 1e3:.1f} | {cumulative * 1e3:.1f} |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument("--kind", default="lora", help="a bench kind (lora, qlora-nf4, ...)")
    parser.add_argument("--shape", default="7b-qkvo", help="a bench shape name")
    parser.add_argument("--scale", type=int, default=1, help="divide K and N by this (a quick run on the CPU)")
    parser.add_argument("--tokens", type=int, default=1, help="M, the rows of x")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--mode", default="infer", help="infer or fwd+bwd")
    parser.add_argument("--calls", type=int, default=200, help="calls per timed round and in the profile")
    parser.add_argument("--out", default="host-profile.md")
    args = parser.parse_args(argv)

    import torch

    from fastpeft.bench import cases as C

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    K, N = C.SHAPES[args.shape]
    case = C.Case(args.kind, args.shape, C.scaled(K, args.scale), C.scaled(N, args.scale), args.tokens, args.dtype,
                  args.dropout, args.mode)
    x, dy = C.make_inputs(case, device)
    providers = ["base", "peft", "fastpeft"] + (["compose"] if case.kind in ("lora", "qlora-nf4", "dora") else [])
    runners, shared = {}, None
    with C.backend_restored():
        for provider in providers:
            built = C.build(case, provider, device, x, shared_base=shared)
            if provider == "base":
                shared = built.module
            runners[provider] = C.make_runner(built, case.mode, x, dy)  # prepare() selects the backend
        for prepare, run in runners.values():  # warm-up: compiles, measures fastpeft's routes, fills caches
            for _ in range(40):
                prepare()
                run()
        sync()
        per_call = {provider: _per_call_ms(run, prepare, args.calls, sync) for provider, (prepare, run)
                    in runners.items()}
        prepare, run = runners["fastpeft"]
        prepare()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.calls):
            run()
        sync()
        profiler.disable()

    from fastpeft import routing

    stats = pstats.Stats(profiler, stream=io.StringIO())
    total_s = sum(own for (_, _, own, _, _) in stats.stats.values())
    lines = [f"# Host profile: {case.label} on {device.type}"
             + (f" ({torch.cuda.get_device_name(0)})" if device.type == "cuda" else ""), "",
             "Per call, ms (back-to-back calls, one synchronization per round, median of 5 rounds): "
             + ", ".join(f"{p} {ms:.4f}" for p, ms in per_call.items()) + ".", "",
             f"fastpeft's routes: forward {routing.last_route('lora_forward')}, backward "
             f"{routing.last_route('lora_backward')}. Profiled: {args.calls} fastpeft calls, "
             f"{total_s * 1e3 / args.calls:.3f} ms each under cProfile.", "",
             "Most time of their own (every function):", "",
             "| function | where | calls | own ms | under it ms |", "| --- | --- | ---: | ---: | ---: |"]
    lines += _top(stats, "own", 25, lambda f: True)
    lines += ["", "fastpeft's functions with the most time under them:", "",
              "| function | where | calls | own ms | under it ms |", "| --- | --- | ---: | ---: | ---: |"]
    lines += _top(stats, "cumulative", 25, lambda f: "/fastpeft/" in f or "/kernels/" in f)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print(lines[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
