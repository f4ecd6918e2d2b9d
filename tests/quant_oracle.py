"""Host-independent decoders for bitsandbytes' quantized weights: the tests' oracle for dequantization.

bitsandbytes dispatches its CPU ``dequantize_4bit`` by host: on AVX2-only CPUs it runs a pure-torch decode, on
AVX-512 CPUs a native kernel that is wrong whenever a quantization block straddles two rows (``K % blocksize != 0``).
A test oracle must not depend on the CPU it runs on, so these decoders are written here from the format itself:
4-bit codes packed two per byte (high nibble first) over the row-major flattened weight, a 16-entry code table, one
absmax per ``blocksize`` consecutive elements, and for double quantization an absmax that is itself stored as 8-bit
codes with a second-level absmax per ``state2.blocksize`` entries plus an offset. The arithmetic (one fp32 product
per element, then one cast) is the one bitsandbytes documents, so the results are bit-equal to its correct paths.
"""

from __future__ import annotations

import torch


def _as_bytes(packed: torch.Tensor) -> torch.Tensor:
    flat = packed.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def _blockwise(values: torch.Tensor, scale: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``values[i] * scale[i // blocksize]`` in fp32 for a flat ``values`` (the last block may be short)."""
    index = torch.arange(values.numel()) // blocksize
    return values.float() * scale.float()[index]


def absmax_of(state) -> torch.Tensor:
    """fp32 per-block absmax of a bitsandbytes ``QuantState``, decoding the nested (double-quantized) form."""
    if not state.nested:
        return state.absmax.float()
    inner = state.state2
    decoded = _blockwise(inner.code.float()[state.absmax.reshape(-1).long()], inner.absmax, inner.blocksize)
    return decoded + state.offset


def dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """Decode an NF4/FP4 weight from ``bitsandbytes.functional.quantize_4bit``'s ``(packed, state)``.

    packed: the packed bytes in bitsandbytes' flat layout (``[N*K/2, 1]``, uint8 or another ``quant_storage`` dtype).
    Returns ``state.shape`` in ``state.dtype``.
    """
    numel = 1
    for d in state.shape:
        numel *= int(d)
    raw = _as_bytes(packed)
    assert raw.numel() == (numel + 1) // 2, f"{raw.numel()} packed bytes for {numel} 4-bit codes"
    assert state.code.numel() == 16, f"a 4-bit code table has 16 entries, got {state.code.numel()}"
    absmax = absmax_of(state)
    blocks = -(-numel // state.blocksize)
    assert absmax.numel() == blocks, f"{absmax.numel()} absmax values for {blocks} blocks of {state.blocksize}"
    codes = torch.stack([raw >> 4, raw & 0xF], dim=1).reshape(-1)[:numel].long()
    values = state.code.float()[codes]
    return _blockwise(values, absmax, state.blocksize).reshape(state.shape).to(state.dtype)

