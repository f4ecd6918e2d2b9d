"""The ``cuda`` backend: cuBLAS (torch matmul) for the base GEMM, fastpeft's CUDA kernels (``fastpeft._cuda``,
built from ``csrc/cuda``) for the LoRA and IA3 parts around it.

This is the other side of the dispatch rule from the Triton backend's one big fused GEMM: where fusing the adapter
into the base GEMM does not pay (few tokens, so the base GEMM is a weight-bound GEMV that cuBLAS already does well),
the base runs as a plain GEMM and the adapter as small tensor-core kernels that never materialise the dropout mask
or ``drop(x)``:

- forward: ``y = x W^T + bias`` (cuBLAS), then per adapter ``xa = lora_down_dropout(x, A)`` (mask drawn in
  registers) and ``y += s * (xa B^T + b)`` in place (``lora_up_epilogue_``);
- backward: ``dx = dY W`` (cuBLAS), ``g = s * dY B`` and ``dB = s * dY^T xa`` (cuBLAS, small), then
  ``dx += (g A) * mask / (1 - p)`` in place and ``dA = g^T drop(x)`` with the mask regenerated from the seed;
- IA3: the column scale of ``x`` (feedforward) or of ``y`` (in place), and the vector gradient as one column
  reduction, around cuBLAS GEMMs.

The tensor-core kernels take 16-bit adapters (fp16/bf16, the same dtype for A and B). Adapters kept in fp32 (PEFT's
default under a bf16 base) go through the same formulas in torch, with the reference's mask; so does any other
combination the kernels do not take. Under ``auto`` it is one route (``cuda_kernels``) of the Triton backend's dense
ops, chosen where it measures fastest (``fastpeft.routing``), and the backend of CUDA calls where Triton is
unavailable; forced by name it serves every CUDA call with a dense weight. Quantized weights it never takes (it
would dequantize the whole weight per call): they go to the Triton backend's dequantizing kernels.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..reference import adapter_inputs, apply_dropout
from .base import Backend
from .reference_backend import dense_weight

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_HALF = (torch.float16, torch.bfloat16)


def _ext():
    import fastpeft._cuda as ext

    return ext


def _tensor_cores(A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether the tensor-core kernels take this adapter: fp16/bf16, A and B in one dtype, on the GPU."""
    return A.dtype in _HALF and B.dtype == A.dtype and A.is_cuda and B.is_cuda


def _unit_cols(t: torch.Tensor) -> torch.Tensor:
    """The kernels index rows by stride and need contiguous columns."""
    return t if t.stride(-1) == 1 else t.contiguous()


