// The avx2 build of kernels_impl.h; chosen at run time by ops.cpp from cpuid.
#include <cstdint>
#include <utility>

#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>


#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define FASTPEFT_NS isa_avx2
#define FASTPEFT_VW 8
#include "kernels_impl.h"
#include "quant_impl.h"
#pragma GCC pop_options

namespace fastpeft {
const KernelTable& kernels_avx2() {
  static const KernelTable table{"avx2", isa_avx2::dropout_scale, isa_avx2::xa_rows,
                                 isa_avx2::dy_rows, isa_avx2::dy_outer_cols, isa_avx2::expand_rows, isa_avx2::outer_cols,
                                 isa_avx2::dequant_rows, isa_avx2::qgemv_rows, isa_avx2::scale_columns_rows,
                                 isa_avx2::column_dots_cols, isa_avx2::expand_row_b, 8,
                                 isa_avx2::transpose_f32,
                                 isa_avx2::masked_combine_rows,
                                 isa_avx2::dora_epilogue_rows, isa_avx2::split_bf16_row,
                                 isa_avx2::xa_rows_t,
                                 isa_avx2::dora_prologue_cols};
  return table;
}
}  // namespace fastpeft

#else  // not x86: this code path does not exist; the generic one serves

namespace fastpeft {
const KernelTable& kernels_avx2() { return kernels_generic(); }
}  // namespace fastpeft

#endif
