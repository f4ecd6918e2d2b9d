// Torch bindings of the fastpeft CPU kernels (module fastpeft._C). Threading is at::parallel_for over rows, so
// torch.set_num_threads governs it; the kernel table (AVX-512, AVX2 or generic) is chosen once from cpuid.
//
// Python (fastpeft/backends/cpu.py) composes these with torch's own GEMMs: the base matmul stays on oneDNN/MKL,
// these functions do the passes PEFT adds around it, each in one sweep over the big operand.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#if AT_PARALLEL_OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define FASTPEFT_X86 1
#else
#define FASTPEFT_X86 0
#endif

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "kernels.h"
#include "ops_shared.h"

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
  // An empty tensor may carry any strides (an expanded gradient of no rows): no element is read.
  TORCH_CHECK(t.stride(1) == 1 || t.size(1) <= 1 || t.numel() == 0, "fastpeft._C: ", name,
              " needs unit column stride");
  dtype_code(t);
}

void check_f32(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == shape, "fastpeft._C: ", name,
              " must be contiguous fp32 of shape ", shape, ", got ", t.scalar_type(), " ", t.sizes());
}

// fp32 (rows, cols) with unit column stride and any row stride (rows < 0: any number of rows).
void check_f32_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && (rows < 0 || t.size(0) == rows) && t.size(1) == cols &&
                  t.stride(1) == 1,
              "fastpeft._C: ", name, " must be fp32 (", rows < 0 ? std::string("M") : std::to_string(rows), ", ", cols,
              ") with unit column stride, got ", t.scalar_type(), " ", t.sizes());
}

int64_t grain(int64_t work_per_row) {
  // About 1M multiply-adds (~0.2 ms) per task: decode-sized calls (M <= 16 at 2048 x r=16) run inline. Waking the
  // pool for less work lost more than it won, badly so on a loaded machine (measured: 2x the frozen base at M=16).
  return std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(1, work_per_row));
}

// ------------------------------------------------------------------------------------------------- bindings
at::Tensor dropout_scale(int64_t seed, int64_t rows, int64_t cols, double p, double scale) {
  auto out = at::empty({rows, cols}, at::kFloat);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, grain(cols * 20), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) K().dropout_scale(uint32_t(seed), m * cols, cols, float(p), float(scale), o + m * cols);
  });
  return out;
}

// out = round(add + z * scale) in out_dtype, fp32 arithmetic: z (M, N) activation rows, scale fp32 (N,), add None,
// fp32 (N,) or (M, N) activation rows; out None (a new tensor) or (M, N) rows of out_dtype (e.g. rows of a larger
// buffer). One pass, nothing (M, N) in fp32.
at::Tensor scale_columns(const at::Tensor& z, const at::Tensor& scale, const c10::optional<at::Tensor>& add,
                         at::ScalarType out_dtype, const c10::optional<at::Tensor>& out_rows) {
  check_rows(z, "z");
  const int64_t M = z.size(0), N = z.size(1);
  check_f32(scale, "scale", {N});
  int dt_add = kF32;
  const void* ap = nullptr;
  int64_t ldadd = 0;
  if (add.has_value()) {
    if (add->dim() == 1) {
      check_f32(*add, "add", {N});
    } else {
      check_rows(*add, "add");
      TORCH_CHECK(add->size(0) == M && add->size(1) == N, "fastpeft._C.scale_columns: add must be (", N, ") or (", M,
                  ", ", N, "), got ", add->sizes());
      dt_add = dtype_code(*add);
      ldadd = add->stride(0);
    }
    ap = add->data_ptr();
  }
  at::Tensor out;
  if (out_rows.has_value()) {
    out = *out_rows;
    check_rows(out, "out");
    TORCH_CHECK(out.size(0) == M && out.size(1) == N && out.scalar_type() == out_dtype,
                "fastpeft._C.scale_columns: out must be (", M, ", ", N, ") of the output dtype, got ", out.sizes(), " ",
                out.scalar_type());
  } else {
    out = at::empty({M, N}, z.options().dtype(out_dtype));
  }
  const int dt_z = dtype_code(z), dt_out = dtype_code(out);
  const void* zp = z.data_ptr();
  void* op = out.data_ptr();
  const int64_t ldo = out.stride(0);
  const float* sp = scale.data_ptr<float>();
  // An element costs about as much as 8 multiply-adds of the passes grain() was set by (a load, widening, store).
  at::parallel_for(0, M, grain(8 * N), [&](int64_t b, int64_t e) {
    K().scale_columns_rows(dt_z, zp, z.stride(0), N, b, e, sp, dt_add, ap, ldadd, dt_out, op, ldo);
  });
  return out;
}

// out = round(a + b * (kept where dropout_scale's mask for (seed, p) over (M, N) keeps, else dropped)) in out's
// dtype, fp32 arithmetic, in one pass that draws the mask a few hundred elements at a time (never an (M, N) mask):
// b (M, N) activation rows; a None or like b; out None (a new tensor of b's dtype) or (M, N) activation rows, which
// may be a.
at::Tensor masked_combine(const c10::optional<at::Tensor>& a, const at::Tensor& b, int64_t seed, double p,
                          double kept, double dropped, const c10::optional<at::Tensor>& out) {
  check_rows(b, "b");
  const int64_t M = b.size(0), N = b.size(1);
  if (a.has_value()) {
    check_rows(*a, "a");
    TORCH_CHECK(a->sizes() == b.sizes(), "fastpeft._C.masked_combine: a ", a->sizes(), " and b ", b.sizes(), " differ");
  }
  at::Tensor o;
  if (out.has_value()) {
    o = *out;
    check_rows(o, "out");
    TORCH_CHECK(o.sizes() == b.sizes(), "fastpeft._C.masked_combine: out ", o.sizes(), " and b ", b.sizes(), " differ");
  } else {
    o = at::empty({M, N}, b.options());
  }
  const int dt_a = a.has_value() ? dtype_code(*a) : kF32, dt_b = dtype_code(b), dt_o = dtype_code(o);
  const void* ap = a.has_value() ? a->data_ptr() : nullptr;
  const int64_t lda = a.has_value() ? a->stride(0) : 0;
  const void* bp = b.data_ptr();
  void* op = o.data_ptr();
  // An element costs a mask draw (the Philox rounds) besides its loads and store.
  at::parallel_for(0, M, grain(16 * N), [&](int64_t m0, int64_t m1) {
    K().masked_combine_rows(dt_a, ap, lda, dt_b, bp, b.stride(0), N, m0, m1, uint32_t(seed), float(p), float(kept),
                            float(dropped), dt_o, op, o.stride(0));
  });
  return o;
}

// DoRA's forward epilogue in one pass: u = h Bt; z += k u in place, or z_out = z + k u with z only read; returns
// round(base + bias + s u + f (z + k u)) (M, N) in out_dtype, without base round(f (z + k u) + bias) (the scaling
// without dropout). z, base, z_out: (M, N) fp32 rows; h (M, R), Bt (R, N) (B transposed, stack_transposed), f (N,),
// bias (N,) or None: fp32.
at::Tensor dora_epilogue(at::Tensor& z, const c10::optional<at::Tensor>& base, const at::Tensor& h,
                         const at::Tensor& Bt, double k, double s, const at::Tensor& f,
                         const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                         const c10::optional<at::Tensor>& z_out) {
  check_rows(z, "z");
  const int64_t M = z.size(0), N = z.size(1), R = Bt.dim() == 2 ? Bt.size(0) : -1;
  TORCH_CHECK(z.scalar_type() == at::kFloat, "fastpeft._C.dora_epilogue: z must be fp32, got ", z.scalar_type());
  // An optional fp32 (M, N) of rows like z: its data and row stride, (null, 0) without it.
  auto like_z = [&](const c10::optional<at::Tensor>& t, const char* name) -> std::pair<float*, int64_t> {
    if (!t.has_value()) return {nullptr, 0};
    check_rows(*t, name);
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->sizes() == z.sizes(), "fastpeft._C.dora_epilogue: ", name,
                " must be fp32 ", z.sizes(), ", got ", t->scalar_type(), " ", t->sizes());
    return {t->data_ptr<float>(), t->stride(0)};
  };
  const std::pair<float*, int64_t> base_rows = like_z(base, "base"), out_rows = like_z(z_out, "z_out");
  const float* basep = base_rows.first;
  const int64_t ldb = base_rows.second;
  float* zo = out_rows.first ? out_rows.first : z.data_ptr<float>();
  const int64_t ldzo = out_rows.first ? out_rows.second : z.stride(0);
  check_f32(Bt, "Bt", {R, N});
  check_f32_rows(h, "h", M, R);
  check_f32(f, "f", {N});
  const float* bp = nullptr;
  if (bias.has_value()) {
    check_f32(*bias, "bias", {N});
    bp = bias->data_ptr<float>();
  }
  auto out = at::empty({M, N}, z.options().dtype(out_dtype));
  const int dt_out = dtype_code(out);
  const float* zp = z.data_ptr<float>();
  const float *hp = h.data_ptr<float>(), *Btp = Bt.data_ptr<float>(), *fp = f.data_ptr<float>();
  void* op = out.data_ptr();
  const int64_t ldz = z.stride(0), ldh = h.stride(0), ldo = out.stride(0);
  at::parallel_for(0, M, grain(N * (R + 4)), [&](int64_t b, int64_t e) {
    K().dora_epilogue_rows(zp, ldz, zo, ldzo, basep, ldb, N, b, e, hp, ldh, R, Btp, float(k), float(s), fp, bp,
                           dt_out, op, ldo);
  });
  return out;
}

// sum_m a[m, :] * b[m, :] as fp32 (N,), products and sums in fp32: a, b (M, N) activation rows.
at::Tensor column_dots(const at::Tensor& a, const at::Tensor& b) {
  check_rows(a, "a");
  check_rows(b, "b");
  TORCH_CHECK(a.sizes() == b.sizes(), "fastpeft._C.column_dots: a ", a.sizes(), " and b ", b.sizes(), " differ");
  const int64_t M = a.size(0), N = a.size(1);
  auto out = at::zeros({N}, at::kFloat);
  const int dt_a = dtype_code(a), dt_b = dtype_code(b);
  const void* ap = a.data_ptr();
  const void* bp = b.data_ptr();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, grain(8 * M), [&](int64_t n0, int64_t n1) {
    K().column_dots_cols(dt_a, ap, a.stride(0), dt_b, bp, b.stride(0), M, n0, n1, o + n0);
  });
  return out;
}

