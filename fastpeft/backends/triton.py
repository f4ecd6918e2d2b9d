"""The ``triton`` backend: fused LoRA and IA3 kernels from ``fastpeft.kernels`` (Triton).

Runs CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests without a GPU).
Quantized base weights (``fastpeft.quant.QuantizedWeight``) are served by ``fastpeft.backends.triton_quant`` when
that module exists; this backend declines them otherwise (the dispatcher then falls back to the reference).
"""

from __future__ import annotations

import importlib
import os

import torch

from .base import Backend

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreted_bf16(*tensors) -> bool:
    """Whether this call runs in Triton's interpreter with a bf16 operand.

    The 3.9 interpreter's ``tl.dot`` is wrong on bf16 operands (../shared/ENVIRONMENT.md). Widening bf16 to fp32 is
    exact, and a bf16 tensor-core dot accumulates in fp32 anyway, so interpreted runs widen the operands and round
    the results back to the contract's dtypes. Compiled GPU kernels never take this path; their bf16 code is covered
    by the ahead-of-time compile tests.
    """
    return _interpret() and any(t is not None and t.dtype == torch.bfloat16 for t in tensors)


def _widen(t):
    if isinstance(t, (list, tuple)):
        return [_widen(u) for u in t]
    return t.float() if t is not None and t.dtype == torch.bfloat16 else t


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def _quant():
    """``fastpeft.backends.triton_quant`` or None while it does not exist (or fails to import)."""
    try:
        return importlib.import_module(".triton_quant", __package__)
    except ImportError:
        return None


class TritonBackend(Backend):
    name = "triton"

    def availability(self):
        try:
            import triton  # noqa: F401

            from fastpeft.kernels import lora  # noqa: F401  (compiles nothing: only defines the kernels)
        except Exception as exc:
            return False, f"triton is not importable ({type(exc).__name__}: {exc})"
        if not torch.cuda.is_available() and not _interpret():
            return False, "no CUDA device, and TRITON_INTERPRET is not '1' (set it before importing triton to run " \
                          "the kernels on CPU tensors in Triton's interpreter)"
        return True, ""

    def supports(self, x, weight):
        if not isinstance(weight, torch.Tensor):
            quant = _quant()
            return bool(quant is not None and quant.supports(x, weight))
        if x.dtype not in _FLOATS or weight.dtype not in _FLOATS or x.dim() != 2 or weight.dim() != 2:
            return False
        if weight.layout != torch.strided or x.layout != torch.strided:
            return False
        if x.device.type == "cuda" and weight.device == x.device:
            return True
        return x.device.type == "cpu" and weight.device.type == "cpu" and _interpret()

    # ----------------------------------------------------------------------------------------------------- LoRA
    def lora_forward(self, x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds):
        if not isinstance(weight, torch.Tensor):
            return _quant().lora_forward(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds)
        from fastpeft.kernels import lora

        if _interpreted_bf16(x, weight, bias, *lora_A, *lora_B, *lora_bias):
            y, xa = lora.lora_forward(*_widen([x, weight, bias, lora_A, lora_B, lora_bias]), scaling, dropout_p, seeds)
            return y.to(x.dtype), [h.to(A.dtype) for h, A in zip(xa, lora_A)]
        return lora.lora_forward(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds)

    def lora_backward(self, grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x,
                      needs_grad_A):
        if not isinstance(weight, torch.Tensor):
            return _quant().lora_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds,
                                          needs_grad_x, needs_grad_A)
        from fastpeft.kernels import lora

        if _interpreted_bf16(grad_y, x, weight, *lora_A, *lora_B, *xa):
            dx, dA, dB, db = lora.lora_backward(*_widen([grad_y, x, weight, lora_A, lora_B, xa]), scaling, dropout_p,
                                                seeds, needs_grad_x, needs_grad_A)
            return (_cast(dx, grad_y.dtype), [_cast(g, A.dtype) for g, A in zip(dA, lora_A)],
                    [g.to(B.dtype) for g, B in zip(dB, lora_B)], [g.to(B.dtype) for g, B in zip(db, lora_B)])
        return lora.lora_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x,
                                  needs_grad_A)

    # ------------------------------------------------------------------------------------------------------ IA3
    def ia3_forward(self, x, weight, bias, scale, is_feedforward):
        if not isinstance(weight, torch.Tensor):
            return _quant().ia3_forward(x, weight, bias, scale, is_feedforward)
        from fastpeft.kernels import ia3

        if _interpreted_bf16(x, weight, bias, scale):
            return ia3.ia3_forward(*_widen([x, weight, bias, scale]), is_feedforward).to(x.dtype)
        return ia3.ia3_forward(x, weight, bias, scale, is_feedforward)

    def ia3_backward(self, grad_y, x, weight, bias, scale, is_feedforward, needs_grad_x):
        if not isinstance(weight, torch.Tensor):
            return _quant().ia3_backward(grad_y, x, weight, bias, scale, is_feedforward, needs_grad_x)
        from fastpeft.kernels import ia3

        if _interpreted_bf16(grad_y, x, weight, bias, scale):
            dx, dscale = ia3.ia3_backward(*_widen([grad_y, x, weight, bias, scale]), is_feedforward, needs_grad_x)
            return _cast(dx, x.dtype), dscale.to(scale.dtype)
        return ia3.ia3_backward(grad_y, x, weight, bias, scale, is_feedforward, needs_grad_x)


BACKEND = TritonBackend()
