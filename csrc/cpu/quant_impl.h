// Dequantization kernels (bitsandbytes NF4/FP4 with optional double quantization, and int8 with row scales),
// compiled three times like kernels_impl.h and included right after it (it uses its vector types and helpers).
//
// Both kernels work one weight row at a time: a row is decoded into a K-float buffer that stays in L1, then either
// copied out (dequant_rows: the tiles the GEMM in ops.cpp consumes) or dotted with up to 16 activation rows
// (qgemv_rows: decoding, where the weight is read once and every other operand is tiny).
#ifndef FASTPEFT_NS
#error "include kernels_impl.h first"
#endif

namespace fastpeft {
namespace FASTPEFT_NS {
namespace {

typedef uint8_t vb __attribute__((vector_size(VW)));
typedef int8_t vsb __attribute__((vector_size(VW)));

// The 4-bit block scales of consecutive blocks from block b on, without a division per block (an integer division
// costs as much as decoding several vectors). The nested product is forced through memory so that
// -ffp-contract=fast cannot fuse it with the add (bitsandbytes and fastpeft.quant round the product first).
struct BlockScales {
  const QuantDesc& q;
  int64_t b, nested, nested_left;  // block, its nested block, blocks left in that nested block
  BlockScales(const QuantDesc& qd, int64_t first) : q(qd), b(first), nested(0), nested_left(0) {
    if (q.qabsmax) {
      nested = first / q.nested_blocksize;
      nested_left = q.nested_blocksize - first % q.nested_blocksize;
    }
  }
  float next() {
    if (!q.qabsmax) return q.absmax[b++];
    volatile float prod = q.nested_code[q.qabsmax[b++]] * q.nested_absmax[nested];
    if (--nested_left == 0) {
      ++nested;
      nested_left = q.nested_blocksize;
    }
    return prod + q.nested_offset;
  }
};

// The VW 4-bit indices stored in the VW/2 bytes at p, in element order (high nibble first): each byte is
// duplicated and widened to two 32-bit lanes, then shifted by 4 (even lanes) or 0 (odd lanes) and masked.
// Intrinsics on x86 (GCC lowers the generic byte shuffle to ~15 scalar inserts per 8 values).
inline vi nibbles(const uint8_t* p) {
  vu shift;
  for (int l = 0; l < VW; ++l) shift[l] = (l & 1) ? 0u : 4u;
#if FASTPEFT_VW == 16
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const vu w = (vu)_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));
#elif FASTPEFT_VW == 8
  int32_t four;
  __builtin_memcpy(&four, p, 4);
  const __m128i b = _mm_cvtsi32_si128(four);
  const vu w = (vu)_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));
#else
  vb raw{};
  __builtin_memcpy(&raw, p, VW / 2);
  const vb dup = {0, 0, 1, 1};
  const vu w = __builtin_convertvector(__builtin_shuffle(raw, dup), vu);
#endif
  return (vi)((w >> shift) & 15u);
}

// code[idx] per lane: one or two register permutes on AVX-512 / AVX2, a scalar loop elsewhere.
struct CodeTable {
  float code[16];
#if FASTPEFT_VW == 16
  vf t;
#elif FASTPEFT_VW == 8
  vf lo, hi;
#endif
  explicit CodeTable(const float* c) {
    __builtin_memcpy(code, c, sizeof(code));
#if FASTPEFT_VW == 16
    t = load_f32(c);
#elif FASTPEFT_VW == 8
    lo = load_f32(c);
    hi = load_f32(c + 8);
#endif
  }
  vf lookup(vi idx) const {
#if FASTPEFT_VW == 16
    return __builtin_shuffle(t, idx);
#elif FASTPEFT_VW == 8
    return __builtin_shuffle(lo, hi, idx);
#else
    vf r;
    for (int l = 0; l < VW; ++l) r[l] = code[idx[l]];
    return r;
#endif
  }
};

