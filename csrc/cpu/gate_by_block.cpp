// Mixing with destination blocks as the vector lanes (see gate_by_block.h). At each rank position
// c, 16 (or 32) destination blocks of 12 tokens are the product of the gate's slice at c with
// the tokens' (K_src x 12) activations at c: one GEMM-shaped step, each load of the gate serving
// 12 broadcast activations (the group's activations transposed once, so that the 12 lie side by
// side), every lane doing useful work however small the rank. bfloat16 does the same on pairs of
// source blocks (vdpbf16ps) where the gate is laid out in pairs too. The sums land in a staging
// area (rank position major) and are transposed from there into dst's (block, rank) order. The
// weight gradients are summed in the gate's own layout by block, whole vectors at a time.
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

// The vector operations of the mixing, per element type of its operands: float32 lanes (FMA), or
// 32-bit pairs of bfloat16 (vdpbf16ps: two multiply-adds a lane, summed in float32).
template <typename E>
struct Lanes;

template <>
struct Lanes<float> {
  using Vec = __m512;
  NANOMOE_AVX512 static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  NANOMOE_AVX512 static Vec broadcast(float e) { return _mm512_set1_ps(e); }
  NANOMOE_AVX512 static __m512 madd(__m512 acc, Vec a, Vec b) { return _mm512_fmadd_ps(a, b, acc); }
};

template <>
struct Lanes<uint32_t> {
  using Vec = __m512bh;
  NANOMOE_AVX512 static Vec load(const uint32_t* p) { return (Vec)_mm512_loadu_si512(p); }
  NANOMOE_AVX512 static Vec broadcast(uint32_t e) { return (Vec)_mm512_set1_epi32(int(e)); }
  NANOMOE_AVX512 static __m512 madd(__m512 acc, Vec a, Vec b) {
    return _mm512_dpbf16_ps(acc, a, b);
  }
};

// The group's rows (count of them, `row` elements each) with its tokens innermost: element (t, e)
// at columns[e * kTokens + t], rows past count zeros. A broadcast of each token at one column then
// reads the next kTokens elements, where reading the rows in place touched a cache line per token
// and kept twelve row offsets in registers (or spilled them). float32 columns from float32 or
// bfloat16 rows (widened); 32-bit columns from 32-bit rows, as they are.
template <typename T, typename E>
NANOMOE_AVX512 void to_columns(const T* x, int64_t row, int64_t count, E* columns) {
  for (int64_t e0 = 0; e0 < row; e0 += 16) {
    const __mmask16 lanes = first_lanes(row - e0);
    __m512i block[16];
    for (int t = 0; t < 16; ++t) {
      if (t >= count) {
        block[t] = _mm512_setzero_si512();
      } else if constexpr (std::is_same_v<E, uint32_t>) {
        block[t] = _mm512_maskz_loadu_epi32(lanes, x + t * row + e0);
      } else {
        block[t] = _mm512_castps_si512(load_as_float(lanes, x + t * row + e0));
      }
    }
    transpose16(block);  // block[e]: column e0 + e, tokens in the lanes
    for (int64_t e = 0; e < std::min<int64_t>(16, row - e0); ++e) {
      _mm512_mask_storeu_epi32(columns + (e0 + e) * kTokens, first_lanes(kTokens), block[e]);
    }
  }
}

// The group's bfloat16 rows (count of them) paired over source blocks, tokens innermost: the pair
// (x[t, 2p, c], x[t, 2p + 1, c]) at pairs[(p * rank + c) * kTokens + t], the first low; an odd
// block count's last partner zero, rows past count zeros.
NANOMOE_AVX512 void to_source_pairs(const uint16_t* x, int64_t blocks, int64_t rank, int64_t count,
                                    uint32_t* pairs) {
  const int64_t row = blocks * rank;
  for (int64_t p = 0; p < (blocks + 1) / 2; ++p) {
    const bool partner = 2 * p + 1 < blocks;
    for (int64_t c0 = 0; c0 < rank; c0 += 16) {
      const __mmask16 lanes = first_lanes(rank - c0);
      __m512i block[16];
      for (int t = 0; t < 16; ++t) {
        const uint16_t* first = x + t * row + 2 * p * rank + c0;
        block[t] = t < count ? paired_lanes(lanes, first, partner ? first + rank : nullptr)
                             : _mm512_setzero_si512();
      }
      transpose16(block);  // block[e]: rank position c0 + e, tokens in the lanes
      for (int64_t e = 0; e < std::min<int64_t>(16, rank - c0); ++e) {
        _mm512_mask_storeu_epi32(pairs + ((p * rank + c0 + e) * kTokens), first_lanes(kTokens),
                                 block[e]);
      }
    }
  }
}

// The operands of one group's sums, in the mixing's element type E (float32, or bfloat16 pairs):
// the gate and left by block (s indexing source blocks, or pairs of them), the activations as
// columns (to_columns, or to_source_pairs), and diagonal_outer's dot products with right, per 16
// blocks from d0, dots[(s * kTokens + t) * 16 + l] (paired over source blocks as the gate is).
template <typename E>
struct GroupSums {
  const E* gate;
  const E* left;
  const E* columns;
  const E* dots;
};

// g's tensors by block in the element type E: float32, or bfloat16 in pairs.
template <typename E>
const E* in_lanes_of(const float* as_float, const uint32_t* in_pairs) {
  if constexpr (std::is_same_v<E, uint32_t>) {
    return in_pairs;
  } else {
    return as_float;
  }
}

// diagonal_outer's <right_ds, src_ts> for the 16 blocks from d0 and every source block s, summed
// over `depth` columns of right (by block: rank positions, or pairs of them) into float32
// dots[(s * kTokens + t) * 16 + l].
template <typename E>
NANOMOE_AVX512 void outer_dots(const GateRows<float>& g, const E* right, const E* columns,
                               int64_t depth, int64_t d0, float* dots) {
  using Ops = Lanes<E>;
  for (int64_t s = 0; s < g.src_blocks; ++s) {
    const E* weights = right + s * depth * g.dst_lanes + d0;
    __m512 acc[kTokens];
#pragma GCC unroll 12
    for (int t = 0; t < kTokens; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t c = 0; c < depth; ++c) {
      const auto weight = Ops::load(weights + c * g.dst_lanes);
      const E* at = columns + (s * depth + c) * kTokens;
#pragma GCC unroll 12
      for (int t = 0; t < kTokens; ++t) acc[t] = Ops::madd(acc[t], weight, Ops::broadcast(at[t]));
    }
#pragma GCC unroll 12
    for (int t = 0; t < kTokens; ++t) _mm512_storeu_ps(dots + (s * kTokens + t) * kLanes, acc[t]);
  }
}

// The float32 dots of outer_dots rounded to bfloat16 and paired over source blocks, as the
// rank-one sums' second operand in pairs: lane l of pairs[p * kTokens + t] holds the dots of
// blocks 2p and 2p + 1 (an odd count's last partner zero).
NANOMOE_AVX512 void pair_dots(const float* dots, int64_t blocks, uint32_t* pairs) {
  for (int64_t p = 0; p < (blocks + 1) / 2; ++p) {
    for (int t = 0; t < kTokens; ++t) {
      const __m512 first = _mm512_loadu_ps(dots + (2 * p * kTokens + t) * kLanes);
      const __m512 second = 2 * p + 1 < blocks
                                ? _mm512_loadu_ps(dots + ((2 * p + 1) * kTokens + t) * kLanes)
                                : _mm512_setzero_ps();
      _mm512_storeu_si512(pairs + (p * kTokens + t) * kLanes, pair_rounded(first, second));
    }
  }
}

