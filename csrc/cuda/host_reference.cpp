// Host build of the CUDA kernels' per-element math (philox.cuh, lora_math.cuh) in plain loops, compiled with g++ by
// tests/test_cuda_compile.py so that the mask and the formulas the kernels use are checked against
// fastpeft._philox and fastpeft.reference on a machine without a GPU. Not part of the extension.
//
//   host_reference philox <seed> <p>      stdin: offsets, one a line; stdout: "<16-bit draw> <uniform bits> <keep>"
//   host_reference lora <in.bin> <out.bin>  fp32 LoRA forward/backward pieces, layout in read_problem below
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "lora_math.cuh"

using fastpeft::dropped_value;

namespace {

int run_philox(uint64_t seed, float p) {
  unsigned long long offset = 0;
  while (std::scanf("%llu", &offset) == 1) {
    const uint32_t draw = fastpeft::philox_half(seed, offset);
    const float u = fastpeft::philox_uniform(seed, offset);
    uint32_t bits = 0;
    std::memcpy(&bits, &u, sizeof(bits));
    std::printf("%u %u %d\n", draw, bits, u >= p ? 1 : 0);
  }
  return 0;
}

template <typename T> bool read_into(std::FILE* f, std::vector<T>& v, size_t n) {
  v.resize(n);
  return std::fread(v.data(), sizeof(T), n, f) == n;
}

// in.bin: int64 M, K, N, r, seed; float32 p, s; then float32 x (M,K), A (r,K), B (N,r), bias (N), g (M,r), dx0 (M,K).
// out.bin: float32 xa (M,r), update (M,N) = s*(xa B^T + bias), dx (M,K) = dx0 + (g A)*mask/(1-p), dA (r,K).
int run_lora(const char* in_path, const char* out_path) {
  std::FILE* f = std::fopen(in_path, "rb");
  if (!f) return 2;
  std::vector<int64_t> dims;
  std::vector<float> ps, x, A, B, bias, g, dx;
  if (!read_into(f, dims, 5) || !read_into(f, ps, 2)) return 3;
  const int64_t M = dims[0], K = dims[1], N = dims[2], r = dims[3];
  const uint64_t seed = (uint64_t)dims[4];
  const float p = ps[0], s = ps[1], one_minus_p = (float)(1.0 - (double)p);
  if (!read_into(f, x, M * K) || !read_into(f, A, r * K) || !read_into(f, B, N * r) || !read_into(f, bias, N) ||
      !read_into(f, g, M * r) || !read_into(f, dx, M * K))
    return 4;
  std::fclose(f);
  std::vector<float> xa(M * r, 0.0f), update(M * N, 0.0f), dA(r * K, 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < r; ++j) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += dropped_value(x[m * K + k], seed, m, k, K, p, one_minus_p) * A[j * K + k];
      xa[m * r + j] = acc;
    }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float acc = 0.0f;
      for (int64_t j = 0; j < r; ++j) acc += xa[m * r + j] * B[n * r + j];
      update[m * N + n] = fastpeft::lora_up_value(0.0f, acc, s, bias[n]);
    }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      float acc = 0.0f;
      for (int64_t j = 0; j < r; ++j) acc += g[m * r + j] * A[j * K + k];
      dx[m * K + k] = fastpeft::dx_mask_value(dx[m * K + k], acc, seed, m, k, K, p, one_minus_p);
    }
  for (int64_t j = 0; j < r; ++j)
    for (int64_t k = 0; k < K; ++k) {
      float acc = 0.0f;
      for (int64_t m = 0; m < M; ++m) acc += g[m * r + j] * dropped_value(x[m * K + k], seed, m, k, K, p, one_minus_p);
      dA[j * K + k] = acc;
    }
  std::FILE* o = std::fopen(out_path, "wb");
  if (!o) return 5;
  for (const std::vector<float>* v : {&xa, &update, &dx, &dA}) std::fwrite(v->data(), sizeof(float), v->size(), o);
  std::fclose(o);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::strcmp(argv[1], "philox") == 0)
    return run_philox(std::strtoull(argv[2], nullptr, 10), std::strtof(argv[3], nullptr));
  if (argc == 4 && std::strcmp(argv[1], "lora") == 0) return run_lora(argv[2], argv[3]);
  std::fprintf(stderr, "usage: %s philox <seed> <p> | lora <in.bin> <out.bin>\n", argv[0]);
  return 1;
}