// Round fp32 lanes to dtype dt (round to nearest even) and widen back: what .to(dt).float() does for finite values.
inline vf round_to(int dt, vf v) {
  if (dt == kBF16) {
    const vu b = (vu)v;
    return (vf)((b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u);
  }
  if (dt == kF16) {
    _Float16 h[VW];
    narrow_f16(v, h);
    return widen_f16(h);
  }
  return v;
}
inline float round_to1(int dt, float v) {
  if (dt == kBF16) {
    uint32_t b;
    __builtin_memcpy(&b, &v, 4);
    b = (b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u;
    __builtin_memcpy(&v, &b, 4);
    return v;
  }
  if (dt == kF16) return float(_Float16(v));
  return v;
}

// round_to(round2, round_to(round1, v)): the decoded value as the reference rounds it, once to the weight's stored
// dtype and once to x's (either is a no-op for fp32).
inline vf round_decoded(const QuantDesc& q, vf v) { return round_to(q.round2, round_to(q.round1, v)); }
inline float round_decoded1(const QuantDesc& q, float v) { return round_to1(q.round2, round_to1(q.round1, v)); }

// Row n of the weight, dequantized into out[0, K) of dtype dt_out (a 16-bit out rounded to nearest even: exact where
// q.round2 is its dtype). Kept out of line: inlined into qgemv_rows, it made the compiler lay out that function's
// dense-row loop (decoding over weights read from memory) measurably slower, for one call per weight row saved.
__attribute__((noinline)) void decode_row(const QuantDesc& q, const CodeTable& table, int64_t n, int dt_out,
                                          void* out) {
  const int64_t K = q.K;
  if (q.kind == 2) {
    const int64_t elem = q.wdtype == kF32 ? 4 : 2;
    const void* row = q.data + n * q.ldw * elem;
    int64_t k = 0;
    for (; k + VW <= K; k += VW) store_act(dt_out, out, k, load_act(q.wdtype, row, k));
    for (; k < K; ++k) store_act1(dt_out, out, k, load_act1(q.wdtype, row, k));
    return;  // dense weights are used as they are (the caller rounds x to their dtype)
  }
  if (q.kind == 1) {
    const int8_t* src = reinterpret_cast<const int8_t*>(q.data) + n * K;
    const float s = q.absmax[n];
    const float inv127 = 7.874015718698502e-3f;
    const vf vs = splat(s), vinv = splat(inv127);
    int64_t k = 0;
    for (; k + VW <= K; k += VW) {
      vsb raw;
      __builtin_memcpy(&raw, src + k, VW);
      const vf w = __builtin_convertvector(__builtin_convertvector(raw, vi), vf);
      store_act(dt_out, out, k, round_decoded(q, (w * vs) * vinv));
    }
    for (; k < K; ++k) store_act1(dt_out, out, k, round_decoded1(q, (float(src[k]) * s) * inv127));
  } else {
    const int64_t i0 = n * K, i1 = i0 + K, bs = q.blocksize;
    int64_t i = i0, bend = (i0 / bs + 1) * bs;
    BlockScales scales(q, i0 / bs);
    for (; i < i1; bend += bs) {
      if (bend > i1) bend = i1;
      const float s = scales.next();
      if (i & 1) {  // a row that starts mid-byte (odd K): one low nibble, then byte-aligned
        store_act1(dt_out, out, i - i0, round_decoded1(q, table.code[q.data[i >> 1] & 15] * s));
        ++i;
      }
      const vf vs = splat(s);
      for (; i + VW <= bend; i += VW)
        store_act(dt_out, out, i - i0, round_decoded(q, table.lookup(nibbles(q.data + (i >> 1))) * vs));
      for (; i < bend; ++i) {
        const uint8_t byte = q.data[i >> 1];
        store_act1(dt_out, out, i - i0, round_decoded1(q, table.code[(i & 1) ? (byte & 15) : (byte >> 4)] * s));
      }
    }
  }
}

// Four independent accumulators hide the FMA latency.
inline float dot(const float* a, const float* b, int64_t K) {
  vf s0{}, s1{}, s2{}, s3{};
  int64_t k = 0;
  for (; k + 4 * VW <= K; k += 4 * VW) {
    s0 += load_f32(a + k) * load_f32(b + k);
    s1 += load_f32(a + k + VW) * load_f32(b + k + VW);
    s2 += load_f32(a + k + 2 * VW) * load_f32(b + k + 2 * VW);
    s3 += load_f32(a + k + 3 * VW) * load_f32(b + k + 3 * VW);
  }
  for (; k + VW <= K; k += VW) s0 += load_f32(a + k) * load_f32(b + k);
  float s = hsum((s0 + s1) + (s2 + s3));
  for (; k < K; ++k) s += a[k] * b[k];
  return s;
}

// dot(a, w) with w of dtype dt widened in registers (dense bf16/fp16 weights: no staging buffer).
inline float dot_act(const float* a, int dt, const void* w, int64_t K) {
  vf s0{}, s1{};
  int64_t k = 0;
  for (; k + 2 * VW <= K; k += 2 * VW) {
    s0 += load_f32(a + k) * load_act(dt, w, k);
    s1 += load_f32(a + k + VW) * load_act(dt, w, k + VW);
  }
  for (; k + VW <= K; k += VW) s0 += load_f32(a + k) * load_act(dt, w, k);
  float s = hsum(s0 + s1);
  for (; k < K; ++k) s += a[k] * load_act1(dt, w, k);
  return s;
}

// a . w_j + c . b_j for the four rows w_j = w + j * ldw (dtype DT, widened in registers) and, where c is given, the
// four rows b_j = b + j * R of an (N, R) fp32 matrix: one accumulator per row keeps four independent FMA chains in
// flight, where one row at a time waits on its own chain and its lane sum; the rank-R term joins the same
// accumulators before their one lane sum (a separate R-long dot per output cost as much as its lane sum).
template <int DT>
inline void dot4_rows(const float* a, const void* w, int64_t ldw, int64_t K, const float* c, const float* b,
                      int64_t R, float* out) {
  typedef typename std::conditional<DT == kF32, float, uint16_t>::type elem_t;
  const elem_t* r = static_cast<const elem_t*>(w);
  vf s0{}, s1{}, s2{}, s3{};
  int64_t k = 0;
  for (; k + VW <= K; k += VW) {
    const vf av = load_f32(a + k);
    s0 += av * load_act(DT, r, k);
    s1 += av * load_act(DT, r + ldw, k);
    s2 += av * load_act(DT, r + 2 * ldw, k);
    s3 += av * load_act(DT, r + 3 * ldw, k);
  }
  int64_t j = 0;
  if (c) {
    for (; j + VW <= R; j += VW) {
      const vf cv = load_f32(c + j);
      s0 += cv * load_f32(b + j);
      s1 += cv * load_f32(b + R + j);
      s2 += cv * load_f32(b + 2 * R + j);
      s3 += cv * load_f32(b + 3 * R + j);
    }
  }
  out[0] = hsum(s0);
  out[1] = hsum(s1);
  out[2] = hsum(s2);
  out[3] = hsum(s3);
  for (; k < K; ++k) {
    for (int i = 0; i < 4; ++i) out[i] += a[k] * load_act1(DT, r + i * ldw, k);
  }
  if (c) {
    for (; j < R; ++j) {
      for (int i = 0; i < 4; ++i) out[i] += c[j] * b[i * R + j];
    }
  }
}

inline void dot4_act(const float* a, int dt, const void* w, int64_t ldw, int64_t K, const float* c, const float* b,
                     int64_t R, float* out) {
  if (dt == kF32) return dot4_rows<kF32>(a, w, ldw, K, c, b, R, out);
  if (dt == kBF16) return dot4_rows<kBF16>(a, w, ldw, K, c, b, R, out);
  return dot4_rows<kF16>(a, w, ldw, K, c, b, R, out);
}

void dequant_rows(const QuantDesc& q, int64_t n0, int64_t n1, int dt_out, void* out, int64_t ldo) {
  const CodeTable table(q.code);
  for (int64_t n = n0; n < n1; ++n) decode_row(q, table, n, dt_out, row_ptr(dt_out, out, ldo, n - n0));
}

// Groups of four rows ahead whose bytes qgemv_rows requests before it reads them.
constexpr int64_t kGemvPrefetchGroups = 4;

// `bytes` from p on, a request per cache line, with the hint `prefetch` names (never kPrefetchNone here).
inline void request_lines(const char* p, int64_t bytes, int prefetch) {
  if (prefetch == kPrefetchL2) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 2);
  } else {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 0);
  }
}

