// The avx512 build of kernels_impl.h; chosen at run time by ops.cpp from cpuid.
#include <cstdint>
#include <utility>

#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>


#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define FASTPEFT_NS isa_avx512
#define FASTPEFT_VW 16
#include "kernels_impl.h"
#include "quant_impl.h"
#pragma GCC pop_options

namespace fastpeft {
const KernelTable& kernels_avx512() {
  static const KernelTable table{"avx512", isa_avx512::dropout_scale, isa_avx512::xa_rows,
                                 isa_avx512::dy_rows, isa_avx512::dy_outer_cols, isa_avx512::expand_rows, isa_avx512::outer_cols,
                                 isa_avx512::dequant_rows, isa_avx512::qgemv_rows, isa_avx512::scale_columns_rows,
                                 isa_avx512::column_dots_cols, isa_avx512::expand_row_b, 16,
                                 isa_avx512::transpose_f32,
                                 isa_avx512::masked_combine_rows,
                                 isa_avx512::dora_epilogue_rows, isa_avx512::split_bf16_row,
                                 isa_avx512::xa_rows_t,
                                 isa_avx512::dora_prologue_cols};
  return table;
}
}  // namespace fastpeft

#else  // not x86: this code path does not exist; the generic one serves

namespace fastpeft {
const KernelTable& kernels_avx512() { return kernels_generic(); }
}  // namespace fastpeft

#endif