// diagonal_outer's source blocks per pass of sums_at: as many as keep their dots (a vector per
// token) and activations within two thirds of L1, since every rank position of the pass reads
// them again; in passes of equal size. A pair of source blocks takes the bytes of one block in
// float32, so pairs are counted as blocks.
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
// sources [s0, s1) (blocks, or pairs of them) into stage[((v * kTokens + t) * rank + c) * 16 + l]
// for vector v: added to what the passes before left there unless s0 is 0, so every sum runs over
// the sources in order.
template <int kVariant, int kVectors, typename E>
NANOMOE_AVX512 void sums_at(const GateRows<float>& g, const GroupSums<E>& in, int64_t d0, int64_t c,
                            int64_t s0, int64_t s1, float* stage) {
  static_assert(kVectors >= 1 && kVectors <= kPassVectors<kVariant>, "one or two vectors a pass");
  using Ops = Lanes<E>;
  const int64_t r = g.rank, steps = g.steps();
  const E* gate = in.gate + (kVariant == 0 ? 0 : c) * g.dst_lanes + d0;
  const E* left = kVariant == 2 ? in.left + c * g.dst_lanes + d0 : nullptr;
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
    typename Ops::Vec weight[kVectors];
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v)
      weight[v] = Ops::load(gate + s * steps * g.dst_lanes + v * kLanes);
    const E* at = in.columns + (s * r + c) * kTokens;
#pragma GCC unroll 12
    for (int t = 0; t < kTokens; ++t) {
      const auto activation = Ops::broadcast(at[t]);
#pragma GCC unroll 2
      for (int v = 0; v < kVectors; ++v) acc[t][v] = Ops::madd(acc[t][v], weight[v], activation);
    }
    if constexpr (kVariant == 2) {
      const auto scale = Ops::load(left + s * r * g.dst_lanes);
      const E* dot = in.dots + s * kTokens * kLanes;
#pragma GCC unroll 12
      for (int t = 0; t < kTokens; ++t)
        acc[t][0] = Ops::madd(acc[t][0], scale, Ops::load(dot + t * kLanes));
    }
  }
#pragma GCC unroll 12
  for (int t = 0; t < kTokens; ++t) {
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v) _mm512_storeu_ps(stage_at(v, t), acc[t][v]);
  }
}

// One token's run of dst, blocks [0, width) of the run x every rank position, from its staging
// area (element (c, l) at c * 16 + l): 16 rank positions at a time transposed in registers, where
// a gather per 16 elements took 1.04x to 1.1x the forward's time (NOTES, version 103).
template <typename T>
NANOMOE_AVX512 void store_run(const float* stage, int64_t rank, int64_t width, T* out) {
  for (int64_t c0 = 0; c0 < rank; c0 += 16) {
    __m512i rows[16];
    for (int i = 0; i < 16; ++i) {
      rows[i] =
          c0 + i < rank ? _mm512_loadu_si512(stage + (c0 + i) * kLanes) : _mm512_setzero_si512();
    }
    transpose16(rows);  // rows[l]: block l's rank positions from c0
    const __mmask16 lanes = first_lanes(rank - c0);
    for (int64_t l = 0; l < width; ++l) {
      store_lanes(out + l * rank + c0, lanes, _mm512_castsi512_ps(rows[l]));
    }
  }
}

