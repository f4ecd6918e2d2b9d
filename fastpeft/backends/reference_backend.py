"""The ``reference`` backend: the contract of ``backends.base`` in plain torch, with hand-written backwards. Runs on
any device. (The executable spec it follows is ``fastpeft.reference``; the tests differentiate that one by autograd,
so this backend's formulas are checked against it, not against themselves.)"""

from __future__ import annotations

from typing import Optional

import torch

from .._philox import dropout_keep_mask
from ..reference import adapter_inputs, apply_dropout
from .base import Backend


def dense_weight(weight) -> torch.Tensor:
    """The ``(N, K)`` dense weight of a Tensor or a ``QuantizedWeight``."""
    return weight if isinstance(weight, torch.Tensor) else weight.dequantize()


class ReferenceBackend(Backend):
    name = "reference"

    def availability(self):
        return True, ""

    def supports(self, x, weight):
        return True

    def lora_forward(self, x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds):
        W = dense_weight(weight)
        y = torch.nn.functional.linear(x, W.to(x.dtype), bias)
        out_dtype = y.dtype
        xa = []
        for xi, A, B, b, s, p, seed in zip(adapter_inputs(x, lora_A), lora_A, lora_B, lora_bias, scaling, dropout_p,
                                           seeds):
            h = apply_dropout(xi.to(A.dtype), p, seed) @ A.t()
            xa.append(h)
            update = h @ B.t()
            if b is not None:
                update = update + b
            y = y + update * s
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
            grad_x = (grad_y @ dense_weight(weight).to(grad_y.dtype)).float()
        inputs = adapter_inputs(x, lora_A) if x is not None else iter(())
        for A, B, h, s, p, seed in zip(lora_A, lora_B, xa, scaling, dropout_p, seeds):
            xi = next(inputs).to(A.dtype) if x is not None else None  # the forward's input of this adapter
            dy = grad_y.to(B.dtype)
            grad_B.append((dy.t() @ h) * s)
            grad_bias.append(dy.sum(0) * s if needs_grad_bias else None)
            g = (dy @ B) * s  # (M, r): gradient reaching xa
            keep_scale = None
            if p > 0:
                keep = dropout_keep_mask(seed, g.shape[0], A.shape[1], p, device=g.device)
                keep_scale = keep.to(A.dtype) / (1.0 - p)
            if needs_grad_A:
                dropped = xi if keep_scale is None else xi * keep_scale
                grad_A.append(g.t() @ dropped)
            else:
                grad_A.append(None)
            if needs_grad_x:
                gx = g @ A
                if keep_scale is not None:
                    gx = gx * keep_scale
                grad_x = grad_x + gx.float()
        if grad_x is not None:
            grad_x = grad_x.to(grad_y.dtype)
        return grad_x, grad_A, grad_B, grad_bias

    def ia3_forward(self, x, weight, bias, scale, is_feedforward):
        W = dense_weight(weight).to(x.dtype)
        if is_feedforward:
            return torch.nn.functional.linear((x.to(scale.dtype) * scale).to(x.dtype), W, bias)
        z = torch.nn.functional.linear(x, W, bias)
        return (z * scale).to(z.dtype)

    def ia3_backward(self, grad_y, x, weight, bias, scale, is_feedforward, needs_grad_x):
        W = dense_weight(weight).to(x.dtype)
        if is_feedforward:
            grad_scaled = grad_y @ W  # (M, K), gradient reaching (x * l)
            grad_scale = (grad_scaled.to(scale.dtype) * x.to(scale.dtype)).sum(0)
            grad_x = (grad_scaled.to(scale.dtype) * scale).to(x.dtype) if needs_grad_x else None
            return grad_x, grad_scale
        z = torch.nn.functional.linear(x, W, bias)  # recomputed: saving it would cost an (M, N) activation
        grad_scale = (grad_y.to(scale.dtype) * z.to(scale.dtype)).sum(0)
        grad_x = ((grad_y.to(scale.dtype) * scale).to(x.dtype) @ W) if needs_grad_x else None
        return grad_x, grad_scale