// DoRA's backward prologue in one pass over dy (M, N): {dots, ge} with dots (N,) fp32 = column_dots(dy, z) (empty
// without z) and ge ((2 if with_e else 1) M, N) in dy's dtype: round(dy * scale) above round(dy * (scale - 1)), the
// roundings of scale_columns. z (M, N) any float dtype, scale fp32 (N,). Threads split the columns, as column_dots.
std::vector<at::Tensor> dora_grad_prologue(const at::Tensor& dy, const c10::optional<at::Tensor>& z,
                                           const at::Tensor& scale, bool with_e) {
  check_rows(dy, "dy");
  const int64_t M = dy.size(0), N = dy.size(1);
  check_f32(scale, "scale", {N});
  const void* zp = nullptr;
  int dt_z = kF32;
  int64_t ldz = 0;
  if (z.has_value()) {
    check_rows(*z, "z");
    TORCH_CHECK(z->sizes() == dy.sizes(), "fastpeft._C.dora_grad_prologue: dy ", dy.sizes(), " and z ", z->sizes(),
                " differ");
    zp = z->data_ptr();
    dt_z = dtype_code(*z);
    ldz = z->stride(0);
  }
  auto dots = z.has_value() ? at::zeros({N}, at::kFloat) : at::empty({0}, at::kFloat);
  auto ge = at::empty({(with_e ? 2 : 1) * M, N}, dy.options());
  const int dt = dtype_code(dy);
  const void* dp = dy.data_ptr();
  void* gp = ge.data_ptr();
  float* op = z.has_value() ? dots.data_ptr<float>() : nullptr;
  const float* sp = scale.data_ptr<float>();
  at::parallel_for(0, N, grain(8 * M * (with_e ? 3 : 2)), [&](int64_t n0, int64_t n1) {
    K().dora_prologue_cols(dt, dp, dy.stride(0), dt_z, zp, ldz, M, n0, n1, sp, op ? op + n0 : nullptr, gp, N,
                           with_e);
  });
  return {dots, ge};
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

// xa = drop(x) A^T in fp32: x (M, K) fp32/bf16/fp16, A (r, K) fp32 contiguous -> (M, r) fp32. transposed: by
// xa_rows_t over A transposed once per call (the two kernels sum in different orders; which is faster depends on the
// CPU, M and r, so fastpeft.backends.cpu measures it: op lora_down), else by xa_rows.
at::Tensor lora_xa(const at::Tensor& x, const at::Tensor& A, double p, int64_t seed, bool transposed) {
  check_rows(x, "x");
  const int64_t M = x.size(0), Kd = x.size(1), r = A.size(0);
  check_f32(A, "A", {r, Kd});
  auto xa = at::empty({M, r}, at::kFloat);
  const int dt = dtype_code(x);
  const void* xp = x.data_ptr();
  const int64_t ldx = x.stride(0);
  float* out = xa.data_ptr<float>();
  const float* Ap = A.data_ptr<float>();
  const int64_t gr = grain(Kd * (r + (p > 0 ? 20 : 0)));
  if (transposed) {
    // A transposed, its columns zero-padded to whole vectors.
    const KernelTable& kt = K();
    const int64_t RP = (r + kt.vector_width - 1) / kt.vector_width * kt.vector_width;
    at::Tensor At = at::zeros({Kd, RP}, at::kFloat);
    kt.transpose_f32(Ap, Kd, r, Kd, At.data_ptr<float>(), RP);
    const float* Atp = At.data_ptr<float>();
    at::parallel_for(0, M, gr, [&](int64_t b, int64_t e) {
      std::vector<float> buf(down_t_rows * down_t_chunk);
      kt.xa_rows_t(dt, xp, ldx, Kd, b, e, Atp, r, RP, float(p), uint32_t(seed), out, r, buf.data());
    });
    return xa;
  }
  at::parallel_for(0, M, gr, [&](int64_t b, int64_t e) {
    std::vector<float> buf(4 * Kd);
    K().xa_rows(dt, xp, ldx, Kd, b, e, Ap, r, float(p), uint32_t(seed), out, r, buf.data());
  });
  return xa;
}

// y += xs Bt + bias in place: y (M, N) any float dtype, xs (M, R) fp32 (scaled), Bt (R, N) fp32 contiguous (the
// adapters' B transposed: the passes stream its rows; fastpeft.backends.cpu keeps that copy across calls, since
// making it here per call cost more than the whole update at decode sizes), bias (N,) fp32.
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
    K().expand_rows(dt, yp, ldy, N, b, e, xsp, R, R, Btp, bp);
  });
}

template <typename T>
void transpose_into(const T* src, int64_t s0, int64_t s1, int64_t N, int64_t r, float* dst, int64_t ldd) {
  for (int64_t j = 0; j < r; ++j)
    for (int64_t n = 0; n < N; ++n) dst[j * ldd + n] = static_cast<float>(src[n * s0 + j * s1]);
}

// The adapters' B_i (N, r_i), checked: 2-D CPU tensors of a float dtype with one number of rows. Returns sum r_i.
int64_t total_rank(const std::vector<at::Tensor>& Bs, const char* op) {
  TORCH_CHECK(!Bs.empty(), "fastpeft._C.", op, ": no adapters");
  const int64_t N = Bs[0].dim() == 2 ? Bs[0].size(0) : -1;
  int64_t R = 0;
  for (const auto& B : Bs) {
    TORCH_CHECK(B.device().is_cpu() && B.dim() == 2 && B.size(0) == N, "fastpeft._C.", op, ": every B must be a "
                "2-D CPU tensor with ", N, " rows, got ", B.sizes());
    dtype_code(B);
    R += B.size(1);
  }
  return R;
}

// The adapters' B_i (N, r_i), any strides, fp32/bf16/fp16, transposed and stacked into (sum r_i, N) contiguous
// fp32: the layout lora_epilogue_ and lora_dy_pass's row pass stream. One blocked sweep; torch's strided copy of a
// transposed (N, 16) view (B.t().contiguous()) took several times longer, per call, for the adapters that train.
at::Tensor stack_transposed(const std::vector<at::Tensor>& Bs) {
  const int64_t R = total_rank(Bs, "stack_transposed"), N = Bs[0].size(0);
  auto out = at::empty({R, N}, at::kFloat);
  float* o = out.data_ptr<float>();
  for (const auto& B : Bs) {
    const int64_t r = B.size(1), s0 = B.stride(0), s1 = B.stride(1);
    switch (B.scalar_type()) {
      case at::kFloat:
        if (s1 == 1) K().transpose_f32(B.data_ptr<float>(), s0, N, r, o, N);  // fp32 adapters, row-major B
        else transpose_into(B.data_ptr<float>(), s0, s1, N, r, o, N);
        break;
      case at::kBFloat16: transpose_into(B.data_ptr<at::BFloat16>(), s0, s1, N, r, o, N); break;
      default: transpose_into(B.data_ptr<at::Half>(), s0, s1, N, r, o, N); break;
    }
    o += r * N;
  }
  return out;
}

// Over an (M, C) problem by column strips, each strip's dropout mask drawn once: out (R, C) = coef^T drop(src) (if
// src) and dst += (coef rows) * mask in place (if dst; rows (R, C) fp32). src, dst: rows of any float dtype. Threads
// own disjoint column ranges, so no partial sums exist and the result does not depend on the thread count.
void column_passes(const at::Tensor* src, at::Tensor* dst, const float* rows, int64_t M, int64_t C, const float* coef,
                   int64_t ldc, int64_t R, double p, int64_t seed, float* out,
                   const MaskedCorrection* corr = nullptr) {
  if (M == 0) {  // no rows: the sums are zero (an empty src's data pointer is null, which outer_cols reads as "no src")
    if (out) std::fill(out, out + R * C, 0.f);
    return;
  }
  const int dt = src ? dtype_code(*src) : kF32, dt_dst = dst ? dtype_code(*dst) : kF32;
  const void* sp = src ? src->data_ptr() : nullptr;
  void* dp = dst ? dst->data_ptr() : nullptr;
  const int64_t lds = src ? src->stride(0) : 0, ldd = dst ? dst->stride(0) : 0;
  // Work in units of outer_split_cols columns (a whole number of every ISA's strips): ~M * R * outer_split_cols
  // multiply-adds per product per unit, plus the mask's Philox draws.
  const int64_t W = outer_split_cols, units = (C + W - 1) / W;
  const int64_t per_unit = M * W * (R * ((src ? 1 : 0) + (dst ? 1 : 0)) + (p > 0 ? 20 : 0));
  at::parallel_for(0, units, grain(per_unit), [&](int64_t b, int64_t e) {
    // Every mask element is written before it is read: no zero-filling of the scratch.
    std::unique_ptr<float[]> mask(p > 0 ? new float[std::min(M, outer_mask_rows) * outer_mask_cols] : nullptr);
    K().outer_cols(dt, sp, lds, M, C, b * W, std::min(C, e * W), coef, ldc, R, float(p), uint32_t(seed), out, C,
                   dt_dst, dp, ldd, rows, mask.get(), corr);
  });
}

// Whether K().dy_outer_cols takes a total rank R (one or two vectors of this code path).
bool dy_outer_takes(int64_t R) { return R == K().vector_width || R == 2 * K().vector_width; }

// Columns per unit of dy_pass_outer's work: set by N alone, so the units' shares of g, summed in unit order, give the
// same bits whatever the thread count. N / 8 rounded up to a multiple of 32 columns: at most eight units, and as
// wide as that allows, since narrower units read dY in runs too short for the prefetchers (BENCHMARKS.md times
// both).
int64_t dy_outer_unit(int64_t N) { return std::max<int64_t>(32, (N + 255) / 256 * 32); }

// xs[m * R + j] = xa[m, j] * svec[j]: the down-projection with each adapter's scale, so that the sums of dB over it
// come out scaled. xa (M, R), svec (R,): contiguous fp32.
std::vector<float> scaled_xa(const at::Tensor& xa, const at::Tensor& svec) {
  const int64_t M = xa.size(0), R = xa.size(1);
  const float *xap = xa.data_ptr<float>(), *sp = svec.data_ptr<float>();
  std::vector<float> xs(size_t(M * R));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < R; ++j) xs[m * R + j] = xap[m * R + j] * sp[j];
  return xs;
}

