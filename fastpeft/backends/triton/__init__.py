"""The ``triton`` backend: fused LoRA and IA3 kernels from ``fastpeft.kernels`` (Triton).

Runs CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests without a GPU).
Quantized base weights (``fastpeft.quant.QuantizedWeight``) are served by ``fastpeft.backends.triton.quantized`` when
that module exists; this backend declines them otherwise (the dispatcher then falls back to the reference).
"""

from __future__ import annotations

import functools
import importlib

import torch

from ... import _env
from ... import routing as routes
from .. import compose
from ..base import Backend

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _interpret() -> bool:
    return _env.read("TRITON_INTERPRET") == "1"


def _interpreted_bf16(*tensors) -> bool:
    """Whether this call runs in Triton's interpreter with a bf16 operand.

    The 3.9 interpreter's ``tl.dot`` is wrong on bf16 operands (relative error ~1e9). Widening bf16 to fp32 is
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
    """``fastpeft.backends.triton.quantized`` (the quantized-base half of this backend) or None if it fails to
    import."""
    try:
        return importlib.import_module(".quantized", __name__)
    except ImportError:
        return None


# fastpeft.kernels.lora's modes under the route names of fastpeft.routing.
_ROUTE_OF_MODE = {"small": "passes", "fused": "fused_gemm", "split": "split_gemm"}


def _fused_gemm_fits(total_r: int) -> bool:
    """Whether the fused GEMM's epilogue tile holds the padded total rank (``fastpeft.routing.ROUTE_LIMITS``)."""
    from fastpeft.kernels._common import MAX_FUSED_R, next_pow2

    return next_pow2(total_r) <= MAX_FUSED_R


def _triton_down(xi, A, p, seed):
    """``compose.DownPass`` on a GPU: fastpeft's down-projection kernel (mask drawn in registers)."""
    from fastpeft.kernels import lora

    if _interpreted_bf16(xi, A):
        xi, A = _widen([xi, A])
    return lora.down_proj(xi, A.t(), seed, p)


def _triton_masked(acc, xi, A, g32, p, seed):
    """``compose.MaskedPass`` on a GPU: ``acc += (g A) * mask`` by the low-rank kernel, ``g^T drop(x)`` by the
    dA kernel."""
    from fastpeft.kernels import lora

    A_ = A.float() if _interpreted_bf16(A) else A
    if acc is not None:
        ones = torch.ones(A.shape[0], dtype=torch.float32, device=A.device)
        if _interpreted_bf16(acc):
            acc.copy_(lora.lowrank_update(acc.float(), g32, A_, ones, seed=seed, p=p))
        else:
            lora.lowrank_update(acc, g32, A_, ones, seed=seed, p=p, out=acc)
    if xi is None:
        return None
    return lora.grad_a(g32, xi.float() if _interpreted_bf16(xi) else xi, torch.float32, seed, p)


def _compose_forward(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds):
    """Route ``compose``: cuBLAS (torch) for the base, ``fastpeft.backends.compose`` for the adapters."""
    w = weight if weight.dtype == x.dtype else weight.to(x.dtype)
    y = torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    return compose.add_adapters(x, y, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds, _triton_down)


def _compose_backward(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x, needs_grad_A):
    """Route ``compose``: ``dY W`` by cuBLAS (torch), ``fastpeft.backends.compose`` for the adapters."""
    grad_x = None
    if needs_grad_x:
        grad_x = torch.mm(dy, weight if weight.dtype == dy.dtype else weight.to(dy.dtype))
    return compose.backward(dy, x, grad_x, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_A,
                            _triton_masked)


def _on_input_device(method):
    """Run a backend method with the CUDA device of its first tensor argument current: Triton launches on the
    current device, and a model spread over several GPUs (``device_map="auto"``) has layers on cuda:1 and beyond."""

    @functools.wraps(method)
    def wrapper(self, first, *args, **kwargs):
        if first.is_cuda:
            with torch.cuda.device(first.device):
                return method(self, first, *args, **kwargs)
        return method(self, first, *args, **kwargs)

    return wrapper


def _cuda_kernels(x, weight):
    """The ``cuda`` backend (cuBLAS plus fastpeft's CUDA kernels) when it can serve this call as the ops'
    ``cuda_kernels`` route, else None. Whether it or a Triton route is faster for a shape is measured, not ruled."""
    if not x.is_cuda:
        return None
    from .. import _instances, availability

    if not availability("cuda")[0]:
        return None
    backend = _instances["cuda"]
    return backend if backend.supports(x, weight) else None


