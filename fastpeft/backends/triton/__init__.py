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


def _compose_forward(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds, widen_by_copy=True):
    """Routes ``compose`` and ``compose_pass``: cuBLAS (torch) for the base, ``fastpeft.backends.compose`` for the
    adapters; where x is narrower than an adapter (bf16 x, fp32 A) ``compose`` widens a copy of x for the vendor GEMM
    and ``compose_pass`` widens it in the registers of fastpeft's down-projection kernel (no copy, one launch more
    from the host)."""
    w = weight if weight.dtype == x.dtype else weight.to(x.dtype)
    y = torch.nn.functional.linear(x, w, None if bias is None else compose.as_dtype(bias, x.dtype))
    return compose.add_adapters(x, y, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds, _triton_down,
                                widen_by_copy)


def _compose_backward(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x, needs_grad_A,
                      needs_grad_bias=True, widen_by_copy=True):
    """Routes ``compose`` and ``compose_pass``: ``dY W`` by cuBLAS (torch), ``fastpeft.backends.compose`` for the
    adapters (``dA`` from a widened copy of x, or by the dA kernel, as in :func:`_compose_forward`)."""
    grad_x = None
    if needs_grad_x:
        grad_x = torch.mm(dy, weight if weight.dtype == dy.dtype else weight.to(dy.dtype))
    return compose.backward(dy, x, grad_x, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_A,
                            _triton_masked, widen_by_copy, needs_grad_bias)


def _other_device(t: torch.Tensor) -> bool:
    """Whether ``t`` is a CUDA tensor on a device other than the current one (Triton launches on the current one)."""
    return t.is_cuda and t.get_device() != torch.cuda.current_device()


def _on_device_of(first: torch.Tensor, function, *args, **kwargs):
    """``function(*args, **kwargs)`` with the CUDA device of ``first`` current: a model spread over several GPUs
    (``device_map="auto"``) has layers on cuda:1 and beyond. Where that device is current already (every call on one
    GPU) no context is entered: it costs microseconds."""
    if _other_device(first):
        with torch.cuda.device(first.device):
            return function(*args, **kwargs)
    return function(*args, **kwargs)


def _on_input_device(method):
    """A backend method run on the device of its first tensor argument (:func:`_on_device_of`)."""

    @functools.wraps(method)
    def wrapper(self, first, *args, **kwargs):
        return _on_device_of(first, method, self, first, *args, **kwargs)

    return wrapper


def _on_input_device_call(function):
    """``function(first, ...)`` run on the device of ``first`` (:func:`_on_device_of`)."""

    @functools.wraps(function)
    def wrapper(first, *args):
        return _on_device_of(first, function, first, *args)

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


def _forward_kernels(mode, x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds):
    """Routes ``passes``, ``split_gemm`` and ``fused_gemm``: ``fastpeft.kernels.lora.lora_forward`` in ``mode``."""
    from fastpeft.kernels import lora

    if _interpreted_bf16(x, weight, bias, *lora_A, *lora_B, *lora_bias):
        y, xa = lora.lora_forward(*_widen([x, weight, bias, lora_A, lora_B, lora_bias]), scaling, dropout_p, seeds,
                                  mode=mode)
        return y.to(x.dtype), [h.to(A.dtype) for h, A in zip(xa, lora_A)]
    return lora.lora_forward(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds, mode=mode)


def _forward_cuda_kernels(x, weight, *rest):
    """Route ``cuda_kernels``: the ``cuda`` backend's forward."""
    return _cuda_kernels(x, weight).lora_forward(x, weight, *rest)


def _backward_kernels(mode, grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x,
                      needs_grad_A, needs_grad_bias=True):
    """Routes ``passes``, ``split_gemm`` and ``fused_gemm``: ``fastpeft.kernels.lora.lora_backward`` in ``mode`` (the
    bias gradients come with its pass over ``dY`` whether asked or not)."""
    from fastpeft.kernels import lora

    if _interpreted_bf16(grad_y, x, weight, *lora_A, *lora_B, *xa):
        dx, dA, dB, db = lora.lora_backward(*_widen([grad_y, x, weight, lora_A, lora_B, xa]), scaling, dropout_p,
                                            seeds, needs_grad_x, needs_grad_A, mode=mode)
        return (_cast(dx, grad_y.dtype), [_cast(g, A.dtype) for g, A in zip(dA, lora_A)],
                [g.to(B.dtype) for g, B in zip(dB, lora_B)], [g.to(B.dtype) for g, B in zip(db, lora_B)])
    return lora.lora_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x,
                              needs_grad_A, mode=mode)


def _backward_cuda_kernels(grad_y, x, weight, *rest):
    """Route ``cuda_kernels``: the ``cuda`` backend's backward."""
    return _cuda_kernels(grad_y, weight).lora_backward(grad_y, x, weight, *rest)


# The routes of the dense lora_forward and lora_backward (fastpeft.routing.ROUTES), in the order they are measured,
# and the conditions under which each may serve a call (fastpeft.routing.ROUTE_LIMITS). Module-level functions, so
# a call whose route is chosen already builds no candidate (routing.run_table) and an evaluation call can be kept
# settled (settled_route).
def _unmeasured_route(op: str, rows: int, lora_A, dropout_p):
    """Under Triton's interpreter (timings mean nothing) the route whose kernels ``fastpeft.kernels.lora``'s mode
    rule picks for this call of the ``forward`` or ``backward``; None where routes are measured."""
    if not _interpret():
        return None
    from fastpeft.kernels import lora

    choose = lora.choose_forward_mode if op == "forward" else lora.choose_backward_mode
    return _ROUTE_OF_MODE[choose(rows, sum(A.shape[0] for A in lora_A), dropout_p)]


