// Widened products of bf16 matrices, a b^T or a b in fp32, at the speed of the CPU's bf16 dot-product instructions.
//
// The product of two bf16 numbers (8-bit mantissas) is exact in fp32 (24 bits), so an fp32 GEMM on widened bf16
// operands differs from one that multiplies the bf16 operands directly and sums in fp32 only by the order of the
// sums. The second runs on oneDNN's bf16 block kernel (torch's cpublas::brgemm with B pair-interleaved: AVX512-BF16
// dot products where the CPU has them), ~4x the multiply-adds per cycle of the fp32 one on such a CPU. Torch itself
// offers bf16 x bf16 only with a bf16 result, and fp32 only on widened copies: this file is the third way.
//
// Layout: brgemm computes T (M, n) = a (M, K) B (K, n) with a row-major (read in place) and B pair-interleaved
// ([K/2][n][2]: the two bf16 of each pair of consecutive k side by side). A task owns a tile of 64 output columns
// over a chunk of rows: it interleaves that tile of b into its own buffer (K x 64 bf16, 256 KiB at K = 2048, in L2)
// and runs the block kernel down its rows. b is read once per call (again per row chunk, only when there are fewer
// column tiles than threads) and never copied whole: a weight-sized copy would be an N x K allocation per call.
//   - widened_mm, b (N, K) row-major (a x W^T product): a pair is one 32-bit load from a row of b; with interleave_a,
//     a is interleaved whole instead and b read in place (pair_product_packing_a), cheaper for a few rows of a;
//   - widened_mm_nn, b (K, N) row-major (a dY W product, W (N_layer, K_layer)): a pair is two consecutive rows of b;
//   - widened_mm_parts, several a_i times one b (either layout): each tile of b is interleaved once for all of them
//     (DoRA's x W^T and drop(x) W^T).
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ops_shared.h"