// g (M, R) = (dy B) * svec, dB (N, R) = svec * (dy^T xa) and, with need_colsum, colsum (N,) = dy.sum(0) (unscaled;
// else undefined) in one sweep over dy by K().dy_outer_cols (R must pass dy_outer_takes). dy (M, N) rows of
// fp32/bf16/fp16 with unit column stride; B: (N, R) contiguous fp32 (PEFT's layout, adapters side by side); xa (M, R)
// contiguous fp32, svec (R,) fp32. Threads take whole units of columns: each unit writes its columns of dB and colsum
// and its share of g, and the shares are summed in unit order.
std::vector<at::Tensor> dy_pass_outer(const at::Tensor& dy, const at::Tensor& B, const at::Tensor& xa,
                                      const at::Tensor& svec, bool need_colsum) {
  const int64_t M = dy.size(0), N = dy.size(1), R = B.size(1);
  auto g = at::zeros({M, R}, at::kFloat);
  if (M == 0 || N == 0)
    return {g, at::zeros({N, R}, at::kFloat), need_colsum ? at::zeros({N}, at::kFloat) : at::Tensor()};
  auto dB = at::empty({N, R}, at::kFloat);  // every element written by its unit
  at::Tensor colsum = need_colsum ? at::empty({N}, at::kFloat) : at::Tensor();
  float* csp = need_colsum ? colsum.data_ptr<float>() : nullptr;
  const float* sp = svec.data_ptr<float>();
  const std::vector<float> xs = scaled_xa(xa, svec);
  const float* Bp = B.data_ptr<float>();
  const int64_t unit = dy_outer_unit(N), units = (N + unit - 1) / unit;
  std::vector<float> shares(size_t(units * M * R));
  const int dt = dtype_code(dy);
  const void* dyp = dy.data_ptr();
  const int64_t ldd = dy.stride(0);
  float* dBp = dB.data_ptr<float>();
  at::parallel_for(0, units, grain(M * unit * 2 * R), [&](int64_t b, int64_t e) {
    std::vector<float> buf(dt == kF32 ? 0 : size_t(outer_rows_max * unit));
    for (int64_t u = b; u < e; ++u)
      K().dy_outer_cols(dt, dyp, ldd, M, u * unit, std::min(N, (u + 1) * unit), Bp, R, xs.data(),
                        shares.data() + u * M * R, dBp, csp, buf.data());
  });
  float* gp = g.data_ptr<float>();
  for (int64_t u = 0; u < units; ++u) {
    const float* share = shares.data() + u * M * R;
    for (int64_t i = 0; i < M * R; ++i) gp[i] += share[i];
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < R; ++j) gp[m * R + j] *= sp[j];
  return {g, dB, colsum};
}

// g (M, R) = (dy B) * svec, dB (N, R) = svec * (dy^T xa) or empty, and colsum (N,) = dy.sum(0) (unscaled) or empty,
// for the adapters Bs (B_i (N, r_i) as PEFT keeps them, any float dtype; B = [B_1 ... B_k], R = sum r_i). xa (M, R)
// fp32, svec (R,) fp32. Two kernels compute the same sums in different orders, and the cpu backend measures which
// is faster per shape: with `outer` one sweep of outer products over B's own layout (dy_pass_outer; one contiguous
// fp32 B read where it lies; needs dB and an R that dy_outer_takes), else one sweep over the rows of dy against B^T
// for g and sweeps of column strips for dB and for the column sums. Both split the work by columns wherever they sum
// over rows, so no result depends on the thread count.
std::vector<at::Tensor> lora_dy_pass(const at::Tensor& dy, const std::vector<at::Tensor>& Bs, const at::Tensor& xa,
                                     const at::Tensor& svec, bool need_dB, bool need_colsum, bool outer) {
  check_rows(dy, "grad_y");
  const int64_t M = dy.size(0), N = dy.size(1), R = total_rank(Bs, "lora_dy_pass");
  TORCH_CHECK(Bs[0].size(0) == N, "fastpeft._C.lora_dy_pass: B has ", Bs[0].size(0), " rows, dy ", N, " columns");
  check_f32(xa, "xa", {M, R});
  check_f32(svec, "svec", {R});
  if (outer) {
    TORCH_CHECK(need_dB && dy_outer_takes(R), "fastpeft._C.lora_dy_pass: the outer-product kernel computes dB and "
                "takes a total rank of one or two vectors of this SIMD path (", K().vector_width, " or ",
                2 * K().vector_width, " fp32 lanes), got need_dB=", need_dB, " and rank ", R);
    const bool in_place = Bs.size() == 1 && Bs[0].scalar_type() == at::kFloat && Bs[0].is_contiguous();
    std::vector<at::Tensor> as_f32;
    if (!in_place)
      for (const auto& B : Bs) as_f32.push_back(B.to(at::kFloat));
    return dy_pass_outer(dy, in_place ? Bs[0] : at::cat(as_f32, 1), xa, svec, need_colsum);
  }
  const at::Tensor Bt = stack_transposed(Bs);
  auto g = at::empty({M, R}, at::kFloat);
  const int dt = dtype_code(dy);
  const void* dyp = dy.data_ptr();
  const int64_t ldd = dy.stride(0);
  const float *Btp = Bt.data_ptr<float>(), *sp = svec.data_ptr<float>();
  float* gp = g.data_ptr<float>();
  at::parallel_for(0, M, grain(N * R), [&](int64_t b, int64_t e) {
    std::vector<float> buf(4 * N);
    K().dy_rows(dt, dyp, ldd, N, b, e, Btp, R, sp, gp, buf.data());
  });
  at::Tensor dB, colsum;
  if (need_dB) {  // over xa * svec, then B's own (N, r) layout by the blocked transpose
    const std::vector<float> xs = scaled_xa(xa, svec);
    auto dBt = at::empty({R, N}, at::kFloat);  // every element written: no zeroing
    column_passes(&dy, nullptr, nullptr, M, N, xs.data(), R, R, 0.0, 0, dBt.data_ptr<float>());
    dB = at::empty({N, R}, at::kFloat);
    K().transpose_f32(dBt.data_ptr<float>(), N, R, N, dB.data_ptr<float>(), R);
  }
  if (need_colsum) {  // a pass of its own, so that dB's sums are blocked the same with and without it
    const std::vector<float> ones(size_t(M), 1.f);
    colsum = at::empty({N}, at::kFloat);
    column_passes(&dy, nullptr, nullptr, M, N, ones.data(), 1, 1, 0.0, 0, colsum.data_ptr<float>());
  }
  return {g, dB, colsum};
}

// For one adapter: dx += (g A) * mask/(1-p) in place (if dx given) and dA = g^T drop(x) (r, K) fp32 returned (if x
// given, else empty). With dropout, one sweep over column strips of x and dx, each strip's mask drawn once for both.
// g (M, r) fp32 with unit column stride, A (r, K) fp32. With extra (fp32 (M, K) rows) and out ((M, K) rows), p > 0:
// dx is only read and out = round(dx + (g A) * mask/(1-p) + (mask/(1-p) - 1) * extra) instead (DoRA's dropout
// correction of dX in the same sweep).
at::Tensor lora_dx_pass(const c10::optional<at::Tensor>& dx, const c10::optional<at::Tensor>& x, const at::Tensor& A,
                        const at::Tensor& g, double p, int64_t seed, const c10::optional<at::Tensor>& extra,
                        const c10::optional<at::Tensor>& out_rows) {
  const int64_t r = A.size(0), Kd = A.size(1), M = g.size(0);
  check_f32(A, "A", {r, Kd});
  check_f32_rows(g, "g", -1, r);
  at::Tensor dxt, xt, dA;
  if (dx.has_value()) {
    dxt = *dx;
    check_rows(dxt, "dx");
    TORCH_CHECK(dxt.size(0) == M && dxt.size(1) == Kd, "fastpeft._C: dx shape mismatch");
  }
  if (x.has_value()) {
    xt = *x;
    check_rows(xt, "x");
    TORCH_CHECK(xt.size(0) == M && xt.size(1) == Kd, "fastpeft._C: x shape mismatch");
    dA = at::empty({r, Kd}, at::kFloat);
  }
  MaskedCorrection corr{};
  const bool corrected = extra.has_value() || out_rows.has_value();
  if (corrected) {
    TORCH_CHECK(extra.has_value() && out_rows.has_value() && dx.has_value() && p > 0,
                "fastpeft._C.lora_dx_pass: extra and out go together, with dx and p > 0");
    check_rows(*extra, "extra");
    TORCH_CHECK(extra->scalar_type() == at::kFloat && extra->size(0) == M && extra->size(1) == Kd,
                "fastpeft._C.lora_dx_pass: extra must be fp32 (", M, ", ", Kd, "), got ", extra->scalar_type(), " ",
                extra->sizes());
    check_rows(*out_rows, "out");
    TORCH_CHECK(out_rows->size(0) == M && out_rows->size(1) == Kd, "fastpeft._C.lora_dx_pass: out must be (", M,
                ", ", Kd, "), got ", out_rows->sizes());
    corr = MaskedCorrection{extra->data_ptr<float>(), extra->stride(0), dtype_code(*out_rows), out_rows->data_ptr(),
                            out_rows->stride(0)};
  }
  const float *Ap = A.data_ptr<float>(), *gp = g.data_ptr<float>();
  const int64_t ldg = g.stride(0);
  // Without dropout there is no mask to share: dx by the row-wise sweep, which streams dx in order (column strips
  // of dx read it row by row at a stride, and were slower), then dA by column strips.
  at::Tensor* dx_in_strips = (dx.has_value() && p > 0) ? &dxt : nullptr;
  if (dx.has_value() && p <= 0) {
    void* dxp = dxt.data_ptr();
    const int dt_dx = dtype_code(dxt);
    const int64_t lddx = dxt.stride(0);
    at::parallel_for(0, M, grain(Kd * r), [&](int64_t b, int64_t e) {
      K().expand_rows(dt_dx, dxp, lddx, Kd, b, e, gp, ldg, r, Ap, nullptr);
    });
  }
  if (x.has_value() || dx_in_strips)
    column_passes(x.has_value() ? &xt : nullptr, dx_in_strips, Ap, M, Kd, gp, ldg, r, p, seed,
                  x.has_value() ? dA.data_ptr<float>() : nullptr, corrected ? &corr : nullptr);
  return dA;
}

