// Mixing with destination blocks as the vector lanes (see gate_by_block.h). At each rank position
// c, 16 (or 32) destination blocks of 12 tokens are the product of the gate's slice at c with
// the tokens' (K_src x 12) activations at c: one GEMM-shaped step, each load of the gate serving
// 12 broadcast activations (the group's activations transposed once, so that the 12 lie side by
// side), every lane doing useful work however small the rank. The sums land in a staging area
// (rank position major) and are gathered from there into dst's (block, rank) order. The weight
// gradients are summed in the gate's own layout by block, whole vectors at a time.
#include "gate_by_block.h"

namespace nanomoe::cpu::gate_by_block {
namespace {

// Floats of one weight gradient's sums, laid out by block.
int64_t sums_per_grad(const GateRows<float>& g) {
  return g.src_blocks * g.steps() * g.dst_lanes;
}

}  // namespace

int64_t grads_size(const GateRows<float>& g) {
  return (g.variant == 2 ? 3 : 1) * sums_per_grad(g);
}

void grads_to_mix(const GateRows<float>& g, const float* sums, float* grad_mix, float* grad_left,
                  float* grad_right) {
  const int64_t steps = g.steps(), per_grad = sums_per_grad(g);
  for (int64_t s = 0; s < g.src_blocks; ++s) {
    for (int64_t c = 0; c < steps; ++c) {
      const float* row = sums + (s * steps + c) * g.dst_lanes;
      for (int64_t d = 0; d < g.dst_blocks; ++d) {
        const int64_t to = d * g.dst_stride + s * g.src_stride + c;
        grad_mix[to] = row[d];
        if (g.variant != 2) continue;
        grad_left[to] = row[per_grad + d];
        grad_right[to] = row[2 * per_grad + d];
      }
    }
  }
}

}  // namespace nanomoe::cpu::gate_by_block

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <algorithm>
#include <type_traits>
#include <vector>

#include "avx512.h"
#include "thread_buffer.h"

