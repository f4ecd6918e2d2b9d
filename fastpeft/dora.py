"""DoRA (PEFT's ``LoraConfig(use_dora=True)``) without ever building the adapted weight.

PEFT's ``DoraLinearLayer`` normalizes each output row of ``W + s B A`` (an ``(N, K)`` weight it materializes every
call). With ``n_j = ||W_j + s (B A)_j||`` treated as a constant in backward (PEFT detaches it, as the DoRA paper
suggests) and ``c = m / n`` (``m`` the magnitude vector, ``(N,)``):

- dropout 0, or eval: ``y = b + c * (x W^T + s x A^T B^T)`` (PEFT reuses the base output);
- dropout ``p > 0`` in training: ``y = x W^T + b + (c - 1) * drop(x) W^T + c * s drop(x) A^T B^T``: a second base
  product, on the dropped input, is PEFT's meaning there.

The norm comes from small products only (fp32, tiny negative round-off clamped before the square root)::

    n_j^2 = ||W_j||^2 + 2 s B_j . (W A^T)_j + s^2 B_j (A A^T) B_j^T

``||W_j||^2`` is cached per base weight (``DoraCache``) while the weight's storage and version stay the same;
``W A^T`` is ``(N, r)`` and ``A A^T`` is ``(r, r)``.

Gradients, with ``z = (drop) x W^T + s h B^T`` the unscaled product (``h = drop(x) A^T``, ``(M, r)``), ``g = c * dY``
and ``e = (c - 1) * dY``::

    dm = sum_m dY * z / n
    dB = s g^T h,   dA = s (g B)^T drop(x)
    p = 0:  dX = g W + s (g B) A
    p > 0:  dX = dY W + (e W + s (g B) A) * mask / (1 - p)

Saved for backward: ``x`` (when ``A`` needs a gradient), ``h`` (``M x r``), ``z`` (``M x N``, when ``m`` needs a
gradient), ``c`` and ``n``. Never a mask, a dropped copy of ``x`` or anything ``N x K``; the mask is regenerated
from the seed (``fastpeft._philox``) by the backend's own masked pass.

Routes per op (``fastpeft.routing.ROUTES``: ``dora_forward``, ``dora_backward``): ``compose`` (vendor GEMMs in
torch) and ``fused`` (the backend's LoRA op, by its own measured route, plus the DoRA epilogue), so every backend
(reference, cpu, triton, cuda) serves DoRA by construction; with dropout and fp32 adapters, ``stacked`` runs each
pair of products with ``W`` (``x`` and its dropped copy forward, ``c dY`` and ``(c - 1) dY`` backward) as one
product over ``2M`` rows, ``W`` read once: the vendor GEMM for fp32 operands (on a backend with the one-pass DoRA
epilogue), the backend's widened product for bf16 ones (``Backend.widened_mm``: bf16 operands into fp32 sums).
The second base product of dropout runs in the adapters' dtype, as PEFT's does; for fp32 adapters over a bf16 base
that is an fp32 GEMM, which the ``pairs`` routes of ``widened_product`` (and ``stacked``) compute from the bf16
operands (exact products, fp32 sums) where the backend can. A bitsandbytes base (``QuantizedWeight``) runs the
``fused`` route: every product with ``W`` goes through the backend's quantized products, which decode it as they do
for LoRA.

Beside other active adapters (``stacked_linear``), PEFT lets each DoRA adapter without active dropout scale the
running sum of the adapters before it, and one with dropout add its own second base product; that path is torch ops
under autograd with the same norm, its products on dropped inputs in ``_InputProducts`` (mask regenerated from the
seed, never saved). Under autocast the operands are cast as autocast casts ``F.linear``'s (``autocast_adapters``) and
the norm, the scale and the epilogue stay fp32, as in PEFT.
"""

from __future__ import annotations

import struct
from typing import Optional

import torch
import torch.nn.functional as F

from . import reference, routing
from ._derived import kept_copies
from .backends import get_backend
from .backends.base import Backend
from .functional import _autocast, _call_mode, _flatten, draw_seeds, held_weight, hold_weight, under_func_transform

_F32 = torch.float32


def _as_fp32(value: float) -> float:
    """``value`` rounded to the nearest fp32 (what an fp32 tensor would hold)."""
    return struct.unpack("f", struct.pack("f", value))[0]


# ------------------------------------------------------------------------------------------------------- the norm
def row_sq_norms(weight) -> torch.Tensor:
    """``||W_j||^2`` for each row of ``weight`` ``(N, K)`` (any strides, any float dtype) as fp32 ``(N,)``; the
    reduction widens in place, with no fp32 copy of the weight. A ``QuantizedWeight`` is decoded once for it (what
    PEFT decodes every call); callers cache the result (``DoraCache``)."""
    if not isinstance(weight, torch.Tensor):
        weight = weight.dequantize()
    return torch.linalg.vector_norm(weight.detach(), dim=1, dtype=_F32).square_()