// a (M, N) @ w (N, K) as fp32 (M, K): one pass over w in column strips (threads split the columns), each strip's
// products with every row of a accumulated in fp32 registers, so w is read once whatever M is; a and w in fp32,
// bf16 or fp16 (each product of two bf16/fp16 values is exact in fp32), rows of unit column stride. LoRA's dY W at
// decode-sized M, where a vendor GEMM runs as a GEMV of its own.
at::Tensor strip_mm(const at::Tensor& a, const at::Tensor& w) {
  check_rows(a, "a");
  check_rows(w, "w");
  const int64_t M = a.size(0), N = a.size(1), Kd = w.size(1);
  TORCH_CHECK(w.size(0) == N, "fastpeft._C: strip_mm: a is (", M, ", ", N, ") but w has ", w.size(0), " rows");
  // The coefficients the strips read: a^T as fp32 (N, M), row n holding column n of a (a few KB at decode sizes).
  at::Tensor coef = at::empty({N, M}, at::kFloat);
  coef.copy_(a.t());
  at::Tensor out = at::empty({M, Kd}, at::kFloat);
  if (M == 0 || Kd == 0) return out;
  column_passes(&w, nullptr, nullptr, N, Kd, coef.data_ptr<float>(), M, M, 0.0, 0, out.data_ptr<float>());
  return out;
}

// ------------------------------------------------------------------------------------ quantized base weights
// Python (cpu.py, _quant_args) passes a quantized weight as one tuple:
//   (kind, N, K, data, absmax, nested_absmax|None, nested_code|None, nested_offset, nested_blocksize, blocksize,
//    code|None, round1, round2)
// kind 0: 4-bit (data uint8 packed, absmax fp32 or uint8 under double quantization, code (16,) fp32);
// kind 1: int8 (data int8 (N, K), absmax = SCB (N,) fp32). round1/round2: dtype codes the dequantized values are
// rounded to, in order (see kernels.h). The tuple's tensors stay alive for the call.
struct QuantArg {
  QuantDesc d;
  std::vector<at::Tensor> keep;
};

QuantArg parse_quant(const py::tuple& t) {
  TORCH_CHECK(t.size() == 13, "fastpeft._C: quantized weight tuple needs 13 fields, got ", t.size());
  QuantArg q{};
  QuantDesc& d = q.d;
  d.kind = t[0].cast<int>();
  d.N = t[1].cast<int64_t>();
  d.K = t[2].cast<int64_t>();
  TORCH_CHECK(d.kind == 0 || d.kind == 1, "fastpeft._C: quantized weight kind must be 0 (4-bit) or 1 (int8)");
  TORCH_CHECK(d.N > 0 && d.K > 0, "fastpeft._C: quantized weight shape must be positive, got ", d.N, "x", d.K);
  auto tensor = [&](int i, const char* name) {
    auto v = t[i].cast<at::Tensor>();
    TORCH_CHECK(v.device().is_cpu() && v.is_contiguous(), "fastpeft._C: quantized ", name,
                " must be a contiguous CPU tensor");
    q.keep.push_back(v);
    return v;
  };
  const at::Tensor data = tensor(3, "data"), absmax = tensor(4, "absmax");
  d.data = static_cast<const uint8_t*>(data.data_ptr());
  d.round1 = t[11].cast<int>();
  d.round2 = t[12].cast<int>();
  if (d.kind == 1) {
    TORCH_CHECK(data.scalar_type() == at::kChar && data.numel() == d.N * d.K, "fastpeft._C: int8 weight data must "
                "be int8 with N*K = ", d.N * d.K, " elements, got ", data.scalar_type(), " ", data.numel());
    TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.numel() == d.N, "fastpeft._C: int8 row scales (SCB) "
                "must be fp32 (N,) = (", d.N, ",), got ", absmax.scalar_type(), " ", absmax.numel());
    d.absmax = absmax.data_ptr<float>();
    return q;
  }
  d.blocksize = t[9].cast<int64_t>();
  TORCH_CHECK(d.blocksize > 0 && d.blocksize % 2 == 0, "fastpeft._C: 4-bit blocksize must be even and positive, got ",
              d.blocksize);
  const int64_t nblocks = (d.N * d.K + d.blocksize - 1) / d.blocksize;
  TORCH_CHECK(data.scalar_type() == at::kByte && data.numel() >= (d.N * d.K + 1) / 2, "fastpeft._C: 4-bit data "
              "must be uint8 with ceil(N*K/2) = ", (d.N * d.K + 1) / 2, " bytes, got ", data.scalar_type(), " ",
              data.numel());
  TORCH_CHECK(absmax.numel() >= nblocks, "fastpeft._C: 4-bit absmax needs ", nblocks, " blocks, got ", absmax.numel());
  const at::Tensor code = tensor(10, "code");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16, "fastpeft._C: 4-bit code table must be fp32 (16,)");
  std::memcpy(d.code, code.data_ptr<float>(), sizeof(d.code));
  if (absmax.scalar_type() == at::kByte) {
    TORCH_CHECK(!t[5].is_none() && !t[6].is_none(), "fastpeft._C: uint8 absmax needs the nested (double "
                "quantization) tables");
    const at::Tensor nested_absmax = tensor(5, "nested_absmax"), nested_code = tensor(6, "nested_code");
    d.nested_blocksize = t[8].cast<int64_t>();
    TORCH_CHECK(d.nested_blocksize > 0, "fastpeft._C: nested blocksize must be positive");
    TORCH_CHECK(nested_absmax.scalar_type() == at::kFloat &&
                    nested_absmax.numel() >= (nblocks + d.nested_blocksize - 1) / d.nested_blocksize,
                "fastpeft._C: nested_absmax must be fp32 with ceil(nblocks / nested_blocksize) elements");
    TORCH_CHECK(nested_code.scalar_type() == at::kFloat && nested_code.numel() == 256,
                "fastpeft._C: nested_code must be fp32 (256,)");
    d.qabsmax = absmax.data_ptr<uint8_t>();
    d.nested_absmax = nested_absmax.data_ptr<float>();
    d.nested_code = nested_code.data_ptr<float>();
    d.nested_offset = float(t[7].cast<double>());
  } else {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat, "fastpeft._C: 4-bit absmax must be fp32 or uint8 (nested), got ",
                absmax.scalar_type());
    d.absmax = absmax.data_ptr<float>();
  }
  return q;
}

void check_dense_f32(const at::Tensor& t, const char* name, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2 &&
                  t.size(1) == cols,
              "fastpeft._C: ", name, " must be contiguous fp32 (rows, ", cols, "), got ", t.scalar_type(), " ",
              t.sizes());
}

// Rows of weight per dequantized tile: ~1 MB of fp32 (cache-resident between the decode and the GEMM that reads
// it), at least 16. FASTPEFT_CPU_QTILE overrides (benchmarking aid).
// An explicit `requested` > 0 wins (tests use it to cover several tiles and a partial last one).
int64_t tile_rows(int64_t N, int64_t Kd, int64_t requested) {
  static const int64_t forced = [] {
    const char* v = std::getenv("FASTPEFT_CPU_QTILE");
    return v ? std::atoll(v) : 0;
  }();
  if (requested <= 0) requested = forced;
  int64_t rows = requested > 0 ? requested : std::max<int64_t>(16, (int64_t(1) << 18) / std::max<int64_t>(1, Kd));
  return std::min(rows, N);
}

// Rows [n0, n1) of the weight decoded into out (contiguous rows of K elements of dtype dt), in one parallel pass.
void dequant_tile(const QuantDesc& d, int64_t n0, int64_t n1, void* out, int dt = kF32) {
  at::parallel_for(n0, n1, std::max<int64_t>(1, 16384 / d.K), [&](int64_t b, int64_t e) {
    K().dequant_rows(d, b, e, dt, static_cast<char*>(out) + (b - n0) * d.K * element_size(dt), d.K);
  });
}

// The dense (N, K) fp32 weight (rounded per round1/round2), in one parallel pass.
at::Tensor quant_dequantize(const py::tuple& qt) {
  const QuantArg q = parse_quant(qt);
  auto out = at::empty({q.d.N, q.d.K}, at::kFloat);
  dequant_tile(q.d, 0, q.d.N, out.data_ptr<float>());
  return out;
}

// The dense (N, K) weight decoded into a caller's reusable buffer of fp32, bf16 or fp16 (contiguous). The values
// are rounded per round1/round2 first, so when ``out`` has x's dtype the final store is exact.
void quant_dequantize_into(const py::tuple& qt, at::Tensor out) {
  const QuantArg q = parse_quant(qt);
  const int64_t N = q.d.N, Kd = q.d.K;
  TORCH_CHECK(out.device().is_cpu() && out.dim() == 2 && out.size(0) == N && out.size(1) == Kd && out.is_contiguous(),
              "fastpeft._C: out must be a contiguous CPU (", N, ", ", Kd, ") tensor, got ", out.sizes());
  dequant_tile(q.d, 0, N, out.data_ptr(), dtype_code(out));
}

// Checks x (M, K) and bias (N,) of a product over w's (N, K), and B (N, R) of its LoRA term where given.
void check_product_operands(const QuantDesc& d, const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& B, int64_t R) {
  check_dense_f32(x, "x", d.K);
  if (B.has_value()) check_f32(*B, "B", {d.N, R});
  if (bias.has_value()) check_f32(*bias, "bias", {d.N});
}

// Checks the operands of y = x w^T + bias + lora_scale xs B^T against w's (N, K); returns R (0 without xs/B).
int64_t check_product(const QuantDesc& d, const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& xs, const c10::optional<at::Tensor>& B) {
  TORCH_CHECK(xs.has_value() == B.has_value(), "fastpeft._C: the LoRA term needs both xs and B, or neither");
  const int64_t R = xs.has_value() ? xs->size(1) : 0;
  if (xs.has_value()) check_f32(*xs, "xs", {x.size(0), R});
  check_product_operands(d, x, bias, B, R);
  return R;
}

// Weight rows worth a thread in the decoding GEMV: ~64k multiply-adds.
int64_t gemv_grain(const QuantDesc& d, int64_t M) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, d.K * M));
}
// The GEMV's threads take whole groups of this many weight rows (qgemv_rows dots dense rows four at a time, and a
// row's sums depend on whether it falls in a group of four): the result is the same on any number of threads.
constexpr int64_t kGemvRowGroup = 4;