namespace nanomoe::cpu::gate_by_block {
namespace {

// Sums per load of the gate: enough to cover the FMA latency on both pipes.
constexpr int kTokens = static_cast<int>(kByBlockTokens);
constexpr int64_t kLanes = kGateLanes;
static_assert(kTokens <= 16, "to_columns transposes 16 tokens at a time");

// The group's activations as float32 with its tokens innermost: element (t, e) of its (kTokens,
// row) rows at columns[e * kTokens + t], rows past count zeros. A broadcast of each token at one
// column then reads the next kTokens floats, where reading the rows in place touched a cache line
// per token and kept twelve row offsets in registers (or spilled them).
template <typename T>
NANOMOE_AVX512 void to_columns(const T* x, int64_t row, int64_t count, float* columns) {
  for (int64_t e0 = 0; e0 < row; e0 += 16) {
    const __mmask16 lanes = first_lanes(row - e0);
    __m512i block[16];
    for (int t = 0; t < 16; ++t) {
      block[t] = t < count ? _mm512_castps_si512(load_as_float(lanes, x + t * row + e0))
                           : _mm512_setzero_si512();
    }
    transpose16(block);  // block[e]: column e0 + e, tokens in the lanes
    for (int64_t e = 0; e < std::min<int64_t>(16, row - e0); ++e) {
      _mm512_mask_storeu_epi32(columns + (e0 + e) * kTokens, first_lanes(kTokens), block[e]);
    }
  }
}

// diagonal_outer's rank-one part needs <right_ds, src_ts> for the 16 blocks from d0:
// dots[(s * kTokens + t) * 16 + l] for every source block s.
NANOMOE_AVX512 void outer_dots(const GateRows<float>& g, const float* columns, int64_t d0,
                               float* dots) {
  const int64_t r = g.rank;
  for (int64_t s = 0; s < g.src_blocks; ++s) {
    const float* right = g.right_by_block + s * r * g.dst_lanes + d0;
    __m512 acc[kTokens];
#pragma GCC unroll 12
    for (int t = 0; t < kTokens; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t c = 0; c < r; ++c) {
      const __m512 weight = _mm512_loadu_ps(right + c * g.dst_lanes);
      const float* at = columns + (s * r + c) * kTokens;
#pragma GCC unroll 12
      for (int t = 0; t < kTokens; ++t) {
        acc[t] = _mm512_fmadd_ps(weight, _mm512_set1_ps(at[t]), acc[t]);
      }
    }
#pragma GCC unroll 12
    for (int t = 0; t < kTokens; ++t) _mm512_storeu_ps(dots + (s * kTokens + t) * kLanes, acc[t]);
  }
}

// diagonal_outer's source blocks per pass of sums_at: as many as keep their dots (a vector per
// token) and activations within two thirds of L1, since every rank position of the pass reads
// them again; in passes of equal size.
int64_t sources_per_pass(int64_t rank, int64_t sources) {
  constexpr int64_t kPassBytes = 32 * 1024;
  const int64_t per_source = kTokens * (rank + kLanes) * static_cast<int64_t>(sizeof(float));
  const int64_t most = std::max<int64_t>(1, kPassBytes / per_source);
  const int64_t passes = (sources + most - 1) / most;
  return (sources + passes - 1) / passes;
}

// Vectors of 16 destination blocks per pass of sums_at: the scalar and diagonal gates take two
// where more than 16 blocks are left, so that each broadcast activation serves both, where each
// vector took its own broadcast (NOTES, version 74); diagonal_outer's dot products are per 16
// blocks.
constexpr int kMostVectors = 2;
template <int kVariant>
constexpr int kPassVectors = kVariant == 2 ? 1 : kMostVectors;

// The 16 * kVectors blocks from d0 at rank position c, for every token of the group, summed over
// source blocks [s0, s1) into stage[((v * kTokens + t) * rank + c) * 16 + l] for vector v: added
// to what the passes before left there unless s0 is 0, so every sum runs over the sources in
// order.
template <int kVariant, int kVectors>
NANOMOE_AVX512 void sums_at(const GateRows<float>& g, const float* columns, int64_t d0, int64_t c,
                            int64_t s0, int64_t s1, const float* dots, float* stage) {
  static_assert(kVectors >= 1 && kVectors <= kPassVectors<kVariant>, "one or two vectors a pass");
  const int64_t r = g.rank, steps = g.steps();
  const float* gate = g.mix_by_block + (kVariant == 0 ? 0 : c) * g.dst_lanes + d0;
  const float* left = kVariant == 2 ? g.left_by_block + c * g.dst_lanes + d0 : nullptr;
  const auto stage_at = [&](int v, int t) { return stage + ((v * kTokens + t) * r + c) * kLanes; };
  __m512 acc[kTokens][kVectors];
#pragma GCC unroll 12
  for (int t = 0; t < kTokens; ++t) {
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v) {
      acc[t][v] = s0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(stage_at(v, t));
    }
  }
  for (int64_t s = s0; s < s1; ++s) {
    __m512 weight[kVectors];
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v) {
      weight[v] = _mm512_loadu_ps(gate + s * steps * g.dst_lanes + v * kLanes);
    }
    const float* at = columns + (s * r + c) * kTokens;
#pragma GCC unroll 12
    for (int t = 0; t < kTokens; ++t) {
      const __m512 activation = _mm512_set1_ps(at[t]);
#pragma GCC unroll 2
      for (int v = 0; v < kVectors; ++v) {
        acc[t][v] = _mm512_fmadd_ps(weight[v], activation, acc[t][v]);
      }
    }
    if constexpr (kVariant == 2) {
      const __m512 scale = _mm512_loadu_ps(left + s * r * g.dst_lanes);
      const float* dot = dots + s * kTokens * kLanes;
#pragma GCC unroll 12
      for (int t = 0; t < kTokens; ++t) {
        acc[t][0] = _mm512_fmadd_ps(scale, _mm512_loadu_ps(dot + t * kLanes), acc[t][0]);
      }
    }
  }
#pragma GCC unroll 12
  for (int t = 0; t < kTokens; ++t) {
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v) _mm512_storeu_ps(stage_at(v, t), acc[t][v]);
  }
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
  thread_local std::vector<float> columns_buffer, stage_buffer, dots_buffer;
  thread_local std::vector<int32_t> order_buffer;
  float* columns = thread_buffer(columns_buffer, src_row * kTokens);
  float* stage = thread_buffer(stage_buffer, kPassVectors<kVariant> * kTokens * r * kLanes);
  float* dots = thread_buffer(dots_buffer, kVariant == 2 ? g.src_blocks * kTokens * kLanes : 0);
  int32_t* order = thread_buffer(order_buffer, kLanes * r);
  for (int64_t e = 0; e < kLanes * r; ++e) order[e] = static_cast<int32_t>(e % r * kLanes + e / r);
  const int64_t pass = kVariant == 2 ? sources_per_pass(r, g.src_blocks) : g.src_blocks;
  for (int64_t t0 = 0; t0 < tokens; t0 += kTokens) {
    const int64_t group = std::min<int64_t>(kTokens, tokens - t0);
    to_columns(src + t0 * src_row, src_row, group, columns);
    for (int64_t d0 = 0; d0 < g.dst_blocks;) {
      const int vectors = g.dst_blocks - d0 > kLanes ? kPassVectors<kVariant> : 1;
      if constexpr (kVariant == 2) outer_dots(g, columns, d0, dots);
      for (int64_t s0 = 0; s0 < g.src_blocks; s0 += pass) {
        const int64_t s1 = std::min(g.src_blocks, s0 + pass);
        for (int64_t c = 0; c < r; ++c) {
          if (vectors == 1) {
            sums_at<kVariant, 1>(g, columns, d0, c, s0, s1, dots, stage);
          } else {
            sums_at<kVariant, kPassVectors<kVariant>>(g, columns, d0, c, s0, s1, dots, stage);
          }
        }
      }
      for (int v = 0; v < vectors; ++v) {
        const int64_t first = d0 + v * kLanes, run = std::min(kLanes, g.dst_blocks - first) * r;
        for (int64_t t = 0; t < group; ++t) {
          gather_run(stage + (v * kTokens + t) * r * kLanes, run, order,
                     dst + (t0 + t) * dst_row + first * r);
        }
      }
      d0 += vectors * kLanes;
    }
  }
}

