"""The contract every fastpeft backend implements.

A backend is a set of plain (non-autograd) forward and backward functions. ``fastpeft.functional`` owns autograd,
decides what to save, draws the dropout seeds, and calls these. Every backend must agree with
``fastpeft.reference`` (outputs and gradients), including the dropout mask, which is defined in
``fastpeft._philox`` and regenerated from ``seeds`` (never stored).

Conventions shared by all functions below:

- ``x``: ``(M, K)``, any strides, dtype fp16/bf16/fp32. The functional layer flattens leading dims first.
- ``weight``: ``(N, K)``, any strides (``fan_in_fan_out`` layers pass the transposed view of their ``(K, N)``
  storage), same dtype as ``x``; or a ``fastpeft.quant.QuantizedWeight`` for 4-bit/8-bit bases (a backend that
  cannot fuse dequantization calls ``weight.dequantize()``).
- ``bias``: ``(N,)`` or None.
- ``lora_A[i]``: ``(r_i, K)``, ``lora_B[i]``: ``(N, r_i)``, ``lora_bias[i]``: ``(N,)`` or None; adapter tensors
  may be in a different dtype than ``x`` (PEFT keeps them in fp32 under a bf16 base by default). Adapter ``i``
  sees ``x`` cast to ``lora_A[i].dtype``.
- ``scaling[i]``: float; ``dropout_p[i]``: float in [0, 1) (0 in eval mode); ``seeds[i]``: int in [0, 2**31).
- Accumulate in fp32. Outputs keep PEFT's dtypes: ``y`` in ``x``'s dtype, ``xa[i]`` in ``lora_A[i]``'s dtype,
  each gradient in its parameter's dtype.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import reference


class Backend:
    """Base class: a named backend that may or may not be usable here.

    Subclasses set ``name``, implement ``availability`` and the kernels. ``supports`` says whether this backend
    can run a given call (device, dtype, quantized weight kind); the dispatcher falls back to the reference when a
    chosen backend declines a call it cannot serve, and says so once.
    """

    name = "base"

    def availability(self) -> tuple[bool, str]:
        """``(True, "")`` when usable in this process, else ``(False, reason)``; must never raise."""
        raise NotImplementedError

    def supports(self, x: torch.Tensor, weight) -> bool:
        """Whether this backend serves a call with input ``x`` and base ``weight`` (Tensor or QuantizedWeight)."""
        raise NotImplementedError

    def timings_mean_something(self) -> bool:
        """Whether timing this backend's routes says anything about their speed (not under an interpreter); where
        not, ops take a fixed route instead of measuring (``fastpeft.routing.run(..., unmeasured=...)``)."""
        return True

    def dropout_scale(self, rows: int, cols: int, p: float, seed: int, device) -> Optional[torch.Tensor]:
        """``mask / (1 - p)`` as fp32 ``(rows, cols)`` for ``seed`` (``fastpeft._philox``'s mask, element ``(m, k)``
        at offset ``m * cols + k``) by one pass of this backend, or None where it has none."""
        return None

    def dropout_combine(self, a: Optional[torch.Tensor], b: torch.Tensor, p: float, seed: int, kept: float,
                        dropped: float, out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """``a + b * (kept where dropout_scale's mask keeps, else dropped)`` computed in fp32 and rounded once to
        ``out``'s dtype (``out`` None: a new tensor of ``b``'s dtype; it may be ``a``), for ``(M, N)`` ``b`` and
        ``a`` None or like ``b``; ``dropped == 0`` writes 0 whatever ``b`` holds. One pass of this backend with the
        mask drawn as it goes (no ``(M, N)`` mask), or None where it has none."""
        return None

    def scale_columns(self, z: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                      add: Optional[torch.Tensor] = None,
                      out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """``add + z * scale`` computed in fp32 and rounded once to ``dtype`` (``z`` ``(M, N)``, ``scale`` fp32
        ``(N,)``, ``add`` None, fp32 ``(N,)`` or ``(M, N)``) by one pass of this backend, written into ``out``
        (``(M, N)`` of ``dtype``, e.g. rows of a larger buffer) when given, or None where it has none (``out``
        untouched)."""
        return None

    def column_dots(self, a: torch.Tensor, b: torch.Tensor) -> Optional[torch.Tensor]:
        """``sum_m a[m, :] * b[m, :]`` as fp32 ``(N,)`` for ``(M, N)`` tensors, products and sums in fp32, by one pass
        of this backend, or None where it has none."""
        return None

    def dora_grad_prologue(self, dy: torch.Tensor, z: Optional[torch.Tensor], scale: torch.Tensor,
                           with_e: bool) -> Optional[tuple]:
        """DoRA's backward prologue in one pass over ``dy`` ``(M, N)``: ``(dots, ge)`` with ``dots`` =
        ``column_dots(dy, z)`` (None without ``z``) and ``ge`` ``(M, N)`` = ``dy * scale`` in ``dy``'s dtype, or
        ``(2M, N)`` with ``dy * (scale - 1)`` below it (``with_e``), each rounded once as ``scale_columns`` rounds;
        ``scale`` fp32 ``(N,)``. None where this backend has no such pass."""
        return None

    # ---------------------------------------------------------------------------------------- widened products
    def widened_mm_eligible(self, a: torch.Tensor, b: torch.Tensor, interleave_a: bool = True) -> bool:
        """Whether ``widened_mm(a, b)`` runs here for these operands: with ``interleave_a`` (the default) under both
        values of it (``b`` of unit column stride), else without it (``b`` may also be the transposed view of a
        row-major matrix)."""
        return False

    def widened_mm(self, a: torch.Tensor, b: torch.Tensor, interleave_a: bool = False) -> torch.Tensor:
        """``a b^T`` ``(M, N)`` in fp32 for bf16 ``a`` ``(M, K)`` and ``b`` ``(N, K)``: every product exact, the sums in
        fp32, so the same numbers as an fp32 GEMM on widened copies up to the order of the sums, but with neither
        operand widened. ``interleave_a``: the kernel rearranges ``a`` rather than tiles of ``b`` (the same numbers;
        which is faster depends on the shapes). Only where ``widened_mm_eligible``."""
        raise NotImplementedError(f"backend {self.name!r} has no widened bf16 product")

    def widened_mm_parts(self, parts: Sequence[torch.Tensor], b: torch.Tensor) -> list:
        """``[a b^T for a in parts]`` as ``widened_mm`` computes each (``b`` may also be the transposed view of a
        row-major matrix, as ``widened_mm_eligible(a, b, interleave_a=False)`` allows), where the backend can in one
        pass over ``b`` for all of them. Default: one ``widened_mm`` each."""
        return [self.widened_mm(a, b) for a in parts]

    def lora_down(self, x: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
        """``x A^T`` ``(M, r)`` in fp32 for ``x`` ``(M, K)`` of any float dtype and ``lora_A`` ``(r, K)``: products and
        sums in fp32. Default: torch, ``x`` widened a block of rows at a time (at most half of them: no whole fp32
        copy of it, which for DoRA's ``W A^T`` would be an ``N x K`` tensor)."""
        At = lora_A.detach().to(torch.float32).t()
        out = torch.empty(x.shape[0], At.shape[1], dtype=torch.float32, device=x.device)
        rows = max(1, min((x.shape[0] + 1) // 2, (1 << 18) // max(1, x.shape[1])))
        for start in range(0, x.shape[0], rows):
            torch.mm(x[start:start + rows].to(torch.float32), At, out=out[start:start + rows])
        return out

    def lora_up_onto(self, acc: torch.Tensor, h: torch.Tensor, lora_B: torch.Tensor, scale: float,
                     bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``acc += scale h B^T (+ bias)`` in place and returned: ``acc`` fp32 ``(M, N)`` (rows of a larger buffer
        allowed), ``h`` fp32 ``(M, r)``, ``lora_B`` ``(N, r)``, ``bias`` fp32 ``(N,)`` or None. Default: torch."""
        acc.addmm_(h, lora_B.detach().to(torch.float32).t(), alpha=scale)
        return acc if bias is None else acc.add_(bias)

    def dora_epilogue(self, z: torch.Tensor, base: Optional[torch.Tensor], h: torch.Tensor, lora_B: torch.Tensor,
                      k: float, s: float, f: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype,
                      z_out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """DoRA's forward epilogue in one pass of this backend: with ``u = h B^T``, ``z += k u`` in place (or, with
        ``z_out``, ``z_out = z + k u`` and ``z`` only read) and ``round(base + bias + s u + f (z + k u))`` returned in
        ``dtype`` (fp32 arithmetic); ``base`` None: ``round(f (z + k u) + bias)``, the scaling without dropout.
        ``z``, ``base``, ``z_out`` fp32 ``(M, N)``, ``h`` fp32 ``(M, r)``, ``lora_B`` ``(N, r)``, ``f`` fp32 ``(N,)``,
        ``bias`` fp32 ``(N,)`` or None. None where this backend has no such pass (``z`` and ``z_out`` untouched)."""
        return None

    def lora_backward_onto(self, acc: torch.Tensor, dy: torch.Tensor, x: Optional[torch.Tensor], lora_A: torch.Tensor,
                           lora_B: torch.Tensor, xa: torch.Tensor, scaling: float, dropout_p: float, seed: int,
                           corrected: Optional[tuple] = None) -> Optional[tuple]:
        """One adapter's backward onto a base product the caller already has: ``acc`` fp32 ``(M, K)`` (``dY W``) gets
        ``s (dY B) A * mask / (1 - p)`` added in place; returns ``(dA, dB)`` in fp32, ``dA = s (dY B)^T drop(x)``
        (None when ``x`` is None) and ``dB = s dY^T xa``. ``dy`` ``(M, N)``, ``xa`` ``(M, r)`` as the forward returned
        it, the mask regenerated from ``seed``. ``corrected = (e, out)`` (``e`` fp32 ``(M, K)``, ``out`` ``(M, K)``):
        ``acc`` is only read and ``out = acc + s (dY B) A * mask / (1 - p) + (mask / (1 - p) - 1) * e`` is written,
        rounded once to ``out``'s dtype (DoRA's dropout correction). None where this backend has no such passes
        (nothing written)."""
        return None

    # ----------------------------------------------------------------------------------------------------- LoRA
    def lora_forward(
        self,
        x: torch.Tensor,
        weight,
        bias: Optional[torch.Tensor],
        lora_A: Sequence[torch.Tensor],
        lora_B: Sequence[torch.Tensor],
        lora_bias: Sequence[Optional[torch.Tensor]],
        scaling: Sequence[float],
        dropout_p: Sequence[float],
        seeds: Sequence[int],
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns ``y`` ``(M, N)`` and ``xa[i] = drop_i(x_i) @ A_i^T`` ``(M, r_i)``, kept for ``dB``."""
        raise NotImplementedError

    def settled_route(self, op: str, x: torch.Tensor, weight, lora_A: Sequence[torch.Tensor]):
        """``(route, function, counted)`` for an evaluation call of ``op`` (``lora_forward`` without dropout, with
        its arguments and return; ``lora_update``: ``add_lora_``'s update, ``function(x, y, lora_A, lora_B,
        lora_bias, scaling, dropout_p, seeds)`` with zero dropout, returning ``(y, xa)``): the route this backend
        takes for every call like this one (same dtypes, weight layout, adapters, ``M`` bucket) while
        ``fastpeft.routing.generation()`` and ``FASTPEFT_ROUTE`` stay as they are, and the choice whose calls count
        toward its confirming measurement (``fastpeft.routing.settled_call``). None where the next call must be
        decided by measuring, or this backend does not say."""
        return None

    def settled_forward(self, route: str, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        lora_A: Sequence[torch.Tensor], lora_B: Sequence[torch.Tensor],
                        lora_bias: Sequence[Optional[torch.Tensor]], scaling: Sequence[float]):
        """``(function, settled)``: a function ``x (..., K) -> y (..., N)`` that serves the settled ``lora_forward``
        calls of ``route`` (from :meth:`settled_route`) with these tensors bound, faster than the route's own function
        with its arguments bound, and the settled choices of further ops it takes (``{op: (route, None, counted)}``
        from ``fastpeft.routing.settled_call``, counted and checked as the forward's is); or None where this backend
        has none or a choice it needs is not settled. The tensors are bound by identity: their values, dtypes and
        layouts are read per call, and a call the function cannot serve as it is goes to the route's function."""
        return None

    def settled_training(self, x: torch.Tensor, weight: torch.Tensor, lora_A: Sequence[torch.Tensor],
                         lora_B: Sequence[torch.Tensor], lora_bias: Sequence[Optional[torch.Tensor]],
                         dropout_p: Sequence[float], grads: str) -> Optional[dict]:
        """``{"lora_forward": (route, forward, counted), "lora_backward": (route, backward, counted)}`` for training
        calls of a fused LoRA layer like this one (``x`` ``(M, K)``, a dense frozen ``weight``, the adapters, the
        ``dropout_p`` applied, ``grads`` the backward key's gradients: ``"dx"``, ``"dA"``, both or none): the routes
        this backend takes for their forward and backward while ``fastpeft.routing.generation()`` and
        ``FASTPEFT_ROUTE`` stay as they are, the choices whose calls count toward their confirming measurements,
        and functions with :meth:`lora_forward`'s and :meth:`lora_backward`'s arguments and returns that take those
        routes without resolving them (a call they do not fit, by its tensors or gradients, goes to the full
        method). Optionally more settled ops (``{op: (route, None, counted)}``) and ``"native"``: a function
        ``(x, weight, bias, A, B, scaling, dropout_p, seed) -> y`` for one adapter that runs both directions of those
        routes with its autograd node outside Python, returning None where a call's tensors do not fit it. None
        where a next call must be decided by measuring, or this backend does not say."""
        return None

    def lora_backward(
        self,
        grad_y: torch.Tensor,
        x: Optional[torch.Tensor],
        weight,
        lora_A: Sequence[torch.Tensor],
        lora_B: Sequence[torch.Tensor],
        xa: Sequence[torch.Tensor],
        scaling: Sequence[float],
        dropout_p: Sequence[float],
        seeds: Sequence[int],
        needs_grad_x: bool,
        needs_grad_A: bool,
        needs_grad_bias: bool = True,
    ) -> tuple[Optional[torch.Tensor], list[Optional[torch.Tensor]], list[torch.Tensor], list[Optional[torch.Tensor]]]:
        """Returns ``(dx, dA, dB, dbias)``; ``dx`` None unless ``needs_grad_x``; ``dA[i]`` None unless
        ``needs_grad_A`` (``x`` may then be None). ``dbias[i] = s_i * grad_y.sum(0)`` (used only when the adapter
        has a ``lora_bias``), and may be None unless ``needs_grad_bias`` (a route may then skip its pass over
        ``grad_y``). ``dB[i]`` may be a transposed view. Formulas: see ``fastpeft.functional.LoRALinearFunction``."""
        raise NotImplementedError

    def add_lora_(self, x, y, weight, lora_A, lora_B, lora_bias, scaling):
        """``y + sum_i s_i (x_i A_i^T B_i^T + b_i)`` without dropout for a base output ``y`` ``(M, N)`` computed
        elsewhere, in ``y``'s dtype (in place where the backend can); ``x`` ``(M, K)``, ``weight`` the layer's base
        weight (its shape keys the route). No autograd: callers that record it use
        ``fastpeft.reference.add_lora_terms``. Default: that reference."""
        n = len(lora_A)
        return reference.add_lora_terms(y, x, lora_A, lora_B, lora_bias, scaling, [0.0] * n, [0] * n)

    def base_linear(self, x, weight, bias):
        """``x W^T + b`` ``(M, N)`` in ``x``'s dtype, no autograd (an evaluation call's base product alone). Default:
        the IA3 forward with a feedforward vector of ones (exact), so every backend has it."""
        ones = torch.ones(weight.shape[1], dtype=x.dtype, device=x.device)
        return self.ia3_forward(x, weight, bias, ones, True)

    # ------------------------------------------------------------------------------------------------------ IA3
    def ia3_forward(
        self, x: torch.Tensor, weight, bias: Optional[torch.Tensor], scale: torch.Tensor, is_feedforward: bool
    ) -> torch.Tensor:
        """``scale`` is the product of active IA3 vectors, ``(K,)`` if ``is_feedforward`` else ``(N,)``, in the
        IA3 vectors' dtype. Feedforward: ``y = ((x * scale).to(x.dtype)) W^T + bias``; else
        ``y = ((x W^T + bias) * scale).to(x.dtype)``."""
        raise NotImplementedError

    def ia3_backward(
        self,
        grad_y: torch.Tensor,
        x: torch.Tensor,
        weight,
        bias: Optional[torch.Tensor],
        scale: torch.Tensor,
        is_feedforward: bool,
        needs_grad_x: bool,
    ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """Returns ``(dx, dscale)``; ``dscale`` has ``scale``'s shape and dtype. Formulas: see
        ``fastpeft.functional.IA3LinearFunction``."""
        raise NotImplementedError

    # Output-scaled IA3 may save the base output ``z = x W^T + b`` for backward instead of ``x`` (what PEFT saves):
    # a backend where a second GEMM costs more than an (M, N) activation sets this and implements the two methods
    # below (``fastpeft.functional.IA3LinearFunction`` uses them).
    ia3_keeps_base_output: bool = False

    def ia3_forward_keep_base(
        self, x: torch.Tensor, weight, bias: Optional[torch.Tensor], scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Output scaling only: ``(y, z)``, ``z = x W^T + bias`` in ``x``'s dtype, ``y = (z * scale).to(z.dtype)``."""
        raise NotImplementedError

    def ia3_backward_from_base(
        self, grad_y: torch.Tensor, z: torch.Tensor, weight, scale: torch.Tensor, needs_grad_x: bool
    ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """Output scaling only, from the saved ``z``: ``(dx, dscale)`` as ``ia3_backward`` returns them."""
        raise NotImplementedError
