"""The one dropout RNG of fastpeft, written in plain torch: the executable spec every backend reproduces.

A LoRA dropout mask is never stored. Element ``(m, k)`` of adapter ``i``'s mask over a 2-D input ``x`` of shape
``(M, K)`` is

    keep[m, k] = uniform(seed_i, m * K + k) >= p

where, for an element offset ``o``, ``uniform(seed, o) = h * 2**-16`` in float32 and ``h`` is the 16-bit half
``o % 2`` (0: the low half) of word ``(o // 2) % 4`` of one Philox-4x32-10 call on the counter ``q = o // 8``:
counter ``(q_lo, q_hi, 0, 0)``, key ``(seed_lo, seed_hi)``, 10 rounds, the four output words in Triton's
``tl.randint4x`` order. Eight consecutive elements share one call, so a pass over ``x`` runs an eighth of the rounds
that one call per element would. The comparison is made in float32, where ``h * 2**-16`` is exact: an element is
kept exactly when ``h >= ceil(p * 65536)``, so ``p`` acts at a resolution of ``2**-16`` (the kept fraction is
``1 - ceil(p * 65536) / 65536``, within ``1.6e-5`` of ``1 - p``). Because the Triton kernels (``tl.randint4x`` on
``o // 8``), the C++ extension, the CUDA header and this file compute the same function, every backend draws the
same mask for the same seed, and backward regenerates forward's mask from the seed alone.

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
HALF_SCALE = 2.0**-16  # a 16-bit draw h as the uniform h * 2**-16 (exact in float32)


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


def philox_half(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """The 16-bit draw of each non-negative int64 element offset ``o``: half ``o % 2`` (0: low) of word
    ``(o // 2) % 4`` of Philox on counter ``o // 8``, as int64 in [0, 2**16)."""
    offsets = offsets.to(torch.int64)
    words = torch.stack(philox_words(seed, offsets >> 3), dim=-1)
    word = torch.gather(words, -1, ((offsets >> 1) & 3).unsqueeze(-1)).squeeze(-1)
    return (word >> ((offsets & 1) * 16)) & 0xFFFF


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """The mask uniforms of element ``offsets``: float32 in [0, 1) (multiples of ``2**-16``), same shape as
    ``offsets``."""
    return philox_half(seed, offsets).to(torch.float32) * torch.tensor(HALF_SCALE, dtype=torch.float32)


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean keep mask of shape ``(rows, cols)`` for dropout probability ``p`` (keep rate ``1 - p``)."""
    offsets = torch.arange(rows * cols, dtype=torch.int64, device=device).view(rows, cols)
    return philox_uniform(seed, offsets) >= torch.tensor(p, dtype=torch.float32, device=device)