def weight_norm(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                weight_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``n_j = ||W_j + s (B A)_j||`` as fp32 ``(N,)``, detached, from ``weight`` ``(N, K)``, ``lora_A`` ``(r, K)``,
    ``lora_B`` ``(N, r)`` without forming ``B A``. ``weight_sq`` is ``row_sq_norms(weight)`` when the caller keeps
    it. ``W A^T`` is fp32 as PEFT's (``_weight_times_adapter`` for a narrower dense weight); a ``QuantizedWeight``
    is decoded by the backend's product, in fp32."""
    A32 = lora_A.detach().to(_F32)
    B32 = lora_B.detach().to(_F32)
    if weight_sq is None:
        weight_sq = row_sq_norms(weight)
    if not isinstance(weight, torch.Tensor):
        wa = _base_product(A32, weight).t()
    elif weight.dtype == _F32:
        wa = torch.mm(weight.detach(), A32.t())
    else:
        wa = _weight_times_adapter(weight, A32)
    cross = (B32 * wa).sum(1)
    quad = (torch.mm(B32, torch.mm(A32, A32.t())) * B32).sum(1)
    s = float(scaling)
    squared = weight_sq + (2.0 * s) * cross + (s * s) * quad
    return squared.clamp_min_(0.0).sqrt_()


def split_bf16(t: torch.Tensor) -> torch.Tensor:
    """fp32 ``(r, K)`` as bf16 ``(3r, K)``: ``[hi; mid; lo]`` with ``hi + mid + lo == t`` exactly (each part holds the
    next 8 significant bits of what the parts before it left), so a product with a bf16 matrix computed part by part
    in exact products and fp32 sums is the fp32 product."""
    hi = t.to(torch.bfloat16)
    rest = t - hi.to(_F32)
    mid = rest.to(torch.bfloat16)
    return torch.cat([hi, mid, (rest - mid.to(_F32)).to(torch.bfloat16)], 0)


def _weight_times_adapter(weight: torch.Tensor, A32: torch.Tensor) -> torch.Tensor:
    """``W A^T`` ``(N, r)`` in fp32 for a dense weight narrower than fp32 ``A`` ``(r, K)`` (PEFT forms ``W + s B A``
    in fp32), by a route of ``widened_product``: ``widen`` (``_base_product``: the weight widened a block of rows at
    a time), ``down`` (the weight's rows through the backend's down-projection, ``Backend.lora_down``: fp32
    arithmetic, the rows read in place) or ``pairs`` (a bf16 weight times ``split_bf16(A)`` by
    ``Backend.widened_mm``: exact products, fp32 sums, three partial results added)."""
    backend = get_backend(A32, weight)
    candidates = {"widen": lambda: _base_product(A32, weight).t()}
    if weight.stride(1) == 1:
        candidates["down"] = lambda: backend.lora_down(weight.detach(), A32)
    r = A32.shape[0]
    if weight.dtype == torch.bfloat16 and backend.widened_mm_eligible(weight, weight):
        def pairs():
            parts = backend.widened_mm(weight.detach(), split_bf16(A32))
            return parts[:, :r].add(parts[:, r:2 * r]).add_(parts[:, 2 * r:])
        candidates["pairs"] = pairs
    N, K = weight.shape
    key = routing.make_key("widened_product", backend.name, "dense", weight.dtype, weight.dtype, (A32.dtype,), N, r,
                           K, False, r, 1, "norm")
    return routing.run(key, candidates, weight.device.type)


def _stamp(t: torch.Tensor):
    """What identifies a tensor's current values: the object, its storage, its version (bumped by every in-place
    write, optimizer steps included), its shape and dtype. None for inference tensors (no version counter)."""
    if t.is_inference():
        return None
    return (id(t), t.data_ptr(), t._version, tuple(t.shape), t.dtype)


class DoraCache:
    """One layer's cached DoRA values: ``||W_j||^2`` per base weight, the norm ``n`` per adapter, and the scale
    ``c = m / n`` per adapter while the magnitude needs no gradient (eval, ``torch.no_grad``, frozen adapters), as
    PEFT's optional DoRA caching does. Each entry is keyed by the stamps of the tensors it was computed from, so a
    change of ``W``, ``A``, ``B``, ``m`` or the scaling recomputes it. ``clear()`` after merge/unmerge.
    ``enabled=False`` computes every value afresh (graphs being compiled)."""

    def __init__(self, enabled: bool = True) -> None:
        self._entries: dict[str, tuple] = {}
        self._enabled = enabled

    def clear(self) -> None:
        self._entries.clear()

    def _get(self, key: str, stamp, compute, source: Optional[torch.Tensor] = None):
        """The value under ``key`` if it was computed for ``stamp`` (and from the very tensor ``source``, compared
        by identity: an ``id`` may be reused once its object is freed), else ``compute()`` stored. A stamp holding
        None (an inference tensor, which has no version counter) is never cached. A value computed under
        ``torch.inference_mode`` is an inference tensor, which autograd refuses to save: outside inference mode it
        is computed again (and replaces the entry)."""
        if not self._enabled or stamp is None or any(part is None for part in stamp):
            return compute()
        entry = self._entries.get(key)
        if entry is not None and entry[0] == stamp and entry[1] is source and (
                not entry[2].is_inference() or torch.is_inference_mode_enabled()):
            return entry[2]
        value = compute()
        self._entries[key] = (stamp, source, value)
        return value

    def norm(self, name: str, weight_param: torch.Tensor, weight: torch.Tensor, lora_A, lora_B,
             scaling: float) -> torch.Tensor:
        """``weight_norm`` of adapter ``name``; ``weight`` is the ``(N, K)`` view of ``weight_param``."""
        if not self._enabled:
            return weight_norm(weight, lora_A, lora_B, scaling)
        w_stamp = _stamp(weight_param)
        layout = tuple(weight.stride()) if isinstance(weight, torch.Tensor) else weight.kind
        weight_sq = self._get("weight_sq", (w_stamp, layout), lambda: row_sq_norms(weight))
        stamp = (w_stamp, layout, _stamp(lora_A), _stamp(lora_B), float(scaling))
        return self._get(f"norm/{name}", stamp, lambda: weight_norm(weight, lora_A, lora_B, scaling, weight_sq))

    def scale(self, name: str, magnitude: torch.Tensor, norm: torch.Tensor) -> Optional[torch.Tensor]:
        """``m / n`` in fp32, cached while ``magnitude`` needs no gradient; None when it does (the autograd
        function forms it so that ``dm`` flows)."""
        if not self._enabled or (magnitude.requires_grad and torch.is_grad_enabled()):
            return None
        return self._get(f"scale/{name}", (_stamp(magnitude),), lambda: magnitude.detach().to(_F32) / norm, norm)


_UNCACHED = DoraCache(enabled=False)


# ---------------------------------------------------------------------------------------------------- dropout
def keep_scale(backend, rows: int, cols: int, p: float, seed: int, device) -> torch.Tensor:
    """``mask / (1 - p)`` as fp32 ``(rows, cols)``, the mask of ``fastpeft._philox`` for ``seed``: the backend's own
    mask pass where it has one (``Backend.dropout_scale``), else its masked dX pass: the LoRA backward of a rank-1
    all-ones adapter over a zero base and ``dY = 1`` is exactly ``dX = mask / (1 - p)``. Transient; never saved."""
    drawn = backend.dropout_scale(rows, cols, p, seed, device)
    if drawn is not None:
        return drawn
    ones = torch.ones(rows, 1, dtype=_F32, device=device)
    zero_base = torch.zeros(1, cols, dtype=_F32, device=device)
    ones_a = torch.ones(1, cols, dtype=_F32, device=device)
    ones_b = torch.ones(1, 1, dtype=_F32, device=device)
    h = torch.zeros(rows, 1, dtype=_F32, device=device)
    dx, _, _, _ = backend.lora_backward(ones, None, zero_base, [ones_a], [ones_b], [h], [1.0], [float(p)],
                                        [int(seed)], True, False, needs_grad_bias=False)
    return dx


def _dropped(xi: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """``drop(x)`` from ``x`` and ``keep_scale``, in ``x``'s dtype (transient)."""
    return xi * ks if xi.dtype == _F32 else (xi.to(_F32) * ks).to(xi.dtype)


def _kept(backend, x: torch.Tensor, p: float, seed: int, keep) -> torch.Tensor:
    """``x`` with its dropped elements zeroed and the kept ones as they are (exact in ``x``'s dtype; ``1 / (1 - p)``
    is the caller's to apply): the backend's masked pass where it has one, else ``keep()`` (``keep_scale``'s
    ``(M, K)`` for ``seed``)."""
    out = backend.dropout_combine(None, x, p, seed, 1.0, 0.0)
    return out if out is not None else x.masked_fill(keep() == 0, 0)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


# ----------------------------------------------------------------------------------------- the (M, N) epilogues
# Rows of an (M, N) activation per block of a mixed-dtype elementwise pass on the CPU (1 MB of fp32). Torch's CPU
# kernels run a bf16/fp16 x fp32 op by first widening the 16-bit operand into a whole fp32 copy and, for a 16-bit
# output, computing into a whole fp32 temporary that is then copied back: three passes over (M, N) and two fp32
# (M, N) temporaries per op. A block this size keeps those temporaries in cache, so the op reads its inputs and
# writes its output from memory once. (CUDA casts inside the kernel: there the op runs whole.)
EPILOGUE_BLOCK_ELEMENTS = 1 << 18


def _block_rows(t: torch.Tensor) -> int:
    if t.device.type != "cpu" or t.dim() != 2:
        return max(1, t.shape[0])
    return max(1, EPILOGUE_BLOCK_ELEMENTS // max(1, t.shape[1]))


def _scaled(z: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
            add: Optional[torch.Tensor] = None, backend=None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``add + z * scale`` (``add`` None, an ``(N,)`` or an ``(M, N)`` tensor) computed in fp32 and rounded once to
    ``dtype``: ``z`` ``(M, N)`` any float dtype, ``scale`` fp32 ``(N,)``; written into ``out`` (``(M, N)`` of
    ``dtype``) when given. One pass of ``backend`` where it has one (``Backend.scale_columns``); else torch, with the
    output written in ``dtype`` (no fp32 ``(M, N)`` result and separate cast pass), on the CPU in row blocks
    (``EPILOGUE_BLOCK_ELEMENTS``) where a 16-bit operand or output would make torch widen through fp32 copies."""
    if backend is not None:
        done = backend.scale_columns(z, scale, dtype, add, out)
        if done is not None:
            return done
    if out is None:
        out = torch.empty(z.shape, dtype=dtype, device=z.device)
    mixed = z.dtype != _F32 or dtype != _F32 or (add is not None and add.dim() == 2 and add.dtype != _F32)
    rows = _block_rows(z) if mixed else max(1, z.shape[0])
    for start in range(0, z.shape[0], rows):
        part = slice(start, start + rows)
        if add is None:
            torch.mul(z[part], scale, out=out[part])
        else:
            torch.addcmul(add if add.dim() == 1 else add[part], z[part], scale, out=out[part])
    return out


def _widened_blocks(t: torch.Tensor, dtype: torch.dtype):
    """``(rows, block)`` pairs covering ``t`` ``(M, C)`` with ``block = t[rows]`` in ``dtype``: ``t`` itself when it
    already is, else one block of rows at a time (``_block_rows``), so a GEMM in the adapters' wider dtype never needs
    a whole widened copy of an ``(M, C)`` activation."""
    if t.dtype == dtype:
        return [(slice(None), t)]
    rows = _block_rows(t)
    return ((slice(start, start + rows), t[start:start + rows].to(dtype)) for start in range(0, t.shape[0], rows))


def _column_dots(dy: torch.Tensor, z: torch.Tensor, backend=None) -> torch.Tensor:
    """``sum_m dy[m, :] * z[m, :]`` as fp32 ``(N,)``, each product and the sum in fp32, for ``(M, N)`` tensors of any
    float dtypes: one pass of ``backend`` where it has one (``Backend.column_dots``); else torch, a 16-bit ``dy``
    widened a block of rows at a time into one reused fp32 buffer (``EPILOGUE_BLOCK_ELEMENTS``), never whole."""
    if backend is not None:
        out = backend.column_dots(dy, z)
        if out is not None:
            return out
    rows = _block_rows(dy)
    acc = torch.zeros(dy.shape[1], dtype=_F32, device=dy.device)
    buf = torch.empty(min(rows, dy.shape[0]), dy.shape[1], dtype=_F32, device=dy.device)
    for start in range(0, dy.shape[0], rows):
        block = buf[:min(rows, dy.shape[0] - start)]
        block.copy_(dy[start:start + rows]).mul_(z[start:start + rows])
        acc.add_(block.sum(0))
    return acc


def _scaled_grads(backend, dy: torch.Tensor, scale: torch.Tensor, with_e: bool) -> torch.Tensor:
    """``(M, N)`` holding ``g = c * dY`` in ``dY``'s dtype, or ``(2M, N)`` with ``e = (c - 1) * dY`` below it
    (``with_e``: the dropout's correction needs it; the stacked backward multiplies both halves at once)."""
    M, N = dy.shape
    ge = torch.empty((2 if with_e else 1) * M, N, dtype=dy.dtype, device=dy.device)
    _scaled(dy, scale, dy.dtype, backend=backend, out=ge[:M])
    if with_e:
        _scaled(dy, scale - 1.0, dy.dtype, backend=backend, out=ge[M:])
    return ge


def _grad_prologue(backend, dy: torch.Tensor, z: Optional[torch.Tensor], scale: torch.Tensor, with_e: bool,
                   needs_ge: bool) -> tuple:
    """``(dots, ge)``: ``dots = _column_dots(dy, z)`` (None without ``z``) and ``ge`` as ``_scaled_grads`` makes it
    (None unless ``needs_ge``), in one pass over ``dY`` where the backend has it (``Backend.dora_grad_prologue``,
    the same bits), else by those two."""
    if needs_ge:
        found = backend.dora_grad_prologue(dy, z, scale, with_e)
        if found is not None:
            return found
    return (None if z is None else _column_dots(dy, z, backend),
            _scaled_grads(backend, dy, scale, with_e) if needs_ge else None)


def _epilogue(backend, z: torch.Tensor, base: Optional[torch.Tensor], h: torch.Tensor, B: torch.Tensor, k: float,
              s: float, f: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype,
              z_out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, z')``: ``z' = z + k h B^T`` (in place, or into ``z_out``) and ``y = round(base + bias + s h B^T + f z')``
    in ``dtype`` (without ``base``: ``round(f z' + bias)``), fp32 arithmetic: the backend's one pass
    (``Backend.dora_epilogue``) where it has one, else the passes it replaces (``lora_up_onto`` and ``_scaled``)."""
    y = backend.dora_epilogue(z, base, h, B, k, s, f, bias, dtype, z_out=z_out)
    zk = z if z_out is None else z_out
    if y is None:
        if zk is not z:
            zk.copy_(z)
        zk = backend.lora_up_onto(zk, h, B, k)
        if base is not None:
            base = backend.lora_up_onto(base, h, B, s, bias)
        y = _scaled(zk, f, dtype, base if base is not None else bias, backend)
    return y, zk


# ---------------------------------------------------------------------------------------------------- forward
WIDEN_BLOCK_ELEMENTS = 1 << 20  # rows of W widened at a time when the product runs in a wider dtype (4 MB in fp32)


def _widen_rows(N: int, K: int) -> int:
    """Rows of an ``(N, K)`` weight widened at a time: at most ``WIDEN_BLOCK_ELEMENTS`` elements and half the rows,
    so that no whole widened copy of the weight (an ``N x K`` tensor) is ever made."""
    return max(1, min((N + 1) // 2, WIDEN_BLOCK_ELEMENTS // max(K, 1)))


def _base_product(a: torch.Tensor, weight) -> torch.Tensor:
    """``a W^T`` ``(M, N)`` in ``a``'s dtype, as PEFT's ``F.linear(drop(x), W.to(x.dtype))`` with ``x`` in the
    adapter's dtype. A dense weight narrower than ``a`` (bf16 base, fp32 adapters) is widened a block of rows at a
    time, never whole: at most ``WIDEN_BLOCK_ELEMENTS`` elements and half of its rows. A ``QuantizedWeight`` goes
    through the backend's IA3 product with a scale of ones (decoded as the backend decodes, nothing kept)."""
    if not isinstance(weight, torch.Tensor):
        ones = torch.ones(a.shape[1], dtype=a.dtype, device=a.device)
        return get_backend(a, weight).ia3_forward(a.contiguous(), weight, None, ones, True)
    weight = weight.detach()
    if weight.dtype == a.dtype:
        return torch.mm(a, weight.t())
    N, K = weight.shape
    rows = _widen_rows(N, K)
    out = a.new_empty(a.shape[0], N)
    for start in range(0, N, rows):
        block = weight[start:start + rows].to(a.dtype)
        torch.mm(a, block.t(), out=out[:, start:start + rows])
    return out


def _second_base_product(backend, x, keep, p, seed, weight, dtype, xd=None) -> torch.Tensor:
    """``drop(x) W^T`` ``(M, N)`` in ``dtype`` (the adapters'), PEFT's second base product, by a route of
    ``widened_product``: ``widen`` is ``_base_product`` on ``drop(x)`` in ``dtype`` (``xd`` when the caller has it);
    ``pairs`` / ``pairs_x`` (bf16 ``x`` and weight, fp32 adapters) multiply the kept elements of ``x`` by ``W`` in
    bf16 with every product exact and fp32 sums (``Backend.widened_mm``, rearranging tiles of ``W`` / the kept
    ``x``), then scale by ``1 / (1 - p)``: PEFT's numbers up to the order of the sums, with no fp32 copy of ``x`` or
    of ``W``. ``keep()`` returns ``keep_scale``'s ``(M, K)`` for ``seed``; where the backend has a masked pass
    (``Backend.dropout_combine``) the kept ``x`` comes from it, with no ``(M, K)`` mask."""
    def widen():
        return _base_product(xd if xd is not None else _dropped(_cast(x, dtype), keep()), weight)

    candidates = {"widen": widen}
    if dtype == _F32 and isinstance(weight, torch.Tensor) and backend.widened_mm_eligible(x, weight):
        for route, interleave_x in (("pairs", False), ("pairs_x", True)):
            candidates[route] = (lambda interleave_x=interleave_x:
                                 backend.widened_mm(_kept(backend, x, p, seed, keep), weight.detach(),
                                                    interleave_x).mul_(1.0 / (1.0 - p)))
    kind = "dense" if isinstance(weight, torch.Tensor) else weight.kind
    key = routing.make_key("widened_product", backend.name, kind, x.dtype, weight.dtype, (dtype,), x.shape[0],
                           weight.shape[0], weight.shape[1], True, 0, 1)
    return routing.run(key, candidates, x.device.type)


def _lora_part(route, backend, x, weight, bias, A, B, s, p, seed, xd_a):
    """``(L, h)``: ``L = x W^T + bias + s drop(x) A^T B^T`` in ``x``'s dtype and ``h = drop(x_a) A^T`` in ``A``'s
    dtype; ``xd_a`` is ``drop(x)`` in ``A``'s dtype when ``p > 0`` (compose only)."""
    if route == "fused":
        y, xa = backend.lora_forward(x, weight, bias, [A], [B], [None], [s], [p], [seed])
        return y, xa[0]
    At = A.detach().t()
    if p > 0:
        h = torch.mm(xd_a, At)
    else:
        h = x.new_empty(x.shape[0], A.shape[0], dtype=A.dtype)
        for rows, block in _widened_blocks(x, A.dtype):
            torch.mm(block, At, out=h[rows])
    y = F.linear(x, weight.detach(), None if bias is None else bias.detach())
    y.addmm_(_cast(h, y.dtype), _cast(B.detach().t(), y.dtype), alpha=s)
    return y, h


def _forward(route, backend, x, weight, bias, A, B, scale, s, p, seed):
    """``(y, h, z, z_factor)`` of the DoRA forward (module docstring) for 2-D ``x`` ``(M, K)``; ``scale`` fp32
    ``(N,)``; ``z`` holds ``z_factor`` times the unscaled product (1 but for the ``stacked`` route)."""
    if route == "stacked":
        return _forward_stacked(backend, x, weight, bias, A, B, scale, s, p, seed)
    if p == 0:
        if route == "compose" and all(t.dtype == _F32 for t in (x, A, B)) and \
                isinstance(weight, torch.Tensor) and weight.dtype == _F32:
            # x W^T and x A^T by the vendor GEMM, then z += s h B^T and y = c z + b in one pass of the backend.
            z = F.linear(x, weight.detach())
            h = torch.mm(x, A.detach().t())
            y, z = _epilogue(backend, z, None, h, B, s, 0.0, scale, None if bias is None else bias.detach().to(_F32),
                             x.dtype)
            return y, h, z, 1.0
        z, h = _lora_part(route, backend, x, weight, None, A, B, s, 0.0, 0, None)
        # c * z (+ b) in fp32, written once in x's dtype.
        y = _scaled(z, scale, x.dtype, None if bias is None else bias.detach().to(_F32), backend)
        return y, h, z, 1.0
    drawn = []

    def keep():  # keep_scale, drawn once and only where a route needs the whole (M, K) of it
        if not drawn:
            drawn.append(keep_scale(backend, x.shape[0], x.shape[1], p, seed, x.device))
        return drawn[0]

    xd_a = _dropped(_cast(x, A.dtype), keep()) if route == "compose" else None
    L, h = _lora_part(route, backend, x, weight, bias, A, B, s, p, seed, xd_a)
    z = _second_base_product(backend, x, keep, p, seed, weight, A.dtype, xd_a)
    drawn.clear()  # the (M, K) mask is transient
    del xd_a
    z.addmm_(_cast(h, z.dtype), _cast(B.detach().t(), z.dtype), alpha=s)
    return _scaled(z, scale - 1.0, x.dtype, L, backend), h, z, 1.0


def _forward_stacked(backend, x, weight, bias, A, B, scale, s, p, seed):
    """Route ``stacked`` (dropout, fp32 adapters): ``x`` and its dropped copy multiplied by ``W`` in one product over
    their ``2M`` rows, then the adapter's update, the scaling and the rounding in one pass: ``_stacked_fp32`` for an
    fp32 ``x`` and weight, ``_stacked_widened`` for bf16 ones."""
    if x.dtype == _F32:
        return _stacked_fp32(backend, x, weight, bias, A, B, scale, s, p, seed)
    return _stacked_widened(backend, x, weight, bias, A, B, scale, s, p, seed)


def _stacked_fp32(backend, x, weight, bias, A, B, scale, s, p, seed):
    """Route ``stacked`` for fp32 ``x``, weight and adapters: ``x`` and ``drop(x)`` (PEFT's dropped input, written by
    the backend's masked pass) as the two halves of one transient ``(2M, K)`` matrix, multiplied by ``W`` in one
    vendor GEMM (``W`` packed and read once for both): ``P_1 = x W^T``, ``P_2 = drop(x) W^T``. With
    ``h = drop(x) A^T``: ``z = P_2 + s h B^T`` and ``y = P_1 + b + s h B^T + (c - 1) z`` in one pass, ``z`` written
    into its own ``(M, N)`` (the ``(2M, N)`` product is transient). A dropped element of ``x`` is a zero of
    ``drop(x)`` whatever ``x`` holds there (as the masked passes write it). Returns ``z`` with ``z_factor = 1``."""
    M, K = x.shape
    rows = x.new_empty(2 * M, K)
    rows[:M].copy_(x)
    xd = rows[M:]
    if backend.dropout_combine(None, x, p, seed, _as_fp32(1.0 / (1.0 - p)), 0.0, out=xd) is None:
        torch.mul(x, keep_scale(backend, M, K, p, seed, x.device), out=xd)
    product = torch.mm(rows, weight.detach().t())
    h = backend.lora_down(xd, A)
    del rows, xd
    base = product[:M]
    b = None if bias is None else bias.detach().to(_F32)
    f = scale - 1.0
    y, z = _epilogue(backend, product[M:], base, h, B, s, s, f, b, x.dtype,
                     z_out=torch.empty(M, product.shape[1], dtype=_F32, device=x.device))
    return y, h, z, 1.0


def _stacked_widened(backend, x, weight, bias, A, B, scale, s, p, seed):
    """Route ``stacked`` (dropout, bf16 ``x`` and weight, fp32 adapters, a backend with ``widened_mm``): ``x`` and its
    kept elements (exact in bf16, ``1 / (1 - p)`` after the sums) multiplied by ``W`` in one widened product
    (``Backend.widened_mm_parts``: ``W`` read once for both; exact products, fp32 sums), ``P_1`` and ``P_2``. With
    ``h = kept(x) A^T / (1 - p)``: ``z' = P_2 + (1 - p) s h B^T = (1 - p) z`` and
    ``y = P_1 + b + s h B^T + ((c - 1) / (1 - p)) z'``, rounded once. Returns ``z'`` with ``z_factor = 1 - p``."""
    kept = _kept(backend, x, p, seed, lambda: keep_scale(backend, x.shape[0], x.shape[1], p, seed, x.device))
    base, z = backend.widened_mm_parts([x, kept], weight.detach())
    keep = 1.0 - p
    h = backend.lora_down(kept, A).mul_(1.0 / keep)
    del kept
    b = None if bias is None else bias.detach().to(x.dtype).to(_F32)
    f = (scale - 1.0).div_(keep)
    y, z = _epilogue(backend, z, base, h, B, keep * s, s, f, b, x.dtype)
    return y, h, z, keep


# --------------------------------------------------------------------------------------------------- backward
def _backward_compose(backend, dy, ge, x, weight, A, B, h, s, p, seed, needs_dx, needs_dA):
    """``(dX, dA, dB)`` by vendor GEMMs (formulas: module docstring); ``ge`` as ``_scaled_grads`` makes it."""
    M = dy.shape[0]
    g = ge[:M]
    # g B and g^T h in B's dtype, g widened a block of rows at a time (no whole fp32 copy of g); dB as (h^T g)^T,
    # the layout of the LoRA composition's (fastpeft.backends.compose.backward).
    Bd, ha = B.detach(), _cast(h, B.dtype)
    gB = g.new_empty(g.shape[0], B.shape[1], dtype=B.dtype)
    dB_t = g.new_zeros(B.shape[::-1], dtype=B.dtype)
    for rows, block in _widened_blocks(g, B.dtype):
        torch.mm(block, Bd, out=gB[rows])
        dB_t.addmm_(ha[rows].t(), block)
    gB.mul_(s)
    dB = dB_t.mul_(s).t()
    ks = keep_scale(backend, dy.shape[0], weight.shape[1], p, seed, dy.device) if p > 0 and (needs_dx or needs_dA) \
        else None
    dA = None
    if needs_dA:
        dA = x.new_zeros(A.shape, dtype=A.dtype)
        for rows, block in _widened_blocks(x, A.dtype):
            dA.addmm_(gB[rows].t().to(A.dtype), block if ks is None else _dropped(block, ks[rows]))
    dx = None
    if needs_dx:
        W = weight.detach()
        if ks is None:
            dx = torch.mm(g, W).addmm_(_cast(gB, g.dtype), _cast(A.detach(), g.dtype))
        else:
            inner = torch.mm(ge[M:], W).to(_F32).addmm_(gB.to(_F32), A.detach().to(_F32))
            dx = _cast(torch.mm(dy, W).to(_F32).addcmul_(inner, ks), dy.dtype)
    return dx, dA, dB


def _backward_fused(backend, dy, ge, x, weight, A, B, h, s, p, seed, needs_dx, needs_dA):
    """``(dX, dA, dB)`` by the backend's LoRA backward on ``g = c * dY`` (its own measured route); with dropout,
    ``dX`` is then corrected from ``g W`` to ``dY W + e W * mask / (1 - p)``, i.e. ``+ (mask / (1 - p) - 1) * e W``."""
    M = dy.shape[0]
    dx, dA, dB, _ = backend.lora_backward(ge[:M], x if needs_dA else None, weight, [A], [B], [h], [s], [p],
                                          [seed], needs_dx, needs_dA, needs_grad_bias=False)
    if needs_dx and p > 0:
        dx = _dropout_corrected(backend, dx, _grad_product(backend, ge[M:], weight), p, seed, dy.dtype)
    return dx, dA[0], dB[0]


def _dropout_corrected(backend, dx: torch.Tensor, eW: torch.Tensor, p: float, seed: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """``dx + (mask / (1 - p) - 1) * eW`` in fp32, rounded once to ``dtype`` (``(M, K)`` tensors): the backend's
    masked pass where it has one (into ``dx`` when that is already ``dtype``), else ``keep_scale``."""
    # keep_scale - 1 where kept (fp32, as keep_scale(...).sub_(1.0) holds it) and -1 where dropped
    kept = _as_fp32(_as_fp32(1.0 / (1.0 - p)) - 1.0)
    out = dx if dx.dtype == dtype else torch.empty(dx.shape, dtype=dtype, device=dx.device)
    corrected = backend.dropout_combine(dx, eW, p, seed, kept, -1.0, out=out)
    if corrected is None:
        ks = keep_scale(backend, dx.shape[0], dx.shape[1], p, seed, dx.device).sub_(1.0)
        corrected = dx.to(_F32).addcmul_(eW.to(_F32), ks)
    return _cast(corrected, dtype)


def _backward_stacked(backend, dy, ge, x, weight, A, B, h, s, p, seed, needs_dx, needs_dA):
    """Route ``stacked`` (dropout, ``dX`` wanted, fp32 adapters): ``g = c * dY`` and ``e = (c - 1) * dY`` are the two
    halves of one ``(2M, N)`` matrix, multiplied by ``W`` in one product (``W`` read once for both: the vendor GEMM
    for an fp32 ``dY`` and weight, else the backend's widened product of the bf16 ones, exact products and fp32
    sums); then ``dX = g W + s (g B) A * mask / (1 - p) + (mask / (1 - p) - 1) * e W``, rounded once, by the
    backend's masked passes (``Backend.lora_backward_onto`` with the correction: one mask draw for ``dA`` and
    ``dX``)."""
    M = dy.shape[0]
    W = weight.detach()
    product = torch.mm(ge, W) if ge.dtype == _F32 and W.dtype == _F32 else backend.widened_mm(ge, W.t())
    dx = torch.empty(M, product.shape[1], dtype=dy.dtype, device=dy.device)
    done = backend.lora_backward_onto(product[:M], ge[:M], x if needs_dA else None, A, B, h, s, p, seed,
                                      corrected=(product[M:], dx))
    if done is None:  # not a route of this backend (_backward_routes offers it only where the passes exist)
        raise RuntimeError(f"fastpeft: backend {backend.name!r} has no lora_backward_onto for the stacked route")
    return dx, done[0], done[1]


def _grad_product(backend, dy: torch.Tensor, weight) -> torch.Tensor:
    """``dY W`` ``(M, K)`` in ``dY``'s dtype; a dense weight narrower than ``dY`` (bf16 base, fp32 adapters) is
    widened a block of rows at a time (``_widen_rows``); a ``QuantizedWeight`` through the backend's LoRA backward
    with a zero rank-1 adapter (its base product decodes the weight as the backend decodes; not every backend takes
    an empty adapter list)."""
    if isinstance(weight, torch.Tensor):
        weight = weight.detach()
        if weight.dtype == dy.dtype:
            return torch.mm(dy, weight)
        N, K = weight.shape
        rows = _widen_rows(N, K)
        out = dy.new_zeros(dy.shape[0], K)
        for start in range(0, N, rows):
            out.addmm_(dy[:, start:start + rows], weight[start:start + rows].to(dy.dtype))
        return out
    zeros_a = torch.zeros(1, weight.shape[1], dtype=dy.dtype, device=dy.device)
    zeros_b = torch.zeros(weight.shape[0], 1, dtype=dy.dtype, device=dy.device)
    h = torch.zeros(dy.shape[0], 1, dtype=dy.dtype, device=dy.device)
    dx, _, _, _ = backend.lora_backward(dy.contiguous(), None, weight, [zeros_a], [zeros_b], [h], [0.0], [0.0], [0],
                                        True, False, needs_grad_bias=False)
    return dx


_BACKWARDS = {"compose": _backward_compose, "fused": _backward_fused, "stacked": _backward_stacked}


def _routes_for(weight) -> tuple[str, ...]:
    """``compose`` is torch's dense GEMMs: a ``QuantizedWeight`` runs ``fused`` (the backend decodes it)."""
    return ("compose", "fused") if isinstance(weight, torch.Tensor) else ("fused",)


def _forward_routes(backend, x, weight, A, p) -> tuple[str, ...]:
    """``_routes_for`` plus ``stacked`` where it may run (fastpeft.routing.ROUTE_LIMITS)."""
    routes = _routes_for(weight)
    if (p > 0 and isinstance(weight, torch.Tensor) and A.dtype == _F32
            and ((x.dtype == weight.dtype == _F32 and type(backend).dora_epilogue is not Backend.dora_epilogue)
                 or backend.widened_mm_eligible(x, weight.detach(), interleave_a=False))):
        routes += ("stacked",)
    return routes


def _backward_routes(backend, dy, weight, A, p, needs_dx) -> tuple[str, ...]:
    """``_routes_for`` plus ``stacked`` where it may run (fastpeft.routing.ROUTE_LIMITS)."""
    routes = _routes_for(weight)
    if (p > 0 and needs_dx and isinstance(weight, torch.Tensor) and A.dtype == _F32
            and type(backend).lora_backward_onto is not Backend.lora_backward_onto
            and (dy.dtype == weight.dtype == _F32
                 or backend.widened_mm_eligible(dy, weight.detach().t(), interleave_a=False))):
        routes += ("stacked",)
    return routes


def _route_key(op, backend, x, weight, A, p, grads=""):
    kind = "dense" if isinstance(weight, torch.Tensor) else weight.kind
    return routing.key_of_call(op, backend.name, kind, x, weight, [A], [p], grads)


def _unmeasured(backend) -> Optional[str]:
    """Under Triton's interpreter timings mean nothing: the fused route exercises the kernels."""
    return None if backend.timings_mean_something() else "fused"


class DoraLinearFunction(torch.autograd.Function):
    """DoRA forward/backward on 2-D ``x`` for a frozen base, dense or a ``QuantizedWeight`` (PEFT's set-up); formulas
    in the module docstring.

    Inputs that get gradients: ``x``, ``lora_A``, ``lora_B``, ``magnitude``. ``norm`` is fp32 ``(N,)`` and constant.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, magnitude, weight, bias, norm, scaling, dropout_p, seed):
        backend = get_backend(x, weight)
        scale = magnitude.detach().to(_F32) / norm
        candidates = {route: (lambda route=route: _forward(route, backend, x, weight, bias, lora_A, lora_B, scale,
                                                             scaling, dropout_p, seed))
                      for route in _forward_routes(backend, x, weight, lora_A, dropout_p)}
        key = _route_key("dora_forward", backend, x, weight, lora_A, dropout_p)
        y, h, z, z_factor = routing.run(key, candidates, x.device.type, unmeasured=_unmeasured(backend))
        _, needs_dA, _, needs_dm = ctx.needs_input_grad[:4]
        ctx.backend = backend
        hold_weight(ctx, weight)
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.z_factor = scaling, dropout_p, seed, z_factor
        ctx.save_for_backward(x if needs_dA else None, lora_A, lora_B, h, z if needs_dm else None, scale, norm,
                              magnitude)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, A, B, h, z, scale, norm, magnitude = ctx.saved_tensors
        needs_dx, needs_dA, needs_dB, needs_dm = ctx.needs_input_grad[:4]
        backend, weight = ctx.backend, held_weight(ctx)
        dy = grad_y.contiguous()
        dm = dx = dA = dB = None
        needs_grads = needs_dx or needs_dA or needs_dB
        dots, ge = _grad_prologue(backend, dy, z if needs_dm else None, scale, needs_dx and ctx.dropout_p > 0,
                                  needs_grads)
        if needs_dm:
            dm = (dots / (norm * ctx.z_factor if ctx.z_factor != 1.0 else norm)).to(magnitude.dtype)
        if needs_grads:
            grads = routing.grads_key(needs_dx, needs_dA)
            eligible = _backward_routes(backend, dy, weight, A, ctx.dropout_p, needs_dx)
            candidates = {route: (lambda fn=fn: fn(backend, dy, ge, x, weight, A, B, h, ctx.scaling,
                                                   ctx.dropout_p, ctx.seed, needs_dx, needs_dA))
                          for route, fn in _BACKWARDS.items() if route in eligible}
            key = _route_key("dora_backward", backend, dy, weight, A, ctx.dropout_p, grads)
            dx, dA, dB = routing.run(key, candidates, dy.device.type, unmeasured=_unmeasured(backend))
            dA = None if dA is None or not needs_dA else _cast(dA, A.dtype)
            dB = _cast(dB, B.dtype) if needs_dB else None
        return dx, dA, dB, dm, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------- public API
def check_tensors(where: str, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                  magnitude: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the module (``where``), the tensor and the problem for DoRA tensors that do not
    fit the ``(N, K)`` base weight: ``lora_A`` ``(r, K)``, ``lora_B`` ``(N, r)``, ``magnitude`` ``(N,)``."""
    N, K = weight.shape
    r = lora_A.shape[0] if lora_A.dim() == 2 else -1
    for name, tensor, expected in (("lora_A", lora_A, (r, K)), ("lora_B", lora_B, (N, r)),
                                   ("magnitude", magnitude, (N,))):
        if tuple(tensor.shape) != expected or r < 1:
            raise ValueError(f"fastpeft: module '{where}': DoRA tensor {name} has shape {tuple(tensor.shape)}, but a "
                             f"base weight of shape ({N}, {K}) with lora_A of rank {r} needs {expected}")
        if not tensor.is_floating_point():
            raise ValueError(f"fastpeft: module '{where}': DoRA tensor {name} has dtype {tensor.dtype}; it must be "
                             f"a floating-point tensor")


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float,
    training: bool,
    norm: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    where: str = "dora_linear",
) -> torch.Tensor:
    """PEFT's DoRA ``Linear`` forward (one adapter), without building ``W + s B A``.

    Args:
        x: ``(..., K)``, fp16/bf16/fp32, ``weight``'s dtype.
        weight: ``(N, K)`` dense tensor, any strides (a transposed view for ``fan_in_fan_out``).
        bias: ``(N,)`` or None.
        lora_A, lora_B, magnitude: ``(r, K)``, ``(N, r)``, ``(N,)``, any float dtype (PEFT keeps them in fp32 under
            a bf16 base by default); the adapter sees ``x`` cast to ``lora_A``'s dtype, as PEFT's does.
        scaling: ``lora_alpha / r`` (or ``/ sqrt(r)``); dropout_p: applied only when ``training``.
        norm: fp32 ``(N,)`` ``weight_norm(...)`` when the caller caches it (``DoraCache``), else computed here.
        scale: fp32 ``(N,)`` ``magnitude / norm`` when the caller caches it; used only where no gradient flows.
        where: the module's name, for error messages.
    Returns:
        ``(..., N)`` in ``x``'s dtype.
    """
    check_tensors(where, weight, lora_A, lora_B, magnitude)
    x2, lead = _flatten(x)
    p = float(dropout_p) if training else 0.0
    s = float(scaling)
    if norm is None:
        norm = weight_norm(weight, lora_A, lora_B, s)
    mode = _call_mode(weight, bias)
    seed = int(draw_seeds(1, [p], training)[0]) if p > 0 else 0
    if mode in ("custom_op", "reference") and p == 0:
        # A trainable base, or a graph being compiled: PEFT's formula in torch ops under autograd (traceable, and
        # still no W + s B A), the norm a constant as PEFT makes it.
        y = stacked_linear(x2, weight, bias, [(lora_A, lora_B, None, s, magnitude, norm, 0.0, 0)])
    elif mode in ("custom_op", "reference"):
        # The same with dropout: the executable spec, which regenerates the mask from the seed as the op does.
        y = reference.dora_linear(x2, weight, bias, lora_A, lora_B, magnitude, s, p, seed)
    elif mode == "inference":
        backend = get_backend(x2, weight)
        if scale is None:
            scale = magnitude.detach().to(_F32) / norm
        with kept_copies():  # nothing trains in this call (and h = x A^T only feeds the output)
            y = routing.run(_route_key("dora_forward", backend, x2, weight, lora_A, p),
                            {route: (lambda route=route: _forward(route, backend, x2, weight, bias, lora_A, lora_B,
                                                                    scale, s, p, seed)[0])
                             for route in _forward_routes(backend, x2, weight, lora_A, p)},
                            x2.device.type, unmeasured=_unmeasured(backend))
    else:
        y = DoraLinearFunction.apply(x2, lora_A, lora_B, magnitude, weight, bias, norm, s, p, seed)
    return y if len(lead) == 1 else y.view(*lead, y.shape[-1])


# ------------------------------------------------------------------------------------------------ module layer
def _is_dora(variant) -> bool:
    from peft.tuners.lora.variants import DoraLinearVariant

    return isinstance(variant, DoraLinearVariant) or variant is DoraLinearVariant


def non_dora_variants(layer, names) -> list[str]:
    """The class names of the LoRA variants other than DoRA among adapters ``names`` of a PEFT LoRA layer."""
    variants = getattr(layer, "lora_variant", {})
    return sorted({type(variants[name]).__name__ for name in names if name in variants
                   and not _is_dora(variants[name])})


def unfused_variant_reason(layer, active) -> Optional[str]:
    """Why a PEFT LoRA layer's LoRA variants keep its call on PEFT's own forward, or None when fastpeft serves it:
    fastpeft serves DoRA alone or beside other adapters (plain LoRA or DoRA), over dense and quantized bases, with
    dropout and under autocast; another LoRA variant among the active adapters keeps PEFT's forward. (Whether the
    base is served is decided per call: ``dora_call_ok``.)"""
    if not any(name in layer.lora_variant for name in active):
        return None
    other = non_dora_variants(layer, active)
    if other:
        return f"LoRA variant {', '.join(other)} is not fused"
    return None


def _dropout_p(layer, name: str) -> float:
    dropout = layer.lora_dropout[name]
    return float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0


def dora_call_ok(layer, weight, x) -> bool:
    """Whether the active DoRA adapters of ``layer`` can run fused for input ``x``: a dense base, or ``layer`` is a
    bitsandbytes twin (they pass the decoded ``QuantizedWeight``; PEFT's generic layer over such a base keeps its own
    forward). Autocast runs fused too: ``layer_forward`` casts as autocast would (``autocast_adapters``)."""
    return isinstance(weight, torch.Tensor) or getattr(layer, "_fastpeft_bnb_twin", False)


class _InputProducts(torch.autograd.Function):
    """``(h, z) = (drop(x) A^T, drop(x) W^T)`` for a frozen base ``W`` (dense ``(N, K)`` or a ``QuantizedWeight``);
    ``x`` ``(M, K)`` in ``A``'s dtype, ``h`` ``(M, r)`` and ``z`` ``(M, N)`` in ``x``'s dtype. Either part may be left
    out (``A`` None, ``with_base`` False): it is returned as None. The mask is drawn from ``seed`` by the backend's
    masked pass (``keep_scale``) in forward and drawn again in backward: only ``x`` and ``A`` are saved, never the
    mask or ``drop(x)``, and nothing ``N x K`` is formed (``_base_product``/``_grad_product``).

    Backward: ``dX = (dh A + dz W) * mask / (1 - p)``, ``dA = dh^T drop(x)``."""

    @staticmethod
    def forward(ctx, x, A, weight, p, seed, with_base):
        ctx.set_materialize_grads(False)
        backend = get_backend(x, weight)
        xd = x if p == 0 else _dropped(x, keep_scale(backend, x.shape[0], x.shape[1], p, seed, x.device))
        h = None if A is None else torch.mm(xd, A.detach().t())
        z = _base_product(xd, weight) if with_base else None
        del xd
        ctx.backend, ctx.p, ctx.seed = backend, p, seed
        hold_weight(ctx, weight)
        ctx.save_for_backward(x if A is not None and ctx.needs_input_grad[1] else None, A)
        return h, z

    @staticmethod
    def backward(ctx, dh, dz):
        x, A = ctx.saved_tensors
        needs_dx, needs_dA = ctx.needs_input_grad[:2]
        needs_dA = needs_dA and dh is not None
        d = None
        if needs_dx and dh is not None:
            d = torch.mm(dh, A.detach())
        if needs_dx and dz is not None:
            dzw = _grad_product(ctx.backend, dz.contiguous(), held_weight(ctx))
            d = dzw if d is None else d.add_(dzw)
        ks = None
        if ctx.p > 0 and (d is not None or needs_dA):
            rows, cols = (x.shape if x is not None else d.shape)
            ks = keep_scale(ctx.backend, rows, cols, ctx.p, ctx.seed, (x if x is not None else d).device)
        dx = d if d is None or ks is None else _dropped(d, ks)
        dA = None
        if needs_dA:
            dA = torch.mm(dh.t(), x if ks is None else _dropped(x, ks))
        return dx, dA, None, None, None, None


def stacked_linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor], adapters,
                   round_each: bool = False) -> torch.Tensor:
    """PEFT's ``lora.Linear.forward`` over several active adapters, DoRA among them, differentiated by autograd: each
    DoRA adapter without active dropout scales the sum so far (PEFT's ``base_result`` is the running result there);
    one with dropout adds ``(c - 1) drop(x) W^T + c s drop(x) A^T B^T`` (a second base product, on its dropped
    input). Norms come from ``weight_norm``, never from ``W + s B A``; the products on dropped inputs go through
    ``_InputProducts`` (mask regenerated from the seed, nothing ``N x K``), or, with a trainable base or under
    ``torch.compile``, through the spec's torch ops.

    ``x``: ``(..., K)``; ``weight``: ``(N, K)`` dense or a ``QuantizedWeight``; ``adapters``: in PEFT's order,
    ``(A (r, K), B (N, r), lora_bias (N,) or None, scaling, magnitude (N,) or None, norm fp32 (N,) or None, p,
    seed)``, magnitude and norm None for plain LoRA, ``p`` the dropout applied (0 outside training).
    ``round_each``: round the running sum to the base output's dtype after every adapter (PEFT's bitsandbytes
    layers do). Returns ``(..., N)`` in the base output's dtype."""
    x2, lead = _flatten(x)
    dense = isinstance(weight, torch.Tensor)
    spec = dense and _call_mode(weight, bias) in ("custom_op", "reference")
    if dense:
        result = F.linear(x2, weight, bias)
    else:
        result = _InputProducts.apply(x2, None, weight, 0.0, 0, True)[1]
        result = result if bias is None else result + bias
    out_dtype = result.dtype
    for xi, (A, B, lora_bias, s, magnitude, norm, p, seed) in zip(
            reference.adapter_inputs(x2, [a[0] for a in adapters]), adapters):
        xa = _cast(xi, A.dtype)
        base_too = magnitude is not None and p > 0
        if spec:
            xd = reference.apply_dropout(xa, p, seed)
            h = F.linear(xd, A)
            z = F.linear(xd, weight.to(xd.dtype)) if base_too else None
        else:
            h, z = _InputProducts.apply(xa, A, weight, float(p), int(seed), base_too)
        lora = F.linear(h, B, lora_bias)
        if magnitude is None:
            result = result + lora * s
        else:
            c = magnitude.to(_F32) / norm
            if z is None:
                z = result if bias is None else result - bias
            result = result + (c - 1) * z + c * lora * s
        if round_each:
            result = result.to(out_dtype)
    result = result.to(out_dtype)
    return result if len(lead) == 1 else result.view(*lead, result.shape[-1])


def autocast_adapters(x: torch.Tensor, weight, bias: Optional[torch.Tensor], adapters: list):
    """``(x, weight, bias, adapters)`` cast as autocast casts ``F.linear``'s operands (``functional._autocast``, the
    LoRA layers' rule): ``x``, a dense weight, the bias and each adapter's ``A``, ``B`` and ``lora_bias`` to the
    autocast dtype. The magnitude and the norm keep their dtype: PEFT's ``m / n`` and its row norm are elementwise
    and reductions, which autocast leaves in fp32 (the norm here is taken from the uncast tensors). ``adapters``
    rows are ``[A, B, lora_bias, ...]``."""
    x, weight, bias, (As, Bs, biases) = _autocast(x, weight, bias, [[a[0] for a in adapters],
                                                                    [a[1] for a in adapters],
                                                                    [a[2] for a in adapters]])
    return x, weight, bias, [[A, B, lb, *rest[3:]] for A, B, lb, rest in zip(As, Bs, biases, adapters)]


def layer_forward(layer, x: torch.Tensor, active: list, weight, bias: Optional[torch.Tensor],
                  weight_param: torch.Tensor, where: str) -> torch.Tensor:
    """The forward of PEFT LoRA layer ``layer`` whose active adapters ``active`` include DoRA: ``dora_linear`` for a
    lone DoRA adapter, ``stacked_linear`` beside others. ``weight`` is the ``(N, K)`` view of the base layer's
    ``weight_param`` (or its ``QuantizedWeight``); ``where`` names the layer in errors. The layer's ``DoraCache``
    keeps the norms (and, with no gradient wanted for a magnitude, the lone adapter's scale) while the tensors they
    come from are unchanged. Under autocast the operands are cast as autocast would cast them
    (``autocast_adapters``) and the call runs with autocast off, so the fp32 parts (norm, scale, epilogue) stay
    fp32."""
    if torch.compiler.is_compiling() or under_func_transform():
        # A graph being compiled computes the norms in the graph: the cache's stamps are Python-side state. Under a
        # torch.func transform the tensors are wrappers, with no storage to stamp.
        cache = _UNCACHED
    else:
        cache = layer.__dict__.get("_fastpeft_dora_cache")
        if cache is None:
            cache = layer.__dict__["_fastpeft_dora_cache"] = DoraCache()
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        adapters = _gather_adapters(layer, cache, active, weight, weight_param, where)
        # PEFT's bitsandbytes layers round the running sum to the base output's dtype after every adapter.
        return _adapters_forward(layer, cache, active, x, weight, bias, adapters, where,
                                 round_each=getattr(layer, "_fastpeft_bnb_twin", False))
    with torch.autocast(device, enabled=False):  # the norms from the uncast tensors, in fp32
        adapters = _gather_adapters(layer, cache, active, weight, weight_param, where)
    x, weight, bias, adapters = autocast_adapters(x, weight, bias, adapters)
    with torch.autocast(device, enabled=False):
        return _adapters_forward(layer, cache, active, x, weight, bias, adapters, where, round_each=False)


def _gather_adapters(layer, cache: DoraCache, active: list, weight, weight_param, where: str) -> list:
    """Per active adapter, ``[A, B, lora_bias or None, scaling, magnitude or None, norm or None, p]`` (magnitude and
    norm for DoRA adapters, the norm from ``cache``; ``p`` the dropout applied this call)."""
    adapters = []
    for name in active:
        A, up = layer.lora_A[name].weight, layer.lora_B[name]
        magnitude = norm = None
        if name in layer.lora_variant:
            magnitude = layer.lora_magnitude_vector[name].weight
            check_tensors(where, weight, A, up.weight, magnitude)
            norm = cache.norm(name, weight_param, weight, A, up.weight, layer.scaling[name])
        # PEFT's rule: the dropped input (and, for DoRA, a second base product) only for a real dropout module in
        # training, in a layer in training (PEFT reuses the base output when the layer is not training, and its
        # dropout module drops nothing when the module is not).
        p = _dropout_p(layer, name) if layer.training and layer.lora_dropout[name].training else 0.0
        adapters.append([A, up.weight, up.bias if layer.lora_bias[name] else None, layer.scaling[name], magnitude,
                         norm, p])
    return adapters


def _adapters_forward(layer, cache: DoraCache, active: list, x, weight, bias, adapters: list, where: str,
                      round_each: bool) -> torch.Tensor:
    """``layer_forward``'s computation once the operands are gathered (rows of ``stacked_linear``'s adapters
    without the seed)."""
    if len(adapters) > 1:
        ps = [a[6] for a in adapters]
        seeds = draw_seeds(len(adapters), ps, layer.training).tolist() if any(ps) else [0] * len(adapters)
        return stacked_linear(x, weight, bias, [(*a, seed) for a, seed in zip(adapters, seeds)], round_each)
    A, B, _, scaling, magnitude, norm, p = adapters[0]
    return dora_linear(x, weight, bias, A, B, magnitude, scaling, p, training=layer.training, norm=norm,
                       scale=cache.scale(active[0], magnitude, norm), where=where)


def clear_cache(layer) -> None:
    """Forget a layer's cached DoRA values (after merge/unmerge rewrote its base weight)."""
    cache = layer.__dict__.get("_fastpeft_dora_cache")
    if cache is not None:
        cache.clear()
