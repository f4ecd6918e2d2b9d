"""Outputs of a benchmark run: ``results.csv`` (one row per measurement), ``results.md`` (the tables a person
reads) and PNG plots, all made from the rows so a CSV from another machine can be re-plotted
(``python -m fastpeft.bench --replot DIR``)."""

from __future__ import annotations

import csv
import math
import os
import platform
import socket
from collections import defaultdict
from typing import Iterable

from .._atomic import atomic_file
from .timing import UNSTEADY_SPREAD, unsteady

META_COLUMNS = ["timestamp", "machine", "cpu", "device", "device_name", "threads", "torch", "triton", "peft",
                "transformers", "bitsandbytes", "fastpeft"]
ROW_COLUMNS = ["level", "kind", "shape", "K", "N", "M", "r", "dtype", "dropout", "mode", "provider", "backend",
               "fused", "metric", "value", "unit", "q25", "q75", "reps"]
COLUMNS = META_COLUMNS + ROW_COLUMNS


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
        return str(getattr(module, "__version__", "?"))
    except Exception:
        return "not installed"


def environment(device, threads: int) -> dict:
    """Machine and versions, repeated on every CSV row so rows from different runs can be mixed in one file."""
    import datetime

    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except Exception:
        pass
    return {
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{socket.gethostname()} ({platform.system()} {platform.machine()}, {os.cpu_count()} cpus)",
        "cpu": cpu,
        "device": device.type,
        "device_name": name if device.type == "cuda" else cpu,
        "threads": threads,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "bitsandbytes": _version("bitsandbytes"),
        "fastpeft": _version("fastpeft"),
    }


