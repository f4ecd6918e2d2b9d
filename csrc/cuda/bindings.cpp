// Python bindings of the CUDA LoRA/IA3 kernels as the extension fastpeft._cuda (built by setup.py only where CUDA
// and a CUDA torch exist). Checks shapes and dtypes, allocates outputs and split workspaces, and launches on torch's
// current stream; the kernels themselves know nothing of torch (lora_kernels.cuh). In-place outputs are taken by
// value: a Tensor is a handle, and the kernels write through its storage.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "lora_kernels.cuh"

namespace fc = fastpeft::cuda;

namespace {

fc::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return fc::DType::F16;
    case at::kBFloat16: return fc::DType::BF16;
    case at::kFloat: return fc::DType::F32;
    default: TORCH_CHECK(false, "fastpeft._cuda: unsupported dtype ", t.scalar_type());
  }
  return fc::DType::F32;
}

// The tensor-core kernels' operands: one 16-bit dtype, on the GPU.
fc::DType check_16bit(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fastpeft._cuda: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, "fastpeft._cuda: ", name,
              " must be float16 or bfloat16, got ", t.scalar_type());
  return dtype_of(t);
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "fastpeft._cuda: ", what, " must share a dtype");
  TORCH_CHECK(a.device() == b.device(), "fastpeft._cuda: ", what, " must be on one device");
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// xa = drop(x) @ A^T, (M, r), in A's dtype. x (M, K) any strides; A (r, K).
at::Tensor lora_down_dropout(const at::Tensor& x, const at::Tensor& A, double p, int64_t seed) {
  const auto t = check_16bit(A, "A");
  check_same(x, A, "x and A");
  TORCH_CHECK(x.dim() == 2 && A.dim() == 2 && x.size(1) == A.size(1), "fastpeft._cuda: x (M, K) and A (r, K)");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto Ac = A.contiguous();
  const int64_t M = x.size(0), K = x.size(1), r = A.size(0);
  auto xa = at::empty({M, r}, A.options());
  const int splits = fc::reduction_splits(M, r, K);
  auto ws = at::empty({(int64_t)splits * M * r}, A.options().dtype(at::kFloat));
  fc::lora_down_dropout(t, x.data_ptr(), x.stride(0), x.stride(1), Ac.data_ptr(), xa.data_ptr(), ws.data_ptr<float>(),
                        splits, M, K, r, p, (uint64_t)seed, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return xa;
}

// y += s * (xa @ B^T + bias), in place. y (M, N) with unit column stride, in xa's dtype or float32.
void lora_up_epilogue_(at::Tensor y, const at::Tensor& xa, const at::Tensor& B, const std::optional<at::Tensor>& bias,
                       double scale) {
  const auto t = check_16bit(B, "B");
  check_same(xa, B, "xa and B");
  TORCH_CHECK(y.scalar_type() == B.scalar_type() || y.scalar_type() == at::kFloat,
              "fastpeft._cuda: y must be in B's dtype or float32");
  TORCH_CHECK(y.dim() == 2 && y.stride(1) == 1, "fastpeft._cuda: y must be (M, N) with unit column stride");
  TORCH_CHECK(xa.size(0) == y.size(0) && B.size(0) == y.size(1) && xa.size(1) == B.size(1), "fastpeft._cuda: shapes");
  const c10::cuda::CUDAGuard guard(y.device());
  const auto xac = xa.contiguous(), Bc = B.contiguous();
  at::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    bc = bias->to(B.scalar_type()).contiguous();
    TORCH_CHECK(bc.numel() == y.size(1), "fastpeft._cuda: bias must be (N,)");
  }
  fc::lora_up_epilogue(t, dtype_of(y), y.data_ptr(), y.stride(0), xac.data_ptr(), Bc.data_ptr(),
                       bc.defined() ? bc.data_ptr() : nullptr, y.size(0), y.size(1), B.size(1), (float)scale,
                       stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dx += (g @ A) * mask / (1 - p), in place. dx (M, K) with unit column stride, in A's dtype or float32.
void lora_backward_dx_mask_(at::Tensor dx, const at::Tensor& g, const at::Tensor& A, double p, int64_t seed) {
  const auto t = check_16bit(A, "A");
  check_same(g, A, "g and A");
  TORCH_CHECK(dx.scalar_type() == A.scalar_type() || dx.scalar_type() == at::kFloat,
              "fastpeft._cuda: dx must be in A's dtype or float32");
  TORCH_CHECK(dx.dim() == 2 && dx.stride(1) == 1, "fastpeft._cuda: dx must be (M, K) with unit column stride");
  TORCH_CHECK(g.size(0) == dx.size(0) && A.size(1) == dx.size(1) && g.size(1) == A.size(0), "fastpeft._cuda: shapes");
  const c10::cuda::CUDAGuard guard(dx.device());
  const auto gc = g.contiguous(), Ac = A.contiguous();
  fc::lora_backward_dx_mask(t, dtype_of(dx), dx.data_ptr(), dx.stride(0), gc.data_ptr(), Ac.data_ptr(), dx.size(0),
                            dx.size(1), A.size(0), p, (uint64_t)seed, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dA = g^T @ drop(x), (r, K), in g's dtype. g (M, r); x (M, K) any strides.
at::Tensor lora_grad_A(const at::Tensor& g, const at::Tensor& x, double p, int64_t seed) {
  const auto t = check_16bit(g, "g");
  check_same(g, x, "g and x");
  TORCH_CHECK(g.dim() == 2 && x.dim() == 2 && g.size(0) == x.size(0), "fastpeft._cuda: g (M, r) and x (M, K)");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto gc = g.contiguous();
  const int64_t M = x.size(0), K = x.size(1), r = g.size(1);
  auto dA = at::empty({r, K}, g.options());
  const int splits = fc::reduction_splits(r, K, M);
  auto ws = at::empty({(int64_t)splits * r * K}, g.options().dtype(at::kFloat));
  fc::lora_grad_A(t, dA.data_ptr(), gc.data_ptr(), x.data_ptr(), x.stride(0), x.stride(1), ws.data_ptr<float>(),
                  splits, M, K, r, p, (uint64_t)seed, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dA;
}

// out = (inp * scale[None, :]) rounded to inp's dtype; out may be inp (in-place IA3 output scaling).
void ia3_scale_cols(at::Tensor out, const at::Tensor& inp, const at::Tensor& scale) {
  TORCH_CHECK(inp.is_cuda() && out.is_cuda() && scale.is_cuda(), "fastpeft._cuda: CUDA tensors expected");
  TORCH_CHECK(inp.dim() == 2 && inp.stride(1) == 1 && out.stride(1) == 1 && out.sizes() == inp.sizes(),
              "fastpeft._cuda: (M, C) tensors with unit column stride expected");
  TORCH_CHECK(out.scalar_type() == inp.scalar_type(), "fastpeft._cuda: out must be in inp's dtype");
  TORCH_CHECK(scale.numel() == inp.size(1), "fastpeft._cuda: scale must have C elements");
  const c10::cuda::CUDAGuard guard(inp.device());
  const auto sc = scale.contiguous();
  fc::ia3_scale_cols(dtype_of(inp), dtype_of(sc), out.data_ptr(), out.stride(0), inp.data_ptr(), inp.stride(0),
                     sc.data_ptr(), inp.size(0), inp.size(1), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out[c] = sum_m a[m, c] * b[m, c] (fp32 accumulation), in out_dtype.
at::Tensor ia3_col_dot(const at::Tensor& a, const at::Tensor& b, at::ScalarType out_dtype) {
  check_same(a, b, "a and b");
  TORCH_CHECK(a.is_cuda() && a.dim() == 2 && a.sizes() == b.sizes() && a.stride(1) == 1 && b.stride(1) == 1,
              "fastpeft._cuda: a, b (M, C) CUDA tensors with unit column stride expected");
  const c10::cuda::CUDAGuard guard(a.device());
  auto out = at::empty({a.size(1)}, a.options().dtype(out_dtype));
  fc::ia3_col_dot(dtype_of(a), dtype_of(out), out.data_ptr(), a.data_ptr(), a.stride(0), b.data_ptr(), b.stride(0),
                  a.size(0), a.size(1), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastpeft CUDA kernels for the LoRA/IA3 parts around a cuBLAS base GEMM";
  m.def("lora_down_dropout", &lora_down_dropout, "xa = drop(x) @ A^T (Philox mask in registers)");
  m.def("lora_up_epilogue_", &lora_up_epilogue_, "y += s * (xa @ B^T + bias), in place");
  m.def("lora_backward_dx_mask_", &lora_backward_dx_mask_, "dx += (g @ A) * mask / (1 - p), in place");
  m.def("lora_grad_A", &lora_grad_A, "dA = g^T @ drop(x), mask regenerated");
  m.def("ia3_scale_cols", &ia3_scale_cols, "out = inp * scale[None, :]");
  m.def("ia3_col_dot", &ia3_col_dot, "out[c] = sum_m a[m, c] * b[m, c]");
}
