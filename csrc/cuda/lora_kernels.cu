// CUDA kernels for the LoRA parts of a layer whose base GEMM is left to cuBLAS (the cuda backend's side of the
// dispatch rule: small-M and other shapes where one big fused GEMM does not pay). Tensor cores through WMMA
// (16x16x16, fp16/bf16 in, fp32 accumulate); the dropout mask is drawn in registers from Philox (philox.cuh) and
// neither it nor drop(x) is ever written to memory.
//
// One tiling for all four tensor-core kernels: a block of 4 warps owns a 64x64 output tile, each warp a 32x32
// quarter (2x2 fragments); operand tiles are staged through shared memory (padded rows, see kPad) 32 reduction
// elements at a time, and the fp32 accumulators go back through shared memory for a bounds-checked, fused epilogue.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <type_traits>

#include "lora_kernels.cuh"
#include "lora_math.cuh"

namespace fastpeft {
namespace cuda {
namespace {

using namespace nvcuda;

constexpr int kThreads = 128;
// 8 extra 16-bit elements per shared row: shifts consecutive rows by 4 banks (fewer conflicts in the fragment
// loads) while keeping every fragment pointer 32-byte aligned as WMMA requires.
constexpr int kPad = 8;
constexpr int kLdC = kTileN + 4;  // fp32 staging of the accumulators; ldm must be a multiple of 4 floats
constexpr int kOperandElems = std::max(kTileM * (kTileK + kPad), kTileK * (kTileN + kPad));
constexpr int kOperandBytes = 2 * kOperandElems * 2;
constexpr int kSmemBytes = std::max(kOperandBytes, (int)(kTileM * kLdC * sizeof(float)));

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// Copies an R x C tile into shared memory (row stride C + kPad); load(rr, cc) returns the (bounds-checked) value.
// Consecutive threads take consecutive columns, so global reads coalesce along the tile's contiguous dimension.
template <int R, int C, typename T, typename Load>
__device__ __forceinline__ void stage(T* s, Load load) {
#pragma unroll 2  // 4 made ptxas spill 8-16 bytes in some instantiations (sm_80 and sm_90a)
  for (int idx = threadIdx.x; idx < R * C; idx += kThreads) {
    const int rr = idx / C, cc = idx % C;
    s[rr * (C + kPad) + cc] = load(rr, cc);
  }
}

// acc[i][j] += A[warp rows i] * B[warp cols j] over one kTileK slice held in shared memory.
template <typename T, typename LayoutA, typename LayoutB>
__device__ __forceinline__ void warp_mma(const T* sa, int lda, const T* sb, int ldb, Acc (&acc)[2][2], int wm, int wn) {
  constexpr bool a_row = std::is_same<LayoutA, wmma::row_major>::value;
  constexpr bool b_row = std::is_same<LayoutB, wmma::row_major>::value;
#pragma unroll
  for (int kk = 0; kk < kTileK; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> a[2];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> b[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = wm * 32 + i * 16;
      wmma::load_matrix_sync(a[i], a_row ? sa + row * lda + kk : sa + row + kk * lda, lda);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int col = wn * 32 + j * 16;
      wmma::load_matrix_sync(b[j], b_row ? sb + kk * ldb + col : sb + kk + col * ldb, ldb);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
  }
}

__device__ __forceinline__ void zero(Acc (&acc)[2][2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
}

// Writes the block's accumulators to shared memory, then calls store(rr, cc, value) for every tile element.
template <typename Store>
__device__ __forceinline__ void epilogue(float* sc, Acc (&acc)[2][2], int wm, int wn, Store store) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(sc + (wm * 32 + i * 16) * kLdC + wn * 32 + j * 16, acc[i][j], kLdC, wmma::mem_row_major);
  __syncthreads();
  for (int idx = threadIdx.x; idx < kTileM * kTileN; idx += kThreads) {
    const int rr = idx / kTileN, cc = idx % kTileN;
    store(rr, cc, sc[rr * kLdC + cc]);
  }
}

// xa_partial[z, m, j] = sum_{k in slice z} drop(x)[m, k] * A[j, k]
template <typename T>
__global__ void __launch_bounds__(kThreads) lora_down_dropout_kernel(
    const T* __restrict__ x, int64_t stride_xm, int64_t stride_xk, const T* __restrict__ A, float* __restrict__ ws,
    int64_t M, int64_t K, int64_t r, int64_t k_per_split, float p, float one_minus_p, uint64_t seed) {
  __shared__ __align__(128) unsigned char smem[kSmemBytes];
  T* sa = reinterpret_cast<T*>(smem);
  T* sb = sa + kOperandElems;
  const int64_t m0 = (int64_t)blockIdx.x * kTileM, j0 = (int64_t)blockIdx.y * kTileN;
  const int64_t k_begin = (int64_t)blockIdx.z * k_per_split, k_end = min(K, k_begin + k_per_split);
  const int wm = (threadIdx.x / 32) / 2, wn = (threadIdx.x / 32) % 2;
  Acc acc[2][2];
  zero(acc);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTileK) {
    stage<kTileM, kTileK>(sa, [&](int rr, int cc) {
      const int64_t m = m0 + rr, k = k0 + cc;
      if (m >= M || k >= k_end) return from_f<T>(0.0f);
      return from_f<T>(dropped_value(to_f(x[m * stride_xm + k * stride_xk]), seed, m, k, K, p, one_minus_p));
    });
    stage<kTileN, kTileK>(sb, [&](int rr, int cc) {
      const int64_t j = j0 + rr, k = k0 + cc;
      return (j < r && k < k_end) ? A[j * K + k] : from_f<T>(0.0f);
    });
    __syncthreads();
    warp_mma<T, wmma::row_major, wmma::col_major>(sa, kTileK + kPad, sb, kTileK + kPad, acc, wm, wn);
    __syncthreads();
  }
  float* out = ws + (int64_t)blockIdx.z * M * r;
  epilogue(reinterpret_cast<float*>(smem), acc, wm, wn, [&](int rr, int cc, float v) {
    const int64_t m = m0 + rr, j = j0 + cc;
    if (m < M && j < r) out[m * r + j] = v;
  });
}

// y[m, n] = y[m, n] + s * ((xa B^T)[m, n] + b[n])
template <typename T, typename TY>
__global__ void __launch_bounds__(kThreads) lora_up_epilogue_kernel(
    TY* __restrict__ y, int64_t stride_ym, const T* __restrict__ xa, const T* __restrict__ B,
    const T* __restrict__ bias, int64_t M, int64_t N, int64_t r, float scale) {
  __shared__ __align__(128) unsigned char smem[kSmemBytes];
  T* sa = reinterpret_cast<T*>(smem);
  T* sb = sa + kOperandElems;
  const int64_t m0 = (int64_t)blockIdx.x * kTileM, n0 = (int64_t)blockIdx.y * kTileN;
  const int wm = (threadIdx.x / 32) / 2, wn = (threadIdx.x / 32) % 2;
  Acc acc[2][2];
  zero(acc);
  for (int64_t j0 = 0; j0 < r; j0 += kTileK) {
    stage<kTileM, kTileK>(sa, [&](int rr, int cc) {
      const int64_t m = m0 + rr, j = j0 + cc;
      return (m < M && j < r) ? xa[m * r + j] : from_f<T>(0.0f);
    });
    stage<kTileN, kTileK>(sb, [&](int rr, int cc) {
      const int64_t n = n0 + rr, j = j0 + cc;
      return (n < N && j < r) ? B[n * r + j] : from_f<T>(0.0f);
    });
    __syncthreads();
    warp_mma<T, wmma::row_major, wmma::col_major>(sa, kTileK + kPad, sb, kTileK + kPad, acc, wm, wn);
    __syncthreads();
  }
  epilogue(reinterpret_cast<float*>(smem), acc, wm, wn, [&](int rr, int cc, float v) {
    const int64_t m = m0 + rr, n = n0 + cc;
    if (m < M && n < N) {
      TY* out = y + m * stride_ym + n;
      *out = from_f<TY>(lora_up_value(to_f(*out), v, scale, bias ? to_f(bias[n]) : 0.0f));
    }
  });
}

// dx[m, k] = dx[m, k] + (g A)[m, k] * keep[m, k] / (1 - p)
template <typename T, typename TD>
__global__ void __launch_bounds__(kThreads) lora_backward_dx_mask_kernel(
    TD* __restrict__ dx, int64_t stride_dxm, const T* __restrict__ g, const T* __restrict__ A, int64_t M, int64_t K,
    int64_t r, float p, float one_minus_p, uint64_t seed) {
  __shared__ __align__(128) unsigned char smem[kSmemBytes];
  T* sa = reinterpret_cast<T*>(smem);
  T* sb = sa + kOperandElems;
  const int64_t m0 = (int64_t)blockIdx.x * kTileM, k0 = (int64_t)blockIdx.y * kTileN;
  const int wm = (threadIdx.x / 32) / 2, wn = (threadIdx.x / 32) % 2;
  Acc acc[2][2];
  zero(acc);
  for (int64_t j0 = 0; j0 < r; j0 += kTileK) {
    stage<kTileM, kTileK>(sa, [&](int rr, int cc) {
      const int64_t m = m0 + rr, j = j0 + cc;
      return (m < M && j < r) ? g[m * r + j] : from_f<T>(0.0f);
    });
    stage<kTileK, kTileN>(sb, [&](int rr, int cc) {
      const int64_t j = j0 + rr, k = k0 + cc;
      return (j < r && k < K) ? A[j * K + k] : from_f<T>(0.0f);
    });
    __syncthreads();
    warp_mma<T, wmma::row_major, wmma::row_major>(sa, kTileK + kPad, sb, kTileN + kPad, acc, wm, wn);
    __syncthreads();
  }
  epilogue(reinterpret_cast<float*>(smem), acc, wm, wn, [&](int rr, int cc, float v) {
    const int64_t m = m0 + rr, k = k0 + cc;
    if (m < M && k < K) {
      TD* out = dx + m * stride_dxm + k;
      *out = from_f<TD>(dx_mask_value(to_f(*out), v, seed, m, k, K, p, one_minus_p));
    }
  });
}

// dA_partial[z, j, k] = sum_{m in slice z} g[m, j] * drop(x)[m, k]
template <typename T>
__global__ void __launch_bounds__(kThreads) lora_grad_A_kernel(
    float* __restrict__ ws, const T* __restrict__ g, const T* __restrict__ x, int64_t stride_xm, int64_t stride_xk,
    int64_t M, int64_t K, int64_t r, int64_t m_per_split, float p, float one_minus_p, uint64_t seed) {
  __shared__ __align__(128) unsigned char smem[kSmemBytes];
  T* sa = reinterpret_cast<T*>(smem);
  T* sb = sa + kOperandElems;
  const int64_t k0 = (int64_t)blockIdx.x * kTileN, j0 = (int64_t)blockIdx.y * kTileM;
  const int64_t m_begin = (int64_t)blockIdx.z * m_per_split, m_end = min(M, m_begin + m_per_split);
  const int wm = (threadIdx.x / 32) / 2, wn = (threadIdx.x / 32) % 2;
  Acc acc[2][2];
  zero(acc);
  for (int64_t mm = m_begin; mm < m_end; mm += kTileK) {
    // g's tile stays [m][j] in shared memory, which read column-major is the g^T operand.
    stage<kTileK, kTileM>(sa, [&](int rr, int cc) {
      const int64_t m = mm + rr, j = j0 + cc;
      return (m < m_end && j < r) ? g[m * r + j] : from_f<T>(0.0f);
    });
    stage<kTileK, kTileN>(sb, [&](int rr, int cc) {
      const int64_t m = mm + rr, k = k0 + cc;
      if (m >= m_end || k >= K) return from_f<T>(0.0f);
      return from_f<T>(dropped_value(to_f(x[m * stride_xm + k * stride_xk]), seed, m, k, K, p, one_minus_p));
    });
    __syncthreads();
    warp_mma<T, wmma::col_major, wmma::row_major>(sa, kTileM + kPad, sb, kTileN + kPad, acc, wm, wn);
    __syncthreads();
  }
  float* out = ws + (int64_t)blockIdx.z * r * K;
  epilogue(reinterpret_cast<float*>(smem), acc, wm, wn, [&](int rr, int cc, float v) {
    const int64_t j = j0 + rr, k = k0 + cc;
    if (j < r && k < K) out[j * K + k] = v;
  });
}

// out[i] = sum_z ws[z, i]: the deterministic (fixed-order) reduction of split partials, cast once.
template <typename T>
__global__ void __launch_bounds__(256) sum_splits_kernel(T* __restrict__ out, const float* __restrict__ ws, int64_t n,
                                                         int splits) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    float sum = 0.0f;
    for (int z = 0; z < splits; ++z) sum += ws[z * n + i];
    out[i] = from_f<T>(sum);
  }
}

// IA3 column scaling: out[m, c] = in[m, c] * scale[c]
template <typename TX, typename TS>
__global__ void __launch_bounds__(256) ia3_scale_cols_kernel(TX* out, int64_t stride_om, const TX* in,
                                                             int64_t stride_im, const TS* __restrict__ scale,
                                                             int64_t M, int64_t C) {
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y)
    for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < C; c += (int64_t)gridDim.x * blockDim.x)
      out[m * stride_om + c] = from_f<TX>(to_f(in[m * stride_im + c]) * to_f(scale[c]));
}