// E: float (float32 rows, or bfloat16 rows widened) or uint32_t (bfloat16 in pairs).
template <int kVariant, typename E, typename T>
NANOMOE_AVX512 void mix_tokens(const GateRows<float>& g, const T* src, T* dst, int64_t tokens) {
  constexpr bool kPairs = std::is_same_v<E, uint32_t>;
  const int64_t r = g.rank, src_row = g.src_blocks * r, dst_row = g.dst_blocks * r;
  const int64_t sources = kPairs ? (g.src_blocks + 1) / 2 : g.src_blocks;
  thread_local std::vector<E> columns_buffer;
  thread_local std::vector<uint32_t> words_buffer, dot_pairs_buffer;
  thread_local std::vector<float> stage_buffer, dots_buffer;
  E* columns = thread_buffer(columns_buffer, sources * r * kTokens);
  float* stage = thread_buffer(stage_buffer, kPassVectors<kVariant> * kTokens * r * kLanes);
  float* dots = thread_buffer(dots_buffer, kVariant == 2 ? g.src_blocks * kTokens * kLanes : 0);
  // In pairs, diagonal_outer's dot products read the rows' 32-bit words (pairs of rank positions)
  // as columns, and the rank-one sums their dots paired.
  const bool words = kPairs && kVariant == 2;
  uint32_t* row_words = thread_buffer(words_buffer, words ? src_row / 2 * kTokens : 0);
  uint32_t* dot_pairs = thread_buffer(dot_pairs_buffer, words ? sources * kTokens * kLanes : 0);
  const int64_t pass = kVariant == 2 ? sources_per_pass(r, sources) : sources;
  const GroupSums<E> in{in_lanes_of<E>(g.mix_by_block, g.mix_pairs_by_block),
                        in_lanes_of<E>(g.left_by_block, g.left_pairs_by_block), columns,
                        in_lanes_of<E>(dots, dot_pairs)};
  for (int64_t t0 = 0; t0 < tokens; t0 += kTokens) {
    const int64_t group = std::min<int64_t>(kTokens, tokens - t0);
    if constexpr (kPairs) {
      to_source_pairs(src + t0 * src_row, g.src_blocks, r, group, columns);
      if (words) {
        to_columns(reinterpret_cast<const uint32_t*>(src + t0 * src_row), src_row / 2, group,
                   row_words);
      }
    } else {
      to_columns(src + t0 * src_row, src_row, group, columns);
    }
    for (int64_t d0 = 0; d0 < g.dst_blocks;) {
      const int vectors = g.dst_blocks - d0 > kLanes ? kPassVectors<kVariant> : 1;
      if constexpr (kVariant == 2) {
        if constexpr (kPairs) {
          outer_dots(g, g.right_pairs_by_block, row_words, r / 2, d0, dots);
          pair_dots(dots, g.src_blocks, dot_pairs);
        } else {
          outer_dots(g, g.right_by_block, columns, r, d0, dots);
        }
      }
      for (int64_t s0 = 0; s0 < sources; s0 += pass) {
        const int64_t s1 = std::min(sources, s0 + pass);
        for (int64_t c = 0; c < r; ++c) {
          if (vectors == 1) {
            sums_at<kVariant, 1>(g, in, d0, c, s0, s1, stage);
          } else {
            sums_at<kVariant, kPassVectors<kVariant>>(g, in, d0, c, s0, s1, stage);
          }
        }
      }
      for (int v = 0; v < vectors; ++v) {
        const int64_t first = d0 + v * kLanes, width = std::min(kLanes, g.dst_blocks - first);
        for (int64_t t = 0; t < group; ++t) {
          store_run(stage + (v * kTokens + t) * r * kLanes, r, width,
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

// One pass's operands in the element type E: float32, a token a step; or bfloat16 in pairs, a pair
// of tokens a step (the second token high, an odd count's last partner zero), where the gate is
// laid out in pairs. x: the source rows, step p's at x + p * src_row; grad_t: grad_dst with the
// block innermost, step p's (c, d) at (p * rank + c) * dst_lanes + d, padding zero. For
// diagonal_outer, per 16 blocks from d0, dots_right[(s * kGradTokens<2> + p) * 16 + l] =
// <right_(d0+l)s, x_ts> and dots_left likewise <left_(d0+l)s, grad_t(d0+l)>, each summed per token
// over `depth` elements (rank positions, or pairs of them) from x_depth (token t's row at t *
// K_src * depth: x itself, or the bfloat16 rows' 32-bit words) and grad_depth ((t, q, d) at (t *
// depth + q) * dst_lanes + d: grad_t itself, or grad_dst's words by block).
template <typename E>
struct GradPass {
  const E* x;
  const E* grad_t;
  const E* x_depth;
  const E* grad_depth;
  E* dots_right;
  E* dots_left;
  int64_t tokens, steps, depth;
};

NANOMOE_AVX512 inline void add_into(float* at, __m512 sum) {
  _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), sum));
}

// kCount tokens' dots of source block s from token t, into GradPass's dots: float32, or rounded
// and paired over tokens (t even).
template <int kCount, typename E>
NANOMOE_AVX512 void store_dots(const __m512* sums, int64_t s, int64_t t, E* dots) {
  if constexpr (std::is_same_v<E, uint32_t>) {
    for (int u = 0; u < kCount; u += 2) {
      const __m512 partner = u + 1 < kCount ? sums[u + 1] : _mm512_setzero_ps();
      const int64_t at = (s * kGradTokens<2> + (t + u) / 2) * kLanes;
      _mm512_storeu_si512(dots + at, pair_rounded(sums[u], partner));
    }
  } else {
    for (int u = 0; u < kCount; ++u) {
      _mm512_storeu_ps(dots + (s * kGradTokens<2> + t + u) * kLanes, sums[u]);
    }
  }
}

// The dots of source block s for kCount tokens from t (even where they are paired), each summed
// over the depth in order.
template <int kCount, typename E>
NANOMOE_AVX512 void outer_grad_dots_of(const GateRows<float>& g, const GradPass<E>& pass,
                                       int64_t d0, int64_t s, int64_t t) {
  using Ops = Lanes<E>;
  const int64_t depth = pass.depth, row = g.src_blocks * depth;
  const E* right = in_lanes_of<E>(g.right_by_block, g.right_pairs_by_block);
  const E* left = in_lanes_of<E>(g.left_by_block, g.left_rank_pairs_by_block);
  right += s * depth * g.dst_lanes + d0;
  left += s * depth * g.dst_lanes + d0;
  const E* x = pass.x_depth + t * row + s * depth;
  const E* gy = pass.grad_depth + t * depth * g.dst_lanes + d0;
  __m512 by_right[kCount], by_left[kCount];
  for (int u = 0; u < kCount; ++u) by_right[u] = by_left[u] = _mm512_setzero_ps();
  for (int64_t q = 0; q < depth; ++q) {
    const auto right_q = Ops::load(right + q * g.dst_lanes);
    const auto left_q = Ops::load(left + q * g.dst_lanes);
#pragma GCC unroll 4
    for (int u = 0; u < kCount; ++u) {
      by_right[u] = Ops::madd(by_right[u], right_q, Ops::broadcast(x[u * row + q]));
      by_left[u] = Ops::madd(by_left[u], left_q, Ops::load(gy + (u * depth + q) * g.dst_lanes));
    }
  }
  store_dots<kCount>(by_right, s, t, pass.dots_right);
  store_dots<kCount>(by_left, s, t, pass.dots_left);
}

template <typename E>
NANOMOE_AVX512 void outer_grad_dots(const GateRows<float>& g, const GradPass<E>& pass, int64_t d0) {
  for (int64_t s = 0; s < g.src_blocks; ++s) {
    int64_t t = 0;
    for (; t + kDotTokens <= pass.tokens; t += kDotTokens) {
      outer_grad_dots_of<kDotTokens>(g, pass, d0, s, t);
    }
    if (t + 2 <= pass.tokens) outer_grad_dots_of<2>(g, pass, d0, s, t), t += 2;
    if (t < pass.tokens) outer_grad_dots_of<1>(g, pass, d0, s, t);
  }
}

// Source blocks [s0, s0 + kCount) x the 16 blocks from d0: grad_mix[d, s(, c)] += sum_t
// grad_dst[t, d, c] x[t, s, c] (scalar: over c too) and, for diagonal_outer, grad_left[d, s, c] +=
// sum_t dots_right[t, d, s] grad_dst[t, d, c], grad_right[d, s, c] += sum_t dots_left[t, d, s]
// x[t, s, c]; into sums laid out by block (see gate_by_block.h).
template <int kVariant, int kCount, typename E>
NANOMOE_AVX512 void grads_from(const GateRows<float>& g, const GradPass<E>& pass, int64_t d0,
                               int64_t s0, float* sums) {
  using Ops = Lanes<E>;
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
    for (int64_t p = 0; p < pass.steps; ++p) {
      const auto gy = Ops::load(pass.grad_t + (p * r + c) * g.dst_lanes + d0);
      const E* x = pass.x + p * src_row + s0 * r + c;
#pragma GCC unroll 8
      for (int j = 0; j < kCount; ++j) {
        const auto xs = Ops::broadcast(x[j * r]);
        mix[j] = Ops::madd(mix[j], gy, xs);
        if constexpr (kVariant == 2) {
          const int64_t dot = ((s0 + j) * kGradTokens<2> + p) * kLanes;
          left[j] = Ops::madd(left[j], Ops::load(pass.dots_right + dot), gy);
          right[j] = Ops::madd(right[j], Ops::load(pass.dots_left + dot), xs);
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

// grad_dst's n rows (bfloat16 bits) with the block innermost, in pairs of tokens: step p's (c, d)
// at grad_t[(p * rank + c) * dst_lanes + d] = (grad_dst[2p, d, c], grad_dst[2p + 1, d, c]); and
// with words (diagonal_outer), its 32-bit words the same way: (t, q, d) at grad_words[(t * rank /
// 2 + q) * dst_lanes + d] = (grad_dst[t, d, 2q], grad_dst[t, d, 2q + 1]). Padding zero.
void grads_in_pairs(const GateRows<float>& g, const uint16_t* grad_dst, int64_t n, uint32_t* grad_t,
                    uint32_t* grad_words) {
  const int64_t r = g.rank, dst_row = g.dst_blocks * r, lanes = g.dst_lanes;
  for (int64_t p = 0; p < (n + 1) / 2; ++p) {
    const uint16_t* low = grad_dst + 2 * p * dst_row;
    const uint16_t* high = 2 * p + 1 < n ? low + dst_row : nullptr;
    for (int64_t c = 0; c < r; ++c) {
      uint32_t* row = grad_t + (p * r + c) * lanes;
      for (int64_t d = 0; d < g.dst_blocks; ++d) {
        const uint32_t second = high ? high[d * r + c] : 0;
        row[d] = low[d * r + c] | second << 16;
      }
      std::fill(row + g.dst_blocks, row + lanes, 0u);
    }
  }
  if (!grad_words) return;
  for (int64_t t = 0; t < n; ++t) {
    const uint16_t* rows = grad_dst + t * dst_row;
    for (int64_t q = 0; q < r / 2; ++q) {
      uint32_t* row = grad_words + (t * r / 2 + q) * lanes;
      for (int64_t d = 0; d < g.dst_blocks; ++d) {
        row[d] = rows[d * r + 2 * q] | uint32_t(rows[d * r + 2 * q + 1]) << 16;
      }
      std::fill(row + g.dst_blocks, row + lanes, 0u);
    }
  }
}

// E: float (float32 rows, or bfloat16 rows widened) or uint32_t (bfloat16 in pairs of tokens).
template <int kVariant, typename E, typename T>
NANOMOE_AVX512 void grads_tokens(const GateRows<float>& g, const T* src, const T* grad_dst,
                                 int64_t tokens, float* sums) {
  constexpr bool kPairs = std::is_same_v<E, uint32_t>;
  const int64_t r = g.rank, src_row = g.src_blocks * r, dst_row = g.dst_blocks * r;
  constexpr bool kConvert = !kPairs && !std::is_same_v<T, float>;
  constexpr int64_t kTokensPerPass = kGradTokens<kVariant>;
  constexpr int64_t kSteps = kPairs ? kTokensPerPass / 2 : kTokensPerPass;
  thread_local std::vector<float> x_buffer, grad_buffer;
  thread_local std::vector<E> grad_t_buffer, right_buffer, left_buffer;
  thread_local std::vector<uint32_t> x_pairs_buffer, words_buffer;
  float* x_rows = thread_buffer(x_buffer, kConvert ? kTokensPerPass * src_row : 0);
  float* grad_rows = thread_buffer(grad_buffer, kConvert ? kTokensPerPass * dst_row : 0);
  uint32_t* x_pairs = thread_buffer(x_pairs_buffer, kPairs ? kSteps * src_row : 0);
  E* grad_t = thread_buffer(grad_t_buffer, kSteps * r * g.dst_lanes);
  const bool words = kPairs && kVariant == 2;
  uint32_t* grad_words =
      thread_buffer(words_buffer, words ? kTokensPerPass * r / 2 * g.dst_lanes : 0);
  static_assert(kVariant != 2 || kTokensPerPass == kGradTokens<2>, "the dots are indexed so");
  const int64_t dots = kVariant == 2 ? g.src_blocks * kTokensPerPass * kLanes : 0;
  E* dots_right = thread_buffer(right_buffer, dots);
  E* dots_left = thread_buffer(left_buffer, dots);
  for (int64_t t0 = 0; t0 < tokens; t0 += kTokensPerPass) {
    const int64_t n = std::min(kTokensPerPass, tokens - t0);
    GradPass<E> pass{};
    if constexpr (kPairs) {
      pair_rows<false>(n, src_row, src + t0 * src_row, src_row,
                       reinterpret_cast<uint16_t*>(x_pairs), 2 * src_row);
      grads_in_pairs(g, grad_dst + t0 * dst_row, n, grad_t, words ? grad_words : nullptr);
      pass = {x_pairs,    grad_t,      reinterpret_cast<const uint32_t*>(src + t0 * src_row),
              grad_words, dots_right,  dots_left,
              n,          (n + 1) / 2, r / 2};
    } else {
      const float* gy = as_float(grad_dst + t0 * dst_row, n * dst_row, grad_rows);
      for (int64_t t = 0; t < n; ++t) {  // (d, c) -> (c, d): the blocks become the lanes
        for (int64_t c = 0; c < r; ++c) {
          float* row = grad_t + (t * r + c) * g.dst_lanes;
          for (int64_t d = 0; d < g.dst_blocks; ++d) row[d] = gy[t * dst_row + d * r + c];
          std::fill(row + g.dst_blocks, row + g.dst_lanes, 0.0f);  // so the padding sums are zeros
        }
      }
      const float* x = as_float(src + t0 * src_row, n * src_row, x_rows);
      pass = {x, grad_t, x, grad_t, dots_right, dots_left, n, n, r};
    }
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
  with_variant(g.variant,
               [&](auto v) { mix_tokens<decltype(v)::value, float>(g, src, dst, tokens); });
}

void mix(const GateRows<float>& g, const uint16_t* src, uint16_t* dst, int64_t tokens) {
  with_variant(g.variant, [&](auto v) {
    if (g.mix_pairs_by_block) return mix_tokens<decltype(v)::value, uint32_t>(g, src, dst, tokens);
    mix_tokens<decltype(v)::value, float>(g, src, dst, tokens);
  });
}

void accumulate_grads(const GateRows<float>& g, const float* src, const float* grad_dst,
                      int64_t tokens, float* sums) {
  with_variant(g.variant, [&](auto v) {
    grads_tokens<decltype(v)::value, float>(g, src, grad_dst, tokens, sums);
  });
}

void accumulate_grads(const GateRows<float>& g, const uint16_t* src, const uint16_t* grad_dst,
                      int64_t tokens, float* sums) {
  with_variant(g.variant, [&](auto v) {
    if (g.mix_pairs_by_block) {
      return grads_tokens<decltype(v)::value, uint32_t>(g, src, grad_dst, tokens, sums);
    }
    grads_tokens<decltype(v)::value, float>(g, src, grad_dst, tokens, sums);
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
void accumulate_grads(const GateRows<float>&, const float*, const float*, int64_t, float*) {
  std::abort();
}
void accumulate_grads(const GateRows<float>&, const uint16_t*, const uint16_t*, int64_t, float*) {
  std::abort();
}
}  // namespace nanomoe::cpu::gate_by_block

#endif
