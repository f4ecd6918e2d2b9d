// Host entry points of the CUDA LoRA/IA3 kernels (csrc/cuda/lora_kernels.cu). Raw pointers and strides only, no
// torch types, so the kernels compile standalone with nvcc (the compile tests do exactly that) and bindings.cpp
// adapts torch tensors to these calls.
//
// Dtype rules: the tensor-core kernels take x, A, B, xa, g in one 16-bit dtype T (fp16 or bf16) and accumulate in
// fp32; the in-place outputs (y, dx) may be T or fp32. The backend routes fp32 adapters to cuBLAS instead.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace fastpeft {
namespace cuda {

enum class DType : int { F16 = 0, BF16 = 1, F32 = 2 };

// Output tile of every tensor-core kernel (a block of 4 warps computes BM x BN; the reduction advances BK at a time).
constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 32;

// How many slices the reduction of lora_down_dropout (over K) or lora_grad_A (over M) is split into, so that small
// output tiles still fill the GPU; the caller allocates an fp32 workspace of splits * out_rows * out_cols.
int reduction_splits(int64_t out_rows, int64_t out_cols, int64_t reduce_len);

// xa[m, j] = sum_k drop(x)[m, k] * A[j, k]; x (M, K) strided, A (r, K) row-major, xa (M, r) contiguous, dtype t.
void lora_down_dropout(DType t, const void* x, int64_t stride_xm, int64_t stride_xk, const void* A, void* xa,
                       float* workspace, int splits, int64_t M, int64_t K, int64_t r, double p, uint64_t seed,
                       cudaStream_t stream);

// y[m, n] += s * ((xa B^T)[m, n] + b[n]) in place; xa (M, r), B (N, r) row-major in dtype t; y (M, N) rows of
// stride stride_ym in dtype ty (t or F32); bias (N,) in dtype t or null.
void lora_up_epilogue(DType t, DType ty, void* y, int64_t stride_ym, const void* xa, const void* B, const void* bias,
                      int64_t M, int64_t N, int64_t r, float scale, cudaStream_t stream);

// dx[m, k] += (g A)[m, k] * keep[m, k] / (1 - p) in place; g (M, r), A (r, K) row-major in dtype t; dx (M, K) rows
// of stride stride_dxm in dtype tdx (t or F32).
void lora_backward_dx_mask(DType t, DType tdx, void* dx, int64_t stride_dxm, const void* g, const void* A, int64_t M,
                           int64_t K, int64_t r, double p, uint64_t seed, cudaStream_t stream);

// dA[j, k] = sum_m g[m, j] * drop(x)[m, k]; g (M, r) row-major, x (M, K) strided, dA (r, K) contiguous, dtype t.
void lora_grad_A(DType t, void* dA, const void* g, const void* x, int64_t stride_xm, int64_t stride_xk,
                 float* workspace, int splits, int64_t M, int64_t K, int64_t r, double p, uint64_t seed,
                 cudaStream_t stream);

// IA3: out[m, c] = in[m, c] * scale[c] (rounded to tx); out may alias in. in/out (M, C) with unit column stride.
void ia3_scale_cols(DType tx, DType ts, void* out, int64_t stride_om, const void* in, int64_t stride_im,
                    const void* scale, int64_t M, int64_t C, cudaStream_t stream);

// IA3 gradient: out[c] = sum_m a[m, c] * b[m, c] in fp32, stored in dtype to; a, b (M, C) in dtype tab.
void ia3_col_dot(DType tab, DType to, void* out, const void* a, int64_t stride_am, const void* b, int64_t stride_bm,
                 int64_t M, int64_t C, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastpeft
