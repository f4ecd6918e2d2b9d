// Helpers of the torch bindings (ops.cpp) that other binding files use, and the bindings those files define.
#pragma once
#include <torch/extension.h>

#include <vector>

#include "kernels.h"

namespace fastpeft {

// The kernel table in use (chosen from cpuid, or forced by FASTPEFT_CPU_ISA / set_isa).
const KernelTable& active_kernels();
// DType code of an fp32/bf16/fp16 tensor; raises for any other dtype.
int activation_dtype(const at::Tensor& t);
// Raises unless t is a 2-D CPU fp32/bf16/fp16 tensor with unit column stride.
void check_activation_rows(const at::Tensor& t, const char* name);
// Bytes per element of DType code dt.
inline int64_t element_size(int dt) { return dt == kF32 ? 4 : 2; }
// Rows per at::parallel_for task for a row costing work_per_row multiply-adds.
int64_t rows_grain(int64_t work_per_row);
// t itself when it is contiguous fp32 (PEFT's adapters), else a contiguous fp32 copy. Checked here: Tensor::to
// goes through the dispatcher even when it returns t, and a decode step calls this for every adapter of every layer.
inline at::Tensor contiguous_f32(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
}

// t itself where its rows have unit column stride (or it is not 2-D: its callers' checks report that), else a
// contiguous copy: the passes read rows of unit column stride.
inline at::Tensor unit_column_stride(const at::Tensor& t) {
  return t.dim() == 2 && t.stride(1) != 1 ? t.contiguous() : t;
}

// The base bias as the kernels take it: fp32 holding bias's values rounded to x's dtype (the reference adds it in
// x's dtype), as cpu._bias_as_reference_adds.
inline at::Tensor bias_as_reference_adds(const at::Tensor& bias, at::ScalarType dtype) {
  if (bias.scalar_type() != dtype) return bias.to(dtype).to(at::kFloat).contiguous();
  return contiguous_f32(bias);
}

// ops.cpp: the one-pass decoding GEMV (see its definition).
at::Tensor dense_lora_gemv(const at::Tensor& x, const at::Tensor& W, const c10::optional<at::Tensor>& bias,
                           const c10::optional<at::Tensor>& xs, const c10::optional<at::Tensor>& B,
                           double lora_scale, const c10::optional<at::Tensor>& A, int64_t prefetch);

// settled_gemv.cpp: the SettledGemv class and guards_hold.
void register_settled_gemv(py::module& m);

// mixed.cpp
void lora_mixed_(at::Tensor& y, const at::Tensor& x, const at::Tensor& runs,
                 const std::vector<c10::optional<at::Tensor>>& A, const std::vector<c10::optional<at::Tensor>>& B,
                 const std::vector<c10::optional<at::Tensor>>& bias,
                 const std::vector<double>& scaling);

// pair_gemm.cpp
// Raises unless t is a 2-D bf16 CPU tensor with unit column stride (the message names fastpeft._C.<fn> and name).
void check_bf16_rows(const char* fn, const at::Tensor& t, const char* name);
bool widened_mm_available();
at::Tensor widened_mm(const at::Tensor& a, const at::Tensor& b, bool interleave_a);
at::Tensor widened_mm_nn(const at::Tensor& a, const at::Tensor& b);
std::vector<at::Tensor> widened_mm_parts(const std::vector<at::Tensor>& as, const at::Tensor& b, bool transposed_b);

// split_products.cpp
at::Tensor lora_xa_split(const at::Tensor& x, const at::Tensor& A, int64_t parts);
std::vector<at::Tensor> lora_backward_split(const at::Tensor& dy, const c10::optional<at::Tensor>& x,
                                            const at::Tensor& A, const at::Tensor& Bt, const at::Tensor& h, double s);

}  // namespace fastpeft
