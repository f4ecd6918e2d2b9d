"""The one dropout RNG of fastpeft, written in plain torch: the executable spec every backend reproduces.

A LoRA dropout mask is never stored. Element ``(m, k)`` of adapter ``i``'s mask over a 2-D input ``x`` of shape
``(M, K)`` is

    keep[m, k] = uniform(seed_i, m * K + k) >= p

where, for an element offset ``o``, ``uniform(seed, o)`` is word ``o % 4`` of one Philox-4x32-10 call on the counter
``q = o // 4``: counter ``(q_lo, q_hi, 0, 0)``, key ``(seed_lo, seed_hi)``, 10 rounds, the four output words in
Triton's ``tl.randint4x`` order. Four consecutive elements share one call, so a pass over ``x`` runs a quarter of
the rounds that one call per element would. The word is read as int32, folded to 31 bits (``x < 0 -> ~x``) and
scaled by ``4.6566127342e-10`` in float32 (Triton's ``uint_to_uniform_float``); the comparison is made in float32.
Because the Triton kernels (``tl.rand4x`` on ``o // 4``), the C++ extension, the CUDA header and this file compute
the same function, every backend draws the same mask for the same seed, and backward regenerates forward's mask
from the seed alone.

Torch has no uint32 arithmetic, so the words live in int64 tensors; the 32x32-bit products are split into 16-bit
halves so that nothing overflows int64.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
UNIFORM_SCALE = 4.6566127342e-10


def _mul_hi_lo(const: int, word: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``const * word`` for a 32-bit constant and a tensor of 32-bit words."""
    const_hi, const_lo = const >> 16, const & 0xFFFF
    upper = word * const_hi  # < 2**48
    lower = word * const_lo  # < 2**48
    hi = (upper + (lower >> 16)) >> 16
    lo = (((upper & 0xFFFF) << 16) + lower) & _MASK32
    return hi, lo


def philox_words(seed: int, counters: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four Philox-4x32-10 output words for each int64 counter, as int64 tensors in [0, 2**32)."""
    counters = counters.to(torch.int64)
    c0 = counters & _MASK32
    c1 = (counters >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_uint32(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """The mask word of each non-negative int64 element offset ``o``: word ``o % 4`` of Philox on counter ``o // 4``,
    as int64 in [0, 2**32)."""
    offsets = offsets.to(torch.int64)
    words = torch.stack(philox_words(seed, offsets >> 2), dim=-1)
    return torch.gather(words, -1, (offsets & 3).unsqueeze(-1)).squeeze(-1)


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """The mask uniforms of element ``offsets``: float32 in [0, 1), same shape as ``offsets``."""
    word = philox_uint32(seed, offsets)
    as_int32 = torch.where(word >= 2**31, word - 2**32, word)
    folded = torch.where(as_int32 < 0, ~as_int32, as_int32)
    return folded.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean keep mask of shape ``(rows, cols)`` for dropout probability ``p`` (keep rate ``1 - p``)."""
    offsets = torch.arange(rows * cols, dtype=torch.int64, device=device).view(rows, cols)
    return philox_uniform(seed, offsets) >= torch.tensor(p, dtype=torch.float32, device=device)
