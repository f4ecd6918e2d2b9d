// The widened product of two bf16 matrices, C = a b^T in fp32, at the speed of the CPU's bf16 dot-product
// instructions.
//
// The product of two bf16 numbers (8-bit mantissas) is exact in fp32 (24 bits), so an fp32 GEMM on widened bf16
// operands differs from one that multiplies the bf16 operands directly and sums in fp32 only by the order of the
// sums. The second runs on oneDNN's bf16 block kernel (torch's cpublas::brgemm with B pair-interleaved: AVX512-BF16
// dot products where the CPU has them), ~4x the multiply-adds per cycle of the fp32 one on such a CPU. Torch itself
// offers bf16 x bf16 only with a bf16 result, and fp32 only on widened copies: this file is the third way.
//
// Layout: brgemm computes T (P, Q) = L (P, K) R (K, Q) with L row-major and R pair-interleaved ([K/2][Q][2]: the two
// bf16 of each pair of consecutive k side by side). For R = rhs^T with rhs a row-major (Q, K) matrix, that layout is
// rhs viewed as (Q, K/2) 32-bit words, transposed: one copy of rhs. The smaller of a and b is copied that way, so
// the copy is never bigger than the smaller operand (a weight-sized copy for an activation-sized product would be an
// N x K allocation per call); when it is a, the tiles of C^T are written back transposed.
//
// widened_mm_nn takes b as (K, N) instead (a dY W product, W (N_layer, K_layer) row-major): there the pairs are
// two consecutive rows of b, interleaved a tile of 64 columns at a time into a per-task buffer (K x 64 bf16, in L2),
// so b is read once per call and never copied whole.
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ops_shared.h"

namespace fastpeft {

namespace {

constexpr int64_t kTileRows = 64;  // rows of L per block call (64 x K bf16: 256 KiB at K = 2048, in L2)
constexpr int64_t kTileCols = 64;  // columns of T per block call (the block kernel's widest register tile)

// Pair-interleaves rows [q0, q1) of rhs (Q, K) row-major into out ([K/2][Q] 32-bit words): a transposed copy of rhs
// viewed as 32-bit words. 16 x 16 blocks keep both sides in cache lines.
void interleave_pairs(const uint16_t* rhs, int64_t ld, int64_t q0, int64_t q1, int64_t half_k, int64_t Q,
                      uint32_t* out) {
  constexpr int64_t B = 16;
  for (int64_t qb = q0; qb < q1; qb += B) {
    const int64_t qe = std::min(q1, qb + B);
    for (int64_t kb = 0; kb < half_k; kb += B) {
      const int64_t ke = std::min(half_k, kb + B);
      for (int64_t q = qb; q < qe; ++q) {
        const uint16_t* row = rhs + q * ld;
        for (int64_t kk = kb; kk < ke; ++kk) {
          uint32_t word;
          std::memcpy(&word, row + 2 * kk, sizeof(word));
          out[kk * Q + q] = word;
        }
      }
    }
  }
}

void check_bf16_rows(const char* fn, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.scalar_type() == at::kBFloat16 && t.stride(1) == 1,
              "fastpeft._C.", fn, ": ", name, " must be a 2-D bf16 CPU tensor with unit column stride, got ",
              t.scalar_type(), " of shape ", t.sizes(), " and strides ", t.strides());
}

// Both operands' layout, their inner dimensions (a's columns against b's dimension `inner`), and the CPU.
void check_operands(const char* fn, const at::Tensor& a, const at::Tensor& b, int inner) {
  check_bf16_rows(fn, a, "a");
  check_bf16_rows(fn, b, "b");
  TORCH_CHECK(a.size(1) == b.size(inner), "fastpeft._C.", fn, ": a is ", a.sizes(), " and b is ", b.sizes(),
              inner == 1 ? ": their second dimensions (K) must agree" : ": a's columns must match b's rows");
  TORCH_CHECK(widened_mm_available(), "fastpeft._C.", fn, ": oneDNN has no bf16 block kernel on this CPU");
}

// Pair-interleaves columns [c0, c0 + cn) of b (R, C) row-major, rows [0, even_r), into out ([even_r/2][64] 32-bit
// words): word (i, j) holds b[2i][c0 + j] in its low half and b[2i + 1][c0 + j] in its high half.
void interleave_rows(const uint16_t* b, int64_t ld, int64_t even_r, int64_t c0, int64_t cn, uint32_t* out) {
  for (int64_t i = 0; i < even_r / 2; ++i) {
    const uint16_t* r0 = b + (2 * i) * ld + c0;
    const uint16_t* r1 = r0 + ld;
    uint32_t* o = out + i * kTileCols;
    for (int64_t j = 0; j < cn; ++j) o[j] = uint32_t(r0[j]) | (uint32_t(r1[j]) << 16);
  }
}

}  // namespace