class TritonBackend(Backend):
    name = "triton"

    def timings_mean_something(self) -> bool:
        return not _interpret()  # Triton's interpreter runs the kernels in numpy

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
    @staticmethod
    def _key(op, x, weight, lora_A, dropout_p, grads=""):
        return routes.key_of_call(op, "triton", "dense", x, weight, lora_A, dropout_p, grads)

    @_on_input_device
    def lora_forward(self, x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds):
        if not isinstance(weight, torch.Tensor):
            return _quant().lora_forward(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds)
        from fastpeft.kernels import lora

        args = (x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds)

        def kernel_mode(mode):
            if _interpreted_bf16(x, weight, bias, *lora_A, *lora_B, *lora_bias):
                y, xa = lora.lora_forward(*_widen([x, weight, bias, lora_A, lora_B, lora_bias]), scaling, dropout_p,
                                          seeds, mode=mode)
                return y.to(x.dtype), [h.to(A.dtype) for h, A in zip(xa, lora_A)]
            return lora.lora_forward(*args, mode=mode)

        candidates = {"compose": lambda: _compose_forward(*args), "passes": lambda: kernel_mode("small"),
                      "split_gemm": lambda: kernel_mode("split")}
        total_r = sum(A.shape[0] for A in lora_A)
        drops = sum(1 for p in dropout_p if p > 0)
        if lora_A and _fused_gemm_fits(total_r) and (drops == 0 or len(lora_A) == 1):
            candidates["fused_gemm"] = lambda: kernel_mode("fused")
        cuda = _cuda_kernels(x, weight)
        if cuda is not None:
            candidates["cuda_kernels"] = lambda: cuda.lora_forward(*args)
        unmeasured = _ROUTE_OF_MODE[lora.choose_forward_mode(x.shape[0], total_r, dropout_p)] if _interpret() else None
        return routes.run(self._key("lora_forward", x, weight, lora_A, dropout_p), candidates, x.device.type,
                          unmeasured=unmeasured)

    @_on_input_device
    def lora_backward(self, grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x,
                      needs_grad_A):
        if not isinstance(weight, torch.Tensor):
            return _quant().lora_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds,
                                          needs_grad_x, needs_grad_A)
        from fastpeft.kernels import lora

        args = (grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x, needs_grad_A)

        def kernel_mode(mode):
            if _interpreted_bf16(grad_y, x, weight, *lora_A, *lora_B, *xa):
                dx, dA, dB, db = lora.lora_backward(*_widen([grad_y, x, weight, lora_A, lora_B, xa]), scaling,
                                                    dropout_p, seeds, needs_grad_x, needs_grad_A, mode=mode)
                return (_cast(dx, grad_y.dtype), [_cast(g, A.dtype) for g, A in zip(dA, lora_A)],
                        [g.to(B.dtype) for g, B in zip(dB, lora_B)], [g.to(B.dtype) for g, B in zip(db, lora_B)])
            return lora.lora_backward(*args, mode=mode)

        candidates = {"compose": lambda: _compose_backward(*args), "passes": lambda: kernel_mode("small"),
                      "split_gemm": lambda: kernel_mode("split")}
        total_r = sum(A.shape[0] for A in lora_A)
        drops = sum(1 for p in dropout_p if p > 0)
        if lora_A and needs_grad_x and _fused_gemm_fits(total_r) and drops <= 1:
            candidates["fused_gemm"] = lambda: kernel_mode("fused")
        cuda = _cuda_kernels(grad_y, weight)
        if cuda is not None:
            candidates["cuda_kernels"] = lambda: cuda.lora_backward(*args)
        unmeasured = _ROUTE_OF_MODE[lora.choose_backward_mode(grad_y.shape[0], total_r, dropout_p)] \
            if _interpret() else None
        grads = ("dx" if needs_grad_x else "") + ("dA" if needs_grad_A else "")
        return routes.run(self._key("lora_backward", grad_y, weight, lora_A, dropout_p, grads), candidates,
                          grad_y.device.type, unmeasured=unmeasured)

    # ------------------------------------------------------------------------------------------------------ IA3
    @_on_input_device
    def ia3_forward(self, x, weight, bias, scale, is_feedforward):
        if not isinstance(weight, torch.Tensor):
            return _quant().ia3_forward(x, weight, bias, scale, is_feedforward)
        from fastpeft.kernels import ia3

        def kernel_mode(mode):
            if _interpreted_bf16(x, weight, bias, scale):
                return ia3.ia3_forward(*_widen([x, weight, bias, scale]), is_feedforward, mode=mode).to(x.dtype)
            return ia3.ia3_forward(x, weight, bias, scale, is_feedforward, mode=mode)

        candidates = {route: (lambda route=route: kernel_mode(route)) for route in ("compose", "fused_gemm")}
        cuda = _cuda_kernels(x, weight)
        if cuda is not None:
            candidates["cuda_kernels"] = lambda: cuda.ia3_forward(x, weight, bias, scale, is_feedforward)
        unmeasured = ia3.choose_mode(x.shape[0]) if _interpret() else None
        return routes.run(self._key("ia3_forward", x, weight, [], [], "ff" if is_feedforward else "out"),
                          candidates, x.device.type, unmeasured=unmeasured)

    @_on_input_device
    def ia3_backward(self, grad_y, x, weight, bias, scale, is_feedforward, needs_grad_x):
        if not isinstance(weight, torch.Tensor):
            return _quant().ia3_backward(grad_y, x, weight, bias, scale, is_feedforward, needs_grad_x)
        from fastpeft.kernels import ia3

        def kernel_mode(mode):
            if _interpreted_bf16(grad_y, x, weight, bias, scale):
                dx, dscale = ia3.ia3_backward(*_widen([grad_y, x, weight, bias, scale]), is_feedforward,
                                              needs_grad_x, mode=mode)
                return _cast(dx, x.dtype), dscale.to(scale.dtype)
            return ia3.ia3_backward(grad_y, x, weight, bias, scale, is_feedforward, needs_grad_x, mode=mode)

        candidates = {route: (lambda route=route: kernel_mode(route)) for route in ("compose", "fused_gemm")}
        cuda = _cuda_kernels(grad_y, weight)
        if cuda is not None:
            candidates["cuda_kernels"] = lambda: cuda.ia3_backward(grad_y, x, weight, bias, scale, is_feedforward,
                                                                   needs_grad_x)
        unmeasured = ia3.choose_mode(grad_y.shape[0]) if _interpret() else None
        grads = ("ff" if is_feedforward else "out") + ("+dx" if needs_grad_x else "")
        return routes.run(self._key("ia3_backward", grad_y, weight, [], [], grads), candidates, grad_y.device.type,
                          unmeasured=unmeasured)


BACKEND = TritonBackend()
