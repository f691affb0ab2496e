// Mixing with destination blocks as the vector lanes (see gate_by_block.h). At each rank position
// c, 16 destination blocks of 12 tokens are the product of the gate's (16 x K_src) slice at c with
// the tokens' (K_src x 12) activations at c: one GEMM-shaped step, each load of the gate serving
// 12 broadcast activations, every lane doing useful work however small the rank. The sums land in
// a staging area (rank position major) and are gathered from there into dst's (block, rank) order.
#include "gate_by_block.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "avx512.h"
#include "thread_buffer.h"

namespace nanomoe::cpu::gate_by_block {
namespace {

// Sums per load of the gate: enough to cover the FMA latency on both pipes.
constexpr int kTokens = static_cast<int>(kByBlockTokens);
constexpr int64_t kLanes = kGateLanes;

// diagonal_outer's rank-one part needs <right_ds, src_ts> for the 16 blocks from d0:
// dots[(s * kTokens + t) * 16 + l] for every source block s.
NANOMOE_AVX512 void outer_dots(const GateRows<float>& g, const float* x, int64_t x_row, int64_t d0,
                               float* dots) {
  const int64_t r = g.rank;
  for (int64_t s = 0; s < g.src_blocks; ++s) {
    const float* right = g.right_by_block + s * r * g.dst_lanes + d0;
    __m512 acc[kTokens];
#pragma GCC unroll 12
    for (int t = 0; t < kTokens; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t c = 0; c < r; ++c) {
      const __m512 weight = _mm512_loadu_ps(right + c * g.dst_lanes);
      const float* at = x + s * r + c;
#pragma GCC unroll 12
      for (int t = 0; t < kTokens; ++t) {
        acc[t] = _mm512_fmadd_ps(weight, _mm512_set1_ps(at[t * x_row]), acc[t]);
      }
    }
#pragma GCC unroll 12
    for (int t = 0; t < kTokens; ++t) _mm512_storeu_ps(dots + (s * kTokens + t) * kLanes, acc[t]);
  }
}

// The 16 blocks from d0 at rank position c, for every token of the group, into
// stage[(t * rank + c) * 16 + l].
template <int kVariant>
NANOMOE_AVX512 void sums_at(const GateRows<float>& g, const float* x, int64_t x_row, int64_t d0,
                            int64_t c, const float* dots, float* stage) {
  const int64_t r = g.rank, steps = kVariant == 0 ? 1 : r;
  const float* gate = g.mix_by_block + (kVariant == 0 ? 0 : c) * g.dst_lanes + d0;
  const float* left = kVariant == 2 ? g.left_by_block + c * g.dst_lanes + d0 : nullptr;
  __m512 acc[kTokens];
#pragma GCC unroll 12
  for (int t = 0; t < kTokens; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t s = 0; s < g.src_blocks; ++s) {
    const __m512 weight = _mm512_loadu_ps(gate + s * steps * g.dst_lanes);
    const float* at = x + s * r + c;
#pragma GCC unroll 12
    for (int t = 0; t < kTokens; ++t) {
      acc[t] = _mm512_fmadd_ps(weight, _mm512_set1_ps(at[t * x_row]), acc[t]);
    }
    if constexpr (kVariant == 2) {
      const __m512 scale = _mm512_loadu_ps(left + s * r * g.dst_lanes);
      const float* dot = dots + s * kTokens * kLanes;
#pragma GCC unroll 12
      for (int t = 0; t < kTokens; ++t) {
        acc[t] = _mm512_fmadd_ps(scale, _mm512_loadu_ps(dot + t * kLanes), acc[t]);
      }
    }
  }
#pragma GCC unroll 12
  for (int t = 0; t < kTokens; ++t) _mm512_storeu_ps(stage + (t * r + c) * kLanes, acc[t]);
}

// One token's run of dst, blocks [d0, d0 + width) x every rank position, from its staging area
// (element (c, l) at c * 16 + l); order[e] is where run element e = l * rank + c lies there.
template <typename T>
NANOMOE_AVX512 void gather_run(const float* stage, int64_t run, const int32_t* order, T* out) {
  for (int64_t e = 0; e < run; e += kLanes) {
    const __mmask16 lanes = first_lanes(run - e);
    const __m512i where = _mm512_loadu_si512(order + e);
    const __m512 value = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, where, stage, 4);
    store_lanes(out + e, lanes, value);
  }
}

template <int kVariant, typename T>
NANOMOE_AVX512 void mix_tokens(const GateRows<float>& g, const T* src, T* dst, int64_t tokens) {
  const int64_t r = g.rank, src_row = g.src_blocks * r, dst_row = g.dst_blocks * r;
  // A group's source rows as float32. The rows past the end of a last group hold whatever the
  // buffer held (earlier rows, or zeros when it was grown): their sums are never gathered.
  thread_local std::vector<float> rows_buffer, stage_buffer, dots_buffer;
  thread_local std::vector<int32_t> order_buffer;
  float* rows = thread_buffer(rows_buffer, kTokens * src_row);
  float* stage = thread_buffer(stage_buffer, kTokens * r * kLanes);
  float* dots = thread_buffer(dots_buffer, kVariant == 2 ? g.src_blocks * kTokens * kLanes : 0);
  int32_t* order = thread_buffer(order_buffer, kLanes * r);
  for (int64_t e = 0; e < kLanes * r; ++e) order[e] = static_cast<int32_t>(e % r * kLanes + e / r);
  for (int64_t t0 = 0; t0 < tokens; t0 += kTokens) {
    const int64_t group = std::min<int64_t>(kTokens, tokens - t0);
    const T* from = src + t0 * src_row;
    const float* x = rows;
    if constexpr (std::is_same_v<T, float>) {
      if (group == kTokens) {
        x = from;  // whole groups are read in place
      } else {
        std::memcpy(rows, from, group * src_row * sizeof(float));
      }
    } else {
      as_float(from, group * src_row, rows);
    }
    for (int64_t d0 = 0; d0 < g.dst_blocks; d0 += kLanes) {
      if constexpr (kVariant == 2) outer_dots(g, x, src_row, d0, dots);
      for (int64_t c = 0; c < r; ++c) sums_at<kVariant>(g, x, src_row, d0, c, dots, stage);
      const int64_t run = std::min(kLanes, g.dst_blocks - d0) * r;
      for (int64_t t = 0; t < group; ++t) {
        gather_run(stage + t * r * kLanes, run, order, dst + (t0 + t) * dst_row + d0 * r);
      }
    }
  }
}

// ---- the gate's weight gradients ------------------------------------------------------------

constexpr int64_t kGradTokens = 64;  // tokens whose activations are gathered per pass
constexpr int kGradSources = 8;      // source blocks whose sums sit in registers at once

// One pass's operands: the source rows as float32, grad_dst with the block innermost
// (grad_t[(t * rank + c) * dst_lanes + d], padding zero), and for diagonal_outer, per 16 blocks
// from d0, dots_right[(s * kGradTokens + t) * 16 + l] = <right_(d0+l)s, x_ts> and dots_left
// likewise with <left_(d0+l)s, grad_t(d0+l)>.
struct GradPass {
  const float* x;
  const float* grad_t;
  float* dots_right;
  float* dots_left;
  int64_t tokens;
};

// sums[j] (16 lanes: blocks d0..) added into out at block stride dst_stride, for width blocks.
NANOMOE_AVX512 inline void add_lanes(__m512 sum, int64_t width, int64_t dst_stride, float* out) {
  alignas(64) float lanes[kLanes];
  _mm512_store_ps(lanes, sum);
  for (int64_t l = 0; l < width; ++l) out[l * dst_stride] += lanes[l];
}

NANOMOE_AVX512 void outer_grad_dots(const GateRows<float>& g, const GradPass& pass, int64_t d0) {
  const int64_t r = g.rank, src_row = g.src_blocks * r;
  for (int64_t s = 0; s < g.src_blocks; ++s) {
    const float* right = g.right_by_block + s * r * g.dst_lanes + d0;
    const float* left = g.left_by_block + s * r * g.dst_lanes + d0;
    for (int64_t t = 0; t < pass.tokens; ++t) {
      __m512 by_right = _mm512_setzero_ps(), by_left = _mm512_setzero_ps();
      for (int64_t c = 0; c < r; ++c) {
        by_right = _mm512_fmadd_ps(_mm512_loadu_ps(right + c * g.dst_lanes),
                                   _mm512_set1_ps(pass.x[t * src_row + s * r + c]), by_right);
        by_left =
            _mm512_fmadd_ps(_mm512_loadu_ps(left + c * g.dst_lanes),
                            _mm512_loadu_ps(pass.grad_t + (t * r + c) * g.dst_lanes + d0), by_left);
      }
      _mm512_storeu_ps(pass.dots_right + (s * kGradTokens + t) * kLanes, by_right);
      _mm512_storeu_ps(pass.dots_left + (s * kGradTokens + t) * kLanes, by_left);
    }
  }
}

// Source blocks [s0, s0 + kCount) x the 16 blocks from d0: grad_mix[d, s(, c)] += sum_t
// grad_dst[t, d, c] x[t, s, c] (scalar: over c too) and, for diagonal_outer, grad_left[d, s, c] +=
// sum_t dots_right[t, d, s] grad_dst[t, d, c], grad_right[d, s, c] += sum_t dots_left[t, d, s]
// x[t, s, c]. Sums laid out like mix (g's strides).
template <int kVariant, int kCount>
NANOMOE_AVX512 void grads_from(const GateRows<float>& g, const GradPass& pass, int64_t d0,
                               int64_t s0, float* grad_mix, float* grad_left, float* grad_right) {
  const int64_t r = g.rank, src_row = g.src_blocks * r;
  const int64_t width = std::min(kLanes, g.dst_blocks - d0);
  const int64_t at = d0 * g.dst_stride + s0 * g.src_stride;
  __m512 mix[kCount];
  for (int j = 0; j < kCount; ++j) mix[j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < r; ++c) {
    __m512 left[kCount], right[kCount];
    for (int j = 0; j < kCount; ++j) {
      if constexpr (kVariant != 0) mix[j] = _mm512_setzero_ps();
      if constexpr (kVariant == 2) left[j] = right[j] = _mm512_setzero_ps();
    }
    for (int64_t t = 0; t < pass.tokens; ++t) {
      const __m512 gy = _mm512_loadu_ps(pass.grad_t + (t * r + c) * g.dst_lanes + d0);
      const float* x = pass.x + t * src_row + s0 * r + c;
#pragma GCC unroll 8
      for (int j = 0; j < kCount; ++j) {
        const __m512 xs = _mm512_set1_ps(x[j * r]);
        mix[j] = _mm512_fmadd_ps(gy, xs, mix[j]);
        if constexpr (kVariant == 2) {
          const int64_t dot = ((s0 + j) * kGradTokens + t) * kLanes;
          left[j] = _mm512_fmadd_ps(_mm512_loadu_ps(pass.dots_right + dot), gy, left[j]);
          right[j] = _mm512_fmadd_ps(_mm512_loadu_ps(pass.dots_left + dot), xs, right[j]);
        }
      }
    }
    if constexpr (kVariant != 0) {
      for (int j = 0; j < kCount; ++j) {
        const int64_t pair = at + j * g.src_stride + c;
        add_lanes(mix[j], width, g.dst_stride, grad_mix + pair);
        if constexpr (kVariant == 2) {
          add_lanes(left[j], width, g.dst_stride, grad_left + pair);
          add_lanes(right[j], width, g.dst_stride, grad_right + pair);
        }
      }
    }
  }
  if constexpr (kVariant == 0) {
    for (int j = 0; j < kCount; ++j) {
      add_lanes(mix[j], width, g.dst_stride, grad_mix + at + j * g.src_stride);
    }
  }
}

template <int kVariant, typename T>
NANOMOE_AVX512 void grads_tokens(const GateRows<float>& g, const T* src, const T* grad_dst,
                                 int64_t tokens, float* grad_mix, float* grad_left,
                                 float* grad_right) {
  const int64_t r = g.rank, src_row = g.src_blocks * r, dst_row = g.dst_blocks * r;
  constexpr bool kConvert = !std::is_same_v<T, float>;
  // grad_t's padding lanes (blocks past dst_blocks) are never written: whatever they hold only
  // reaches the padding lanes of the sums, which are never stored.
  thread_local std::vector<float> x_buffer, grad_buffer, grad_t_buffer, right_buffer, left_buffer;
  float* x_rows = thread_buffer(x_buffer, kConvert ? kGradTokens * src_row : 0);
  float* grad_rows = thread_buffer(grad_buffer, kConvert ? kGradTokens * dst_row : 0);
  float* grad_t = thread_buffer(grad_t_buffer, kGradTokens * r * g.dst_lanes);
  const int64_t dots = kVariant == 2 ? g.src_blocks * kGradTokens * kLanes : 0;
  float* dots_right = thread_buffer(right_buffer, dots);
  float* dots_left = thread_buffer(left_buffer, dots);
  for (int64_t t0 = 0; t0 < tokens; t0 += kGradTokens) {
    const int64_t n = std::min(kGradTokens, tokens - t0);
    const float* gy = as_float(grad_dst + t0 * dst_row, n * dst_row, grad_rows);
    for (int64_t t = 0; t < n; ++t) {  // (d, c) -> (c, d): the blocks become the lanes
      for (int64_t d = 0; d < g.dst_blocks; ++d) {
        for (int64_t c = 0; c < r; ++c) {
          grad_t[(t * r + c) * g.dst_lanes + d] = gy[t * dst_row + d * r + c];
        }
      }
    }
    const GradPass pass{as_float(src + t0 * src_row, n * src_row, x_rows), grad_t, dots_right,
                        dots_left, n};
    for (int64_t d0 = 0; d0 < g.dst_blocks; d0 += kLanes) {
      if constexpr (kVariant == 2) outer_grad_dots(g, pass, d0);
      int64_t s = 0;
      for (; s + kGradSources <= g.src_blocks; s += kGradSources) {
        grads_from<kVariant, kGradSources>(g, pass, d0, s, grad_mix, grad_left, grad_right);
      }
      for (; s < g.src_blocks; ++s) {
        grads_from<kVariant, 1>(g, pass, d0, s, grad_mix, grad_left, grad_right);
      }
    }
  }
}

}  // namespace

