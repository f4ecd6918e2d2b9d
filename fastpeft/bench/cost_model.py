"""A MODEL (not a measurement) of the GPU cost of fastpeft's fused kernels against PEFT's op sequence.

Each kernel launch is costed at the roofline: ``max(HBM bytes / bandwidth, FLOPs / peak)`` at H100 SXM figures
(3.35 TB/s, 990 dense bf16 TFLOP/s), summed over the launches of each side. Activations and weights in bf16 (2 bytes),
dropout masks as PEFT saves them (1 byte per element), LoRA A/B in bf16, L2 reuse ignored, the fused kernel's
recomputed down-projection counted in its FLOPs. ``rows()`` returns the table; ``main()`` prints it.
"""

from __future__ import annotations

BW = 3.35e12
PEAK = 990e12
E = 2  # bytes per bf16 element
BLOCK_N = 128  # column tile of the fused GEMM: each one recomputes the (BLOCK_M, r) down-projection


def _t(ops):
    """Roofline time (s) of a list of launches ``(bytes, flops)``, and the totals."""
    b = sum(o[0] for o in ops)
    f = sum(o[1] for o in ops)
    return b, f, sum(max(o[0] / BW, o[1] / PEAK) for o in ops)


def lora_forward(M, N, K, r, p):
    peft = [(E * (M * K + N * K + M * N), 2 * M * N * K)]                      # base x W^T
    if p > 0:
        peft.append((E * 2 * M * K + M * K, M * K))                            # dropout: x -> drop(x), mask
    peft += [(E * (M * K + r * K + M * r), 2 * M * K * r),                     # drop(x) A^T
             (E * (M * r + N * r + M * N), 2 * M * N * r),                     # (.) B^T
             (E * 2 * M * N, M * N),                                           # * s
             (E * 3 * M * N, M * N)]                                           # y0 + u
    extra = 2 * M * K * r * max(1, -(-N // BLOCK_N))
    if p > 0:  # split: XA once (mask generated once), then the GEMM with the XA B^T epilogue
        fused = [(E * (M * K + r * K) + 4 * M * r, 2 * M * K * r),
                 (E * (M * K + N * K + M * N + N * r) + 4 * M * r, 2 * M * N * K + 2 * M * N * r)]
    else:
        fused = [(E * (M * K + N * K + M * N + r * K + N * r) + 4 * M * r, 2 * M * N * K + extra + 2 * M * N * r)]
    return peft, fused


def lora_backward(M, N, K, r, p):
    peft = [(E * (M * N + N * K + M * K), 2 * M * N * K),                      # dY W
            (E * (M * N + M * r + N * r), 2 * M * N * r),                      # dB = dY^T XA
            (E * (M * N + N * r + M * r), 2 * M * N * r),                      # dY B
            (E * (M * r + M * K + r * K), 2 * M * K * r),                      # dA = (dY B)^T drop(x)
            (E * (M * r + r * K + M * K), 2 * M * K * r)]                      # (dY B) A
    if p > 0:
        peft.append((E * 2 * M * K + M * K, M * K))                            # dropout backward
    peft.append((E * 3 * M * K, M * K))                                        # dX add
    fused = [(E * (M * N + N * K + M * K + N * r + r * K) + 4 * M * r,         # dX and G = dY B, one dY read
              2 * M * N * K + 2 * M * N * r * max(1, -(-K // BLOCK_N)) + 2 * M * K * r),
             (E * (M * K + r * K) + 4 * M * r, 2 * M * K * r),                 # dA (mask regenerated)
             (E * (M * N + N * r) + 2 * M * r, 2 * M * N * r)]                 # dB
    return peft, fused


def ia3_forward(M, N, K, feedforward):
    gemm = (E * (M * K + N * K + M * N), 2 * M * N * K)
    peft = [(E * 2 * M * K, M * K), gemm] if feedforward else [gemm, (E * 2 * M * N, M * N)]
    fused = [(gemm[0] + E * (K if feedforward else N), gemm[1] + M * (K if feedforward else N))]
    return peft, fused


def rows(shapes=((4096, 4096), (11008, 4096), (4096, 11008)), tokens=(1, 512, 4096), r=16):
    """One dict per (kernel, M, N, K): bytes, FLOPs and roofline microseconds for PEFT and fused."""
    out = []
    for N, K in shapes:
        for M in tokens:
            cases = [("lora_fwd p=0", lora_forward(M, N, K, r, 0.0)), ("lora_fwd p=0.1", lora_forward(M, N, K, r, 0.1)),
                     ("lora_bwd p=0.1", lora_backward(M, N, K, r, 0.1)),
                     ("ia3_fwd ff", ia3_forward(M, N, K, True)), ("ia3_fwd out", ia3_forward(M, N, K, False))]
            for name, (peft, fused) in cases:
                pb, pf, pt = _t(peft)
                fb, ff, ft = _t(fused)
                out.append(dict(kernel=name, M=M, N=N, K=K, peft_bytes=pb, peft_flops=pf, peft_us=pt * 1e6,
                                fused_bytes=fb, fused_flops=ff, fused_us=ft * 1e6, speedup=pt / ft))
    return out


def markdown(table=None) -> str:
    table = table or rows()
    lines = ["MODEL, not a measurement: roofline at H100 SXM (3.35 TB/s HBM, 990 dense bf16 TFLOP/s), bf16, r=16, "
             "per-launch max(bytes/BW, FLOPs/peak) summed.", "",
             "| kernel | M | N x K | PEFT MB | PEFT GFLOP | PEFT us | fused MB | fused GFLOP | fused us | PEFT/fused |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for t in table:
        lines.append(f"| {t['kernel']} | {t['M']} | {t['N']}x{t['K']} | {t['peft_bytes'] / 1e6:.1f} | "
                     f"{t['peft_flops'] / 1e9:.2f} | {t['peft_us']:.1f} | {t['fused_bytes'] / 1e6:.1f} | "
                     f"{t['fused_flops'] / 1e9:.2f} | {t['fused_us']:.1f} | {t['speedup']:.2f}x |")
    return "\n".join(lines)


# ESTIMATES, not measurements: what a GPU-kernel review of the compiled PTX/SASS (Triton 3.9, sm_80/sm_90, no GPU)
# predicted for an H100, next to the route each alternative is in ``fastpeft.routing.ROUTES``. The roofline table
# above cannot show these: it assumes every kernel runs at its roofline, and the differences come from tile
# efficiency (the fused GEMM recomputes the down-projection per column tile), dequantization inside the K loop and
# GEMV design. On a GPU the routes are timed and the faster one runs; ``make gpu-check`` measures them.
REVIEW_ESTIMATES = [
    dict(case="LoRA forward, M=N=K=4096, r=16, bf16", first="fused_gemm (one fused Triton GEMM)", first_us=270,
         second="passes (cuBLAS, x A^T kernel, in-place low-rank epilogue)", second_us=231),
    dict(case="QLoRA NF4 forward, M=4096, 4096x4096, bf16", first="fused_gemm (dequantization in the K loop)",
         first_us=960, second="compose (dequantize once into a reused buffer, then cuBLAS)", second_us=210),
    dict(case="QLoRA NF4 forward, M=1, 4096x4096, bf16", first="the tiled 4-bit Triton kernel", first_us="31-62",
         second="a 4-bit GEMV design (16-byte loads, LOP3 nibble unpack, code table in registers, split-K; not built)",
         second_us="4-5"),
    dict(case="LoRA dropout backward dX, M=N=K=4096, bf16", first="fused_gemm (dX GEMM held to 64x64 tiles)",
         first_us="350-450", second="split_gemm (big-tile dX GEMM, then the masked low-rank update)",
         second_us=256),
]


def estimates_markdown() -> str:
    lines = ["ESTIMATES from a review of the compiled kernels (H100, not measured): the route each alternative is.",
             "", "| case | route | estimated us | alternative route | estimated us |",
             "| --- | --- | --- | --- | --- |"]
    for e in REVIEW_ESTIMATES:
        lines.append(f"| {e['case']} | {e['first']} | {e['first_us']} | {e['second']} | {e['second_us']} |")
    return "\n".join(lines)


def main():
    print(markdown())
    print()
    print(estimates_markdown())


if __name__ == "__main__":
    main()
