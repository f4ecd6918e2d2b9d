"""Drive every Triton launcher of fastpeft once per case that a GPU would compile, under ``_common.RECORDER``.

Run as ``TRITON_INTERPRET=1 python -m fastpeft.kernels.record_launches OUT.json`` (``compile_check.record`` does):
small CPU tensors through Triton's interpreter, whose numbers are not checked here (other tests check them; the
interpreter's bf16 ``tl.dot`` is wrong anyway). What is kept is each launch's specialization, written to ``OUT.json``
for ``compile_check`` to compile for sm_80 and sm_90.

The cases: the triton backend's LoRA forward and backward with every route pinned in turn (``compose``, ``passes``,
``split_gemm``, ``fused_gemm``), ranks 8, 16 and 64 and two adapters of ranks 8 and 16, adapters in the base's dtype
and fp32 adapters over bf16 and fp16 bases, dropout 0 and 0.1, M = 37 (not a multiple of 16) and M = 1 (decode);
IA3 forward and backward (feedforward or not) on both routes; the quantized half (NF4 with and without double
quantization and with blocks of 32, int8) on both of its routes (decoded in the K loop, or once into a buffer) for
LoRA with and without dropout and for IA3; the mixed-adapter shrink and expand kernels.
K and N are multiples of 16, as a transformer's are. The backend's interpreter-only widening of bf16 operands is
switched off, so bf16 launches are recorded as a GPU runs them.
"""

from __future__ import annotations

import itertools
import json
import sys

import torch

# (base/input dtype, adapter dtype): PEFT's default fp32 adapters over a bf16 or fp16 base, and adapters in the base's
# dtype (bf16, fp32; fp16's launches are bf16's with the other 16-bit type, its fp32-adapter pair is kept)
DTYPE_PAIRS = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
               (torch.float32, torch.float32)]
RANKS = [(8,), (16,), (64,)]
PEFT_DEFAULT = (torch.bfloat16, torch.float32)
# two adapters at once (ranks concatenated to 24, padded to 32), over PEFT's default pair
TWO_ADAPTERS = (8, 16)
DROPOUTS = [0.0, 0.1]
TRAIN_M, DECODE_M = 37, 1  # training rows (not a multiple of 16) and decoding one token (forward, no dropout)
K, N = 64, 96
LORA_ROUTES = ["compose", "passes", "split_gemm", "fused_gemm"]


def _adapters(ranks, dtype, g):
    A = [torch.randn(r, K, generator=g).to(dtype) for r in ranks]
    B = [torch.randn(N, r, generator=g).to(dtype) for r in ranks]
    return A, B


def _lora_calls(dt, adt, ranks=RANKS):
    """``(M, ranks, p, backward)`` of the LoRA calls for one dtype pair: training at every rank with and without
    dropout, and over PEFT's default pair two adapters and decoding (rank 16)."""
    for r in ranks + ([TWO_ADAPTERS] if (dt, adt) == PEFT_DEFAULT else []):
        for p in DROPOUTS:
            yield TRAIN_M, r, p, True
    if (dt, adt) == PEFT_DEFAULT:
        yield DECODE_M, (16,), 0.0, False


def _lora_cases(backend, routing, g):
    for dt, adt in DTYPE_PAIRS:
        for M, ranks, p, backward in _lora_calls(dt, adt):
            x = torch.randn(M, K, generator=g).to(dt)
            W = torch.randn(N, K, generator=g).to(dt)
            bias = torch.randn(N, generator=g).to(dt) if ranks == (16,) else None  # with and without a bias
            A, B = _adapters(ranks, adt, g)
            n = len(ranks)
            drops = [p] + [0.0] * (n - 1)  # several adapters: one with dropout, as the fused dX allows
            scaling, seeds = [0.5] * n, [11 + i for i in range(n)]
            dy = torch.randn(M, N, generator=g).to(dt)
            for route in LORA_ROUTES:
                routing.set_route("lora_forward", route)
                routing.set_route("lora_backward", route)
                _, xa = backend.lora_forward(x, W, bias, A, B, [None] * n, scaling, drops, seeds)
                if backward:
                    backend.lora_backward(dy, x, W, A, B, xa, scaling, drops, seeds, True, True)


def _ia3_cases(backend, routing, g):
    for (dt, vdt), ff, M in itertools.product(DTYPE_PAIRS, (True, False), (TRAIN_M, DECODE_M)):
        x = torch.randn(M, K, generator=g).to(dt)
        W = torch.randn(N, K, generator=g).to(dt)
        scale = (torch.rand(K if ff else N, generator=g) + 0.5).to(vdt)
        dy = torch.randn(M, N, generator=g).to(dt)
        for route in ("compose", "fused_gemm"):
            routing.set_route("ia3_forward", route)
            routing.set_route("ia3_backward", route)
            backend.ia3_forward(x, W, None, scale, ff)
            if M == TRAIN_M:
                backend.ia3_backward(dy, x, W, None, scale, ff, True)