class CsvWriter:
    """Adds rows as they are measured, so an interrupted run keeps what it measured. Each call rewrites the whole
    file atomically (temporary file, then rename), so a crash mid-write never leaves a torn last row."""

    def __init__(self, path: str, meta: dict):
        self.path, self.meta = path, meta
        self.rows: list[dict] = []
        self.write([])

    def write(self, rows: Iterable[dict]) -> None:
        self.rows += [{**self.meta, **row} for row in rows]
        with atomic_file(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _f(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _providers(rows) -> list[str]:
    order = {"base": 0, "peft": 1, "fastpeft": 2}
    return sorted({r["provider"] for r in rows}, key=lambda p: (order.get(p, 3), p))


def _fmt(x: float, digits: int = 3) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"


def _layer_key(r) -> tuple:
    return (r["kind"], r["shape"], int(r["K"]), int(r["N"]), r["dtype"], r["dropout"], r["mode"], int(r["M"]))


def _time_index(rows):
    """{(kind, shape, K, N, dtype, dropout, mode, M): {provider: median ms}} for layer timings."""
    index: dict = defaultdict(dict)
    for r in rows:
        if r["level"] == "layer" and r["metric"] == "time":
            index[_layer_key(r)][r["provider"]] = _f(r["value"])
    return index


def _spread(r) -> tuple[float, float]:
    """``(q25, q75)`` of a time row (nan when the CSV has none)."""
    return _f(r.get("q25")), _f(r.get("q75"))


def _is_unsteady(r) -> bool:
    q25, q75 = _spread(r)
    return not (math.isnan(q25) or math.isnan(q75)) and unsteady(_f(r["value"]), q25, q75)


def _fmt_time(r) -> str:
    """``median (q25-q75)``, with ``*`` when the spread says the machine was busy."""
    if r is None:
        return "-"
    q25, q75 = _spread(r)
    spread = "" if math.isnan(q25) or math.isnan(q75) else f" ({_fmt(q25)}-{_fmt(q75)})"
    return _fmt(_f(r["value"])) + spread + ("*" if _is_unsteady(r) else "")


def unsteady_rows(rows) -> list[dict]:
    """The time rows whose q25-q75 spread exceeds ``UNSTEADY_SPREAD`` of their median."""
    return [r for r in rows if r["metric"] == "time" and _is_unsteady(r)]


def _busy_note(rows) -> list[str]:
    times = [r for r in rows if r["metric"] == "time"]
    busy = unsteady_rows(rows)
    if not busy:
        return []
    return [f"**{len(busy)} of {len(times)} timings are marked `*`: their middle half spreads over more than "
            f"{UNSTEADY_SPREAD:.0%} of the median, so the machine was busy while they ran and ratios involving them "
            f"are not reliable.** Rerun on a quiet machine (nothing else running), or with `--threads 1`.", ""]


_MODE_ORDER = ("infer", "fwd", "bwd", "fwd+bwd")


def layer_tables(rows) -> list[str]:
    """One table per (kind, dtype, dropout): rows (shape, mode, M); median ms per provider, then each fastpeft
    provider's time over the frozen base and PEFT's time over it (the speed-up)."""
    index = _time_index(rows)
    by_key = {(_layer_key(r), r["provider"]): r for r in rows if r["level"] == "layer" and r["metric"] == "time"}
    providers = _providers([r for r in rows if r["level"] == "layer" and r["metric"] == "time"])
    fast = [p for p in providers if p.startswith("fastpeft")]
    fused = {(r["kind"], r["provider"]): r["fused"] for r in rows if r["level"] == "layer"}
    groups: dict = defaultdict(list)
    for key in sorted(index, key=lambda k: (k[0], k[4], k[5], k[1], _MODE_ORDER.index(k[6])
                                               if k[6] in _MODE_ORDER else 9, k[7])):
        groups[(key[0], key[4], key[5])].append(key)
    out = []
    for (kind, dtype, dropout), keys in groups.items():
        not_fused = [p for p in fast if fused.get((kind, p)) == "False"]
        title = f"### {kind}, {dtype}, dropout {dropout}"
        out.append(title)
        out.append("")
        if not_fused:
            out.append(f"Not fused here (fastpeft kept PEFT's layer): {', '.join(not_fused)}.")
            out.append("")
        head = ["shape (KxN)", "mode", "M"] + [f"{p} ms (q25-q75)" for p in providers]
        best_of = [q for q in ("peft", "compose") if q in providers]
        for p in fast:
            head += [f"{p} / base", f"speed-up {p} vs peft"]
            if len(best_of) == 2:
                head.append(f"{p} / min(peft, compose)")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + " --- |" * len(head))
        for key in keys:
            t = index[key]
            cells = [f"{key[1]} {key[2]}x{key[3]}", key[6], str(key[7])] + [_fmt_time(by_key.get((key, p)))
                                                                              for p in providers]
            for p in fast:
                tp = t.get(p, math.nan)
                cells += [_fmt(tp / t.get("base", math.nan)) + "x", _fmt(t.get("peft", math.nan) / tp) + "x"]
                if len(best_of) == 2:
                    cells.append(_fmt(tp / min(t.get(q, math.nan) for q in best_of)))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return out


def memory_tables(rows) -> list[str]:
    mem = [r for r in rows if r["level"] == "layer" and r["metric"] in ("saved_activation_bytes", "peak_bytes")]
    if not mem:
        return []
    providers = _providers(mem)
    units = sorted({r["unit"] for r in mem if r["metric"] == "peak_bytes"})
    index: dict = defaultdict(dict)
    for r in mem:
        key = (r["kind"], r["shape"], int(r["K"]), int(r["N"]), r["dtype"], r["dropout"], int(r["M"]))
        index[key][(r["provider"], r["metric"])] = _f(r["value"])
    head = ["kind", "shape (KxN)", "dtype", "dropout", "M"]
    head += [f"{p} saved MiB" for p in providers] + [f"{p} peak MiB" for p in providers]
    out = [
        "Saved for backward: bytes autograd keeps for the backward of one layer's forward (unique storages, the "
        f"module's own parameters excluded). Peak: {'; '.join(units)}, of one forward+backward, above what was "
        "allocated before it.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + " --- |" * len(head),
    ]
    for key in sorted(index):
        v = index[key]
        cells = [key[0], f"{key[1]} {key[2]}x{key[3]}", key[4], key[5], str(key[6])]
        cells += [_fmt(v.get((p, "saved_activation_bytes"), math.nan) / 2**20) for p in providers]
        cells += [_fmt(v.get((p, "peak_bytes"), math.nan) / 2**20) for p in providers]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    return out


def model_tables(rows) -> list[str]:
    """One row per (model, mode, provider): median time, throughput, peak memory of the training step."""
    model = [r for r in rows if r["level"] == "model"]
    if not model:
        return []
    out = ["`tokens` is batch x sequence for the training step, batch x new tokens for generation.", "",
           "| model | mode | tokens | provider | median ms (q25-q75) | throughput | peak MiB |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    index: dict = defaultdict(dict)
    for r in model:
        index[(r["shape"], r["mode"], r["M"], r["provider"])][r["metric"]] = r
    for (shape, mode, M, provider), v in index.items():
        tps = v.get("tokens_per_s")
        peak = v.get("peak_bytes")
        out.append(f"| {shape} | {mode} | {M} | {provider} | {_fmt_time(v['time'])} | "
                   f"{_fmt(_f(tps['value'])) + ' ' + tps['unit'] if tps else '-'} | "
                   f"{_fmt(_f(peak['value']) / 2**20) if peak else '-'} |")
    units = sorted({r["unit"] for r in model if r["metric"] == "peak_bytes"})
    out += ["", f"Peak: {'; '.join(units)}, of one training step.", ""]
    return out


def write_markdown(path: str, rows: list[dict], command: str, cost_model_md: str = "") -> None:
    meta = rows[0] if rows else {}
    lines = [
        "# fastpeft benchmark results",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {meta.get('machine', '?')}; device: {meta.get('device', '?')} ({meta.get('device_name', '?')}); "
        f"threads: {meta.get('threads', '?')}; torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}, "
        f"peft {meta.get('peft', '?')}, transformers {meta.get('transformers', '?')}, bitsandbytes "
        f"{meta.get('bitsandbytes', '?')}, fastpeft {meta.get('fastpeft', '?')}; {meta.get('timestamp', '')}.",
        "",
        "Times are medians in milliseconds (CUDA: `triton.testing.do_bench`; CPU: interleaved rounds, one run of "
        "each provider per round, after a warm-up round). `fwd` is a training-mode forward with autograd recording; "
        "`bwd` the backward of that forward; `fwd+bwd` both. `X / base` is X's time over the frozen base layer's "
        "(the adapter's overhead; 1.00x is free); `speed-up X vs peft` is PEFT's time over X's.",
        "",
    ]
    lines += _busy_note(rows)
    lines += ["## Layers", ""]
    lines += layer_tables(rows)
    memory = memory_tables(rows)
    if memory:
        lines += ["## Memory per layer", ""] + memory
    model = model_tables(rows)
    if model:
        lines += ["## Model (LLaMA architecture, random weights)", ""] + model
    if cost_model_md:
        lines += ["## GPU cost MODEL (not measured)", "", cost_model_md, ""]
    with atomic_file(path, "w") as f:
        f.write("\n".join(lines))


def summary(rows) -> list[str]:
    """A few lines for the terminal: per (kind, dtype, mode), the geometric mean over shapes, M and dropout of
    fastpeft's time over the frozen base and of PEFT's, and fastpeft's speed-up over PEFT; then a warning when
    timings were unsteady."""
    index = _time_index(rows)
    groups: dict = defaultdict(list)
    for key, t in index.items():
        if all(p in t for p in ("base", "peft", "fastpeft")):
            groups[(key[0], key[4], key[6])].append(t)
    out = []
    for (kind, dtype, mode), times in sorted(groups.items()):
        fast = _geomean([t["fastpeft"] / t["base"] for t in times])
        peft = _geomean([t["peft"] / t["base"] for t in times])
        speed = _geomean([t["peft"] / t["fastpeft"] for t in times])
        out.append(f"{kind} {dtype} {mode}: fastpeft {fast:.2f}x base, peft {peft:.2f}x base, fastpeft "
                   f"{speed:.2f}x PEFT's speed (geometric mean of {len(times)} cases)")
    busy = unsteady_rows(rows)
    if busy:
        out.append(f"warning: {len(busy)} of {sum(r['metric'] == 'time' for r in rows)} timings spread over more "
                   f"than {UNSTEADY_SPREAD:.0%} of their median (marked * in results.md): the machine was busy; rerun "
                   f"on a quiet machine or with --threads 1")
    return out


def _geomean(values):
    values = [v for v in values if v > 0 and not math.isnan(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else math.nan


def plot(out_dir: str, rows: list[dict]) -> list[str]:
    """Per dtype: speed-up of fastpeft over PEFT, and overhead over the frozen base (fastpeft solid, PEFT dashed),
    against M; one panel per mode, one line per (kind, dropout), geometric mean over shapes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    index = _time_index(rows)
    device = rows[0]["device_name"] if rows else "?"
    paths = []
    for dtype in sorted({k[4] for k in index}):
        modes = [m for m in _MODE_ORDER if any(k[6] == m and k[4] == dtype for k in index)]
        series = sorted({(k[0], k[5]) for k in index if k[4] == dtype})
        for what in ("speedup", "overhead"):
            fig, axes = plt.subplots(1, len(modes), figsize=(max(7, 5 * len(modes)), 4.5), squeeze=False)
            for ax, mode in zip(axes[0], modes):
                for i, (kind, dropout) in enumerate(series):
                    Ms = sorted({k[7] for k in index if k[:1] == (kind,) and k[4] == dtype and k[5] == dropout
                                 and k[6] == mode})
                    if not Ms:
                        continue

                    def ratio(M, num, den, kind=kind, dtype=dtype, dropout=dropout, mode=mode):
                        return _geomean([index[k].get(num, math.nan) / index[k].get(den, math.nan)
                                         for k in index if k[0] == kind and k[4] == dtype and k[5] == dropout
                                         and k[6] == mode and k[7] == M])

                    color = f"C{i}"
                    label = f"{kind}, dropout {dropout}"
                    if what == "speedup":
                        ax.plot(Ms, [ratio(M, "peft", "fastpeft") for M in Ms], "o-", color=color, label=label)
                    else:
                        ax.plot(Ms, [ratio(M, "fastpeft", "base") for M in Ms], "o-", color=color,
                                label=f"fastpeft: {label}")
                        ax.plot(Ms, [ratio(M, "peft", "base") for M in Ms], "x--", color=color,
                                label=f"peft: {label}")
                ax.axhline(1.0, color="black", linewidth=1.0, label="1x")
                ax.set_xscale("log", base=2)
                # ratios: log scale, so 0.5x and 2x sit as far from 1x and one outlier does not flatten the rest
                ax.set_yscale("log", base=2)
                ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
                ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                ax.set_xlabel("M (tokens per call)")
                ax.set_ylabel("PEFT time / fastpeft time (x)" if what == "speedup"
                              else "time / frozen base time (x)")
                ax.set_title(mode)
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=7, framealpha=0.85)
            title = ("fastpeft speed-up over PEFT" if what == "speedup"
                     else "adapter overhead over the frozen base layer")
            fig.suptitle(f"{title}, {dtype}\n{device}; median times, geometric mean over shapes", fontsize=10)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{what}_{dtype}.png")
            with atomic_file(path, "wb") as f:
                fig.savefig(f, dpi=100, format="png")
            plt.close(fig)
            paths.append(path)
    return paths