// The one-pass GEMV (kernels.h: qgemv_rows) over any QuantDesc: y = x w^T + bias + lora_scale xs B^T (M, N) fp32,
// threads taking whole groups of kGemvRowGroup weight rows. With A (R, K) fp32 contiguous in place of xs, xs = x A^T
// is computed first in the same parallel region: the threads split A's rows, meet at a barrier, then split the
// weight's rows (A, R * K floats from memory in a decode step, was one thread's serial step before the GEMV). Each
// output's sums are the same whichever thread computes it.
at::Tensor gemv_product(const QuantDesc& d, const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                        const c10::optional<at::Tensor>& xs, const c10::optional<at::Tensor>& B, int64_t R,
                        double lora_scale, int prefetch = kPrefetchNonTemporal, const at::Tensor* A = nullptr) {
  const int64_t M = x.size(0), N = d.N, Kd = d.K;
  auto y = at::empty({M, N}, at::kFloat);
  if (M == 0) return y;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const float* Bp = R ? B->data_ptr<float>() : nullptr;
  at::Tensor h = A ? at::empty({M, R}, at::kFloat) : at::Tensor();
  const float* lora = A ? h.data_ptr<float>() : (R ? xs->data_ptr<float>() : nullptr);
  const int64_t groups = (N + kGemvRowGroup - 1) / kGemvRowGroup;
  const int64_t grain = std::max<int64_t>(1, gemv_grain(d, M) / kGemvRowGroup);
  const size_t buf_floats = size_t(std::max<int64_t>(4 * Kd, Kd + 64));
  auto down = [&](int64_t t, int64_t T, float* buf) {  // this thread's share of h = x A^T
    const int64_t r0 = R * t / T, r1 = R * (t + 1) / T;
    if (r1 > r0)
      K().xa_rows(kF32, xp, Kd, Kd, 0, M, A->data_ptr<float>() + r0 * Kd, r1 - r0, 0.f, 0u, h.data_ptr<float>() + r0,
                  R, buf);
  };
  auto rows = [&](int64_t g0, int64_t g1, float* buf) {  // weight row groups [g0, g1)
    const int64_t n0 = g0 * kGemvRowGroup, n1 = std::min(N, g1 * kGemvRowGroup);
    if (n1 > n0) K().qgemv_rows(d, n0, n1, xp, M, yp, N, bp, lora, Bp, R, float(lora_scale), buf, prefetch);
  };
#if AT_PARALLEL_OPENMP
  const int64_t threads =
      at::in_parallel_region() ? 1 : std::min<int64_t>(at::get_num_threads(), (groups + grain - 1) / grain);
#pragma omp parallel num_threads(std::max<int64_t>(1, threads))
  {
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
    std::vector<float> buf(buf_floats);
    if (A) {
      down(t, T, buf.data());
#pragma omp barrier
    }
    rows(groups * t / T, groups * (t + 1) / T, buf.data());
  }
#else
  if (A) {
    std::vector<float> buf(buf_floats);
    down(0, 1, buf.data());
  }
  at::parallel_for(0, groups, grain, [&](int64_t b, int64_t e) {
    std::vector<float> buf(buf_floats);
    rows(b, e, buf.data());
  });
#endif
  return y;
}

// y = x w^T + bias + lora_scale xs B^T in fp32 (M, N); x (M, K) fp32 contiguous; bias (N,), xs (M, R), B (N, R) fp32 or None.
// tile: rows per dequantized tile (0: ~1 MB of fp32, see tile_rows).
// M <= gemv_rows: the decoding GEMV (each weight row decoded once, in L1, LoRA term added in the same pass).
// Larger M: per tile of rows, decode into a cache-resident buffer, then torch's GEMM into the tile's columns of y,
// then the tile's LoRA term (a rank-R addmm while the tile is hot). The dense weight never exists whole.
at::Tensor quant_linear(const at::Tensor& x, const py::tuple& qt, const c10::optional<at::Tensor>& bias,
                        const c10::optional<at::Tensor>& xs, const c10::optional<at::Tensor>& B, double lora_scale,
                        int64_t gemv_rows, int64_t tile_request) {
  const QuantArg q = parse_quant(qt);
  const QuantDesc& d = q.d;
  const int64_t R = check_product(d, x, bias, xs, B);
  const int64_t M = x.size(0), N = d.N;
  if (M <= gemv_rows) return gemv_product(d, x, bias, xs, B, R, lora_scale);
  auto y = at::empty({M, N}, at::kFloat);
  const int64_t tn = tile_rows(N, d.K, tile_request);
  auto tile = at::empty({tn, d.K}, at::kFloat);
  for (int64_t n0 = 0; n0 < N; n0 += tn) {
    const int64_t nb = std::min(tn, N - n0);
    dequant_tile(d, n0, n0 + nb, tile.data_ptr<float>());
    auto w = tile.narrow(0, 0, nb);
    auto yt = y.narrow(1, n0, nb);
    if (bias.has_value())
      at::addmm_out(yt, bias->narrow(0, n0, nb), x, w.t());
    else
      at::mm_out(yt, x, w.t());
    if (R) yt.addmm_(*xs, B->narrow(0, n0, nb).t(), 1.0, lora_scale);
  }
  return y;
}

// out[m * C + c] = float(in[m * ld + c]) for a 16-bit element type T (c10's exact widening).
template <typename T>
void widen_rows(const T* in, int64_t ld, int64_t M, int64_t C, float* out) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < C; ++c) out[m * C + c] = float(in[m * ld + c]);
}

// t (M, K) as contiguous fp32: a 16-bit t with unit column stride widened by a plain loop here (torch's conversion
// costs a dispatch that matters at decode sizes), anything else by torch.
at::Tensor widened_rows(const at::Tensor& t) {
  const auto st = t.scalar_type();
  if (st == at::kFloat || t.dim() != 2 || t.stride(1) != 1 || (st != at::kBFloat16 && st != at::kHalf))
    return contiguous_f32(t);
  const int64_t M = t.size(0), C = t.size(1), ld = t.stride(0);
  auto out = at::empty({M, C}, at::kFloat);
  if (st == at::kBFloat16) widen_rows(t.data_ptr<at::BFloat16>(), ld, M, C, out.data_ptr<float>());
  else widen_rows(t.data_ptr<at::Half>(), ld, M, C, out.data_ptr<float>());
  return out;
}

// out[i] = T(in[i]) for i < n: c10's round-to-nearest-even conversion, as torch's .to.
template <typename T>
void narrow_all(const float* in, int64_t n, T* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = T(in[i]);
}

// y (M, N) fp32 contiguous rounded to bf16/fp16 (round to nearest even, c10's conversions, as torch's .to).
at::Tensor narrowed_rows(const at::Tensor& y, at::ScalarType st) {
  if (st != at::kBFloat16 && st != at::kHalf) return y.to(st);
  auto out = at::empty(y.sizes(), y.options().dtype(st));
  if (st == at::kBFloat16) narrow_all(y.data_ptr<float>(), y.numel(), out.data_ptr<at::BFloat16>());
  else narrow_all(y.data_ptr<float>(), y.numel(), out.data_ptr<at::Half>());
  return out;
}

QuantDesc dense_desc(const at::Tensor& W) {
  check_rows(W, "W");
  QuantDesc d{};
  d.kind = 2;
  d.wdtype = dtype_code(W);
  d.N = W.size(0);
  d.K = W.size(1);
  d.ldw = W.stride(0);
  d.data = static_cast<const uint8_t*>(W.data_ptr());
  return d;
}

}  // namespace

// The one-pass GEMV over a dense (N, K) weight (unit column stride, any row stride; fp32/bf16/fp16):
// y = x W^T + bias + lora_scale xs B^T in fp32 (M, N). For decode-sized M, where torch's GEMV plus separate
// adapter ops cost several thread-pool round trips for a few microseconds of work.
// x (..., K) in any float dtype (widened here: at decode sizes each torch call made from Python costs as much as
// the arithmetic), the result (..., N) rounded once to x's dtype. With A (r, K) fp32 contiguous instead of xs, the
// down-projection xs = x A^T is computed here too (lora_xa's kernel without dropout): a settled decode call is then
// one call from Python.
at::Tensor dense_lora_gemv(const at::Tensor& x, const at::Tensor& W, const c10::optional<at::Tensor>& bias,
                           const c10::optional<at::Tensor>& xs, const c10::optional<at::Tensor>& B,
                           double lora_scale, const c10::optional<at::Tensor>& A, int64_t prefetch) {
  TORCH_CHECK(prefetch == kPrefetchNone || prefetch == kPrefetchNonTemporal || prefetch == kPrefetchL2,
              "fastpeft._C.dense_lora_gemv: prefetch must be 0 (none), 1 (non-temporal) or 2 (L2), got ", prefetch);
  const QuantDesc d = dense_desc(W);
  // (..., K) -> (..., N): leading dimensions flattened here rather than by a reshape and a view from Python.
  const bool flat = x.dim() != 2;
  TORCH_CHECK(x.dim() >= 1, "fastpeft._C.dense_lora_gemv: x must have at least one dimension");
  const at::Tensor x32 = widened_rows(flat ? x.reshape({-1, x.size(-1)}) : x);
  at::Tensor y;
  if (A.has_value()) {
    TORCH_CHECK(!xs.has_value() && B.has_value(), "fastpeft._C.dense_lora_gemv: A takes the place of xs and needs B");
    const int64_t r = A->dim() == 2 ? A->size(0) : -1;
    check_f32(*A, "A", {r, d.K});
    check_product_operands(d, x32, bias, B, r);
    y = gemv_product(d, x32, bias, c10::nullopt, B, r, lora_scale, int(prefetch), &*A);
  } else {
    y = gemv_product(d, x32, bias, xs, B, check_product(d, x32, bias, xs, B), lora_scale, int(prefetch));
  }
  if (x.scalar_type() != at::kFloat) y = narrowed_rows(y, x.scalar_type());
  if (flat) {
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes.back() = d.N;
    y = y.view(sizes);
  }
  return y;
}