def _route_table(compose_route, kernels, cuda_route) -> dict:
    """One op's routes: the composition (``compose``, and ``compose_pass`` with x widened in the pass), the
    kernels' modes under their route names, and the cuda backend's kernels."""
    table = {"compose": compose_route, "compose_pass": functools.partial(compose_route, widen_by_copy=False)}
    table.update({route: functools.partial(kernels, mode) for mode, route in _ROUTE_OF_MODE.items()})
    table["cuda_kernels"] = cuda_route
    return table


_FORWARD_ROUTES = _route_table(_compose_forward, _forward_kernels, _forward_cuda_kernels)
_BACKWARD_ROUTES = _route_table(_compose_backward, _backward_kernels, _backward_cuda_kernels)


def _fused_gemm_eligible(lora_A, dropout_p, most_dropped: int) -> bool:
    """The fused GEMM takes the call: some adapter, their padded total rank in its epilogue tile, and at most
    ``most_dropped`` adapters with dropout (any number where there is one adapter)."""
    if not lora_A or not _fused_gemm_fits(sum(A.shape[0] for A in lora_A)):
        return False
    return len(lora_A) == 1 or sum(1 for p in dropout_p if p > 0) <= most_dropped


def _narrower_input(a, lora_A, dropout_p) -> bool:
    """Whether ``a`` (x or dY) is narrower than some adapter without dropout: only then do ``compose`` and
    ``compose_pass`` differ."""
    return any(A.dtype != a.dtype and A.dtype == torch.float32 and p == 0 for A, p in zip(lora_A, dropout_p))


def _forward_eligible(route: str, x, weight, lora_A, dropout_p) -> bool:
    if route == "compose_pass":
        return _narrower_input(x, lora_A, dropout_p)
    if route == "fused_gemm":
        return _fused_gemm_eligible(lora_A, dropout_p, 0)
    if route == "cuda_kernels":
        return _cuda_kernels(x, weight) is not None
    return True


def _backward_eligible(route: str, grad_y, weight, lora_A, dropout_p, needs_grad_x) -> bool:
    if route == "compose_pass":
        return _narrower_input(grad_y, lora_A, dropout_p)
    if route == "fused_gemm":
        return needs_grad_x and _fused_gemm_eligible(lora_A, dropout_p, 1)
    if route == "cuda_kernels":
        return _cuda_kernels(grad_y, weight) is not None
    return True


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
        if x.is_cuda:  # (device indices, not torch.device objects: this runs on every call)
            return weight.is_cuda and weight.get_device() == x.get_device()
        return x.is_cpu and weight.is_cpu and _interpret()

    # ----------------------------------------------------------------------------------------------------- LoRA
    @staticmethod
    def _key(op, x, weight, lora_A, dropout_p, grads=""):
        return routes.key_of_call(op, "triton", "dense", x, weight, lora_A, dropout_p, grads)

    @_on_input_device
    def lora_forward(self, x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds):
        if not isinstance(weight, torch.Tensor):
            return _quant().lora_forward(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds)
        args = (x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seeds)
        unmeasured = _unmeasured_route("forward", x.shape[0], lora_A, dropout_p)
        return routes.run_table(self._key("lora_forward", x, weight, lora_A, dropout_p), _FORWARD_ROUTES,
                                _forward_eligible, args, (x, weight, lora_A, dropout_p), x.device.type, unmeasured)

    def settled_route(self, op, x, weight, lora_A):
        if op != "lora_forward" or _interpret():
            return None
        if not isinstance(weight, torch.Tensor):
            found = _quant().settled_forward(x, weight, lora_A)
            return None if found is None else (found[0], _on_input_device_call(found[1]), found[2])
        zeros = [0.0] * len(lora_A)
        eligible = routes.EligibleRoutes(_FORWARD_ROUTES, _forward_eligible, (x, weight, lora_A, zeros))
        found = routes.settled_call(self._key(op, x, weight, lora_A, zeros), eligible)
        return None if found is None else (found[0], _on_input_device_call(_FORWARD_ROUTES[found[0]]), found[1])

    @_on_input_device
    def lora_backward(self, grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x,
                      needs_grad_A, needs_grad_bias=True):
        if not isinstance(weight, torch.Tensor):
            return _quant().lora_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds,
                                          needs_grad_x, needs_grad_A)
        args = (grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seeds, needs_grad_x, needs_grad_A,
                needs_grad_bias)
        unmeasured = _unmeasured_route("backward", grad_y.shape[0], lora_A, dropout_p)
        grads = routes.grads_key(needs_grad_x, needs_grad_A)
        return routes.run_table(self._key("lora_backward", grad_y, weight, lora_A, dropout_p, grads),
                                _BACKWARD_ROUTES, _backward_eligible, args,
                                (grad_y, weight, lora_A, dropout_p, needs_grad_x), grad_y.device.type, unmeasured)

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
