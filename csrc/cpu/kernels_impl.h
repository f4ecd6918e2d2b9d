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

// splat(*p) as one broadcasting load, where GCC lowers splat of a value it loads to a scalar load and a register
// broadcast (two instructions in the multiply-add loops that broadcast one coefficient per few FMAs).
inline vf load_splat(const float* p) {
#if FASTPEFT_VW == 16
  return (vf)_mm512_set1_ps(*p);
#elif FASTPEFT_VW == 8
  return (vf)_mm256_broadcast_ss(p);
#else
  return splat(*p);
#endif
}

inline vf load_f32(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
inline void store_f32(float* p, vf v) { __builtin_memcpy(p, &v, sizeof(v)); }

// VW fp16 values at p as fp32 (exact), and fp32 to fp16 at p with round-to-nearest-even. F16C's vector conversions
// where the ISA has them: GCC 12 lowers __builtin_convertvector between _Float16 and float vectors to one conversion
// per element, several times slower than the bf16 passes. Its per-element code uses the same F16C instruction, so
// the scalar tails (load_act1, store_act1) round exactly as these do.
inline vf widen_f16(const _Float16* p) {
#if FASTPEFT_VW == 16
  return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif FASTPEFT_VW == 8
  return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vh h;
  __builtin_memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, vf);
#endif
}
inline void narrow_f16(vf v, _Float16* p) {
#if FASTPEFT_VW == 16
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif FASTPEFT_VW == 8
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  vh h = __builtin_convertvector(v, vh);
  __builtin_memcpy(p, &h, sizeof(h));
#endif
}

// Load VW activations of dtype dt as fp32 (bf16 is the top half of an fp32; fp16 converts exactly).
inline vf load_act(int dt, const void* base, int64_t i) {
  if (dt == kF32) return load_f32(static_cast<const float*>(base) + i);
  if (dt == kBF16) {
#if FASTPEFT_VW == 16  // one widening move (GCC splits the generic conversion into two halves and an insert)
    const auto* p = reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i);
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p)), 16);
#else
    vu16 h;
    __builtin_memcpy(&h, static_cast<const uint16_t*>(base) + i, sizeof(h));
    return (vf)(__builtin_convertvector(h, vu) << 16);
#endif
  }
  return widen_f16(static_cast<const _Float16*>(base) + i);
}

// Store fp32 as dtype dt with round-to-nearest-even (what torch's .to() does); NaN stays NaN.
inline void store_act(int dt, void* base, int64_t i, vf v) {
  if (dt == kF32) return store_f32(static_cast<float*>(base) + i, v);
  if (dt == kBF16) {
    vu b = (vu)v;
    vu r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    r = (v != v) ? ((b >> 16) | 0x40u) : r;  // quiet NaN
#if FASTPEFT_VW == 16  // one narrowing move
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(base) + i),
                        _mm512_cvtepi32_epi16((__m512i)r));
    return;
#endif
    vu16 h = __builtin_convertvector(r, vu16);
    __builtin_memcpy(static_cast<uint16_t*>(base) + i, &h, sizeof(h));
    return;
  }
  narrow_f16(v, static_cast<_Float16*>(base) + i);
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

// Lane sum as a tree (log2(VW) dependent adds instead of VW: it ends every row of the decoding GEMV).
inline float hsum(vf v) {
  float t[VW];
  __builtin_memcpy(t, &v, sizeof(t));
  for (int w = VW / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}

// ------------------------------------------------------------------------------------------- Philox-4x32-10
constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u, kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;

// The four output words for counters (c0, c1, 0, 0) and key (seed, 0): fastpeft._philox.philox_words per lane.
#if FASTPEFT_VW == 16  // only the AVX-512 unit uses 16 lanes (GCC does not define __AVX512F__ under a target pragma)
// Each 32-bit state word in the low half of a 64-bit lane, 8 lanes a register, two registers for the 16 lanes:
// vpmuludq then yields a round's product whole (its low half is the new c1/c3, its high half shifted down feeds
// c0/c2), where the 32-bit layout needs two multiplies, three shifts and two blends per product. The high halves
// hold garbage that vpmuludq never reads and that is dropped when the words are packed back.
inline void philox4_v(vu c0, vu c1, uint32_t k0, uint32_t k1, vu out[4]) {
  const __m512i a0 = (__m512i)c0, a1 = (__m512i)c1;
  __m512i x0[2] = {_mm512_cvtepu32_epi64(_mm512_castsi512_si256(a0)),
                   _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(a0, 1))};
  __m512i x1[2] = {_mm512_cvtepu32_epi64(_mm512_castsi512_si256(a1)),
                   _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(a1, 1))};
  __m512i x2[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
  __m512i x3[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
  const __m512i ka = _mm512_set1_epi64(kRoundA), kb = _mm512_set1_epi64(kRoundB);
  for (int round = 0; round < 10; ++round) {
    const __m512i key0 = _mm512_set1_epi32(int(k0)), key1 = _mm512_set1_epi32(int(k1));
    for (int h = 0; h < 2; ++h) {
      const __m512i pb = _mm512_mul_epu32(x2[h], kb), pa = _mm512_mul_epu32(x0[h], ka);
      x0[h] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(pb, 32), x1[h], key0, 0x96);  // a ^ b ^ c
      x2[h] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(pa, 32), x3[h], key1, 0x96);
      x1[h] = pb;
      x3[h] = pa;
    }
    k0 += kKeyA;
    k1 += kKeyB;
  }
  // The even 32-bit lanes of both registers, in lane order.
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  out[0] = (vu)_mm512_permutex2var_epi32(x0[0], even, x0[1]);
  out[1] = (vu)_mm512_permutex2var_epi32(x1[0], even, x1[1]);
  out[2] = (vu)_mm512_permutex2var_epi32(x2[0], even, x2[1]);
  out[3] = (vu)_mm512_permutex2var_epi32(x3[0], even, x3[1]);
}
#else
// hi and lo 32 bits of k * c per lane. Explicit intrinsics where available: GCC lowers the generic 64-bit vector
// multiply to a slow emulation (measured ~100 ns per element on AVX2), while vpmuludq on even/odd lanes is 2 uops.
inline void mulhilo(uint32_t k, vu c, vu& hi, vu& lo) {
#if FASTPEFT_VW == 8  // the AVX2 unit
  const __m256i kv = _mm256_set1_epi32(int(k));
  const __m256i a = (__m256i)c;
  const __m256i pe = _mm256_mul_epu32(a, kv), po = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), kv);
  hi = (vu)_mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
  lo = (vu)_mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
#elif FASTPEFT_VW == 4 && (defined(__x86_64__) || defined(__i386__))
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

inline void philox4_v(vu c0, vu c1, uint32_t k0, uint32_t k1, vu out[4]) {
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
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}
#endif