bool widened_mm_available() {
  // cpublas::brgemm raises where oneDNN has no bf16 block kernel for this CPU (below AVX-512) or torch runs without
  // oneDNN; one tiny call, made once, answers it.
  static const bool available = [] {
    try {
      alignas(64) at::BFloat16 a[2] = {at::BFloat16(1.0f), at::BFloat16(2.0f)};
      alignas(64) at::BFloat16 b[2] = {at::BFloat16(3.0f), at::BFloat16(4.0f)};
      float c = 0.f;
      at::native::cpublas::brgemm(1, 1, 2, 2, 1, 1, false, a, b, &c, true);
      at::native::cpublas::brgemm_release(true);
      return c == 11.0f;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return available;
}

at::Tensor widened_mm(const at::Tensor& a, const at::Tensor& b) {
  check_operands("widened_mm", a, b, 1);
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
  auto c = at::empty({M, N}, a.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return c;
  // L is the larger operand, read in place; R the smaller, pair-interleaved. T = L R^T is C, or C^T when L is b.
  const bool swapped = N > M;
  const at::Tensor& lhs = swapped ? b : a;
  const at::Tensor& rhs = swapped ? a : b;
  const int64_t P = lhs.size(0), Q = rhs.size(0), ld_l = lhs.stride(0), ld_r = rhs.stride(0);
  const int64_t even_k = K & ~int64_t(1), half_k = even_k / 2;
  const auto* L = reinterpret_cast<const at::BFloat16*>(lhs.data_ptr());
  const auto* R = reinterpret_cast<const uint16_t*>(rhs.data_ptr());
  float* C = c.data_ptr<float>();

  std::vector<uint32_t> pairs(size_t(std::max<int64_t>(1, half_k * Q)));
  if (half_k > 0) {
    at::parallel_for(0, Q, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, half_k)), [&](int64_t q0, int64_t q1) {
      interleave_pairs(R, ld_r, q0, q1, half_k, Q, pairs.data());
    });
  }
  const auto* packed = reinterpret_cast<const at::BFloat16*>(pairs.data());
  const int64_t row_tiles = (P + kTileRows - 1) / kTileRows, col_tiles = (Q + kTileCols - 1) / kTileCols;
  // About 4M multiply-adds per task: one tile at K = 2048.
  const int64_t tile_grain = std::max<int64_t>(1, (int64_t(1) << 22) / std::max<int64_t>(1, kTileRows * kTileCols * K));
  at::parallel_for(0, row_tiles * col_tiles, tile_grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> scratch(size_t(swapped ? kTileRows * kTileCols : 0));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p0 = (t / col_tiles) * kTileRows, q0 = (t % col_tiles) * kTileCols;
      const int64_t pn = std::min(kTileRows, P - p0), qn = std::min(kTileCols, Q - q0);
      // The tile of T: in place in C, or in scratch (ld kTileCols) to be written back transposed.
      float* out = swapped ? scratch.data() : C + p0 * N + q0;
      const int64_t ld_out = swapped ? kTileCols : N;
      if (half_k > 0) {
        at::native::cpublas::brgemm(pn, qn, even_k, ld_l, Q, ld_out, false, L + p0 * ld_l, packed + 2 * q0, out,
                                    true);
      } else {
        for (int64_t i = 0; i < pn; ++i) std::fill(out + i * ld_out, out + i * ld_out + qn, 0.f);
      }
      if (even_k != K) {  // odd K: the last column's rank-1 term, each product exact in fp32
        const auto* Rb = reinterpret_cast<const at::BFloat16*>(R);
        for (int64_t i = 0; i < pn; ++i) {
          const float l = static_cast<float>(L[(p0 + i) * ld_l + K - 1]);
          for (int64_t j = 0; j < qn; ++j) out[i * ld_out + j] += l * static_cast<float>(Rb[(q0 + j) * ld_r + K - 1]);
        }
      }
      if (swapped) {
        for (int64_t j = 0; j < qn; ++j)
          for (int64_t i = 0; i < pn; ++i) C[(q0 + j) * N + p0 + i] = out[i * kTileCols + j];
      }
    }
    if (half_k > 0) at::native::cpublas::brgemm_release(true);
  });
  return c;
}