// IA3 vector gradient: out[c] = sum_m a[m, c] * b[m, c], 32 columns x 8 row groups per block, fixed-order sums.
template <typename TAB, typename TO>
__global__ void __launch_bounds__(256) ia3_col_dot_kernel(TO* __restrict__ out, const TAB* __restrict__ a,
                                                          int64_t stride_am, const TAB* __restrict__ b,
                                                          int64_t stride_bm, int64_t M, int64_t C) {
  __shared__ float partial[8][33];
  const int64_t c = (int64_t)blockIdx.x * 32 + threadIdx.x;
  float sum = 0.0f;
  if (c < C)
    for (int64_t m = threadIdx.y; m < M; m += 8) sum += to_f(a[m * stride_am + c]) * to_f(b[m * stride_bm + c]);
  partial[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float total = 0.0f;
#pragma unroll
    for (int y = 0; y < 8; ++y) total += partial[y][threadIdx.x];
    out[c] = from_f<TO>(total);
  }
}

template <typename T> struct Tag { using type = T; };

// Calls f(Tag<T>) for the 16-bit dtype t (the tensor-core kernels' operand types).
template <typename F> void dispatch_16bit(DType t, F f) {
  if (t == DType::F16) f(Tag<__half>{});
  else if (t == DType::BF16) f(Tag<__nv_bfloat16>{});
}

