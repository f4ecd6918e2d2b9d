// Torch bindings of the fastpeft CPU kernels (module fastpeft._C). Threading is at::parallel_for over rows, so
// torch.set_num_threads governs it; the kernel table (AVX-512, AVX2 or generic) is chosen once from cpuid.
//
// Python (fastpeft/backends/cpu.py) composes these with torch's own GEMMs: the base matmul stays on oneDNN/MKL,
// these functions do the passes PEFT adds around it, each in one sweep over the big operand.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define FASTPEFT_X86 1
#else
#define FASTPEFT_X86 0
#endif

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.h"

namespace fastpeft {
namespace {

bool cpu_has_avx512() {
#if !FASTPEFT_X86
  return false;
#else
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
}
bool cpu_has_avx2() {
#if !FASTPEFT_X86
  return false;
#else
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
}

// The widest code path this CPU runs, unless FASTPEFT_CPU_ISA (generic, avx2, avx512) asks for a narrower one.
const KernelTable* select_kernels() {
  const char* force = std::getenv("FASTPEFT_CPU_ISA");
  const std::string want = force ? force : "";
  if (want == "generic") return &kernels_generic();
  if (want != "avx2" && cpu_has_avx512()) return &kernels_avx512();
  if (cpu_has_avx2()) return &kernels_avx2();
  return &kernels_generic();
}

std::atomic<const KernelTable*> g_table{nullptr};

const KernelTable& K() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (!t) {
    t = select_kernels();
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

// Whether this CPU multiplies bf16 / fp16 natively (AVX512-BF16, AMX-BF16; AVX512-FP16, AMX-FP16). Without it,
// torch's low-precision GEMMs fall back to slow paths (measured on an AVX2 EPYC: bf16 x @ W^T 7.5x slower than
// the fp32 GEMM, dY @ W 300x slower), so cpu.py then runs the base GEMMs in fp32.
bool native_lowp_gemm(const std::string& dtype) {
#if !FASTPEFT_X86
  (void)dtype;
  return false;
#else
  if (!cpu_has_avx512()) return false;
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const unsigned edx0 = d;
  unsigned eax1 = 0;
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) eax1 = a;
  if (dtype == "bf16") return (eax1 & (1u << 5)) || (edx0 & (1u << 22));   // AVX512_BF16, AMX_BF16
  if (dtype == "fp16") return (edx0 & (1u << 23)) || (eax1 & (1u << 21));  // AVX512_FP16, AMX_FP16
  return true;
#endif
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out{"generic"};
  if (cpu_has_avx2()) out.push_back("avx2");
  if (cpu_has_avx512()) out.push_back("avx512");
  return out;
}

// Testing aid: switch the code path at run time (every path must give the same results).
std::string set_isa(const std::string& name) {
  if (name == "generic") {
    g_table.store(&kernels_generic());
  } else if (name == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), "fastpeft._C: this CPU lacks AVX2/FMA/F16C");
    g_table.store(&kernels_avx2());
  } else if (name == "avx512") {
    TORCH_CHECK(cpu_has_avx512(), "fastpeft._C: this CPU lacks AVX-512 (F, BW, VL, DQ)");
    g_table.store(&kernels_avx512());
  } else if (name == "auto") {
    g_table.store(select_kernels());
  } else {
    TORCH_CHECK(false, "fastpeft._C: unknown ISA ", name, " (generic, avx2, avx512 or auto)");
  }
  return K().isa;
}

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: TORCH_CHECK(false, "fastpeft._C: unsupported dtype ", t.scalar_type(), " (need fp32, bf16 or fp16)");
  }
}

// Rows must be unit-stride; the row stride is free (so slices of a bigger buffer need no copy).
void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastpeft._C: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2, "fastpeft._C: ", name, " must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.stride(1) == 1 || t.size(1) <= 1, "fastpeft._C: ", name, " needs unit column stride");
  dtype_code(t);
}