void mix(const GateRows<float>& g, const float* src, float* dst, int64_t tokens) {
  with_variant(g.variant, [&](auto v) { mix_tokens<decltype(v)::value>(g, src, dst, tokens); });
}

void mix(const GateRows<float>& g, const uint16_t* src, uint16_t* dst, int64_t tokens) {
  with_variant(g.variant, [&](auto v) { mix_tokens<decltype(v)::value>(g, src, dst, tokens); });
}

void accumulate_grads(const GateRows<float>& g, const float* src, const float* grad_dst,
                      int64_t tokens, float* grad_mix, float* grad_left, float* grad_right) {
  with_variant(g.variant, [&](auto v) {
    grads_tokens<decltype(v)::value>(g, src, grad_dst, tokens, grad_mix, grad_left, grad_right);
  });
}

void accumulate_grads(const GateRows<float>& g, const uint16_t* src, const uint16_t* grad_dst,
                      int64_t tokens, float* grad_mix, float* grad_left, float* grad_right) {
  with_variant(g.variant, [&](auto v) {
    grads_tokens<decltype(v)::value>(g, src, grad_dst, tokens, grad_mix, grad_left, grad_right);
  });
}

}  // namespace nanomoe::cpu::gate_by_block

#else  // not x86-64: projection::runs_float() is false, so this is never reached

#include <cstdlib>

namespace nanomoe::cpu::gate_by_block {
void mix(const GateRows<float>&, const float*, float*, int64_t) {
  std::abort();
}
void mix(const GateRows<float>&, const uint16_t*, uint16_t*, int64_t) {
  std::abort();
}
void accumulate_grads(const GateRows<float>&, const float*, const float*, int64_t, float*, float*,
                      float*) {
  std::abort();
}
void accumulate_grads(const GateRows<float>&, const uint16_t*, const uint16_t*, int64_t, float*,
                      float*, float*) {
  std::abort();
}
}  // namespace nanomoe::cpu::gate_by_block

#endif
