// fastpeft's dropout RNG for CUDA C++: Philox-4x32-10, bit-exact with fastpeft/_philox.py and the Triton kernels'
// dropout_keep (16-bit half offset % 2 of word (offset / 2) % 4 of tl.randint4x(seed, offset / 8)). Header-only and
// __host__ __device__ so that the same code runs in the kernels and in a host program the tests compile with g++ to
// compare masks bit for bit with the Python spec (no GPU needed).
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define FASTPEFT_HD __host__ __device__ __forceinline__
#else
#define FASTPEFT_HD inline
#endif

namespace fastpeft {

// The Philox-4x32 round multipliers and Weyl key increments (Salmon et al., 2011), as in _philox.py.
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
// 2**-16: a 16-bit draw h as the uniform h * 2**-16 in [0, 1), exact in float32.
constexpr float kHalfScale = 1.52587890625e-05f;

FASTPEFT_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return (uint32_t)(((uint64_t)a * (uint64_t)b) >> 32);
#endif
}

// The 16-bit draw of element offset o: half o % 2 (0: the low bits) of word (o / 2) % 4 of Philox-4x32-10 on counter
// (q_lo, q_hi, 0, 0), q = o / 8, with key (seed_lo, seed_hi). Each element runs its own call here (the CPU passes
// share one call among eight elements).
FASTPEFT_HD uint32_t philox_half(uint64_t seed, uint64_t offset) {
  const uint64_t q = offset >> 3;
  uint32_t c0 = (uint32_t)q, c1 = (uint32_t)(q >> 32), c2 = 0u, c3 = 0u;
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_b = mulhi32(kPhiloxRoundB, c2), lo_b = kPhiloxRoundB * c2;
    const uint32_t hi_a = mulhi32(kPhiloxRoundA, c0), lo_a = kPhiloxRoundA * c0;
    const uint32_t n0 = hi_b ^ c1 ^ k0, n2 = hi_a ^ c3 ^ k1;
    c0 = n0;
    c1 = lo_b;
    c2 = n2;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  const uint32_t w = (uint32_t)((offset >> 1) & 3u);
  const uint32_t word = w == 0 ? c0 : (w == 1 ? c1 : (w == 2 ? c2 : c3));
  return (offset & 1u) ? (word >> 16) : (word & 0xFFFFu);
}

// The uniform h * 2**-16 of the 16-bit draw h, in float32 (exact).
FASTPEFT_HD float philox_uniform(uint64_t seed, uint64_t offset) {
  return (float)philox_half(seed, offset) * kHalfScale;
}

// keep[m, k] = uniform(seed, m * K + k) >= p, compared in float32.
FASTPEFT_HD bool dropout_keep(uint64_t seed, int64_t m, int64_t k, int64_t K, float p) {
  return philox_uniform(seed, (uint64_t)(m * K + k)) >= p;
}

}  // namespace fastpeft