namespace fastpeft {

namespace {

constexpr int64_t kTileRows = 64;  // rows of a per block call
constexpr int64_t kTileCols = 64;  // output columns per tile (the block kernel's widest register tile)

// b (N, K) row-major: out word (i, j) = b[c0 + j][2i], b[c0 + j][2i + 1], rows of out ld_out words apart. 16 x 16
// blocks keep both sides in cache.
void pairs_along_rows(const uint16_t* b, int64_t ld, int64_t even_k, int64_t c0, int64_t cn, uint32_t* out,
                      int64_t ld_out = kTileCols) {
  constexpr int64_t B = 16;
  const int64_t half_k = even_k / 2;
  for (int64_t jb = 0; jb < cn; jb += B) {
    const int64_t je = std::min(cn, jb + B);
    for (int64_t kb = 0; kb < half_k; kb += B) {
      const int64_t ke = std::min(half_k, kb + B);
      for (int64_t j = jb; j < je; ++j) {
        const uint16_t* row = b + (c0 + j) * ld;
        for (int64_t i = kb; i < ke; ++i) {
          uint32_t word;
          std::memcpy(&word, row + 2 * i, sizeof(word));
          out[i * ld_out + j] = word;
        }
      }
    }
  }
}

// b (K, N) row-major: out word (i, j) = b[2i][c0 + j], b[2i + 1][c0 + j].
void pairs_across_rows(const uint16_t* b, int64_t ld, int64_t even_k, int64_t c0, int64_t cn, uint32_t* out) {
  for (int64_t i = 0; i < even_k / 2; ++i) {
    const uint16_t* r0 = b + (2 * i) * ld + c0;
    const uint16_t* r1 = r0 + ld;
    uint32_t* o = out + i * kTileCols;
    for (int64_t j = 0; j < cn; ++j) o[j] = uint32_t(r0[j]) | (uint32_t(r1[j]) << 16);
  }
}

// Both operands' layout, their inner dimensions (a's columns against b's dimension `inner`), and the CPU.
void check_operands(const char* fn, const at::Tensor& a, const at::Tensor& b, int inner) {
  check_bf16_rows(fn, a, "a");
  check_bf16_rows(fn, b, "b");
  TORCH_CHECK(a.size(1) == b.size(inner), "fastpeft._C.", fn, ": a is ", a.sizes(), " and b is ", b.sizes(),
              inner == 1 ? ": their second dimensions (K) must agree" : ": a's columns must match b's rows");
  TORCH_CHECK(widened_mm_available(), "fastpeft._C.", fn, ": oneDNN has no bf16 block kernel on this CPU");
}

// C_i (M_i, N) fp32 = a_i (M_i, K) B (K, N) for every a_i, B given by `b` (bf16) and `transposed_b` (b is (N, K),
// else (K, N)). The a_i are one operand of sum M_i rows to the tiling (a tile of rows never spans two of them), so
// each tile of b is interleaved once for all of them: several products with one weight read it once.
std::vector<at::Tensor> pair_product(const std::vector<at::Tensor>& as, const at::Tensor& b, bool transposed_b) {
  const int64_t K = as[0].size(1), N = transposed_b ? b.size(0) : b.size(1), ld_b = b.stride(0);
  const size_t parts = as.size();
  std::vector<at::Tensor> cs;
  std::vector<int64_t> first_row(parts + 1, 0);  // part i holds rows [first_row[i], first_row[i + 1])
  for (size_t i = 0; i < parts; ++i) {
    cs.push_back(at::empty({as[i].size(0), N}, as[i].options().dtype(at::kFloat)));
    first_row[i + 1] = first_row[i] + as[i].size(0);
  }
  const int64_t M = first_row[parts];
  if (M == 0 || N == 0) return cs;
  const int64_t even_k = K & ~int64_t(1);
  const auto* Bw = reinterpret_cast<const uint16_t*>(b.data_ptr());
  const auto* Bv = reinterpret_cast<const at::BFloat16*>(b.data_ptr());
  // b's element (k, n) of B, for the odd-K tail.
  auto b_at = [&](int64_t k, int64_t n) {
    return static_cast<float>(transposed_b ? Bv[n * ld_b + k] : Bv[k * ld_b + n]);
  };
  const int64_t col_tiles = (N + kTileCols - 1) / kTileCols;
  const int64_t row_chunks = std::max<int64_t>(
      1, std::min<int64_t>((M + kTileRows - 1) / kTileRows, at::get_num_threads() / col_tiles));
  const int64_t chunk_rows = (M + row_chunks - 1) / row_chunks;
  at::parallel_for(0, col_tiles * row_chunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint32_t> pairs(size_t(std::max<int64_t>(1, even_k / 2) * kTileCols));
    const auto* packed = reinterpret_cast<const at::BFloat16*>(pairs.data());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c0 = (t % col_tiles) * kTileCols, cn = std::min(kTileCols, N - c0);
      const int64_t m_begin = (t / col_tiles) * chunk_rows, m_end = std::min(M, m_begin + chunk_rows);
      if (even_k > 0) {
        if (transposed_b) {
          pairs_along_rows(Bw, ld_b, even_k, c0, cn, pairs.data());
        } else {
          pairs_across_rows(Bw, ld_b, even_k, c0, cn, pairs.data());
        }
      }
      size_t part = 0;
      for (int64_t m0 = m_begin; m0 < m_end;) {
        while (first_row[part + 1] <= m0) ++part;
        const int64_t mn = std::min({kTileRows, m_end - m0, first_row[part + 1] - m0}), row = m0 - first_row[part];
        const int64_t ld_a = as[part].stride(0);
        const auto* A = reinterpret_cast<const at::BFloat16*>(as[part].data_ptr()) + row * ld_a;
        float* out = cs[part].data_ptr<float>() + row * N + c0;
        if (even_k > 0) {
          at::native::cpublas::brgemm(mn, cn, even_k, ld_a, kTileCols, N, false, A, packed, out, true);
        } else {
          for (int64_t i = 0; i < mn; ++i) std::fill(out + i * N, out + i * N + cn, 0.f);
        }
        if (even_k != K) {  // odd K: the last column's rank-1 term, each product exact in fp32
          for (int64_t i = 0; i < mn; ++i) {
            const float l = static_cast<float>(A[i * ld_a + K - 1]);
            for (int64_t j = 0; j < cn; ++j) out[i * N + j] += l * b_at(K - 1, c0 + j);
          }
        }
        m0 += mn;
      }
    }
    if (even_k > 0) at::native::cpublas::brgemm_release(true);
  });
  return cs;
}