namespace {

// dX = dY w in fp32 (M, K); dy (M, N) fp32 contiguous. Tile by tile: dX += dY[:, tile] w[tile].
at::Tensor quant_grad_x(const at::Tensor& dy, const py::tuple& qt, int64_t tile_request) {
  const QuantArg q = parse_quant(qt);
  const QuantDesc& d = q.d;
  check_dense_f32(dy, "grad_y", d.N);
  const int64_t M = dy.size(0), N = d.N;
  auto dx = at::zeros({M, d.K}, at::kFloat);
  if (M == 0) return dx;
  const int64_t tn = tile_rows(N, d.K, tile_request);
  auto tile = at::empty({tn, d.K}, at::kFloat);
  for (int64_t n0 = 0; n0 < N; n0 += tn) {
    const int64_t nb = std::min(tn, N - n0);
    dequant_tile(d, n0, n0 + nb, tile.data_ptr<float>());
    dx.addmm_(dy.narrow(1, n0, nb), tile.narrow(0, 0, nb), n0 == 0 ? 0.0 : 1.0);
  }
  return dx;
}

// The fused backward of one adapter with fp32 A, B and h, in one call (each Python-side call of the sequence costs
// microseconds, which add up at small M): lora_dy_pass (g, dB, the column sums; its outer-product kernel with
// dy_outer), dx = dy W (W given) by at::mm in dy's dtype, or with strip by strip_mm in fp32 (the gemv route's one
// pass over W), then lora_dx_pass (dx += (g A) * mask in place, dA = g^T drop(x) when x is given), dx rounded once to
// dy's dtype. dy (M, N), W (N, K) and x (M, K) activations of one dtype (fp32, bf16 or fp16; any row stride).
// Returns [dx or undefined, dA or undefined, dB, db = s sum_m dy or undefined (need_db false: a pass over dy that no
// lora_bias reads)].
std::vector<at::Tensor> lora_fused_backward(const at::Tensor& dy, const c10::optional<at::Tensor>& W,
                                            const c10::optional<at::Tensor>& x, const at::Tensor& A,
                                            const at::Tensor& B, const at::Tensor& h, double s, double p,
                                            int64_t seed, bool need_db, bool dy_outer, bool strip) {
  const int64_t r = A.dim() == 2 ? A.size(0) : -1;
  TORCH_CHECK((!W.has_value() || W->scalar_type() == dy.scalar_type()) &&
                  (!x.has_value() || x->scalar_type() == dy.scalar_type()),
              "fastpeft._C.lora_fused_backward: dy, W and x must have one dtype, got dy ", dy.scalar_type(),
              W.has_value() ? ", W " : "", W.has_value() ? W->scalar_type() : dy.scalar_type(),
              x.has_value() ? ", x " : "", x.has_value() ? x->scalar_type() : dy.scalar_type());
  const at::Tensor dyc = unit_column_stride(dy);
  auto gdb = lora_dy_pass(dyc, {B}, h, at::full({r}, s, at::kFloat), true, need_db, dy_outer);
  c10::optional<at::Tensor> dx, xr;
  if (W.has_value()) dx = strip ? strip_mm(dyc, *W) : at::mm(dy, *W);
  if (x.has_value()) xr = unit_column_stride(*x);
  at::Tensor dA;
  if (dx.has_value() || xr.has_value()) dA = lora_dx_pass(dx, xr, A, gdb[0], p, seed, c10::nullopt, c10::nullopt);
  if (dx.has_value() && dx->scalar_type() != dy.scalar_type()) dx = dx->to(dy.scalar_type());
  return {dx.has_value() ? *dx : at::Tensor(), dA, gdb[1], need_db ? gdb[2].mul_(s) : at::Tensor()};
}

// The terms of one fp32 adapter that reach its input, from g = s dy B (M, r) fp32: dx += (g A) * mask/(1-p) in place
// (dx given) and dA = g^T drop(x) returned (x given, else undefined), as the Python composition takes them: with
// dropout by lora_dx_pass (the mask regenerated, one sweep for both); without, dx by an ATen GEMM in dx's dtype and
// dA by an ATen GEMM for fp32 x, by lora_dx_pass for 16-bit x (widened in registers, no copy). A (r, K) contiguous.
at::Tensor adapter_input_terms(const c10::optional<at::Tensor>& dx, const c10::optional<at::Tensor>& x,
                               const at::Tensor& A, const at::Tensor& g, double p, int64_t seed) {
  if (p != 0.0) {
    if (!dx.has_value() && !x.has_value()) return at::Tensor();
    c10::optional<at::Tensor> xr;
    if (x.has_value()) xr = unit_column_stride(*x);
    return lora_dx_pass(dx, xr, A, g, p, seed, c10::nullopt, c10::nullopt);
  }
  if (dx.has_value()) {  // 16-bit dx: addmm_ in its dtype (Tensor::to costs a dispatch even where it returns t)
    const auto dt = dx->scalar_type();
    if (dt == at::kFloat) dx->addmm_(g, A);
    else dx->addmm_(g.to(dt), A.to(dt));
  }
  if (!x.has_value()) return at::Tensor();
  if (x->scalar_type() == at::kFloat) return at::mm(g.t(), *x);
  return lora_dx_pass(c10::nullopt, unit_column_stride(*x), A, g, 0.0, 0, c10::nullopt, c10::nullopt);
}

// Backward of one fp32 adapter at decode-sized M, every step in one call (from Python each of the ~10 small
// products and reductions cost a dispatch comparable to its arithmetic):
//   g = s dy B;  dB = s dy^T h;  db = s sum_m dy;  dx = dy W + (g A) * mask;  dA = g^T drop(x)
// dy (M, N), W (N, K) (any strides), x (M, K) or None (no dA), A (r, K) contiguous, B (N, r), h (M, r): fp32.
// Returns [dx or undefined (need_dx false), dA or undefined, dB, db (undefined past the loops' M when need_db is
// false: a pass over dy that no lora_bias reads)].
std::vector<at::Tensor> lora_small_backward(const at::Tensor& dy, const at::Tensor& W, const c10::optional<at::Tensor>& x,
                                            const at::Tensor& A, const at::Tensor& B, const at::Tensor& h, double s,
                                            double p, int64_t seed, bool need_dx, bool need_db) {
  for (const at::Tensor* t : {&dy, &W, &A, &B, &h})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->device().is_cpu(),
                "fastpeft._C: lora_small_backward takes 2-D fp32 CPU tensors");
  const int64_t M = dy.size(0), N = dy.size(1), r = A.size(0), Kd = A.size(1);
  TORCH_CHECK(B.sizes() == at::IntArrayRef({N, r}) && h.sizes() == at::IntArrayRef({M, r}) && W.size(0) == N &&
                  W.size(1) == Kd,
              "fastpeft._C: lora_small_backward shapes disagree");
  at::Tensor dx = need_dx ? at::mm(dy, W) : at::Tensor();
  // M <= 4: the rank-r products with dy are a few thousand multiply-adds: plain loops on the calling thread (each
  // at::mm cost ~20 us of dispatch and thread-pool wake-up here, more than its arithmetic), then dx += g A and
  // dA = g^T x in one column pass (column_passes). Larger M: BLAS (the loops are SSE2 only, this file has no -mavx2,
  // and reach 2M multiply-adds at M=16).
  const bool loops = M <= 4;
  const at::Tensor Ac = A.contiguous();
  at::Tensor g, dB, db;
  if (!loops) {
    g = at::mm(dy, B).mul_(s);
    // (h^T dy)^T: r output rows rather than r output columns, the layout of the composition's dB (faster in the
    // vendor GEMM; BENCHMARKS.md times both)
    dB = at::mm(h.t(), dy).mul_(s).t();
    if (need_db) db = dy.sum(0).mul_(s);
  } else {
    const at::Tensor dyc = dy.contiguous(), Bc = B.contiguous(), hc = h.contiguous();
    const float *dyp = dyc.data_ptr<float>(), *Bp = Bc.data_ptr<float>(), *hp = hc.data_ptr<float>();
    const float sf = float(s);
    g = at::zeros({M, r}, at::kFloat);
    dB = at::empty({N, r}, at::kFloat);
    db = at::empty({N}, at::kFloat);
    float *gp = g.data_ptr<float>(), *dBp = dB.data_ptr<float>(), *dbp = db.data_ptr<float>();
    // Column n of dy at a time: dB's row n and db[n] are summed over m, scaled and written once (dB is N * r
    // floats, larger than L1; zero-filling it and scaling it in passes of their own read and wrote it twice more).
    // Every sum runs in the order of the m-outer loops it replaces.
    for (int64_t n = 0; n < N; ++n) {
      const float* Bn = Bp + n * r;
      float* dBn = dBp + n * r;
      float colsum = 0.f;
      for (int64_t j = 0; j < r; ++j) dBn[j] = 0.f;
      for (int64_t m = 0; m < M; ++m) {
        const float c = dyp[m * N + n];
        const float* hm = hp + m * r;
        float* gm = gp + m * r;
        for (int64_t j = 0; j < r; ++j) {
          gm[j] += c * Bn[j];
          dBn[j] += c * hm[j];
        }
        colsum += c;
      }
      for (int64_t j = 0; j < r; ++j) dBn[j] *= sf;
      dbp[n] = colsum * sf;
    }
    for (int64_t i = 0; i < M * r; ++i) gp[i] *= sf;
  }
  at::Tensor dA;
  if (p != 0.0 || !loops) {
    c10::optional<at::Tensor> acc = need_dx ? c10::optional<at::Tensor>(dx) : c10::nullopt;
    dA = adapter_input_terms(acc, x, Ac, g, p, seed);
  } else if (need_dx || x.has_value()) {
    // dx += g A and dA = g^T x in one pass over column strips, in the kernel table's vectors (this file's loops
    // are SSE2 only), threads splitting the columns
    const at::Tensor xr = x.has_value() ? unit_column_stride(*x) : at::Tensor();
    if (x.has_value()) dA = at::empty({r, Kd}, at::kFloat);
    column_passes(x.has_value() ? &xr : nullptr, need_dx ? &dx : nullptr, Ac.data_ptr<float>(), M, Kd,
                  g.data_ptr<float>(), r, r, 0.0, 0, x.has_value() ? dA.data_ptr<float>() : nullptr);
  }
  return {dx, dA, dB, db};
}

std::string isa() { return K().isa; }