// ---- the gate's weight gradients ------------------------------------------------------------

// Tokens whose activations are gathered per pass, and source blocks whose sums sit in registers at
// once. diagonal_outer takes fewer of both, so that what every rank position of grads_from reads
// again (the source blocks' activations and their two dots per token) and what outer_grad_dots
// reads again for every source block (grad_t's 16 blocks from d0) stay in L1; with 64 and 8 they
// came from L2. The other gates read no dots, and more sums per pass cost them less.
template <int kVariant>
constexpr int64_t kGradTokens = kVariant == 2 ? 32 : 64;
template <int kVariant>
constexpr int kGradSources = kVariant == 2 ? 4 : 8;
constexpr int kDotTokens = 4;  // tokens per pass over a rank-one factor: 8 sums in flight

// One pass's operands: the source rows as float32, grad_dst with the block innermost
// (grad_t[(t * rank + c) * dst_lanes + d], padding zero), and for diagonal_outer, per 16 blocks
// from d0, dots_right[(s * kGradTokens<2> + t) * 16 + l] = <right_(d0+l)s, x_ts> and dots_left
// likewise with <left_(d0+l)s, grad_t(d0+l)>.
struct GradPass {
  const float* x;
  const float* grad_t;
  float* dots_right;
  float* dots_left;
  int64_t tokens;
};

