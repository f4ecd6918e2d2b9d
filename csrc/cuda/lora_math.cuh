// The per-element math of the CUDA LoRA/IA3 kernels, __host__ __device__ so the kernels and the host-compiled
// check program (host_reference.cpp, built by tests/test_cuda_compile.py with g++) run the same formulas. All in
// float32: the kernels convert loaded bf16/fp16 values to float, apply these, and round once when storing.
#pragma once

#include "philox.cuh"

namespace fastpeft {

// drop(x)[m, k] = x * keep / (1 - p), divided (not multiplied by a reciprocal) to round as torch's x / (1 - p).
FASTPEFT_HD float dropped_value(float x, uint64_t seed, int64_t m, int64_t k, int64_t K, float p, float one_minus_p) {
  if (p <= 0.0f) return x;
  return dropout_keep(seed, m, k, K, p) ? x / one_minus_p : 0.0f;
}

// lora_up_epilogue: y + s * (xa B^T)[m, n] + s * b[n]; PEFT scales the biased update: (xa B^T + b) * s.
FASTPEFT_HD float lora_up_value(float y, float acc, float scale, float bias) { return y + scale * (acc + bias); }

// lora_backward_dx_mask: dx + (g A)[m, k] * keep / (1 - p).
FASTPEFT_HD float dx_mask_value(float dx, float acc, uint64_t seed, int64_t m, int64_t k, int64_t K, float p,
                                float one_minus_p) {
  return dx + dropped_value(acc, seed, m, k, K, p, one_minus_p);
}

}  // namespace fastpeft
