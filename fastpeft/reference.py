"""The executable spec of fastpeft: PEFT's LoRA and IA3 semantics, written plainly in torch.

Used three ways: as the ``reference`` backend (the fallback that runs anywhere), by every test as the oracle beside
PEFT itself, and by the benchmarks as a baseline. Everything here is differentiable by torch autograd, so the
reference gradients are autograd's, not a second hand-written formula.

Shapes: ``x`` is ``(M, K)``; ``weight`` is ``(N, K)`` (for ``fan_in_fan_out`` pass the transposed view of the stored
``(K, N)`` weight); ``lora_A[i]`` is ``(r_i, K)``; ``lora_B[i]`` is ``(N, r_i)``; biases are ``(N,)``.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch

from ._philox import dropout_keep_mask


def apply_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``drop(x)``: ``x * keep / (1 - p)`` with fastpeft's Philox mask (see ``fastpeft._philox``); identity at p=0."""
    if p <= 0.0:
        return x
    if p >= 1.0:
        return torch.zeros_like(x)
    keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], p, device=x.device)
    return x * keep.to(x.dtype) / (1.0 - p)


def adapter_inputs(x: torch.Tensor, lora_A: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The input each adapter sees in PEFT's forward, in order: PEFT's ``_cast_input_dtype`` runs cumulatively over
    the active adapters (``x`` cast to ``A_1``'s dtype, that to ``A_2``'s, ...), so a narrowing step rounds every
    later adapter's input too. A widening step (to the same dtype or to fp32) is exact and left out: the value is the
    same, and a pass can widen in registers instead of copying ``x``. Yields ``x_i`` lazily; cast ``x_i`` to
    ``A_i.dtype`` where a computation needs that dtype."""
    xi = x
    for A in lora_A:
        if not (xi.dtype == A.dtype or A.dtype == torch.float32):
            xi = xi.to(A.dtype)
        yield xi


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    lora_bias: Sequence[Optional[torch.Tensor]],
    scaling: Sequence[float],
    dropout_p: Sequence[float],
    seeds: Sequence[int],
) -> torch.Tensor:
    """PEFT's ``lora.Linear.forward`` for a 2-D input, adapters applied in order.

    ``y = base(x) + sum_i s_i * (drop_i(x_i) A_i^T B_i^T + b_i)`` where ``x_i`` is ``x`` cast to ``A_i``'s dtype (as
    PEFT's ``_cast_input_dtype`` does, cumulatively), each adapter term is computed in its own dtype, the sum is
    carried in the promoted dtype and the result is cast back to the base output's dtype.
    """
    return add_lora_terms(torch.nn.functional.linear(x, weight, bias), x, lora_A, lora_B, lora_bias, scaling,
                          dropout_p, seeds)


def add_lora_terms(result: torch.Tensor, x: torch.Tensor, lora_A, lora_B, lora_bias, scaling, dropout_p,
                   seeds) -> torch.Tensor:
    """PEFT's adapter terms added to a base output ``result`` ``(M, N)`` for ``x`` ``(M, K)``, as in
    :func:`lora_linear`; returns ``(M, N)`` in ``result``'s dtype."""
    result_dtype = result.dtype
    for xi, A, B, b, s, p, seed in zip(adapter_inputs(x, lora_A), lora_A, lora_B, lora_bias, scaling, dropout_p,
                                       seeds):
        xi = xi.to(A.dtype)
        update = torch.nn.functional.linear(torch.nn.functional.linear(apply_dropout(xi, p, seed), A), B, b)
        result = result + update * s
    return result.to(result_dtype)


def ia3_scale_vector(ia3_vectors: Sequence[torch.Tensor]) -> tuple[torch.Tensor | float, torch.dtype | None]:
    """Product of the active IA3 vectors (flattened) and the dtype of the last one, as PEFT forms them."""
    scale: torch.Tensor | float = 1.0
    dtype = None
    for vector in ia3_vectors:
        dtype = vector.dtype
        scale = scale * vector.flatten()
    return scale, dtype


def ia3_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    ia3_vectors: Sequence[torch.Tensor],
    is_feedforward: bool,
) -> torch.Tensor:
    """PEFT's ``ia3.Linear.forward`` for a 2-D input.

    Feedforward modules scale the input: ``y = base((x * l).to(x.dtype))`` with ``l`` of shape ``(K,)``; others scale
    the output: ``y = (base(x) * l).to(base dtype)`` with ``l`` of shape ``(N,)``. ``l`` is the product of all active
    vectors.
    """
    previous_dtype = x.dtype
    scale, dtype = ia3_scale_vector(ia3_vectors)
    if dtype is None:
        return torch.nn.functional.linear(x, weight, bias)
    if is_feedforward:
        scaled = (x.to(dtype) * scale).to(previous_dtype)
        return torch.nn.functional.linear(scaled, weight, bias)
    result = torch.nn.functional.linear(x, weight, bias)
    return (result * scale).to(result.dtype)


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
) -> torch.Tensor:
    """PEFT's ``lora.Linear.forward`` with one DoRA adapter (``DoraLinearLayer``) for a 2-D input, written as PEFT
    writes it: the adapted weight ``W + s B A`` is formed, its row norms are taken in the adapter's dtype and
    detached, and ``c = m / n`` scales the base and low-rank products::

        p = 0:  y = base(x) + (c - 1) * (base(x) - b) + c * s * x A^T B^T
        p > 0:  y = base(x) + (c - 1) * drop(x) W^T + c * s * drop(x) A^T B^T

    ``x`` is cast to ``lora_A``'s dtype for the adapter (PEFT's input cast), the base output keeps ``x``'s dtype.
    """
    result = torch.nn.functional.linear(x, weight, bias)
    result_dtype = result.dtype
    xi = x.to(lora_A.dtype)
    w = weight.to(xi.dtype)
    lora_weight = (lora_B @ lora_A).to(xi.dtype)
    norm = torch.linalg.norm(w + scaling * lora_weight.detach(), dim=1).to(w.dtype).detach()
    scale = (magnitude / norm).view(1, -1)
    if dropout_p > 0:
        xi = apply_dropout(xi, dropout_p, seed)
        base_result = torch.nn.functional.linear(xi, w)
    else:
        base_result = result if bias is None else result - bias
    lora = torch.nn.functional.linear(torch.nn.functional.linear(xi, lora_A), lora_B)
    out = result + (scale - 1) * base_result + scale * lora * scaling
    return out.to(result_dtype)
