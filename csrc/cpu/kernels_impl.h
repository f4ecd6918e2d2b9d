// The body of the CPU kernels, written once with GCC vector extensions and compiled three times: by
// kernels_avx512.cpp, kernels_avx2.cpp and kernels_generic.cpp, each under its own `#pragma GCC target` and with its
// own FASTPEFT_NS / FASTPEFT_VW (vector width in floats). Include only after kernels.h and the standard headers, so
// no inline function shared with other translation units is compiled for a wider ISA than its callers (ODR hazard).
//
// Vector-extension code lets one source serve every ISA: GCC lowers a 16-float vector to one zmm register under
// AVX-512, two ymm under AVX2 and four xmm under SSE2.
#ifndef FASTPEFT_NS
#error "define FASTPEFT_NS and FASTPEFT_VW before including kernels_impl.h"
#endif

namespace fastpeft {
namespace FASTPEFT_NS {
namespace {

constexpr int VW = FASTPEFT_VW;
typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));
typedef uint64_t vu64 __attribute__((vector_size(VW * 8)));
typedef uint16_t vu16 __attribute__((vector_size(VW * 2)));
typedef _Float16 vh __attribute__((vector_size(VW * 2)));

inline vf splat(float a) { return vf{} + a; }

inline vf load_f32(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
inline void store_f32(float* p, vf v) { __builtin_memcpy(p, &v, sizeof(v)); }

// Load VW activations of dtype dt as fp32 (bf16 is the top half of an fp32; fp16 converts exactly).
inline vf load_act(int dt, const void* base, int64_t i) {
  if (dt == kF32) return load_f32(static_cast<const float*>(base) + i);
  if (dt == kBF16) {
    vu16 h;
    __builtin_memcpy(&h, static_cast<const uint16_t*>(base) + i, sizeof(h));
    return (vf)(__builtin_convertvector(h, vu) << 16);
  }
  vh h;
  __builtin_memcpy(&h, static_cast<const _Float16*>(base) + i, sizeof(h));
  return __builtin_convertvector(h, vf);
}

// Store fp32 as dtype dt with round-to-nearest-even (what torch's .to() does); NaN stays NaN.
inline void store_act(int dt, void* base, int64_t i, vf v) {
  if (dt == kF32) return store_f32(static_cast<float*>(base) + i, v);
  if (dt == kBF16) {
    vu b = (vu)v;
    vu r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    r = (v != v) ? ((b >> 16) | 0x40u) : r;  // quiet NaN
    vu16 h = __builtin_convertvector(r, vu16);
    __builtin_memcpy(static_cast<uint16_t*>(base) + i, &h, sizeof(h));
    return;
  }
  vh h = __builtin_convertvector(v, vh);
  __builtin_memcpy(static_cast<_Float16*>(base) + i, &h, sizeof(h));
}

// Scalar twins for the tails.
inline float load_act1(int dt, const void* base, int64_t i) {
  if (dt == kF32) return static_cast<const float*>(base)[i];
  if (dt == kBF16) {
    uint32_t w = uint32_t(static_cast<const uint16_t*>(base)[i]) << 16;
    float f;
    __builtin_memcpy(&f, &w, 4);
    return f;
  }
  return float(static_cast<const _Float16*>(base)[i]);
}
inline void store_act1(int dt, void* base, int64_t i, float v) {
  if (dt == kF32) {
    static_cast<float*>(base)[i] = v;
  } else if (dt == kBF16) {
    uint32_t b;
    __builtin_memcpy(&b, &v, 4);
    uint32_t r = (v != v) ? ((b >> 16) | 0x40u) : ((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
    static_cast<uint16_t*>(base)[i] = uint16_t(r);
  } else {
    static_cast<_Float16*>(base)[i] = _Float16(v);
  }
}

inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < VW; ++i) s += v[i];
  return s;
}

// ------------------------------------------------------------------------------------------- Philox-4x32-10
constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u, kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
constexpr float kUniformScale = 4.6566127342e-10f;

// hi and lo 32 bits of k * c per lane. Explicit intrinsics where available: GCC lowers the generic 64-bit vector
// multiply to a slow emulation (measured ~100 ns per element on AVX2), while vpmuludq on even/odd lanes is 2 uops.
inline void mulhilo(uint32_t k, vu c, vu& hi, vu& lo) {
#if FASTPEFT_VW == 16  // only the AVX-512 unit uses 16 lanes (GCC does not define __AVX512F__ under a target pragma)
  const __m512i kv = _mm512_set1_epi32(int(k));
  const __m512i a = (__m512i)c;
  const __m512i pe = _mm512_mul_epu32(a, kv), po = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), kv);
  hi = (vu)_mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
  lo = (vu)_mm512_mask_blend_epi32(0xAAAA, pe, _mm512_slli_epi64(po, 32));
#elif FASTPEFT_VW == 8  // the AVX2 unit
  const __m256i kv = _mm256_set1_epi32(int(k));
  const __m256i a = (__m256i)c;
  const __m256i pe = _mm256_mul_epu32(a, kv), po = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), kv);
  hi = (vu)_mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
  lo = (vu)_mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
