"""``python -m fastpeft.bench`` (or ``fastpeft-bench``): fastpeft against PEFT and the frozen base layer.

Examples::

    python -m fastpeft.bench --quick --out bench-out          # under 2 minutes on a 2-core CPU
    python -m fastpeft.bench --out bench-out                  # the full grid at real LLaMA shapes
    python -m fastpeft.bench --scale 4 --kinds lora --dtypes bf16 --modes fwd+bwd --out bench-out
    python -m fastpeft.bench --replot bench-out               # tables and plots again from results.csv
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import warnings

from . import cases as C
from .timing import add_allocator_option, apply_allocator

# --quick: every kind and dtype at one small shape, M from 1 to 2048, forward and forward+backward, so the plots
# and tables have every line, in under 2 minutes on 2 shared cores (the backward alone is in the full grid).
QUICK = dict(scale=32, shapes=["7b-qkvo"], tokens=[1, 16, 512, 2048], dtypes=["fp32", "bf16"],
             kinds=["lora", "ia3", "qlora-nf4"], modes=["fwd", "fwd+bwd"], dropouts=[0.0, 0.1], budget=0.03,
             model_layers=1, model_seq=32, model_new_tokens=4,
             # the reference backend regenerates dropout masks with a Philox written in plain torch ops: seconds per
             # call at M=2048, which alone would take --quick over its time; name it in --providers to include it
             skip_providers=["fastpeft-reference"])
# lora-mixed runs only when asked for (--kinds): it multiplies the grid by its four adapter counts.
FULL = dict(scale=1, shapes=list(C.SHAPES), tokens=list(C.TOKENS), dtypes=["bf16", "fp32"],
            kinds=[k for k in C.KINDS if k != "lora-mixed"],
            modes=list(C.MODES), dropouts=[0.0, 0.1], budget=1.0, model_layers=4, model_seq=256, model_new_tokens=32)


def _list(kind):
    return lambda text: [kind(t) for t in text.split(",") if t]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastpeft-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="a small grid that finishes in about 2 minutes on 2 cores")
    p.add_argument("--out", default=None, help="directory for results.csv, results.md, routes.json and the PNG plots")
    p.add_argument("--scale", type=int, default=None,
                   help="divide every layer dimension by this (rounded up to 64) for small machines "
                        "(default 1, --quick 32)")
    p.add_argument("--shapes", type=_list(str), default=None, help=f"comma list of {','.join(C.SHAPES)}")
    p.add_argument("--tokens", "-M", type=_list(int), default=None, help="comma list of M (tokens per call)")
    p.add_argument("--dtypes", type=_list(str), default=None, help="comma list of bf16,fp16,fp32")
    p.add_argument("--kinds", type=_list(str), default=None, help=f"comma list of {','.join(C.KINDS)}")
    p.add_argument("--modes", type=_list(str), default=None, help="comma list of infer,fwd,bwd,fwd+bwd")
    p.add_argument("--dropouts", type=_list(float), default=None, help="comma list of LoRA dropout rates")
    p.add_argument("--rank", "-r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--providers", type=_list(str), default=None,
                   help="comma list; default base,peft,fastpeft and fastpeft-<name> per available backend")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on the CPU (default 2)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed runs per case (CPU)")
    add_allocator_option(p)
    p.add_argument("--no-layers", action="store_true", help="skip the layer-level timings")
    p.add_argument("--no-memory", action="store_true", help="skip saved-for-backward and peak memory")
    p.add_argument("--no-model", action="store_true", help="skip the LLaMA model-level benchmark")
    p.add_argument("--no-cost-model", action="store_true", help="skip the GPU cost model rows")
    p.add_argument("--no-plots", action="store_true", help="write no PNGs")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--replot", metavar="DIR", default=None,
                   help="rebuild results.md and the plots from DIR/results.csv and exit")
    return p


def resolve(args) -> argparse.Namespace:
    """Fill unset options from the --quick or full preset, and check names."""
    preset = QUICK if args.quick else FULL
    for key in ("scale", "shapes", "tokens", "dtypes", "kinds", "modes", "dropouts", "budget"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.model_layers, args.model_seq, args.model_new_tokens = (preset["model_layers"], preset["model_seq"],
                                                                 preset["model_new_tokens"])
    checks = {"shapes": C.SHAPES, "dtypes": C.DTYPES, "kinds": C.KINDS, "modes": C.MODES}
    for key, allowed in checks.items():
        bad = [v for v in getattr(args, key) if v not in allowed]
        if bad:
            raise SystemExit(f"fastpeft-bench: unknown {key} {bad}; choose from {list(allowed)}")
    if args.scale < 1:
        raise SystemExit("fastpeft-bench: --scale must be >= 1")
    if any(m < 1 for m in args.tokens):
        raise SystemExit("fastpeft-bench: --tokens must be >= 1")
    return args


def _layer_rows(case, timings, builts, memory):
    rows = []
    shape = case.shape if case.kind != "lora-mixed" else f"{case.shape}/adapters={case.adapters}"
    base = dict(level="layer", kind=case.kind, shape=shape, K=case.K, N=case.N, M=case.M, r=case.r,
                dtype=case.dtype, dropout=case.dropout, mode=case.mode)
    for provider, t in timings.items():
        b = builts[provider]
        common = dict(base, provider=provider, backend=b.backend, fused=b.fused)
        rows.append(dict(common, metric="time", value=t["median_ms"], unit="ms", q25=t["q25_ms"], q75=t["q75_ms"],
                         reps=t["reps"]))
        for metric, (value, unit) in memory.get(provider, {}).items():
            rows.append(dict(common, metric=metric, value=value, unit=unit))
    return rows


def write_route_choices(path: str) -> None:
    """``path`` (JSON): every route choice fastpeft made in this process so far (``fastpeft.routing.routes()``: the
    key's op, sizes and dtypes, the route taken, how it was chosen and each candidate's measured milliseconds), so
    a run says which route served each fastpeft timing and what the others cost on this machine."""
    import json

    from fastpeft import routing
    from fastpeft._atomic import atomic_file

    with atomic_file(path, "w") as handle:
        json.dump(routing.routes(), handle, indent=1, sort_keys=True, default=str)


def run_layers(args, device, providers, writer, progress) -> None:
    import torch

    from .memory import peak_bytes, saved_bytes
    from .timing import time_runners

    cases = C.enumerate_cases(args.kinds, args.shapes, args.tokens, args.dtypes, args.dropouts, args.modes,
                              args.scale, args.rank)
    bar = progress(cases, desc="layers")
    with C.backend_restored():
        for case in bar:
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(case.label)
            x, dy = C.make_inputs(case, device)
            builts, shared = {}, None
            for provider in providers:
                if provider == "compose" and case.kind in ("ia3", "lora-mixed"):
                    continue  # the composition is single-adapter LoRA's
                built = C.build(case, provider, device, x, shared_base=shared)
                if provider == "base":
                    shared = built.module
                builts[provider] = built
            runners = []
            for provider, built in builts.items():
                prepare, run = C.make_runner(built, case.mode, x, dy, case.adapter_names())
                runners.append((provider, prepare, run, lambda b=built, x=x: [x] + b.params))
            try:
                timings = time_runners(runners, device, args.budget)
            except Exception as exc:  # one failing provider must not lose the whole run
                print(f"fastpeft-bench: {case.label}: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            memory: dict = {}
            if not args.no_memory and case.mode == "fwd+bwd":
                for provider, prepare, run, _ in runners:
                    builts[provider].select()
                    call = C.caller(builts[provider].module, case.adapter_names())
                    saved = saved_bytes(builts[provider].module, lambda m=call, x=x: m(x))
                    prepare()
                    peak, how = peak_bytes(run, device)
                    memory[provider] = {"saved_bytes": (saved["saved_bytes"], "bytes"),
                                        "saved_activation_bytes": (saved["saved_activation_bytes"], "bytes"),
                                        "peak_bytes": (peak, how)}
            writer.write(_layer_rows(case, timings, builts, memory))
            # after each case, as results.csv: a run stopped at a time limit keeps what it measured
            write_route_choices(os.path.join(args.out, "routes.json"))
            del builts, runners, shared
            if device.type == "cuda":
                torch.cuda.empty_cache()


def run_model(args, device, providers, writer) -> None:
    from . import model as Mdl

    for dtype in args.dtypes:
        case = Mdl.ModelCase(scale=args.scale, layers=args.model_layers, batch=2, seq=args.model_seq,
                             new_tokens=args.model_new_tokens, dtype=dtype, r=args.rank)
        rows = Mdl.run(case, providers, device, args.budget * 4)
        for row in rows:
            row.update(level="model", kind="lora", shape=case.label, dtype=dtype, r=case.r, dropout=case.dropout,
                       M=case.batch * (case.seq if row["mode"] == "train-step" else case.new_tokens))
        writer.write(rows)


def cost_model_rows():
    """The GPU cost model's table (``fastpeft.bench.cost_model``, written with the Triton kernels) as CSV rows."""
    from .cost_model import rows

    out = []
    for r in rows():
        common = dict(level="cost-model", kind=r["kernel"], shape=f"{r['K']}x{r['N']}", K=r["K"], N=r["N"],
                      M=r["M"], dtype="bf16", mode="bwd" if "bwd" in r["kernel"] else "fwd")
        for impl in ("peft", "fused"):
            row = dict(common, provider=impl)
            out.append(dict(row, metric="modeled_roofline_time", value=r[f"{impl}_us"], unit="us (MODEL, H100)"))
            out.append(dict(row, metric="modeled_hbm_bytes", value=r[f"{impl}_bytes"], unit="bytes (MODEL)"))
            out.append(dict(row, metric="modeled_flops", value=r[f"{impl}_flops"], unit="FLOP (MODEL)"))
    return out


