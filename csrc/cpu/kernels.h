// fastpeft CPU kernels: the torch-free interface between the SIMD translation units and the torch bindings.
//
// Every kernel works on a range of rows [m0, m1) so that the caller (ops.cpp) owns threading through
// at::parallel_for; kernels never allocate. Activations (x, y, dy, dx) are raw row-major rows with a leading
// dimension and a dtype code; adapter matrices are always passed as contiguous fp32 (they are tiny: r x K).
// All arithmetic is fp32.
#pragma once
#include <cstdint>
#include <type_traits>

namespace fastpeft {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// How the decoding GEMV requests dense weight rows ahead of the ones it reads: not at all (the hardware prefetcher
// alone), with the non-temporal hint, or into L2 (prefetcht1).
enum GemvPrefetch : int { kPrefetchNone = 0, kPrefetchNonTemporal = 1, kPrefetchL2 = 2 };

// A quantized (N, K) base weight in bitsandbytes' canonical layout (see fastpeft/quant.py), described without a copy.
// Dequantized value of element i = n*K + k (flattened row-major):
//   4-bit: code[nibble(i)] * scale(i / blocksize), nibble(i) = high nibble of data[i/2] for even i, else low;
//          scale(b) = absmax[b], or under double quantization nested_code[qabsmax[b]] * nested_absmax[b /
//          nested_blocksize] + nested_offset (fp32, in that order, no fused multiply-add: bit-equal to bitsandbytes);
//   int8:  (float(data[i]) * absmax[n]) * (1/127 as bitsandbytes' fp32 constant).
// then rounded to round1 and then to round2 (dtype codes; kF32 = no rounding): the weight's own dtype, then the
// activation dtype, as the reference's dequantize().to(x.dtype) does.
//
// kind 2 is a plain dense weight (data: rows of dtype wdtype with row stride ldw elements), so the decoding GEMV
// below also serves small-M dense products with the LoRA term fused in.
struct QuantDesc {
  int kind;  // 0: 4-bit code table, 1: int8 with row scales, 2: dense
  int wdtype;   // kind 2: DType of the rows
  int64_t ldw;  // kind 2: row stride in elements
  int64_t N, K;
  const uint8_t* data;           // 4-bit: ceil(N*K/2) packed bytes; int8: N*K bytes (int8 values)
  const float* absmax;           // 4-bit, not nested: (nblocks,); int8: SCB (N,)
  const uint8_t* qabsmax;        // 4-bit nested: (nblocks,) indices into nested_code, else null
  const float* nested_absmax;    // (ceil(nblocks / nested_blocksize),)
  const float* nested_code;      // (256,)
  float nested_offset;
  int64_t nested_blocksize;
  int64_t blocksize;
  float code[16];
  int round1, round2;
};

// outer_cols draws its dropout masks in chunks of at most outer_mask_rows rows of at most outer_mask_cols columns
// (the widest ISA's chunk: one AVX-512 block of Philox calls, 16 calls of 8 elements): its scratch is
// min(M, outer_mask_rows) * outer_mask_cols floats. A chunk of 64 rows keeps its mask (32 KB) and its rows of x and
// dx in L1 and L2 while every strip of the chunk reads them again; much taller chunks spill them out of L2 on wide
// layers (BENCHMARKS.md times both). Threads split the columns in units of outer_split_cols (whole strips of every
// ISA): smaller than a mask chunk, so that two threads share a few hundred columns evenly.
constexpr int64_t outer_mask_rows = 64, outer_mask_cols = 128, outer_split_cols = 64;

// xa_rows_t stages at most down_t_rows rows of down_t_chunk elements each (the widest ISA's row block): its scratch
// is down_t_rows * down_t_chunk floats.
constexpr int64_t down_t_rows = 16, down_t_chunk = 256;

// dy_outer_cols widens at most outer_rows_max rows of 16-bit dy at a time (its row block).
constexpr int64_t outer_rows_max = 8;

// Where outer_cols' masked dst update goes instead of dst itself (DoRA's dropout correction of dX in the same pass):
//   out[m, n] = round(dst[m, n] + mask(m, n) * t(m, n) + (mask(m, n) - 1) * extra[m, n]) in dt_out,
// t the adapter term, mask(m, n) = keep / (1 - p) as in outer_cols; extra: (M, cols) fp32 rows ld_extra apart; dst is
// only read.
struct MaskedCorrection {
  const float* extra;
  int64_t ld_extra;
  int dt_out;
  void* out;
  int64_t ld_out;
};

struct KernelTable {
  const char* isa;  // "avx512", "avx2" or "generic"

