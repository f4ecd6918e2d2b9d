// The generic build of kernels_impl.h; chosen at run time by ops.cpp from cpuid.
#include <cstdint>
#include <utility>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // SSE2 (x86-64 baseline) for the Philox multiply
#endif
#include "kernels.h"

#define FASTPEFT_NS isa_generic
#define FASTPEFT_VW 4
#include "kernels_impl.h"
#include "quant_impl.h"

namespace fastpeft {
const KernelTable& kernels_generic() {
  static const KernelTable table{"generic", isa_generic::dropout_scale, isa_generic::xa_rows,
                                 isa_generic::dy_rows, isa_generic::dy_outer_cols, isa_generic::expand_rows, isa_generic::outer_cols,
                                 isa_generic::dequant_rows, isa_generic::qgemv_rows, isa_generic::scale_columns_rows,
                                 isa_generic::column_dots_cols, isa_generic::expand_row_b, 4,
                                 isa_generic::transpose_f32,
                                 isa_generic::masked_combine_rows,
                                 isa_generic::dora_epilogue_rows, isa_generic::split_bf16_row,
                                 isa_generic::xa_rows_t,
                                 isa_generic::dora_prologue_cols};
  return table;
}
}  // namespace fastpeft