void check_f32(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == shape, "fastpeft._C: ", name,
              " must be contiguous fp32 of shape ", shape, ", got ", t.scalar_type(), " ", t.sizes());
}

int64_t grain(int64_t work_per_row) {
  // About 1M multiply-adds (~0.2 ms) per task: decode-sized calls (M <= 16 at 2048 x r=16) run inline. Waking the
  // pool for less work lost more than it won, badly so on a loaded machine (measured: 2x the frozen base at M=16).
  return std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(1, work_per_row));
}

// Per-thread partial sums for a row-parallel loop: one zeroed (size)-float slab per thread that at::parallel_for
// will actually use (divup(M, grain) capped by the thread count), so M=1 needs no reduction at all.
struct Partials {
  int64_t slabs, size;
  std::vector<float> data;
  Partials(int64_t M, int64_t grain_rows, int64_t size_)
      : slabs(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (M + grain_rows - 1) / grain_rows))),
        size(size_), data(size_t(slabs * size_), 0.f) {}
  float* slab(int tid) { return data.data() + std::min<int64_t>(tid, slabs - 1) * size; }
  // Serial sum into slab 0. Deliberately not a torch op: small torch reductions go parallel and, on a loaded
  // machine, waiting for the pool to wake cost ~16 ms per call at M=1 (measured).
  float* reduce() {
    float* out = data.data();
    for (int64_t t = 1; t < slabs; ++t) {
      const float* src = data.data() + t * size;
      for (int64_t i = 0; i < size; ++i) out[i] += src[i];
    }
    return out;
  }
};

// ------------------------------------------------------------------------------------------------- bindings
at::Tensor dropout_scale(int64_t seed, int64_t rows, int64_t cols, double p, double scale) {
  auto out = at::empty({rows, cols}, at::kFloat);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, grain(cols * 20), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) K().dropout_scale(uint32_t(seed), m * cols, cols, float(p), float(scale), o + m * cols);
  });
  return out;
}

at::Tensor keep_mask(int64_t seed, int64_t rows, int64_t cols, double p) {
  return dropout_scale(seed, rows, cols, p, 1.0).ne(0);
}

// keep(offset0 + i) for i < n: reaches offsets past 2**32 (the high counter word) without a huge tensor.
at::Tensor keep_mask_at(int64_t seed, int64_t offset0, int64_t n, double p) {
  auto out = at::empty({n}, at::kFloat);
  K().dropout_scale(uint32_t(seed), offset0, n, float(p), 1.f, out.data_ptr<float>());
  return out.ne(0);
}

// xa = drop(x) A^T in fp32: x (M, K) fp32/bf16/fp16, A (r, K) fp32 contiguous -> (M, r) fp32.
at::Tensor lora_xa(const at::Tensor& x, const at::Tensor& A, double p, int64_t seed) {
  check_rows(x, "x");
  const int64_t M = x.size(0), Kd = x.size(1), r = A.size(0);
  check_f32(A, "A", {r, Kd});
  auto xa = at::empty({M, r}, at::kFloat);
  const int dt = dtype_code(x);
  const void* xp = x.data_ptr();
  const int64_t ldx = x.stride(0);
  float* out = xa.data_ptr<float>();
  const float* Ap = A.data_ptr<float>();
  at::parallel_for(0, M, grain(Kd * (r + (p > 0 ? 20 : 0))), [&](int64_t b, int64_t e) {
    std::vector<float> buf(4 * Kd);
    K().xa_rows(dt, xp, ldx, Kd, b, e, Ap, r, float(p), uint32_t(seed), out, r, buf.data());
  });
  return xa;
}

