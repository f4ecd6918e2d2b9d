// The adapter products of a bf16 layer with fp32 adapters (PEFT's default) on the CPU's bf16 dot-product units,
// at fp32 accuracy.
//
// Every fp32 operand of an adapter product (A, B, h = x A^T, g = s dY B) is split exactly into bf16 parts: the
// first part is the value rounded to bf16, each next part the rounded remainder (8 more significant bits each), so
// three parts hold all 24 bits of an fp32 value. The bf16 activations (x, dY) need no split. A product of a bf16
// activation with the three parts, each product exact in fp32 and the sums in fp32 (widened_mm / widened_mm_nn over
// oneDNN's bf16 block kernel, AMX where the CPU has it), is the fp32 product up to the order of the sums, at the bf16
// units' speed instead of the fp32 FMA's:
//   h = x A^T            = sum_i x P_i(A)^T             (fp32 result, saved for backward)
//   g = s dY B           = s sum_i dY P_i(B^T)^T
//   dB^T = s h^T dY      = s sum_i P_i(h^T) dY          and db = s 1^T dY from a row of ones beside the parts
//   dA = g^T x           = sum_i P_i(g^T) x
// The updates of the bf16 outputs (y += s h B^T, dX += g A) are left to the caller: they are bound by the pass over
// the (M, N) output, not by their multiply-adds.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ops_shared.h"

namespace fastpeft {

namespace {

// The kernels' split_bf16_row over the rows of src (rows, C) fp32 contiguous into dst (parts blocks of (rows, C),
// part_stride apart).
void split_into(const float* src, int64_t rows, int64_t C, int parts, uint16_t* dst, int64_t part_stride) {
  const KernelTable& k = active_kernels();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) k.split_bf16_row(src + r * C, C, parts, dst + r * C, part_stride);
  });
}

// t (R, C) fp32, or with `transposed` t (C, R) and its transpose split: bf16 (parts * R + ones, C) contiguous, rows
// [P_0(t); ...; P_{parts-1}(t)] and, with `ones`, a last row of ones.
at::Tensor split_parts(const at::Tensor& t, int parts, bool transposed, bool ones) {
  const at::Tensor tc = transposed ? t.to(at::kFloat).t().contiguous() : contiguous_f32(t);
  const int64_t R = tc.size(0), C = tc.size(1);
  auto out = at::empty({parts * R + (ones ? 1 : 0), C}, at::kBFloat16);
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  split_into(tc.data_ptr<float>(), R, C, parts, dst, R * C);
  if (ones) out.select(0, parts * R).fill_(1.0);
  return out;
}

// out (n0, n1) fp32 = scale * (part 0 + (part 1 + part 2)), or scale * (part 0 + part 1) with two parts, part i of
// element (a, b) at P[a * lda + b + i * step]: the partial products of the split parts, the small ones summed first.
// The parts lie side by side in P's columns (P (rows, parts * r): n1 = r, lda = parts * r, step = r) or stacked in
// its rows (P (parts * r (+ 1), cols): n0 = r, lda = cols, step = r * cols).
at::Tensor sum_parts(const at::Tensor& P, int64_t n0, int64_t n1, int64_t lda, int64_t step, float scale,
                     int parts = 3) {
  auto out = at::empty({n0, n1}, at::kFloat);
  const float* p = P.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < n0; ++i) {
    const float* row = p + i * lda;
    if (parts == 2) {
      for (int64_t j = 0; j < n1; ++j) o[i * n1 + j] = scale * (row[j] + row[step + j]);
    } else {
      for (int64_t j = 0; j < n1; ++j) o[i * n1 + j] = scale * (row[j] + (row[step + j] + row[2 * step + j]));
    }
  }
  return out;
}

// check_bf16_rows' layout, and `cols` columns.
void check_bf16_activation(const at::Tensor& t, const char* fn, const char* name, int64_t cols) {
  check_bf16_rows(fn, t, name);
  TORCH_CHECK(t.size(1) == cols, "fastpeft._C.", fn, ": ", name, " must have ", cols, " columns, got ", t.sizes());
}

void check_adapter(const at::Tensor& t, const char* fn, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.scalar_type() == at::kFloat && t.size(0) == rows &&
                  t.size(1) == cols,
              "fastpeft._C.", fn, ": ", name, " must be fp32 (", rows, ", ", cols, "), got ", t.scalar_type(), " ",
              t.sizes());
}

}  // namespace

at::Tensor lora_xa_split(const at::Tensor& x, const at::Tensor& A, int64_t parts) {
  TORCH_CHECK(A.dim() == 2, "fastpeft._C.lora_xa_split: A must be (r, K), got ", A.sizes());
  TORCH_CHECK(parts == 2 || parts == 3, "fastpeft._C.lora_xa_split: parts must be 2 or 3, got ", parts);
  const int64_t r = A.size(0), K = A.size(1);
  check_adapter(A, "lora_xa_split", "A", r, K);
  check_bf16_activation(x, "lora_xa_split", "x", K);
  if (x.size(0) == 0 || r == 0) return at::zeros({x.size(0), r}, at::kFloat);
  const int n = int(parts);
  return sum_parts(widened_mm(x, split_parts(A, n, false, false), false), x.size(0), r, n * r, r, 1.0f, n);
}

std::vector<at::Tensor> lora_backward_split(const at::Tensor& dy, const c10::optional<at::Tensor>& x,
                                            const at::Tensor& A, const at::Tensor& Bt, const at::Tensor& h, double s) {
  TORCH_CHECK(A.dim() == 2 && Bt.dim() == 2 && dy.dim() == 2,
              "fastpeft._C.lora_backward_split: grad_y, A and Bt must be 2-D");
  const int64_t r = A.size(0), K = A.size(1), N = Bt.size(1), M = dy.size(0);
  check_adapter(A, "lora_backward_split", "A", r, K);
  check_adapter(Bt, "lora_backward_split", "Bt", r, N);
  check_adapter(h, "lora_backward_split", "h", M, r);
  check_bf16_activation(dy, "lora_backward_split", "grad_y", N);
  if (x.has_value()) {
    check_bf16_activation(*x, "lora_backward_split", "x", K);
    TORCH_CHECK(x->size(0) == M, "fastpeft._C.lora_backward_split: x has ", x->size(0), " rows, grad_y ", M);
  }
  const float sf = float(s);
  if (M == 0 || r == 0)
    return {at::zeros({M, r}, at::kFloat), x.has_value() ? at::zeros({r, K}, at::kFloat) : at::Tensor(),
            at::zeros({N, r}, at::kFloat), at::zeros({N}, at::kFloat)};
  // g = s dY B; [dB^T; db] = s [h^T; 1^T] dY; dA = g^T x.
  const at::Tensor g = sum_parts(widened_mm(dy, split_parts(Bt, 3, false, false), false), M, r, 3 * r, r, sf);
  const at::Tensor T = widened_mm_nn(split_parts(h, 3, true, true), dy);  // (3r + 1, N)
  const at::Tensor dB = sum_parts(T, r, N, N, r * N, sf).t().contiguous();
  const at::Tensor db = T.select(0, 3 * r).mul(s);
  at::Tensor dA;
  if (x.has_value()) dA = sum_parts(widened_mm_nn(split_parts(g, 3, true, false), *x), r, K, K, r * K, 1.0f);
  return {g, dA, dB, db};
}

}  // namespace fastpeft
