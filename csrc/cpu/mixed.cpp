// Mixed-adapter LoRA on the CPU: every run of rows through its own adapter, the update added to y in place.
//
// For each run [start, end) of rows that share adapter i (fastpeft/mixed.py builds the runs, sorted by adapter so
// one adapter's A and B stay in cache across its runs):
//   y[m, :] += s_i * ((x[m, :] A_i^T) B_i^T + bias_i)      for m in [start, end), accumulated in fp32, y rounded once.
// The shrink is the kernel table's xa_rows and the expand its expand_rows, on row pointers offset to the run, so
// each run is a small segmented GEMM (one row per run at decode: a batched GEMV). A_i and B_i are read as PEFT keeps
// them, (r_i, K) and (N, r_i) (adapters of another dtype are converted per call): a chunk of one row (decode) is
// expanded from B_i directly (kernel table: expand_row_b); for longer chunks each thread transposes B_i into its own
// (r_i, N) buffer when its next chunk changes adapter (chunks are sorted by adapter). No caller makes or keeps a B^T.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "ops_shared.h"

namespace fastpeft {

namespace {

// Runs longer than this are split, so one long prompt does not keep every other thread idle.
constexpr int64_t kChunkRows = 32;

// Besides its rows' (K + N) r multiply-adds each, a chunk reads its adapter's (K + N) r elements, from memory at
// decode, where every chunk is one row through its own adapter and the read is nearly all of the chunk's time. The
// task grain counts each element read as this many multiply-adds, so a decode step's chunks are split over the
// threads instead of all running on the calling one.
constexpr int64_t kAdapterReadCost = 16;

struct Chunk {
  int64_t start, end, adapter;
};

// Scratch of each thread, kept across calls: a decode step calls this once per layer, and a fresh B^T buffer of
// r * N floats is large enough for malloc to map new pages each time.
struct Scratch {
  std::vector<float> buf, xs, Bt;
};
thread_local Scratch t_scratch;

float* at_least(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

}  // namespace

void lora_mixed_(at::Tensor& y, const at::Tensor& x, const at::Tensor& runs,
                 const std::vector<c10::optional<at::Tensor>>& A, const std::vector<c10::optional<at::Tensor>>& B,
                 const std::vector<c10::optional<at::Tensor>>& bias, const std::vector<double>& scaling) {
  check_activation_rows(y, "y");
  check_activation_rows(x, "x");
  const int64_t M = x.size(0), Kd = x.size(1), N = y.size(1);
  const int64_t n = static_cast<int64_t>(A.size());
  TORCH_CHECK(y.size(0) == M, "fastpeft._C.lora_mixed_: y has ", y.size(0), " rows, x has ", M);
  TORCH_CHECK(static_cast<int64_t>(B.size()) == n && static_cast<int64_t>(bias.size()) == n &&
                  static_cast<int64_t>(scaling.size()) == n,
              "fastpeft._C.lora_mixed_: A, B, bias and scaling must have one entry per adapter");
  TORCH_CHECK(runs.scalar_type() == at::kLong && runs.is_contiguous() && runs.dim() == 2 && runs.size(1) == 3,
              "fastpeft._C.lora_mixed_: runs must be contiguous int64 (S, 3)");
  // The adapters as contiguous fp32 (themselves when they are: PEFT's default), rank 0 for an absent one, and
  // s_i * bias_i (the epilogue adds the bias as it is).
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> A32(n), B32(n);
  std::vector<int64_t> rank(n, 0);
  std::vector<std::vector<float>> scaled_bias(n);
  for (int64_t i = 0; i < n; ++i) {
    if (!A[i].has_value()) continue;
    TORCH_CHECK(B[i].has_value(), "fastpeft._C.lora_mixed_: adapter ", i, " has A but no B");
    A32[i] = contiguous_f32(*A[i]);
    B32[i] = contiguous_f32(*B[i]);
    const int64_t r = A32[i].dim() == 2 ? A32[i].size(0) : -1;
    TORCH_CHECK(r >= 0 && A32[i].size(1) == Kd, "fastpeft._C.lora_mixed_: A[", i, "] must be (r, ", Kd, "), got ",
                A32[i].sizes());
    TORCH_CHECK(B32[i].dim() == 2 && B32[i].size(0) == N && B32[i].size(1) == r, "fastpeft._C.lora_mixed_: B[", i,
                "] must be (", N, ", ", r, "), got ", B32[i].sizes());
    rank[i] = r;
    if (bias[i].has_value()) {
      TORCH_CHECK(bias[i]->numel() == N, "fastpeft._C.lora_mixed_: bias[", i, "] must have ", N, " elements, got ",
                  bias[i]->sizes());
      const at::Tensor b = contiguous_f32(*bias[i]);
      const float* bp = b.data_ptr<float>();
      const float s = static_cast<float>(scaling[i]);
      scaled_bias[i].resize(N);
      for (int64_t j = 0; j < N; ++j) scaled_bias[i][j] = s * bp[j];
    }
  }
  std::vector<Chunk> chunks;
  int64_t max_r = 0;
  const int64_t* rp = runs.data_ptr<int64_t>();
  for (int64_t s = 0; s < runs.size(0); ++s) {
    const int64_t start = rp[3 * s], end = rp[3 * s + 1], a = rp[3 * s + 2];
    TORCH_CHECK(0 <= start && start <= end && end <= M && 0 <= a && a < n, "fastpeft._C.lora_mixed_: run ", s,
                " = [", start, ", ", end, ", ", a, "] is out of bounds (", M, " rows, ", n, " adapters)");
    if (rank[a] == 0) continue;
    max_r = std::max<int64_t>(max_r, rank[a]);
    for (int64_t c = start; c < end; c += kChunkRows) chunks.push_back({c, std::min(end, c + kChunkRows), a});
  }
  if (chunks.empty()) return;
  const KernelTable& kt = active_kernels();
  const int dtx = activation_dtype(x), dty = activation_dtype(y);
  const char* xp = static_cast<const char*>(x.data_ptr());
  char* yp = static_cast<char*>(y.data_ptr());
  const int64_t ldx = x.stride(0), ldy = y.stride(0);
  const int64_t rows_per_chunk = std::max<int64_t>(1, M / static_cast<int64_t>(chunks.size()));
  const int64_t grain =
      std::max<int64_t>(1, rows_grain((Kd + N) * max_r) / (rows_per_chunk + kAdapterReadCost));
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), grain, [&](int64_t b, int64_t e) {
    float* buf = at_least(t_scratch.buf, 4 * std::max(Kd, N));
    float* xs = at_least(t_scratch.xs, kChunkRows * max_r);
    float* Bt = at_least(t_scratch.Bt, max_r * N);  // B^T of adapter `held`
    int64_t held = -1;
    for (int64_t c = b; c < e; ++c) {
      const Chunk& ch = chunks[c];
      const int64_t rows = ch.end - ch.start, r = rank[ch.adapter];
      const float s = static_cast<float>(scaling[ch.adapter]);
      kt.xa_rows(dtx, xp + ch.start * ldx * element_size(dtx), ldx, Kd, 0, rows, A32[ch.adapter].data_ptr<float>(),
                 r, 0.f, 0u, xs, r, buf);
      for (int64_t j = 0; j < rows * r; ++j) xs[j] *= s;
      const float* bias_s = scaled_bias[ch.adapter].empty() ? nullptr : scaled_bias[ch.adapter].data();
      if (rows == 1 && r % kt.vector_width == 0) {  // a row that uses its adapter once: expand from B as it is
        kt.expand_row_b(dty, yp + ch.start * ldy * element_size(dty), N, xs, r, B32[ch.adapter].data_ptr<float>(),
                        bias_s);
        continue;
      }
      if (ch.adapter != held) {
        kt.transpose_f32(B32[ch.adapter].data_ptr<float>(), r, N, r, Bt, N);
        held = ch.adapter;
      }
      kt.expand_rows(dty, yp + ch.start * ldy * element_size(dty), ldy, N, 0, rows, xs, r, r, Bt, bias_s);
    }
  });
}

}  // namespace fastpeft