template <typename F> void dispatch_any(DType t, F f) {
  if (t == DType::F16) f(Tag<__half>{});
  else if (t == DType::BF16) f(Tag<__nv_bfloat16>{});
  else f(Tag<float>{});
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Splits a reduction of `chunks` kTileK steps into at most `splits` equal runs; returns the run length in elements.
int64_t split_length(int64_t reduce_len, int splits, int* used) {
  const int64_t chunks = cdiv(reduce_len, kTileK);
  const int64_t per = std::max<int64_t>(1, cdiv(chunks, std::max(splits, 1)));
  *used = (int)cdiv(chunks, per);
  return per * kTileK;
}

void sum_splits(DType t, void* out, const float* ws, int64_t n, int splits, cudaStream_t stream) {
  const int blocks = (int)std::min<int64_t>(std::max<int64_t>(cdiv(n, 256), 1), 4096);
  dispatch_any(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    sum_splits_kernel<T><<<blocks, 256, 0, stream>>>(static_cast<T*>(out), ws, n, splits);
  });
}

}  // namespace

int reduction_splits(int64_t out_rows, int64_t out_cols, int64_t reduce_len) {
  int device = 0, sms = 108;
  if (cudaGetDevice(&device) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t tiles = cdiv(out_rows, kTileM) * cdiv(out_cols, kTileN);
  // Aim at two blocks per SM, but keep at least 4 reduction steps per split so the partials stay cheap to sum.
  const int64_t want = cdiv(2 * (int64_t)sms, std::max<int64_t>(tiles, 1));
  const int64_t most = std::max<int64_t>(1, cdiv(reduce_len, 4 * kTileK));
  return (int)std::max<int64_t>(1, std::min<int64_t>({want, most, 64}));
}

void lora_down_dropout(DType t, const void* x, int64_t stride_xm, int64_t stride_xk, const void* A, void* xa,
                       float* workspace, int splits, int64_t M, int64_t K, int64_t r, double p, uint64_t seed,
                       cudaStream_t stream) {
  if (M == 0 || r == 0) return;
  int used = 0;
  const int64_t per = split_length(K, splits, &used);
  if (K > 0) {
    const dim3 grid((unsigned)cdiv(M, kTileM), (unsigned)cdiv(r, kTileN), (unsigned)used);
    dispatch_16bit(t, [&](auto tag) {
      using T = typename decltype(tag)::type;
      lora_down_dropout_kernel<T><<<grid, kThreads, 0, stream>>>(
          static_cast<const T*>(x), stride_xm, stride_xk, static_cast<const T*>(A), workspace, M, K, r, per,
          (float)p, (float)(1.0 - p), seed);
    });
  }
  sum_splits(t, xa, workspace, M * r, K > 0 ? used : 0, stream);
}

void lora_up_epilogue(DType t, DType ty, void* y, int64_t stride_ym, const void* xa, const void* B, const void* bias,
                      int64_t M, int64_t N, int64_t r, float scale, cudaStream_t stream) {
  if (M == 0 || N == 0) return;
  const dim3 grid((unsigned)cdiv(M, kTileM), (unsigned)cdiv(N, kTileN));
  dispatch_16bit(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto launch = [&](auto out_tag) {
      using TY = typename decltype(out_tag)::type;
      lora_up_epilogue_kernel<T, TY><<<grid, kThreads, 0, stream>>>(
          static_cast<TY*>(y), stride_ym, static_cast<const T*>(xa), static_cast<const T*>(B),
          static_cast<const T*>(bias), M, N, r, scale);
    };
    if (ty == DType::F32) launch(Tag<float>{});
    else launch(Tag<T>{});
  });
}