inline void philox4_1(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1, uint32_t out[4]) {
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
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// (a[0], b[0], a[1], b[1], ...) over the low halves of a and b (lo) and over their high halves (hi).
inline void zip2(vf a, vf b, vf& lo, vf& hi) {
#if FASTPEFT_VW == 16
  lo = __builtin_shufflevector(a, b, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  hi = __builtin_shufflevector(a, b, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
#elif FASTPEFT_VW == 8
  lo = __builtin_shufflevector(a, b, 0, 8, 1, 9, 2, 10, 3, 11);
  hi = __builtin_shufflevector(a, b, 4, 12, 5, 13, 6, 14, 7, 15);
#elif FASTPEFT_VW == 4
  lo = __builtin_shufflevector(a, b, 0, 4, 1, 5);
  hi = __builtin_shufflevector(a, b, 2, 6, 3, 7);
#else
#error "zip2: no shuffle pattern for this FASTPEFT_VW"
#endif
}

// o (4 * VW values in order) = m[0][0], m[1][0], m[2][0], m[3][0], m[0][1], ...: lane l of Philox call word w goes
// to position 4 l + w (the mask's word order, each word holding two draws). Two rounds of register shuffles (zip2,
// then the same on pairs of lanes); element-wise stores of the same cost ~1 cycle per element.
inline void interleave4(const vf m[4], vf o[4]) {
  vf a, b, c, d;
  zip2(m[0], m[1], a, b);
  zip2(m[2], m[3], c, d);
#if FASTPEFT_VW == 16
  o[0] = __builtin_shufflevector(a, c, 0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23);
  o[1] = __builtin_shufflevector(a, c, 8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31);
  o[2] = __builtin_shufflevector(b, d, 0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23);
  o[3] = __builtin_shufflevector(b, d, 8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31);
#elif FASTPEFT_VW == 8
  o[0] = __builtin_shufflevector(a, c, 0, 1, 8, 9, 2, 3, 10, 11);
  o[1] = __builtin_shufflevector(a, c, 4, 5, 12, 13, 6, 7, 14, 15);
  o[2] = __builtin_shufflevector(b, d, 0, 1, 8, 9, 2, 3, 10, 11);
  o[3] = __builtin_shufflevector(b, d, 4, 5, 12, 13, 6, 7, 14, 15);
#elif FASTPEFT_VW == 4
  o[0] = __builtin_shufflevector(a, c, 0, 1, 4, 5);
  o[1] = __builtin_shufflevector(a, c, 2, 3, 6, 7);
  o[2] = __builtin_shufflevector(b, d, 0, 1, 4, 5);
  o[3] = __builtin_shufflevector(b, d, 2, 3, 6, 7);
#else
#error "interleave4: no shuffle pattern for this FASTPEFT_VW"
#endif
}

// A mask element's 16-bit draw (fastpeft._philox): element offset o takes half o % 2 (0: the low 16 bits) of word
// (o / 2) % 4 of the Philox call on counter o / 8, so that one call serves eight elements.
inline uint32_t half_of(const uint32_t w[4], uint64_t o) { return (w[(o >> 1) & 3u] >> ((o & 1u) * 16u)) & 0xFFFFu; }

// The smallest 16-bit draw h that keeps, i.e. with h * 2^-16 >= p in fp32 (exact: both sides are fp32 values and the
// product is a power-of-two scaling): ceil(p * 65536). 65536 (nothing kept) for p >= 1 or NaN, 0 for p <= 0.
inline uint32_t keep_threshold(float p) {
  if (p <= 0.f) return 0;
  if (!(p < 1.f)) return 65536;
  const double scaled = double(p) * 65536.0;  // exact
  const uint32_t t = uint32_t(scaled);
  return double(t) < scaled ? t + 1 : t;
}


// The 8 * VW mask values of the VW Philox calls on counters q, q + 1, ...: out[j] = keep(8 q + j) ? scale : 0. The
// calls' words are put in element order as 32-bit pairs of draws (interleave4), then each word's two halves are
// compared and zipped.
inline void mask_block(uint32_t seed, uint64_t q, vu iota, vu threshold, vf sv, float* out) {
  const uint32_t lo = uint32_t(q), hi = uint32_t(q >> 32);
  vu c0 = iota + lo;
  vu c1 = (vu{} + hi) + ((c0 < lo) ? 1u : 0u);  // carry into the high word when the low word wraps
  vu words[4];
  philox4_v(c0, c1, seed, 0u, words);
  vf wv[4], ordered[4];
  for (int w = 0; w < 4; ++w) wv[w] = (vf)words[w];
  interleave4(wv, ordered);
  const vf zero = vf{};
  for (int v = 0; v < 4; ++v) {
    const vu pair = (vu)ordered[v];
    const vf low = ((pair & 0xFFFFu) >= threshold) ? sv : zero, high = ((pair >> 16) >= threshold) ? sv : zero;
    vf first, second;
    zip2(low, high, first, second);
    store_f32(out + 2 * v * VW, first);
    store_f32(out + (2 * v + 1) * VW, second);
  }
}

// out[i] = keep(offset0 + i) ? scale : 0 for i < n. Vector blocks of 8 * VW elements start at the octet (one Philox
// call) holding offset0; a block cut by either end of the range is drawn into scratch and copied, unless it needs
// at most two calls: those run one scalar call per octet.
void dropout_scale(uint32_t seed, int64_t offset0, int64_t n, float p, float scale, float* out) {
  constexpr int64_t kBlock = 8 * VW;
  const uint32_t t = keep_threshold(p);
  vu iota;
  for (int l = 0; l < VW; ++l) iota[l] = uint32_t(l);
  const vu threshold = vu{} + t;
  const vf sv = splat(scale);
  const int64_t end = offset0 + n;
  for (int64_t base = offset0 & ~int64_t(7); base < end; base += kBlock) {
    const int64_t from = base > offset0 ? base : offset0, to = (base + kBlock) < end ? (base + kBlock) : end;
    float* dst = out + (from - offset0);
    if (from == base && to == base + kBlock) {
      mask_block(seed, uint64_t(base) >> 3, iota, threshold, sv, dst);
    } else if (to - base <= 16) {
      for (int64_t o = from; o < to;) {
        const uint64_t q = uint64_t(o) >> 3;
        uint32_t w[4];
        philox4_1(uint32_t(q), uint32_t(q >> 32), seed, 0u, w);
        for (const int64_t octet_end = int64_t(q + 1) << 3; o < to && o < octet_end; ++o)
          out[o - offset0] = half_of(w, uint64_t(o)) >= t ? scale : 0.f;
      }
    } else {
      alignas(64) float scratch[kBlock];
      mask_block(seed, uint64_t(base) >> 3, iota, threshold, sv, scratch);
      __builtin_memcpy(dst, scratch + (from - base), sizeof(float) * size_t(to - from));
    }
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

// out[m, n] = round(a[m, n] + b[m, n] * (keep(m * N + n) ? kept : dropped)) in dt_out, fp32 arithmetic, for m in
// [m0, m1) and n < N, keep being dropout_scale's mask for seed and p over an (M, N) tensor. a null reads as 0; a
// dropped coefficient of exactly 0 writes +0 whatever b holds (masked_fill's meaning). out may be a (in place).
void masked_combine_rows(int dt_a, const void* a, int64_t lda, int dt_b, const void* b, int64_t ldb, int64_t N,
                         int64_t m0, int64_t m1, uint32_t seed, float p, float kept, float dropped, int dt_out,
                         void* out, int64_t ldo) {
  constexpr int64_t kChunk = 512;  // mask elements drawn at a time: 2 KB of L1
  float keep[kChunk];
  const bool zero_dropped = dropped == 0.f;
  const vf kv = splat(kept), dv = splat(dropped);
  for (int64_t m = m0; m < m1; ++m) {
    const void* ar = a ? row_ptr(dt_a, a, lda, m) : nullptr;
    const void* br = row_ptr(dt_b, b, ldb, m);
    void* orow = row_ptr(dt_out, out, ldo, m);
    for (int64_t n0 = 0; n0 < N; n0 += kChunk) {
      const int64_t w = (N - n0) < kChunk ? (N - n0) : kChunk;
      dropout_scale(seed, m * N + n0, w, p, 1.f, keep);
      int64_t i = 0;
      for (; i + VW <= w; i += VW) {
        const vi kept_lanes = load_f32(keep + i) != vf{};
        vf v = load_act(dt_b, br, n0 + i) * (vf)(((vi)kv & kept_lanes) | ((vi)dv & ~kept_lanes));
        if (zero_dropped) v = (vf)((vi)v & kept_lanes);
        if (ar) v = load_act(dt_a, ar, n0 + i) + v;
        store_act(dt_out, orow, n0 + i, v);
      }
      for (; i < w; ++i) {
        const bool k = keep[i] != 0.f;
        float v = (k || !zero_dropped) ? load_act1(dt_b, br, n0 + i) * (k ? kept : dropped) : 0.f;
        if (ar) v = load_act1(dt_a, ar, n0 + i) + v;
        store_act1(dt_out, orow, n0 + i, v);
      }
    }
  }
}

// Up to four activation rows are processed together (a row block) so that every load of an adapter row (A or
// B^T, r x K floats, streamed from L2 for each block) and every read-modify-write of a per-thread column sum
// feeds four rows' worth of FMAs: a quarter of the L2 traffic of a row-at-a-time loop.
constexpr int MB = 4;

// Adapter rows per sweep of dot_block: four on AVX-512 (NB x 4 accumulators + 4 adapter vectors + 1 activation
// vector fit its 32 registers, and each activation load feeds four FMAs), two where 16 registers would spill.
constexpr int DOT_J = VW == 16 ? 4 : 2;

// out[i * ldo + j] = sum_k X[i][k] * A[j, k] for i < NB, j < r. X: NB rows of K floats, ldx apart.
template <int NB>
void dot_block(const float* X, int64_t ldx, const float* A, int64_t r, int64_t K, float* out, int64_t ldo) {
  for (int64_t j = 0; j < r; j += DOT_J) {
    const int64_t nj = (r - j) < DOT_J ? (r - j) : DOT_J;
    const float* a[DOT_J];
    for (int q = 0; q < DOT_J; ++q) a[q] = A + (j + (q < nj ? q : nj - 1)) * K;  // a short group repeats its last row
    vf s[NB][DOT_J];
    for (int i = 0; i < NB; ++i)
      for (int q = 0; q < DOT_J; ++q) s[i][q] = vf{};
    int64_t k = 0;
    for (; k + VW <= K; k += VW) {
      vf v[DOT_J];
      for (int q = 0; q < DOT_J; ++q) v[q] = load_f32(a[q] + k);
      for (int i = 0; i < NB; ++i) {
        const vf xv = load_f32(X + i * ldx + k);
        for (int q = 0; q < DOT_J; ++q) s[i][q] += xv * v[q];
      }
    }
    for (int i = 0; i < NB; ++i)
      for (int q = 0; q < nj; ++q) {
        float t = hsum(s[i][q]);
        for (int64_t kk = k; kk < K; ++kk) t += X[i * ldx + kk] * a[q][kk];
        out[i * ldo + j + q] = t;
      }
  }
}

// Calls f(std::integral_constant-like NB) for a block of nb rows; the templates need NB at compile time so the
// per-row accumulators live in registers.
#define FASTPEFT_BLOCK(nb, CALL) \
  switch (nb) {                  \
    case 1: { constexpr int NB = 1; CALL; break; } \
    case 2: { constexpr int NB = 2; CALL; break; } \
    case 3: { constexpr int NB = 3; CALL; break; } \
    default: { constexpr int NB = 4; CALL; break; } \
  }

// buf: MB * K floats.
void xa_rows(int dt, const void* x, int64_t ldx, int64_t K, int64_t m0, int64_t m1, const float* A, int64_t r,
             float p, uint32_t seed, float* xa, int64_t ldxa, float* buf) {
  const float scale = p > 0.f ? 1.f / (1.f - p) : 1.f;
  for (int64_t mb = m0; mb < m1; mb += MB) {
    const int nb = int((m1 - mb) < MB ? (m1 - mb) : MB);
    if (dt == kF32 && p <= 0.f) {  // fp32 rows without dropout are read where they lie
      FASTPEFT_BLOCK(nb, dot_block<NB>(static_cast<const float*>(row_ptr(dt, x, ldx, mb)), ldx, A, r, K,
                                       xa + mb * ldxa, ldxa))
      continue;
    }
    for (int i = 0; i < nb; ++i) {
      float* row = buf + i * K;
      const void* xrow = row_ptr(dt, x, ldx, mb + i);
      if (p > 0.f) {
        dropout_scale(seed, (mb + i) * K, K, p, scale, row);  // the mask row, then masked x, in the same buffer
        load_row(dt, xrow, K, row, row);
      } else {
        load_row(dt, xrow, K, nullptr, row);
      }
    }
    FASTPEFT_BLOCK(nb, dot_block<NB>(buf, K, A, r, K, xa + mb * ldxa, ldxa))
  }
}

// ------------------------------------------------------------------------- down-projection, adapter transposed
// xa_rows_t keeps one accumulator vector per activation row, its lanes being VW ranks: each step over k loads one
// vector of At (k's VW ranks) and multiplies it by one broadcast element of every row of the block. The adapter is
// streamed once per XT_ROWS rows (dot_block streams it once per four, from L2 for a wide K) and no lanes need summing
// at the end. Rows that are not fp32, or are dropped, are staged XT_KC elements at a time, in L1.
constexpr int XT_ROWS = VW == 16 ? 16 : 8;  // accumulators of one rank group: half the register file or less
constexpr int64_t XT_KC = down_t_chunk;     // k per staged chunk: XT_ROWS x XT_KC floats (16 KB on AVX-512)
static_assert(XT_ROWS <= down_t_rows, "kernels.h sizes xa_rows_t's scratch");
constexpr int64_t XT_GROUPS = 8;            // rank groups (VW ranks each) per sweep over the rows

// acc[i * groups + gi] += sum_{kk < w} X[i][kk] * At[kk * RP + gi * VW + lane], for i < NB, gi < groups.
template <int NB>
void xt_chunk(const float* const* X, int64_t w, const float* At, int64_t RP, int64_t groups, vf* acc) {
  for (int64_t gi = 0; gi < groups; ++gi) {
    vf s[NB];
    for (int i = 0; i < NB; ++i) s[i] = acc[i * groups + gi];
    const float* a = At + gi * VW;
    for (int64_t kk = 0; kk < w; ++kk) {
      const vf av = load_f32(a + kk * RP);
      for (int i = 0; i < NB; ++i) s[i] += load_splat(X[i] + kk) * av;
    }
    for (int i = 0; i < NB; ++i) acc[i * groups + gi] = s[i];
  }
}

// Rows [m, m + NB) of xa_rows_t for the ranks [j0, j0 + groups * VW) of At.
template <int NB>
void xt_block(int dt, const void* x, int64_t ldx, int64_t K, int64_t m, const float* At, int64_t RP, int64_t j0,
              int64_t groups, int64_t r, float p, float scale, uint32_t seed, float* xa, int64_t ldxa, float* stage) {
  vf acc[NB * XT_GROUPS];
  for (int64_t i = 0; i < NB * groups; ++i) acc[i] = vf{};
  const bool direct = dt == kF32 && p <= 0.f;
  const float* X[NB];
  for (int64_t k0 = 0; k0 < K; k0 += XT_KC) {
    const int64_t w = (K - k0) < XT_KC ? (K - k0) : XT_KC;
    for (int i = 0; i < NB; ++i) {
      const void* src = static_cast<const char*>(row_ptr(dt, x, ldx, m + i)) + k0 * elem_size(dt);
      if (direct) {
        X[i] = static_cast<const float*>(src);
        continue;
      }
      float* row = stage + i * XT_KC;
      if (p > 0.f) {
        dropout_scale(seed, (m + i) * K + k0, w, p, scale, row);
        load_row(dt, src, w, row, row);
      } else {
        load_row(dt, src, w, nullptr, row);
      }
      X[i] = row;
    }
    xt_chunk<NB>(X, w, At + k0 * RP + j0, RP, groups, acc);
  }
  for (int i = 0; i < NB; ++i)
    for (int64_t gi = 0; gi < groups; ++gi) {
      float lanes[VW];
      store_f32(lanes, acc[i * groups + gi]);
      for (int l = 0; l < VW && j0 + gi * VW + l < r; ++l) xa[(m + i) * ldxa + j0 + gi * VW + l] = lanes[l];
    }
}

// xa_rows with A given transposed: At (K, RP) fp32, RP a multiple of VW >= r, columns past r zero. Each lane sums
// its products in k order. buf: XT_ROWS * XT_KC floats of scratch.
void xa_rows_t(int dt, const void* x, int64_t ldx, int64_t K, int64_t m0, int64_t m1, const float* At, int64_t r,
               int64_t RP, float p, uint32_t seed, float* xa, int64_t ldxa, float* buf) {
  const float scale = p > 0.f ? 1.f / (1.f - p) : 1.f;
  for (int64_t j0 = 0; j0 < RP; j0 += XT_GROUPS * VW) {
    const int64_t groups = (RP - j0) / VW < XT_GROUPS ? (RP - j0) / VW : XT_GROUPS;
    int64_t m = m0;
#define FASTPEFT_XT(NB)                                                                                       \
  for (; m + NB <= m1; m += NB)                                                                               \
    xt_block<NB>(dt, x, ldx, K, m, At, RP, j0, groups, r, p, scale, seed, xa, ldxa, buf);
    FASTPEFT_XT(XT_ROWS)
    FASTPEFT_XT(4)
    FASTPEFT_XT(1)
#undef FASTPEFT_XT
  }
}

// ------------------------------------------------------------------------------------- column scaling (DoRA)
// out[m, n] = round(add(m, n) + z[m, n] * scale[n]) in dt_out, fp32 arithmetic, for m in [m0, m1), n < N; add(m, n) =
// add[m * ldadd + n] of dtype dt_add (ldadd 0: one (N,) row for every m), or 0 when add is null.
void scale_columns_rows(int dt_z, const void* z, int64_t ldz, int64_t N, int64_t m0, int64_t m1, const float* scale,
                        int dt_add, const void* add, int64_t ldadd, int dt_out, void* out, int64_t ldo) {
  for (int64_t m = m0; m < m1; ++m) {
    const void* zr = row_ptr(dt_z, z, ldz, m);
    const void* ar = add ? row_ptr(dt_add, add, ldadd, m) : nullptr;
    void* orow = row_ptr(dt_out, out, ldo, m);
    int64_t n = 0;
    for (; n + VW <= N; n += VW) {
      vf v = load_act(dt_z, zr, n) * load_f32(scale + n);
      if (ar) v = load_act(dt_add, ar, n) + v;
      store_act(dt_out, orow, n, v);
    }
    for (; n < N; ++n) {
      float v = load_act1(dt_z, zr, n) * scale[n];
      if (ar) v = load_act1(dt_add, ar, n) + v;
      store_act1(dt_out, orow, n, v);
    }
  }
}

// acc[n - n0] += sum_{m < M} a[m, n] * b[m, n] for n in [n0, n1), fp32 products and sums, m in order (a column strip:
// threads split the columns, so no partial sums are reduced and the order does not depend on the thread count).
void column_dots_cols(int dt_a, const void* a, int64_t lda, int dt_b, const void* b, int64_t ldb, int64_t M,
                      int64_t n0, int64_t n1, float* acc) {
  for (int64_t m = 0; m < M; ++m) {
    const void* ar = row_ptr(dt_a, a, lda, m);
    const void* br = row_ptr(dt_b, b, ldb, m);
    int64_t n = n0;
    for (; n + VW <= n1; n += VW)
      store_f32(acc + n - n0, load_f32(acc + n - n0) + load_act(dt_a, ar, n) * load_act(dt_b, br, n));
    for (; n < n1; ++n) acc[n - n0] += load_act1(dt_a, ar, n) * load_act1(dt_b, br, n);
  }
}

// column_dots_cols of (dy, z) and scale_columns_rows of dy by c (and by c - 1) in one pass over dy, for the columns
// [n0, n1): the same expressions, so the same bits as those two passes.
void dora_prologue_cols(int dt, const void* dy, int64_t lddy, int dt_z, const void* z, int64_t ldz, int64_t M,
                        int64_t n0, int64_t n1, const float* scale, float* dots, void* ge, int64_t ldge, bool with_e) {
  const vf one = splat(1.f);
  for (int64_t m = 0; m < M; ++m) {
    const void* dr = row_ptr(dt, dy, lddy, m);
    const void* zr = z ? row_ptr(dt_z, z, ldz, m) : nullptr;
    void* gr = row_ptr(dt, ge, ldge, m);
    void* er = with_e ? row_ptr(dt, ge, ldge, M + m) : nullptr;
    int64_t n = n0;
    for (; n + VW <= n1; n += VW) {
      const vf d = load_act(dt, dr, n), c = load_f32(scale + n);
      if (zr) store_f32(dots + n - n0, load_f32(dots + n - n0) + d * load_act(dt_z, zr, n));
      store_act(dt, gr, n, d * c);
      if (er) store_act(dt, er, n, d * (c - one));
    }
    for (; n < n1; ++n) {
      const float d = load_act1(dt, dr, n), c = scale[n];
      if (zr) dots[n - n0] += d * load_act1(dt_z, zr, n);
      store_act1(dt, gr, n, d * c);
      if (er) store_act1(dt, er, n, d * (c - 1.f));
    }
  }
}

// ------------------------------------------------------------------------------ expand from B as PEFT keeps it
// Lane masks of one level of reduce_lanes. Vectors a and b each hold VW / S segments of S partial sums; output
// segment sigma (of S / 2 lanes) takes the low (lo) or high (hi) half of segment sigma / 2 of a (sigma even) or of b
// (sigma odd), so that adding the two shuffles halves the segments. Indices are into the concatenation (a, b).
struct HalvingMasks {
  int lo[VW], hi[VW];
};
constexpr HalvingMasks halving_masks(int S) {
  HalvingMasks m{};
  for (int o = 0; o < VW; ++o) {
    const int sigma = o / (S / 2), w = o % (S / 2);
    m.lo[o] = (sigma % 2 ? VW : 0) + (sigma / 2) * S + w;
    m.hi[o] = m.lo[o] + S / 2;
  }
  return m;
}

constexpr int bit_reverse(int v, int bits) {
  int r = 0;
  for (int b = 0; b < bits; ++b) r |= ((v >> b) & 1) << (bits - 1 - b);
  return r;
}
constexpr int kLogVW = VW == 16 ? 4 : VW == 8 ? 3 : 2;

// a and b with every segment of S partial sums halved (halving_masks), the shuffles' lanes literal constants.
template <int S, size_t... I>
inline vf halve(vf a, vf b, std::index_sequence<I...>) {
  constexpr HalvingMasks m = halving_masks(S);
  return __builtin_shufflevector(a, b, m.lo[I]...) + __builtin_shufflevector(a, b, m.hi[I]...);
}

// p[0] lane L = the lane sum of the input p[bit_reverse(L)], for the S = VW vectors p: log2(VW) levels of pairwise
// shuffles and adds (VW - 1 of each) instead of VW separate lane sums. p is overwritten.
template <int S>
inline void reduce_lanes(vf* p) {
  if constexpr (S > 1) {
    for (int i = 0; i < S / 2; ++i) p[i] = halve<S>(p[2 * i], p[2 * i + 1], std::make_index_sequence<VW>{});
    reduce_lanes<S / 2>(p);
  }
}

// y[n] = round(y[n] + bias[n] + sum_j xs[j] B[n, j]) in y's dtype for n < N: one activation row's expand with B
// (N, R) fp32 read where it lies, R a multiple of VW. Each VW outputs are VW dot products of length R, summed across
// lanes together (reduce_lanes), so no B^T is made for a row that uses its adapter once (decode).
void expand_row_b(int dt, void* y, int64_t N, const float* xs, int64_t R, const float* B, const float* bias) {
  int64_t n = 0;
  for (; n + VW <= N; n += VW) {
    vf p[VW];
    for (int i = 0; i < VW; ++i) {  // rows in order (the stream the prefetcher follows), slots bit-reversed
      const float* row = B + (n + i) * R;
      vf acc = load_f32(row) * load_f32(xs);
      for (int64_t j = VW; j < R; j += VW) acc += load_f32(row + j) * load_f32(xs + j);
      p[bit_reverse(i, kLogVW)] = acc;
    }
    reduce_lanes<VW>(p);
    vf v = p[0];
    if (bias) v += load_f32(bias + n);
    store_act(dt, y, n, load_act(dt, y, n) + v);
  }
  for (; n < N; ++n) {
    float v = bias ? bias[n] : 0.f;
    for (int64_t j = 0; j < R; ++j) v += xs[j] * B[n * R + j];
    store_act1(dt, y, n, load_act1(dt, y, n) + v);
  }
}

// buf: MB * N floats.
void dy_rows(int dt, const void* dy, int64_t lddy, int64_t N, int64_t m0, int64_t m1, const float* Bt, int64_t R,
             const float* svec, float* g, float* buf) {
  for (int64_t mb = m0; mb < m1; mb += MB) {
    const int nb = int((m1 - mb) < MB ? (m1 - mb) : MB);
    // fp32 rows are read where they lie; 16-bit ones widened into buf first.
    const float* rows = static_cast<const float*>(row_ptr(dt, dy, lddy, mb));
    int64_t ld = lddy;
    if (dt != kF32) {
      for (int i = 0; i < nb; ++i) load_row(dt, row_ptr(dt, dy, lddy, mb + i), N, nullptr, buf + i * N);
      rows = buf;
      ld = N;
    }
    float* gm = g + mb * R;
    FASTPEFT_BLOCK(nb, dot_block<NB>(rows, ld, Bt, R, N, gm, R))
    for (int i = 0; i < nb; ++i)
      for (int64_t j = 0; j < R; ++j) gm[i * R + j] *= svec[j];
  }
}

// --------------------------------------------------------------------------------- the dY pass as outer products
// dy_outer_cols' register blocking for R = RV * VW: OB rows of dy per block (each broadcast element feeds RV
// multiply-adds into its row of g and RV into its column of dB), OU columns per step (their dB sums are
// independent chains), each column's dB summed in OH partial chains (halves of the block's rows) so that the adds
// of one column do not wait on each other. Sized so the accumulators, B's vectors and a broadcast fit the register
// file: 32 vectors on AVX-512, 16 otherwise.
template <int RV>
struct OuterShape {
  static constexpr int OB = RV == 1 ? 8 : 4;
  static constexpr int OU = RV == 1 ? (VW == 16 ? 4 : 2) : (VW == 16 ? 2 : 1);
  static constexpr int OH = RV == 1 ? 2 : 1;
};

// OU columns c .. c + OU of dy_outer_block: acc[i] (row i's share of g) += rows[i][c + u] * B's row c + u, and dB's
// row c + u += sum_i rows[i][c + u] * xs[i], each column's sum in OH partial chains (halves of the rows) added last.
template <int NB, int RV, int OU, int OH>
inline void outer_columns(const float* const* rows, int64_t c, const float* Bc, const float* xs, float* dBc,
                          vf (&acc)[NB][RV]) {
  constexpr int64_t R = RV * VW;
  vf d[OU][OH][RV];
  for (int u = 0; u < OU; ++u) {
    vf b[RV];
    for (int v = 0; v < RV; ++v) b[v] = load_f32(Bc + (c + u) * R + v * VW);
    for (int h = 0; h < OH; ++h)
      for (int v = 0; v < RV; ++v) d[u][h][v] = vf{};
    for (int i = 0; i < NB; ++i) {
      const vf e = load_splat(rows[i] + c + u);
      const int h = i * OH / NB;
      for (int v = 0; v < RV; ++v) {
        acc[i][v] += e * b[v];
        d[u][h][v] += e * load_f32(xs + i * R + v * VW);
      }
    }
  }
  for (int u = 0; u < OU; ++u)
    for (int v = 0; v < RV; ++v) {
      vf t = d[u][0][v];
      for (int h = 1; h < OH; ++h) t += d[u][h][v];
      float* out = dBc + (c + u) * R + v * VW;
      store_f32(out, load_f32(out) + t);
    }
}

// For NB rows rows[i][0 .. C) (fp32, C = c1 - c0 columns starting at column c0 of B and dB):
//   g[i * R + j] = sum_{c < C} rows[i][c] * B[(c0 + c) * R + j]           (written)
//   dB[(c0 + c) * R + j] += sum_{i < NB} rows[i][c] * xs[i * R + j]       (accumulated)
// R = RV * VW; B (N, R), xs (NB, R) and dB (N, R) fp32 rows. OuterShape's OU columns a step, the last ones one by one.
template <int NB, int RV>
void dy_outer_block(const float* const* rows, int64_t C, int64_t c0, const float* B, const float* xs, float* g,
                    float* dB) {
  using S = OuterShape<RV>;
  constexpr int64_t R = RV * VW;
  constexpr int OU = NB == S::OB ? S::OU : 1;
  constexpr int OH = NB == S::OB ? S::OH : 1;
  vf acc[NB][RV];
  for (int i = 0; i < NB; ++i)
    for (int v = 0; v < RV; ++v) acc[i][v] = vf{};
  const float* Bc = B + c0 * R;
  float* dBc = dB + c0 * R;
  int64_t c = 0;
  for (; c + OU <= C; c += OU) outer_columns<NB, RV, OU, OH>(rows, c, Bc, xs, dBc, acc);
  for (; c < C; ++c) outer_columns<NB, RV, 1, 1>(rows, c, Bc, xs, dBc, acc);
  for (int i = 0; i < NB; ++i)
    for (int v = 0; v < RV; ++v) store_f32(g + i * R + v * VW, acc[i][v]);
}

template <int RV>
void dy_outer_cols_rv(int dt, const void* dy, int64_t lddy, int64_t M, int64_t n0, int64_t n1, const float* B,
                      const float* xs, float* g, float* dB, float* colsum, float* buf) {
  constexpr int OB = OuterShape<RV>::OB;
  static_assert(OB <= outer_rows_max, "the caller sizes buf for outer_rows_max rows");
  constexpr int64_t R = RV * VW;
  const int64_t C = n1 - n0;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t j = 0; j < R; ++j) dB[n * R + j] = 0.f;
  if (colsum)
    for (int64_t n = n0; n < n1; ++n) colsum[n] = 0.f;
  const float* rows[OB];
  for (int64_t m = 0; m < M; m += OB) {
    const int nb = int(M - m < OB ? M - m : OB);
    for (int i = 0; i < nb; ++i) {
      const void* row = static_cast<const char*>(row_ptr(dt, dy, lddy, m + i)) + n0 * elem_size(dt);
      if (dt == kF32) {
        rows[i] = static_cast<const float*>(row);
      } else {  // 16-bit rows widened once; each element then feeds 2 * R multiply-adds
        load_row(dt, row, C, nullptr, buf + i * C);
        rows[i] = buf + i * C;
      }
    }
    if (colsum) {  // rows in order, while the block's rows are in cache
      for (int i = 0; i < nb; ++i) {
        int64_t c = 0;
        for (; c + VW <= C; c += VW) store_f32(colsum + n0 + c, load_f32(colsum + n0 + c) + load_f32(rows[i] + c));
        for (; c < C; ++c) colsum[n0 + c] += rows[i][c];
      }
    }
    if (nb == OB) {
      dy_outer_block<OB, RV>(rows, C, n0, B, xs + m * R, g + m * R, dB);
    } else {
      for (int i = 0; i < nb; ++i) dy_outer_block<1, RV>(rows + i, C, n0, B, xs + (m + i) * R, g + (m + i) * R, dB);
    }
  }
}

// See KernelTable::dy_outer_cols.
void dy_outer_cols(int dt, const void* dy, int64_t lddy, int64_t M, int64_t n0, int64_t n1, const float* B, int64_t R,
                   const float* xs, float* g, float* dB, float* colsum, float* buf) {
  if (R == VW) dy_outer_cols_rv<1>(dt, dy, lddy, M, n0, n1, B, xs, g, dB, colsum, buf);
  else dy_outer_cols_rv<2>(dt, dy, lddy, M, n0, n1, B, xs, g, dB, colsum, buf);
}

// ---------------------------------------------------------------------------------------------- expand
// y[m, :] += sum_j c[m, j] rows[j, :] (the epilogue's xs B^T, the backward's g A) with every output vector summed in
// registers over all R rows: the rows matrix is read a panel of EXPAND_W columns at a time, and a block of
// EXPAND_ROWS output rows takes each panel in turn while it is in L1. (Summing a few rows at a time through a buffer
// stores and reloads every output vector R / 4 times.)
constexpr int EXPAND_NV = VW == 16 ? 4 : 2;  // vectors per panel row: EXPAND_MB x EXPAND_NV accumulators in registers
constexpr int64_t EXPAND_W = int64_t(EXPAND_NV) * VW;
constexpr int EXPAND_MB = 4;         // output rows per register block
constexpr int64_t EXPAND_ROWS = 32;  // output rows per sweep over one panel

// acc[i][v] = sum_{j < R} c[i * ldc + j] rows[j * ldr + n0 + v * VW] for NB rows: one EXPAND_W panel of each row's
// sum over the R rows, kept in registers.
template <int NB>
inline void panel_sums(const float* c, int64_t ldc, int64_t R, const float* rows, int64_t ldr, int64_t n0,
                       vf acc[NB][EXPAND_NV]) {
  for (int i = 0; i < NB; ++i)
    for (int v = 0; v < EXPAND_NV; ++v) acc[i][v] = vf{};
  for (int64_t j = 0; j < R; ++j) {
    vf b[EXPAND_NV];
    for (int v = 0; v < EXPAND_NV; ++v) b[v] = load_f32(rows + j * ldr + n0 + v * VW);
    for (int i = 0; i < NB; ++i) {
      const vf ci = load_splat(c + i * ldc + j);
      for (int v = 0; v < EXPAND_NV; ++v) acc[i][v] += ci * b[v];
    }
  }
}

// expand_block's update of its NB rows for one dtype: the sums stay in registers (the loops unrolled, the dtype
// fixed at compile time) instead of going through the stack, as they did with the dtype tested per vector.
template <int NB, int DT>
inline void add_panel(void* y, int64_t ldy, int64_t n0, const vf (&acc)[NB][EXPAND_NV], const float* mask,
                      int64_t ldm, const float* bias) {
#pragma GCC unroll 4
  for (int i = 0; i < NB; ++i) {
    void* row = row_ptr(DT, y, ldy, i);
#pragma GCC unroll 4
    for (int v = 0; v < EXPAND_NV; ++v) {
      vf t = acc[i][v];
      if (mask) t *= load_f32(mask + i * ldm + v * VW);
      if (bias) t += load_f32(bias + n0 + v * VW);
      store_act(DT, row, n0 + v * VW, load_act(DT, row, n0 + v * VW) + t);
    }
  }
}

// The NB rows of y from y (ldy apart), columns [n0, n0 + EXPAND_W); rows: (R, .) fp32, ldr floats apart. mask: null,
// or NB rows of EXPAND_W factors (ldm floats apart) multiplying each row's sum before the bias is added.
template <int NB>
void expand_block(int dt, void* y, int64_t ldy, int64_t n0, const float* c, int64_t ldc, int64_t R, const float* rows,
                  int64_t ldr, const float* mask, int64_t ldm, const float* bias,
                  const MaskedCorrection* corr = nullptr, int64_t row0 = 0) {
  vf acc[NB][EXPAND_NV];
  panel_sums<NB>(c, ldc, R, rows, ldr, n0, acc);
  if (!corr) {
    switch (dt) {
      case kF32: add_panel<NB, kF32>(y, ldy, n0, acc, mask, ldm, bias); return;
      case kBF16: add_panel<NB, kBF16>(y, ldy, n0, acc, mask, ldm, bias); return;
      default: add_panel<NB, kF16>(y, ldy, n0, acc, mask, ldm, bias); return;
    }
  }
  // out = round(dst + mask t + (mask - 1) extra), dst only read (mask present: outer_cols with p > 0)
  const vf one = splat(1.f);
  for (int i = 0; i < NB; ++i) {
    const void* row = row_ptr(dt, y, ldy, i);
    const float* e = corr->extra + (row0 + i) * corr->ld_extra;
    void* orow = row_ptr(corr->dt_out, corr->out, corr->ld_out, row0 + i);
    for (int v = 0; v < EXPAND_NV; ++v) {
      const vf mk = load_f32(mask + i * ldm + v * VW);
      const vf val = load_act(dt, row, n0 + v * VW) + mk * acc[i][v] + (mk - one) * load_f32(e + n0 + v * VW);
      store_act(corr->dt_out, orow, n0 + v * VW, val);
    }
  }
}

// The columns [n0, N) of one output row, fewer than EXPAND_W: a vector at a time, then one at a time.
void expand_tail(int dt, void* row, int64_t n0, const float* c, int64_t R, const float* rows, int64_t N,
                 const float* bias) {
  int64_t n = n0;
  for (; n + VW <= N; n += VW) {
    vf t = vf{};
    for (int64_t j = 0; j < R; ++j) t += load_splat(c + j) * load_f32(rows + j * N + n);
    if (bias) t += load_f32(bias + n);
    store_act(dt, row, n, load_act(dt, row, n) + t);
  }
  for (; n < N; ++n) {
    float t = 0.f;
    for (int64_t j = 0; j < R; ++j) t += c[j] * rows[j * N + n];
    store_act1(dt, row, n, load_act1(dt, row, n) + (bias ? t + bias[n] : t));
  }
}

// DoRA's stacked forward epilogue for NB rows (z, base: fp32 rows ldz / ldb apart; h: NB rows of R, ldh apart):
//   u = h Bt;  z += k u in place;  out = round(base + bias + s u + f z) in dt_out,
// u summed in registers one EXPAND_W panel at a time (panel_sums), the tail columns one by one.
template <int NB>
void dora_epilogue_block(const float* zin, int64_t ldzi, float* z, int64_t ldz, const float* base, int64_t ldb,
                         int64_t N, const float* h, int64_t ldh, int64_t R, const float* Bt, float k, float s,
                         const float* f, const float* bias, int dt_out, void* out, int64_t ldo) {
  const vf kv = splat(k), sv = splat(s);
  const int64_t whole = N - N % EXPAND_W;
  for (int64_t n0 = 0; n0 < whole; n0 += EXPAND_W) {
    vf acc[NB][EXPAND_NV];
    panel_sums<NB>(h, ldh, R, Bt, N, n0, acc);
    for (int i = 0; i < NB; ++i) {
      void* orow = row_ptr(dt_out, out, ldo, i);
      for (int v = 0; v < EXPAND_NV; ++v) {
        const int64_t n = n0 + v * VW;
        const vf zv = load_f32(zin + i * ldzi + n) + kv * acc[i][v];
        store_f32(z + i * ldz + n, zv);
        vf o = base ? load_f32(base + i * ldb + n) + sv * acc[i][v] + load_f32(f + n) * zv : load_f32(f + n) * zv;
        if (bias) o += load_f32(bias + n);
        store_act(dt_out, orow, n, o);
      }
    }
  }
  for (int i = 0; i < NB; ++i) {
    void* orow = row_ptr(dt_out, out, ldo, i);
    for (int64_t n = whole; n < N; ++n) {
      float u = 0.f;
      for (int64_t j = 0; j < R; ++j) u += h[i * ldh + j] * Bt[j * N + n];
      const float zn = zin[i * ldzi + n] + k * u;
      z[i * ldz + n] = zn;
      const float o = base ? base[i * ldb + n] + s * u + f[n] * zn : f[n] * zn;
      store_act1(dt_out, orow, n, bias ? o + bias[n] : o);
    }
  }
}

void dora_epilogue_rows(const float* zin, int64_t ldzi, float* z, int64_t ldz, const float* base, int64_t ldb,
                        int64_t N, int64_t m0, int64_t m1, const float* h, int64_t ldh, int64_t R, const float* Bt,
                        float k, float s, const float* f, const float* bias, int dt_out, void* out, int64_t ldo) {
  for (int64_t m = m0; m < m1; m += EXPAND_MB) {
    const int nb = int((m1 - m) < EXPAND_MB ? (m1 - m) : EXPAND_MB);
    FASTPEFT_BLOCK(nb, dora_epilogue_block<NB>(zin + m * ldzi, ldzi, z + m * ldz, ldz,
                                               base ? base + m * ldb : nullptr, ldb, N,
                                               h + m * ldh, ldh, R, Bt, k, s, f, bias, dt_out,
                                               row_ptr(dt_out, out, ldo, m), ldo))
  }
}

// y[m, n] = round(y[m, n] + bias[n] + sum_{j < R} c[m * ldc + j] rows[j, n]) in y's dtype (dt) for m in [m0, m1),
// n < N; rows: (R, N) fp32 contiguous; bias: (N,) fp32 or null.
void expand_rows(int dt, void* y, int64_t ldy, int64_t N, int64_t m0, int64_t m1, const float* c, int64_t ldc,
                 int64_t R, const float* rows, const float* bias) {
  const int64_t whole = N - N % EXPAND_W;
  for (int64_t mr = m0; mr < m1; mr += EXPAND_ROWS) {
    const int64_t me = (m1 - mr) < EXPAND_ROWS ? m1 : mr + EXPAND_ROWS;
    for (int64_t n0 = 0; n0 < whole; n0 += EXPAND_W)
      for (int64_t mb = mr; mb < me; mb += EXPAND_MB) {
        const int nb = int((me - mb) < EXPAND_MB ? (me - mb) : EXPAND_MB);
        FASTPEFT_BLOCK(nb, expand_block<NB>(dt, row_ptr(dt, y, ldy, mb), ldy, n0, c + mb * ldc, ldc, R, rows, N,
                                            nullptr, 0, bias))
      }
    if (whole < N)
      for (int64_t m = mr; m < me; ++m) expand_tail(dt, row_ptr(dt, y, ldy, m), whole, c + m * ldc, R, rows, N, bias);
  }
}

// ---------------------------------------------------------------------------------- column-strip outer sums
// Columns per strip of outer_cols and adapter rows per sweep: JB x NV accumulators stay in registers for the whole
// reduction over the M rows (16 of 32 on AVX-512; 8 of 16 elsewhere).
constexpr int OUTER_NV = VW == 16 ? 4 : 2, OUTER_JB = 4;
constexpr int64_t OUTER_STRIP = int64_t(OUTER_NV) * VW;
// How many rows ahead a sweep down a column strip requests the strip's lines: a strip is a line or a few of each row,
// rows apart by a whole row, a stride the hardware prefetcher does not follow from memory.
constexpr int64_t kStripPrefetchRows = 16;

// Requests the cache lines of bytes bytes at offset bytes into row.
inline void prefetch_strip(const void* row, int64_t offset, int64_t bytes) {
  const char* p = static_cast<const char*>(row) + offset;
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b);
}

// out[j * ldo + n] = sum_{m < M} coef[m * ldc + j] * v(m, n) for j < R and n in [n0, n0 + w), w <= OUTER_STRIP,
// where v(m, n) = src[m, n] (dtype dt, rows lds apart), times mask[m * ldm + n - n0] when mask is given.
// add: out += the sums instead of out = the sums.
template <int JB>
void outer_strip(int dt, const void* src, int64_t lds, int64_t M, int64_t n0, int64_t w, const float* coef,
                 int64_t ldc, int64_t j0, const float* mask, int64_t ldm, bool add, float* out, int64_t ldo) {
  if (w == OUTER_STRIP) {
    vf acc[JB][OUTER_NV];
    for (int q = 0; q < JB; ++q)
      for (int v = 0; v < OUTER_NV; ++v) acc[q][v] = add ? load_f32(out + (j0 + q) * ldo + n0 + v * VW) : vf{};
    const int64_t strip_bytes = OUTER_STRIP * elem_size(dt);
    for (int64_t m = 0; m < M; ++m) {
      const void* row = row_ptr(dt, src, lds, m);
      if (j0 == 0 && m + kStripPrefetchRows < M)  // the first sweep down a strip reads it from memory
        prefetch_strip(row_ptr(dt, src, lds, m + kStripPrefetchRows), n0 * elem_size(dt), strip_bytes);
      vf d[OUTER_NV];
      for (int v = 0; v < OUTER_NV; ++v) d[v] = load_act(dt, row, n0 + v * VW);
      if (mask)
        for (int v = 0; v < OUTER_NV; ++v) d[v] *= load_f32(mask + m * ldm + v * VW);
      const float* c = coef + m * ldc + j0;
      for (int q = 0; q < JB; ++q) {
        const vf cq = load_splat(c + q);
        for (int v = 0; v < OUTER_NV; ++v) acc[q][v] += cq * d[v];
      }
    }
    for (int q = 0; q < JB; ++q)
      for (int v = 0; v < OUTER_NV; ++v) store_f32(out + (j0 + q) * ldo + n0 + v * VW, acc[q][v]);
    return;
  }
  for (int64_t n = n0; n < n0 + w; ++n) {  // the last, partial strip
    float acc[JB];
    for (int q = 0; q < JB; ++q) acc[q] = add ? out[(j0 + q) * ldo + n] : 0.f;
    for (int64_t m = 0; m < M; ++m) {
      float d = load_act1(dt, row_ptr(dt, src, lds, m), n);
      if (mask) d *= mask[m * ldm + n - n0];
      for (int q = 0; q < JB; ++q) acc[q] += coef[m * ldc + j0 + q] * d;
    }
    for (int q = 0; q < JB; ++q) out[(j0 + q) * ldo + n] = acc[q];
  }
}

// dst[m, n] = round(dst[m, n] + mask(m, n) * sum_{j < R} coef[m * ldc + j] * rows[j * ldr + n]) for m < M and n in
// [n0, n0 + w), w <= OUTER_STRIP, in dst's dtype (rows lds apart); mask(m, n) = mask[m * ldm + n - n0], or 1.
void combine_strip(int dt, void* dst, int64_t lds, int64_t M, int64_t n0, int64_t w, const float* coef, int64_t ldc,
                   int64_t R, const float* rows, int64_t ldr, const float* mask, int64_t ldm,
                   const MaskedCorrection* corr, int64_t row0) {
  if (w == OUTER_STRIP) {  // expand_rows' register blocks, each row's sum times its mask
    const int64_t strip_bytes = OUTER_STRIP * elem_size(dt);
    for (int64_t m = 0; m < M; m += EXPAND_MB) {
      const int nb = int((M - m) < EXPAND_MB ? (M - m) : EXPAND_MB);
      for (int64_t a = m + kStripPrefetchRows; a < m + kStripPrefetchRows + nb && a < M; ++a)
        prefetch_strip(row_ptr(dt, dst, lds, a), n0 * elem_size(dt), strip_bytes);
      const float* mk = mask ? mask + m * ldm : nullptr;
      FASTPEFT_BLOCK(nb, expand_block<NB>(dt, row_ptr(dt, dst, lds, m), lds, n0, coef + m * ldc, ldc, R, rows, ldr,
                                          mk, ldm, nullptr, corr, row0 + m))
    }
    return;
  }
  for (int64_t m = 0; m < M; ++m) {  // the last, partial strip
    const float* c = coef + m * ldc;
    void* row = row_ptr(dt, dst, lds, m);
    for (int64_t n = n0; n < n0 + w; ++n) {
      float t = 0.f;
      for (int64_t j = 0; j < R; ++j) t += c[j] * rows[j * ldr + n];
      if (corr) {
        const float mk = mask[m * ldm + n - n0];
        const float e = corr->extra[(row0 + m) * corr->ld_extra + n];
        store_act1(corr->dt_out, row_ptr(corr->dt_out, corr->out, corr->ld_out, row0 + m), n,
                   load_act1(dt, row, n) + mk * t + (mk - 1.f) * e);
        continue;
      }
      if (mask) t *= mask[m * ldm + n - n0];
      store_act1(dt, row, n, load_act1(dt, row, n) + t);
    }
  }
}

static_assert(OUTER_STRIP == EXPAND_W, "combine_strip runs expand_block on whole strips");

// Rows per chunk of outer_cols' reduction: bounds its mask buffer (OUTER_ROWS * MASK_COLS floats) whatever M is.
constexpr int64_t OUTER_ROWS = outer_mask_rows;
// Columns of a row drawn at a time: one vector block of Philox calls (dropout_scale), at least 64, whole strips, and
// no wider than the caller's scratch rows (kernels.h's outer_mask_cols, the widest ISA's).
constexpr int64_t MASK_COLS = 8 * VW < 64 ? 64 : 8 * VW;
static_assert(MASK_COLS % OUTER_STRIP == 0 && MASK_COLS <= outer_mask_cols, "outer_cols' mask chunks (kernels.h)");
static_assert(outer_split_cols % OUTER_STRIP == 0, "column_passes splits columns in whole strips (kernels.h)");

// For the columns [n0, n1) of an (M, cols) problem, each column strip's dropout mask drawn once and used by both
// products, so threads own disjoint columns and nothing is reduced afterwards:
//   out[j * ldo + n] = sum_{m < M} coef[m * ldc + j] * drop(src)[m, n] for j < R   (if src: dA = g^T drop(x))
//   dst[m, n] += mask(m, n) * sum_j coef[m * ldc + j] * rows[j * cols + n]        (if dst: dx += (g A) * mask)
// drop(src)[m, n] = src[m, n] * mask(m, n), mask(m, n) = keep(m * cols + n) / (1 - p) when p > 0, else 1.
// The mask is drawn MASK_COLS columns of a row at a time (per chunk of OUTER_ROWS rows, into mask_buf:
// min(M, OUTER_ROWS) * MASK_COLS floats), whatever the ISA's strip: a strip's piece of a row is shorter than one
// vector block of Philox calls, and would leave its elements to scalar calls. With corr (p > 0), the dst update is
// written to corr's out with its correction instead (MaskedCorrection).
void outer_cols(int dt, const void* src, int64_t lds, int64_t M, int64_t cols, int64_t n0, int64_t n1,
                const float* coef, int64_t ldc, int64_t R, float p, uint32_t seed, float* out, int64_t ldo,
                int dt_dst, void* dst, int64_t ldd, const float* rows, float* mask_buf,
                const MaskedCorrection* corr) {
  const float scale = p > 0.f ? 1.f / (1.f - p) : 1.f;
  for (int64_t nc = n0; nc < n1; nc += MASK_COLS) {
    const int64_t wc = (n1 - nc) < MASK_COLS ? (n1 - nc) : MASK_COLS;
    for (int64_t m0 = 0; m0 < M || m0 == 0; m0 += OUTER_ROWS) {  // M == 0 still writes the zero sums
      const int64_t mc = (M - m0) < OUTER_ROWS ? (M - m0) : OUTER_ROWS;
      if (p > 0.f)
        for (int64_t m = 0; m < mc; ++m)
          dropout_scale(seed, (m0 + m) * cols + nc, wc, p, scale, mask_buf + m * MASK_COLS);
      const float* c = coef + m0 * ldc;
      for (int64_t n = nc; n < nc + wc; n += OUTER_STRIP) {
        const int64_t w = (nc + wc - n) < OUTER_STRIP ? (nc + wc - n) : OUTER_STRIP;
        const float* mask = p > 0.f ? mask_buf + (n - nc) : nullptr;
        if (dst)
          combine_strip(dt_dst, row_ptr(dt_dst, dst, ldd, m0), ldd, mc, n, w, c, ldc, R, rows, cols, mask,
                        MASK_COLS, corr, m0);
        if (!src) continue;
        const void* srows = row_ptr(dt, src, lds, m0);
        const bool add = m0 > 0;
        for (int64_t j = 0; j < R; j += OUTER_JB) {
          switch ((R - j) < OUTER_JB ? (R - j) : OUTER_JB) {
            case 1: outer_strip<1>(dt, srows, lds, mc, n, w, c, ldc, j, mask, MASK_COLS, add, out, ldo); break;
            case 2: outer_strip<2>(dt, srows, lds, mc, n, w, c, ldc, j, mask, MASK_COLS, add, out, ldo); break;
            case 3: outer_strip<3>(dt, srows, lds, mc, n, w, c, ldc, j, mask, MASK_COLS, add, out, ldo); break;
            default:
              outer_strip<OUTER_JB>(dt, srows, lds, mc, n, w, c, ldc, j, mask, MASK_COLS, add, out, ldo);
              break;
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ transposition
typedef float v8f __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

// dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols. 8 x 8 tiles transposed in registers (three rounds of
// shuffles, as the unpack/shuffle sequence of a hand-written AVX transpose), the edges element by element. Eight
// output rows at a time, down the whole source: output rows a power-of-two apart share cache sets, so writing to
// more of them at once evicted lines still being filled (measured: 2048 x 16 took 6x the time of 576 x 16).
void transpose_f32(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  const int64_t rows8 = rows - rows % 8, cols8 = cols - cols % 8;
  for (int64_t j0 = 0; j0 < cols8; j0 += 8) {
    for (int64_t i0 = 0; i0 < rows8; i0 += 8) {
      const float* s = src + i0 * lds + j0;
      v8f r[8], t[8], u[8];
      for (int i = 0; i < 8; ++i) r[i] = load8(s + i * lds);
      for (int i = 0; i < 8; i += 2) {
        t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
      }
      for (int h = 0; h < 8; h += 4) {
        u[h] = __builtin_shufflevector(t[h], t[h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
        u[h + 1] = __builtin_shufflevector(t[h], t[h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        u[h + 2] = __builtin_shufflevector(t[h + 1], t[h + 3], 0, 1, 8, 9, 4, 5, 12, 13);
        u[h + 3] = __builtin_shufflevector(t[h + 1], t[h + 3], 2, 3, 10, 11, 6, 7, 14, 15);
      }
      float* d = dst + j0 * ldd + i0;
      for (int c = 0; c < 4; ++c) {
        const v8f lo = __builtin_shufflevector(u[c], u[c + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        const v8f hi = __builtin_shufflevector(u[c], u[c + 4], 4, 5, 6, 7, 12, 13, 14, 15);
        __builtin_memcpy(d + c * ldd, &lo, sizeof(lo));
        __builtin_memcpy(d + (c + 4) * ldd, &hi, sizeof(hi));
      }
    }
    for (int64_t j = j0; j < j0 + 8; ++j)
      for (int64_t i = rows8; i < rows; ++i) dst[j * ldd + i] = src[i * lds + j];
  }
  for (int64_t j = cols8; j < cols; ++j)
    for (int64_t i = 0; i < rows; ++i) dst[j * ldd + i] = src[i * lds + j];
}

#undef FASTPEFT_BLOCK

// kernels.h: split_bf16_row, with the activation stores' rounding.
void split_bf16_row(const float* in, int64_t C, int parts, uint16_t* out, int64_t part_stride) {
  int64_t c = 0;
  for (; c + VW <= C; c += VW) {
    vf rest = load_f32(in + c);
    for (int i = 0; i < parts; ++i) {
      store_act(kBF16, out + i * part_stride, c, rest);
      rest -= load_act(kBF16, out + i * part_stride, c);
    }
  }
  for (; c < C; ++c) {
    float rest = in[c];
    for (int i = 0; i < parts; ++i) {
      store_act1(kBF16, out + i * part_stride, c, rest);
      rest -= load_act1(kBF16, out + i * part_stride, c);
    }
  }
}

}  // namespace
}  // namespace FASTPEFT_NS
}  // namespace fastpeft
