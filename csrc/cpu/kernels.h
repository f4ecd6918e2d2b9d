// fastpeft CPU kernels: the torch-free interface between the SIMD translation units and the torch bindings.
//
// Every kernel works on a range of rows [m0, m1) so that the caller (ops.cpp) owns threading through
// at::parallel_for; kernels never allocate. Activations (x, y, dy, dx) are raw row-major rows with a leading
// dimension and a dtype code; adapter matrices are always passed as contiguous fp32 (they are tiny: r x K).
// All arithmetic is fp32.
#pragma once
#include <cstdint>

namespace fastpeft {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct KernelTable {
  const char* isa;  // "avx512", "avx2" or "generic"

  // out[i] = (uniform(seed, offset0 + i) >= p) ? scale : 0, for i < n. The canonical fastpeft mask
  // (fastpeft._philox), bit-exact with Triton's tl.rand.
  void (*dropout_scale)(uint32_t seed, int64_t offset0, int64_t n, float p, float scale, float* out);

  // xa[m, j] = sum_k drop(x)[m, k] * A[j, k] for m in [m0, m1); A: (r, K) fp32; xa: (M, r) fp32 with row stride ldxa.
  // drop(x)[m, k] = x[m, k] * keep(m*K + k) / (1 - p) (identity when p == 0). buf: 4K floats of scratch.
  void (*xa_rows)(int dt, const void* x, int64_t ldx, int64_t K, int64_t m0, int64_t m1, const float* A, int64_t r,
                  float p, uint32_t seed, float* xa, int64_t ldxa, float* buf);

  // y[m, :] = y[m, :] + bias + sum_j xs[m, j] * Bt[j, :], in place, rounded once to y's dtype.
  // xs: (M, R) fp32 (already multiplied by the scalings); Bt: (R, N) fp32; bias: (N,) fp32 or null.
  // buf: 4N floats of scratch.
  void (*epilogue_rows)(int dt, void* y, int64_t ldy, int64_t N, int64_t m0, int64_t m1, const float* xs, int64_t R,
                        const float* Bt, const float* bias, float* buf);

  // One pass over dy rows: g[m, j] = svec[j] * sum_n dy[m, n] Bt[j, n]; dBt_acc[j, :] += xa[m, j] * dy[m, :]
  // (unscaled, if dBt_acc); colsum[:] += dy[m, :] (if colsum). buf: 4N floats of scratch.
  void (*dy_rows)(int dt, const void* dy, int64_t lddy, int64_t N, int64_t m0, int64_t m1, const float* Bt,
                  const float* xa, int64_t R, const float* svec, float* g, float* dBt_acc, float* colsum, float* buf);

  // One pass over x / dx rows for one adapter (A: (r, K) fp32, g: (M, r) fp32 with row stride ldg):
  //   dx[m, :] += mask_m * (g[m, :] A)              (if dx; in place, rounded once to dx's dtype)
  //   dA_acc   += g[m, :]^T (x[m, :] * mask_m)      (if x and dA_acc)
  // where mask_m = keep / (1 - p) regenerated from the seed (1 when p == 0). buf: 12K floats of scratch.
  void (*dx_rows)(int dt_x, const void* x, int64_t ldx, int dt_dx, void* dx, int64_t lddx, int64_t K, int64_t m0,
                  int64_t m1, const float* A, int64_t r, const float* g, int64_t ldg, float p, uint32_t seed,
                  float* dA_acc, float* buf);
};

const KernelTable& kernels_generic();
const KernelTable& kernels_avx2();
const KernelTable& kernels_avx512();

}  // namespace fastpeft