void lora_backward_dx_mask(DType t, DType tdx, void* dx, int64_t stride_dxm, const void* g, const void* A, int64_t M,
                           int64_t K, int64_t r, double p, uint64_t seed, cudaStream_t stream) {
  if (M == 0 || K == 0 || r == 0) return;
  const dim3 grid((unsigned)cdiv(M, kTileM), (unsigned)cdiv(K, kTileN));
  dispatch_16bit(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto launch = [&](auto out_tag) {
      using TD = typename decltype(out_tag)::type;
      lora_backward_dx_mask_kernel<T, TD><<<grid, kThreads, 0, stream>>>(
          static_cast<TD*>(dx), stride_dxm, static_cast<const T*>(g), static_cast<const T*>(A), M, K, r, (float)p,
          (float)(1.0 - p), seed);
    };
    if (tdx == DType::F32) launch(Tag<float>{});
    else launch(Tag<T>{});
  });
}

void lora_grad_A(DType t, void* dA, const void* g, const void* x, int64_t stride_xm, int64_t stride_xk,
                 float* workspace, int splits, int64_t M, int64_t K, int64_t r, double p, uint64_t seed,
                 cudaStream_t stream) {
  if (K == 0 || r == 0) return;
  int used = 0;
  const int64_t per = split_length(M, splits, &used);
  if (M > 0) {
    const dim3 grid((unsigned)cdiv(K, kTileN), (unsigned)cdiv(r, kTileM), (unsigned)used);
    dispatch_16bit(t, [&](auto tag) {
      using T = typename decltype(tag)::type;
      lora_grad_A_kernel<T><<<grid, kThreads, 0, stream>>>(workspace, static_cast<const T*>(g),
                                                           static_cast<const T*>(x), stride_xm, stride_xk, M, K, r,
                                                           per, (float)p, (float)(1.0 - p), seed);
    });
  }
  sum_splits(t, dA, workspace, r * K, M > 0 ? used : 0, stream);
}