NANOMOE_AVX512 inline void add_into(float* at, __m512 sum) {
  _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), sum));
}

// The dots of source block s for kCount tokens from t, each summed over the rank in order.
template <int kCount>
NANOMOE_AVX512 void outer_grad_dots_of(const GateRows<float>& g, const GradPass& pass, int64_t d0,
                                       int64_t s, int64_t t) {
  const int64_t r = g.rank, src_row = g.src_blocks * r;
  const float* right = g.right_by_block + s * r * g.dst_lanes + d0;
  const float* left = g.left_by_block + s * r * g.dst_lanes + d0;
  const float* x = pass.x + t * src_row + s * r;
  const float* gy = pass.grad_t + t * r * g.dst_lanes + d0;
  __m512 by_right[kCount], by_left[kCount];
  for (int u = 0; u < kCount; ++u) by_right[u] = by_left[u] = _mm512_setzero_ps();
  for (int64_t c = 0; c < r; ++c) {
    const __m512 right_c = _mm512_loadu_ps(right + c * g.dst_lanes);
    const __m512 left_c = _mm512_loadu_ps(left + c * g.dst_lanes);
#pragma GCC unroll 4
    for (int u = 0; u < kCount; ++u) {
      by_right[u] = _mm512_fmadd_ps(right_c, _mm512_set1_ps(x[u * src_row + c]), by_right[u]);
      by_left[u] =
          _mm512_fmadd_ps(left_c, _mm512_loadu_ps(gy + (u * r + c) * g.dst_lanes), by_left[u]);
    }
  }
  for (int u = 0; u < kCount; ++u) {
    _mm512_storeu_ps(pass.dots_right + (s * kGradTokens<2> + t + u) * kLanes, by_right[u]);
    _mm512_storeu_ps(pass.dots_left + (s * kGradTokens<2> + t + u) * kLanes, by_left[u]);
  }
}

NANOMOE_AVX512 void outer_grad_dots(const GateRows<float>& g, const GradPass& pass, int64_t d0) {
  for (int64_t s = 0; s < g.src_blocks; ++s) {
    int64_t t = 0;
    for (; t + kDotTokens <= pass.tokens; t += kDotTokens) {
      outer_grad_dots_of<kDotTokens>(g, pass, d0, s, t);
    }
    for (; t < pass.tokens; ++t) outer_grad_dots_of<1>(g, pass, d0, s, t);
  }
}

// Source blocks [s0, s0 + kCount) x the 16 blocks from d0: grad_mix[d, s(, c)] += sum_t
// grad_dst[t, d, c] x[t, s, c] (scalar: over c too) and, for diagonal_outer, grad_left[d, s, c] +=
// sum_t dots_right[t, d, s] grad_dst[t, d, c], grad_right[d, s, c] += sum_t dots_left[t, d, s]
// x[t, s, c]; into sums laid out by block (see gate_by_block.h).
template <int kVariant, int kCount>
NANOMOE_AVX512 void grads_from(const GateRows<float>& g, const GradPass& pass, int64_t d0,
                               int64_t s0, float* sums) {
  const int64_t r = g.rank, src_row = g.src_blocks * r, steps = g.steps();
  const int64_t per_grad = sums_per_grad(g);
  float* const first = sums + s0 * steps * g.dst_lanes + d0;  // entry (s0, 0, d0)
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
          const int64_t dot = ((s0 + j) * kGradTokens<2> + t) * kLanes;
          left[j] = _mm512_fmadd_ps(_mm512_loadu_ps(pass.dots_right + dot), gy, left[j]);
          right[j] = _mm512_fmadd_ps(_mm512_loadu_ps(pass.dots_left + dot), xs, right[j]);
        }
      }
    }
    if constexpr (kVariant != 0) {
      for (int j = 0; j < kCount; ++j) {
        float* at = first + (j * steps + c) * g.dst_lanes;
        add_into(at, mix[j]);
        if constexpr (kVariant == 2) {
          add_into(at + per_grad, left[j]);
          add_into(at + 2 * per_grad, right[j]);
        }
      }
    }
  }
  if constexpr (kVariant == 0) {
    for (int j = 0; j < kCount; ++j) add_into(first + j * g.dst_lanes, mix[j]);
  }
}