def write_outputs(out_dir, command, plots=True, cost_model=True) -> tuple[list[dict], list[str]]:
    """results.md (and the plots) from ``out_dir/results.csv``; returns the CSV's rows and the plots' paths."""
    from . import report
    from .cost_model import markdown

    rows = report.read_csv(os.path.join(out_dir, "results.csv"))
    report.write_markdown(os.path.join(out_dir, "results.md"), rows, command, markdown() if cost_model else "")
    if not plots:
        return rows, []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("fastpeft-bench: matplotlib is not installed, so no plots were drawn (results.csv and results.md are "
              "written); pip install 'fastpeft[bench]' for the plots", file=sys.stderr)
        return rows, []
    return rows, report.plot(out_dir, rows)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    command = "python -m fastpeft.bench " + " ".join(shlex.quote(a) for a in argv)
    if args.replot:
        for path in write_outputs(args.replot, command + " (replotted)", not args.no_plots)[1]:
            print(path)
        return 0
    args = resolve(args)

    import torch

    from . import report

    warnings.filterwarnings("ignore", category=FutureWarning)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    allocator = apply_allocator(args)
    if allocator is not None:
        print(f"fastpeft-bench: {allocator}", file=sys.stderr)
    preset = QUICK if args.quick else FULL
    providers = args.providers or [p for p in C.default_providers(device) if p not in preset.get("skip_providers", ())]
    for required in ("base", "peft"):
        if required not in providers and (args.kinds and not args.no_layers):
            providers.insert(0 if required == "base" else 1, required)  # ratios are relative to both
    out_dir = args.out = args.out or "bench-out"
    os.makedirs(out_dir, exist_ok=True)
    writer = report.CsvWriter(os.path.join(out_dir, "results.csv"), report.environment(device, args.threads))

    def progress(items, desc):
        if args.no_progress:
            return items
        try:
            from tqdm import tqdm
        except ImportError:
            return items
        return tqdm(items, desc=desc, dynamic_ncols=True)

    start = time.time()
    print(f"fastpeft-bench: device {device}, providers {providers}, scale {args.scale}", file=sys.stderr)
    if not args.no_layers:
        run_layers(args, device, providers, writer, progress)
    if not args.no_model:
        run_model(args, device, providers, writer)
    if not args.no_cost_model:
        writer.write(cost_model_rows())
    write_route_choices(os.path.join(out_dir, "routes.json"))  # the model-level runs' choices too
    rows, paths = write_outputs(out_dir, command, not args.no_plots, not args.no_cost_model)
    for line in report.summary(rows):
        print(line, file=sys.stderr)
    print(f"fastpeft-bench: {time.time() - start:.0f} s; wrote {out_dir}/results.csv, {out_dir}/results.md, "
          f"{out_dir}/routes.json"
          + "".join(f", {p}" for p in paths), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
