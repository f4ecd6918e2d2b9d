"""IA3 in Triton: the learned vector fused into the base GEMM (prologue for feedforward, epilogue otherwise).

Formulas (``l`` the product of the active IA3 vectors, in their dtype)::

    feedforward:  Y = ((X * l).to(x.dtype)) W^T + bias     dX = (dY W) * l      dl = sum_m (dY W) * X
    otherwise:    Y = (X W^T + bias) * l                   dX = (dY * l) W      dl = sum_m dY * (X W^T + bias)

``dl`` is reduced in the GEMM epilogue into per-row-block fp32 partials ``(cdiv(M, BLOCK_M), n)`` summed by torch
(deterministic: no atomics). The non-feedforward backward recomputes ``X W^T + bias`` instead of saving an
``(M, N)`` activation, as the reference does.

Modes: ``"compose"`` runs the base matmul in torch (cuBLAS) with the vector applied to the ``(M, K)`` input or
``(M, N)`` output; ``"fused_gemm"`` puts the vector in the GEMM's prologue or epilogue. The triton backend offers
both as routes and on a GPU takes the one measured fastest (``fastpeft.routing``). ``mode="auto"`` (direct calls,
and the backend under Triton's interpreter, where timings mean nothing) takes ``"compose"`` for
``M < UNMEASURED_SMALL_M``, where a 64-row tile would waste the launch on padding, else ``"fused_gemm"``.
"""

from __future__ import annotations

import torch

from ._common import UNMEASURED_SMALL_M, gpu_config, launch_gemm


def choose_mode(M: int, config=None) -> str:
    """The ``mode="auto"`` rule of the module docstring."""
    return "compose" if (M < UNMEASURED_SMALL_M and config is None) else "fused_gemm"


def ia3_forward(x: torch.Tensor, weight: torch.Tensor, bias, scale: torch.Tensor, is_feedforward: bool,
                config=None, mode: str = "auto") -> torch.Tensor:
    """``x`` ``(M, K)``, ``weight`` ``(N, K)`` (any strides), ``bias`` ``(N,)`` or None, ``scale`` ``(K,)`` if
    ``is_feedforward`` else ``(N,)``. Returns ``y`` ``(M, N)`` in x's dtype. ``mode``: ``"auto"``, ``"compose"``,
    ``"fused_gemm"`` (module docstring)."""
    M, K = x.shape
    N = weight.shape[0]
    W = weight if weight.dtype == x.dtype else weight.to(x.dtype)
    if (choose_mode(M, config) if mode == "auto" else mode) == "compose":
        if is_feedforward:
            return torch.nn.functional.linear((x.to(scale.dtype) * scale).to(x.dtype), W, bias)
        z = torch.nn.functional.linear(x, W, bias)
        return (z * scale).to(z.dtype)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return y
    if is_feedforward:
        launch_gemm(x, W.t(), y, bias=bias, vin=scale, config=config)
    else:
        launch_gemm(x, W.t(), y, bias=bias, vout=scale, config=config)
    return y


def ia3_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias, scale: torch.Tensor,
                 is_feedforward: bool, needs_grad_x: bool, config=None, mode: str = "auto"):
    """Returns ``(dx, dscale)``: ``dx`` ``(M, K)`` in x's dtype (None unless ``needs_grad_x``), ``dscale`` with
    ``scale``'s shape and dtype. ``mode`` as in ``ia3_forward``."""
    M, K = x.shape
    N = grad_y.shape[1]
    W = weight if weight.dtype == x.dtype else weight.to(x.dtype)
    if (choose_mode(M, config) if mode == "auto" else mode) == "compose":
        if is_feedforward:
            gs = grad_y @ W
            dscale = (gs.to(scale.dtype) * x.to(scale.dtype)).sum(0)
            dx = (gs.to(scale.dtype) * scale).to(x.dtype) if needs_grad_x else None
            return dx, dscale
        z = torch.nn.functional.linear(x, W, bias)
        dscale = (grad_y.to(scale.dtype) * z.to(scale.dtype)).sum(0)
        dx = ((grad_y.to(scale.dtype) * scale).to(x.dtype) @ W) if needs_grad_x else None
        return dx, dscale
    cfg = config if config is not None else gpu_config(x)  # the partials' row count depends on BLOCK_M
    blocks = -(-M // cfg[0])
    dx = torch.empty((M, K), device=x.device, dtype=x.dtype) if needs_grad_x else None
    if is_feedforward:
        partial = torch.empty((blocks, K), device=x.device, dtype=torch.float32)
        # one pass: dY W in the main loop; epilogue writes sum_m (dY W) * X, then scales by l for dX
        launch_gemm(grad_y.to(x.dtype), W, dx, vout=scale if needs_grad_x else None, other=x, colsum=partial,
                    store_out=needs_grad_x, config=cfg)
    else:
        partial = torch.empty((blocks, N), device=x.device, dtype=torch.float32)
        launch_gemm(x, W.t(), None, bias=bias, other=grad_y, colsum=partial, store_out=False, config=cfg)
        if needs_grad_x:
            launch_gemm(grad_y.to(x.dtype), W, dx, vin=scale, config=config)
    return dx, partial.sum(0).to(scale.dtype)