// A settled training call of one fp32 adapter over a dense weight of x's dtype (fp32, bf16 or fp16), forward and
// backward in C++, by the routes the Python ones call, with the same kernels and ATen calls (so the same bits):
// forward gemv (xa = drop(x) A^T by lora_down's kernel, then dense_lora_gemv), compose (x W^T + b by at::linear; xa
// by at::mm for fp32 x without dropout, else by lora_down's kernel; y.addmm_(xa, B^T, alpha=s) in y's dtype) or
// fused (at::linear, lora_down's kernel, lora_epilogue_); backward small (fp32), fused, compose (dx = dy W, g = s dY
// B and dB = s (h^T dY)^T by ATen GEMMs in fp32, then dx += g A and dA = g^T x, or lora_dx_pass) or gemv (fused's
// passes around dx = dy W by strip_mm in fp32, rounded once). Its autograd node runs no Python: at decode sizes the
// Python of a custom autograd Function and of the route functions costs about as much as the adapter's arithmetic.
// The caller (Python) checks that the call fits (functional.SettledTrainingCall) and counts it for the route table.
enum SettledForward : int64_t { kForwardGemv = 0, kForwardCompose = 1, kForwardFused = 2 };
enum SettledBackward : int64_t { kBackwardSmall = 0, kBackwardFused = 1, kBackwardCompose = 2, kBackwardGemv = 3 };
// lora_down's kernels (fastpeft.backends.cpu._DOWN_ROUTES): rows, transposed, split.
enum SettledDown : int64_t { kDownRows = 0, kDownTransposed = 1, kDownSplit = 2 };

// xa = drop(x) A^T (M, r) fp32 by lora_down's kernel: lora_xa over A as stored or transposed, or lora_xa_split (bf16
// x without dropout; three parts of A, as with autograd on).
at::Tensor settled_down(const at::Tensor& x, const at::Tensor& A, double p, int64_t seed, int64_t down) {
  return down == kDownSplit ? lora_xa_split(x, A, 3) : lora_xa(x, A, p, seed, down == kDownTransposed);
}

// The compose route's backward of one fp32 adapter (fastpeft.backends.compose.backward): [dx or undefined, dA or
// undefined, dB]. A 16-bit dy is widened to fp32 once for g and dB, as the composition widens it.
std::vector<at::Tensor> lora_compose_backward(const at::Tensor& dy, const c10::optional<at::Tensor>& W,
                                              const c10::optional<at::Tensor>& x, const at::Tensor& A,
                                              const at::Tensor& B, const at::Tensor& h, double s, double p,
                                              int64_t seed) {
  c10::optional<at::Tensor> dx;
  if (W.has_value()) dx = at::mm(dy, *W);
  const at::Tensor d = dy.scalar_type() == at::kFloat ? dy : dy.to(at::kFloat);
  const at::Tensor zero = at::zeros({}, d.options());  // the ignored input of a beta = 0 addmm
  const at::Tensor g = at::addmm(zero, d, B, 0.0, s);
  const at::Tensor dB = at::addmm(zero, h.t(), d, 0.0, s).t();
  const at::Tensor dA = adapter_input_terms(dx, x, A, g, p, seed);
  return {dx.has_value() ? *dx : at::Tensor(), dA, dB};
}

struct SettledLoraTraining : public torch::autograd::Function<SettledLoraTraining> {
  // x (M, K) fp32/bf16/fp16, any row stride; A (r, K) contiguous fp32; B (N, r) fp32; W (N, K) of x's dtype, unit
  // column stride, not requiring grad; bias (N,) or undefined. Returns y (M, N) in x's dtype.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& A,
                            const at::Tensor& B, const at::Tensor& W, const c10::optional<at::Tensor>& bias, double s,
                            double p, int64_t seed, int64_t prefetch, int64_t backward, int64_t down,
                            int64_t forward_route, bool dy_outer) {
    const at::Tensor xr = unit_column_stride(x);
    const auto dtype = x.scalar_type();
    at::Tensor xa, y;
    if (forward_route == kForwardGemv) {
      xa = settled_down(xr, A, p, seed, down);
      c10::optional<at::Tensor> bias32;
      if (bias.has_value()) bias32 = bias_as_reference_adds(*bias, dtype);
      y = dense_lora_gemv(xr, W, bias32, xa, B, s, c10::nullopt, prefetch);
    } else {
      c10::optional<at::Tensor> bias_x;  // rounded to x's dtype first, as the reference adds it
      if (bias.has_value()) bias_x = bias->to(dtype);
      y = at::linear(x, W, bias_x);
      if (forward_route == kForwardCompose) {
        xa = p == 0.0 && dtype == at::kFloat ? at::mm(x, A.t()) : settled_down(xr, A, p, seed, down);
        if (dtype == at::kFloat) y.addmm_(xa, B.t(), 1.0, s);
        else y.addmm_(xa.to(dtype), B.t().to(dtype), 1.0, s);
      } else {
        xa = settled_down(xr, A, p, seed, down);
        lora_epilogue_(y, s == 1.0 ? xa : xa * s, stack_transposed({B}), c10::nullopt);
      }
    }
    // x is kept only for dA (never a dropped copy: the mask is regenerated from the seed)
    ctx->save_for_backward({A.requires_grad() ? xr : at::Tensor(), A, B, xa});
    ctx->saved_data["W"] = W;
    // W is kept outside save_for_backward (it gets no gradient): its version is checked as autograd would
    ctx->saved_data["W_version"] = W.is_inference() ? int64_t(-1) : int64_t(W._version());
    ctx->saved_data["s"] = s;
    ctx->saved_data["p"] = p;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["backward"] = backward;
    ctx->saved_data["dy_outer"] = dy_outer;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &A = saved[1], &B = saved[2], &xa = saved[3];
    const at::Tensor W = ctx->saved_data["W"].toTensor();
    const int64_t seen = ctx->saved_data["W_version"].toInt();
    TORCH_CHECK(seen < 0 || int64_t(W._version()) == seen, "fastpeft: the base weight (", W.size(0), ", ", W.size(1),
                ") of a layer was modified in place after the forward whose backward is running (version ",
                W._version(), ", the forward saw ", seen, "): its gradients would come from the changed weight. Run "
                "the forward again after changing the weight.");
    const double s = ctx->saved_data["s"].toDouble(), p = ctx->saved_data["p"].toDouble();
    const int64_t seed = ctx->saved_data["seed"].toInt();
    const bool need_dx = ctx->needs_input_grad(0), need_dA = ctx->needs_input_grad(1) && x.defined();
    const at::Tensor dy = unit_column_stride(grads[0]);
    c10::optional<at::Tensor> xo;
    if (need_dA) xo = x;
    std::vector<at::Tensor> out;
    const int64_t route = ctx->saved_data["backward"].toInt();
    if (route == kBackwardSmall) {
      out = lora_small_backward(dy, W, xo, A, B, xa, s, p, seed, need_dx, false);
    } else {
      c10::optional<at::Tensor> Wo;
      if (need_dx) Wo = W;
      const bool dy_outer = ctx->saved_data["dy_outer"].toBool();
      out = route == kBackwardCompose
                ? lora_compose_backward(dy, Wo, xo, A, B, xa, s, p, seed)
                : lora_fused_backward(dy, Wo, xo, A, B, xa, s, p, seed, false, dy_outer, route == kBackwardGemv);
    }
    // (x, A, B, W, bias, s, p, seed, prefetch, backward, down, forward_route, dy_outer)
    return {need_dx ? out[0] : at::Tensor(), need_dA ? out[1] : at::Tensor(),
            ctx->needs_input_grad(2) ? out[2] : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor settled_lora_training(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& W,
                                 const c10::optional<at::Tensor>& bias, double s, double p, int64_t seed,
                                 int64_t prefetch, int64_t backward, int64_t down, int64_t forward_route,
                                 bool dy_outer) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(x.dim() == 2 && (dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf) &&
                  W.scalar_type() == dtype && A.scalar_type() == at::kFloat && B.scalar_type() == at::kFloat &&
                  A.is_contiguous() && W.dim() == 2 && W.stride(1) == 1 && !W.requires_grad() &&
                  (!bias.has_value() || !bias->requires_grad()),
              "fastpeft._C.settled_lora_training: takes 2-D x (fp32, bf16 or fp16), a frozen W of x's dtype and unit "
              "column stride, and contiguous fp32 A and fp32 B; got x ", dtype, ", W ", W.scalar_type(), ", A ",
              A.scalar_type(), ", B ", B.scalar_type());
  TORCH_CHECK(backward == kBackwardFused || backward == kBackwardCompose || backward == kBackwardGemv ||
                  (backward == kBackwardSmall && dtype == at::kFloat),
              "fastpeft._C.settled_lora_training: backward must be 0 (small, fp32 x only), 1 (fused), 2 (compose) or 3 "
              "(gemv), got ", backward, " for ", dtype, " x");
  TORCH_CHECK(forward_route == kForwardGemv || forward_route == kForwardCompose || forward_route == kForwardFused,
              "fastpeft._C.settled_lora_training: forward_route must be 0 (gemv), 1 (compose) or 2 (fused), got ",
              forward_route);
  TORCH_CHECK(down == kDownRows || down == kDownTransposed ||
                  (down == kDownSplit && dtype == at::kBFloat16 && p == 0.0),
              "fastpeft._C.settled_lora_training: down must be 0 (rows), 1 (transposed) or 2 (split: bf16 x without "
              "dropout), got ", down, " for ", dtype, " x and p = ", p);
  return SettledLoraTraining::apply(x, A, B, W, bias, s, p, seed, prefetch, backward, down, forward_route, dy_outer);
}

}  // namespace