at::Tensor widened_mm_nn(const at::Tensor& a, const at::Tensor& b) {
  check_operands("widened_mm_nn", a, b, 0);
  const int64_t M = a.size(0), R = a.size(1), Cn = b.size(1), ld_a = a.stride(0), ld_b = b.stride(0);
  auto c = at::empty({M, Cn}, a.options().dtype(at::kFloat));
  if (M == 0 || Cn == 0) return c;
  const int64_t even_r = R & ~int64_t(1);
  const auto* A = reinterpret_cast<const at::BFloat16*>(a.data_ptr());
  const auto* B = reinterpret_cast<const uint16_t*>(b.data_ptr());
  const auto* Bb = reinterpret_cast<const at::BFloat16*>(b.data_ptr());
  float* C = c.data_ptr<float>();
  // A task is a tile of 64 columns over a chunk of rows; chunks split the rows only when there are fewer column
  // tiles than threads (each chunk interleaves its tile of b again).
  const int64_t col_tiles = (Cn + kTileCols - 1) / kTileCols;
  const int64_t row_chunks = std::max<int64_t>(
      1, std::min<int64_t>((M + kTileRows - 1) / kTileRows, at::get_num_threads() / col_tiles));
  const int64_t chunk_rows = (M + row_chunks - 1) / row_chunks;
  at::parallel_for(0, col_tiles * row_chunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint32_t> pairs(size_t(std::max<int64_t>(1, even_r / 2) * kTileCols));
    const auto* packed = reinterpret_cast<const at::BFloat16*>(pairs.data());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c0 = (t % col_tiles) * kTileCols, cn = std::min(kTileCols, Cn - c0);
      const int64_t m_begin = (t / col_tiles) * chunk_rows, m_end = std::min(M, m_begin + chunk_rows);
      if (even_r > 0) interleave_rows(B, ld_b, even_r, c0, cn, pairs.data());
      for (int64_t m0 = m_begin; m0 < m_end; m0 += kTileRows) {
        const int64_t mn = std::min(kTileRows, m_end - m0);
        float* out = C + m0 * Cn + c0;
        if (even_r > 0) {
          at::native::cpublas::brgemm(mn, cn, even_r, ld_a, kTileCols, Cn, false, A + m0 * ld_a, packed, out, true);
        } else {
          for (int64_t i = 0; i < mn; ++i) std::fill(out + i * Cn, out + i * Cn + cn, 0.f);
        }
        if (even_r != R) {  // odd R: the last row of b's rank-1 term, each product exact in fp32
          for (int64_t i = 0; i < mn; ++i) {
            const float l = static_cast<float>(A[(m0 + i) * ld_a + R - 1]);
            for (int64_t j = 0; j < cn; ++j) out[i * Cn + j] += l * static_cast<float>(Bb[(R - 1) * ld_b + c0 + j]);
          }
        }
      }
    }
    if (even_r > 0) at::native::cpublas::brgemm_release(true);
  });
  return c;
}

}  // namespace fastpeft