#elif FASTPEFT_VW == 4
  const __m128i kv = _mm_set1_epi32(int(k));
  const __m128i a = (__m128i)c;
  const __m128i pe = _mm_mul_epu32(a, kv), po = _mm_mul_epu32(_mm_srli_epi64(a, 32), kv);
  // SSE2 has no 32-bit blend: interleave the even and odd products back into lane order.
  const __m128i h = _mm_unpacklo_epi32(_mm_shuffle_epi32(pe, 0xDD), _mm_shuffle_epi32(po, 0xDD));
  const __m128i l = _mm_unpacklo_epi32(_mm_shuffle_epi32(pe, 0x88), _mm_shuffle_epi32(po, 0x88));
  hi = (vu)h;
  lo = (vu)l;
#else
  vu64 p = __builtin_convertvector(c, vu64) * uint64_t(k);
  hi = __builtin_convertvector(p >> 32, vu);
  lo = __builtin_convertvector(p, vu);
#endif
}

// First output word for counters (c0, c1, 0, 0) and key (seed, 0): exactly fastpeft._philox.philox_uint32.
inline vu philox_v(vu c0, vu c1, uint32_t k0, uint32_t k1) {
  vu c2 = vu{}, c3 = vu{};
  for (int round = 0; round < 10; ++round) {
    vu hb, lb, ha, la;
    mulhilo(kRoundB, c2, hb, lb);
    mulhilo(kRoundA, c0, ha, la);
    c0 = hb ^ c1 ^ k0;
    c1 = lb;
    c2 = ha ^ c3 ^ k1;
    c3 = la;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return c0;
}

inline uint32_t philox_1(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  uint32_t c2 = 0, c3 = 0;
  for (int round = 0; round < 10; ++round) {
    uint64_t pb = uint64_t(c2) * kRoundB, pa = uint64_t(c0) * kRoundA;
    uint32_t n0 = uint32_t(pb >> 32) ^ c1 ^ k0, n2 = uint32_t(pa >> 32) ^ c3 ^ k1;
    c1 = uint32_t(pb);
    c3 = uint32_t(pa);
    c0 = n0;
    c2 = n2;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return c0;
}

// u = fold31(int32(word)) * 2^-31 in fp32, as tl.rand.
inline vf uniform_v(vu word) {
  vi w = (vi)word;
  w = w ^ (w >> 31);
  return __builtin_convertvector(w, vf) * kUniformScale;
}
inline float uniform_1(uint32_t word) {
  int32_t w = int32_t(word);
  if (w < 0) w = ~w;
  return float(w) * kUniformScale;
}

// out[i] = keep(offset0 + i) ? scale : 0 for i < n.
void dropout_scale(uint32_t seed, int64_t offset0, int64_t n, float p, float scale, float* out) {
  vu iota;
  for (int i = 0; i < VW; ++i) iota[i] = uint32_t(i);
  const vf pv = splat(p), sv = splat(scale), zero = vf{};
  int64_t i = 0;
  for (; i + VW <= n; i += VW) {
    uint64_t off = uint64_t(offset0 + i);
    uint32_t lo = uint32_t(off), hi = uint32_t(off >> 32);
    vu c0 = iota + lo;
    vu c1 = (vu{} + hi) + ((c0 < lo) ? 1u : 0u);  // carry into the high word when the low word wraps
    vf u = uniform_v(philox_v(c0, c1, seed, 0u));
    store_f32(out + i, (u >= pv) ? sv : zero);
  }
  for (; i < n; ++i) {
    uint64_t off = uint64_t(offset0 + i);
    float u = uniform_1(philox_1(uint32_t(off), uint32_t(off >> 32), seed, 0u));
    out[i] = (u >= p) ? scale : 0.f;
  }
}

// buf[k] = x[k] * mask[k] (mask may be null) in fp32.
inline void load_row(int dt, const void* x, int64_t K, const float* mask, float* buf) {
  int64_t k = 0;
  if (mask) {
    for (; k + VW <= K; k += VW) store_f32(buf + k, load_act(dt, x, k) * load_f32(mask + k));
    for (; k < K; ++k) buf[k] = load_act1(dt, x, k) * mask[k];
  } else {
    for (; k + VW <= K; k += VW) store_f32(buf + k, load_act(dt, x, k));
    for (; k < K; ++k) buf[k] = load_act1(dt, x, k);
  }
}

inline int64_t elem_size(int dt) { return dt == kF32 ? 4 : 2; }
inline const void* row_ptr(int dt, const void* base, int64_t ld, int64_t m) {
  return static_cast<const char*>(base) + m * ld * elem_size(dt);
}
inline void* row_ptr(int dt, void* base, int64_t ld, int64_t m) {
  return static_cast<char*>(base) + m * ld * elem_size(dt);
}

// Four dot products of one K-row against four rows of A at once: each buffer load feeds four FMAs.
inline void dot_rows(const float* xrow, const float* A, int64_t r, int64_t K, float* out) {
  int64_t j = 0;
  for (; j + 4 <= r; j += 4) {
    const float *a0 = A + j * K, *a1 = a0 + K, *a2 = a1 + K, *a3 = a2 + K;
    vf s0{}, s1{}, s2{}, s3{};
    int64_t k = 0;
    for (; k + VW <= K; k += VW) {
      vf xv = load_f32(xrow + k);
      s0 += xv * load_f32(a0 + k);
      s1 += xv * load_f32(a1 + k);
      s2 += xv * load_f32(a2 + k);
      s3 += xv * load_f32(a3 + k);
    }
    float t0 = hsum(s0), t1 = hsum(s1), t2 = hsum(s2), t3 = hsum(s3);
    for (; k < K; ++k) {
      t0 += xrow[k] * a0[k];
      t1 += xrow[k] * a1[k];
      t2 += xrow[k] * a2[k];
      t3 += xrow[k] * a3[k];
    }
    out[j] = t0;
    out[j + 1] = t1;
    out[j + 2] = t2;
    out[j + 3] = t3;
  }
  for (; j < r; ++j) {
    const float* a = A + j * K;
    vf s{};
    int64_t k = 0;
    for (; k + VW <= K; k += VW) s += load_f32(xrow + k) * load_f32(a + k);
    float t = hsum(s);
    for (; k < K; ++k) t += xrow[k] * a[k];
    out[j] = t;
  }
}

// out[:] += mask * sum_j coef[j] * rows[j, :] (rows: (r, K)), vectorized over the columns.
inline void axpy_rows(const float* coef, const float* rows, int64_t r, int64_t K, const float* mask, int dt_out,
                      void* out) {
  int64_t k = 0;
  for (; k + VW <= K; k += VW) {
    vf t{};
    for (int64_t j = 0; j < r; ++j) t += coef[j] * load_f32(rows + j * K + k);
    if (mask) t *= load_f32(mask + k);
    store_act(dt_out, out, k, load_act(dt_out, out, k) + t);
  }
  for (; k < K; ++k) {
    float t = 0.f;
    for (int64_t j = 0; j < r; ++j) t += coef[j] * rows[j * K + k];
    if (mask) t *= mask[k];
    store_act1(dt_out, out, k, load_act1(dt_out, out, k) + t);
  }
}

void xa_rows(int dt, const void* x, int64_t ldx, int64_t K, int64_t m0, int64_t m1, const float* A, int64_t r,
             float p, uint32_t seed, float* xa, int64_t ldxa, float* buf) {
  const float scale = p > 0.f ? 1.f / (1.f - p) : 1.f;
  for (int64_t m = m0; m < m1; ++m) {
    const void* xrow = row_ptr(dt, x, ldx, m);
    if (p > 0.f) {
      dropout_scale(seed, m * K, K, p, scale, buf);  // the mask row, then masked x, in the same L1 buffer
      load_row(dt, xrow, K, buf, buf);
    } else {
      load_row(dt, xrow, K, nullptr, buf);
    }
    dot_rows(buf, A, r, K, xa + m * ldxa);
  }
}

void epilogue_rows(int dt, void* y, int64_t ldy, int64_t N, int64_t m0, int64_t m1, const float* xs, int64_t R,
                   const float* Bt, const float* bias) {
  for (int64_t m = m0; m < m1; ++m) {
    void* yrow = row_ptr(dt, y, ldy, m);
    const float* c = xs + m * R;
    int64_t n = 0;
    for (; n + VW <= N; n += VW) {
      vf t = bias ? load_f32(bias + n) : vf{};
      for (int64_t j = 0; j < R; ++j) t += c[j] * load_f32(Bt + j * N + n);
      store_act(dt, yrow, n, load_act(dt, yrow, n) + t);
    }
    for (; n < N; ++n) {
      float t = bias ? bias[n] : 0.f;
      for (int64_t j = 0; j < R; ++j) t += c[j] * Bt[j * N + n];
      store_act1(dt, yrow, n, load_act1(dt, yrow, n) + t);
    }
  }
}

void dy_rows(int dt, const void* dy, int64_t lddy, int64_t N, int64_t m0, int64_t m1, const float* Bt,
             const float* xa, int64_t R, const float* svec, float* g, float* dBt_acc, float* colsum, float* buf) {
  for (int64_t m = m0; m < m1; ++m) {
    load_row(dt, row_ptr(dt, dy, lddy, m), N, nullptr, buf);
    float* gm = g + m * R;
    dot_rows(buf, Bt, R, N, gm);
    for (int64_t j = 0; j < R; ++j) gm[j] *= svec[j];
    if (dBt_acc || colsum) {
      const float* xm = xa + m * R;
      int64_t n = 0;
      for (; n + VW <= N; n += VW) {
        vf d = load_f32(buf + n);
        if (colsum) store_f32(colsum + n, load_f32(colsum + n) + d);
        if (dBt_acc)
          for (int64_t j = 0; j < R; ++j) store_f32(dBt_acc + j * N + n, load_f32(dBt_acc + j * N + n) + xm[j] * d);
      }
      for (; n < N; ++n) {
        if (colsum) colsum[n] += buf[n];
        if (dBt_acc)
          for (int64_t j = 0; j < R; ++j) dBt_acc[j * N + n] += xm[j] * buf[n];
      }
    }
  }
}

void dx_rows(int dt_x, const void* x, int64_t ldx, int dt_dx, void* dx, int64_t lddx, int64_t K, int64_t m0,
             int64_t m1, const float* A, int64_t r, const float* g, int64_t ldg, float p, uint32_t seed,
             float* dA_acc, float* buf) {
  const float scale = p > 0.f ? 1.f / (1.f - p) : 1.f;
  float* mask = buf;
  float* xrow = buf + K;
  for (int64_t m = m0; m < m1; ++m) {
    const float* gm = g + m * ldg;
    if (p > 0.f) dropout_scale(seed, m * K, K, p, scale, mask);
    if (dx) axpy_rows(gm, A, r, K, p > 0.f ? mask : nullptr, dt_dx, row_ptr(dt_dx, dx, lddx, m));
    if (x && dA_acc) {
      load_row(dt_x, row_ptr(dt_x, x, ldx, m), K, p > 0.f ? mask : nullptr, xrow);
      for (int64_t j = 0; j < r; ++j) {
        const float c = gm[j];
        float* acc = dA_acc + j * K;
        int64_t k = 0;
        for (; k + VW <= K; k += VW) store_f32(acc + k, load_f32(acc + k) + c * load_f32(xrow + k));
        for (; k < K; ++k) acc[k] += c * xrow[k];
      }
    }
  }
}

}  // namespace
}  // namespace FASTPEFT_NS
}  // namespace fastpeft
