#include "gate_rows.h"

#include <type_traits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__INTEL_COMPILER)
#define NANOMOE_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NANOMOE_SIMD_CLONES
#endif

namespace nanomoe::cpu {
namespace {

// One token's destination block d: y = sum_s G_ds x_s, x the token's source row.
template <typename acc_t>
__attribute__((always_inline)) inline void gate_block(const GateRows<acc_t>& g,
                                                      const acc_t* __restrict x_row,
                                                      acc_t* __restrict y, int64_t d) {
  const int64_t r = g.rank;
  for (int64_t c = 0; c < r; ++c) y[c] = 0;
  for (int64_t s = 0; s < g.src_blocks; ++s) {
    const acc_t* __restrict x = x_row + s * r;
    const int64_t pair = d * g.dst_stride + s * g.src_stride;
    if (g.variant == 0) {
      const acc_t w = g.mix[pair];
      for (int64_t c = 0; c < r; ++c) y[c] += w * x[c];
      continue;
    }
    const acc_t* __restrict w = g.mix + pair;
    for (int64_t c = 0; c < r; ++c) y[c] += w[c] * x[c];
    if (g.variant == 2) {
      const acc_t* __restrict left = g.left + pair;
      const acc_t* __restrict right = g.right + pair;
      acc_t dot = 0;
      for (int64_t c = 0; c < r; ++c) dot += right[c] * x[c];
      for (int64_t c = 0; c < r; ++c) y[c] += left[c] * dot;
    }
  }
}

// Token by token, every destination block: the token's source row (K_src rank values) stays in
// L1 while all K_dst blocks read it. Storage types other than acc_t (bfloat16) are converted one
// row at a time, in registers and a row-sized buffer, never as whole tensors.
template <typename io_t, typename acc_t>
__attribute__((always_inline)) inline void gate_rows_impl(const GateRows<acc_t>& g,
                                                          const io_t* __restrict src,
                                                          io_t* __restrict dst, int64_t tokens) {
  constexpr bool kConvert = !std::is_same_v<io_t, acc_t>;
  const int64_t r = g.rank, src_row = g.src_blocks * r, dst_row = g.dst_blocks * r;
  std::vector<acc_t> buffer(kConvert ? src_row + r : 0);
  for (int64_t t = 0; t < tokens; ++t) {
    const io_t* __restrict x = src + t * src_row;
    io_t* __restrict y = dst + t * dst_row;
    if constexpr (kConvert) {
      acc_t* __restrict x_acc = buffer.data();
      acc_t* __restrict y_acc = buffer.data() + src_row;
      for (int64_t i = 0; i < src_row; ++i) x_acc[i] = static_cast<acc_t>(x[i]);
      for (int64_t d = 0; d < g.dst_blocks; ++d) {
        gate_block(g, x_acc, y_acc, d);
        for (int64_t c = 0; c < r; ++c) y[d * r + c] = static_cast<io_t>(y_acc[c]);
      }
    } else {
      for (int64_t d = 0; d < g.dst_blocks; ++d) gate_block(g, x, y + d * r, d);
    }
  }
}

template <typename acc_t>
__attribute__((always_inline)) inline void gate_rows_backward_impl(
    const GateRows<acc_t>& g, const acc_t* __restrict src, const acc_t* __restrict grad_dst,
    int64_t tokens, int64_t d, acc_t* __restrict grad_mix, acc_t* __restrict grad_left,
    acc_t* __restrict grad_right) {
  const int64_t r = g.rank, src_row = g.src_blocks * r, dst_row = g.dst_blocks * r;
  const int64_t per_pair = g.steps();
  for (int64_t i = 0; i < g.src_blocks * per_pair; ++i) grad_mix[i] = 0;
  if (g.variant == 2) {
    for (int64_t i = 0; i < g.src_blocks * r; ++i) grad_left[i] = grad_right[i] = 0;
  }
  for (int64_t t = 0; t < tokens; ++t) {
    const acc_t* __restrict gy = grad_dst + t * dst_row + d * r;
    for (int64_t s = 0; s < g.src_blocks; ++s) {
      const acc_t* __restrict x = src + t * src_row + s * r;
      if (g.variant == 0) {
        acc_t dot = 0;
        for (int64_t c = 0; c < r; ++c) dot += gy[c] * x[c];
        grad_mix[s] += dot;
        continue;
      }
      acc_t* __restrict gm = grad_mix + s * r;
      for (int64_t c = 0; c < r; ++c) gm[c] += gy[c] * x[c];
      if (g.variant == 2) {
        const int64_t pair = d * g.dst_stride + s * g.src_stride;
        const acc_t* __restrict left = g.left + pair;
        const acc_t* __restrict right = g.right + pair;
        acc_t right_x = 0, left_gy = 0;
        for (int64_t c = 0; c < r; ++c) {
          right_x += right[c] * x[c];
          left_gy += left[c] * gy[c];
        }
        acc_t* __restrict gl = grad_left + s * r;
        acc_t* __restrict gr = grad_right + s * r;
        for (int64_t c = 0; c < r; ++c) {
          gl[c] += right_x * gy[c];
          gr[c] += left_gy * x[c];
        }
      }
    }
  }
}

}  // namespace

NANOMOE_SIMD_CLONES void gate_rows(const GateRows<float>& g, const float* src, float* dst,
                                   int64_t tokens) {
  gate_rows_impl(g, src, dst, tokens);
}

NANOMOE_SIMD_CLONES void gate_rows(const GateRows<float>& g, const c10::BFloat16* src,
                                   c10::BFloat16* dst, int64_t tokens) {
  gate_rows_impl(g, src, dst, tokens);
}

NANOMOE_SIMD_CLONES void gate_rows(const GateRows<double>& g, const double* src, double* dst,
                                   int64_t tokens) {
  gate_rows_impl(g, src, dst, tokens);
}

NANOMOE_SIMD_CLONES void gate_rows_backward(const GateRows<float>& g, const float* src,
                                            const float* grad_dst, int64_t tokens, int64_t d,
                                            float* grad_mix, float* grad_left, float* grad_right) {
  gate_rows_backward_impl(g, src, grad_dst, tokens, d, grad_mix, grad_left, grad_right);
}

NANOMOE_SIMD_CLONES void gate_rows_backward(const GateRows<double>& g, const double* src,
                                            const double* grad_dst, int64_t tokens, int64_t d,
                                            double* grad_mix, double* grad_left,
                                            double* grad_right) {
  gate_rows_backward_impl(g, src, grad_dst, tokens, d, grad_mix, grad_left, grad_right);
}

}  // namespace nanomoe::cpu