def _quantized_weights(dtype, g):
    """The quantized forms of one ``(N, K)`` weight of ``dtype``: NF4 with double quantization (QLoRA's usual),
    NF4 without, NF4 with blocks of 32 (absmax blocks narrower than a tile: the per-element scale path; bf16 only),
    and int8 (whose dequantized dtype is fp32 whatever the model's). FP4 launches are NF4's: the code table is
    data."""
    import bitsandbytes as bnb

    from fastpeft.quant import QuantizedWeight

    w = torch.randn(N, K, generator=g) * 0.2
    forms = [(True, 64), (False, 64)] + ([(True, 32)] if dtype == torch.bfloat16 else [])
    for nested, blocksize in forms:
        packed, state = bnb.functional.quantize_4bit(w.to(dtype), blocksize=blocksize, compress_statistics=nested,
                                                     quant_type="nf4")
        yield QuantizedWeight.from_quant_state(packed, state)
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.half())
    yield QuantizedWeight(kind="int8", shape=(N, K), dtype=torch.float32, data=cb, absmax=scb)


# QLoRA keeps its adapters in fp32 (PEFT's default); the quantized kernels cast the up-projection to x's dtype
QUANT_DTYPE_PAIRS = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float32)]


def _quantized_cases(routing, g):
    from fastpeft.backends.triton import quantized

    quantized.USE_LORA_KERNELS = True  # the CUDA route of dropout: fastpeft.kernels.lora's masked kernels
    for (dt, adt), route in itertools.product(QUANT_DTYPE_PAIRS, quantized.ROUTES):
        for op in ("lora_forward", "lora_backward", "ia3_forward", "ia3_backward"):
            routing.set_route(op, route)
        for qw in _quantized_weights(dt, g):
            for M, ranks, p, backward in _lora_calls(dt, adt, ranks=[(8,), (16,)]):
                x = torch.randn(M, K, generator=g).to(dt)
                dy = torch.randn(M, N, generator=g).to(dt)
                A, B = _adapters(ranks, adt, g)
                n = len(ranks)
                drops, scaling, seeds = [p] + [0.0] * (n - 1), [0.5] * n, list(range(n))
                _, xa = quantized.lora_forward(x, qw, None, A, B, [None] * n, scaling, drops, seeds)
                if backward:
                    quantized.lora_backward(dy, x, qw, A, B, xa, scaling, drops, seeds, True, True)
            x = torch.randn(TRAIN_M, K, generator=g).to(dt)
            dy = torch.randn(TRAIN_M, N, generator=g).to(dt)
            for ff in (True, False):
                scale = (torch.rand(K if ff else N, generator=g) + 0.5).to(adt)
                quantized.ia3_forward(x, qw, None, scale, ff)
                quantized.ia3_backward(dy, x, qw, None, scale, ff, True)


def _mixed_cases(g):
    from fastpeft.kernels import mixed_lora

    for dt, ranks, M in itertools.product((torch.float16, torch.bfloat16, torch.float32), ((8, 16), (64, 8)),
                                          (TRAIN_M, 2)):
        x = torch.randn(M, K, generator=g).to(dt)
        y = torch.randn(M, N, generator=g).to(dt)
        A, B = _adapters(ranks, torch.float32, g)
        stacked = mixed_lora.stack_adapters(A, B, [None, None], [0.5, 2.0], K, N, x.device)
        rows = [torch.arange(0, M, 2), torch.arange(1, M, 2)]  # decoding two sequences, one row each
        mixed_lora.mixed_lora_(y, x, mixed_lora.blocks_of(rows, x.device), *stacked)


def record(path: str) -> int:
    """Run every case under a ``compile_check.LaunchRecorder`` and write its specs to ``path``; returns their
    count."""
    from fastpeft import routing
    from fastpeft.backends import triton as triton_backend

    from . import _common
    from .compile_check import LaunchRecorder

    if not _common.interpreting():
        raise RuntimeError("record_launches runs under Triton's interpreter: set TRITON_INTERPRET=1 before Python")
    triton_backend._interpreted_bf16 = lambda *tensors: False  # record bf16 launches as a GPU makes them
    recorder = LaunchRecorder(run=False)  # outputs stay unwritten: only shapes and dtypes matter here
    _common.RECORDER = recorder
    g = torch.Generator().manual_seed(0)
    try:
        backend = triton_backend.BACKEND
        _lora_cases(backend, routing, g)
        _ia3_cases(backend, routing, g)
        _quantized_cases(routing, g)
        _mixed_cases(g)
    finally:
        _common.RECORDER = None
        routing.set_route(None, None)
    with open(path, "w") as f:
        json.dump(recorder.to_json(), f)
    return len(recorder.specs)


if __name__ == "__main__":
    print(f"recorded {record(sys.argv[1])} kernel specializations")