// C (M, N) fp32 = a (M, K) b^T for b (N, K), with a interleaved whole ([K/2][M] words, activation-sized) and b read
// in place as the block kernel's row-major operand: each tile is C^T's, written back transposed. Nothing of b's
// size is rearranged, which at a few rows of a is most of the work the tiled form does.
at::Tensor pair_product_packing_a(const at::Tensor& a, const at::Tensor& b) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(0), ld_a = a.stride(0), ld_b = b.stride(0);
  auto c = at::empty({M, N}, a.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return c;
  const int64_t even_k = K & ~int64_t(1);
  const auto* Av = reinterpret_cast<const at::BFloat16*>(a.data_ptr());
  const auto* Bv = reinterpret_cast<const at::BFloat16*>(b.data_ptr());
  float* C = c.data_ptr<float>();
  std::vector<uint32_t> pairs(size_t(std::max<int64_t>(1, even_k / 2 * M)));
  if (even_k > 0) {
    at::parallel_for(0, M, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, even_k)), [&](int64_t m0, int64_t m1) {
      pairs_along_rows(reinterpret_cast<const uint16_t*>(a.data_ptr()), ld_a, even_k, m0, m1 - m0, pairs.data() + m0,
                       M);
    });
  }
  const auto* packed = reinterpret_cast<const at::BFloat16*>(pairs.data());
  const int64_t row_tiles = (N + kTileRows - 1) / kTileRows, col_tiles = (M + kTileCols - 1) / kTileCols;
  at::parallel_for(0, row_tiles * col_tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> tile(size_t(kTileRows * kTileCols));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = (t / col_tiles) * kTileRows, m0 = (t % col_tiles) * kTileCols;
      const int64_t nn = std::min(kTileRows, N - n0), mn = std::min(kTileCols, M - m0);
      if (even_k > 0) {
        at::native::cpublas::brgemm(nn, mn, even_k, ld_b, M, kTileCols, false, Bv + n0 * ld_b, packed + 2 * m0,
                                    tile.data(), true);
      } else {
        std::fill(tile.begin(), tile.end(), 0.f);
      }
      if (even_k != K) {  // odd K: the last column's rank-1 term, each product exact in fp32
        for (int64_t i = 0; i < nn; ++i) {
          const float l = static_cast<float>(Bv[(n0 + i) * ld_b + K - 1]);
          for (int64_t j = 0; j < mn; ++j)
            tile[i * kTileCols + j] += l * static_cast<float>(Av[(m0 + j) * ld_a + K - 1]);
        }
      }
      for (int64_t j = 0; j < mn; ++j)
        for (int64_t i = 0; i < nn; ++i) C[(m0 + j) * N + n0 + i] = tile[i * kTileCols + j];
    }
    if (even_k > 0) at::native::cpublas::brgemm_release(true);
  });
  return c;
}

}  // namespace

void check_bf16_rows(const char* fn, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.scalar_type() == at::kBFloat16 &&
                  (t.stride(1) == 1 || t.numel() == 0),  // an empty tensor's strides are never used
              "fastpeft._C.", fn, ": ", name, " must be a 2-D bf16 CPU tensor with unit column stride, got ",
              t.scalar_type(), " of shape ", t.sizes(), " and strides ", t.strides());
}

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

at::Tensor widened_mm(const at::Tensor& a, const at::Tensor& b, bool interleave_a) {
  check_operands("widened_mm", a, b, 1);
  return interleave_a ? pair_product_packing_a(a, b) : pair_product({a}, b, true)[0];
}

at::Tensor widened_mm_nn(const at::Tensor& a, const at::Tensor& b) {
  check_operands("widened_mm_nn", a, b, 0);
  return pair_product({a}, b, false)[0];
}

std::vector<at::Tensor> widened_mm_parts(const std::vector<at::Tensor>& as, const at::Tensor& b, bool transposed_b) {
  TORCH_CHECK(!as.empty(), "fastpeft._C.widened_mm_parts: give at least one a");
  for (const auto& a : as) check_operands("widened_mm_parts", a, b, transposed_b ? 1 : 0);
  return pair_product(as, b, transposed_b);
}

}  // namespace fastpeft