void ia3_scale_cols(DType tx, DType ts, void* out, int64_t stride_om, const void* in, int64_t stride_im,
                    const void* scale, int64_t M, int64_t C, cudaStream_t stream) {
  if (M == 0 || C == 0) return;
  const dim3 grid((unsigned)std::min<int64_t>(cdiv(C, 256), 64), (unsigned)std::min<int64_t>(M, 65535));
  dispatch_any(tx, [&](auto x_tag) {
    using TX = typename decltype(x_tag)::type;
    dispatch_any(ts, [&](auto s_tag) {
      using TS = typename decltype(s_tag)::type;
      ia3_scale_cols_kernel<TX, TS><<<grid, 256, 0, stream>>>(static_cast<TX*>(out), stride_om,
                                                              static_cast<const TX*>(in), stride_im,
                                                              static_cast<const TS*>(scale), M, C);
    });
  });
}

void ia3_col_dot(DType tab, DType to, void* out, const void* a, int64_t stride_am, const void* b, int64_t stride_bm,
                 int64_t M, int64_t C, cudaStream_t stream) {
  if (C == 0) return;
  const dim3 block(32, 8), grid((unsigned)cdiv(C, 32));
  dispatch_any(tab, [&](auto ab_tag) {
    using TAB = typename decltype(ab_tag)::type;
    dispatch_any(to, [&](auto o_tag) {
      using TO = typename decltype(o_tag)::type;
      ia3_col_dot_kernel<TAB, TO><<<grid, block, 0, stream>>>(static_cast<TO*>(out), static_cast<const TAB*>(a),
                                                              stride_am, static_cast<const TAB*>(b), stride_bm, M, C);
    });
  });
}

}  // namespace cuda
}  // namespace fastpeft