// For the other binding files (ops_shared.h).
const KernelTable& active_kernels() { return K(); }
int activation_dtype(const at::Tensor& t) { return dtype_code(t); }
void check_activation_rows(const at::Tensor& t, const char* name) { check_rows(t, name); }
int64_t rows_grain(int64_t work_per_row) { return grain(work_per_row); }
}  // namespace fastpeft

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastpeft CPU kernels: fused LoRA passes with an on-the-fly Philox dropout mask";
  fastpeft::register_settled_gemv(m);
  m.def("isa", &fastpeft::isa, "the SIMD code path chosen at run time: avx512, avx2 or generic");
  m.def("scale_columns", &fastpeft::scale_columns, "(z (M, N), scale fp32 (N,), add None | fp32 (N,) | (M, N), "
        "out_dtype, out=None) -> round(add + z * scale) (M, N) in out_dtype, fp32 arithmetic, into out's rows when "
        "given", py::arg("z"), py::arg("scale"), py::arg("add"), py::arg("out_dtype"), py::arg("out") = py::none());
  m.def("dora_grad_prologue", &fastpeft::dora_grad_prologue,
        "(dy (M, N), z (M, N)|None, scale fp32 (N,), with_e) -> [column_dots(dy, z) or empty, ge in dy's dtype: "
        "dy * scale above dy * (scale - 1) with with_e]: DoRA's backward prologue in one pass");
  m.def("column_dots", &fastpeft::column_dots, "(a (M, N), b (M, N)) -> sum_m a[m] * b[m] fp32 (N,)");
  m.def("dora_epilogue", &fastpeft::dora_epilogue, "(z fp32 (M, N), base fp32 (M, N)|None, h (M, R), Bt (R, N), k, s, "
        "f (N,), bias (N,)|None, out_dtype, z_out (M, N)|None) -> round(base + bias + s u + f z') (base None: "
        "round(f z' + bias)) with u = h Bt and z' = z + k u written into z_out, or into z without it: DoRA's "
        "forward epilogue in one pass",
        py::arg("z"), py::arg("base"), py::arg("h"), py::arg("Bt"), py::arg("k"), py::arg("s"), py::arg("f"),
        py::arg("bias"), py::arg("out_dtype"), py::arg("z_out") = py::none());
  m.def("masked_combine", &fastpeft::masked_combine,
        "(a|None, b (M, N), seed, p, kept, dropped, out|None) -> out = round(a + b * (kept where the canonical mask "
        "keeps element m * N + n, else dropped)), fp32 arithmetic; dropped == 0 writes +0");
  m.def("dropout_scale", &fastpeft::dropout_scale, "(seed, rows, cols, p, scale) -> fp32 (rows, cols): scale where kept, else 0");
  m.def("native_lowp_gemm", &fastpeft::native_lowp_gemm, "(\"bf16\"|\"fp16\") -> whether the CPU has native GEMM support");
  m.def("supported_isas", &fastpeft::supported_isas, "code paths this CPU can run");
  m.def("dy_outer_takes", &fastpeft::dy_outer_takes,
        "(R) -> whether lora_dy_pass sweeps dY once as outer products for a total rank R on this SIMD path");
  m.def("set_isa", &fastpeft::set_isa, "(name) -> name: force generic, avx2, avx512 or auto (testing aid)");
  m.def("keep_mask_at", &fastpeft::keep_mask_at, "(seed, offset0, n, p) -> bool (n,): keep(offset0 + i)");
  m.def("keep_mask", &fastpeft::keep_mask, "(seed, rows, cols, p) -> bool (rows, cols): fastpeft._philox.dropout_keep_mask");
  m.def("lora_xa", &fastpeft::lora_xa, "(x, A32, p, seed, transposed=False) -> drop(x) A^T in fp32 (transposed: "
        "by the kernel over A transposed)", py::arg("x"), py::arg("A"), py::arg("p"), py::arg("seed"),
        py::arg("transposed") = false);
  m.def("lora_epilogue_", &fastpeft::lora_epilogue_, "(y, xs32, Bt32 (R, N), bias32|None): y += xs Bt + bias in place");
  m.def("stack_transposed", &fastpeft::stack_transposed, "([B_i (N, r_i)]) -> (sum r_i, N) fp32: the B_i transposed "
        "and stacked, the layout lora_epilogue_ takes and lora_dy_pass's row pass streams");
  m.def("lora_dy_pass", &fastpeft::lora_dy_pass, "(dy, [B_i (N, r_i)], xa32, svec, need_dB, need_colsum, outer) -> "
        "[g, dB (N, R) scaled, colsum]; outer: the outer-product kernel (dy_outer_takes(R), need_dB), else the row "
        "and column passes");
  m.def("quant_dequantize", &fastpeft::quant_dequantize, "(qweight) -> dense (N, K) fp32");
  m.def("quant_dequantize_into", &fastpeft::quant_dequantize_into, "(qweight, out) -> None: the dense weight into out "
        "(N, K) fp32/bf16/fp16, reused across calls");
  m.def("quant_linear", &fastpeft::quant_linear, "(x32, qweight, bias32|None, xs32|None, B32|None, lora_scale, gemv_rows, tile_rows|0) -> "
        "x w^T + bias + lora_scale xs B^T (M, N) fp32");
  m.def("dense_lora_gemv", &fastpeft::dense_lora_gemv, "(x, W, bias32|None, xs32|None, B32|None, lora_scale, "
        "A32=None, prefetch=1) -> x W^T + bias + lora_scale xs B^T (..., N) in x's dtype (x (..., K)), accumulated in fp32, one pass over W; "
        "with A instead of xs, xs = x A^T computed here; prefetch: how rows ahead are requested (0 none, 1 "
        "non-temporal, 2 into L2)", py::arg("x"), py::arg("W"), py::arg("bias"), py::arg("xs"), py::arg("B"),
        py::arg("lora_scale"), py::arg("A") = py::none(), py::arg("prefetch") = int64_t(fastpeft::kPrefetchNonTemporal));
  m.def("quant_grad_x", &fastpeft::quant_grad_x, "(dy32, qweight, tile_rows|0) -> dy w (M, K) fp32");
  m.def("settled_lora_training", &fastpeft::settled_lora_training,
        "(x (M, K) fp32/bf16/fp16, A, B, W, bias|None, s, p, seed, prefetch, backward 0 small | 1 fused | 2 "
        "compose | 3 gemv, down 0 rows | 1 transposed | 2 split, forward_route 0 gemv | 1 compose | 2 fused, "
        "dy_outer) -> y (M, N) with an autograd node in C++: one fp32 adapter's settled training call, x A^T by "
        "lora_down's kernel, the fused backward's dY pass by lora_dy_pass's outer-product kernel or not",
        py::arg("x"), py::arg("A"), py::arg("B"), py::arg("W"), py::arg("bias"), py::arg("s"), py::arg("p"),
        py::arg("seed"), py::arg("prefetch"), py::arg("backward"), py::arg("down"),
        py::arg("forward_route") = int64_t(0), py::arg("dy_outer") = false);
  m.def("lora_small_backward", &fastpeft::lora_small_backward, "(dy, W, x|None, A, B, h, s, p, seed, need_dx, "
        "need_db=True) -> [dx, dA, dB, db|None] for one fp32 adapter (decode-sized M)",
        py::arg("dy"), py::arg("W"), py::arg("x"), py::arg("A"), py::arg("B"), py::arg("h"), py::arg("s"),
        py::arg("p"), py::arg("seed"), py::arg("need_dx"), py::arg("need_db") = true);
  m.def("lora_fused_backward", &fastpeft::lora_fused_backward, "(dy, W|None, x|None, A32, B32, h32, s, p, seed, "
        "need_db=True, dy_outer=False, strip=False) -> [dx|None, dA|None, dB, db|None]: one adapter's fused backward "
        "(lora_dy_pass, its outer-product kernel with dy_outer; dy W by at::mm, or by strip_mm with strip; "
        "lora_dx_pass) in one call; dy, W, x of one dtype",
        py::arg("dy"), py::arg("W"), py::arg("x"), py::arg("A"), py::arg("B"), py::arg("h"), py::arg("s"),
        py::arg("p"), py::arg("seed"), py::arg("need_db") = true, py::arg("dy_outer") = false,
        py::arg("strip") = false);
  m.def("strip_mm", &fastpeft::strip_mm, "(a (M, N), w (N, K)) -> a w (M, K) fp32: w read once in column strips, "
        "exact products, fp32 sums");
  m.def("lora_dx_pass", &fastpeft::lora_dx_pass, "(dx|None, x|None, A32, g32, p, seed, extra=None, out=None) -> dA32 "
        "(dx updated in place; with extra and out, p > 0: out = round(dx + (g A) mask/(1-p) + (mask/(1-p) - 1) extra), "
        "dx only read)", py::arg("dx"), py::arg("x"), py::arg("A"), py::arg("g"), py::arg("p"), py::arg("seed"),
        py::arg("extra") = py::none(), py::arg("out") = py::none());
  m.def("widened_mm", &fastpeft::widened_mm, "(a bf16 (M, K), b bf16 (N, K), interleave_a=False) -> a b^T (M, N) "
        "fp32: exact products, fp32 sums, by oneDNN's bf16 block kernel (pair_gemm.cpp); interleave_a rearranges a "
        "instead of b", py::arg("a"), py::arg("b"), py::arg("interleave_a") = false);
  m.def("widened_mm_nn", &fastpeft::widened_mm_nn, "(a bf16 (M, R), b bf16 (R, N)) -> a b (M, N) fp32: as widened_mm "
        "with b not transposed");
  m.def("widened_mm_parts", &fastpeft::widened_mm_parts, "([a_i bf16 (M_i, K)], b bf16, transposed_b) -> [a_i b^T] "
        "(b (N, K)) or [a_i b] (b (K, N)) fp32: as widened_mm / widened_mm_nn on every a_i, each tile of b "
        "rearranged once for all of them");
  m.def("lora_xa_split", &fastpeft::lora_xa_split, "(x bf16 (M, K), A fp32 (r, K), parts=3) -> x A^T (M, r) fp32: "
        "A split into bf16 parts (three: exactly; two: its leading 16 bits), exact products and fp32 sums by "
        "widened_mm (split_products.cpp)", py::arg("x"), py::arg("A"), py::arg("parts") = 3);
  m.def("lora_backward_split", &fastpeft::lora_backward_split, "(dy bf16 (M, N), x bf16 (M, K)|None, A32 (r, K), "
        "Bt32 (r, N), h32 (M, r), s) -> [g = s dy B, dA = g^T x | undefined, dB, db] fp32: one adapter's products by "
        "exact three-part bf16 splits, exact products and fp32 sums (split_products.cpp)");
  m.def("widened_mm_available", &fastpeft::widened_mm_available, "whether widened_mm runs on this CPU (oneDNN has a "
        "bf16 block kernel for it)");
  m.def("lora_mixed_", &fastpeft::lora_mixed_, "(y, x, runs (S, 3) int64, [A (r_i, K) | None], [B (N, r_i) | None], "
        "[bias (N,) | None], [s_i]): y[rows] += s_i (x A_i^T B_i^T + bias_i) per run of rows, in place (None: the "
        "layer lacks adapter i)");
}