  // out[i] = (uniform(seed, offset0 + i) >= p) ? scale : 0, for i < n. The canonical fastpeft mask (fastpeft._philox:
  // half o % 2 of word (o / 2) % 4 of the Philox call on counter o / 8), bit-exact with the Triton and CUDA kernels.
  void (*dropout_scale)(uint32_t seed, int64_t offset0, int64_t n, float p, float scale, float* out);

  // xa[m, j] = sum_k drop(x)[m, k] * A[j, k] for m in [m0, m1); A: (r, K) fp32; xa: (M, r) fp32 with row stride ldxa.
  // drop(x)[m, k] = x[m, k] * keep(m*K + k) / (1 - p) (identity when p == 0). buf: 4K floats of scratch.
  void (*xa_rows)(int dt, const void* x, int64_t ldx, int64_t K, int64_t m0, int64_t m1, const float* A, int64_t r,
                  float p, uint32_t seed, float* xa, int64_t ldxa, float* buf);

  // One pass over dy rows: g[m, j] = svec[j] * sum_n dy[m, n] Bt[j, n]. buf: 4N floats of scratch.
  void (*dy_rows)(int dt, const void* dy, int64_t lddy, int64_t N, int64_t m0, int64_t m1, const float* Bt, int64_t R,
                  const float* svec, float* g, float* buf);
  // The same pass as sums of outer products, one sweep for both of its products, over the columns [n0, n1) of dy
  // (M, N) (rows of dtype dt, lddy apart; threads split the columns):
  //   g[m * R + j] = sum_{n0 <= n < n1} dy[m, n] B[n * R + j] for m < M        (written: the range's share of g)
  //   dB[n * R + j] = sum_{m < M} dy[m, n] xs[m * R + j] for n in [n0, n1)      (written; rows summed in order)
  //   colsum[n] = sum_{m < M} dy[m, n] for n in [n0, n1)                         (written, rows in order; if colsum)
  // B (N, R), xs (M, R) (svec folded in), g (M, R), dB (N, R): fp32 rows. R must be vector_width or twice it (the
  // caller checks: ops.cpp's dy_outer_takes). buf: outer_rows_max * (n1 - n0) floats (16-bit dy).
  void (*dy_outer_cols)(int dt, const void* dy, int64_t lddy, int64_t M, int64_t n0, int64_t n1, const float* B,
                        int64_t R, const float* xs, float* g, float* dB, float* colsum, float* buf);
  // y[m, n] = round(y[m, n] + bias[n] + sum_{j < R} c[m * ldc + j] rows[j, n]) in y's dtype dt, for m in [m0, m1),
  // n < N: the dropout-free epilogue (c = xs, rows = B^T) and dx update (c = g, rows = A), row by row. rows: (R, N)
  // fp32 contiguous; bias: (N,) fp32 or null.
  void (*expand_rows)(int dt, void* y, int64_t ldy, int64_t N, int64_t m0, int64_t m1, const float* c, int64_t ldc,
                      int64_t R, const float* rows, const float* bias);