void qgemv_rows(const QuantDesc& q, int64_t n0, int64_t n1, const float* x, int64_t M, float* y, int64_t ldy,
                const float* bias, const float* xs, const float* B, int64_t R, float lora_scale, float* buf,
                int prefetch) {
  const CodeTable table(q.code);
  const int64_t K = q.K;
  // Dense rows are read where they lie: fp32 directly, bf16/fp16 widened in registers for M <= 2, where one
  // pass over the row per activation row is cheaper than staging it (for more rows, staging reads it once).
  const bool direct = q.kind == 2 && (q.wdtype == kF32 || M <= 2);
  const int64_t elem = q.wdtype == kF32 ? 4 : 2;
  // y[m, n] = acc + bias[n] + lora_scale * xs[m] . B[n]; the rank-R dot in vectors (a scalar loop is one
  // dependent chain of R FMAs per output, which cost as much as the row's whole weight dot at K ~ 2048).
  auto finish = [&](int64_t m, int64_t n, float acc) {
    if (bias) acc += bias[n];
    if (xs) acc += lora_scale * dot(xs + m * R, B + n * R, R);
    y[m * ldy + n] = acc;
  };
  int64_t n = n0;
  if (direct) {
    float acc4[4];
    // lora_scale * xs in buf (unused by dense rows read in place), so the four-row dots take the rank-R term in.
    const bool folded = xs && M * R <= K + 64;
    if (folded)
      for (int64_t i = 0; i < M * R; ++i) buf[i] = lora_scale * xs[i];
    const int64_t row_bytes = K * elem;
    for (; n + 4 <= n1; n += 4) {
      const void* rows = q.data + n * q.ldw * elem;
      // Decoding reads every weight row once, from memory: the hardware prefetcher restarts at each 4 KiB page
      // (a few rows), so the rows kGemvPrefetchGroups groups ahead are requested here.
      if (prefetch != kPrefetchNone && n + 4 * (kGemvPrefetchGroups + 1) <= n1) {
        const char* ahead = static_cast<const char*>(rows) + 4 * kGemvPrefetchGroups * q.ldw * elem;
        for (int j = 0; j < 4; ++j) request_lines(ahead + j * q.ldw * elem, row_bytes, prefetch);
        if (B)  // and the adapters' rows of B for those outputs
          request_lines(reinterpret_cast<const char*>(B + (n + 4 * kGemvPrefetchGroups) * R), 4 * R * 4, prefetch);
      }
      for (int64_t m = 0; m < M; ++m) {
        if (folded) {  // the rank-R term inside the rows' dots: only the bias is left to add
          dot4_act(x + m * K, q.wdtype, rows, q.ldw, K, buf + m * R, B + n * R, R, acc4);
          for (int j = 0; j < 4; ++j) y[m * ldy + n + j] = bias ? acc4[j] + bias[n + j] : acc4[j];
        } else {
          dot4_act(x + m * K, q.wdtype, rows, q.ldw, K, nullptr, nullptr, 0, acc4);
          for (int j = 0; j < 4; ++j) finish(m, n + j, acc4[j]);
        }
      }
    }
  }
  for (; n < n1; ++n) {
    const void* row = q.data + n * q.ldw * elem;
    if (!direct) decode_row(q, table, n, kF32, buf);
    for (int64_t m = 0; m < M; ++m) {
      finish(m, n, !direct ? dot(x + m * K, buf, K)
                   : q.wdtype == kF32 ? dot(x + m * K, static_cast<const float*>(row), K)
                                      : dot_act(x + m * K, q.wdtype, row, K));
    }
  }
}

}  // namespace
}  // namespace FASTPEFT_NS
}  // namespace fastpeft