template <int kVariant, typename T>
NANOMOE_AVX512 void grads_tokens(const GateRows<float>& g, const T* src, const T* grad_dst,
                                 int64_t tokens, float* sums) {
  const int64_t r = g.rank, src_row = g.src_blocks * r, dst_row = g.dst_blocks * r;
  constexpr bool kConvert = !std::is_same_v<T, float>;
  thread_local std::vector<float> x_buffer, grad_buffer, grad_t_buffer, right_buffer, left_buffer;
  constexpr int64_t kTokensPerPass = kGradTokens<kVariant>;
  float* x_rows = thread_buffer(x_buffer, kConvert ? kTokensPerPass * src_row : 0);
  float* grad_rows = thread_buffer(grad_buffer, kConvert ? kTokensPerPass * dst_row : 0);
  float* grad_t = thread_buffer(grad_t_buffer, kTokensPerPass * r * g.dst_lanes);
  static_assert(kVariant != 2 || kTokensPerPass == kGradTokens<2>, "the dots are indexed so");
  const int64_t dots = kVariant == 2 ? g.src_blocks * kTokensPerPass * kLanes : 0;
  float* dots_right = thread_buffer(right_buffer, dots);
  float* dots_left = thread_buffer(left_buffer, dots);
  for (int64_t t0 = 0; t0 < tokens; t0 += kTokensPerPass) {
    const int64_t n = std::min(kTokensPerPass, tokens - t0);
    const float* gy = as_float(grad_dst + t0 * dst_row, n * dst_row, grad_rows);
    for (int64_t t = 0; t < n; ++t) {  // (d, c) -> (c, d): the blocks become the lanes
      for (int64_t c = 0; c < r; ++c) {
        float* row = grad_t + (t * r + c) * g.dst_lanes;
        for (int64_t d = 0; d < g.dst_blocks; ++d) row[d] = gy[t * dst_row + d * r + c];
        std::fill(row + g.dst_blocks, row + g.dst_lanes, 0.0f);  // so the padding sums are zeros
      }
    }
    const GradPass pass{as_float(src + t0 * src_row, n * src_row, x_rows), grad_t, dots_right,
                        dots_left, n};
    for (int64_t d0 = 0; d0 < g.dst_blocks; d0 += kLanes) {
      if constexpr (kVariant == 2) outer_grad_dots(g, pass, d0);
      int64_t s = 0;
      for (; s + kGradSources<kVariant> <= g.src_blocks; s += kGradSources<kVariant>) {
        grads_from<kVariant, kGradSources<kVariant>>(g, pass, d0, s, sums);
      }
      for (; s < g.src_blocks; ++s) grads_from<kVariant, 1>(g, pass, d0, s, sums);
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
                      int64_t tokens, float* sums) {
  with_variant(g.variant,
               [&](auto v) { grads_tokens<decltype(v)::value>(g, src, grad_dst, tokens, sums); });
}

void accumulate_grads(const GateRows<float>& g, const uint16_t* src, const uint16_t* grad_dst,
                      int64_t tokens, float* sums) {
  with_variant(g.variant,
               [&](auto v) { grads_tokens<decltype(v)::value>(g, src, grad_dst, tokens, sums); });
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
void accumulate_grads(const GateRows<float>&, const float*, const float*, int64_t, float*) {
  std::abort();
}
void accumulate_grads(const GateRows<float>&, const uint16_t*, const uint16_t*, int64_t, float*) {
  std::abort();
}
}  // namespace nanomoe::cpu::gate_by_block

#endif