// y += xs Bt + bias in place: y (M, N) any float dtype, xs (M, R) fp32 (scaled), Bt (R, N) fp32, bias (N,) fp32.
void lora_epilogue_(at::Tensor& y, const at::Tensor& xs, const at::Tensor& Bt, const c10::optional<at::Tensor>& bias) {
  check_rows(y, "y");
  const int64_t M = y.size(0), N = y.size(1), R = xs.size(1);
  check_f32(xs, "xs", {M, R});
  check_f32(Bt, "Bt", {R, N});
  const float* bp = nullptr;
  if (bias.has_value()) {
    check_f32(*bias, "bias", {N});
    bp = bias->data_ptr<float>();
  }
  const int dt = dtype_code(y);
  void* yp = y.data_ptr();
  const int64_t ldy = y.stride(0);
  const float *xsp = xs.data_ptr<float>(), *Btp = Bt.data_ptr<float>();
  at::parallel_for(0, M, grain(N * (R + 1)), [&](int64_t b, int64_t e) {
    std::vector<float> buf(4 * N);
    K().epilogue_rows(dt, yp, ldy, N, b, e, xsp, R, Btp, bp, buf.data());
  });
}

// One sweep over dy (M, N): returns g (M, R) = (dy Bt^T) * svec, dB (N, R) = svec * (dy^T xa) or empty,
// colsum (N,) = dy.sum(0) (unscaled) or empty. Bt (R, N) fp32, xa (M, R) fp32, svec (R,) fp32.
std::vector<at::Tensor> lora_dy_pass(const at::Tensor& dy, const at::Tensor& Bt, const at::Tensor& xa,
                                     const at::Tensor& svec, bool need_dB, bool need_colsum) {
  check_rows(dy, "grad_y");
  const int64_t M = dy.size(0), N = dy.size(1), R = Bt.size(0);
  check_f32(Bt, "Bt", {R, N});
  check_f32(xa, "xa", {M, R});
  check_f32(svec, "svec", {R});
  auto g = at::empty({M, R}, at::kFloat);
  const int64_t gr = grain(N * R * 2);
  // Per-thread partial sums, reduced once at the end: no atomics, deterministic for a fixed thread count.
  Partials acc(M, gr, need_dB ? R * N : 0), cs(M, gr, need_colsum ? N : 0);
  const int dt = dtype_code(dy);
  const void* dyp = dy.data_ptr();
  const int64_t ldd = dy.stride(0);
  const float *Btp = Bt.data_ptr<float>(), *xap = xa.data_ptr<float>(), *sp = svec.data_ptr<float>();
  float* gp = g.data_ptr<float>();
  at::parallel_for(0, M, gr, [&](int64_t b, int64_t e) {
    const int tid = at::get_thread_num();
    std::vector<float> buf(4 * N);
    K().dy_rows(dt, dyp, ldd, N, b, e, Btp, xap, R, sp, gp, need_dB ? acc.slab(tid) : nullptr,
                need_colsum ? cs.slab(tid) : nullptr, buf.data());
  });
  at::Tensor dB, colsum;
  if (need_dB) {
    const float* s = acc.reduce();
    dB = at::empty({N, R}, at::kFloat);  // B's own (N, r) layout, scaled: no torch ops left for Python to run
    float* d = dB.data_ptr<float>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < R; ++j) d[n * R + j] = s[j * N + n] * sp[j];
  }
  if (need_colsum) {
    colsum = at::empty({N}, at::kFloat);
    std::memcpy(colsum.data_ptr<float>(), cs.reduce(), sizeof(float) * N);
  }
  return {g, dB, colsum};
}

