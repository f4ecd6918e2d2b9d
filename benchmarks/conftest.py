"""pytest-benchmark suite for fastpeft's layer cases (``make bench``; not part of ``make test``).

The grid is the CLI's (``fastpeft.bench.cases``), kept small by default so it runs on a 2-core CPU in minutes;
widen it with environment variables (read by ``test_bench_layers.py``):

- ``FASTPEFT_BENCH_SCALE`` (default 16 on the CPU, 1 on CUDA): divides the LLaMA shapes;
- ``FASTPEFT_BENCH_TOKENS`` (default ``16,512``), ``FASTPEFT_BENCH_DTYPES`` (default ``fp32,bf16``),
  ``FASTPEFT_BENCH_KINDS`` (default ``lora,ia3,qlora-nf4``), ``FASTPEFT_BENCH_SHAPES`` (default ``7b-qkvo``),
  ``FASTPEFT_BENCH_MODES`` (default ``fwd,fwd+bwd``);
- ``FASTPEFT_BENCH_PROVIDERS`` (default: ``base,peft,fastpeft`` and ``fastpeft-<name>`` for each available backend
  but ``reference``);
- ``FASTPEFT_BENCH_THREADS`` (default 2): ``torch.set_num_threads`` on the CPU.

Each case is a pytest-benchmark group, so ``--benchmark-only`` prints base, peft and every fastpeft provider side by
side. For tables, plots and interleaved medians use ``python -m fastpeft.bench`` instead.
"""

from __future__ import annotations

import os

import torch

torch.set_num_threads(int(os.environ.get("FASTPEFT_BENCH_THREADS", "2")))