  // For the columns [n0, n1) of an (M, cols) problem (threads split the columns, nothing is reduced), each column
  // strip's dropout mask drawn once and used by both products:
  //   out[j * ldo + n] = sum_m coef[m * ldc + j] * drop(src)[m, n] for j < R   (if src; dB^T = xa^T dy, dA = g^T x)
  //   dst[m, n] += mask(m, n) * sum_j coef[m * ldc + j] * rows[j * cols + n]  (if dst; in place, rounded once to
  //                                                                              dt_dst: dx += (g A) * mask)
  // src/dst: rows of dtype dt/dt_dst, lds/ldd apart; rows: (R, cols) fp32; drop(src) = src * mask, mask(m, n) =
  // keep(m * cols + n) / (1 - p) when p > 0, else 1. mask_buf: min(M, outer_mask_rows) *
  // outer_mask_cols floats of scratch (when p > 0).
  // corr: null, or where the dst update goes instead (MaskedCorrection; dst then only read).
  void (*outer_cols)(int dt, const void* src, int64_t lds, int64_t M, int64_t cols, int64_t n0, int64_t n1,
                     const float* coef, int64_t ldc, int64_t R, float p, uint32_t seed, float* out, int64_t ldo,
                     int dt_dst, void* dst, int64_t ldd, const float* rows, float* mask_buf,
                     const MaskedCorrection* corr);
  // Row n - n0 of out (dtype dt_out, row stride ldo elements) = dequantized w[n, :] rounded per q.round1/round2,
  // for n in [n0, n1), stored to a bf16/fp16 out with round-to-nearest-even (exact when q.round2 is out's dtype).
  void (*dequant_rows)(const QuantDesc& q, int64_t n0, int64_t n1, int dt_out, void* out, int64_t ldo);

  // The decoding GEMV, for n in [n0, n1) and every m < M (x: (M, K) fp32 contiguous):
  //   y[m * ldy + n] = sum_k x[m, k] w[n, k] + bias[n] + lora_scale * sum_j xs[m, j] B[n, j]
  // with w dequantized one row at a time into buf (K + 64 floats, stays in L1) and never stored elsewhere; a dense
  // weight's rows are read in place, and buf holds lora_scale * xs instead where M * R <= K + 64.
  // bias: (N,) fp32 or null; xs: (M, R) fp32 (LoRA down-projection, already scaled) and B: (N, R) fp32, or null.
  // prefetch (a GemvPrefetch): how rows of a dense weight ahead of the one being read are requested. Which is fastest
  // depends on the CPU's caches (a non-temporal request lands in L1 alone on some, which a far-ahead request then
  // leaves before it is read), so the caller measures it (fastpeft.routing, op gemv_prefetch).
  void (*qgemv_rows)(const QuantDesc& q, int64_t n0, int64_t n1, const float* x, int64_t M, float* y, int64_t ldy,
                     const float* bias, const float* xs, const float* B, int64_t R, float lora_scale, float* buf,
                     int prefetch);

  // out[m, n] = round(add(m, n) + z[m, n] * scale[n]) in dt_out (fp32 arithmetic) for m in [m0, m1), n < N; add is
  // null, one (N,) row (ldadd 0) or (M, N) rows of dtype dt_add. DoRA's column scaling of an (M, N) tensor.
  void (*scale_columns_rows)(int dt_z, const void* z, int64_t ldz, int64_t N, int64_t m0, int64_t m1,
                             const float* scale, int dt_add, const void* add, int64_t ldadd, int dt_out, void* out,
                             int64_t ldo);
  // acc[n - n0] += sum_{m < M} a[m, n] b[m, n] for n in [n0, n1), fp32, rows in order. DoRA's magnitude gradient.
  void (*column_dots_cols)(int dt_a, const void* a, int64_t lda, int dt_b, const void* b, int64_t ldb, int64_t M,
                           int64_t n0, int64_t n1, float* acc);
  // y[n] = y[n] + bias[n] + sum_j xs[j] B[n, j] for n < N, in place, rounded once to y's dtype: one activation row
  // (dtype dt) expanded with B (N, R) fp32 as PEFT keeps it; R must be a multiple of vector_width. bias: (N,) or null.
  void (*expand_row_b)(int dt, void* y, int64_t N, const float* xs, int64_t R, const float* B, const float* bias);
  // Floats per vector of this code path (16 avx512, 8 avx2, 4 generic).
  int vector_width;

  // dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols (fp32; the adapters' B to the B^T the passes stream).
  void (*transpose_f32)(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd);

  // out[m, n] = round(a[m, n] + b[m, n] * (keep(m * N + n) ? kept : dropped)) in dt_out (fp32 arithmetic) for m in
  // [m0, m1), n < N; keep is dropout_scale's mask for seed and p; a null reads as 0; dropped == 0 writes +0 whatever
  // b holds; out may be a. A dropped copy of x (DoRA's second base product) and DoRA's dropout correction of dX.
  void (*masked_combine_rows)(int dt_a, const void* a, int64_t lda, int dt_b, const void* b, int64_t ldb, int64_t N,
                              int64_t m0, int64_t m1, uint32_t seed, float p, float kept, float dropped, int dt_out,
                              void* out, int64_t ldo);
  // DoRA's forward epilogue, rows [m0, m1): u = h[m] Bt (h (M, R) ldh apart, Bt (R, N) fp32 contiguous),
  // z[m] = zin[m] + k u (fp32; z may be zin: in place), out[m] = round(base[m] + s u + f * z[m] + bias) in dt_out
  // (fp32 arithmetic; out may be base), or round(f * z[m] + bias) where base is null; f (N,) fp32, bias (N,) fp32
  // or null, base fp32 rows or null.
  void (*dora_epilogue_rows)(const float* zin, int64_t ldzi, float* z, int64_t ldz, const float* base, int64_t ldb,
                             int64_t N, int64_t m0, int64_t m1, const float* h, int64_t ldh, int64_t R,
                             const float* Bt, float k, float s, const float* f, const float* bias, int dt_out,
                             void* out, int64_t ldo);

  // Part i of in[0, C) fp32 as bf16 bits at out + i * part_stride, for i < parts: part 0 is the value rounded to bf16
  // (to nearest even, NaN kept), each next part the rounded remainder the parts before it left, so three parts hold
  // all 24 significant bits of an fp32 value exactly (split_products.cpp).
  void (*split_bf16_row)(const float* in, int64_t C, int parts, uint16_t* out, int64_t part_stride);

  // xa_rows with A given transposed and padded: At (K, RP) fp32, RP a multiple of vector_width >= r, columns past r
  // zero. The same products summed in another order: each rank's in k order (xa_rows sums vector_width strided
  // partials, then those). buf: down_t_rows * down_t_chunk floats of scratch.
  void (*xa_rows_t)(int dt, const void* x, int64_t ldx, int64_t K, int64_t m0, int64_t m1, const float* At, int64_t r,
                    int64_t RP, float p, uint32_t seed, float* xa, int64_t ldxa, float* buf);
  // DoRA's backward prologue for the columns [n0, n1): dots[n - n0] += sum_m dy[m, n] z[m, n] (if z; column_dots_cols'
  // sums) and, in dy's dtype dt, ge[m, n] = round(dy[m, n] scale[n]) and (with_e) ge[M + m, n] = round(dy[m, n]
  // (scale[n] - 1)) (scale_columns_rows' roundings): one pass over dy for what took three.
  void (*dora_prologue_cols)(int dt, const void* dy, int64_t lddy, int dt_z, const void* z, int64_t ldz, int64_t M,
                             int64_t n0, int64_t n1, const float* scale, float* dots, void* ge, int64_t ldge,
                             bool with_e);
};

const KernelTable& kernels_generic();
const KernelTable& kernels_avx2();
const KernelTable& kernels_avx512();

}  // namespace fastpeft