class CudaBackend(Backend):
    name = "cuda"

    def availability(self):
        try:
            if not torch.cuda.is_available():
                return False, f"torch {torch.__version__} has no usable CUDA (CPU build or no driver)"
            if torch.cuda.device_count() == 0:
                return False, "no CUDA device visible"
            major, _ = torch.cuda.get_device_capability()
            if major < 8:
                return False, f"the kernels use bf16 tensor cores (sm_80+); device is sm_{major}x"
            _ext()
        except ImportError as exc:
            return False, f"the extension fastpeft._cuda is not built (reinstall where torch has CUDA and CUDA_HOME " \
                          f"is set, without FASTPEFT_SKIP_CUDA_BUILD=1): {exc}"
        except Exception as exc:
            return False, f"CUDA check failed ({type(exc).__name__}: {exc})"
        return True, ""

    def supports(self, x, weight):
        # Quantized bases go to the Triton backend's dequantizing kernels: this backend would dequantize the whole
        # weight on every call.
        if not isinstance(weight, torch.Tensor):
            return False
        if x.device.type != "cuda" or x.dtype not in _FLOATS or x.dim() != 2 or x.layout != torch.strided:
            return False
        return weight.device == x.device and weight.dim() == 2

    # ----------------------------------------------------------------------------------------------------- LoRA
    def lora_forward(self, x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds):
        y = torch.nn.functional.linear(x, dense_weight(weight).to(x.dtype), bias)
        out_dtype = y.dtype
        xa = []
        for xi, A, B, b, s, p, seed in zip(adapter_inputs(x, lora_A), lora_A, lora_B, lora_bias, scaling, dropout_p,
                                           seeds):
            xi = xi.to(A.dtype)
            if _tensor_cores(A, B) and y.dtype in (A.dtype, torch.float32):
                h = _ext().lora_down_dropout(xi, A, float(p), int(seed))
                _ext().lora_up_epilogue_(y, h, B, b, float(s))
            else:
                h = apply_dropout(xi, p, seed) @ A.t()
                update = h @ B.t()
                if b is not None:
                    update = update + b
                y = y + update * s
            xa.append(h)
        return y.to(out_dtype), xa

    def lora_backward(
        self, grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x, needs_grad_A,
        needs_grad_bias=True,
    ):
        grad_A: list[Optional[torch.Tensor]] = []
        grad_B: list[torch.Tensor] = []
        grad_bias: list[torch.Tensor] = []
        grad_x = None
        if needs_grad_x:
            grad_x = grad_y @ dense_weight(weight).to(grad_y.dtype)
            # One adapter in dx's own dtype adds in place with one rounding; several sum in fp32 as the reference.
            if len(lora_A) != 1 or grad_x.dtype != lora_A[0].dtype:
                grad_x = grad_x.float()
        inputs = adapter_inputs(x, lora_A) if needs_grad_A else iter(())
        for A, B, h, s, p, seed in zip(lora_A, lora_B, xa, scaling, dropout_p, seeds):
            xi = next(inputs).to(A.dtype) if needs_grad_A else None
            dy = grad_y.to(B.dtype)
            grad_B.append((dy.t() @ h) * s)
            grad_bias.append(dy.sum(0) * s)
            g = (dy @ B) * s  # (M, r): the gradient reaching xa
            if _tensor_cores(A, B):
                grad_A.append(_ext().lora_grad_A(g, xi, float(p), int(seed)) if needs_grad_A else None)
                if needs_grad_x:
                    _ext().lora_backward_dx_mask_(grad_x, g, A, float(p), int(seed))
                continue
            dropped = apply_dropout(xi, p, seed) if needs_grad_A else None
            grad_A.append(g.t() @ dropped if needs_grad_A else None)
            if needs_grad_x:
                gx = g @ A
                if p > 0:
                    gx = apply_dropout(gx, p, seed)  # same mask over (M, K), same 1/(1-p) scale
                grad_x = grad_x + gx.float()
        if grad_x is not None:
            grad_x = grad_x.to(grad_y.dtype)
        return grad_x, grad_A, grad_B, grad_bias

    # ------------------------------------------------------------------------------------------------------ IA3
    def ia3_forward(self, x, weight, bias, scale, is_feedforward):
        W = dense_weight(weight).to(x.dtype)
        if is_feedforward:
            xc = _unit_cols(x)
            scaled = torch.empty_like(xc)
            _ext().ia3_scale_cols(scaled, xc, scale)
            return torch.nn.functional.linear(scaled, W, bias)
        z = torch.nn.functional.linear(x, W, bias)
        _ext().ia3_scale_cols(z, z, scale)  # in place: (z * scale) rounded to z's dtype
        return z

    def ia3_backward(self, grad_y, x, weight, bias, scale, is_feedforward, needs_grad_x):
        W = dense_weight(weight).to(x.dtype)
        if is_feedforward:
            grad_scaled = grad_y @ W  # (M, K), the gradient reaching x * l
            grad_scale = _ext().ia3_col_dot(grad_scaled, _unit_cols(x).to(grad_scaled.dtype), scale.dtype)
            grad_x = None
            if needs_grad_x:
                _ext().ia3_scale_cols(grad_scaled, grad_scaled, scale)
                grad_x = grad_scaled.to(x.dtype)
            return grad_x, grad_scale
        z = torch.nn.functional.linear(x, W, bias)  # recomputed: saving it would cost an (M, N) activation
        gy = _unit_cols(grad_y)
        if gy.dtype == z.dtype:
            grad_scale = _ext().ia3_col_dot(gy, z, scale.dtype)
        else:
            grad_scale = (gy.to(scale.dtype) * z.to(scale.dtype)).sum(0)
        grad_x = None
        if needs_grad_x:
            scaled = torch.empty_like(gy)
            _ext().ia3_scale_cols(scaled, gy, scale)
            grad_x = scaled.to(x.dtype) @ W
        return grad_x, grad_scale


BACKEND = CudaBackend()