// One sweep over x / dx rows for one adapter: dx += (g A) * mask/(1-p) in place (if dx given) and returns
// dA = g^T drop(x) (r, K) fp32 (if x given; else empty). g (M, r) fp32 with unit column stride, A (r, K) fp32.
at::Tensor lora_dx_pass(const c10::optional<at::Tensor>& dx, const c10::optional<at::Tensor>& x, const at::Tensor& A,
                        const at::Tensor& g, double p, int64_t seed) {
  const int64_t r = A.size(0), Kd = A.size(1), M = g.size(0);
  check_f32(A, "A", {r, Kd});
  TORCH_CHECK(g.scalar_type() == at::kFloat && g.dim() == 2 && g.size(1) == r && g.stride(1) == 1,
              "fastpeft._C: g must be fp32 (M, r) with unit column stride");
  void* dxp = nullptr;
  int dt_dx = kF32;
  int64_t lddx = 0;
  if (dx.has_value()) {
    check_rows(*dx, "dx");
    TORCH_CHECK(dx->size(0) == M && dx->size(1) == Kd, "fastpeft._C: dx shape mismatch");
    dxp = dx->data_ptr();
    dt_dx = dtype_code(*dx);
    lddx = dx->stride(0);
  }
  const void* xp = nullptr;
  int dt_x = kF32;
  int64_t ldx = 0;
  if (x.has_value()) {
    check_rows(*x, "x");
    TORCH_CHECK(x->size(0) == M && x->size(1) == Kd, "fastpeft._C: x shape mismatch");
    xp = x->data_ptr();
    dt_x = dtype_code(*x);
    ldx = x->stride(0);
  }
  const int64_t gr = grain(Kd * (2 * r + (p > 0 ? 20 : 0)));
  Partials acc(M, gr, xp ? r * Kd : 0);
  const float *Ap = A.data_ptr<float>(), *gp = g.data_ptr<float>();
  const int64_t ldg = g.stride(0);
  at::parallel_for(0, M, gr, [&](int64_t b, int64_t e) {
    const int tid = at::get_thread_num();
    std::vector<float> buf(12 * Kd);
    K().dx_rows(dt_x, xp, ldx, dt_dx, dxp, lddx, Kd, b, e, Ap, r, gp, ldg, float(p), uint32_t(seed),
                xp ? acc.slab(tid) : nullptr, buf.data());
  });
  if (!xp) return at::Tensor();
  auto dA = at::empty({r, Kd}, at::kFloat);
  std::memcpy(dA.data_ptr<float>(), acc.reduce(), sizeof(float) * r * Kd);
  return dA;
}

std::string isa() { return K().isa; }

}  // namespace
}  // namespace fastpeft

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastpeft CPU kernels: fused LoRA passes with an on-the-fly Philox dropout mask";
  m.def("isa", &fastpeft::isa, "the SIMD code path chosen at run time: avx512, avx2 or generic");
  m.def("dropout_scale", &fastpeft::dropout_scale, "(seed, rows, cols, p, scale) -> fp32 (rows, cols): scale where kept, else 0");
  m.def("native_lowp_gemm", &fastpeft::native_lowp_gemm, "(\"bf16\"|\"fp16\") -> whether the CPU has native GEMM support");
  m.def("supported_isas", &fastpeft::supported_isas, "code paths this CPU can run");
  m.def("set_isa", &fastpeft::set_isa, "(name) -> name: force generic, avx2, avx512 or auto (testing aid)");
  m.def("keep_mask_at", &fastpeft::keep_mask_at, "(seed, offset0, n, p) -> bool (n,): keep(offset0 + i)");
  m.def("keep_mask", &fastpeft::keep_mask, "(seed, rows, cols, p) -> bool (rows, cols): fastpeft._philox.dropout_keep_mask");
  m.def("lora_xa", &fastpeft::lora_xa, "(x, A32, p, seed) -> drop(x) A^T in fp32");
  m.def("lora_epilogue_", &fastpeft::lora_epilogue_, "(y, xs32, Bt32, bias32|None): y += xs Bt + bias in place");
  m.def("lora_dy_pass", &fastpeft::lora_dy_pass, "(dy, Bt32, xa32, svec, need_dB, need_colsum) -> [g, dB (N, R) scaled, colsum]");
  m.def("lora_dx_pass", &fastpeft::lora_dx_pass, "(dx|None, x|None, A32, g32, p, seed) -> dA32 (dx updated in place)");
}
